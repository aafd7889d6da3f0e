//! The op mapping, one module per op family: what each supported ONNX node computes, on
//! constants (folded) and on computed tensors (symbolically).

mod arith;
mod elementwise;
mod linear;
mod ml;
mod norm;
mod pool;
mod qdq;
mod shape;
mod trees;

use super::symbolic::{DynTensor, GraphBuilder};
use super::{NodeEffect, SUPPORTED_OPS, Tensor, Value, pb};
use crate::error::{ModelError, Result};
use crate::graph::TailOp;

pub(crate) struct NodeCtx<'a> {
    pub node: &'a pb::NodeProto,
    pub name: &'a str,
    /// ONNX element type of each constant input, where known (QDQ needs int8 vs uint8).
    pub input_types: Vec<Option<i32>>,
}

impl NodeCtx<'_> {
    pub fn unsupported(&self, reason: impl Into<String>) -> ModelError {
        ModelError::Unsupported {
            node: self.name.to_string(),
            op_type: self.op_label(),
            reason: reason.into(),
            supported: SUPPORTED_OPS,
        }
    }

    fn op_label(&self) -> String {
        match self.node.domain.as_str() {
            "" | "ai.onnx" => self.node.op_type.clone(),
            d => format!("{d}.{}", self.node.op_type),
        }
    }

    fn attr(&self, name: &str) -> Option<&pb::AttributeProto> {
        self.node.attribute.iter().find(|a| a.name == name)
    }

    fn attr_i(&self, name: &str, default: i64) -> i64 {
        self.attr(name).map_or(default, |a| a.i)
    }

    fn attr_f(&self, name: &str, default: f64) -> f64 {
        self.attr(name).map_or(default, |a| a.f as f64)
    }

    fn attr_ints(&self, name: &str) -> Option<&[i64]> {
        self.attr(name).map(|a| a.ints.as_slice())
    }

    fn attr_floats(&self, name: &str) -> Option<&[f32]> {
        self.attr(name).map(|a| a.floats.as_slice())
    }

    fn attr_str(&self, name: &str) -> Option<String> {
        self.attr(name)
            .map(|a| String::from_utf8_lossy(&a.s).into_owned())
    }

    /// Fails when the node sets an attribute to something other than its inert default.
    fn require_attr_i(&self, name: &str, allowed: &[i64], default: i64) -> Result<()> {
        let v = self.attr_i(name, default);
        if allowed.contains(&v) {
            Ok(())
        } else {
            Err(self.unsupported(format!("attribute {name}={v} (supported: {allowed:?})")))
        }
    }

    fn is_ml(&self) -> bool {
        self.node.domain == "ai.onnx.ml"
    }

    fn is_default_domain(&self) -> bool {
        matches!(self.node.domain.as_str(), "" | "ai.onnx")
    }
}

/// Reads a `Constant` node's value.
pub(crate) fn constant(ctx: &NodeCtx) -> Result<Tensor> {
    if let Some(a) = ctx.attr("value")
        && let Some(t) = &a.t
    {
        return Tensor::from_proto(t);
    }
    if let Some(a) = ctx.attr("value_float") {
        return Ok(Tensor::scalar(a.f as f64));
    }
    if let Some(a) = ctx.attr("value_floats") {
        return Ok(Tensor::vector(a.floats.iter().map(|&v| v as f64).collect()));
    }
    if let Some(a) = ctx.attr("value_int") {
        return Ok(Tensor::scalar(a.i as f64));
    }
    if let Some(a) = ctx.attr("value_ints") {
        return Ok(Tensor::vector(a.ints.iter().map(|&v| v as f64).collect()));
    }
    Err(ctx.unsupported("Constant without a tensor, float(s) or int(s) value"))
}

/// Ops that only turn scores into probabilities or a label, and may follow the tail.
pub(crate) fn is_tail_op(node: &pb::NodeProto) -> bool {
    matches!(
        node.op_type.as_str(),
        "Softmax"
            | "LogSoftmax"
            | "ArgMax"
            | "Cast"
            | "Identity"
            | "ZipMap"
            | "Normalizer"
            | "ArrayFeatureExtractor"
            | "Flatten"
            | "Reshape"
            | "Squeeze"
            | "Unsqueeze"
    )
}

/// The clear-text ops a tail node adds when it reads the scores themselves.
pub(crate) fn tail_ops_of(ctx: &NodeCtx) -> Vec<TailOp> {
    match ctx.node.op_type.as_str() {
        "Softmax" => vec![TailOp::Softmax],
        "LogSoftmax" => vec![
            TailOp::Softmax,
            TailOp::Activation(crate::graph::Activation::Log),
        ],
        _ => vec![],
    }
}

/// The inputs of one node, as the op families read them.
pub(crate) struct Inputs<'a>(&'a [Option<Value>]);

impl Inputs<'_> {
    fn get(&self, i: usize) -> Option<&Value> {
        self.0.get(i).and_then(|v| v.as_ref())
    }

    fn konst(&self, ctx: &NodeCtx, i: usize, what: &str) -> Result<&Tensor> {
        match self.get(i) {
            Some(Value::Const(t)) => Ok(t),
            _ => Err(ctx.unsupported(format!("{what} (input {i}) must be a constant"))),
        }
    }

    fn opt_konst(&self, ctx: &NodeCtx, i: usize, what: &str) -> Result<Option<&Tensor>> {
        match self.get(i) {
            None => Ok(None),
            Some(Value::Const(t)) => Ok(Some(t)),
            Some(_) => Err(ctx.unsupported(format!("{what} (input {i}) must be a constant"))),
        }
    }

    fn dynamic(&self, ctx: &NodeCtx, i: usize) -> Result<&DynTensor> {
        match self.get(i) {
            Some(Value::Dyn(t)) => Ok(t),
            _ => Err(ctx.unsupported(format!("input {i} must be computed from the model input"))),
        }
    }

    fn any_dynamic(&self) -> bool {
        self.0.iter().flatten().any(|v| matches!(v, Value::Dyn(_)))
    }
}

fn one(v: Value) -> Result<NodeEffect> {
    Ok(NodeEffect::Values(vec![v]))
}

/// Maps one node.
pub(crate) fn map_node(
    ctx: &NodeCtx,
    b: &mut GraphBuilder,
    inputs: &[Option<Value>],
) -> Result<NodeEffect> {
    let op = ctx.node.op_type.as_str();
    let inputs = Inputs(inputs);
    if op == "Constant" && ctx.is_default_domain() {
        return one(Value::Const(constant(ctx)?));
    }
    if ctx.is_ml() {
        return ml::map(ctx, b, &inputs);
    }
    if !ctx.is_default_domain() {
        return Err(ctx.unsupported(format!("unknown op domain '{}'", ctx.node.domain)));
    }
    if op != "DequantizeLinear"
        && inputs
            .0
            .iter()
            .flatten()
            .any(|v| matches!(v, Value::Quantized(..)))
    {
        return Err(ctx.unsupported("reads a QuantizeLinear output (only DequantizeLinear may)"));
    }
    match op {
        "Identity" | "Dropout" | "Cast" | "Flatten" | "Reshape" | "Squeeze" | "Unsqueeze"
        | "Transpose" | "Concat" | "Split" | "Slice" | "Gather" | "Pad" | "Shape" | "Expand"
        | "ConstantOfShape" => shape::map(ctx, &inputs).map(NodeEffect::Values),
        "Add" | "Sub" | "Mul" | "Div" | "Sum" | "Neg" => arith::map(ctx, b, &inputs).and_then(one),
        "Gemm" | "MatMul" | "Conv" | "AveragePool" | "GlobalAveragePool" | "BatchNormalization"
        | "ReduceMean" | "ReduceSum" => {
            linear::map(ctx, &inputs).map(|t| NodeEffect::Values(vec![Value::Dyn(t)]))
        }
        "MaxPool" | "GlobalMaxPool" => {
            pool::max_pool(ctx, b, &inputs).map(|t| NodeEffect::Values(vec![Value::Dyn(t)]))
        }
        "QuantizeLinear" | "DequantizeLinear" => qdq::map(ctx, b, &inputs).and_then(one),
        "LayerNormalization" => norm::layer_norm(ctx, b, &inputs).map(NodeEffect::Values),
        "Softmax" | "LogSoftmax" | "ArgMax" => {
            let x = inputs.dynamic(ctx, 0)?;
            let n = x.data.len();
            let last = *x.dims.last().unwrap_or(&1);
            let axis = ctx.attr_i("axis", -1);
            if last != n || !(axis == -1 || axis as usize + 1 == x.dims.len()) {
                return Err(ctx.unsupported(format!(
                    "{op} over anything but the last axis of a flat score vector (shape {:?})",
                    x.dims
                )));
            }
            Ok(NodeEffect::StartTail {
                scores: x.clone(),
                ops: tail_ops_of(ctx),
                class_labels: None,
            })
        }
        _ => elementwise::map(ctx, b, &inputs).and_then(one),
    }
}
