#!/usr/bin/env python3
"""Train and export Veil's reference model zoo.

Writes one folder per model under ``models/zoo/<name>/``:

* ``model.onnx``      self-contained ONNX file (no external data), float32 input
* ``train.csv``       header ``f0..f{n-1},label``; features in model-input order
* ``test.csv``        same layout as train.csv
* ``reference.json``  metadata, accuracies and the first onnxruntime outputs

Models:

* ``digits_mlp``           torch   Linear(64,32) -> ReLU -> Linear(32,10)
* ``digits_cnn``           torch   Conv2d(1,4,3) -> ReLU -> AvgPool2d(2) -> Flatten -> Linear(36,10)
* ``breast_cancer_logreg`` sklearn StandardScaler + LogisticRegression (binary), skl2onnx defaults
* ``iris_logreg``          sklearn StandardScaler + LogisticRegression (3 classes), skl2onnx defaults
* ``wine_mlp``             sklearn StandardScaler + MLPClassifier((16,)), skl2onnx defaults
* ``digits_maxpool_cnn``   torch   Conv2d(1,8,3,p=1) -> ReLU -> MaxPool2d(2) -> Conv2d(8,16,3,p=1) -> ReLU
                                   -> MaxPool2d(2) -> Flatten -> Linear(64,10)
* ``digits_resmlp``        torch   h1 = relu(fc0(x)); h2 = h1 + gelu(fc1(h1)); h3 = h2 + silu(fc2(h2));
                                   logits = fc_out(h3)   (width 32, GELU in its default erf form)
* ``digits_qdq_mlp``       torch MLP 64-32-10 (same recipe and seed as digits_mlp), then
                                   onnxruntime quantize_static: QDQ, per-channel, QUInt8 activations, QInt8 weights
* ``digits_qdq_cnn``       torch Conv2d(1,4,3) -> ReLU -> MaxPool2d(2) -> Flatten -> Linear(36,10), then
                                   quantize_static: QDQ, per-tensor, QUInt8 activations, QInt8 weights
* ``breast_cancer_xgb``    xgboost XGBClassifier(n_estimators=20, max_depth=3), onnxmltools convert_xgboost
* ``wine_rf``              sklearn RandomForestClassifier(10 trees, max_depth=4), skl2onnx defaults (ZipMap on)
* ``iris_lgbm``            lightgbm LGBMClassifier(10 rounds, num_leaves=8), onnxmltools convert_lightgbm
* ``diabetes_linear``      sklearn LinearRegression, skl2onnx (ai.onnx.ml LinearRegressor)
* ``diabetes_gbr``         sklearn GradientBoostingRegressor(30 trees, max_depth=3), skl2onnx
* ``cifar_vgg``            torch   input f32[batch,3,32,32]: Conv2d(3,16,3,p=1) -> ReLU -> Conv2d(16,16,3,p=1)
                                   -> ReLU -> AvgPool2d(2) -> Conv2d(16,32,3,p=1) -> ReLU -> Conv2d(32,32,3,p=1)
                                   -> ReLU -> AvgPool2d(2) -> Conv2d(32,64,3,p=1) -> ReLU -> AvgPool2d(2)
                                   -> Flatten -> Linear(1024,10); 53248 ReLUs per image. Trained on all
                                   1437 training rows; its train.csv holds only a 200-row stratified subset
                                   of them (calibration data), test.csv all 360 test rows.

cifar_vgg's data (no image data set can be downloaded) is synthetic "coloured digits",
made by ``synthetic_cifar_digits()`` from sklearn's digits (8x8, integer pixels p in 0..16)
with ``rng = np.random.default_rng(0)``, drawn in this order:
``k = rng.integers(1, 4, size=(1797, 3))`` (a colour factor k_c in {1,2,3} per sample and
channel); each image upsampled to 32x32 by nearest neighbour (``repeat(4)`` on both axes);
channel c = round(p * k_c / 3) = ``(p * k_c + 1) // 3``; then background noise
``mask = rng.random((1797,3,32,32)) < 0.1``, ``noise = rng.integers(1, 3, size=(1797,3,32,32))``,
and every channel pixel that is 0 with its mask set becomes its noise value (1 or 2). Values
are integers in 0..16; the model input (and the CSV features, NCHW flattened) is value / 16.

The five tree / regression models (breast_cancer_xgb .. diabetes_gbr) write CSV features at
full precision (shortest float64 text of the float32 value) and run onnxruntime with one
thread (see ``run_ort_outputs``); the two regressors'
last CSV column is ``target`` (a float) and they are split without stratification.

Every split is ``train_test_split(X, y, test_size=0.2, stratify=y, random_state=0)``.
Everything is seeded; run from the repository root:

    python models/training/train.py            # writes models/zoo/
    python models/training/train.py --out DIR  # somewhere else
    python models/training/train.py --only digits_resmlp,digits_qdq_mlp   # just these
    python models/training/train.py --list     # model names, in run order
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import sklearn
from sklearn.datasets import load_breast_cancer, load_digits, load_iris, load_wine
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

import skl2onnx
from skl2onnx import to_onnx
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

import torch
from torch import nn

SEED = 0
TORCH_OPSET = 18  # the dynamo exporter's lowest native opset (asking for 17 triggers a version conversion)
N_FIRST = 20

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO_ROOT / "models" / "zoo"


# --------------------------------------------------------------------------- helpers


def seed_everything(seed: int = SEED) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)


def split(X: np.ndarray, y: np.ndarray):
    return train_test_split(X, y, test_size=0.2, stratify=y, random_state=0)


def fmt(v: np.float32) -> str:
    """Shortest decimal text that round-trips to this float32 value (no exponent).

    Parsing it as f32 gives the value back exactly (it is the shortest round-trip
    representation); parsing it as f64 and then casting to f32 is checked here to
    give the same value too.
    """
    v = np.float32(v)
    s = np.format_float_positional(v, unique=True, trim="-")
    if np.float32(float(s)) != v:
        raise AssertionError(f"{s!r} does not round-trip to float32 {v!r} via f64")
    return s


def write_csv(path: Path, X: np.ndarray, y: np.ndarray) -> None:
    X = np.asarray(X, dtype=np.float32).reshape(len(X), -1)
    n = X.shape[1]
    with open(path, "w", newline="\n") as f:
        f.write(",".join([f"f{i}" for i in range(n)] + ["label"]) + "\n")
        for row, label in zip(X, y):
            f.write(",".join(fmt(v) for v in row) + f",{int(label)}\n")


def read_csv(path: Path):
    data = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64)
    return data[:, :-1].astype(np.float32), data[:, -1].astype(np.int64)


def graph_ops(model: onnx.ModelProto):
    return [{"domain": n.domain, "op_type": n.op_type} for n in model.graph.node]


def opset_map(model: onnx.ModelProto):
    return {o.domain: int(o.version) for o in sorted(model.opset_import, key=lambda o: o.domain)}


def check_self_contained(model_path: Path, external_ok: bool = False) -> onnx.ModelProto:
    model = onnx.load(str(model_path), load_external_data=False)
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL and not external_ok:
            raise RuntimeError(f"{model_path}: initializer {t.name} uses external data")
    if len(model.functions):
        raise RuntimeError(f"{model_path}: model contains ONNX functions")
    # The checker reads external data relative to the file when given its path.
    onnx.checker.check_model(str(model_path) if external_ok else model, full_check=True)
    inp = model.graph.input[0]
    if inp.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise RuntimeError(f"{model_path}: input is not float32")
    return model


def run_ort(model_path: Path, X: np.ndarray, input_shape):
    """Run model.onnx on X; return (scores [N, C] float32, labels [N])."""
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    in_name = sess.get_inputs()[0].name
    out_names = [o.name for o in sess.get_outputs()]
    X = X.reshape([len(X)] + list(input_shape)).astype(np.float32)
    if sess.get_inputs()[0].shape[0] == 1:  # exported with a fixed batch of one
        rows = [sess.run(None, {in_name: X[i:i + 1]}) for i in range(len(X))]
        outs = [np.concatenate([r[k] for r in rows]) for k in range(len(rows[0]))]
    else:
        outs = sess.run(None, {in_name: X})
    if len(outs) == 1:  # torch: logits
        scores = np.asarray(outs[0], dtype=np.float32)
        labels = scores.argmax(axis=1)
    else:  # skl2onnx: output_label, output_probability (ZipMap -> list of dicts);
        # onnxmltools: label, probabilities. Either way: label first, probabilities second.
        by_name = dict(zip(out_names, outs))
        labels = np.asarray(by_name.get("output_label", outs[0])).astype(np.int64)
        probs = by_name.get("output_probability", outs[1])
        if isinstance(probs, list):  # ZipMap output: sequence<map<int64, float>>
            keys = sorted(probs[0].keys())
            scores = np.array([[p[k] for k in keys] for p in probs], dtype=np.float32)
        else:
            scores = np.asarray(probs, dtype=np.float32)
        argmax = scores.argmax(axis=1)
        if not np.array_equal(argmax, labels):
            bad = int((argmax != labels).sum())
            print(f"  note: {bad} rows where argmax(probability) != output_label", file=sys.stderr)
    return scores, labels


def finish(out_dir: Path, name: str, *, source: str, dataset: str, X_train, y_train, X_test,
           y_test, n_classes: int, input_shape, framework_accuracy: float, framework_scores,
           extra=None, external_ok: bool = False) -> dict:
    folder = out_dir / name
    model_path = folder / "model.onnx"
    write_csv(folder / "train.csv", X_train, y_train)
    write_csv(folder / "test.csv", X_test, y_test)

    model = check_self_contained(model_path, external_ok)
    # Evaluate exactly what was written to test.csv.
    Xt, yt = read_csv(folder / "test.csv")
    assert np.array_equal(Xt, np.asarray(X_test, np.float32).reshape(len(X_test), -1))
    assert np.array_equal(yt, y_test)
    scores, labels = run_ort(model_path, Xt, input_shape)
    ort_acc = float((labels == yt).mean())
    # Largest |onnxruntime - framework| over all test rows (logits or probabilities).
    max_diff = float(np.abs(scores.astype(np.float64) - np.asarray(framework_scores, np.float64)).max())

    ref = {
        "name": name,
        "source": source,
        "dataset": dataset,
        "n_train": int(len(X_train)),
        "n_test": int(len(X_test)),
        "n_features": int(np.prod(input_shape)),
        "n_classes": int(n_classes),
        "input_shape": [int(d) for d in input_shape],
        "input_name": model.graph.input[0].name,
        "output_names": [o.name for o in model.graph.output],
        "onnxruntime_accuracy": ort_acc,
        "framework_accuracy": float(framework_accuracy),
        "max_abs_diff_vs_framework": max_diff,
        "ops": graph_ops(model),
        "opset": opset_map(model),
        "first_scores": [[float(v) for v in row] for row in scores[:N_FIRST]],
        "first_labels": [int(v) for v in labels[:N_FIRST]],
    }
    if extra:
        ref.update(extra)
    with open(folder / "reference.json", "w") as f:
        json.dump(ref, f, indent=2)
        f.write("\n")
    print(f"{name}: framework acc {framework_accuracy:.4f}, onnxruntime acc {ort_acc:.4f}, "
          f"max |ort - framework| {max_diff:.2e}, ops {[o['op_type'] for o in ref['ops']]}")
    return ref


# --------------------------------------------------------------------------- torch models


def digits_split():
    d = load_digits()
    X = (d.data / 16.0).astype(np.float32)  # pixels 0..16 -> [0, 1]
    y = d.target.astype(np.int64)
    return split(X, y)


def train_torch(model: nn.Module, X_train, y_train, X_test, y_test, *, epochs: int,
                batch_size: int, lr: float, input_shape) -> float:
    Xtr = torch.from_numpy(X_train.reshape([-1] + list(input_shape)))
    ytr = torch.from_numpy(y_train)
    Xte = torch.from_numpy(X_test.reshape([-1] + list(input_shape)))
    yte = torch.from_numpy(y_test)
    gen = torch.Generator().manual_seed(SEED)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(Xtr), generator=gen)
        for i in range(0, len(Xtr), batch_size):
            idx = perm[i:i + batch_size]
            opt.zero_grad()
            loss = loss_fn(model(Xtr[idx]), ytr[idx])
            loss.backward()
            opt.step()
        if (epoch + 1) % 25 == 0 or epoch + 1 == epochs:
            model.eval()
            with torch.no_grad():
                acc = (model(Xte).argmax(1) == yte).float().mean().item()
            print(f"  epoch {epoch + 1:4d} loss {loss.item():.4f} test acc {acc:.4f}")
    model.eval()
    with torch.no_grad():
        logits = model(Xte)
    return float((logits.argmax(1) == yte).double().mean()), logits.numpy()


def strip_stack_traces(path: Path) -> None:
    """Drop the per-node ``pkg.torch.onnx.stack_trace`` metadata the dynamo exporter adds.

    Those strings hold absolute paths and line numbers of this script and of the
    venv, so the files would change with the checkout location. Everything else
    the exporter wrote (including the other metadata_props) is kept as is.
    """
    model = onnx.load(str(path), load_external_data=False)
    for node in model.graph.node:
        keep = [(p.key, p.value) for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
        del node.metadata_props[:]
        for k, v in keep:
            node.metadata_props.add(key=k, value=v)
    onnx.save(model, str(path))


def export_torch(model: nn.Module, example: torch.Tensor, path: Path) -> str:
    """torch.onnx.export with the default (dynamo) exporter; fall back to TorchScript."""
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        batch = torch.export.Dim("batch")
        torch.onnx.export(
            model, (example,), str(path),
            input_names=["input"], output_names=["logits"],
            opset_version=TORCH_OPSET,
            dynamic_shapes=({0: batch},),
            external_data=False,  # default True writes model.onnx.data next to the file
            dynamo=True,
        )
        strip_stack_traces(path)
        check_self_contained(path)
        return "dynamo"
    except Exception as e:  # pragma: no cover - only used if the dynamo exporter breaks
        print(f"  dynamo export failed ({e!r}); falling back to dynamo=False", file=sys.stderr)
        for p in (path, Path(str(path) + ".data")):
            if p.exists():
                p.unlink()
        torch.onnx.export(
            model, (example,), str(path),
            input_names=["input"], output_names=["logits"],
            opset_version=TORCH_OPSET,
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            dynamo=False,
        )
        return "torchscript"


def make_digits_mlp(out_dir: Path) -> dict:
    seed_everything()
    X_train, X_test, y_train, y_test = digits_split()
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    acc, logits = train_torch(model, X_train, y_train, X_test, y_test,
                              epochs=150, batch_size=32, lr=1e-3, input_shape=[64])
    how = export_torch(model, torch.from_numpy(X_test[:2]), out_dir / "digits_mlp" / "model.onnx")
    return finish(out_dir, "digits_mlp", source="torch", dataset="sklearn.datasets.load_digits (pixels/16)",
                  X_train=X_train, y_train=y_train, X_test=X_test, y_test=y_test, n_classes=10,
                  input_shape=[64], framework_accuracy=acc, framework_scores=logits,
                  extra={"torch_exporter": how, "torch_version": torch.__version__})


def export_torch_default(model: nn.Module, example: torch.Tensor, path: Path) -> list:
    """``torch.onnx.export(model, (example,), path)`` with no options, as a new user calls it.

    torch 2.15's defaults: the dynamo exporter, opset 20, the example's fixed batch of one,
    and weights over a size threshold in ``model.onnx.data`` beside the file (external
    data). Only the per-node stack-trace metadata is stripped afterwards (it holds this
    checkout's paths); the tensors keep their external references. Returns the names of the
    tensors stored externally.
    """
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    for p in (path, Path(str(path) + ".data")):
        if p.exists():
            p.unlink()
    torch.onnx.export(model, (example,), str(path))
    strip_stack_traces(path)
    proto = check_self_contained(path, external_ok=True)
    external = [t.name for t in proto.graph.initializer
                if t.data_location == onnx.TensorProto.EXTERNAL]
    if not external:
        raise RuntimeError(f"{path}: expected the default exporter to write external data")
    return external


def make_torch_default(out_dir: Path, name: str, model: nn.Module, *, input_shape, epochs: int,
                       what: str) -> dict:
    """A digits classifier trained in torch and exported with the default options."""
    X_train, X_test, y_train, y_test = digits_split()
    acc, logits = train_torch(model, X_train, y_train, X_test, y_test, epochs=epochs,
                              batch_size=32, lr=1e-3, input_shape=input_shape)
    example = torch.from_numpy(X_test[:1].reshape([1] + list(input_shape)))
    external = export_torch_default(model, example, out_dir / name / "model.onnx")
    return finish(out_dir, name, source="torch", dataset="sklearn.datasets.load_digits (pixels/16)",
                  X_train=X_train, y_train=y_train, X_test=X_test, y_test=y_test, n_classes=10,
                  input_shape=input_shape, framework_accuracy=acc, framework_scores=logits,
                  external_ok=True,
                  extra={"torch_exporter": "default (torch.onnx.export(model, (x,), path))",
                         "torch_version": torch.__version__, "architecture": what,
                         "external_tensors": external})


def make_digits_torch_mlp(out_dir: Path) -> dict:
    seed_everything()
    model = nn.Sequential(nn.Linear(64, 48), nn.BatchNorm1d(48), nn.ReLU(), nn.Linear(48, 10))
    return make_torch_default(out_dir, "digits_torch_mlp", model, input_shape=[64], epochs=100,
                              what="Linear(64,48) BatchNorm1d ReLU Linear(48,10)")


class DigitsTorchCnn(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3)
        self.bn = nn.BatchNorm2d(6)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(6 * 3 * 3, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(torch.relu(self.bn(self.conv(x)))), 1))


def make_digits_torch_cnn(out_dir: Path) -> dict:
    seed_everything()
    return make_torch_default(out_dir, "digits_torch_cnn", DigitsTorchCnn(), input_shape=[1, 8, 8],
                              epochs=100, what="Conv2d(1,6,3) BatchNorm2d ReLU MaxPool2d(2) Linear(54,10)")


class DigitsTorchConv1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 4, 6, stride=2)
        self.pool = nn.AvgPool1d(2)
        self.fc = nn.Linear(4 * 15, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(torch.relu(self.conv(x))), 1))


def make_digits_torch_conv1d(out_dir: Path) -> dict:
    seed_everything()
    return make_torch_default(out_dir, "digits_torch_conv1d", DigitsTorchConv1d(),
                              input_shape=[1, 64], epochs=100,
                              what="Conv1d(1,4,6,stride 2) ReLU AvgPool1d(2) Linear(60,10)")


class DigitsTorchLnGelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 24)
        self.norm = nn.LayerNorm(24)
        self.fc2 = nn.Linear(24, 10)

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.norm(self.fc1(x))))


def make_digits_torch_lngelu(out_dir: Path) -> dict:
    seed_everything()
    return make_torch_default(out_dir, "digits_torch_lngelu", DigitsTorchLnGelu(), input_shape=[64],
                              epochs=100, what="Linear(64,24) LayerNorm(24) GELU Linear(24,10)")


SWEEP_WIDTHS = (8, 16, 32, 64, 128)


def make_digits_sweep(out_dir: Path) -> None:
    """MLPs 64-h-10 on digits for `veil estimate --sweep`: only the ONNX files (the
    digits_mlp CSVs serve as data) and their float accuracy."""
    X_train, X_test, y_train, y_test = digits_split()
    sweep = out_dir / "digits_sweep"
    sweep.mkdir(parents=True, exist_ok=True)
    accs = {}
    for h in SWEEP_WIDTHS:
        seed_everything()
        model = nn.Sequential(nn.Linear(64, h), nn.ReLU(), nn.Linear(h, 10))
        acc, _ = train_torch(model, X_train, y_train, X_test, y_test,
                             epochs=150, batch_size=32, lr=1e-3, input_shape=[64])
        export_torch(model, torch.from_numpy(X_test[:2]), sweep / f"mlp_h{h}.onnx")
        accs[f"mlp_h{h}"] = acc
    (sweep / "float_accuracy.json").write_text(json.dumps(accs, indent=2) + "\n")


class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, kernel_size=3, stride=1, padding=0)
        self.relu = nn.ReLU()
        self.pool = nn.AvgPool2d(2)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(36, 10)

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.relu(self.conv(x)))))


def make_digits_cnn(out_dir: Path) -> dict:
    seed_everything()
    X_train, X_test, y_train, y_test = digits_split()
    model = DigitsCNN()
    shape = [1, 8, 8]
    acc, logits = train_torch(model, X_train, y_train, X_test, y_test,
                              epochs=200, batch_size=32, lr=1e-2, input_shape=shape)
    how = export_torch(model, torch.from_numpy(X_test[:2].reshape(2, 1, 8, 8)),
                       out_dir / "digits_cnn" / "model.onnx")
    return finish(out_dir, "digits_cnn", source="torch", dataset="sklearn.datasets.load_digits (pixels/16)",
                  X_train=X_train, y_train=y_train, X_test=X_test, y_test=y_test, n_classes=10,
                  input_shape=shape, framework_accuracy=acc, framework_scores=logits,
                  extra={"torch_exporter": how, "torch_version": torch.__version__})


# --------------------------------------------------------------------------- more torch models


class DigitsMaxPoolCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, kernel_size=3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 16, kernel_size=3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = self.pool1(self.relu1(self.conv1(x)))    # [B,8,4,4]
        x = self.pool2(self.relu2(self.conv2(x)))    # [B,16,2,2]
        return self.fc(self.flatten(x))


def make_digits_maxpool_cnn(out_dir: Path) -> dict:
    seed_everything()
    X_train, X_test, y_train, y_test = digits_split()
    model = DigitsMaxPoolCNN()
    shape = [1, 8, 8]
    acc, logits = train_torch(model, X_train, y_train, X_test, y_test,
                              epochs=60, batch_size=32, lr=3e-3, input_shape=shape)
    how = export_torch(model, torch.from_numpy(X_test[:2].reshape(2, 1, 8, 8)),
                       out_dir / "digits_maxpool_cnn" / "model.onnx")
    return finish(out_dir, "digits_maxpool_cnn", source="torch",
                  dataset="sklearn.datasets.load_digits (pixels/16)",
                  X_train=X_train, y_train=y_train, X_test=X_test, y_test=y_test, n_classes=10,
                  input_shape=shape, framework_accuracy=acc, framework_scores=logits,
                  extra={"torch_exporter": how, "torch_version": torch.__version__})


class DigitsResMLP(nn.Module):
    """Residual MLP of width 32: one block with GELU (erf form), one with SiLU."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.fc0 = nn.Linear(64, width)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        self.fc_out = nn.Linear(width, 10)
        self.relu = nn.ReLU()
        self.gelu = nn.GELU()  # approximate="none": 0.5 * x * (1 + erf(x / sqrt(2)))
        self.silu = nn.SiLU()  # x * sigmoid(x)

    def forward(self, x):
        h1 = self.relu(self.fc0(x))
        h2 = h1 + self.gelu(self.fc1(h1))
        h3 = h2 + self.silu(self.fc2(h2))
        return self.fc_out(h3)


def make_digits_resmlp(out_dir: Path) -> dict:
    seed_everything()
    X_train, X_test, y_train, y_test = digits_split()
    model = DigitsResMLP()
    acc, logits = train_torch(model, X_train, y_train, X_test, y_test,
                              epochs=100, batch_size=32, lr=1e-3, input_shape=[64])
    how = export_torch(model, torch.from_numpy(X_test[:2]), out_dir / "digits_resmlp" / "model.onnx")
    return finish(out_dir, "digits_resmlp", source="torch", dataset="sklearn.datasets.load_digits (pixels/16)",
                  X_train=X_train, y_train=y_train, X_test=X_test, y_test=y_test, n_classes=10,
                  input_shape=[64], framework_accuracy=acc, framework_scores=logits,
                  extra={"torch_exporter": how, "torch_version": torch.__version__})


# --------------------------------------------------------------------------- QDQ (onnxruntime static quantization)

N_CALIBRATION = 200      # first rows of the training split
CALIBRATION_BATCH = 50


class RowsReader(CalibrationDataReader):
    """Feeds the first N_CALIBRATION training rows, CALIBRATION_BATCH at a time."""

    def __init__(self, input_name: str, X: np.ndarray, input_shape):
        X = np.asarray(X[:N_CALIBRATION], np.float32).reshape([-1] + list(input_shape))
        self._batches = [{input_name: X[i:i + CALIBRATION_BATCH]} for i in range(0, len(X), CALIBRATION_BATCH)]
        self._it = iter(self._batches)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        self._it = iter(self._batches)


class DigitsQDQCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, kernel_size=3)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(36, 10)

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.relu(self.conv(x)))))


def make_qdq(out_dir: Path, name: str, model: nn.Module, *, input_shape, per_channel: bool,
             epochs: int, lr: float) -> dict:
    X_train, X_test, y_train, y_test = digits_split()
    acc, logits = train_torch(model, X_train, y_train, X_test, y_test,
                              epochs=epochs, batch_size=32, lr=lr, input_shape=input_shape)
    folder = out_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    float_path = folder / "model.float.onnx"  # temporary: the float export that gets quantized
    qdq_path = folder / "model.onnx"
    try:
        how = export_torch(model, torch.from_numpy(X_test[:2].reshape([2] + list(input_shape))), float_path)
        float_scores, float_labels = run_ort(float_path, X_test, input_shape)
        float_ort_acc = float((float_labels == y_test).mean())
        quantize_static(
            str(float_path), str(qdq_path),
            RowsReader("input", X_train, input_shape),
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    finally:
        if float_path.exists():
            float_path.unlink()
    return finish(out_dir, name, source="torch+onnxruntime.quantization.quantize_static",
                  dataset="sklearn.datasets.load_digits (pixels/16)",
                  X_train=X_train, y_train=y_train, X_test=X_test, y_test=y_test, n_classes=10,
                  input_shape=input_shape, framework_accuracy=acc, framework_scores=logits,
                  extra={
                      "torch_exporter": how, "torch_version": torch.__version__,
                      "onnxruntime_version": ort.__version__,
                      "float_onnx_onnxruntime_accuracy": float_ort_acc,
                      "quantization": {
                          "quant_format": "QDQ",
                          "per_channel": per_channel,
                          "activation_type": "QUInt8",
                          "weight_type": "QInt8",
                          "calibrate_method": "MinMax",
                          "calibration_rows": f"first {N_CALIBRATION} rows of train.csv, batches of {CALIBRATION_BATCH}",
                          "extra_options": {},
                      },
                  })


def make_digits_qdq_mlp(out_dir: Path) -> dict:
    seed_everything()
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))  # digits_mlp's recipe
    return make_qdq(out_dir, "digits_qdq_mlp", model, input_shape=[64], per_channel=True, epochs=150, lr=1e-3)


def make_digits_qdq_cnn(out_dir: Path) -> dict:
    seed_everything()
    return make_qdq(out_dir, "digits_qdq_cnn", DigitsQDQCNN(), input_shape=[1, 8, 8], per_channel=False,
                    epochs=100, lr=1e-2)


# --------------------------------------------------------------------------- CIFAR-size VGG-style CNN
#
# No image data set can be downloaded here, so cifar_vgg trains on a fixed, seeded
# synthetic "coloured digits" set at CIFAR's input size, f32[batch,3,32,32]. See
# synthetic_cifar_digits() for the exact recipe; models/zoo/README.md repeats it.

CIFAR_UPSAMPLE = 4            # 8x8 -> 32x32, nearest neighbour (every pixel becomes a 4x4 block)
CIFAR_NOISE_P = 0.1           # fraction of background (value 0) channel pixels that get noise
CIFAR_TRAIN_CSV_ROWS = 200    # train.csv holds a stratified subset of the training split (calibration data)
CIFAR_EPOCHS = 20
CIFAR_BATCH = 32
CIFAR_LR = 1e-3


def synthetic_cifar_digits():
    """(X [1797,3,32,32] float32 = values/16, y [1797] int64, values [1797,3,32,32] int64 in 0..16).

    From sklearn's digits (``load_digits().images``, 8x8, integer pixels p in 0..16), with
    ``rng = np.random.default_rng(0)`` drawn from in exactly this order:

    1. colour: ``k = rng.integers(1, 4, size=(1797, 3))``, one factor k_c in {1, 2, 3} per
       sample and channel (the colour is (k_0, k_1, k_2) / 3);
    2. upsample each image to 32x32 by nearest neighbour: ``img.repeat(4, 1).repeat(4, 2)``;
    3. channel c = round(p * k_c / 3), computed as ``(p * k_c + 1) // 3`` (p * k_c / 3 never
       ends in .5, so this is plain rounding); values stay integers in 0..16;
    4. background noise: ``mask = rng.random((1797, 3, 32, 32)) < 0.1`` then
       ``noise = rng.integers(1, 3, size=(1797, 3, 32, 32))`` (1 or 2); every channel pixel
       whose value is 0 and whose mask is set becomes its noise value.

    The model input is value / 16 (multiples of 1/16 in [0, 1], exact in float32), NCHW.
    """
    d = load_digits()
    img = d.images.astype(np.int64)                        # [N, 8, 8], 0..16
    n = len(img)
    rng = np.random.default_rng(SEED)
    k = rng.integers(1, 4, size=(n, 3))                    # colour factors in {1, 2, 3}
    big = img.repeat(CIFAR_UPSAMPLE, axis=1).repeat(CIFAR_UPSAMPLE, axis=2)   # [N, 32, 32]
    values = (big[:, None, :, :] * k[:, :, None, None] + 1) // 3            # [N, 3, 32, 32], 0..16
    mask = rng.random(values.shape) < CIFAR_NOISE_P
    noise = rng.integers(1, 3, size=values.shape)
    values = np.where((values == 0) & mask, noise, values)
    assert values.min() >= 0 and values.max() <= 16
    X = (values / 16.0).astype(np.float32)
    return X, d.target.astype(np.int64), values


class CifarVGG(nn.Module):
    """VGG-style CNN for 3x32x32 input; AvgPool (linear under FHE) instead of MaxPool."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),      # [B,16,32,32]
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),     # [B,16,32,32]
            nn.AvgPool2d(2),                                # [B,16,16,16]
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),     # [B,32,16,16]
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),     # [B,32,16,16]
            nn.AvgPool2d(2),                                # [B,32,8,8]
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),     # [B,64,8,8]
            nn.AvgPool2d(2),                                # [B,64,4,4]
        )
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(self.flatten(self.features(x)))


# ReLU outputs per image: 16*32*32*2 + 32*16*16*2 + 64*8*8 = 32768 + 16384 + 4096
CIFAR_RELUS_PER_IMAGE = 16 * 32 * 32 * 2 + 32 * 16 * 16 * 2 + 64 * 8 * 8


def make_cifar_vgg(out_dir: Path) -> dict:
    seed_everything()
    X, y, _ = synthetic_cifar_digits()
    X_train, X_test, y_train, y_test = split(X.reshape(len(X), -1), y)
    shape = [3, 32, 32]
    model = CifarVGG()
    acc, logits = train_torch(model, X_train, y_train, X_test, y_test, epochs=CIFAR_EPOCHS,
                              batch_size=CIFAR_BATCH, lr=CIFAR_LR, input_shape=shape)
    how = export_torch(model, torch.from_numpy(X_test[:2].reshape([2] + shape)),
                       out_dir / "cifar_vgg" / "model.onnx")
    # train.csv: a stratified, seeded subset of the 1437 training rows (kept in split order);
    # the model was trained on all of them. It only serves as calibration data.
    keep, _ = train_test_split(np.arange(len(X_train)), train_size=CIFAR_TRAIN_CSV_ROWS,
                               stratify=y_train, random_state=0)
    keep = np.sort(keep)
    return finish(out_dir, "cifar_vgg", source="torch",
                  dataset="synthetic coloured digits 3x32x32 (sklearn load_digits upsampled x4, seeded colour "
                          "and background noise; values/16)",
                  X_train=X_train[keep], y_train=y_train[keep], X_test=X_test, y_test=y_test, n_classes=10,
                  input_shape=shape, framework_accuracy=acc, framework_scores=logits,
                  extra={"torch_exporter": how, "torch_version": torch.__version__,
                         "n_train_fit": int(len(X_train)),
                         "train_csv": f"stratified subset of the training split: train_test_split(arange("
                                      f"{len(X_train)}), train_size={CIFAR_TRAIN_CSV_ROWS}, stratify=y_train, "
                                      f"random_state=0), sorted; calibration data only",
                         "generator": {"base": "sklearn.datasets.load_digits().images (8x8, 0..16)",
                                       "rng": "numpy.random.default_rng(0)",
                                       "upsample": f"nearest neighbour x{CIFAR_UPSAMPLE}",
                                       "colour": "k = rng.integers(1, 4, size=(1797, 3)); "
                                                 "channel c = (p * k_c + 1) // 3",
                                       "noise": f"mask = rng.random((1797,3,32,32)) < {CIFAR_NOISE_P}; "
                                                "noise = rng.integers(1, 3, size=(1797,3,32,32)); "
                                                "value = noise where value == 0 and mask",
                                       "input": "value / 16 (float32)"},
                         "train": {"optimizer": "Adam", "lr": CIFAR_LR, "batch_size": CIFAR_BATCH,
                                   "epochs": CIFAR_EPOCHS, "seed": SEED},
                         "relu_activations_per_image": CIFAR_RELUS_PER_IMAGE})


# --------------------------------------------------------------------------- sklearn models


def make_sklearn(out_dir: Path, name: str, loader, dataset: str, estimator) -> dict:
    seed_everything()
    d = loader()
    X = d.data.astype(np.float32)  # the ONNX model takes float32; train on exactly those values
    y = d.target.astype(np.int64)
    X_train, X_test, y_train, y_test = split(X, y)
    pipe = Pipeline([("scaler", StandardScaler()), ("clf", estimator)])
    pipe.fit(X_train, y_train)
    acc = float((pipe.predict(X_test) == y_test).mean())
    onx = to_onnx(pipe, X_train[:1])  # skl2onnx defaults (ZipMap on, default target_opset)
    folder = out_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "model.onnx", "wb") as f:
        f.write(onx.SerializeToString())
    return finish(out_dir, name, source="skl2onnx", dataset=dataset,
                  X_train=X_train, y_train=y_train, X_test=X_test, y_test=y_test,
                  n_classes=len(np.unique(y)), input_shape=[X.shape[1]], framework_accuracy=acc,
                  framework_scores=pipe.predict_proba(X_test),
                  extra={"sklearn_version": sklearn.__version__, "skl2onnx_version": skl2onnx.__version__})


# --------------------------------------------------------------------------- tree ensembles and regressors
#
# These folders differ from the ones above in two ways: CSV floats are written at full
# (float64) precision, and the regressors' last CSV column is `target` (a float).

def fmt_full(v) -> str:
    """The float32 value v written as the shortest decimal that round-trips as a float64.

    Since every float32 is exactly a float64, parsing this text as f64 gives the exact
    float32 value (no cast needed), and parsing it as f32 gives it too. No exponent.
    """
    v32 = np.float32(v)
    s = np.format_float_positional(np.float64(v32), unique=True, trim="-")
    if float(s) != float(v32) or np.float32(s) != v32:
        raise AssertionError(f"{s!r} does not parse back to float32 {v32!r}")
    return s


def fmt_f64(v) -> str:
    s = np.format_float_positional(np.float64(v), unique=True, trim="-")
    if float(s) != float(v):
        raise AssertionError(f"{s!r} does not parse back to {v!r}")
    return s


def write_csv_full(path: Path, X: np.ndarray, y: np.ndarray, *, regression: bool) -> None:
    """Header `f0..f{n-1},label` (int class) or `f0..f{n-1},target` (float64 target)."""
    X = np.asarray(X, dtype=np.float32).reshape(len(X), -1)
    n = X.shape[1]
    last = "target" if regression else "label"
    with open(path, "w", newline="\n") as f:
        f.write(",".join([f"f{i}" for i in range(n)] + [last]) + "\n")
        for row, t in zip(X, y):
            tail = fmt_f64(t) if regression else str(int(t))
            f.write(",".join(fmt_full(v) for v in row) + "," + tail + "\n")


def read_csv_any(path: Path):
    """(X float32, y, last column name); y is int64 for `label`, float64 for `target`."""
    with open(path) as f:
        last = f.readline().strip().split(",")[-1]
    data = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64, ndmin=2)
    X = data[:, :-1]
    if not np.array_equal(X.astype(np.float32).astype(np.float64), X):
        raise AssertionError(f"{path}: a feature is not exactly a float32 value")
    y = data[:, -1] if last == "target" else data[:, -1].astype(np.int64)
    return X.astype(np.float32), y, last


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            v = onnx.helper.get_attribute_value(a)
            if isinstance(v, bytes):
                return v.decode()
            if isinstance(v, list):
                return [x.decode() if isinstance(x, bytes) else x for x in v]
            if isinstance(v, onnx.TensorProto):
                return onnx.numpy_helper.to_array(v).tolist()
            return v
    return default


TREE_OPS = ("TreeEnsembleClassifier", "TreeEnsembleRegressor")


def tree_stats(model: onnx.ModelProto) -> list:
    """Statistics of every ai.onnx.ml TreeEnsembleClassifier/Regressor node in the graph."""
    out = []
    for node in model.graph.node:
        if node.domain != "ai.onnx.ml" or node.op_type not in TREE_OPS:
            continue
        tids = _attr(node, "nodes_treeids")
        nids = _attr(node, "nodes_nodeids")
        feats = _attr(node, "nodes_featureids")
        vals = _attr(node, "nodes_values")
        if vals is None:
            vals = _attr(node, "nodes_values_as_tensor")
        modes = _attr(node, "nodes_modes")
        true_ids = _attr(node, "nodes_truenodeids")
        false_ids = _attr(node, "nodes_falsenodeids")
        miss = _attr(node, "nodes_missing_value_tracks_true")
        kids = {}
        for t, n, m, a, b in zip(tids, nids, modes, true_ids, false_ids):
            kids[(t, n)] = None if m == "LEAF" else (a, b)
        trees = sorted(set(tids))

        def depth(t, n):
            k = kids[(t, n)]
            return 0 if k is None else 1 + max(depth(t, k[0]), depth(t, k[1]))

        # Root: the node that is no other node's child (node id 0 for every exporter seen).
        depths = []
        for t in trees:
            children = {c for (tt, n), k in kids.items() if tt == t and k for c in k}
            roots = [n for (tt, n) in kids if tt == t and n not in children]
            depths.append(depth(t, roots[0]))
        internal = [i for i, m in enumerate(modes) if m != "LEAF"]
        pairs = {(int(feats[i]), float(np.float32(vals[i]))) for i in internal}
        leaf_ids = [i for i, m in enumerate(modes) if m == "LEAF"]
        stats = {
            "op_type": node.op_type,
            "n_trees": len(trees),
            "max_depth": int(max(depths)),
            "internal_nodes": len(internal),
            "distinct_comparisons": len(pairs),
            "distinct_features": len({int(feats[i]) for i in internal}),
            "leaves": len(leaf_ids),
            "nodes_modes": sorted(set(modes)),
            "post_transform": _attr(node, "post_transform", "NONE"),
            "base_values": _attr(node, "base_values"),
            "nodes_missing_value_tracks_true": sorted(set(miss)) if miss is not None else None,
        }
        pre = "target" if node.op_type == "TreeEnsembleRegressor" else "class"
        w_tree = _attr(node, f"{pre}_treeids")
        w_node = _attr(node, f"{pre}_nodeids")
        stats[f"{pre}_ids"] = sorted(set(_attr(node, f"{pre}_ids")))  # output columns the leaves add to
        stats["leaf_weights"] = len(w_tree)  # (leaf, column) weight entries
        stats["weights_per_leaf"] = sorted({sum(1 for a, b in zip(w_tree, w_node) if (a, b) == k)
                                            for k in set(zip(w_tree, w_node))})
        if node.op_type == "TreeEnsembleRegressor":
            stats["aggregate_function"] = _attr(node, "aggregate_function", "SUM")
            stats["n_targets"] = _attr(node, "n_targets")
        else:
            labels = _attr(node, "classlabels_int64s")
            stats["classlabels"] = labels if labels is not None else _attr(node, "classlabels_strings")
        out.append(stats)
    return out


def run_ort_outputs(model_path: Path, X: np.ndarray):
    """All outputs of model.onnx on X, run by onnxruntime with ONE intra-op thread.

    One thread matters for tree ensembles: onnxruntime then adds the trees' leaf values
    in float32, in tree order, and adds base_values last. With several threads it splits
    the trees between threads and adds the partial sums, so the last bits of the result
    depend on the machine's core count.
    """
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    outs = sess.run(None, {sess.get_inputs()[0].name: X.astype(np.float32)})
    return [o.name for o in sess.get_outputs()], outs


def classifier_outputs(model_path: Path, X: np.ndarray):
    """(probabilities [N, C] float32 ordered by class, labels [N]) from a 2-output classifier:
    output 0 the label, output 1 the probabilities (tensor, or ZipMap's list of dicts)."""
    _, outs = run_ort_outputs(model_path, X)
    labels = np.asarray(outs[0]).reshape(-1)
    probs = outs[1]
    if isinstance(probs, list):
        keys = sorted(probs[0].keys())
        probs = [[p[k] for k in keys] for p in probs]
    return np.asarray(probs, dtype=np.float32), labels


def regressor_outputs(model_path: Path, X: np.ndarray) -> np.ndarray:
    """Predictions [N, n_targets] float32 from the model's first output."""
    _, outs = run_ort_outputs(model_path, X)
    p = np.asarray(outs[0], dtype=np.float32)
    return p.reshape(len(X), -1)


def regression_metrics(y, pred) -> dict:
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score
    y = np.asarray(y, np.float64)
    pred = np.asarray(pred, np.float64).reshape(y.shape)
    return {"r2": float(r2_score(y, pred)), "mae": float(mean_absolute_error(y, pred)),
            "rmse": float(np.sqrt(mean_squared_error(y, pred)))}


def finish_tabular(out_dir: Path, name: str, onx: onnx.ModelProto, *, source: str, dataset: str,
                   X_train, y_train, X_test, y_test, regression: bool, framework_out, extra=None) -> dict:
    """Write CSVs, model.onnx and reference.json for the tree / regression folders.

    framework_out: the framework's predict_proba (classifiers) or predict (regressors) on X_test.
    """
    folder = out_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    model_path = folder / "model.onnx"
    with open(model_path, "wb") as f:
        f.write(onx.SerializeToString())
    write_csv_full(folder / "train.csv", X_train, y_train, regression=regression)
    write_csv_full(folder / "test.csv", X_test, y_test, regression=regression)
    model = check_self_contained(model_path)
    Xt, yt, _ = read_csv_any(folder / "test.csv")
    assert np.array_equal(Xt, np.asarray(X_test, np.float32))
    assert np.array_equal(yt, y_test)
    ref = {
        "name": name,
        "task": "regression" if regression else "classification",
        "source": source,
        "dataset": dataset,
        "n_train": int(len(X_train)),
        "n_test": int(len(X_test)),
        "n_features": int(Xt.shape[1]),
    }
    framework_out = np.asarray(framework_out, np.float64)
    if regression:
        pred = regressor_outputs(model_path, Xt)
        m = regression_metrics(yt, pred[:, 0])
        fw = regression_metrics(yt, framework_out)
        max_diff = float(np.abs(pred[:, 0].astype(np.float64) - framework_out.reshape(-1)).max())
        ref.update({
            "n_outputs": int(pred.shape[1]),
            "input_shape": [int(Xt.shape[1])],
            "input_name": model.graph.input[0].name,
            "output_names": [o.name for o in model.graph.output],
            **m,
            "framework_r2": fw["r2"], "framework_mae": fw["mae"], "framework_rmse": fw["rmse"],
            "max_abs_diff_vs_framework": max_diff,
            "ops": graph_ops(model),
            "opset": opset_map(model),
            "first_scores": [[float(v) for v in row] for row in pred[:N_FIRST]],
            "predictions": [float(v) for v in pred[:, 0]],
        })
        summary = f"r2 {m['r2']:.4f} mae {m['mae']:.3f} rmse {m['rmse']:.3f} (framework r2 {fw['r2']:.4f})"
    else:
        probs, labels = classifier_outputs(model_path, Xt)
        acc = float((labels == yt).mean())
        fw_acc = float((framework_out.argmax(1) == yt).mean())
        max_diff = float(np.abs(probs.astype(np.float64) - framework_out).max())
        ref.update({
            "n_classes": int(probs.shape[1]),
            "input_shape": [int(Xt.shape[1])],
            "input_name": model.graph.input[0].name,
            "output_names": [o.name for o in model.graph.output],
            "onnxruntime_accuracy": acc,
            "framework_accuracy": fw_acc,
            "max_abs_diff_vs_framework": max_diff,
            "ops": graph_ops(model),
            "opset": opset_map(model),
            "first_scores": [[float(v) for v in row] for row in probs[:N_FIRST]],
            "first_labels": [int(v) for v in labels[:N_FIRST]],
            "scores": [[float(v) for v in row] for row in probs],
            "labels": [int(v) for v in labels],
        })
        summary = f"acc {acc:.4f} (framework {fw_acc:.4f})"
    trees = tree_stats(model)
    if trees:
        ref["tree_ensemble"] = trees[0] if len(trees) == 1 else trees
    if extra:
        ref.update(extra)
    with open(folder / "reference.json", "w") as f:
        json.dump(ref, f, indent=2)
        f.write("\n")
    t = ""
    if trees:
        s = trees[0]
        t = (f", trees {s['n_trees']} depth {s['max_depth']} internal {s['internal_nodes']} "
             f"distinct {s['distinct_comparisons']} leaves {s['leaves']}")
    print(f"{name}: onnxruntime {summary}, max |ort - framework| {max_diff:.2e}{t}, "
          f"ops {[o['op_type'] for o in ref['ops']]}")
    return ref


def load_tabular(loader, *, regression: bool):
    d = loader()
    X = d.data.astype(np.float32)  # the ONNX model takes float32; train on exactly those values
    if regression:
        y = d.target.astype(np.float64)
        return train_test_split(X, y, test_size=0.2, random_state=0)  # no stratify for a float target
    return split(X, d.target.astype(np.int64))


def tool_versions() -> dict:
    v = {"sklearn_version": sklearn.__version__, "skl2onnx_version": skl2onnx.__version__,
         "onnxruntime_version": ort.__version__}
    return v


def make_breast_cancer_xgb(out_dir: Path) -> dict:
    seed_everything()
    import onnxmltools
    import xgboost
    from onnxmltools.convert.common.data_types import FloatTensorType
    X_train, X_test, y_train, y_test = load_tabular(load_breast_cancer, regression=False)
    clf = xgboost.XGBClassifier(n_estimators=20, max_depth=3, n_jobs=1, random_state=0)
    clf.fit(X_train, y_train)
    onx = onnxmltools.convert_xgboost(clf, initial_types=[("X", FloatTensorType([None, X_train.shape[1]]))])
    onx.graph.name = "breast_cancer_xgb"  # onnxmltools names the graph with a random uuid; fix it for reproducible files
    return finish_tabular(out_dir, "breast_cancer_xgb", onx, source="onnxmltools.convert_xgboost",
                          dataset="sklearn.datasets.load_breast_cancer", X_train=X_train, y_train=y_train,
                          X_test=X_test, y_test=y_test, regression=False,
                          framework_out=clf.predict_proba(X_test),
                          extra={"xgboost_version": xgboost.__version__,
                                 "onnxmltools_version": onnxmltools.__version__,
                                 "params": {"n_estimators": 20, "max_depth": 3, "objective": "binary:logistic"},
                                 **tool_versions()})


def make_wine_rf(out_dir: Path) -> dict:
    seed_everything()
    from sklearn.ensemble import RandomForestClassifier
    X_train, X_test, y_train, y_test = load_tabular(load_wine, regression=False)
    clf = RandomForestClassifier(n_estimators=10, max_depth=4, random_state=0, n_jobs=1)
    clf.fit(X_train, y_train)
    onx = to_onnx(clf, X_train[:1])  # skl2onnx defaults: ZipMap on
    return finish_tabular(out_dir, "wine_rf", onx, source="skl2onnx", dataset="sklearn.datasets.load_wine",
                          X_train=X_train, y_train=y_train, X_test=X_test, y_test=y_test, regression=False,
                          framework_out=clf.predict_proba(X_test),
                          extra={"params": {"n_estimators": 10, "max_depth": 4}, **tool_versions()})


def make_iris_lgbm(out_dir: Path) -> dict:
    seed_everything()
    import lightgbm
    import onnxmltools
    from onnxmltools.convert.common.data_types import FloatTensorType
    X_train, X_test, y_train, y_test = load_tabular(load_iris, regression=False)
    clf = lightgbm.LGBMClassifier(n_estimators=10, num_leaves=8, random_state=0, n_jobs=1, verbose=-1,
                                  deterministic=True)
    clf.fit(X_train, y_train)
    onx = onnxmltools.convert_lightgbm(clf, initial_types=[("X", FloatTensorType([None, X_train.shape[1]]))])
    onx.graph.name = "iris_lgbm"  # onnxmltools names the graph with a random uuid; fix it for reproducible files
    return finish_tabular(out_dir, "iris_lgbm", onx, source="onnxmltools.convert_lightgbm",
                          dataset="sklearn.datasets.load_iris", X_train=X_train, y_train=y_train,
                          X_test=X_test, y_test=y_test, regression=False,
                          framework_out=clf.predict_proba(X_test),
                          extra={"lightgbm_version": lightgbm.__version__,
                                 "onnxmltools_version": onnxmltools.__version__,
                                 "params": {"n_estimators": 10, "num_leaves": 8, "objective": "multiclass"},
                                 **tool_versions()})


def make_diabetes_linear(out_dir: Path) -> dict:
    seed_everything()
    from sklearn.datasets import load_diabetes
    from sklearn.linear_model import LinearRegression
    X_train, X_test, y_train, y_test = load_tabular(load_diabetes, regression=True)
    reg = LinearRegression().fit(X_train, y_train)
    onx = to_onnx(reg, X_train[:1])
    return finish_tabular(out_dir, "diabetes_linear", onx, source="skl2onnx",
                          dataset="sklearn.datasets.load_diabetes (scaled features)",
                          X_train=X_train, y_train=y_train, X_test=X_test, y_test=y_test, regression=True,
                          framework_out=reg.predict(X_test), extra=tool_versions())


def make_diabetes_gbr(out_dir: Path) -> dict:
    seed_everything()
    from sklearn.datasets import load_diabetes
    from sklearn.ensemble import GradientBoostingRegressor
    X_train, X_test, y_train, y_test = load_tabular(load_diabetes, regression=True)
    reg = GradientBoostingRegressor(n_estimators=30, max_depth=3, random_state=0).fit(X_train, y_train)
    onx = to_onnx(reg, X_train[:1])
    return finish_tabular(out_dir, "diabetes_gbr", onx, source="skl2onnx",
                          dataset="sklearn.datasets.load_diabetes (scaled features)",
                          X_train=X_train, y_train=y_train, X_test=X_test, y_test=y_test, regression=True,
                          framework_out=reg.predict(X_test),
                          extra={"params": {"n_estimators": 30, "max_depth": 3, "learning_rate": 0.1},
                                 **tool_versions()})


# --------------------------------------------------------------------------- main


def main() -> None:
    # skl2onnx's output (e.g. the order of opset_import entries) depends on Python's
    # string hashing; pin it so that every run writes byte-identical files.
    if os.environ.get("PYTHONHASHSEED") != str(SEED):
        os.environ["PYTHONHASHSEED"] = str(SEED)
        os.execv(sys.executable, [sys.executable] + sys.argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: models/zoo)")
    ap.add_argument("--only", default="", help="comma-separated model names (default: all); see --list")
    ap.add_argument("--list", action="store_true", help="print the model names and exit")
    args = ap.parse_args()
    if args.list:
        print("\n".join(MODELS))
        return
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(MODELS)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; known: {list(MODELS)}")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    print(f"torch {torch.__version__}, sklearn {sklearn.__version__}, skl2onnx {skl2onnx.__version__}, "
          f"onnx {onnx.__version__}, onnxruntime {ort.__version__}")
    for name in MODELS:  # always in the table's order, whatever the order given to --only
        if name in names:
            MODELS[name](out)


# Run order. The first six are the original zoo; their outputs do not depend on the
# ones added after them (every maker reseeds).
MODELS = {
    "digits_mlp": make_digits_mlp,
    "digits_cnn": make_digits_cnn,
    "digits_sweep": make_digits_sweep,
    "breast_cancer_logreg": lambda out: make_sklearn(
        out, "breast_cancer_logreg", load_breast_cancer, "sklearn.datasets.load_breast_cancer",
        LogisticRegression(max_iter=5000)),
    "iris_logreg": lambda out: make_sklearn(
        out, "iris_logreg", load_iris, "sklearn.datasets.load_iris", LogisticRegression(max_iter=5000)),
    "wine_mlp": lambda out: make_sklearn(
        out, "wine_mlp", load_wine, "sklearn.datasets.load_wine",
        MLPClassifier(hidden_layer_sizes=(16,), max_iter=3000, random_state=0)),
    "digits_maxpool_cnn": make_digits_maxpool_cnn,
    "digits_resmlp": make_digits_resmlp,
    "digits_qdq_mlp": make_digits_qdq_mlp,
    "digits_qdq_cnn": make_digits_qdq_cnn,
    "breast_cancer_xgb": make_breast_cancer_xgb,
    "wine_rf": make_wine_rf,
    "iris_lgbm": make_iris_lgbm,
    "diabetes_linear": make_diabetes_linear,
    "diabetes_gbr": make_diabetes_gbr,
    "cifar_vgg": make_cifar_vgg,
    "digits_torch_mlp": make_digits_torch_mlp,
    "digits_torch_cnn": make_digits_torch_cnn,
    "digits_torch_conv1d": make_digits_torch_conv1d,
    "digits_torch_lngelu": make_digits_torch_lngelu,
}

if __name__ == "__main__":
    main()
