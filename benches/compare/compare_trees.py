#!/usr/bin/env python3
"""Veil vs Concrete ML 1.9 on the same XGBoost model, on the same machine, in one run.

Run it through ``run.sh --trees`` (which creates the virtual environment with
concrete-ml 1.9.0, xgboost 1.6.2 and onnxmltools 1.16.0, and builds Veil); by hand, from
the repository root:

    benches/compare/.venv/bin/python benches/compare/compare_trees.py --n-fhe 10

Steps (progress goes to stderr):

1. Train ``xgboost.XGBClassifier(n_estimators=20, max_depth=3, random_state=0)`` on
   scikit-learn breast cancer with ``models/training/train.py``'s conventions for
   ``breast_cancer_logreg`` (float32 features, ``train_test_split(test_size=0.2,
   stratify=y, random_state=0)``; no scaler: trees do not need one). Export the booster
   with onnxmltools ``convert_xgboost`` and write
   ``OUT/xgb_breast_cancer/{model.onnx,train.csv,test.csv}`` (train.py's CSV writer for
   its tree folders: each float32 feature exact also when parsed as float64).
   The ONNX export is checked against xgboost with onnxruntime.
2. Veil: ``veil compile`` the ONNX file (calibrated on train.csv), ``veil eval --mode
   simulate`` on all test rows, ``veil eval --mode fhe --limit N``, ``veil keygen`` for
   the key sizes, and (when the build has ``veil-server``) ``veil infer`` over gRPC on
   127.0.0.1 for the ciphertext bytes.
3. Concrete ML: ``concrete.ml.sklearn.XGBClassifier.from_sklearn_model(model, X_train)``
   with its default n_bits, ``compile(X_train)``; accuracy with ``fhe="disable"`` and
   ``fhe="simulate"`` on all test rows, key generation, then the first N test rows one at a
   time with ``fhe="execute"`` (after one untimed warm-up row), and the same rows through
   encrypt / run / decrypt to time the server's part alone. Key and ciphertext sizes come
   from the deployment API.
4. Write ``results_trees.json`` and ``results_trees.md`` (next to this script unless
   --results-dir).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "models" / "training"))

import compare  # noqa: E402  (benches/compare/compare.py: shared helpers)
from compare import (cmdline, cpu_seconds, fmt_acc, fmt_bytes, fmt_ms, fmt_p, log, machine_info,  # noqa: E402
                     median, one_core, pin_process, ratio, rel, run_cmd, veil_grpc, veil_input_bytes,
                     veil_keygen)

NAME = "xgb_breast_cancer"
N_ESTIMATORS = 20
MAX_DEPTH = 3
SEED = 0


# --------------------------------------------------------------------------- model


def train_model(work: Path):
    """Train the XGBoost classifier, export it with onnxmltools, write the CSVs."""
    import onnx
    import onnxmltools
    import onnxruntime as ort
    import sklearn
    import xgboost
    from onnxmltools.convert.common.data_types import FloatTensorType
    from sklearn.datasets import load_breast_cancer

    import train  # models/training/train.py: split(), write_csv(), read_csv()

    d = load_breast_cancer()
    X = d.data.astype(np.float32)  # the ONNX model takes float32; train on exactly those values
    y = d.target.astype(np.int64)
    X_train, X_test, y_train, y_test = train.split(X, y)
    model = xgboost.XGBClassifier(n_estimators=N_ESTIMATORS, max_depth=MAX_DEPTH, random_state=SEED,
                                  n_jobs=1, use_label_encoder=False, eval_metric="logloss")
    model.fit(X_train, y_train)
    float_pred = model.predict(X_test)
    float_proba = model.predict_proba(X_test)

    folder = work / NAME
    folder.mkdir(parents=True, exist_ok=True)
    onx = onnxmltools.convert_xgboost(model, initial_types=[("input", FloatTensorType([None, X.shape[1]]))])
    (folder / "model.onnx").write_bytes(onx.SerializeToString())
    # Features written as the exact float32 values even when parsed as float64 (train.py's
    # tree folders do the same): a comparison x < threshold must not flip on a rounding.
    if hasattr(train, "write_csv_full"):
        train.write_csv_full(folder / "train.csv", X_train, y_train, regression=False)
        train.write_csv_full(folder / "test.csv", X_test, y_test, regression=False)
    else:
        train.write_csv(folder / "train.csv", X_train, y_train)
        train.write_csv(folder / "test.csv", X_test, y_test)
    X_train_r, y_train_r = train.read_csv(folder / "train.csv")
    X_test_r, y_test_r = train.read_csv(folder / "test.csv")
    assert np.array_equal(X_train_r, X_train) and np.array_equal(y_train_r, y_train)
    assert np.array_equal(X_test_r, X_test) and np.array_equal(y_test_r, y_test)

    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    outs = sess.run(None, {sess.get_inputs()[0].name: X_test})
    ort_label = np.asarray(outs[0]).ravel()
    ort_proba = outs[1]
    if isinstance(ort_proba, list):  # ZipMap
        ort_proba = np.array([[row[k] for k in sorted(row)] for row in ort_proba])
    ort_proba = np.asarray(ort_proba, dtype=np.float64)

    m = onnx.load(str(folder / "model.onnx"))
    trees = model.get_booster().trees_to_dataframe()
    splits = trees[trees.Feature != "Leaf"]
    info = {
        "name": NAME, "dataset": "sklearn.datasets.load_breast_cancer", "n_features": int(X.shape[1]),
        "n_train": int(len(X_train)), "n_test": int(len(X_test)),
        "xgboost_params": {"n_estimators": N_ESTIMATORS, "max_depth": MAX_DEPTH, "random_state": SEED,
                           "n_jobs": 1},
        "n_trees": int(trees.Tree.nunique()), "n_splits": int(len(splits)),
        "n_leaves": int((trees.Feature == "Leaf").sum()),
        "n_distinct_comparisons": int(len(splits[["Feature", "Split"]].drop_duplicates())),
        "float_accuracy": float((float_pred == y_test).mean()),
        "onnxruntime_accuracy": float((ort_label.astype(np.int64) == y_test).mean()),
        "onnx_vs_xgboost_max_abs_proba_diff": float(np.abs(ort_proba - float_proba).max()),
        "onnx_predictions_identical": bool(np.array_equal(ort_label.astype(np.int64), float_pred)),
        "onnx_ops": [f"{n.domain or 'ai.onnx'}:{n.op_type}" for n in m.graph.node],
        "onnx_opsets": {o.domain or "ai.onnx": int(o.version) for o in m.opset_import},
        "onnx": rel(folder / "model.onnx"), "train_csv": rel(folder / "train.csv"),
        "test_csv": rel(folder / "test.csv"),
        "versions": {"xgboost": xgboost.__version__, "onnxmltools": onnxmltools.__version__,
                     "onnx": onnx.__version__, "onnxruntime": ort.__version__, "sklearn": sklearn.__version__},
    }
    return model, (X_train, y_train, X_test, y_test), float_pred, info


# --------------------------------------------------------------------------- Veil


def run_veil(veil: Path, work: Path, n_fhe: int, single_core: bool, grpc: bool, res: dict) -> dict:
    """Fills `res` step by step, so that what ran is kept when a later step fails."""
    d = work / NAME
    model_veil = work / f"{NAME}.veil"
    res["binary"] = rel(veil)
    res["binary_fingerprint_start"] = fingerprint(veil)
    res["version"] = subprocess.run([str(veil), "--version"], capture_output=True, text=True).stdout.strip()

    cmd = [str(veil), "compile", str(d / "model.onnx"), "--calibration", str(d / "train.csv"),
           "-o", str(model_veil), "--json"]
    summary, wall, _ = run_cmd(cmd, "veil compile")
    res["compile"] = {"command": cmdline(cmd), "wall_s": wall, "summary": summary}

    cmd = [str(veil), "eval", str(model_veil), "--data", str(d / "test.csv"), "--mode", "simulate", "--json"]
    sim, wall, _ = run_cmd(cmd, "veil eval (simulate, all test rows)")
    res["simulate"] = {"command": cmdline(cmd), "wall_s": wall, "result": sim}

    cmd = [str(veil), "eval", str(model_veil), "--data", str(d / "test.csv"), "--mode", "fhe",
           "--limit", str(n_fhe), "--json"]
    fhe, wall, _ = run_cmd(cmd, f"veil eval (fhe, first {n_fhe} test rows)")
    res["fhe"] = {"command": cmdline(cmd), "wall_s": wall, "process_cores_busy": compare.LAST_CORES_BUSY[0],
                  "result": fhe}
    log(f"veil: latency_ms_median {(fhe or {}).get('latency_ms_median')}, "
        f"pbs_per_sample {(fhe or {}).get('pbs_per_sample')}")

    if single_core:
        core = one_core()
        fhe1, wall, _ = run_cmd(cmd, f"veil eval (fhe, first {n_fhe} test rows, one core)", cpus={core})
        res["fhe_one_core"] = {"command": f"taskset -c {core} {cmdline(cmd)}", "wall_s": wall, "result": fhe1}

    res["keygen_cli"] = veil_keygen(veil, work)
    if grpc:
        res["grpc"] = veil_grpc(veil, work, model_veil, res["keygen_cli"], d / "test.csv", n_fhe, name=NAME)
    else:
        res["grpc"] = {"available": False, "note": "skipped (--no-grpc)"}
    res["input_bytes"] = veil_input_bytes(summary, res["grpc"])
    res["binary_fingerprint_end"] = fingerprint(veil)
    if res["binary_fingerprint_end"] != res["binary_fingerprint_start"]:
        log("veil: WARNING: the veil binary changed during the run")
    return res


def fingerprint(path: Path) -> dict:
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    st = path.stat()
    return {"sha256": h.hexdigest(), "mtime_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(st.st_mtime))}


# --------------------------------------------------------------------------- Concrete ML


def run_concrete(xgb_model, data, n_fhe: int, work: Path, single_core: bool, sim_repeats: int,
                 other_n_bits: list[int]) -> dict:
    import concrete.fhe as cfhe
    import concrete.ml
    from concrete.ml.deployment import FHEModelClient, FHEModelDev, FHEModelServer
    from concrete.ml.sklearn import XGBClassifier as ConcreteXGBClassifier

    X_train, y_train, X_test, y_test = data
    res: dict = {"version": concrete.ml.__version__}
    try:
        from importlib.metadata import version
        res["concrete_python_version"] = version("concrete-python")
    except Exception:
        pass
    default_n_bits = inspect.signature(ConcreteXGBClassifier.from_sklearn_model).parameters["n_bits"].default
    res["settings"] = {"n_bits": f"default ({default_n_bits!r})", "p_error": "default",
                       "TREES_USE_ROUNDING": os.environ.get("TREES_USE_ROUNDING", "1 (default)")}

    log(f"concrete-ml: XGBClassifier.from_sklearn_model(model, X_train) (default n_bits={default_n_bits!r})...")
    t = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        cm = ConcreteXGBClassifier.from_sklearn_model(xgb_model, X_train)
    res["from_sklearn_s"] = time.perf_counter() - t
    res["n_bits_used"] = cm.n_bits if isinstance(cm.n_bits, int) else dict(cm.n_bits)
    log("concrete-ml: compile(X_train)...")
    t = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        circuit = cm.compile(X_train)
    res["compile_s"] = time.perf_counter() - t
    circuit = cm.fhe_circuit
    circ = {}
    for name in ("programmable_bootstrap_count", "p_error", "global_p_error", "complexity",
                 "size_of_secret_keys", "size_of_bootstrap_keys", "size_of_keyswitch_keys",
                 "size_of_inputs", "size_of_outputs", "key_switch_count", "packing_key_switch_count",
                 "clear_addition_count", "encrypted_addition_count", "clear_multiplication_count",
                 "encrypted_negation_count"):
        try:
            v = getattr(circuit, name)
            circ[name] = float(v) if isinstance(v, (float, np.floating)) else int(v)
        except Exception as e:  # pragma: no cover
            circ[name] = f"unavailable ({type(e).__name__})"
    try:
        circ["max_integer_bit_width"] = int(circuit.graph.maximum_integer_bit_width())
    except Exception:
        pass
    try:
        per_tag = circuit.statistics.get("programmable_bootstrap_count_per_parameter")
        if per_tag:
            circ["programmable_bootstrap_count_per_parameter"] = {str(k): int(v) for k, v in per_tag.items()}
    except Exception:
        pass
    res["circuit"] = circ
    log(f"concrete-ml: compiled in {res['compile_s']:.1f}s; circuit {circ}")

    n_test = len(X_test)
    res["float_accuracy"] = float((xgb_model.predict(X_test) == y_test).mean())

    log("concrete-ml: quantized accuracy (fhe='disable')...")
    t = time.perf_counter()
    dis_pred = cm.predict(X_test, fhe="disable")
    res["disable_accuracy"] = float((dis_pred == y_test).mean())
    res["disable_s"] = time.perf_counter() - t

    sims = []
    for k in range(sim_repeats):
        log(f"concrete-ml: simulated accuracy (fhe='simulate', {n_test} rows), run {k + 1}/{sim_repeats}...")
        t = time.perf_counter()
        pred = cm.predict(X_test, fhe="simulate")
        sims.append(float((pred == y_test).mean()))
        res["simulate_s"] = time.perf_counter() - t
        if k == 0:
            sim_pred = pred
    res["simulated_accuracy_runs"] = sims
    res["simulated_accuracy"] = float(np.mean(sims))
    res["n_test"] = n_test
    log(f"concrete-ml: float {res['float_accuracy']:.4f}, disable {res['disable_accuracy']:.4f}, "
        f"simulate {res['simulated_accuracy']:.4f}")

    log("concrete-ml: key generation (fhe_circuit.keygen(force=True))...")
    t = time.perf_counter()
    circuit.keygen(force=True)
    res["keygen_s"] = time.perf_counter() - t
    log(f"concrete-ml: keygen {res['keygen_s']:.1f}s")

    log("concrete-ml: warm-up execution (1 row, not counted)...")
    t = time.perf_counter()
    cm.predict(X_test[:1], fhe="execute")
    res["first_execute_s"] = time.perf_counter() - t
    log(f"concrete-ml: warm-up {res['first_execute_s']:.1f}s")

    e2e, preds = [], []
    for i in range(n_fhe):
        t = time.perf_counter()
        out = cm.predict(X_test[i:i + 1], fhe="execute")
        e2e.append(time.perf_counter() - t)
        preds.append(int(out[0]))
        log(f"concrete-ml: execute row {i + 1}/{n_fhe}: {e2e[-1] * 1e3:.0f} ms, "
            f"pred {preds[-1]} label {int(y_test[i])}")
    preds = np.array(preds, dtype=np.int64)
    res["fhe"] = {
        "n": n_fhe,
        "accuracy": float((preds == y_test[:n_fhe]).mean()) if n_fhe else None,
        "agreement_with_simulation": float((preds == sim_pred[:n_fhe]).mean()) if n_fhe else None,
        "agreement_with_disable": float((preds == dis_pred[:n_fhe]).mean()) if n_fhe else None,
        "execute_ms_per_row": [x * 1e3 for x in e2e],
        "execute_ms_median": median([x * 1e3 for x in e2e]),
    }

    # The server's part alone (fhe_circuit.run), comparable with Veil's latency_ms_median.
    enc_ms, run_ms, dec_ms, run_preds = [], [], [], []
    run_cpu = 0.0
    for i in range(n_fhe):
        q = cm.quantize_input(X_test[i:i + 1])
        t0 = time.perf_counter()
        enc = circuit.encrypt(q)
        t1 = time.perf_counter()
        c0 = cpu_seconds(resource.RUSAGE_SELF)
        out = circuit.run(enc)
        run_cpu += cpu_seconds(resource.RUSAGE_SELF) - c0
        t2 = time.perf_counter()
        dq = circuit.decrypt(out)
        t3 = time.perf_counter()
        try:
            proba = cm.post_processing(cm.dequantize_output(np.asarray(dq)))
            run_preds.append(int(cm.classes_[np.argmax(proba, axis=1)][0]))
        except Exception as e:  # pragma: no cover
            run_preds.append(None)
            log(f"concrete-ml: could not decode the run output: {type(e).__name__}: {e}")
        enc_ms.append((t1 - t0) * 1e3)
        run_ms.append((t2 - t1) * 1e3)
        dec_ms.append((t3 - t2) * 1e3)
        log(f"concrete-ml: run row {i + 1}/{n_fhe}: encrypt {enc_ms[-1]:.1f} ms, "
            f"run {run_ms[-1]:.0f} ms, decrypt {dec_ms[-1]:.1f} ms, pred {run_preds[-1]}")
    res["fhe"].update({
        "encrypt_ms_median": median(enc_ms),
        "run_ms_per_row": run_ms,
        "run_ms_median": median(run_ms),
        "decrypt_ms_median": median(dec_ms),
        "run_cores_busy": run_cpu / (sum(run_ms) / 1e3) if run_ms else None,
        "run_predictions_match_execute": (run_preds == [int(p) for p in preds]) if n_fhe else None,
    })

    if single_core:
        core = one_core()
        before = pin_process({core})
        try:
            one = []
            for i in range(n_fhe):
                enc = circuit.encrypt(cm.quantize_input(X_test[i:i + 1]))
                t = time.perf_counter()
                circuit.run(enc)
                one.append((time.perf_counter() - t) * 1e3)
                log(f"concrete-ml: run row {i + 1}/{n_fhe} on CPU {core} only: {one[-1]:.0f} ms")
        finally:
            pin_process(before)
        res["fhe"]["one_core_run_ms_per_row"] = one
        res["fhe"]["one_core_run_ms_median"] = median(one)

    log("concrete-ml: deployment API (FHEModelDev/Client/Server): keygen, key and ciphertext sizes...")
    dep_dir = work / "concrete_deployment"
    shutil.rmtree(dep_dir, ignore_errors=True)
    FHEModelDev(path_dir=str(dep_dir), model=cm).save()
    key_dir = work / "concrete_keys"
    shutil.rmtree(key_dir, ignore_errors=True)  # Concrete reuses cached keys from key_dir, even with force=True
    client = FHEModelClient(path_dir=str(dep_dir), key_dir=str(key_dir))
    t = time.perf_counter()
    client.generate_private_and_evaluation_keys(force=True)
    dep_keygen_s = time.perf_counter() - t
    ek = client.get_serialized_evaluation_keys()
    enc1 = client.quantize_encrypt_serialize(X_test[:1])
    server = FHEModelServer(path_dir=str(dep_dir))
    server.load()
    ek_obj = cfhe.EvaluationKeys.deserialize(ek)
    t = time.perf_counter()
    out1 = server.run(enc1, ek_obj)
    dep_run_s = time.perf_counter() - t
    try:
        dec1 = np.asarray(client.deserialize_decrypt_dequantize(out1))
        pred1 = int(cm.classes_[np.argmax(dec1.reshape(1, -1), axis=1)][0]) if dec1.size > 1 else int(dec1.ravel()[0] > 0.5)
        roundtrip = (pred1 == int(preds[0])) if n_fhe else None
    except Exception as e:  # pragma: no cover
        roundtrip = f"not checked ({type(e).__name__}: {e})"
    res["deployment"] = {
        "keygen_s": dep_keygen_s,
        "eval_key_bytes": len(ek),
        "input_bytes_per_row": len(enc1),
        "output_bytes_per_row": len(out1),
        "server_run_first_row_s": dep_run_s,
        "roundtrip_prediction_matches_execute": roundtrip,
    }
    log(f"concrete-ml: deployment keygen {dep_keygen_s:.1f}s, eval keys {len(ek)} B, "
        f"input {len(enc1)} B, output {len(out1)} B")

    # Context only (compilation, no keys, no encrypted run): what other n_bits would cost.
    res["other_n_bits"] = []
    for nb in other_n_bits:
        log(f"concrete-ml: context: from_sklearn_model(n_bits={nb}) + compile, bootstrap count and accuracy...")
        try:
            with contextlib.redirect_stdout(sys.stderr):
                cm2 = ConcreteXGBClassifier.from_sklearn_model(xgb_model, X_train, n_bits=nb)
                cm2.compile(X_train)
        except Exception as e:  # pragma: no cover
            log(f"concrete-ml: context n_bits={nb} failed: {type(e).__name__}: {e}")
            continue
        c2 = cm2.fhe_circuit
        res["other_n_bits"].append({
            "n_bits": nb,
            "programmable_bootstrap_count": int(c2.programmable_bootstrap_count),
            "max_integer_bit_width": int(c2.graph.maximum_integer_bit_width()),
            "complexity": float(c2.complexity),
            "disable_accuracy": float((cm2.predict(X_test, fhe="disable") == y_test).mean()),
            "simulated_accuracy": float((cm2.predict(X_test, fhe="simulate") == y_test).mean()),
        })
        log(f"concrete-ml: context n_bits={nb}: {res['other_n_bits'][-1]}")
    return res


# --------------------------------------------------------------------------- report


TITLE = f"Veil vs Concrete ML: XGBoost {N_ESTIMATORS} trees x depth {MAX_DEPTH} (breast cancer)"


def build_table(r: dict) -> list[str]:
    """The comparison table (shared by results_trees.md and BENCHMARKS.md)."""
    v, c = r.get("veil"), r.get("concrete_ml")
    n = r["n_fhe"]
    n_test = r["model"]["n_test"]
    vsum = ((v or {}).get("compile") or {}).get("summary") or {}
    vs = ((v or {}).get("simulate") or {}).get("result") or {}
    vf = ((v or {}).get("fhe") or {}).get("result") or {}
    vk = (v or {}).get("keygen_cli") or {}
    cf = (c or {}).get("fhe") or {}
    cd = (c or {}).get("deployment") or {}
    cc = (c or {}).get("circuit") or {}
    veil_note = (v or {}).get("note")
    na_v = "n/a (see below)" if veil_note else "n/a"
    L = [f"| metric | Veil | Concrete ML {c.get('version', '1.9') if c else '1.9'} | Veil / Concrete |",
         "|---|---|---|---|"]

    def row(name, a, b, rat=""):
        L.append(f"| {name} | {a} | {b} | {rat} |")

    fa = r["model"]["float_accuracy"]
    row(f"float accuracy (xgboost `predict`, {n_test} test rows; one model for both)", fmt_acc(fa, n_test),
        fmt_acc(fa, n_test))
    row(f"quantized accuracy, exact (no FHE noise), {n_test} rows",
        fmt_acc(vs.get("simulated_accuracy"), n_test) if vs else na_v,
        fmt_acc(c["disable_accuracy"], n_test) + " (`fhe=\"disable\"`)" if c else "n/a")
    row(f"simulated accuracy (with FHE noise), {n_test} rows",
        fmt_acc(vs.get("simulated_accuracy_with_noise"), n_test) if vs.get("simulated_accuracy_with_noise")
        is not None else na_v,
        (fmt_acc(c["simulated_accuracy"]) + f" (`fhe=\"simulate\"`, mean of {len(c['simulated_accuracy_runs'])} "
         "runs: " + ", ".join(fmt_acc(a) for a in c["simulated_accuracy_runs"]) + ")") if c else "n/a")
    row(f"encrypted accuracy, first {n} rows",
        fmt_acc(vf.get("accuracy"), n) + (f"; agreement with simulation {fmt_acc(vf.get('agreement'))}"
                                          if vf.get("agreement") is not None else "") if vf else na_v,
        fmt_acc(cf.get("accuracy"), n) + f"; agreement with simulation {fmt_acc(cf.get('agreement_with_simulation'))}"
        if cf else "n/a")
    row(f"**latency per row, server evaluation** (median of {n})",
        f"**{fmt_ms(vf.get('latency_ms_median'))}**" if vf else na_v,
        f"**{fmt_ms(cf.get('run_ms_median'))}** (`fhe_circuit.run`)" if cf else "n/a",
        f"**{ratio(vf.get('latency_ms_median'), cf.get('run_ms_median'))}**" if vf and cf else "")
    v1 = ((v or {}).get("fhe_one_core") or {}).get("result") or {}
    c1 = cf.get("one_core_run_ms_median")
    if v1 or c1:
        row(f"latency per row, server evaluation, pinned to one core (median of {n})",
            f"{fmt_ms(v1.get('latency_ms_median'))} (`taskset -c N veil eval`)" if v1 else "n/a",
            f"{fmt_ms(c1)} (all threads pinned to one core)" if c1 else "n/a",
            ratio(v1.get("latency_ms_median"), c1))
    veil_e2e = (vf.get("latency_ms_median") or 0) + (vf.get("encrypt_ms_median") or 0) if vf else None
    row(f"latency per row, client + server (median of {n})",
        f"{fmt_ms(veil_e2e)} (encrypt + evaluate; decrypt not timed)" if vf else na_v,
        f"{fmt_ms(cf.get('execute_ms_median'))} (`predict(fhe=\"execute\")`: quantize, encrypt, run, decrypt)"
        if cf else "n/a",
        ratio(veil_e2e, cf.get("execute_ms_median")))
    row("encryption per row (median)", fmt_ms(vf.get("encrypt_ms_median")) if vf else na_v,
        fmt_ms(cf.get("encrypt_ms_median")) if cf else "n/a",
        ratio(vf.get("encrypt_ms_median"), cf.get("encrypt_ms_median")))
    stage_pbs = [st.get("pbs") for st in vsum.get("stages", []) if st.get("pbs")]
    vp, cp = vf.get("pbs_per_sample") if vf else None, cc.get("programmable_bootstrap_count")
    vts = vf.get("time_split") or {}
    row("server evaluation time per bootstrap (latency / bootstraps per row)",
        f"{fmt_ms(vf['latency_ms_median'] / vp)}" + (f" (`time_split`: {vts['bootstrap_s']:.2f} s in "
                                                      f"{vts['bootstraps']} bootstraps over the {n} rows)"
                                                      if vts.get("bootstraps") else "")
        if vf and vp else na_v,
        fmt_ms(cf["run_ms_median"] / cp) if cf and cp else "n/a",
        ratio(vf["latency_ms_median"] / vp if vf and vp else None, cf["run_ms_median"] / cp if cf and cp else None))
    row("programmable bootstraps per row",
        str(vf.get("pbs_per_sample", vsum.get("pbs_per_sample", "n/a")))
        + (f" (compile's `pbs_per_sample`: {' + '.join(str(x) for x in stage_pbs)} in {len(stage_pbs)} bootstrap "
           "stages: distinct comparisons, then leaf tests)" if len(stage_pbs) > 1 else "")
        if (vf or vsum) else na_v,
        f"{cc.get('programmable_bootstrap_count')} (`fhe_circuit.programmable_bootstrap_count`"
        + (": " + " + ".join(str(x) for x in cc["programmable_bootstrap_count_per_parameter"].values())
           + " in its " + str(len(cc["programmable_bootstrap_count_per_parameter"])) + " bootstrap-key parameter sets"
           if cc.get("programmable_bootstrap_count_per_parameter") else "") + ")" if c else "n/a",
        ratio(vf.get("pbs_per_sample", vsum.get("pbs_per_sample")) if (vf or vsum) else None,
              cc.get("programmable_bootstrap_count")))
    row("key generation",
        f"{vf['keygen_s']:.2f} s (client key + compressed evaluation key + expansion)"
        if vf.get("keygen_s") is not None else na_v,
        f"{c['keygen_s']:.2f} s (`fhe_circuit.keygen(force=True)`); deployment client: "
        f"{cd.get('keygen_s', float('nan')):.2f} s" if c else "n/a",
        ratio(vf.get("keygen_s"), c.get("keygen_s") if c else None))
    row("evaluation-key bytes",
        fmt_bytes(vk.get("eval_key_bytes")) + " (eval.key from `veil keygen`)" if vk.get("available") else na_v,
        fmt_bytes(cd.get("eval_key_bytes")) + " (`get_serialized_evaluation_keys()`; in memory: bootstrap keys "
        + fmt_bytes(cc.get("size_of_bootstrap_keys")) + " + keyswitch keys " + fmt_bytes(cc.get("size_of_keyswitch_keys"))
        + ", `fhe_circuit.size_of_*`)" if cd else "n/a",
        ratio(vk.get("eval_key_bytes"), cd.get("eval_key_bytes")))
    vib = (v or {}).get("input_bytes") or {}
    vg = ((v or {}).get("grpc") or {}).get("result") or {}
    vin = vib.get("bytes")
    vin = int(round(vin)) if vin is not None else None
    row("encrypted input bytes per row",
        (fmt_bytes(vin) + ((f" (`veil infer`; whole gRPC request {fmt_bytes(int(round(vib['request_bytes'])))})"
                            if vib.get("request_bytes") else " (`veil infer`)")
                           if vib.get("measured") else " (computed from the wire format)")) if vib and v and vf
        else na_v,
        fmt_bytes(cd.get("input_bytes_per_row")) + " (`quantize_encrypt_serialize`)" if cd else "n/a",
        ratio(vin, cd.get("input_bytes_per_row")) if vf else "")
    vout = vg.get("response_bytes_per_sample")
    row("encrypted output bytes per row",
        fmt_bytes(int(round(vout))) + " (whole gRPC response, `veil infer`)" if vout else na_v,
        fmt_bytes(cd.get("output_bytes_per_row")) + " (`FHEModelServer.run` output)" if cd else "n/a",
        ratio(vout, cd.get("output_bytes_per_row")))
    if vg:
        row(f"latency per row, client to server over gRPC on 127.0.0.1 (median of {n})",
            f"{fmt_ms(vg.get('latency_ms_median'))} (encrypt {fmt_ms(vg.get('encrypt_ms_median'))} + request "
            f"{fmt_ms(vg.get('rpc_ms_median'))} (server evaluation {fmt_ms(vg.get('server_eval_ms_median'))}) + "
            f"decrypt {fmt_ms(vg.get('decrypt_ms_median'))}); accuracy {fmt_acc(vg.get('accuracy'), n)}",
            "n/a (Concrete ML has no network server; its client + server figure is above)")
    row("parameters",
        f"{vf.get('parameter_set', vs.get('parameter_set', vsum.get('parameter_set', '?')))}; widest accumulator "
        f"{vsum.get('widest_accumulator_bits', '?')} bits" if vsum else na_v,
        f"max integer bit width {cc.get('max_integer_bit_width', '?')}, p_error {fmt_p(cc.get('p_error'))}, "
        f"global p_error {fmt_p(cc.get('global_p_error'))}" if c else "n/a")
    qkeys = [k for k in ("input_bits", "input_ciphertexts", "input_bits_per_feature", "comparison_bits", "leaf_bits",
                         "output_bits", "n_comparisons", "distinct_comparisons", "n_leaves", "leaves")
             if k in vsum]
    row("quantization (each tool's own choice)",
        (", ".join(f"{k} {json.dumps(vsum[k]) if not isinstance(vsum[k], (int, float, str)) else vsum[k]}"
                   for k in qkeys) or "see results_trees.json (compile summary)") if vsum else na_v,
        f"n_bits={c['n_bits_used']!r} (`from_sklearn_model` default: inputs and thresholds, leaf values), "
        f"rounding (TREES_USE_ROUNDING={c['settings']['TREES_USE_ROUNDING']})" if c else "n/a")
    row("compile time", f"{v['compile']['wall_s']:.2f} s (`veil compile`, process wall time)" if vsum else na_v,
        f"{c['compile_s']:.1f} s (`compile(X_train)`; `from_sklearn_model` {c['from_sklearn_s']:.1f} s)"
        if c else "n/a")
    return L


def criterion(r: dict) -> dict | None:
    v, c = r.get("veil"), r.get("concrete_ml")
    vf = ((v or {}).get("fhe") or {}).get("result") or {}
    vs = ((v or {}).get("simulate") or {}).get("result") or {}
    if not (vf and vs and c):
        return None
    accs = [a for a in (vs.get("simulated_accuracy"), vs.get("simulated_accuracy_with_noise")) if a is not None]
    veil_acc = min(accs)
    lat = vf["latency_ms_median"] / c["fhe"]["run_ms_median"]
    return {
        "latency_ratio": lat, "latency_ok": lat <= 0.5,
        "latency_ratio_vs_execute": vf["latency_ms_median"] / c["fhe"]["execute_ms_median"],
        "veil_accuracy": veil_acc, "concrete_simulated_accuracy": c["simulated_accuracy"],
        "accuracy_ok": veil_acc >= c["simulated_accuracy"] - 1e-12,
    }


def build_report(r: dict) -> str:
    m, mo = r["machine"], r["model"]
    n = r["n_fhe"]
    L = [f"# {TITLE}", ""]
    L.append(f"Reproduce: `{r['command']}` (from the repository root).  ")
    L.append(f"Date: {m['date_utc']}. Machine: {m.get('cpu_model', '?')}, nproc {m['nproc']}, "
             f"{m.get('memory_gib', '?')} GiB RAM, {m['platform']}; load average at start "
             f"{m['loadavg_start']}, at end {m.get('loadavg_end')}. Repository commit {m.get('git_commit', '?')}.  ")
    L.append(f"Model: `xgboost.XGBClassifier(n_estimators={N_ESTIMATORS}, max_depth={MAX_DEPTH}, "
             f"random_state={SEED})` (xgboost {mo['versions']['xgboost']}) on scikit-learn breast cancer (30 float32 "
             f"features, no scaling, stratified 80/20 split, random_state=0, as `models/training/train.py` splits "
             f"`breast_cancer_logreg`); {mo['n_train']} training rows, {mo['n_test']} test rows; {mo['n_trees']} "
             f"trees, {mo['n_splits']} split nodes ({mo['n_distinct_comparisons']} distinct (feature, threshold) "
             f"pairs), {mo['n_leaves']} leaves. Veil compiles its onnxmltools {mo['versions']['onnxmltools']} "
             f"export (`{mo['onnx']}`); Concrete ML converts the same fitted xgboost object "
             f"(xgboost 1.6.2 is what concrete-ml 1.9.0 pins; `models/zoo/breast_cancer_xgb` is the same recipe "
             f"fitted by a newer xgboost, hence other trees). "
             f"Encrypted runs: first {n} test rows, one row at a time.")
    L.append("")
    L += build_table(r)
    L.append("")
    crit = r.get("criterion")
    L.append("## Issue 8 aim")
    L.append("")
    if crit:
        L.append(f"- Latency: Veil / Concrete ML server evaluation = {crit['latency_ratio']:.3f} "
                 f"(aim <= 0.5): **{'met' if crit['latency_ok'] else 'NOT met'}**. Against Concrete ML's "
                 f"`fhe=\"execute\"` time per row the ratio is {crit['latency_ratio_vs_execute']:.3f}.")
        L.append(f"- Accuracy: Veil {fmt_acc(crit['veil_accuracy'])} (the lower of its exact and noisy simulated "
                 f"accuracies on all {mo['n_test']} test rows) vs Concrete ML simulated (mean) "
                 f"{fmt_acc(crit['concrete_simulated_accuracy'])}: "
                 f"**{'met' if crit['accuracy_ok'] else 'NOT met'}** (no worse).")
    else:
        if not r.get("concrete_ml"):
            L.append("- Not evaluated: the Concrete ML side did not run (--skip-concrete).")
        else:
            L.append(f"- Not evaluated: the Veil side did not run ({(r.get('veil') or {}).get('note', 'skipped')}).")
    L.append("")
    c = r.get("concrete_ml") or {}
    if c.get("other_n_bits"):
        L.append("## Context: Concrete ML at other n_bits (compiled only, not run encrypted)")
        L.append("")
        L.append("| n_bits | programmable bootstraps per row | max integer bit width | complexity | "
                 f"accuracy `fhe=\"disable\"` ({mo['n_test']} rows) | accuracy `fhe=\"simulate\"` (one run) |")
        L.append("|---|---|---|---|---|---|")
        cc = c.get("circuit", {})
        L.append(f"| {c['n_bits_used']!r} (default, measured above) | {cc.get('programmable_bootstrap_count')} | "
                 f"{cc.get('max_integer_bit_width')} | {cc.get('complexity', 0):.3g} | "
                 f"{fmt_acc(c['disable_accuracy'], mo['n_test'])} | {fmt_acc(c['simulated_accuracy_runs'][0], mo['n_test'])} |")
        for o in c["other_n_bits"]:
            L.append(f"| {o['n_bits']} | {o['programmable_bootstrap_count']} | {o['max_integer_bit_width']} | "
                     f"{o['complexity']:.3g} | {fmt_acc(o['disable_accuracy'], mo['n_test'])} | "
                     f"{fmt_acc(o['simulated_accuracy'], mo['n_test'])} |")
        L.append("")
    L.append("## Model checks")
    L.append("")
    for k in ("float_accuracy", "onnxruntime_accuracy", "onnx_predictions_identical",
              "onnx_vs_xgboost_max_abs_proba_diff", "onnx_ops", "onnx_opsets", "versions"):
        L.append(f"- {k}: {mo.get(k)}")
    L.append("")
    L.append("## How each figure was obtained")
    L.append("")
    L.append(f"Everything above comes from one run of `{r['command']}`, which reuses or creates "
             "`benches/compare/.venv` (requirements.txt) and runs `benches/compare/compare_trees.py`. "
             f"Files it writes go to `{r['work_dir']}`.")
    L.append("")
    v, c = r.get("veil"), r.get("concrete_ml")
    if v and v.get("compile"):
        L.append("Veil (each command's JSON output is kept in results_trees.json):")
        L.append("")
        L.append(f"- compile: `{v['compile']['command']}`")
        if v.get("simulate"):
            L.append(f"- exact and noisy simulated accuracy: `{v['simulate']['command']}`")
        if v.get("fhe"):
            L.append(f"- encrypted accuracy, agreement, latency (`latency_ms_median`: evaluation only), "
                     f"`encrypt_ms_median`, `keygen_s`, `pbs_per_sample`: `{v['fhe']['command']}`")
        vk = v.get("keygen_cli") or {}
        if vk.get("available"):
            L.append(f"- evaluation-key bytes: size of eval.key written by `{vk['command']}`")
        vib = v.get("input_bytes") or {}
        if vib:
            L.append(f"- input bytes: {vib.get('how')}")
        vgr = v.get("grpc") or {}
        if vgr.get("available"):
            L.append(f"- client-server path: `{vgr['server_command']}`, then `{vgr['command']}`")
        else:
            L.append(f"- client-server path: not run ({vgr.get('note')})")
        L.append("")
    elif v:
        L.append(f"Veil: {v.get('note')}")
        L.append("")
    if c:
        L.append("Concrete ML (functions in `benches/compare/compare_trees.py`, `run_concrete`):")
        L.append("")
        L.append(f"- `cm = concrete.ml.sklearn.XGBClassifier.from_sklearn_model(model, X_train)` (default "
                 f"n_bits, here {c['n_bits_used']!r}), then `cm.compile(X_train)` (default p_error); tree "
                 f"rounding on (TREES_USE_ROUNDING={c['settings']['TREES_USE_ROUNDING']})")
        L.append("- accuracies: `cm.predict(X_test, fhe=\"disable\")` and `cm.predict(X_test, fhe=\"simulate\")` "
                 "(repeated, --sim-repeats), all test rows")
        L.append("- bootstraps: `cm.fhe_circuit.programmable_bootstrap_count` (one row)")
        L.append("- key generation: `cm.fhe_circuit.keygen(force=True)` timed; the deployment figure is "
                 "`FHEModelClient.generate_private_and_evaluation_keys(force=True)`")
        L.append(f"- client + server latency: `cm.predict(X_test[i:i+1], fhe=\"execute\")` for each of the first {n} "
                 f"rows after one untimed warm-up row (it took {c.get('first_execute_s', float('nan')):.2f} s); median")
        L.append("- server evaluation latency: `fhe_circuit.encrypt(cm.quantize_input(x))`, then `fhe_circuit.run(...)` "
                 "timed, then `fhe_circuit.decrypt(...)`, same rows; median (decoded predictions match "
                 f"`fhe=\"execute\"`: {c['fhe'].get('run_predictions_match_execute')})")
        L.append("- evaluation-key bytes: `len(FHEModelClient.get_serialized_evaluation_keys())`; input bytes: "
                 "`len(FHEModelClient.quantize_encrypt_serialize(X_test[:1]))`; output bytes: "
                 "`len(FHEModelServer.run(...))` (round trip checked against `fhe=\"execute\"`: "
                 f"{c['deployment'].get('roundtrip_prediction_matches_execute')})")
        L.append("")
    vcb = (((v or {}).get("fhe") or {}).get("process_cores_busy"))
    ccb = ((c or {}).get("fhe") or {}).get("run_cores_busy")
    s = "Both sides use the whole machine with their default threading, one after the other, never at the same time."
    if vcb is not None:
        s += f" CPU seconds per wall second: Veil's `veil eval --mode fhe` process {vcb:.2f} (keygen included)"
        s += f", Concrete ML during `fhe_circuit.run` {ccb:.2f}." if ccb is not None else "."
    elif ccb is not None:
        s += f" CPU seconds per wall second, Concrete ML during `fhe_circuit.run`: {ccb:.2f}."
    L.append(s)
    lv, lc = (v or {}).get("loadavg_start"), (c or {}).get("loadavg_start")
    if lv or lc:
        L.append("")
        L.append("The machine is shared (2 cores, other engineers' builds and tests run at the same time); load "
                 "averages (1, 5, 15 min) around each side: "
                 + "; ".join(f"{k} {d.get('loadavg_start')} at start, {d.get('loadavg_end')} at end"
                             for k, d in (("Veil", v or {}), ("Concrete ML", c or {})) if d.get("loadavg_start"))
                 + ".")
    L.append("")
    return "\n".join(L)


def benchmarks_section(r: dict) -> str:
    """The section of BENCHMARKS.md: summary, table, aim, and the command that reproduces it."""
    m, mo, crit = r["machine"], r["model"], r.get("criterion")
    c = r.get("concrete_ml") or {}
    date = m["date_utc"].rsplit(":", 1)[0] + " UTC" if m["date_utc"].endswith("UTC") else m["date_utc"]
    L = [f"## {TITLE}", ""]
    lv = (r.get("veil") or {}).get("loadavg_start")
    lc = c.get("loadavg_start")
    if lv and lc:
        load = (f"1-minute load average {lv[0]} to {r['veil'].get('loadavg_end', ['?'])[0]} during the Veil side and "
                f"{lc[0]} to {c.get('loadavg_end', ['?'])[0]} during the Concrete ML side")
    else:
        load = f"load average {m['loadavg_start'][0]} at start and {m.get('loadavg_end', ['?'])[0]} at end"
    L.append(f"One run of `{r['command']}` ({date.replace(' UTC UTC', ' UTC')}, {load} on this shared 2-core "
             f"machine; commit {m.get('git_commit', '?')}). It trains xgboost 1.6.2 (20 trees of depth 3, "
             f"{mo['n_splits']} split nodes, {mo['n_distinct_comparisons']} distinct (feature, threshold) pairs, "
             f"{mo['n_leaves']} leaves) on breast cancer ({mo['n_train']} / {mo['n_test']} rows, train.py's split), "
             "exports it with onnxmltools for Veil and hands the same fitted object to Concrete ML's "
             f"`XGBClassifier.from_sklearn_model(model, X_train)` (default n_bits: {c.get('n_bits_used', '?')!r}). "
             f"Encrypted runs: the first {r['n_fhe']} test rows, one at a time, each tool after the other. "
             "Full output with the command behind every figure: "
             "[benches/compare/results_trees.md](benches/compare/results_trees.md) (raw: `results_trees.json`).")
    L.append("")
    L += build_table(r)
    L.append("")
    if crit:
        L.append("**Aim (issue 8): Veil at most half of Concrete ML's latency at no worse accuracy.**")
        L.append("")
        L.append(f"- Latency: Veil / Concrete ML server evaluation = {crit['latency_ratio']:.3f} (aim <= 0.5): "
                 f"**{'met' if crit['latency_ok'] else 'NOT met'}** (against `fhe=\"execute\"`: "
                 f"{crit['latency_ratio_vs_execute']:.3f}).")
        L.append(f"- Accuracy: Veil {fmt_acc(crit['veil_accuracy'])} (lower of exact and noisy simulation, all "
                 f"{mo['n_test']} test rows) vs Concrete ML simulated {fmt_acc(crit['concrete_simulated_accuracy'])}: "
                 f"**{'met' if crit['accuracy_ok'] else 'NOT met'}**.")
    elif r.get("veil", {}).get("note"):
        L.append(f"Veil side not measured: {r['veil']['note']}.")
    if c.get("other_n_bits"):
        L.append("- Concrete ML at other n_bits (compiled, not run): " + "; ".join(
            f"n_bits={o['n_bits']}: {o['programmable_bootstrap_count']} bootstraps, simulated accuracy "
            f"{fmt_acc(o['simulated_accuracy'])}" for o in c["other_n_bits"]) + ".")
    L.append("")
    L.append("")
    return "\n".join(L)


def write_benchmarks(r: dict, path: Path) -> None:
    """Insert or replace this section of BENCHMARKS.md (before the next section after the MLP comparison)."""
    text = path.read_text() if path.exists() else "# Veil benchmarks\n\n"
    sec = benchmarks_section(r)
    head = f"## {TITLE}"
    if head in text:
        i = text.index(head)
        j = text.find("\n## ", i + len(head))
        text = text[:i] + sec + (text[j + 1:] if j >= 0 else "")
    else:
        anchor = "## Predicted against measured latency"
        i = text.find(anchor)
        text = text[:i] + sec + text[i:] if i >= 0 else text.rstrip("\n") + "\n\n" + sec
    path.write_text(text)


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-fhe", type=int, default=int(os.environ.get("N", "10")),
                    help="test rows run encrypted, one at a time, on each side (default: $N or 10)")
    ap.add_argument("--veil", type=Path, default=REPO / "target" / "release" / "veil", help="veil binary")
    ap.add_argument("--work-dir", type=Path, default=HERE / "out" / "trees",
                    help="where the model, CSVs, keys and compiled files go (default: benches/compare/out/trees)")
    ap.add_argument("--results-dir", type=Path, default=HERE,
                    help="where results_trees.json and results_trees.md go (default: benches/compare)")
    ap.add_argument("--skip-veil", action="store_true", help="development: Concrete ML only")
    ap.add_argument("--skip-concrete", action="store_true", help="development: Veil only")
    ap.add_argument("--sim-repeats", type=int, default=3,
                    help="runs of Concrete ML's (random) fhe='simulate' over the test set; the mean is reported")
    ap.add_argument("--single-core", action="store_true",
                    help="also time both encrypted evaluations pinned to one core")
    ap.add_argument("--context-n-bits", type=lambda t: [int(x) for x in t.split(",") if x], default=[6, 8],
                    help="Concrete ML n_bits compiled (not run encrypted) for context: bootstrap count and "
                         "accuracy (default: 6,8; empty to skip)")
    ap.add_argument("--write-benchmarks", type=Path, nargs="?", const=REPO / "BENCHMARKS.md", default=None,
                    help="also insert or replace this comparison's section in BENCHMARKS.md (or the file given)")
    ap.add_argument("--no-grpc", action="store_true", help="skip Veil's veil-server + veil infer path")
    ap.add_argument("--command", default=None, help="the command line recorded in the results (run.sh passes its own)")
    args = ap.parse_args()
    os.environ.setdefault("PYTHONHASHSEED", "0")

    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    command = args.command or "benches/compare/.venv/bin/python benches/compare/compare_trees.py " + " ".join(
        shlex.quote(a) for a in sys.argv[1:])
    r: dict = {"command": command, "n_fhe": args.n_fhe, "work_dir": rel(work), "machine": machine_info()}
    log(f"machine: {r['machine'].get('cpu_model')}, nproc {r['machine']['nproc']}, "
        f"load {r['machine']['loadavg_start']}")

    log(f"training xgboost ({N_ESTIMATORS} trees, depth {MAX_DEPTH}) on breast cancer, onnxmltools export...")
    xgb_model, data, float_pred, info = train_model(work)
    r["model"] = info
    log(f"model: float accuracy {info['float_accuracy']:.4f}, onnx identical predictions "
        f"{info['onnx_predictions_identical']}, max |proba diff| {info['onnx_vs_xgboost_max_abs_proba_diff']:.2e}, "
        f"{info['n_splits']} splits ({info['n_distinct_comparisons']} distinct), {info['n_leaves']} leaves")
    if args.n_fhe > info["n_test"]:
        sys.exit(f"--n-fhe {args.n_fhe} > {info['n_test']} test rows")

    if not args.skip_veil:
        if not args.veil.exists():
            sys.exit(f"{args.veil} not found: build it with `cargo build --release` (run.sh does)")
        r["veil"] = {"loadavg_start": [round(x, 2) for x in os.getloadavg()]}
        try:
            run_veil(args.veil.resolve(), work, args.n_fhe, args.single_core, not args.no_grpc, r["veil"])
        except RuntimeError as e:
            # e.g. `veil compile` rejecting the model: keep the Concrete ML side and say why.
            log(f"veil: {e}")
            r["veil"]["error"] = str(e)
            if "compile" not in r["veil"]:
                d = work / NAME
                p = subprocess.run([str(args.veil), "compile", str(d / "model.onnx"), "--calibration",
                                    str(d / "train.csv"), "-o", str(work / f"{NAME}.veil")],
                                   capture_output=True, text=True, cwd=REPO)
                why = (p.stderr or p.stdout).strip().splitlines()
                r["veil"]["compile_stderr"] = (p.stderr or "")[-4000:]
                r["veil"]["note"] = ("`veil compile` rejected the model: "
                                     + (why[-1].split(". Supported")[0] if why and p.returncode else str(e)))
            else:
                r["veil"]["note"] = f"a Veil step failed: {e}"
        r["veil"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    if not args.skip_concrete:
        load0 = [round(x, 2) for x in os.getloadavg()]
        r["concrete_ml"] = run_concrete(xgb_model, data, args.n_fhe, work, args.single_core,
                                        max(1, args.sim_repeats), args.context_n_bits)
        r["concrete_ml"]["loadavg_start"] = load0
        r["concrete_ml"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]

    r["criterion"] = criterion(r)
    r["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    r["total_s"] = time.perf_counter() - compare.START

    args.results_dir.mkdir(parents=True, exist_ok=True)
    with open(args.results_dir / "results_trees.json", "w") as f:
        json.dump(r, f, indent=2, default=str)
        f.write("\n")
    md = build_report(r)
    (args.results_dir / "results_trees.md").write_text(md)
    log(f"wrote {rel(args.results_dir / 'results_trees.json')} and {rel(args.results_dir / 'results_trees.md')} "
        f"in {r['total_s']:.0f}s")
    if args.write_benchmarks:
        write_benchmarks(r, args.write_benchmarks)
        log(f"updated the section \"{TITLE}\" of {rel(args.write_benchmarks)}")
    print(md)


if __name__ == "__main__":
    main()
