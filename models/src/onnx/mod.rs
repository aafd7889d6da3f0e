//! ONNX import: decodes a model file and maps its nodes onto the float graph
//! ([`FloatModel`]).
//!
//! The walker visits nodes in file order (ONNX requires topological order). Constants fold as
//! they come (initializers, `Constant`, `Shape` of a computed tensor, and any op whose inputs
//! are all constant); computed tensors carry one symbolic element per value (see
//! [`symbolic`]). Everything after the scores that only turns them into probabilities or a
//! label (Softmax, ArgMax, Cast, ZipMap, ...) becomes the tail the client computes in the
//! clear, and so do element-wise functions applied to the final scores.

mod external;
mod nd;
mod ops;
mod symbolic;
mod tensor;

use prost::Message;
use std::collections::HashMap;

use crate::error::{ModelError, Result};
use crate::graph::{FloatModel, Grid, Lin, TailOp};
pub(crate) use symbolic::DynTensor;
use symbolic::{Elem, GraphBuilder};
pub use tensor::{Nd, Tensor};

/// Code generated from `proto/onnx_subset.proto`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
}

/// Largest ONNX file the importer reads; the models Veil can run under FHE are far smaller.
pub const MAX_ONNX_BYTES: usize = 256 << 20;
/// Most values (tensor elements) one computed tensor may hold.
const MAX_DYN_ELEMENTS: usize = 1 << 20;
/// Most lookups (bootstraps per sample) an imported model may create.
const MAX_LOOKUPS: usize = 1 << 20;

/// Op types the importer knows, listed in errors.
pub const SUPPORTED_OPS: &str = "linear: Gemm, MatMul, Conv (1-D, 2-D), AveragePool, \
GlobalAveragePool, BatchNormalization, ReduceMean, ReduceSum, Add, Sub, Mul, Div, Sum, Neg; \
re-indexing: Flatten, Reshape, Squeeze, Unsqueeze, Transpose, Concat, Split, Slice, Gather, \
Pad (constant), Identity, Dropout, Cast, Shape, Constant, ConstantOfShape; non-linear (one \
bootstrap per value): MaxPool, GlobalMaxPool, Relu, PRelu, LeakyRelu, Sigmoid, Tanh, Elu, Celu, \
Selu, Softplus, Softsign, HardSigmoid, HardSwish, Mish, ThresholdedRelu, Clip, Abs, Exp, Log, \
Sqrt, Reciprocal, Erf, Gelu, Sin, Cos, Sign, Floor, Ceil, Round, Pow, Mul/Div of computed \
tensors, LayerNormalization, QuantizeLinear + DequantizeLinear; tail ops Softmax, LogSoftmax, ArgMax, ZipMap, \
Normalizer; ai.onnx.ml Scaler, LinearClassifier, LinearRegressor, TreeEnsembleClassifier, \
TreeEnsembleRegressor (one bootstrap per distinct test, leaf values packed per subtree)";

/// Reads and imports an ONNX file, with any external data files beside it.
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
    let mut model = decode(&bytes)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    // The file and its external data share one size limit.
    external::resolve(&mut model, dir, (MAX_ONNX_BYTES - bytes.len()) as u64)?;
    walk(&model)
}

/// Imports an ONNX model from its protobuf bytes. A model whose weights live in external
/// data files needs [`import_file`], which knows the folder to read them from.
pub fn import_bytes(bytes: &[u8]) -> Result<FloatModel> {
    walk(&decode(bytes)?)
}

fn decode(bytes: &[u8]) -> Result<pb::ModelProto> {
    if bytes.len() > MAX_ONNX_BYTES {
        return Err(ModelError::InvalidOnnx(format!(
            "{} bytes, more than the {MAX_ONNX_BYTES} byte limit",
            bytes.len()
        )));
    }
    pb::ModelProto::decode(bytes)
        .map_err(|e| ModelError::InvalidOnnx(format!("protobuf decoding failed ({e})")))
}

fn walk(model: &pb::ModelProto) -> Result<FloatModel> {
    let graph = model
        .graph
        .as_ref()
        .filter(|g| !g.node.is_empty())
        .ok_or_else(|| ModelError::InvalidOnnx("the file holds no graph with nodes".into()))?;
    GraphWalker::new(graph)?.walk(graph)
}

/// A named value in the graph.
#[derive(Clone, Debug)]
pub(crate) enum Value {
    Const(Tensor),
    Dyn(DynTensor),
    /// A QuantizeLinear's integer output, waiting for its DequantizeLinear.
    Quantized(DynTensor, Vec<Grid>),
    /// Derived from the scores by a tail op; ignored under FHE.
    Tail,
}

/// Walks the nodes in order, building the graph.
struct GraphWalker {
    values: HashMap<String, Value>,
    /// ONNX element type of each constant (QuantizeLinear's range depends on it).
    types: HashMap<String, i32>,
    builder: GraphBuilder,
    input_shape: Vec<usize>,
    /// The scores the tail starts from, once a tail op has read them.
    scores: Option<DynTensor>,
    tail: Vec<TailOp>,
    class_labels: Option<Vec<i64>>,
}

/// What one node produces.
pub(crate) enum NodeEffect {
    /// One value per node output.
    Values(Vec<Value>),
    /// The node starts the clear-text tail: `scores` are the model's outputs, then `ops`.
    StartTail {
        scores: DynTensor,
        ops: Vec<TailOp>,
        class_labels: Option<Vec<i64>>,
    },
}

impl GraphWalker {
    fn new(graph: &pb::GraphProto) -> Result<Self> {
        let mut values = HashMap::new();
        let mut types = HashMap::new();
        for init in &graph.initializer {
            values.insert(init.name.clone(), Value::Const(Tensor::from_proto(init)?));
            types.insert(init.name.clone(), init.data_type);
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
        let n: usize = input_shape.iter().product();
        if n > MAX_DYN_ELEMENTS {
            return Err(ModelError::InvalidOnnx(format!(
                "the input has {n} values per sample, more than {MAX_DYN_ELEMENTS}"
            )));
        }
        let mut dims = vec![1];
        dims.extend_from_slice(&input_shape);
        let data = (0..n).map(|i| Elem::linear(Lin::atom(i as u32))).collect();
        values.insert(input.name.clone(), Value::Dyn(DynTensor { dims, data }));
        Ok(GraphWalker {
            values,
            types,
            builder: GraphBuilder::new(n),
            input_shape,
            scores: None,
            tail: Vec::new(),
            class_labels: None,
        })
    }

    fn walk(mut self, graph: &pb::GraphProto) -> Result<FloatModel> {
        let mut unsupported = Vec::new();
        for node in &graph.node {
            match self.visit(node) {
                Ok(()) => {}
                Err(e @ ModelError::Unsupported { .. }) => {
                    // Keep going as if the node passed its first computed input through, so
                    // that one error lists every unsupported node of the model.
                    unsupported.push(e);
                    let pass = node
                        .input
                        .iter()
                        .find_map(|i| match self.values.get(i) {
                            Some(v @ Value::Dyn(_)) => Some(v.clone()),
                            _ => None,
                        })
                        .unwrap_or(Value::Tail);
                    for out in &node.output {
                        self.values.insert(out.clone(), pass.clone());
                    }
                }
                // Follow-on errors after an unsupported node say nothing new.
                Err(_) if !unsupported.is_empty() => {}
                Err(e) => return Err(e),
            }
            if self.builder.lookups.len() > MAX_LOOKUPS {
                return Err(ModelError::InvalidOnnx(format!(
                    "the model needs more than {MAX_LOOKUPS} bootstraps per sample"
                )));
            }
        }
        if !unsupported.is_empty() {
            return Err(merge_unsupported(unsupported));
        }
        for out in &graph.output {
            if !self.values.contains_key(&out.name) {
                return Err(ModelError::InvalidOnnx(format!(
                    "graph output '{}' is not produced by any node",
                    out.name
                )));
            }
        }
        let scores = match self.scores.take() {
            Some(s) => s,
            None => match graph.output.first().and_then(|o| self.values.get(&o.name)) {
                Some(Value::Dyn(t)) => t.clone(),
                _ => {
                    return Err(ModelError::InvalidOnnx(
                        "the first graph output is not computed from the input".into(),
                    ));
                }
            },
        };
        self.finish(scores)
    }

    fn visit(&mut self, node: &pb::NodeProto) -> Result<()> {
        let name = if node.name.is_empty() {
            node.output.first().cloned().unwrap_or_default()
        } else {
            node.name.clone()
        };
        let ctx = ops::NodeCtx {
            node,
            name: &name,
            input_types: node
                .input
                .iter()
                .map(|i| self.types.get(i).copied())
                .collect(),
        };
        let mut inputs = Vec::with_capacity(node.input.len());
        let (mut reads_tail, mut reads_dyn) = (false, false);
        for input in &node.input {
            if input.is_empty() {
                inputs.push(None); // optional input left out
                continue;
            }
            match self.values.get(input) {
                Some(v) => {
                    reads_tail |= matches!(v, Value::Tail);
                    reads_dyn |= matches!(v, Value::Dyn(_) | Value::Quantized(..));
                    inputs.push(Some(v.clone()));
                }
                None => {
                    return Err(ModelError::InvalidOnnx(format!(
                        "node '{name}' ({}) reads '{input}', which no earlier node or initializer produces",
                        node.op_type
                    )));
                }
            }
        }
        if reads_tail || (self.scores.is_some() && reads_dyn) {
            // A product with constant ones (LightGBM's converter writes one) changes nothing.
            let times_one = matches!(node.op_type.as_str(), "Mul" | "Div")
                && inputs.iter().flatten().any(|v| {
                    matches!(v, Value::Const(t) if !t.data.is_empty() && t.data.iter().all(|&x| x == 1.0))
                });
            if !ops::is_tail_op(node) && !times_one {
                return Err(ctx.unsupported(
                    "only ops that turn scores into probabilities or a label (Softmax, ArgMax, \
                     Cast, ZipMap, Normalizer) may follow the model's scores",
                ));
            }
            if reads_dyn {
                // e.g. Softmax on the scores beside an ArgMax taken from them
                self.tail.extend(ops::tail_ops_of(&ctx));
            }
            self.mark_outputs(node, Value::Tail);
            return Ok(());
        }
        match ops::map_node(&ctx, &mut self.builder, &inputs)? {
            NodeEffect::Values(vals) => {
                for (out, v) in node.output.iter().zip(vals) {
                    if let Value::Dyn(t) = &v
                        && t.data.len() > MAX_DYN_ELEMENTS
                    {
                        return Err(ctx.unsupported(format!(
                            "produces {} values per sample, more than {MAX_DYN_ELEMENTS}",
                            t.data.len()
                        )));
                    }
                    if !out.is_empty() {
                        if node.op_type == "Constant" {
                            let t = node.attribute.iter().find_map(|a| a.t.as_ref());
                            if let Some(t) = t {
                                self.types.insert(out.clone(), t.data_type);
                            }
                        }
                        self.values.insert(out.clone(), v);
                    }
                }
            }
            NodeEffect::StartTail {
                scores,
                ops,
                class_labels,
            } => {
                self.scores = Some(scores);
                self.tail.extend(ops);
                if class_labels.is_some() {
                    self.class_labels = class_labels;
                }
                self.mark_outputs(node, Value::Tail);
            }
        }
        Ok(())
    }

    fn mark_outputs(&mut self, node: &pb::NodeProto, v: Value) {
        for out in &node.output {
            self.values.insert(out.clone(), v.clone());
        }
    }

    fn finish(mut self, scores: DynTensor) -> Result<FloatModel> {
        let n_inputs = self.builder.n_inputs;
        if scores.data.is_empty() {
            return Err(ModelError::InvalidOnnx("the model has no outputs".into()));
        }
        let mut outputs: Vec<Lin> = scores.data.iter().map(|e| (*e.lin).clone()).collect();
        // Element-wise functions of the final scores run in the clear, not under FHE: when
        // every output is the same chain of activations of a linear value, that chain moves to
        // the front of the tail.
        let views: Vec<_> = scores.data.iter().map(Elem::view).collect();
        let chain = views[0].1.as_chain().filter(|c| !c.is_empty());
        if let Some(chain) = chain
            && scores
                .data
                .iter()
                .all(|e| e.lin.as_atom().is_some_and(|a| a as usize >= n_inputs))
            && views
                .iter()
                .all(|(_, f)| f.as_chain().as_ref() == Some(&chain))
        {
            outputs = views.iter().map(|(s, _)| (**s).clone()).collect();
            let mut tail: Vec<TailOp> = chain.into_iter().map(TailOp::Activation).collect();
            tail.append(&mut self.tail);
            self.tail = tail;
        }
        if outputs.iter().all(Lin::is_constant) {
            return Err(ModelError::InvalidOnnx(
                "the model's outputs do not depend on its input".into(),
            ));
        }
        if let Some(labels) = &self.class_labels {
            let n_out = crate::graph::apply_tail(&self.tail, vec![0.0; outputs.len()]).len();
            if labels.len() != n_out {
                return Err(ModelError::InvalidOnnx(format!(
                    "{} class labels for {n_out} outputs",
                    labels.len()
                )));
            }
        }
        let mut model = FloatModel {
            input_shape: self.input_shape,
            input_grids: self.builder.input_grids,
            lookups: self.builder.lookups,
            outputs,
            tail: self.tail,
            class_labels: self.class_labels,
            task: self.builder.task,
            reveal: crate::graph::Reveal::Scores,
        };
        model.prune();
        Ok(model)
    }
}

/// One error naming every unsupported node.
fn merge_unsupported(mut errors: Vec<ModelError>) -> ModelError {
    let first = errors.remove(0);
    if errors.is_empty() {
        return first;
    }
    let rest: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
    let ModelError::Unsupported {
        node,
        op_type,
        reason,
        supported,
    } = first
    else {
        unreachable!("only Unsupported errors are collected")
    };
    ModelError::Unsupported {
        node,
        op_type,
        reason: format!(
            "{reason}; {} more unsupported: {}",
            rest.len(),
            rest.join("; ")
        ),
        supported,
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
