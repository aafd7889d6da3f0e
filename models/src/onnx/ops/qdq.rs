//! QuantizeLinear / DequantizeLinear (QDQ models from onnxruntime's `quantize_static` and QAT
//! exporters). On constants (weights, biases) they fold. On a computed tensor a QuantizeLinear
//! followed by its DequantizeLinear is one element-wise function, a *fake quantization*, whose
//! grid becomes the lookup's output grid; on an input feature it fixes the client's encoding.

use super::super::symbolic::GraphBuilder;
use super::{Inputs, NodeCtx};
use crate::error::Result;
use crate::graph::{Activation, Grid};
use crate::onnx::{Nd, Tensor, Value};

/// The integer range of a quantized element type.
fn int_range(ctx: &NodeCtx, elem_type: Option<i32>) -> Result<(i64, i64)> {
    Ok(match elem_type.unwrap_or(2) {
        2 => (0, 255),
        3 => (-128, 127),
        4 => (0, 65_535),
        5 => (-32_768, 32_767),
        6 => (i32::MIN as i64, i32::MAX as i64),
        21 => (0, 15),
        22 => (-8, 7),
        t => return Err(ctx.unsupported(format!("quantized element type {t}"))),
    })
}

/// Per-element `(scale, zero)` for a tensor of `dims`, from per-tensor or per-axis parameters.
fn params(ctx: &NodeCtx, inputs: &Inputs, dims: &[usize]) -> Result<Vec<(f64, i64)>> {
    let scale = inputs.konst(ctx, 1, "the scale")?;
    let zero: Option<&Tensor> = inputs.opt_konst(ctx, 2, "the zero point")?;
    let n: usize = dims.iter().product();
    if scale.data.iter().any(|&s| !(s > 0.0 && s.is_finite())) {
        return Err(ctx.unsupported("scales must be positive"));
    }
    if zero.is_some_and(|z| z.len() != scale.len()) {
        return Err(ctx.unsupported("the zero point and scale differ in size"));
    }
    let z = |i: usize| zero.map_or(0, |z| z.data[i] as i64);
    if scale.len() == 1 {
        return Ok(vec![(scale.data[0], z(0)); n]);
    }
    if ctx.attr_i("block_size", 0) != 0 {
        return Err(ctx.unsupported("blocked quantization"));
    }
    let ax = super::super::nd::axis(ctx.attr_i("axis", 1), dims.len())
        .filter(|&a| dims[a] == scale.len())
        .ok_or_else(|| {
            ctx.unsupported(format!(
                "{} scales do not match axis {} of shape {dims:?}",
                scale.len(),
                ctx.attr_i("axis", 1)
            ))
        })?;
    let inner: usize = dims[ax + 1..].iter().product();
    Ok((0..n)
        .map(|i| {
            let c = (i / inner) % dims[ax];
            (scale.data[c], z(c))
        })
        .collect())
}

pub(crate) fn map(ctx: &NodeCtx, b: &mut GraphBuilder, inputs: &Inputs) -> Result<Value> {
    let quantize = ctx.node.op_type == "QuantizeLinear";
    match inputs.get(0) {
        Some(Value::Const(t)) => {
            let p = params(ctx, inputs, &t.dims)?;
            let data = if quantize {
                let (lo, hi) = int_range(ctx, ctx.input_types.get(2).copied().flatten())?;
                let g = |x: f64, (s, z): (f64, i64)| {
                    Grid {
                        scale: s,
                        zero: z,
                        qmin: lo,
                        qmax: hi,
                    }
                    .fake_quant(x)
                        / s
                        + z as f64
                };
                t.data.iter().zip(&p).map(|(&x, &sz)| g(x, sz)).collect()
            } else {
                t.data
                    .iter()
                    .zip(&p)
                    .map(|(&q, &(s, z))| s * (q - z as f64))
                    .collect()
            };
            Ok(Value::Const(Tensor {
                dims: t.dims.clone(),
                data,
            }))
        }
        Some(Value::Dyn(x)) if quantize => {
            let (lo, hi) = int_range(ctx, ctx.input_types.get(2).copied().flatten())?;
            let grids = params(ctx, inputs, &x.dims)?
                .into_iter()
                .map(|(scale, zero)| Grid {
                    scale,
                    zero,
                    qmin: lo,
                    qmax: hi,
                })
                .collect();
            Ok(Value::Quantized(x.clone(), grids))
        }
        Some(Value::Quantized(x, grids)) if !quantize => {
            let p = params(ctx, inputs, &x.dims)?;
            let data = x
                .data
                .iter()
                .zip(grids)
                .zip(p)
                .map(|((e, g), (s, z))| {
                    let fq = b.activation(e, Activation::FakeQuant(*g), ctx.name);
                    if s == g.scale && z == g.zero {
                        fq
                    } else {
                        // q = fq / s_q + z_q, dequantized with other parameters
                        fq.affine(s / g.scale, s * (g.zero - z) as f64)
                    }
                })
                .collect();
            Ok(Value::Dyn(Nd {
                dims: x.dims.clone(),
                data,
            }))
        }
        Some(Value::Dyn(_)) => Err(
            ctx.unsupported("DequantizeLinear of a computed value that no QuantizeLinear produced")
        ),
        _ => Err(ctx.unsupported("input 0 is missing or not a tensor")),
    }
}
