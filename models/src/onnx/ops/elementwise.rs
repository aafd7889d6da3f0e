//! Element-wise functions: one lookup per value, fused with whatever univariate function the
//! value already is of its source (so `Sigmoid` then `Mul` by the input is one table).

use super::super::nd;
use super::super::symbolic::GraphBuilder;
use super::{Inputs, NodeCtx};
use crate::error::Result;
use crate::graph::Activation;
use crate::onnx::{Nd, Value};

/// The activation of a node, given its constant operands.
fn activation(ctx: &NodeCtx, inputs: &Inputs) -> Result<Activation> {
    let scalar = |i: usize, what: &str| -> Result<Option<f64>> {
        match inputs.opt_konst(ctx, i, what)? {
            Some(t) if t.len() == 1 => Ok(Some(t.data[0])),
            Some(_) => Err(ctx.unsupported(format!("{what} must be a scalar"))),
            None => Ok(None),
        }
    };
    Ok(match ctx.node.op_type.as_str() {
        "Relu" => Activation::Relu,
        "Sigmoid" => Activation::Sigmoid,
        "Tanh" => Activation::Tanh,
        "LeakyRelu" => Activation::LeakyRelu {
            alpha: ctx.attr_f("alpha", 0.01),
        },
        "Elu" => Activation::Elu {
            alpha: ctx.attr_f("alpha", 1.0),
        },
        "Celu" => Activation::Celu {
            alpha: ctx.attr_f("alpha", 1.0),
        },
        "Selu" => Activation::Selu {
            alpha: ctx.attr_f("alpha", 1.673_263_192_176_818_8),
            gamma: ctx.attr_f("gamma", 1.050_701_022_148_132_3),
        },
        "Softplus" => Activation::Softplus,
        "Softsign" => Activation::Softsign,
        "HardSigmoid" => Activation::HardSigmoid {
            alpha: ctx.attr_f("alpha", 0.2),
            beta: ctx.attr_f("beta", 0.5),
        },
        "HardSwish" => Activation::HardSwish,
        "Mish" => Activation::Mish,
        "ThresholdedRelu" => Activation::ThresholdedRelu {
            alpha: ctx.attr_f("alpha", 1.0),
        },
        "Abs" => Activation::Abs,
        "Exp" => Activation::Exp,
        "Log" => Activation::Log,
        "Sqrt" => Activation::Sqrt,
        "Reciprocal" => Activation::Reciprocal,
        "Erf" => Activation::Erf,
        "Sin" => Activation::Sin,
        "Cos" => Activation::Cos,
        "Sign" => Activation::Sign,
        "Floor" => Activation::Floor,
        "Ceil" => Activation::Ceil,
        "Round" => Activation::Round,
        "Gelu" => match ctx.attr_str("approximate").as_deref() {
            None | Some("none") => Activation::Gelu { tanh: false },
            Some("tanh") => Activation::Gelu { tanh: true },
            Some(o) => return Err(ctx.unsupported(format!("approximate={o}"))),
        },
        "Clip" => {
            // opset >= 11: min and max are optional inputs; before: attributes
            let min = match scalar(1, "min")? {
                Some(v) => v,
                None => ctx.attr_f("min", f64::NEG_INFINITY),
            };
            let max = match scalar(2, "max")? {
                Some(v) => v,
                None => ctx.attr_f("max", f64::INFINITY),
            };
            Activation::Clip { min, max }
        }
        "Pow" => {
            let p = scalar(1, "the exponent")?
                .ok_or_else(|| ctx.unsupported("the exponent must be a constant"))?;
            Activation::Pow { p }
        }
        _ => return Err(ctx.unsupported("unknown op")),
    })
}

pub(crate) fn map(ctx: &NodeCtx, b: &mut GraphBuilder, inputs: &Inputs) -> Result<Value> {
    if ctx.node.op_type == "PRelu" {
        return prelu(ctx, b, inputs);
    }
    let act = activation(ctx, inputs)?;
    match inputs.get(0) {
        Some(Value::Const(t)) => {
            let mut t = t.clone();
            t.data.iter_mut().for_each(|v| *v = act.apply(*v));
            Ok(Value::Const(t))
        }
        Some(Value::Dyn(x)) => {
            if let Activation::Pow { p } = act
                && p == 1.0
            {
                return Ok(Value::Dyn(x.clone()));
            }
            let data = x
                .data
                .iter()
                .map(|e| b.activation(e, act.clone(), ctx.name))
                .collect();
            Ok(Value::Dyn(Nd {
                dims: x.dims.clone(),
                data,
            }))
        }
        _ => Err(ctx.unsupported("input 0 is missing")),
    }
}

/// PRelu: one slope per element, broadcast from the slope tensor.
fn prelu(ctx: &NodeCtx, b: &mut GraphBuilder, inputs: &Inputs) -> Result<Value> {
    let x = inputs.dynamic(ctx, 0)?;
    let slope = inputs.konst(ctx, 1, "the slope")?;
    let (dims, pairs) = nd::broadcast(&x.dims, &slope.dims)
        .filter(|(d, _)| *d == x.dims)
        .ok_or_else(|| {
            ctx.unsupported(format!(
                "slope of shape {:?} does not broadcast to {:?}",
                slope.dims, x.dims
            ))
        })?;
    let data = pairs
        .iter()
        .map(|&(i, j)| {
            b.activation(
                &x.data[i],
                Activation::PRelu {
                    slope: slope.data[j],
                },
                ctx.name,
            )
        })
        .collect();
    Ok(Value::Dyn(Nd { dims, data }))
}
