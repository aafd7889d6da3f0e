//! Add, Sub, Mul, Div, Sum and Neg with numpy broadcasting. With a constant operand they are
//! linear; between two computed tensors Add and Sub stay linear (residual connections), while
//! Mul and Div become lookups (see [`GraphBuilder::mul`]).

use super::super::nd;
use super::super::symbolic::{Elem, GraphBuilder};
use super::{Inputs, NodeCtx};
use crate::error::Result;
use crate::onnx::{Nd, Tensor, Value};

fn binary(ctx: &NodeCtx, b: &mut GraphBuilder, op: &str, x: &Value, y: &Value) -> Result<Value> {
    let (dx, dy) = (dims(x), dims(y));
    let (out_dims, pairs) = nd::broadcast(dx, dy)
        .ok_or_else(|| ctx.unsupported(format!("shapes {dx:?} and {dy:?} do not broadcast")))?;
    match (x, y) {
        (Value::Const(a), Value::Const(c)) => {
            let data = pairs
                .iter()
                .map(|&(i, j)| {
                    let (u, v) = (a.data[i], c.data[j]);
                    match op {
                        "Add" => u + v,
                        "Sub" => u - v,
                        "Mul" => u * v,
                        _ if v == 0.0 => 0.0,
                        _ => u / v,
                    }
                })
                .collect();
            Ok(Value::Const(Tensor {
                dims: out_dims,
                data,
            }))
        }
        _ => {
            let (ex, ey) = (elems(x), elems(y));
            if out_dims.first() != Some(&1) || out_dims.len() < ex.dims.len().max(ey.dims.len()) {
                return Err(ctx.unsupported("broadcasts over the batch dimension"));
            }
            let mut data = Vec::with_capacity(pairs.len());
            for &(i, j) in &pairs {
                let (u, v) = (&ex.data[i], &ey.data[j]);
                data.push(match op {
                    "Add" => b.add(u, v, 1.0),
                    "Sub" => b.add(u, v, -1.0),
                    "Mul" => b.mul(u, v, ctx.name),
                    _ => b
                        .div(u, v, ctx.name)
                        .ok_or_else(|| ctx.unsupported("divides by the constant 0"))?,
                });
            }
            Ok(Value::Dyn(Nd {
                dims: out_dims,
                data,
            }))
        }
    }
}

fn dims(v: &Value) -> &[usize] {
    match v {
        Value::Const(t) => &t.dims,
        Value::Dyn(t) => &t.dims,
        _ => &[],
    }
}

fn elems(v: &Value) -> Nd<Elem> {
    match v {
        Value::Dyn(t) => t.clone(),
        Value::Const(t) => Nd {
            dims: t.dims.clone(),
            data: t.data.iter().map(|&v| Elem::constant(v)).collect(),
        },
        _ => Nd {
            dims: vec![],
            data: vec![],
        },
    }
}

pub(crate) fn map(ctx: &NodeCtx, b: &mut GraphBuilder, inputs: &Inputs) -> Result<Value> {
    let op = ctx.node.op_type.as_str();
    let arg = |i: usize| {
        inputs
            .get(i)
            .filter(|v| matches!(v, Value::Const(_) | Value::Dyn(_)))
            .ok_or_else(|| ctx.unsupported(format!("input {i} is missing")))
    };
    match op {
        "Neg" => binary(ctx, b, "Mul", arg(0)?, &Value::Const(Tensor::scalar(-1.0))),
        "Sum" => {
            let mut acc = arg(0)?.clone();
            for i in 1..ctx.node.input.len() {
                acc = binary(ctx, b, "Add", &acc, arg(i)?)?;
            }
            Ok(acc)
        }
        _ => binary(ctx, b, op, arg(0)?, arg(1)?),
    }
}
