//! ONNX import: decodes a model file and maps its nodes onto the float IR ([`FloatModel`]).
//!
//! Graphs must be a chain (each node reads the previous node's activation); constants come
//! from initializers or `Constant` nodes. Everything after the last linear op that only turns
//! scores into probabilities or a label (Softmax, ArgMax, Cast, ZipMap, ...) becomes the tail
//! that the client computes in the clear.

mod ops;
mod tensor;

use std::collections::HashMap;

use prost::Message;

use crate::error::{ModelError, Result};
use crate::ir::{Activation, Affine, FloatModel, TailOp};
pub use tensor::Tensor;

/// Code generated from `proto/onnx_subset.proto`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
}

/// Largest ONNX file the importer reads; the models Veil can run under FHE are far smaller.
pub const MAX_ONNX_BYTES: usize = 256 << 20;

/// Op types the importer knows, listed in errors.
pub const SUPPORTED_OPS: &str = "Gemm, MatMul, Add, Sub, Mul, Div (by a constant), Conv (2-D), \
AveragePool, GlobalAveragePool, BatchNormalization, Flatten, Reshape, Identity, Dropout, Relu, \
Sigmoid, Tanh, LeakyRelu, Elu, Selu, Softplus, Softsign, HardSigmoid, HardSwish, Clip, Abs, Neg, \
Exp, Constant, Cast; tail ops Softmax, ArgMax, ZipMap, Normalizer; ai.onnx.ml Scaler and \
LinearClassifier";

/// Reads and imports an ONNX file.
pub fn import_file(path: &std::path::Path) -> Result<FloatModel> {
    let meta = std::fs::metadata(path)
        .map_err(|e| ModelError::io(format!("reading {}", path.display()), e))?;
    if meta.len() > MAX_ONNX_BYTES as u64 {
        return Err(ModelError::InvalidOnnx(format!(
            "{} is {} bytes, more than the {} byte limit",
            path.display(),
            meta.len(),
            MAX_ONNX_BYTES
        )));
    }
    let bytes = std::fs::read(path)
        .map_err(|e| ModelError::io(format!("reading {}", path.display()), e))?;
    import_bytes(&bytes)
}

/// Imports an ONNX model from its protobuf bytes.
pub fn import_bytes(bytes: &[u8]) -> Result<FloatModel> {
    if bytes.len() > MAX_ONNX_BYTES {
        return Err(ModelError::InvalidOnnx(format!(
            "{} bytes, more than the {MAX_ONNX_BYTES} byte limit",
            bytes.len()
        )));
    }
    let model = pb::ModelProto::decode(bytes)
        .map_err(|e| ModelError::InvalidOnnx(format!("protobuf decoding failed ({e})")))?;
    let graph = model
        .graph
        .as_ref()
        .filter(|g| !g.node.is_empty())
        .ok_or_else(|| ModelError::InvalidOnnx("the file holds no graph with nodes".into()))?;
    GraphWalker::new(graph)?.walk(graph)
}

/// A named value in the graph.
#[derive(Clone, Debug)]
enum Value {
    Const(Tensor),
    /// The model's activation, at a given step of the chain.
    Main(usize),
    /// Derived from the scores by a tail op; ignored under FHE.
    Tail,
}

/// Walks the nodes in order, building the chain of affine maps and activations.
struct GraphWalker {
    values: HashMap<String, Value>,
    /// Shape of the current activation, without the batch dimension.
    shape: Vec<usize>,
    main_step: usize,
    affines: Vec<Affine>,
    acts: Vec<Vec<Activation>>,
    cur_affine: Option<Affine>,
    cur_acts: Vec<Activation>,
    tail: Vec<TailOp>,
    tail_started: bool,
    class_labels: Option<Vec<i64>>,
    input_shape: Vec<usize>,
}

/// What one node does to the chain.
pub(crate) enum NodeEffect {
    /// A linear map of the activation, with the shape after it.
    Affine(Affine, Vec<usize>),
    /// An element-wise function of the activation.
    Activation(Activation),
    /// The activation passes through unchanged with a new shape (Flatten, Reshape).
    Reshape(Vec<usize>),
    /// The activation passes through unchanged (Identity, Dropout, Cast to float).
    PassThrough,
    /// The node starts the clear-text tail; `affine` is applied first when present
    /// (LinearClassifier), then `ops`.
    StartTail {
        affine: Option<(Affine, Vec<usize>)>,
        ops: Vec<TailOp>,
        class_labels: Option<Vec<i64>>,
    },
}

impl GraphWalker {
    fn new(graph: &pb::GraphProto) -> Result<Self> {
        let mut values = HashMap::new();
        for init in &graph.initializer {
            values.insert(init.name.clone(), Value::Const(Tensor::from_proto(init)?));
        }
        let inputs: Vec<&pb::ValueInfoProto> = graph
            .input
            .iter()
            .filter(|i| !values.contains_key(&i.name))
            .collect();
        let [input] = inputs.as_slice() else {
            return Err(ModelError::InvalidOnnx(format!(
                "expected exactly one graph input besides the initializers, found {}",
                inputs.len()
            )));
        };
        let input_shape = input_sample_shape(input)?;
        values.insert(input.name.clone(), Value::Main(0));
        Ok(GraphWalker {
            values,
            shape: input_shape.clone(),
            main_step: 0,
            affines: Vec::new(),
            acts: Vec::new(),
            cur_affine: None,
            cur_acts: Vec::new(),
            tail: Vec::new(),
            tail_started: false,
            class_labels: None,
            input_shape,
        })
    }

    fn walk(mut self, graph: &pb::GraphProto) -> Result<FloatModel> {
        let mut unsupported = Vec::new();
        for node in &graph.node {
            match self.visit(node) {
                Ok(()) => {}
                Err(e @ ModelError::Unsupported { .. }) => {
                    // Keep going as if the node passed its input through, so that one error
                    // lists every unsupported node of the model.
                    unsupported.push(e);
                    for out in &node.output {
                        self.values.insert(out.clone(), Value::Main(self.main_step));
                    }
                }
                // Follow-on errors after an unsupported node say nothing new.
                Err(_) if !unsupported.is_empty() => break,
                Err(e) => return Err(e),
            }
        }
        if !unsupported.is_empty() {
            let first = unsupported.remove(0);
            if unsupported.is_empty() {
                return Err(first);
            }
            let rest: Vec<String> = unsupported.iter().map(|e| e.to_string()).collect();
            let ModelError::Unsupported {
                node,
                op_type,
                reason,
                supported,
            } = first
            else {
                unreachable!("only Unsupported errors are collected")
            };
            return Err(ModelError::Unsupported {
                node,
                op_type,
                reason: format!(
                    "{reason}; {} more unsupported: {}",
                    rest.len(),
                    rest.join("; ")
                ),
                supported,
            });
        }
        for out in &graph.output {
            if !self.values.contains_key(&out.name) {
                return Err(ModelError::InvalidOnnx(format!(
                    "graph output '{}' is not produced by any node",
                    out.name
                )));
            }
        }
        self.finish()
    }

    fn visit(&mut self, node: &pb::NodeProto) -> Result<()> {
        let name = if node.name.is_empty() {
            node.output.first().cloned().unwrap_or_default()
        } else {
            node.name.clone()
        };
        let ctx = ops::NodeCtx { node, name: &name };
        // Resolve inputs: constants by value, the activation by its step.
        let mut main_inputs = Vec::new();
        let mut consts: Vec<Option<Tensor>> = Vec::new();
        let mut reads_tail = false;
        for input in &node.input {
            if input.is_empty() {
                consts.push(None); // optional input left out
                continue;
            }
            match self.values.get(input) {
                Some(Value::Const(t)) => consts.push(Some(t.clone())),
                Some(Value::Main(step)) => {
                    main_inputs.push(*step);
                    consts.push(None);
                }
                Some(Value::Tail) => {
                    reads_tail = true;
                    consts.push(None);
                }
                None => {
                    return Err(ModelError::InvalidOnnx(format!(
                        "node '{name}' ({}) reads '{input}', which no earlier node or initializer produces",
                        node.op_type
                    )));
                }
            }
        }

        if node.op_type == "Constant" {
            let t = ops::constant(&ctx)?;
            if let Some(out) = node.output.first() {
                self.values.insert(out.clone(), Value::Const(t));
            }
            return Ok(());
        }
        if main_inputs.is_empty() && !reads_tail {
            return Err(ctx.unsupported(
                "constant sub-graphs are not folded; the node must read the model's activation",
            ));
        }
        if reads_tail || self.tail_started {
            if !ops::is_tail_op(node) {
                return Err(ctx.unsupported(
                    "only ops that turn scores into probabilities or a label (Softmax, ArgMax, \
                     Cast, ZipMap, Normalizer) may follow the last linear layer's tail",
                ));
            }
            if !main_inputs.is_empty() {
                // e.g. Softmax on the scores beside an ArgMax taken from them
                self.record_tail(ops::tail_ops_of(&ctx)?);
            }
            self.mark_outputs(node, Value::Tail);
            return Ok(());
        }
        if main_inputs.len() > 1 {
            return Err(ctx.unsupported(
                "reads the activation twice (residual or branching graphs are not supported)",
            ));
        }
        if main_inputs[0] != self.main_step {
            return Err(ctx.unsupported("reads an activation that was already consumed (branching graphs are not supported)"));
        }
        let main_pos = node
            .input
            .iter()
            .position(|i| matches!(self.values.get(i), Some(Value::Main(_))))
            .unwrap_or(0);

        match ops::map_node(&ctx, &self.shape, main_pos, &consts)? {
            NodeEffect::Affine(a, shape) => {
                self.push_affine(a);
                self.shape = shape;
            }
            NodeEffect::Activation(act) => {
                if self.cur_affine.is_none() {
                    self.cur_affine = Some(Affine::identity(self.shape.iter().product()));
                }
                self.cur_acts.push(act);
            }
            NodeEffect::Reshape(shape) => self.shape = shape,
            NodeEffect::PassThrough => {}
            NodeEffect::StartTail {
                affine,
                ops,
                class_labels,
            } => {
                if let Some((a, shape)) = affine {
                    self.push_affine(a);
                    self.shape = shape;
                }
                self.record_tail(ops);
                if class_labels.is_some() {
                    self.class_labels = class_labels;
                }
                self.tail_started = true;
                self.mark_outputs(node, Value::Tail);
                return Ok(());
            }
        }
        self.main_step += 1;
        let step = self.main_step;
        // Dropout's optional mask output is never read by inference graphs.
        if let Some(out) = node.output.first() {
            self.values.insert(out.clone(), Value::Main(step));
        }
        for extra in node.output.iter().skip(1) {
            self.values.insert(extra.clone(), Value::Tail);
        }
        Ok(())
    }

    fn mark_outputs(&mut self, node: &pb::NodeProto, v: Value) {
        for out in &node.output {
            self.values.insert(out.clone(), v.clone());
        }
    }

    /// The first tail op moves any trailing activations into the tail, ahead of it.
    fn record_tail(&mut self, ops: Vec<TailOp>) {
        if !self.tail_started {
            let trailing = std::mem::take(&mut self.cur_acts);
            self.tail
                .extend(trailing.into_iter().map(TailOp::Activation));
            self.tail_started = true;
        }
        self.tail.extend(ops);
    }

    fn push_affine(&mut self, a: Affine) {
        if !self.cur_acts.is_empty() {
            let prev = self
                .cur_affine
                .take()
                .expect("activations always follow an affine map");
            self.affines.push(prev);
            self.acts.push(std::mem::take(&mut self.cur_acts));
            self.cur_affine = Some(a);
        } else {
            self.cur_affine = Some(match self.cur_affine.take() {
                Some(prev) => prev.then(&a),
                None => a,
            });
        }
    }

    fn finish(mut self) -> Result<FloatModel> {
        let last = self.cur_affine.take().ok_or_else(|| {
            ModelError::InvalidOnnx("the model has no linear layer (Gemm, MatMul or Conv)".into())
        })?;
        self.affines.push(last);
        if !self.cur_acts.is_empty() {
            // Activations after the last linear op only transform the scores: clear-text tail.
            let mut tail: Vec<TailOp> = self.cur_acts.drain(..).map(TailOp::Activation).collect();
            tail.append(&mut self.tail);
            self.tail = tail;
        }
        if let Some(labels) = &self.class_labels {
            let n_out =
                crate::ir::apply_tail(&self.tail, vec![0.0; self.affines.last().unwrap().n_out()])
                    .len();
            if labels.len() != n_out {
                return Err(ModelError::InvalidOnnx(format!(
                    "{} class labels for {n_out} outputs",
                    labels.len()
                )));
            }
        }
        Ok(FloatModel {
            input_shape: self.input_shape,
            affines: self.affines,
            acts: self.acts,
            tail: self.tail,
            class_labels: self.class_labels,
        })
    }
}

/// The per-sample shape of the graph input: its dims without the leading batch dimension.
fn input_sample_shape(input: &pb::ValueInfoProto) -> Result<Vec<usize>> {
    use pb::tensor_shape_proto::dimension::Value as Dim;
    use pb::type_proto::Value as Ty;
    let bad = |why: &str| ModelError::InvalidOnnx(format!("graph input '{}': {why}", input.name));
    let Some(Ty::TensorType(t)) = input.r#type.as_ref().and_then(|t| t.value.as_ref()) else {
        return Err(bad("not a tensor"));
    };
    if !matches!(t.elem_type, 1 | 11) {
        return Err(bad("element type must be float or double"));
    }
    let dims = &t.shape.as_ref().ok_or_else(|| bad("no shape"))?.dim;
    if dims.len() < 2 {
        return Err(bad(
            "expected a batch dimension followed by the sample's dimensions",
        ));
    }
    dims[1..]
        .iter()
        .map(|d| match d.value {
            Some(Dim::DimValue(v)) if v > 0 && v <= 1 << 20 => Ok(v as usize),
            _ => Err(bad(
                "every dimension after the batch dimension must be a fixed positive size",
            )),
        })
        .collect()
}
