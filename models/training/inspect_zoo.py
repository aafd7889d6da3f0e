#!/usr/bin/env python3
"""Print and check every model in models/zoo.

For each ``<zoo>/<name>/``: print the ONNX graph (opsets, inputs/outputs, initializer
shapes, nodes with attributes), then rerun model.onnx with onnxruntime on test.csv and
check it against reference.json (accuracy, first_scores, first_labels, ops, opset).

    python models/training/inspect_zoo.py [--zoo models/zoo] [--quiet]

Exits non-zero if any check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train import DEFAULT_OUT, check_self_contained, graph_ops, opset_map, read_csv, run_ort  # noqa: E402


def type_str(t: onnx.TypeProto) -> str:
    kind = t.WhichOneof("value")
    if kind == "tensor_type":
        tt = t.tensor_type
        dims = [d.dim_param or (str(d.dim_value) if d.HasField("dim_value") else "?") for d in tt.shape.dim]
        return f"tensor({onnx.TensorProto.DataType.Name(tt.elem_type).lower()})[{','.join(dims)}]"
    if kind == "sequence_type":
        return f"seq({type_str(t.sequence_type.elem_type)})"
    if kind == "map_type":
        mt = t.map_type
        return f"map({onnx.TensorProto.DataType.Name(mt.key_type).lower()},{type_str(mt.value_type)})"
    return str(kind)


def attr_str(a: onnx.AttributeProto) -> str:
    v = helper.get_attribute_value(a)
    if isinstance(v, bytes):
        v = v.decode()
    elif isinstance(v, list):
        v = [x.decode() if isinstance(x, bytes) else x for x in v]
        if len(v) > 8:
            v = f"[{len(v)} values: {v[:4]} ...]"
    elif isinstance(v, onnx.TensorProto):
        arr = numpy_helper.to_array(v)
        v = f"tensor {arr.dtype}{list(arr.shape)} {arr.ravel()[:6].tolist()}"
    return f"{a.name}={v}"


def print_graph(model: onnx.ModelProto) -> None:
    g = model.graph
    print(f"  ir_version {model.ir_version}, producer {model.producer_name} {model.producer_version}")
    print(f"  opset_import {opset_map(model)}")
    for i in g.input:
        print(f"  input  {i.name}: {type_str(i.type)}")
    for o in g.output:
        print(f"  output {o.name}: {type_str(o.type)}")
    for t in g.initializer:
        arr = numpy_helper.to_array(t)
        print(f"  init   {t.name}: {arr.dtype}{list(arr.shape)}"
              + (f" = {arr.ravel().tolist()}" if arr.size <= 4 else ""))
    for n in g.node:
        dom = n.domain or "ai.onnx"
        print(f"  node   {n.name or '-'}: {dom}::{n.op_type}({', '.join(n.input)}) -> ({', '.join(n.output)})")
        for a in n.attribute:
            print(f"           {attr_str(a)}")


def check(folder: Path, quiet: bool) -> list[str]:
    errors = []
    ref = json.loads((folder / "reference.json").read_text())
    model = check_self_contained(folder / "model.onnx")
    if not quiet:
        print(f"== {folder.name} ({(folder / 'model.onnx').stat().st_size} bytes)")
        print_graph(model)
    X, y = read_csv(folder / "test.csv")
    if ref.get("task") == "regression":
        return check_regressor(folder, ref, model, X, y)
    Xtr, ytr = read_csv(folder / "train.csv")
    if (len(Xtr), len(X), X.shape[1]) != (ref["n_train"], ref["n_test"], ref["n_features"]):
        errors.append("csv sizes differ from reference.json")
    scores, labels = run_ort(folder / "model.onnx", X, ref["input_shape"])
    acc = float((labels == y).mean())
    if acc != ref["onnxruntime_accuracy"]:
        errors.append(f"accuracy {acc} != {ref['onnxruntime_accuracy']}")
    if labels[:len(ref["first_labels"])].tolist() != ref["first_labels"]:
        errors.append("first_labels differ")
    first = np.array(ref["first_scores"], dtype=np.float32)
    if not np.allclose(scores[:len(first)], first, rtol=1e-5, atol=1e-6):
        errors.append("first_scores differ")
    if graph_ops(model) != ref["ops"]:
        errors.append("ops differ")
    if opset_map(model) != ref["opset"]:
        errors.append("opset differs")
    print(f"   {folder.name}: onnxruntime acc {acc:.4f} (reference {ref['onnxruntime_accuracy']:.4f}, "
          f"framework {ref['framework_accuracy']:.4f}) {'OK' if not errors else 'FAIL: ' + '; '.join(errors)}")
    return errors


def check_regressor(folder: Path, ref: dict, model: onnx.ModelProto, X, y) -> list[str]:
    import onnxruntime as ort

    errors = []
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # the references were recorded with one thread
    sess = ort.InferenceSession(str(folder / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    pred = sess.run(None, {sess.get_inputs()[0].name: np.asarray(X, dtype=np.float32)})[0]
    pred = np.asarray(pred, dtype=np.float64).reshape(len(X), -1)
    want = np.asarray(ref["predictions"], dtype=np.float64).reshape(len(X), -1)
    if not np.allclose(pred, want, rtol=1e-6, atol=1e-5):
        errors.append("predictions differ")
    y = np.asarray(y, dtype=np.float64).reshape(len(X), -1)
    r2 = float(1 - ((pred - y) ** 2).sum() / ((y - y.mean(axis=0)) ** 2).sum())
    if abs(r2 - ref["r2"]) > 1e-6:
        errors.append(f"r2 {r2} != {ref['r2']}")
    if graph_ops(model) != ref["ops"]:
        errors.append("ops differ")
    print(f"   {folder.name}: onnxruntime r2 {r2:.4f} (reference {ref['r2']:.4f}, "
          f"framework {ref['framework_r2']:.4f}) {'OK' if not errors else 'FAIL: ' + '; '.join(errors)}")
    return errors


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--zoo", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    failed = False
    for folder in sorted(p for p in args.zoo.iterdir() if (p / "model.onnx").exists()):
        failed |= bool(check(folder, args.quiet))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
