//! LayerNormalization (opset 17+, what torch's exporter writes for `nn.LayerNorm`): over the
//! trailing axes from `axis`, `(x - mean) / sqrt(var + epsilon) * scale + bias`.
//!
//! The mean and the centred values are linear; each squared centred value is one lookup, the
//! variance their mean; `1 / sqrt(var + epsilon)` is one lookup of the variance; the product of
//! a centred value by it takes two (the quarter squares of [`GraphBuilder::mul`]). So a group
//! of `D` values costs `3D + 1` bootstraps, and `scale`, `bias` fold into the readers.

use super::super::nd;
use super::super::symbolic::{Elem, GraphBuilder};
use super::{Inputs, NodeCtx};
use crate::error::Result;
use crate::graph::{Activation, Lin};
use crate::onnx::{Nd, Tensor, Value};

pub(crate) fn layer_norm(
    ctx: &NodeCtx,
    b: &mut GraphBuilder,
    inputs: &Inputs,
) -> Result<Vec<Value>> {
    let x = inputs.dynamic(ctx, 0)?;
    let scale = inputs.konst(ctx, 1, "the scale")?;
    let bias = inputs.opt_konst(ctx, 2, "the bias")?;
    let rank = x.dims.len();
    let axis = nd::axis(ctx.attr_i("axis", -1), rank)
        .ok_or_else(|| ctx.unsupported("axis out of range"))?;
    if axis == 0 && x.dims[0] != 1 {
        return Err(ctx.unsupported("normalizes over the batch axis"));
    }
    let eps = ctx.attr_f("epsilon", 1e-5);
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(ctx.unsupported(format!("epsilon={eps}")));
    }
    let trailing = &x.dims[axis..];
    let d: usize = trailing.iter().product();
    // scale and bias broadcast to the normalized shape, one value per position in a group.
    let per_position = |t: &Tensor, what: &str| -> Result<Vec<f64>> {
        match nd::broadcast(trailing, &t.dims) {
            Some((dims, pairs)) if dims == trailing => {
                Ok(pairs.iter().map(|&(_, j)| t.data[j]).collect())
            }
            _ => Err(ctx.unsupported(format!(
                "{what} of shape {:?} does not broadcast to the normalized shape {trailing:?}",
                t.dims
            ))),
        }
    };
    let gamma = per_position(scale, "the scale")?;
    let beta = match bias {
        Some(t) => per_position(t, "the bias")?,
        None => vec![0.0; d],
    };
    if d == 0 {
        return Err(ctx.unsupported("normalizes an empty axis"));
    }
    let w = 1.0 / d as f64;
    let groups = x.data.len() / d;
    let (mut y, mut means, mut inv_std) = (Vec::new(), Vec::new(), Vec::new());
    for g in 0..groups {
        let group = &x.data[g * d..(g + 1) * d];
        let mean = Lin::combine(group.iter().map(|e| (w, &*e.lin)), 0.0);
        let centred: Vec<Elem> = group
            .iter()
            .map(|e| Elem::linear(Lin::combine([(1.0, &*e.lin), (-1.0, &mean)], 0.0)))
            .collect();
        let squares: Vec<Elem> = centred
            .iter()
            .map(|c| b.arithmetic(c, Activation::Pow { p: 2.0 }, ctx.name))
            .collect();
        let var = Elem::linear(Lin::combine(squares.iter().map(|s| (w, &*s.lin)), eps));
        let r = b.arithmetic(&var, Activation::Pow { p: -0.5 }, ctx.name);
        for (i, c) in centred.iter().enumerate() {
            y.push(b.mul(c, &r, ctx.name).affine(gamma[i], beta[i]));
        }
        means.push(Elem::linear(mean));
        inv_std.push(r);
    }
    // Mean and InvStdDev, the optional outputs, keep the normalized axes with size 1.
    let stat_dims: Vec<usize> = (0..rank)
        .map(|k| if k < axis { x.dims[k] } else { 1 })
        .collect();
    Ok(vec![
        Value::Dyn(Nd {
            dims: x.dims.clone(),
            data: y,
        }),
        Value::Dyn(Nd {
            dims: stat_dims.clone(),
            data: means,
        }),
        Value::Dyn(Nd {
            dims: stat_dims,
            data: inv_std,
        }),
    ])
}
