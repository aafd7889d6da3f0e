#!/usr/bin/env python3
"""Write tiny single-op ONNX fixtures for the importer's attribute coverage.

For every case writes ``models/zoo/fixtures/<case>.onnx`` and ``<case>.json``:

* ``<case>.onnx``: one small graph built with ``onnx.helper``; input ``x`` float32
  ``[batch, *input_shape]`` (``dim_param "batch"``), output ``y`` float32
  ``[batch, *output_shape]``; seeded random float32 weights as initializers.
* ``<case>.json``: ``{"case", "description", "ops", "opset", "input_shape", "output_shape",
  "inputs", "outputs"}``. ``inputs`` are 8 seeded samples uniform in [-2, 2] and
  ``outputs`` what onnxruntime (CPU, graph optimizations disabled, one thread)
  computes for them, each sample flattened row-major, without the batch dimension.
  Every float is the shortest decimal that round-trips to the float32 value
  (same ``fmt`` as train.py), so parsing it as f32 gives the exact value back.

Deterministic: rerunning writes byte-identical files. Each case is seeded with
crc32 of its name, so adding or reordering cases changes no other file.

    python models/training/make_fixtures.py [--out models/zoo/fixtures] [--only case1,case2]

Cases Veil refuses (``REFUSED``) are written as ``refused/<case>.onnx`` only.

Each output is also compared with ``onnx.reference.ReferenceEvaluator`` and the
largest difference is printed (informational; the files hold onnxruntime's values).
"""

from __future__ import annotations

import argparse
import json
import sys
import zlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO_ROOT / "models" / "zoo" / "fixtures"
N_SAMPLES = 8
OPSET = 18
IR_VERSION = 10  # same as the rest of the zoo
MAX_BYTES = 20_000


def fmt(v) -> str:
    """Shortest decimal text that round-trips to this float32 value (no exponent); as in train.py."""
    v = np.float32(v)
    s = np.format_float_positional(v, unique=True, trim="-")
    if np.float32(float(s)) != v:
        raise AssertionError(f"{s!r} does not round-trip to float32 {v!r} via f64")
    return s


# --------------------------------------------------------------------------- case builder


class Case:
    """Collects initializers and nodes for one fixture graph (input ``x``, output ``y``)."""

    def __init__(self, name: str, input_shape, description: str, opset: int = OPSET):
        self.ml_opset = None  # set when the graph uses ai.onnx.ml ops
        self.inputs = None  # fixed samples instead of random ones (tree thresholds need them)
        self.name = name
        self.input_shape = list(input_shape)
        self.description = description
        self.opset = opset
        self.rng = np.random.default_rng(zlib.crc32(name.encode()))
        self.inits: list[onnx.TensorProto] = []
        self.nodes: list[onnx.NodeProto] = []
        self._n = 0

    def weight(self, name: str, shape, scale: float = 0.5) -> str:
        arr = (self.rng.standard_normal(shape) * scale).astype(np.float32)
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def const(self, name: str, value, dtype=np.float32) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def node(self, op: str, inputs, n_out: int = 1, out=None, **attrs):
        if out is None:
            outs = []
            for _ in range(n_out):
                self._n += 1
                outs.append(f"t{self._n}")
        else:
            outs = [out] if isinstance(out, str) else list(out)
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=f"n{len(self.nodes)}_{op}", **attrs))
        return outs[0] if len(outs) == 1 else outs

    def build(self, out_shape=None) -> onnx.ModelProto:
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch"] + self.input_shape)
        y_shape = None if out_shape is None else ["batch"] + list(out_shape)
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)
        graph = helper.make_graph(self.nodes, self.name, [x], [y], initializer=self.inits)
        opsets = [helper.make_opsetid("", self.opset)]
        if self.ml_opset is not None:
            opsets.append(helper.make_opsetid("ai.onnx.ml", self.ml_opset))
        model = helper.make_model(graph, opset_imports=opsets, producer_name="veil make_fixtures.py")
        model.ir_version = IR_VERSION
        return model


# --------------------------------------------------------------------------- cases
# Each function returns a Case whose last node writes "y".


def conv(name, in_shape, w_shape, desc, bias=True, **attrs):
    c = Case(name, in_shape, desc)
    ins = ["x", c.weight("w", w_shape)]
    if bias:
        ins.append(c.weight("b", [w_shape[0]]))
    c.node("Conv", ins, out="y", **attrs)
    return c


def pool(name, op, in_shape, desc, **attrs):
    c = Case(name, in_shape, desc)
    c.node(op, ["x"], out="y", **attrs)
    return c


def case_relu_maxpool():
    c = Case("relu_maxpool", [2, 6, 6], "Relu -> MaxPool kernel 2 stride 2")
    r = c.node("Relu", ["x"])
    c.node("MaxPool", [r], out="y", kernel_shape=[2, 2], strides=[2, 2])
    return c


def case_residual_block():
    c = Case("residual_block", [3, 5, 5], "Conv(3->3,k3,p1) -> Relu -> Conv(3->3,k3,p1) -> Add(x) -> Relu")
    h = c.node("Conv", ["x", c.weight("w1", [3, 3, 3, 3]), c.weight("b1", [3])],
               kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    h = c.node("Relu", [h])
    h = c.node("Conv", [h, c.weight("w2", [3, 3, 3, 3]), c.weight("b2", [3])],
               kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    h = c.node("Add", [h, "x"])
    c.node("Relu", [h], out="y")
    return c


def case_concat_conv():
    c = Case("concat_conv", [2, 5, 5], "Concat(axis=1) of Conv(2->3,k3,p1) and Conv(2->2,k1) on the same input")
    a = c.node("Conv", ["x", c.weight("wa", [3, 2, 3, 3]), c.weight("ba", [3])], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    b = c.node("Conv", ["x", c.weight("wb", [2, 2, 1, 1]), c.weight("bb", [2])], kernel_shape=[1, 1])
    c.node("Concat", [a, b], out="y", axis=1)
    return c


def case_split_add():
    c = Case("split_add", [4, 5, 5], "Split(axis=1, split input [2,2]) -> Add of the two halves")
    a, b = c.node("Split", ["x", c.const("split", [2, 2], np.int64)], n_out=2, axis=1)
    c.node("Add", [a, b], out="y")
    return c


def case_split_num_outputs_mul():
    c = Case("split_num_outputs_mul", [2, 6, 5], "Split(axis=2, num_outputs=2, no split input) -> Mul of the halves")
    a, b = c.node("Split", ["x"], n_out=2, axis=2, num_outputs=2)
    c.node("Mul", [a, b], out="y")
    return c


def case_slice():
    c = Case("slice", [4, 6, 6], "Slice starts [1,0,1] ends [4,6,1000] axes [1,2,3] steps [2,2,2] (end clamped)")
    c.node("Slice", ["x", c.const("starts", [1, 0, 1], np.int64), c.const("ends", [4, 6, 1000], np.int64),
                     c.const("axes", [1, 2, 3], np.int64), c.const("steps", [2, 2, 2], np.int64)], out="y")
    return c


def case_slice_negative():
    c = Case("slice_negative", [2, 6, 6],
             "Slice axes [-1,2] starts [-1,-5] ends [-1000,-1] steps [-1,1]: reverses W, keeps H rows 1..4")
    c.node("Slice", ["x", c.const("starts", [-1, -5], np.int64), c.const("ends", [-1000, -1], np.int64),
                     c.const("axes", [-1, 2], np.int64), c.const("steps", [-1, 1], np.int64)], out="y")
    return c


def case_gather_channels():
    c = Case("gather_channels", [4, 5, 5], "Gather(axis=1) with constant int64 indices [3,0,3]")
    c.node("Gather", ["x", c.const("idx", [3, 0, 3], np.int64)], out="y", axis=1)
    return c


def case_gather_scalar():
    c = Case("gather_scalar", [4, 5, 5], "Gather(axis=1) with a scalar int64 index 2 (drops the channel axis)")
    c.node("Gather", ["x", c.const("idx", 2, np.int64)], out="y", axis=1)
    return c


def case_transpose():
    c = Case("transpose", [2, 3, 4], "Transpose perm [0,3,1,2]")
    c.node("Transpose", ["x"], out="y", perm=[0, 3, 1, 2])
    return c


def case_squeeze_unsqueeze():
    c = Case("squeeze_unsqueeze", [3, 1, 4], "Squeeze(axes [2]) -> Unsqueeze(axes [1,3]); axes are int64 inputs")
    s = c.node("Squeeze", ["x", c.const("sq_axes", [2], np.int64)])
    c.node("Unsqueeze", [s, c.const("unsq_axes", [1, 3], np.int64)], out="y")
    return c


def case_pad_constant():
    c = Case("pad_constant", [2, 4, 4], "Pad mode=constant pads [0,0,1,2, 0,0,2,1] constant_value 0.5")
    c.node("Pad", ["x", c.const("pads", [0, 0, 1, 2, 0, 0, 2, 1], np.int64), c.const("value", 0.5)],
           out="y", mode="constant")
    return c


def case_prelu():
    c = Case("prelu", [3, 4, 4], "PRelu with per-channel slopes [3,1,1]")
    c.node("PRelu", ["x", c.weight("slope", [3, 1, 1])], out="y")
    return c


def case_erf():
    c = Case("erf", [2, 4, 4], "Erf")
    c.node("Erf", ["x"], out="y")
    return c


def case_gelu(approx):
    c = Case(f"gelu_{approx}", [2, 4, 4], f"Gelu approximate={approx!r} (opset 20)", opset=20)
    c.node("Gelu", ["x"], out="y", approximate=approx)
    return c


def case_silu():
    c = Case("silu", [2, 4, 4], "x * Sigmoid(x) (SiLU pattern, x used twice)")
    s = c.node("Sigmoid", ["x"])
    c.node("Mul", ["x", s], out="y")
    return c


def case_mul_two_gemm():
    c = Case("mul_two_gemm", [6], "Mul of Gemm(x, W1[5,6], b1, transB=1) and Gemm(x, W2[6,5], b2, transB=0)")
    a = c.node("Gemm", ["x", c.weight("w1", [5, 6]), c.weight("b1", [5])], transB=1)
    b = c.node("Gemm", ["x", c.weight("w2", [6, 5]), c.weight("b2", [5])])
    c.node("Mul", [a, b], out="y")
    return c


def case_div_const():
    c = Case("div_const", [2, 4, 4], "Div by a scalar constant 0.8")
    c.node("Div", ["x", c.const("d", 0.8)], out="y")
    return c


def case_sub_broadcast():
    c = Case("sub_broadcast", [3, 4, 4], "Sub(x, c) with c f32[3,1,1] (broadcast over H, W)")
    c.node("Sub", ["x", c.weight("c", [3, 1, 1])], out="y")
    return c


def case_matmul_2d():
    c = Case("matmul_2d", [4, 5], "MatMul of a per-sample [T=4, F=5] input with W f32[5,3]")
    c.node("MatMul", ["x", c.weight("w", [5, 3])], out="y")
    return c


def case_reducemean_spatial():
    c = Case("reducemean_spatial", [3, 4, 5], "ReduceMean axes [2,3] (int64 input) keepdims=0")
    c.node("ReduceMean", ["x", c.const("axes", [2, 3], np.int64)], out="y", keepdims=0)
    return c


def case_layernorm(name, in_shape, axis, bias=True, desc=""):
    c = Case(name, in_shape, f"LayerNormalization axis={axis}{'' if bias else ', no bias'} (opset 17) {desc}",
             opset=17)
    norm_shape = in_shape[axis:] if axis >= 0 else in_shape[len(in_shape) + axis:]
    ins = ["x", c.weight("scale", norm_shape, 1.0)]
    if bias:
        ins.append(c.weight("bias", norm_shape))
    c.node("LayerNormalization", ins, out="y", axis=axis, epsilon=1e-3)
    return c


def case_layernorm_decomposed():
    c = Case("layernorm_decomposed", [2, 6],
             "LayerNorm as older exporters write it: ReduceMean, Sub, Pow 2, ReduceMean, Add eps, Sqrt, "
             "Div, Mul, Add (opset 18, axes as an input)", opset=18)
    axes = c.const("axes", [-1], np.int64)
    m = c.node("ReduceMean", ["x", axes])
    d = c.node("Sub", ["x", m])
    sq = c.node("Pow", [d, c.const("two", 2.0)])
    v = c.node("ReduceMean", [sq, axes])
    s = c.node("Sqrt", [c.node("Add", [v, c.const("eps", 1e-3)])])
    n = c.node("Div", [d, s])
    c.node("Add", [c.node("Mul", [n, c.weight("g", [6], 1.0)]), c.weight("b", [6])], out="y")
    return c


def case_globalaveragepool_flatten():
    c = Case("globalaveragepool", [3, 5, 5], "GlobalAveragePool -> Flatten(axis=1)")
    g = c.node("GlobalAveragePool", ["x"])
    c.node("Flatten", [g], out="y", axis=1)
    return c


# --------------------------------------------------------------------------- tree ensembles
# Samples take values on a quarter grid of [-2, 2] and thresholds sit between grid values
# (or on them, for BRANCH_EQ / NEQ), so the fixtures also check the quantized pipeline
# exactly (models/tests/trees.rs): no sample lies within a quantization step of a threshold.

TREE_X = [
    [-2.0, 2.0, 0.5, -0.25],
    [2.0, -2.0, -1.0, 1.5],
    [0.25, 0.75, 1.25, -1.75],
    [-0.75, -0.5, 0.0, 0.5],
    [1.0, 1.0, -1.5, 0.0],
    [-1.25, 0.0, 2.0, -2.0],
    [0.5, -1.25, -0.25, 1.0],
    [1.5, 0.25, 0.75, 0.25],
]


def leaf(*weights):
    return ("leaf", list(weights))


def split(feature, mode, threshold, yes, no):
    return ("node", feature, mode, threshold, yes, no)


def ensemble_attrs(trees, prefix: str, as_tensor: bool = False) -> dict:
    """Flattens nested trees into the TreeEnsemble* node attributes (node ids in DFS order)."""
    a = {k: [] for k in ["nodes_treeids", "nodes_nodeids", "nodes_featureids", "nodes_modes",
                         "nodes_values", "nodes_truenodeids", "nodes_falsenodeids",
                         "nodes_missing_value_tracks_true", "nodes_hitrates"]}
    w = {f"{prefix}_treeids": [], f"{prefix}_nodeids": [], f"{prefix}_ids": [], f"{prefix}_weights": []}
    for t, tree in enumerate(trees):
        counter = [0]

        def visit(n):
            i = counter[0]
            counter[0] += 1
            slot = len(a["nodes_nodeids"])
            for k in a:
                a[k].append(0)
            a["nodes_treeids"][slot] = t
            a["nodes_nodeids"][slot] = i
            a["nodes_hitrates"][slot] = 1.0
            if n[0] == "leaf":
                a["nodes_modes"][slot] = "LEAF"
                a["nodes_values"][slot] = 0.0
                for target, weight in n[1]:
                    w[f"{prefix}_treeids"].append(t)
                    w[f"{prefix}_nodeids"].append(i)
                    w[f"{prefix}_ids"].append(target)
                    w[f"{prefix}_weights"].append(weight)
            else:
                _, f, mode, thr, yes, no = n
                a["nodes_featureids"][slot] = f
                a["nodes_modes"][slot] = mode
                a["nodes_values"][slot] = thr
                a["nodes_truenodeids"][slot] = visit(yes)
                a["nodes_falsenodeids"][slot] = visit(no)
            return i

        visit(tree)
    attrs = {**a, **w}
    if as_tensor:
        attrs["nodes_values_as_tensor"] = numpy_helper.from_array(
            np.asarray(attrs.pop("nodes_values"), np.float32), "nodes_values")
        key = f"{prefix}_weights"
        attrs[f"{key}_as_tensor"] = numpy_helper.from_array(np.asarray(attrs.pop(key), np.float32), key)
    return attrs


def tree_case(name, description, trees, op, out_name="y", ml_opset=1, as_tensor=False, **attrs):
    c = Case(name, [4], description)
    c.ml_opset = ml_opset
    c.inputs = TREE_X
    prefix = "class" if op == "TreeEnsembleClassifier" else "target"
    all_attrs = {**ensemble_attrs(trees, prefix, as_tensor), **attrs}
    outs = ["label", "y"] if op == "TreeEnsembleClassifier" else ["y"]
    c.nodes.append(helper.make_node(op, ["x"], outs, name=f"n0_{op}", domain="ai.onnx.ml", **all_attrs))
    return c


def case_tree_reg_modes():
    # Every branch rule, two targets, AVERAGE, per-target base values.
    # Every leaf weights both targets (as exporters write them): onnxruntime drops a target's
    # base value in a sample where no reached leaf weights it.
    t0 = split(0, "BRANCH_LEQ", 0.125, split(1, "BRANCH_LT", -0.375, leaf((0, 1.0), (1, -2.0)), leaf((0, 2.5), (1, 0.0))),
               split(2, "BRANCH_GTE", 0.875, leaf((1, 4.0), (0, 0.0)), leaf((0, -1.5), (1, 0.5))))
    t1 = split(3, "BRANCH_GT", -0.125, split(0, "BRANCH_EQ", 0.5, leaf((0, 3.0), (1, 0.0)), leaf((0, 0.25), (1, 1.0))),
               split(1, "BRANCH_NEQ", 0.25, leaf((1, -3.0), (0, 0.0)), leaf((0, 7.0), (1, 2.0))))
    return tree_case("tree_reg_modes", "TreeEnsembleRegressor: LEQ, LT, GTE, GT, EQ, NEQ; 2 targets; AVERAGE; base_values",
                     [t0, t1], "TreeEnsembleRegressor", n_targets=2, aggregate_function="AVERAGE",
                     base_values=[0.5, -1.0])


def case_tree_reg_deep_tensor():
    # A 17-deep chain (paths longer than one exact read) plus a stump; values as tensors (ai.onnx.ml 3).
    chain = leaf((0, 9.0))
    for k in range(17):
        f = k % 4
        thr = -1.875 + 0.25 * (k % 16)
        chain = split(f, "BRANCH_LEQ" if k % 2 else "BRANCH_GT", thr, chain, leaf((0, float(k) - 8.0)))
    stump = split(2, "BRANCH_LEQ", -0.625, leaf((0, 0.5)), leaf((0, -0.5)))
    return tree_case("tree_reg_deep_tensor", "TreeEnsembleRegressor: a 17-deep chain and a stump; *_as_tensor attributes",
                     [chain, stump], "TreeEnsembleRegressor", ml_opset=3, as_tensor=True, n_targets=1,
                     base_values=[2.0])


def _clf_trees(n_classes, positive, k=1.0):
    sign = 1.0 if positive else -1.0

    def leaf(*weights):  # noqa: F811 (scaled leaves)
        return ("leaf", [(c, k * v) for c, v in weights])

    t0 = split(0, "BRANCH_LEQ", -0.375, split(1, "BRANCH_LEQ", 0.625, leaf((0, 0.8)), leaf((0, 0.3))),
               split(2, "BRANCH_LEQ", 0.125, leaf((0, 0.6)), leaf((0, 0.1))))
    t1 = split(3, "BRANCH_LT", 0.375, leaf((0, 0.2 * sign)), leaf((0, 0.7)))
    if n_classes == 1:
        return [t0, t1]
    t2 = split(1, "BRANCH_LEQ", -0.875, leaf((1, 0.5), (2, 0.1)), leaf((2, 0.9), (1, 0.3)))
    t3 = split(0, "BRANCH_GT", 0.875, leaf((2, 0.4)), split(2, "BRANCH_LEQ", 1.125, leaf((1, 0.2)), leaf((0, 0.0), (1, 0.6))))
    return [t0, t1, t2, t3]


def case_tree_clf_binary_logistic():
    return tree_case("tree_clf_binary_logistic", "TreeEnsembleClassifier: one score column, mixed signs, LOGISTIC, base value",
                     _clf_trees(1, False), "TreeEnsembleClassifier", classlabels_int64s=[0, 1],
                     post_transform="LOGISTIC", base_values=[-0.25])


def case_tree_clf_binary_positive():
    return tree_case("tree_clf_binary_positive", "TreeEnsembleClassifier: one score column, positive weights, NONE ([1 - s, s])",
                     _clf_trees(1, True), "TreeEnsembleClassifier", classlabels_int64s=[3, 7])


def case_tree_clf_softmax_zero():
    return tree_case("tree_clf_softmax_zero", "TreeEnsembleClassifier: 3 classes, SOFTMAX_ZERO",
                     _clf_trees(3, True), "TreeEnsembleClassifier", classlabels_int64s=[0, 1, 2],
                     post_transform="SOFTMAX_ZERO")


def case_tree_clf_probit_strings():
    return tree_case("tree_clf_probit_strings", "TreeEnsembleClassifier: 3 string classes, PROBIT, base values",
                     _clf_trees(3, True, 0.3), "TreeEnsembleClassifier", classlabels_strings=["a", "b", "c"],
                     post_transform="PROBIT", base_values=[0.05, 0.1, 0.02])


# onnxruntime's binary classifier writes 0 for a class no reached leaf weights (base value or
# not), and one score instead of two when no reached leaf weights class 1: decided per sample.
# These cases keep both static: each class is weighted on every leaf of one tree, or on none
# (class 0 may vary when there is no base value: its sum is then 0 either way).
_T0 = split(0, "BRANCH_LEQ", -0.375, split(1, "BRANCH_LEQ", 0.625, "A", "B"), split(2, "BRANCH_LEQ", 0.125, "C", "D"))
_T1 = split(3, "BRANCH_LT", 0.375, "E", "F")


def _fill(tree, leaves):
    """``tree`` with its leaf names replaced by ``leaves[name]`` (a list of (class, weight))."""
    if isinstance(tree, str):
        return ("leaf", leaves[tree])
    _, f, mode, thr, yes, no = tree
    return ("node", f, mode, thr, _fill(yes, leaves), _fill(no, leaves))


def _binary(**leaves):
    return [_fill(_T0, leaves), _fill(_T1, leaves)]


def case_tree_clf_binary_bv2_strings():
    trees = _binary(A=[(0, 0.5), (1, 0.5)], B=[(0, -0.25), (1, 0.0)], C=[(0, 1.5), (1, 2.0)],
                    D=[(0, 0.75), (1, -1.0)], E=[(0, -0.5), (1, 0.25)], F=[(0, 0.125), (1, 0.5)])
    return tree_case("tree_clf_binary_bv2_strings",
                     "TreeEnsembleClassifier: 2 string classes, both weighted on every leaf, 2 base values, NONE "
                     "([-(s0 + b1), s0 + b1])", trees, "TreeEnsembleClassifier", classlabels_strings=["no", "yes"],
                     base_values=[0.3, -0.2])


def case_tree_clf_binary_class1_logistic():
    trees = _binary(A=[(1, 0.5)], B=[(1, -0.25)], C=[(1, 1.5)], D=[(1, 0.75)], E=[(1, -0.5)], F=[(1, 0.125)])
    return tree_case("tree_clf_binary_class1_logistic",
                     "TreeEnsembleClassifier: only class 1 weighted, 1 base value (dropped: class 0 has no weight), "
                     "LOGISTIC ([0.5, logistic(s1)])", trees, "TreeEnsembleClassifier", classlabels_int64s=[0, 1],
                     post_transform="LOGISTIC", base_values=[0.25])


def case_tree_clf_binary_class0_bv2_softmax():
    trees = _binary(A=[(0, 0.5)], B=[(0, 0.25)], C=[(0, 1.5)], D=[(0, 0.75)], E=[(0, 0.5)], F=[(0, 0.125)])
    return tree_case("tree_clf_binary_class0_bv2_softmax",
                     "TreeEnsembleClassifier: only class 0 weighted, 2 base values, SOFTMAX (softmax [s0 + b0, 0])",
                     trees, "TreeEnsembleClassifier", classlabels_int64s=[2, 9], post_transform="SOFTMAX",
                     base_values=[0.1, 0.4])


def case_tree_clf_binary_mixed_softmax():
    trees = _binary(A=[(0, 0.5)], B=[(0, -0.25)], C=[(0, 1.5)], D=[(0, -0.75)], E=[(0, 0.5)], F=[(0, -0.125)])
    return tree_case("tree_clf_binary_mixed_softmax",
                     "TreeEnsembleClassifier: one score column, mixed signs, SOFTMAX (onnxruntime writes [-s, s] "
                     "without the softmax)", trees, "TreeEnsembleClassifier", classlabels_int64s=[0, 1],
                     post_transform="SOFTMAX")


def case_tree_clf_binary_partial0_tensor():
    trees = _binary(A=[(0, 0.5), (1, 0.25)], B=[(1, -0.25)], C=[(1, 1.5)], D=[(0, -0.75), (1, 0.5)],
                    E=[(1, 0.5)], F=[(0, 0.375), (1, -0.125)])
    return tree_case("tree_clf_binary_partial0_tensor",
                     "TreeEnsembleClassifier: class 1 on every leaf, class 0 on some (no base value), NONE "
                     "([s0, s1]); *_as_tensor attributes", trees, "TreeEnsembleClassifier", ml_opset=3,
                     as_tensor=True, classlabels_int64s=[0, 1])


# Tree tests on computed values (models/tests/trees.rs): a projection with unit weights on
# integer inputs 0..3 is read exactly when the inputs take 2 bits (its sums span 7 integers)
# and refused, naming the tree, at 8 bits; random weights or a ReLU's output are refused.
PROJ_X = [[0, 0, 0, 0], [1, 2, 3, 0], [3, 3, 3, 3], [2, 0, 1, 3], [0, 3, 0, 1], [1, 1, 2, 2],
          [3, 0, 2, 1], [2, 2, 0, 0]]


def _proj_tree(name, description, w, relu=False):
    c = Case(name, [4], description)
    c.ml_opset = 1
    c.inputs = PROJ_X
    h = c.node("MatMul", ["x", c.const("w", w)])
    if relu:
        h = c.node("Relu", [h])
    trees = [split(0, "BRANCH_LEQ", 2.5, split(1, "BRANCH_GT", 3.5, leaf((0, 1.0)), leaf((0, -0.5))),
                   leaf((0, 2.0))),
             split(1, "BRANCH_LT", 1.5, leaf((0, 0.25)), leaf((0, 0.75)))]
    c.nodes.append(helper.make_node("TreeEnsembleRegressor", [h], ["y"], name="n9_TreeEnsembleRegressor",
                                    domain="ai.onnx.ml", **ensemble_attrs(trees, "target"), n_targets=1))
    return c


def case_proj_tree_unit():
    w = [[1, 0], [1, 1], [0, 1], [0, 0]]
    return _proj_tree("proj_tree_unit", "MatMul [[1,0],[1,1],[0,1],[0,0]] then TreeEnsembleRegressor on the sums",
                      np.asarray(w, np.float32))


def case_proj_tree_random():
    c = np.random.default_rng(zlib.crc32(b"proj_tree_random"))
    w = (c.standard_normal([4, 2]) * 0.5).astype(np.float32)
    return _proj_tree("proj_tree_random", "MatMul (random [4,2]) then TreeEnsembleRegressor", w)


def case_relu_tree():
    w = [[1, 0], [1, 1], [0, 1], [0, -1]]
    return _proj_tree("relu_tree", "MatMul, Relu, then TreeEnsembleRegressor on the Relu's output",
                      np.asarray(w, np.float32), relu=True)


# Refused at import (models/tests/trees.rs checks each error): written to refused/ without outputs.
def refused_tree_clf_partial_class1():
    trees = _binary(A=[(0, 0.5)], B=[(0, -0.25), (1, 0.5)], C=[(0, 1.5)], D=[(0, 0.75)], E=[(0, -0.5)],
                    F=[(0, 0.125)])
    return tree_case("tree_clf_partial_class1", "class 1 weighted on some leaves only", trees,
                     "TreeEnsembleClassifier", classlabels_int64s=[0, 1])


def refused_tree_clf_partial0_base():
    trees = _binary(A=[(0, 0.5), (1, 0.25)], B=[(1, -0.25)], C=[(1, 1.5)], D=[(0, -0.75), (1, 0.5)],
                    E=[(1, 0.5)], F=[(0, 0.375), (1, -0.125)])
    return tree_case("tree_clf_partial0_base", "class 0 weighted on some leaves only, with base values", trees,
                     "TreeEnsembleClassifier", classlabels_int64s=[0, 1], base_values=[0.1, 0.2])


def refused_tree_clf_binary_probit():
    trees = _binary(A=[(0, 0.5)], B=[(0, 0.25)], C=[(0, 0.125)], D=[(0, 0.75)], E=[(0, 0.0)], F=[(0, 0.125)])
    return tree_case("tree_clf_binary_probit", "one score column, PROBIT (onnxruntime writes one of two scores)",
                     trees, "TreeEnsembleClassifier", classlabels_int64s=[0, 1], post_transform="PROBIT")


def refused_tree_clf_one_label():
    trees = _binary(A=[(0, 0.5)], B=[(0, 0.25)], C=[(0, 1.5)], D=[(0, 0.75)], E=[(0, 0.5)], F=[(0, 0.125)])
    return tree_case("tree_clf_one_label", "a single string class label", trees, "TreeEnsembleClassifier",
                     classlabels_strings=["only"])


REFUSED = {
    "tree_clf_partial_class1": refused_tree_clf_partial_class1,
    "tree_clf_partial0_base": refused_tree_clf_partial0_base,
    "tree_clf_binary_probit": refused_tree_clf_binary_probit,
    "tree_clf_one_label": refused_tree_clf_one_label,
}


CASES = {
    "layernorm_last": lambda: case_layernorm("layernorm_last", [3, 8], -1),
    "layernorm_axis1_nobias": lambda: case_layernorm("layernorm_axis1_nobias", [2, 3, 4], 1, bias=False,
                                                     desc="(normalizes C, H, W together)"),
    "layernorm_axis2": lambda: case_layernorm("layernorm_axis2", [2, 3, 4], 2),
    "layernorm_decomposed": case_layernorm_decomposed,
    "conv_pads_asym": lambda: conv("conv_pads_asym", [2, 5, 5], [3, 2, 3, 3],
                                   "Conv k3 pads [1,2,0,1] (top,left,bottom,right)",
                                   kernel_shape=[3, 3], pads=[1, 2, 0, 1]),
    "conv_strides2": lambda: conv("conv_strides2", [2, 6, 6], [3, 2, 3, 3], "Conv k3 strides 2 pads 1",
                                  kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
    "conv_dilations2": lambda: conv("conv_dilations2", [2, 6, 6], [3, 2, 3, 3],
                                    "Conv k3 dilations 2 pads 1, no bias input", bias=False,
                                    kernel_shape=[3, 3], dilations=[2, 2], pads=[1, 1, 1, 1]),
    "conv_group2": lambda: conv("conv_group2", [4, 5, 5], [4, 2, 3, 3], "Conv group=2 (4->4 channels) pads 1",
                                kernel_shape=[3, 3], group=2, pads=[1, 1, 1, 1]),
    "conv_depthwise": lambda: conv("conv_depthwise", [3, 5, 5], [3, 1, 3, 3], "Conv depthwise group=C=3 pads 1",
                                   kernel_shape=[3, 3], group=3, pads=[1, 1, 1, 1]),
    "conv_depthwise_mult2": lambda: conv("conv_depthwise_mult2", [3, 5, 5], [6, 1, 3, 3],
                                         "Conv group=3, 3->6 channels (depth multiplier 2), no pads",
                                         kernel_shape=[3, 3], group=3),
    "conv_same_upper": lambda: conv("conv_same_upper", [2, 6, 6], [3, 2, 3, 3],
                                    "Conv k3 strides 2 auto_pad SAME_UPPER (total pad 1, at the end)",
                                    kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER"),
    "conv_same_lower": lambda: conv("conv_same_lower", [2, 6, 6], [3, 2, 3, 3],
                                    "Conv k3 strides 2 auto_pad SAME_LOWER (total pad 1, at the start)",
                                    kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_LOWER"),
    "conv_same_upper_k2x4": lambda: conv("conv_same_upper_k2x4", [2, 5, 5], [2, 2, 2, 4],
                                         "Conv kernel [2,4] stride 1 auto_pad SAME_UPPER (pads H 0/1, W 1/2)",
                                         kernel_shape=[2, 4], auto_pad="SAME_UPPER"),
    "conv1d": lambda: conv("conv1d", [2, 9], [3, 2, 3], "Conv 1-D k3 pads [1,2] strides 2",
                           kernel_shape=[3], pads=[1, 2], strides=[2]),
    "avgpool_count_include_pad": lambda: pool("avgpool_count_include_pad", "AveragePool", [2, 5, 5],
                                              "AveragePool k3 s2 pads 1 count_include_pad=1",
                                              kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
                                              count_include_pad=1),
    "avgpool_exclude_pad": lambda: pool("avgpool_exclude_pad", "AveragePool", [2, 5, 5],
                                        "AveragePool k3 s2 pads 1 count_include_pad=0 (default)",
                                        kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
    "avgpool_ceil": lambda: pool("avgpool_ceil", "AveragePool", [2, 6, 6],
                                 "AveragePool k3 s2 ceil_mode=1 (3x3 out; floor would give 2x2)",
                                 kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
    "maxpool_k3s2p1": lambda: pool("maxpool_k3s2p1", "MaxPool", [2, 6, 6], "MaxPool k3 s2 pads 1",
                                   kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
    "maxpool_ceil": lambda: pool("maxpool_ceil", "MaxPool", [2, 5, 5],
                                 "MaxPool k2 s2 ceil_mode=1 (3x3 out; floor would give 2x2)",
                                 kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1),
    "maxpool_dilations2": lambda: pool("maxpool_dilations2", "MaxPool", [2, 6, 6], "MaxPool k2 dilations 2 stride 1",
                                       kernel_shape=[2, 2], dilations=[2, 2]),
    "maxpool_1d": lambda: pool("maxpool_1d", "MaxPool", [2, 9], "MaxPool 1-D k3 s2 pads 1",
                               kernel_shape=[3], strides=[2], pads=[1, 1]),
    "globalmaxpool": lambda: pool("globalmaxpool", "GlobalMaxPool", [3, 5, 5], "GlobalMaxPool (output [3,1,1])"),
    "globalaveragepool": case_globalaveragepool_flatten,
    "relu_maxpool": case_relu_maxpool,
    "residual_block": case_residual_block,
    "concat_conv": case_concat_conv,
    "split_add": case_split_add,
    "split_num_outputs_mul": case_split_num_outputs_mul,
    "slice": case_slice,
    "slice_negative": case_slice_negative,
    "gather_channels": case_gather_channels,
    "gather_scalar": case_gather_scalar,
    "transpose": case_transpose,
    "squeeze_unsqueeze": case_squeeze_unsqueeze,
    "pad_constant": case_pad_constant,
    "prelu": case_prelu,
    "erf": case_erf,
    "gelu_none": lambda: case_gelu("none"),
    "gelu_tanh": lambda: case_gelu("tanh"),
    "silu": case_silu,
    "mul_two_gemm": case_mul_two_gemm,
    "div_const": case_div_const,
    "sub_broadcast": case_sub_broadcast,
    "matmul_2d": case_matmul_2d,
    "reducemean_spatial": case_reducemean_spatial,
    "tree_reg_modes": case_tree_reg_modes,
    "tree_reg_deep_tensor": case_tree_reg_deep_tensor,
    "tree_clf_binary_logistic": case_tree_clf_binary_logistic,
    "tree_clf_binary_positive": case_tree_clf_binary_positive,
    "tree_clf_softmax_zero": case_tree_clf_softmax_zero,
    "tree_clf_probit_strings": case_tree_clf_probit_strings,
    "proj_tree_unit": case_proj_tree_unit,
    "proj_tree_random": case_proj_tree_random,
    "relu_tree": case_relu_tree,
    "tree_clf_binary_bv2_strings": case_tree_clf_binary_bv2_strings,
    "tree_clf_binary_class1_logistic": case_tree_clf_binary_class1_logistic,
    "tree_clf_binary_class0_bv2_softmax": case_tree_clf_binary_class0_bv2_softmax,
    "tree_clf_binary_mixed_softmax": case_tree_clf_binary_mixed_softmax,
    "tree_clf_binary_partial0_tensor": case_tree_clf_binary_partial0_tensor,
}


# --------------------------------------------------------------------------- run and write


def run_ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    (y,) = sess.run(["y"], {"x": x})
    return np.asarray(y)


def rows_json(a: np.ndarray) -> str:
    return "[\n" + ",\n".join("    [" + ", ".join(fmt(v) for v in row) + "]" for row in a) + "\n  ]"


def make_case(out_dir: Path, c: Case) -> dict:
    if c.inputs is not None:
        x = np.asarray(c.inputs, np.float32).reshape([N_SAMPLES] + c.input_shape)
    else:
        x = c.rng.uniform(-2.0, 2.0, size=[N_SAMPLES] + c.input_shape).astype(np.float32)
    y = run_ort(c.build(), x)  # first pass: learn the output shape
    if y.dtype != np.float32 or y.shape[0] != N_SAMPLES:
        raise RuntimeError(f"{c.name}: unexpected output {y.dtype}{list(y.shape)}")
    out_shape = [int(d) for d in y.shape[1:]]
    model = c.build(out_shape)
    onnx.checker.check_model(model, full_check=True)
    y2 = run_ort(model, x)
    assert np.array_equal(y, y2, equal_nan=True)
    if not np.all(np.isfinite(y)):
        raise RuntimeError(f"{c.name}: non-finite output")
    try:
        ref = np.asarray(ReferenceEvaluator(model).run(None, {"x": x})[-1], np.float32)
        ref_diff = float(np.abs(ref.astype(np.float64) - y).max())
    except Exception:  # the reference evaluator lacks some ai.onnx.ml attributes
        ref_diff = float("nan")

    onnx_path = out_dir / f"{c.name}.onnx"
    onnx_path.write_bytes(model.SerializeToString())
    ops = [n.op_type for n in model.graph.node]
    head = {
        "case": c.name,
        "description": c.description,
        "ops": ops,
        "opset": c.opset,
        "input_shape": c.input_shape,
        "output_shape": out_shape,
    }
    text = "{\n" + "".join(f"  {json.dumps(k)}: {json.dumps(v)},\n" for k, v in head.items())
    text += f'  "inputs": {rows_json(x.reshape(N_SAMPLES, -1))},\n'
    text += f'  "outputs": {rows_json(y.reshape(N_SAMPLES, -1))}\n}}\n'
    parsed = json.loads(text)  # sanity: valid JSON that reads back to the exact float32 values
    assert np.array_equal(np.asarray(parsed["inputs"], np.float64).astype(np.float32), x.reshape(N_SAMPLES, -1))
    assert np.array_equal(np.asarray(parsed["outputs"], np.float64).astype(np.float32), y.reshape(N_SAMPLES, -1))
    json_path = out_dir / f"{c.name}.json"
    json_path.write_text(text)
    sizes = (onnx_path.stat().st_size, json_path.stat().st_size)
    if max(sizes) > MAX_BYTES:
        raise RuntimeError(f"{c.name}: file over {MAX_BYTES} bytes: {sizes}")
    print(f"{c.name:28s} {' '.join(ops):40s} in {c.input_shape} out {out_shape} "
          f"| onnx {sizes[0]} B json {sizes[1]} B | max |ort - onnx.reference| {ref_diff:.2e}")
    return {"case": c.name, "ops": ops, "ref_diff": ref_diff}


def make_refused(out_dir: Path, c: Case) -> None:
    """Writes only ``refused/<case>.onnx``: Veil refuses it, and onnxruntime's outputs depend per
    sample on which classes the reached leaves weight (or leave a score unwritten)."""
    model = c.build([2])
    onnx.checker.check_model(model, full_check=True)
    path = out_dir / "refused" / f"{c.name}.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    print(f"{c.name:28s} refused/ | onnx {path.stat().st_size} B")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--only", default="", help="comma-separated case names (default: all)")
    args = ap.parse_args()
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(CASES) + list(REFUSED)
    unknown = [n for n in names if n not in CASES and n not in REFUSED]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; known: {list(CASES) + list(REFUSED)}")
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"onnx {onnx.__version__}, onnxruntime {ort.__version__}, numpy {np.__version__}")
    for name in names:
        c = (CASES.get(name) or REFUSED[name])()
        assert c.name == name, (c.name, name)
        if name in REFUSED:
            make_refused(args.out, c)
        else:
            make_case(args.out, c)


if __name__ == "__main__":
    sys.exit(main())
