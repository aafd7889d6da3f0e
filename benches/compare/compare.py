#!/usr/bin/env python3
"""Veil vs Concrete ML 1.9 on the same float model, on the same machine, in one run.

Run it through ``run.sh`` (which creates the virtual environment with concrete-ml
1.9.0 and builds Veil); by hand, from the repository root:

    benches/compare/.venv/bin/python benches/compare/compare.py --n-fhe 10

Steps (progress goes to stderr):

1. Train ``digits_mlp`` (torch MLP 64-32-10 on scikit-learn digits, pixels/16, stratified
   80/20 split, random_state=0, seeded) with ``models/training/train.py``'s own code
   (``make_digits_mlp``), keeping the trained torch module. It writes
   ``OUT/digits_mlp/{model.onnx,train.csv,test.csv,reference.json}``. The exported ONNX
   and the CSVs are checked against ``models/zoo/digits_mlp``.
2. Veil: ``veil compile`` the exported ONNX (calibrated on train.csv), ``veil eval
   --mode simulate`` on the 360 test images, ``veil eval --mode fhe --limit N``, and
   ``veil keygen`` (when the binary has it) for the evaluation-key size.
3. Concrete ML: ``compile_torch_model`` on the same torch module (n_bits=4,
   rounding_threshold_bits={"n_bits": 6, "method": "approximate"}, default p_error),
   accuracy with ``fhe="disable"`` and ``fhe="simulate"`` on the 360 test images, key
   generation, then the first N test images one at a time with ``fhe="execute"``
   (after one untimed warm-up image), and the same N images through
   encrypt / run / decrypt separately to time the server's part alone. Key and
   ciphertext sizes come from the deployment API (FHEModelDev / FHEModelClient /
   FHEModelServer), whose round trip is checked on one image.
4. Write ``results.json`` and ``results.md`` (next to this script unless --results-dir).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import inspect
import json
import os
import platform
import resource
import select
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
ZOO = REPO / "models" / "zoo" / "digits_mlp"
sys.path.insert(0, str(REPO / "models" / "training"))

CML_N_BITS = 4
CML_ROUNDING = {"n_bits": 6, "method": "approximate"}
START = time.perf_counter()


def log(msg: str) -> None:
    print(f"[compare +{time.perf_counter() - START:7.1f}s] {msg}", file=sys.stderr, flush=True)


def rel(p: Path) -> str:
    """Path relative to the repository root when it is inside it (for the commands shown)."""
    p = Path(p).resolve()
    try:
        return str(p.relative_to(REPO))
    except ValueError:
        return str(p)


def median(v):
    return float(statistics.median(v)) if v else None


# --------------------------------------------------------------------------- machine


def machine_info() -> dict:
    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "nproc": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    try:
        info["nproc"] = int(subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip())
    except Exception:
        pass
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
            elif line.startswith("Flags:"):
                flags = set(line.split(":", 1)[1].split())
                info["cpu_avx2"] = "avx2" in flags
                info["cpu_avx512f"] = "avx512f" in flags
    except FileNotFoundError:
        pass
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
        info["memory_gib"] = round(kb / 2**20, 1)
    except Exception:
        pass
    try:
        info["rustc"] = subprocess.run(["rustc", "--version"], capture_output=True, text=True).stdout.strip()
    except FileNotFoundError:
        pass
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        info["git_commit"] = head + ("-dirty" if dirty else "")
    except FileNotFoundError:
        pass
    info["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]
    return info


# --------------------------------------------------------------------------- model


def train_model(work: Path):
    """Train digits_mlp with train.py's code; return (torch module, reference dict)."""
    import torch
    import train  # models/training/train.py

    captured = {}
    original = train.export_torch

    def export(model, example, path):
        captured["model"] = model
        if "dynamo" in inspect.signature(torch.onnx.export).parameters:
            return original(model, example, path)
        # torch < 2.5 (concrete-ml 1.9.0 pins torch 2.3.1): TorchScript exporter, whose
        # highest opset is 17. Same graph: Gemm(transB=1) -> Relu -> Gemm(transB=1).
        model.eval()
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.onnx.export(model, (example,), str(path), input_names=["input"], output_names=["logits"],
                          opset_version=17, dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        return "torchscript"

    train.export_torch = export
    try:
        ref = train.make_digits_mlp(work)
    finally:
        train.export_torch = original
    # train.seed_everything() pinned torch to 1 thread and deterministic kernels; undo that
    # so nothing later (Concrete ML's compilation) is slowed by it.
    torch.use_deterministic_algorithms(False)
    torch.set_num_threads(os.cpu_count() or 1)
    return captured["model"], ref


def check_against_zoo(work: Path, model) -> dict:
    """Compare this run's export and data with models/zoo/digits_mlp."""
    import onnx
    import onnxruntime as ort
    import torch
    from onnx import numpy_helper
    import train

    out = {"zoo": rel(ZOO)}
    d = work / "digits_mlp"
    if not (ZOO / "model.onnx").exists():
        out["note"] = "models/zoo/digits_mlp/model.onnx not found; not compared"
        return out
    for name in ("train.csv", "test.csv"):
        out[f"{name}_identical"] = (d / name).read_bytes() == (ZOO / name).read_bytes()
    zw = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(ZOO / "model.onnx")).graph.initializer}
    sd = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    if set(zw) == set(sd):
        out["weights_identical"] = all(np.array_equal(zw[k], sd[k]) for k in sd)
        out["weights_max_abs_diff"] = float(max(np.abs(zw[k] - sd[k]).max() for k in sd))
    else:
        out["weights_identical"] = None
        out["note"] = f"initializer names differ: zoo {sorted(zw)} vs torch {sorted(sd)}"
    X_test, _ = train.read_csv(d / "test.csv")
    outs = []
    for p in (d / "model.onnx", ZOO / "model.onnx"):
        s = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        outs.append(s.run(None, {s.get_inputs()[0].name: X_test})[0])
    out["onnx_outputs_max_abs_diff"] = float(np.abs(outs[0] - outs[1]).max())
    out["onnx_predictions_identical"] = bool(np.array_equal(outs[0].argmax(1), outs[1].argmax(1)))
    with torch.no_grad():
        t = model(torch.from_numpy(X_test)).numpy()
    out["torch_vs_exported_onnx_max_abs_diff"] = float(np.abs(t - outs[0]).max())
    return out


# --------------------------------------------------------------------------- Veil


def cpu_seconds(who) -> float:
    u = resource.getrusage(who)
    return u.ru_utime + u.ru_stime


LAST_CORES_BUSY = [None]


def one_core() -> int:
    """The core that single-core measurements are pinned to: the first one this process may use."""
    return min(os.sched_getaffinity(0))


def pin_process(cpus: set[int]) -> set[int]:
    """Set the CPU affinity of every thread of this process; return the previous set."""
    before = os.sched_getaffinity(0)
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except (ProcessLookupError, PermissionError):
            pass
    return before


def run_cmd(cmd: list[str], what: str, cpus: set[int] | None = None) -> tuple[dict | None, float, str]:
    log(f"{what}: {' '.join(shlex.quote(c) for c in cmd)}" + (f" (pinned to CPU {sorted(cpus)})" if cpus else ""))
    t = time.perf_counter()
    c0 = cpu_seconds(resource.RUSAGE_CHILDREN)
    pre = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, cwd=REPO, preexec_fn=pre)
    wall = time.perf_counter() - t
    LAST_CORES_BUSY[0] = (cpu_seconds(resource.RUSAGE_CHILDREN) - c0) / max(wall, 1e-9)
    if p.returncode != 0:
        raise RuntimeError(f"{what} failed with exit code {p.returncode}: {' '.join(cmd)}")
    try:
        return json.loads(p.stdout), wall, p.stdout
    except json.JSONDecodeError:
        return None, wall, p.stdout


def cmdline(cmd: list[str]) -> str:
    return " ".join(shlex.quote(rel(Path(c)) if ("/" in c and Path(c).exists()) else c) for c in cmd)


def run_veil(veil: Path, work: Path, n_fhe: int, single_core: bool) -> dict:
    d = work / "digits_mlp"
    model_veil = work / "digits_mlp.veil"
    res: dict = {"binary": rel(veil)}
    ver = subprocess.run([str(veil), "--version"], capture_output=True, text=True)
    res["version"] = ver.stdout.strip()

    cmd = [str(veil), "compile", str(d / "model.onnx"), "--calibration", str(d / "train.csv"),
           "-o", str(model_veil), "--json"]
    summary, wall, _ = run_cmd(cmd, "veil compile")
    res["compile"] = {"command": cmdline(cmd), "wall_s": wall, "summary": summary}

    cmd = [str(veil), "eval", str(model_veil), "--data", str(d / "test.csv"), "--mode", "simulate", "--json"]
    sim, wall, _ = run_cmd(cmd, "veil eval (simulate, all test images)")
    res["simulate"] = {"command": cmdline(cmd), "wall_s": wall, "result": sim}

    cmd = [str(veil), "eval", str(model_veil), "--data", str(d / "test.csv"), "--mode", "fhe",
           "--limit", str(n_fhe), "--json"]
    fhe, wall, _ = run_cmd(cmd, f"veil eval (fhe, first {n_fhe} test images)")
    # CPU seconds per wall second of the whole process (keygen, simulation and evaluation).
    res["fhe"] = {"command": cmdline(cmd), "wall_s": wall, "process_cores_busy": LAST_CORES_BUSY[0],
                  "result": fhe}

    if single_core:
        core = one_core()
        fhe1, wall, _ = run_cmd(cmd, f"veil eval (fhe, first {n_fhe} test images, one core)", cpus={core})
        res["fhe_one_core"] = {"command": f"taskset -c {core} {cmdline(cmd)}", "wall_s": wall, "result": fhe1}

    res["keygen_cli"] = veil_keygen(veil, work)
    res["grpc"] = veil_grpc(veil, work, model_veil, res["keygen_cli"], d / "test.csv", n_fhe)
    res["input_bytes"] = veil_input_bytes(summary, res["grpc"])
    return res


def has_subcommand(veil: Path, name: str) -> bool:
    p = subprocess.run([str(veil), name, "--help"], capture_output=True, text=True)
    return p.returncode == 0


def veil_keygen(veil: Path, work: Path) -> dict:
    """Evaluation-key bytes: the size of eval.key written by `veil keygen -o DIR`, if this build has it."""
    if not has_subcommand(veil, "keygen"):
        return {"available": False, "note": "this veil binary has no `keygen` subcommand"}
    keydir = work / "keys"
    help_text = subprocess.run([str(veil), "keygen", "--help"], capture_output=True, text=True).stdout
    cmd = [str(veil), "keygen", "-o", str(keydir)]
    cmd += [f for f in ("--force", "--json") if f in help_text]
    shutil.rmtree(keydir, ignore_errors=True)
    log(f"veil keygen: {' '.join(cmd)}")
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t
    if p.returncode != 0 or not (keydir / "eval.key").exists():
        return {"available": False,
                "note": f"`veil keygen` did not write eval.key: {(p.stderr or p.stdout).strip()[-500:]}"}
    out = {"available": True, "command": cmdline(cmd), "wall_s": wall, "dir": str(keydir),
           "eval_key_bytes": (keydir / "eval.key").stat().st_size}
    if (keydir / "client.key").exists():
        out["client_key_bytes"] = (keydir / "client.key").stat().st_size
    if (keydir / "keys.json").exists():
        out["keys_json"] = json.loads((keydir / "keys.json").read_text())
    try:
        out["result"] = json.loads(p.stdout)
    except json.JSONDecodeError:
        pass
    return out


def veil_grpc(veil: Path, work: Path, model_veil: Path, keys: dict, data: Path, n_fhe: int,
              name: str = "digits_mlp") -> dict:
    """The client-server path: `veil-server` on 127.0.0.1, then `veil infer --json`.

    Gives measured bytes per image (the encrypted input, the gRPC request and response)
    and the latency seen by a client over loopback. Skipped (with a note) when this
    build has no `veil-server` binary next to `veil`, or no `veil infer` / `veil keygen`.
    """
    server_bin = veil.parent / "veil-server"
    if not server_bin.exists():
        return {"available": False, "note": f"no {rel(server_bin)} in this build"}
    if not keys.get("available"):
        return {"available": False, "note": "needs `veil keygen`"}
    if not has_subcommand(veil, "infer"):
        return {"available": False, "note": "this veil binary has no `infer` subcommand"}
    served, data_dir = work / "served", work / "server-data"
    for d in (served, data_dir):
        shutil.rmtree(d, ignore_errors=True)
    served.mkdir(parents=True)
    shutil.copy(model_veil, served / f"{name}.veil")
    server_cmd = [str(server_bin), "--models", str(served), "--listen", "127.0.0.1:0",
                  "--data-dir", str(data_dir)]
    log(f"veil-server: {' '.join(server_cmd)}")
    server_log = open(work / "veil-server.log", "w")
    proc = subprocess.Popen(server_cmd, stdout=subprocess.PIPE, stderr=server_log, text=True, cwd=REPO)
    try:
        addr, deadline = None, time.time() + 300
        while addr is None and time.time() < deadline and proc.poll() is None:
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if ready:
                line = proc.stdout.readline()
                if "listening on" in line:
                    addr = line.rsplit(" ", 1)[-1].strip()
        if addr is None:
            return {"available": False, "note": f"veil-server did not start (see {rel(work / 'veil-server.log')})"}
        base = [str(veil), "infer", "--server", f"http://{addr}", "--model", name, "--keys", keys["dir"],
                "--data", str(data), "--json"]
        # Warm-up: uploads the evaluation key and lets the server load and expand it; not timed.
        warm, _, _ = run_cmd(base + ["--limit", "1"], "veil infer over gRPC (warm-up, uploads the key)")
        cmd = base + ["--limit", str(n_fhe)]
        res, wall, _ = run_cmd(cmd, f"veil infer over gRPC (first {n_fhe} test images)")
        shown = cmdline(cmd).replace(f"http://{addr}", "http://127.0.0.1:PORT")
        return {"available": True, "server_command": cmdline(server_cmd), "command": shown, "wall_s": wall,
                "warmup": {k: warm.get(k) for k in ("key_uploaded", "key_upload_bytes", "key_upload_s",
                                                    "latency_ms_median")} if warm else None,
                "result": res}
    except Exception as e:
        return {"available": False, "note": f"{type(e).__name__}: {e}"}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        server_log.close()


def veil_input_bytes(summary: dict | None, grpc: dict) -> dict:
    """Bytes of one image's encrypted input.

    Measured by `veil infer --json` (`ciphertext_bytes_per_sample`, and the whole gRPC
    request `request_bytes_per_sample`) when the client-server path ran; otherwise
    computed from the wire format of models/src/fhe/wire.rs (EncryptedInput::to_bytes,
    bincode fixint): lwe_size u64 (8) + seed u128 (16) + vector length u64 (8) + one u64
    body per input ciphertext (one ciphertext per feature).
    """
    n = 64
    if summary and isinstance(summary.get("input_shape"), list):
        n = int(np.prod(summary["input_shape"]))
    computed = 8 + 16 + 8 + 8 * n
    g = (grpc or {}).get("result") or {}
    if g.get("ciphertext_bytes_per_sample"):
        return {"bytes": g["ciphertext_bytes_per_sample"], "measured": True,
                "request_bytes": g.get("request_bytes_per_sample"),
                "response_bytes": g.get("response_bytes_per_sample"), "computed_bytes": computed,
                "how": f"measured by `veil infer --json` (ciphertext_bytes_per_sample; the whole gRPC request "
                       f"is request_bytes_per_sample): `{grpc['command']}`"}
    return {"bytes": computed, "ciphertexts": n, "measured": False,
            "how": "computed from the wire format (models/src/fhe/wire.rs, EncryptedInput::to_bytes): "
                   f"8 (lwe_size) + 16 (seed) + 8 (length) + 8 x {n} ciphertext bodies"}


# --------------------------------------------------------------------------- Concrete ML


def run_concrete(model, X_train, X_test, y_test, n_fhe: int, work: Path, single_core: bool,
                 sim_repeats: int) -> dict:
    import concrete.fhe as cfhe
    import concrete.ml
    import torch
    from concrete.ml.deployment import FHEModelClient, FHEModelDev, FHEModelServer
    from concrete.ml.torch.compile import compile_torch_model

    res: dict = {"version": concrete.ml.__version__}
    try:
        import concrete.compiler  # noqa: F401
        from importlib.metadata import version
        res["concrete_python_version"] = version("concrete-python")
        res["torch_version"] = torch.__version__
    except Exception:
        pass
    res["settings"] = {"n_bits": CML_N_BITS, "rounding_threshold_bits": CML_ROUNDING, "p_error": "default"}

    log("concrete-ml: compile_torch_model (n_bits=4, rounding 6 bits approximate)...")
    t = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        qm = compile_torch_model(model, X_train.astype(np.float32), n_bits=CML_N_BITS,
                                 rounding_threshold_bits=dict(CML_ROUNDING))
    res["compile_s"] = time.perf_counter() - t
    circuit = qm.fhe_circuit
    circ = {}
    for name in ("programmable_bootstrap_count", "p_error", "global_p_error", "complexity",
                 "size_of_secret_keys", "size_of_bootstrap_keys", "size_of_keyswitch_keys",
                 "size_of_inputs", "size_of_outputs"):
        try:
            v = getattr(circuit, name)
            circ[name] = float(v) if isinstance(v, (float, np.floating)) else int(v)
        except Exception as e:  # pragma: no cover
            circ[name] = f"unavailable ({type(e).__name__})"
    try:
        circ["max_integer_bit_width"] = int(circuit.graph.maximum_integer_bit_width())
    except Exception:
        pass
    res["circuit"] = circ
    log(f"concrete-ml: compiled in {res['compile_s']:.1f}s; circuit {circ}")

    n_test = len(X_test)
    with torch.no_grad():
        float_pred = model(torch.from_numpy(X_test)).numpy().argmax(1)
    res["float_accuracy"] = float((float_pred == y_test).mean())

    log("concrete-ml: quantized accuracy (fhe='disable')...")
    t = time.perf_counter()
    dis_pred = qm.forward(X_test, fhe="disable").argmax(1)
    res["disable_accuracy"] = float((dis_pred == y_test).mean())
    res["disable_s"] = time.perf_counter() - t

    # fhe="simulate" draws its PBS errors at random (not seeded), so it is repeated.
    sims = []
    for k in range(sim_repeats):
        log(f"concrete-ml: simulated accuracy (fhe='simulate', {n_test} images), run {k + 1}/{sim_repeats}...")
        t = time.perf_counter()
        pred = qm.forward(X_test, fhe="simulate").argmax(1)
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

    # Warm-up: the first execution may load or convert keys; it is timed apart.
    log("concrete-ml: warm-up execution (1 image, not counted)...")
    t = time.perf_counter()
    qm.forward(X_test[:1], fhe="execute")
    res["first_execute_s"] = time.perf_counter() - t

    e2e, preds = [], []
    for i in range(n_fhe):
        t = time.perf_counter()
        out = qm.forward(X_test[i:i + 1], fhe="execute")
        e2e.append(time.perf_counter() - t)
        preds.append(int(out.argmax(1)[0]))
        log(f"concrete-ml: execute image {i + 1}/{n_fhe}: {e2e[-1] * 1e3:.0f} ms, "
            f"pred {preds[-1]} label {int(y_test[i])}")
    preds = np.array(preds)
    res["fhe"] = {
        "n": n_fhe,
        "accuracy": float((preds == y_test[:n_fhe]).mean()) if n_fhe else None,
        "agreement_with_simulation": float((preds == sim_pred[:n_fhe]).mean()) if n_fhe else None,
        "agreement_with_disable": float((preds == dis_pred[:n_fhe]).mean()) if n_fhe else None,
        "execute_ms_per_image": [x * 1e3 for x in e2e],
        "execute_ms_median": median([x * 1e3 for x in e2e]),
    }

    # The same images through the circuit's pieces: the server's part (run) alone,
    # comparable with Veil's latency_ms_median (which times evaluation only).
    enc_ms, run_ms, dec_ms = [], [], []
    run_cpu = 0.0
    for i in range(n_fhe):
        q = qm.quantize_input(X_test[i:i + 1])
        t0 = time.perf_counter()
        enc = circuit.encrypt(q)
        t1 = time.perf_counter()
        c0 = cpu_seconds(resource.RUSAGE_SELF)
        out = circuit.run(enc)
        run_cpu += cpu_seconds(resource.RUSAGE_SELF) - c0
        t2 = time.perf_counter()
        dq = circuit.decrypt(out)
        t3 = time.perf_counter()
        enc_ms.append((t1 - t0) * 1e3)
        run_ms.append((t2 - t1) * 1e3)
        dec_ms.append((t3 - t2) * 1e3)
        log(f"concrete-ml: run image {i + 1}/{n_fhe}: encrypt {enc_ms[-1]:.1f} ms, "
            f"run {run_ms[-1]:.0f} ms, decrypt {dec_ms[-1]:.1f} ms")
    res["fhe"].update({
        "encrypt_ms_median": median(enc_ms),
        "run_ms_per_image": run_ms,
        "run_ms_median": median(run_ms),
        "decrypt_ms_median": median(dec_ms),
        # CPU seconds per wall second during fhe_circuit.run: how many cores it kept busy.
        "run_cores_busy": run_cpu / (sum(run_ms) / 1e3) if run_ms else None,
    })

    if single_core:
        # The same server part with every thread of this process pinned to one core.
        core = one_core()
        before = pin_process({core})
        try:
            one = []
            for i in range(n_fhe):
                enc = circuit.encrypt(qm.quantize_input(X_test[i:i + 1]))
                t = time.perf_counter()
                circuit.run(enc)
                one.append((time.perf_counter() - t) * 1e3)
                log(f"concrete-ml: run image {i + 1}/{n_fhe} on CPU {core} only: {one[-1]:.0f} ms")
        finally:
            pin_process(before)
        res["fhe"]["one_core_run_ms_per_image"] = one
        res["fhe"]["one_core_run_ms_median"] = median(one)

    # Deployment API: what a client would generate and send.
    log("concrete-ml: deployment API (FHEModelDev/Client/Server): keygen, key and ciphertext sizes...")
    dep_dir = work / "concrete_deployment"
    shutil.rmtree(dep_dir, ignore_errors=True)
    FHEModelDev(path_dir=str(dep_dir), model=qm).save()
    key_dir = work / "concrete_keys"
    shutil.rmtree(key_dir, ignore_errors=True)  # Concrete reuses cached keys from key_dir, even with force=True
    client = FHEModelClient(path_dir=str(dep_dir), key_dir=str(key_dir))
    t = time.perf_counter()
    client.generate_private_and_evaluation_keys(force=True)
    dep_keygen_s = time.perf_counter() - t
    t = time.perf_counter()
    ek = client.get_serialized_evaluation_keys()
    ser_s = time.perf_counter() - t
    enc1 = client.quantize_encrypt_serialize(X_test[:1])
    server = FHEModelServer(path_dir=str(dep_dir))
    server.load()
    ek_obj = cfhe.EvaluationKeys.deserialize(ek)
    t = time.perf_counter()
    out1 = server.run(enc1, ek_obj)
    dep_run_s = time.perf_counter() - t
    pred1 = int(np.asarray(client.deserialize_decrypt_dequantize(out1)).argmax(1)[0])
    res["deployment"] = {
        "keygen_s": dep_keygen_s,
        "eval_keys_serialize_s": ser_s,
        "eval_key_bytes": len(ek),
        "input_bytes_per_image": len(enc1),
        "output_bytes_per_image": len(out1),
        "server_run_first_image_s": dep_run_s,
        "roundtrip_prediction_matches_execute": (pred1 == int(preds[0])) if n_fhe else None,
    }
    log(f"concrete-ml: deployment keygen {dep_keygen_s:.1f}s, eval keys {len(ek)} B, "
        f"input {len(enc1)} B, output {len(out1)} B")
    return res


# --------------------------------------------------------------------------- report


def fmt_bytes(n) -> str:
    if n is None:
        return "TODO"
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB ({n:,} B)"
    if n >= 2**10:
        return f"{n / 2**10:.1f} KiB ({n:,} B)"
    return f"{n:,} B"


def fmt_ms(x) -> str:
    if x is None:
        return "n/a"
    return f"{x:,.0f} ms" if x >= 100 else f"{x:.1f} ms" if x >= 1 else f"{x:.2f} ms"


def fmt_acc(x, n=None) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:.2f}%" + (f" ({round(x * n)}/{n})" if n else "")


def fmt_p(x) -> str:
    return f"{x:.2e}" if isinstance(x, float) else str(x)


def ratio(a, b) -> str:
    if a is None or b is None or not b:
        return ""
    return f"{a / b:.3f}x"


def build_report(r: dict) -> str:
    v, c, m = r.get("veil"), r.get("concrete_ml"), r["machine"]
    n = r["n_fhe"]
    vs = (v or {}).get("simulate", {}).get("result") or {}
    vf = (v or {}).get("fhe", {}).get("result") or {}
    vk = (v or {}).get("keygen_cli") or {}
    cf = (c or {}).get("fhe") or {}
    cd = (c or {}).get("deployment") or {}
    n_test = r["model"]["n_test"]
    veil_e2e = (vf.get("latency_ms_median") or 0) + (vf.get("encrypt_ms_median") or 0) if vf else None
    cml_e2e = cf.get("execute_ms_median")

    L = []
    L.append("# Veil vs Concrete ML 1.9: digits MLP 64-32-10, same model, same machine")
    L.append("")
    L.append(f"Reproduce: `{r['command']}` (from the repository root).  ")
    L.append(f"Date: {m['date_utc']}. Machine: {m.get('cpu_model', '?')}, nproc {m['nproc']}, "
             f"{m.get('memory_gib', '?')} GiB RAM, {m['platform']}; load average at start "
             f"{m['loadavg_start']}, at end {m.get('loadavg_end')}. Repository commit {m.get('git_commit', '?')}.  ")
    L.append(f"Model: torch MLP 64-32-10 trained by `models/training/train.py` code "
             f"(digits pixels/16, stratified 80/20 split, random_state=0, seed 0); "
             f"{r['model']['n_train']} training images, {n_test} test images. "
             f"Encrypted runs: first {n} test images, one image at a time.")
    L.append("")
    L.append(f"| metric | Veil | Concrete ML {c.get('version', '1.9') if c else '1.9'} | Veil / Concrete |")
    L.append("|---|---|---|---|")

    def row(name, a, b, rat=""):
        L.append(f"| {name} | {a} | {b} | {rat} |")

    fa = r["model"]["float_accuracy"]
    row(f"float accuracy (torch, {n_test} test images; one model for both)", fmt_acc(fa, n_test),
        fmt_acc(c["float_accuracy"], n_test) if c else "n/a")
    row(f"quantized accuracy, exact (no FHE noise), {n_test} images",
        fmt_acc(vs.get("simulated_accuracy"), n_test) if vs else "n/a",
        fmt_acc(c["disable_accuracy"], n_test) + " (`fhe=\"disable\"`)" if c else "n/a")
    row(f"simulated accuracy (with FHE noise), {n_test} images",
        fmt_acc(vs.get("simulated_accuracy_with_noise"), n_test) if vs else "n/a",
        (fmt_acc(c["simulated_accuracy"]) + f" (`fhe=\"simulate\"`, mean of {len(c['simulated_accuracy_runs'])} runs: "
         + ", ".join(fmt_acc(a) for a in c["simulated_accuracy_runs"]) + ")") if c else "n/a")
    row(f"encrypted accuracy, first {n} images",
        fmt_acc(vf.get("accuracy"), n) + (f"; agreement with simulation {fmt_acc(vf.get('agreement'))}"
                                          if vf.get("agreement") is not None else "") if vf else "n/a",
        fmt_acc(cf.get("accuracy"), n) + f"; agreement with simulation {fmt_acc(cf.get('agreement_with_simulation'))}"
        if cf else "n/a")
    row(f"**latency per image, server evaluation** (median of {n})",
        f"**{fmt_ms(vf.get('latency_ms_median'))}**" if vf else "n/a",
        f"**{fmt_ms(cf.get('run_ms_median'))}** (`fhe_circuit.run`)" if cf else "n/a",
        f"**{ratio(vf.get('latency_ms_median'), cf.get('run_ms_median'))}**" if vf and cf else "")
    v1 = ((v or {}).get("fhe_one_core") or {}).get("result") or {}
    c1 = cf.get("one_core_run_ms_median")
    if v1 or c1:
        row(f"latency per image, server evaluation, pinned to one core (median of {n})",
            f"{fmt_ms(v1.get('latency_ms_median'))} (`taskset -c N veil eval`)" if v1 else "n/a",
            f"{fmt_ms(c1)} (all threads pinned to one core)" if c1 else "n/a",
            ratio(v1.get("latency_ms_median"), c1))
    row(f"latency per image, client + server (median of {n})",
        f"{fmt_ms(veil_e2e)} (encrypt + evaluate; decrypt not timed)" if vf else "n/a",
        f"{fmt_ms(cml_e2e)} (`forward(fhe=\"execute\")`: quantize, encrypt, run, decrypt)" if cf else "n/a",
        ratio(veil_e2e, cml_e2e))
    row("encryption per image (median)", fmt_ms(vf.get("encrypt_ms_median")) if vf else "n/a",
        fmt_ms(cf.get("encrypt_ms_median")) if cf else "n/a",
        ratio(vf.get("encrypt_ms_median"), cf.get("encrypt_ms_median")))
    row("key generation", f"{vf['keygen_s']:.2f} s (client key + compressed evaluation key + expansion)"
        if vf.get("keygen_s") is not None else "n/a",
        f"{c['keygen_s']:.2f} s (`fhe_circuit.keygen(force=True)`); deployment client: "
        f"{cd.get('keygen_s', float('nan')):.2f} s" if c else "n/a",
        ratio(vf.get("keygen_s"), c.get("keygen_s") if c else None))
    row("evaluation-key bytes", fmt_bytes(vk.get("eval_key_bytes")) + (" (eval.key from `veil keygen`)"
                                                                       if vk.get("available") else
                                                                       " (no `veil keygen` in this build)"),
        fmt_bytes(cd.get("eval_key_bytes")) + " (`get_serialized_evaluation_keys()`)" if cd else "n/a",
        ratio(vk.get("eval_key_bytes"), cd.get("eval_key_bytes")))
    vib = (v or {}).get("input_bytes") or {}
    vg = ((v or {}).get("grpc") or {}).get("result") or {}
    vin = vib.get("bytes")
    vin = int(round(vin)) if vin is not None else None
    row("encrypted input bytes per image",
        fmt_bytes(vin) + ((f" (`veil infer`; whole gRPC request {fmt_bytes(int(round(vib['request_bytes'])))})"
                           if vib.get("request_bytes") else " (`veil infer`)")
                          if vib.get("measured") else " (computed from the wire format)")
        if vib else "n/a",
        fmt_bytes(cd.get("input_bytes_per_image")) + " (`quantize_encrypt_serialize`)" if cd else "n/a",
        ratio(vin, cd.get("input_bytes_per_image")))
    vout = vg.get("response_bytes_per_sample")
    row("encrypted output bytes per image",
        fmt_bytes(int(round(vout))) + " (whole gRPC response, `veil infer`)" if vout else "n/a (not measured)",
        fmt_bytes(cd.get("output_bytes_per_image")) + " (`FHEModelServer.run` output)" if cd else "n/a",
        ratio(vout, cd.get("output_bytes_per_image")))
    if vg:
        row(f"latency per image, client to server over gRPC on 127.0.0.1 (median of {n})",
            f"{fmt_ms(vg.get('latency_ms_median'))} (encrypt {fmt_ms(vg.get('encrypt_ms_median'))} + request "
            f"{fmt_ms(vg.get('rpc_ms_median'))} (server evaluation {fmt_ms(vg.get('server_eval_ms_median'))}) + "
            f"decrypt {fmt_ms(vg.get('decrypt_ms_median'))}); accuracy {fmt_acc(vg.get('accuracy'), n)}",
            "n/a (Concrete ML has no network server; its client + server figure is the row above)")
        vw = ((v or {}).get("grpc") or {}).get("warmup") or {}
        if vw.get("key_uploaded"):
            row("evaluation-key upload (127.0.0.1)", f"{vw.get('key_upload_s', 0):.2f} s "
                f"({fmt_bytes(vw.get('key_upload_bytes'))}; first request after it "
                f"{fmt_ms(vw.get('latency_ms_median'))}, not counted above)", "n/a")
    row("programmable bootstraps per image", str(vf.get("pbs_per_sample", vs.get("pbs_per_sample", "n/a"))),
        str(c["circuit"].get("programmable_bootstrap_count")) if c else "n/a")
    vsum = (v or {}).get("compile", {}).get("summary") or {}
    row("parameters", f"{vf.get('parameter_set', vs.get('parameter_set', '?'))}; widest accumulator "
        f"{vsum.get('widest_accumulator_bits', '?')} bits",
        f"max integer bit width {c['circuit'].get('max_integer_bit_width', '?')}, "
        f"p_error {fmt_p(c['circuit'].get('p_error'))}, global p_error {fmt_p(c['circuit'].get('global_p_error'))}"
        if c else "n/a")
    row("quantization (each tool's own choice)",
        f"inputs {vsum.get('input_bits', '?')} bits, first-layer weights {vsum.get('first_layer_weight_bits', '?')} "
        f"bits, later weights {vsum.get('weight_bits', '?')} bits, activations {vsum.get('activation_bits', '?')} bits"
        if vsum else "n/a",
        f"n_bits={CML_N_BITS} (inputs, weights, activations), rounding_threshold_bits="
        f"{CML_ROUNDING['n_bits']} ({CML_ROUNDING['method']})" if c else "n/a")
    row("compile time", f"{v['compile']['wall_s']:.2f} s (`veil compile`, process wall time)" if v else "n/a",
        f"{c['compile_s']:.1f} s (`compile_torch_model`)" if c else "n/a")
    L.append("")

    crit = r.get("criterion")
    if crit:
        L.append("## Issue 4 criterion")
        L.append("")
        L.append(f"- Latency: Veil / Concrete ML server evaluation = {crit['latency_ratio']:.3f} "
                 f"(target <= 0.25): **{'met' if crit['latency_ok'] else 'NOT met'}**. "
                 f"Against Concrete ML's `fhe=\"execute\"` time per image the ratio is "
                 f"{crit['latency_ratio_vs_execute']:.3f}.")
        if crit.get("latency_ratio_one_core") is not None:
            L.append(f"- The same with both sides pinned to one core: {crit['latency_ratio_one_core']:.3f} "
                     f"(all cores vs one core: Veil {crit['veil_speedup_all_cores']:.2f}x faster, Concrete ML "
                     f"{crit['concrete_speedup_all_cores']:.2f}x).")
        L.append(f"- Accuracy: Veil {fmt_acc(crit['veil_accuracy'])} (the lower of its exact and noisy "
                 f"simulated accuracies on all {n_test} test images) vs Concrete ML simulated (mean) "
                 f"{fmt_acc(crit['concrete_simulated_accuracy'])} - 1 point = "
                 f"{fmt_acc(crit['concrete_simulated_accuracy'] - 0.01)}: "
                 f"**{'met' if crit['accuracy_ok'] else 'NOT met'}**.")
        L.append("")

    L.append("## Model checks")
    L.append("")
    mc = r["model"].get("zoo_check", {})
    for k, val in mc.items():
        L.append(f"- {k}: {val}")
    L.append(f"- exporter: {r['model'].get('torch_exporter')} (torch {r['model'].get('torch_version')})")
    L.append("")

    L.append("## How each figure was obtained")
    L.append("")
    L.append(f"Everything above comes from one run of `{r['command']}`, which creates "
             "`benches/compare/.venv` (requirements.txt), builds `target/release/veil` and runs "
             "`benches/compare/compare.py`. Files it writes go to "
             f"`{r['work_dir']}`.")
    L.append("")
    if v:
        L.append("Veil (each command's JSON output is kept in results.json):")
        L.append("")
        L.append(f"- compile: `{v['compile']['command']}`")
        L.append(f"- exact and noisy simulated accuracy (`simulated_accuracy`, "
                 f"`simulated_accuracy_with_noise`): `{v['simulate']['command']}`")
        L.append(f"- encrypted accuracy, agreement, latency (`latency_ms_median`: evaluation only, "
                 f"encryption not included), `encrypt_ms_median`, `keygen_s`, `pbs_per_sample`: "
                 f"`{v['fhe']['command']}`")
        if vk.get("available"):
            L.append(f"- evaluation-key bytes: size of eval.key written by `{vk['command']}`")
        else:
            L.append(f"- evaluation-key bytes: TODO ({vk.get('note')})")
        L.append(f"- input bytes: {vib.get('how')}")
        vgr = v.get("grpc") or {}
        if vgr.get("available"):
            L.append(f"- client-server path: `{vgr['server_command']}` (port chosen by the system), then "
                     f"`{vgr['command']}`")
        else:
            L.append(f"- client-server path (`veil-server` + `veil infer`): not run ({vgr.get('note')})")
        L.append("")
    if c:
        L.append("Concrete ML (functions in `benches/compare/compare.py`, `run_concrete`):")
        L.append("")
        L.append("- `qm = compile_torch_model(model, X_train_float32, n_bits=4, "
                 "rounding_threshold_bits={\"n_bits\": 6, \"method\": \"approximate\"})` "
                 "(default p_error) on the same torch module whose ONNX export Veil compiled")
        L.append("- accuracies: `qm.forward(X_test, fhe=\"disable\")` and `qm.forward(X_test, fhe=\"simulate\")` (repeated, --sim-repeats), "
                 "argmax vs labels, all test images")
        L.append("- key generation: `qm.fhe_circuit.keygen(force=True)` timed; the deployment figure is "
                 "`FHEModelClient.generate_private_and_evaluation_keys(force=True)`")
        L.append(f"- client + server latency: `qm.forward(X_test[i:i+1], fhe=\"execute\")` timed for each of the "
                 f"first {n} images after one untimed warm-up image (first execution took "
                 f"{c.get('first_execute_s', float('nan')):.2f} s); median")
        L.append("- server evaluation latency: `fhe_circuit.encrypt(qm.quantize_input(x))`, then "
                 "`fhe_circuit.run(...)` timed, then `fhe_circuit.decrypt(...)`, same images; median")
        L.append("- evaluation-key bytes: `len(FHEModelClient.get_serialized_evaluation_keys())`; "
                 "input bytes: `len(FHEModelClient.quantize_encrypt_serialize(X_test[:1]))`; output bytes: "
                 "`len(FHEModelServer.run(...))` (round trip checked against `fhe=\"execute\"`: "
                 f"{cd.get('roundtrip_prediction_matches_execute')})")
        L.append("")
    vcb = ((v or {}).get("fhe") or {}).get("process_cores_busy")
    ccb = cf.get("run_cores_busy")
    L.append("Both sides use the whole machine with their default threading (Veil: rayon, "
             f"{vf.get('threads', '?')} threads; Concrete ML: its runtime's loop parallelism), one after the "
             "other, never at the same time. CPU seconds per wall second: Veil's `veil eval --mode fhe` "
             f"process {vcb:.2f} (keygen and simulation included), " if vcb is not None else
             "Both sides use the whole machine with their default threading, one after the other. ")
    if ccb is not None:
        L[-1] += f"Concrete ML during `fhe_circuit.run` {ccb:.2f}."
    L.append("")
    return "\n".join(L)


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-fhe", type=int, default=int(os.environ.get("N", "10")),
                    help="test images run encrypted, one at a time, on each side (default: $N or 10)")
    ap.add_argument("--veil", type=Path, default=REPO / "target" / "release" / "veil", help="veil binary")
    ap.add_argument("--work-dir", type=Path, default=HERE / "out",
                    help="where the model, CSVs, keys and compiled files go (default: benches/compare/out)")
    ap.add_argument("--results-dir", type=Path, default=HERE,
                    help="where results.json and results.md go (default: benches/compare)")
    ap.add_argument("--skip-veil", action="store_true", help="development: Concrete ML only")
    ap.add_argument("--skip-concrete", action="store_true", help="development: Veil only")
    ap.add_argument("--sim-repeats", type=int, default=3,
                    help="runs of Concrete ML's (random) fhe='simulate' over the test set; the mean is reported")
    ap.add_argument("--no-single-core", action="store_true",
                    help="skip the second timing of the encrypted evaluations pinned to one core")
    ap.add_argument("--command", default=None,
                    help="the command line recorded in the results (run.sh passes its own)")
    args = ap.parse_args()
    os.environ.setdefault("PYTHONHASHSEED", "0")

    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    command = args.command or "benches/compare/.venv/bin/python benches/compare/compare.py " + " ".join(
        shlex.quote(a) for a in sys.argv[1:])
    r: dict = {"command": command, "n_fhe": args.n_fhe, "work_dir": rel(work), "machine": machine_info()}
    log(f"machine: {r['machine'].get('cpu_model')}, nproc {r['machine']['nproc']}, "
        f"load {r['machine']['loadavg_start']}")

    log("training digits_mlp with models/training/train.py (make_digits_mlp)...")
    import torch
    import train
    with contextlib.redirect_stdout(sys.stderr):  # train.py prints its progress on stdout
        model, ref = train_model(work)
    X_train, y_train = train.read_csv(work / "digits_mlp" / "train.csv")
    X_test, y_test = train.read_csv(work / "digits_mlp" / "test.csv")
    model.eval()
    with torch.no_grad():
        fa = float((model(torch.from_numpy(X_test)).numpy().argmax(1) == y_test).mean())
    r["model"] = {
        "name": "digits_mlp", "n_train": len(X_train), "n_test": len(X_test), "float_accuracy": fa,
        "onnxruntime_accuracy": ref["onnxruntime_accuracy"], "torch_exporter": ref.get("torch_exporter"),
        "torch_version": torch.__version__, "onnx": rel(work / "digits_mlp" / "model.onnx"),
    }
    r["model"]["zoo_check"] = check_against_zoo(work, model)
    log(f"model: float accuracy {fa:.4f}; vs zoo: {r['model']['zoo_check']}")
    if args.n_fhe > len(X_test):
        sys.exit(f"--n-fhe {args.n_fhe} > {len(X_test)} test images")

    if not args.skip_veil:
        if not args.veil.exists():
            sys.exit(f"{args.veil} not found: build it with `cargo build --release` (run.sh does)")
        r["veil"] = run_veil(args.veil.resolve(), work, args.n_fhe, not args.no_single_core)
    if not args.skip_concrete:
        r["concrete_ml"] = run_concrete(model, X_train, X_test, y_test, args.n_fhe, work, not args.no_single_core,
                                        max(1, args.sim_repeats))

    v, c = r.get("veil"), r.get("concrete_ml")
    if v and c and v["fhe"]["result"] and v["simulate"]["result"]:
        vf, vs = v["fhe"]["result"], v["simulate"]["result"]
        veil_acc = min(vs["simulated_accuracy"], vs["simulated_accuracy_with_noise"])
        lat = vf["latency_ms_median"] / c["fhe"]["run_ms_median"] if c["fhe"]["run_ms_median"] else None
        lat_exec = vf["latency_ms_median"] / c["fhe"]["execute_ms_median"] if c["fhe"]["execute_ms_median"] else None
        v1 = (v.get("fhe_one_core") or {}).get("result") or {}
        c1 = c["fhe"].get("one_core_run_ms_median")
        lat1 = v1["latency_ms_median"] / c1 if v1.get("latency_ms_median") and c1 else None
        r["criterion"] = {
            "latency_ratio": lat, "latency_ratio_vs_execute": lat_exec, "latency_ratio_one_core": lat1,
            "veil_speedup_all_cores": v1["latency_ms_median"] / vf["latency_ms_median"] if lat1 else None,
            "concrete_speedup_all_cores": c1 / c["fhe"]["run_ms_median"] if lat1 else None,
            "latency_ok": lat is not None and lat <= 0.25,
            "veil_accuracy": veil_acc, "concrete_simulated_accuracy": c["simulated_accuracy"],
            "accuracy_ok": veil_acc >= c["simulated_accuracy"] - 0.01 - 1e-12,
        }
    r["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    r["total_s"] = time.perf_counter() - START

    args.results_dir.mkdir(parents=True, exist_ok=True)
    with open(args.results_dir / "results.json", "w") as f:
        json.dump(r, f, indent=2)
        f.write("\n")
    md = build_report(r)
    (args.results_dir / "results.md").write_text(md)
    log(f"wrote {rel(args.results_dir / 'results.json')} and {rel(args.results_dir / 'results.md')} "
        f"in {r['total_s']:.0f}s")
    print(md)


if __name__ == "__main__":
    main()
