//! Re-indexing ops: Flatten, Reshape, Squeeze, Unsqueeze, Transpose, Concat, Split, Slice,
//! Gather, Pad, Expand, plus Shape and ConstantOfShape. Free under FHE: they only move
//! values. Written once for constants and computed tensors; a computed tensor's batch axis
//! (axis 0) must stay where it is.

use super::super::nd;
use super::super::symbolic::Elem;
use super::{Inputs, NodeCtx};
use crate::error::Result;
use crate::onnx::{Nd, Tensor, Value};

pub(crate) trait Item: Clone {
    fn constant(v: f64) -> Self;
}

impl Item for f64 {
    fn constant(v: f64) -> Self {
        v
    }
}

impl Item for Elem {
    fn constant(v: f64) -> Self {
        Elem::constant(v)
    }
}

/// A constant shape operand as sizes (negative read as 0, absurd sizes capped; the callers
/// bound the element count).
fn shape_of(t: &Tensor) -> Vec<usize> {
    t.data.iter().map(|&d| d.clamp(0.0, 1e9) as usize).collect()
}

fn ints(t: &Tensor) -> Vec<i64> {
    t.data.iter().map(|&v| v as i64).collect()
}

/// A computed tensor as `Nd<Elem>`, or a constant lifted to symbolic constants.
fn lift(v: &Value) -> Option<Nd<Elem>> {
    match v {
        Value::Dyn(t) => Some(t.clone()),
        Value::Const(t) => Some(Nd {
            dims: t.dims.clone(),
            data: t.data.iter().map(|&v| Elem::constant(v)).collect(),
        }),
        _ => None,
    }
}

pub(crate) fn map(ctx: &NodeCtx, inputs: &Inputs) -> Result<Vec<Value>> {
    let op = ctx.node.op_type.as_str();
    match op {
        "Shape" => {
            // The batch dimension reads as 1, which Reshape targets accept in its place.
            let dims = match inputs.get(0) {
                Some(Value::Dyn(t)) => &t.dims,
                Some(Value::Const(t)) => &t.dims,
                _ => return Err(ctx.unsupported("Shape of a value with no known shape")),
            };
            let r = dims.len() as i64;
            let norm = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
            let start = norm(ctx.attr_i("start", 0));
            let end = norm(ctx.attr_i("end", r));
            let d: Vec<f64> = dims[start..end.max(start)]
                .iter()
                .map(|&d| d as f64)
                .collect();
            return Ok(vec![Value::Const(Tensor::vector(d))]);
        }
        "ConstantOfShape" => {
            let dims = shape_of(inputs.konst(ctx, 0, "the shape")?);
            let n = dims
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .unwrap_or(usize::MAX);
            if n > nd::MAX_OUT {
                return Err(ctx.unsupported("ConstantOfShape too large"));
            }
            let v = ctx
                .attr("value")
                .and_then(|a| a.t.as_ref())
                .map(Tensor::from_proto)
                .transpose()?
                .and_then(|t| t.data.first().copied())
                .unwrap_or(0.0);
            return Ok(vec![Value::Const(Nd {
                dims,
                data: vec![v; n],
            })]);
        }
        "Cast" => {
            let to = ctx.attr_i("to", 1);
            return match inputs.get(0) {
                // float, double, float16, bfloat16 keep a computed value's meaning
                Some(v @ Value::Dyn(_)) if matches!(to, 1 | 10 | 11 | 16) => Ok(vec![v.clone()]),
                Some(Value::Dyn(_)) => Err(ctx.unsupported(format!(
                    "Cast of a computed value to element type {to} inside the model"
                ))),
                Some(Value::Const(t)) => {
                    let mut t = t.clone();
                    if !matches!(to, 1 | 10 | 11 | 16) {
                        t.data.iter_mut().for_each(|v| *v = v.trunc());
                    }
                    Ok(vec![Value::Const(t)])
                }
                _ => Err(ctx.unsupported("Cast of a missing input")),
            };
        }
        "Identity" | "Dropout" => {
            let v = inputs
                .get(0)
                .cloned()
                .ok_or_else(|| ctx.unsupported("no input"))?;
            return Ok(vec![v]);
        }
        _ => {}
    }
    let dynamic = inputs.any_dynamic();
    if dynamic {
        let parts: Vec<Nd<Elem>> = data_inputs(op, inputs)
            .iter()
            .filter_map(|v| lift(v))
            .collect();
        let out = apply(ctx, inputs, parts, true)?;
        for t in &out {
            if t.dims.first() != Some(&1) {
                return Err(ctx.unsupported(format!(
                    "moves or resizes the batch dimension (result shape {:?})",
                    t.dims
                )));
            }
        }
        Ok(out.into_iter().map(Value::Dyn).collect())
    } else {
        let parts: Vec<Tensor> = data_inputs(op, inputs)
            .iter()
            .filter_map(|v| match v {
                Value::Const(t) => Some(t.clone()),
                _ => None,
            })
            .collect();
        let out = apply(ctx, inputs, parts, false)?;
        Ok(out.into_iter().map(Value::Const).collect())
    }
}

/// The inputs an op moves values of (Concat: all; others: the first).
fn data_inputs<'a>(op: &str, inputs: &'a Inputs) -> Vec<&'a Value> {
    if op == "Concat" {
        inputs.0.iter().flatten().collect()
    } else {
        inputs.get(0).into_iter().collect()
    }
}

fn axis_of(ctx: &NodeCtx, a: i64, rank: usize, dynamic: bool) -> Result<usize> {
    let ax =
        nd::axis(a, rank).ok_or_else(|| ctx.unsupported(format!("axis {a} for rank {rank}")))?;
    if dynamic && ax == 0 {
        return Err(ctx.unsupported("acts on the batch axis"));
    }
    Ok(ax)
}

/// The axes given as an attribute (older opsets) or as the constant input `i` (newer).
fn axes_list(ctx: &NodeCtx, inputs: &Inputs, i: usize) -> Result<Option<Vec<i64>>> {
    if let Some(a) = ctx.attr_ints("axes") {
        return Ok(Some(a.to_vec()));
    }
    Ok(inputs.opt_konst(ctx, i, "axes")?.map(ints))
}

fn apply<T: Item>(
    ctx: &NodeCtx,
    inputs: &Inputs,
    mut parts: Vec<Nd<T>>,
    dynamic: bool,
) -> Result<Vec<Nd<T>>> {
    let op = ctx.node.op_type.as_str();
    if parts.is_empty() {
        return Err(ctx.unsupported("no data input"));
    }
    if op == "Concat" {
        let rank = parts[0].dims.len();
        let ax = axis_of(ctx, ctx.attr_i("axis", 0), rank, dynamic)?;
        let views: Vec<(&[usize], &[T])> = parts
            .iter()
            .map(|p| (p.dims.as_slice(), p.data.as_slice()))
            .collect();
        let (dims, data) = nd::concat(&views, ax)
            .ok_or_else(|| ctx.unsupported("inputs whose shapes do not concatenate"))?;
        return Ok(vec![Nd { dims, data }]);
    }
    let x = parts.swap_remove(0);
    let rank = x.dims.len();
    let n = x.data.len();
    let out = match op {
        "Flatten" => {
            let ax = nd::axis(ctx.attr_i("axis", 1), rank + 1)
                .ok_or_else(|| ctx.unsupported("axis out of range"))?;
            let outer: usize = x.dims[..ax].iter().product();
            if dynamic && ax == 0 {
                return Err(ctx.unsupported("Flatten with axis=0 merges the batch dimension"));
            }
            Nd {
                dims: vec![outer, n / outer.max(1)],
                data: x.data,
            }
        }
        "Reshape" => {
            let target = ints(inputs.konst(ctx, 1, "the shape")?);
            let allowzero = ctx.attr_i("allowzero", 0) != 0;
            let mut dims = Vec::with_capacity(target.len());
            let mut infer = None;
            for (k, &d) in target.iter().enumerate() {
                match d {
                    -1 if infer.is_none() => {
                        infer = Some(k);
                        dims.push(1);
                    }
                    0 if !allowzero && k < rank => dims.push(x.dims[k]),
                    d if (0..=1 << 30).contains(&d) => dims.push(d as usize),
                    _ => return Err(ctx.unsupported(format!("target shape {target:?}"))),
                }
            }
            if dims
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .is_none()
            {
                return Err(ctx.unsupported(format!("target shape {target:?}")));
            }
            if let Some(k) = infer {
                let known: usize = dims.iter().product();
                if known == 0 || !n.is_multiple_of(known) {
                    return Err(
                        ctx.unsupported(format!("cannot reshape {:?} to {target:?}", x.dims))
                    );
                }
                dims[k] = n / known;
            }
            if dims.iter().product::<usize>() != n {
                return Err(ctx.unsupported(format!("cannot reshape {:?} to {target:?}", x.dims)));
            }
            Nd { dims, data: x.data }
        }
        "Squeeze" => {
            let axes = axes_list(ctx, inputs, 1)?;
            let drop: Vec<usize> = match axes {
                Some(a) => a
                    .iter()
                    .map(|&a| axis_of(ctx, a, rank, dynamic))
                    .collect::<Result<_>>()?,
                None => (usize::from(dynamic)..rank)
                    .filter(|&k| x.dims[k] == 1)
                    .collect(),
            };
            if drop.iter().any(|&k| x.dims[k] != 1) {
                return Err(ctx.unsupported("squeezes an axis whose size is not 1"));
            }
            let dims = (0..rank)
                .filter(|k| !drop.contains(k))
                .map(|k| x.dims[k])
                .collect();
            Nd { dims, data: x.data }
        }
        "Unsqueeze" => {
            let axes = axes_list(ctx, inputs, 1)?.ok_or_else(|| ctx.unsupported("no axes"))?;
            let out_rank = rank + axes.len();
            let mut at: Vec<usize> = axes
                .iter()
                .map(|&a| axis_of(ctx, a, out_rank, dynamic))
                .collect::<Result<_>>()?;
            at.sort_unstable();
            let mut dims = x.dims.clone();
            for a in at {
                dims.insert(a, 1);
            }
            Nd { dims, data: x.data }
        }
        "Transpose" => {
            let perm: Vec<usize> = match ctx.attr_ints("perm") {
                Some(p) => p.iter().map(|&v| v as usize).collect(),
                None => (0..rank).rev().collect(),
            };
            let mut sorted = perm.clone();
            sorted.sort_unstable();
            if sorted != (0..rank).collect::<Vec<_>>() {
                return Err(ctx.unsupported(format!("perm {perm:?} for rank {rank}")));
            }
            if dynamic && perm[0] != 0 {
                return Err(ctx.unsupported("moves the batch axis"));
            }
            let (dims, data) = nd::transpose(&x.dims, &x.data, &perm);
            Nd { dims, data }
        }
        "Split" => {
            let ax = axis_of(ctx, ctx.attr_i("axis", 0), rank, dynamic)?;
            let len = x.dims[ax];
            let sizes: Vec<usize> =
                match (ctx.attr_ints("split"), inputs.opt_konst(ctx, 1, "split")?) {
                    (Some(s), _) => s.iter().map(|&v| v.clamp(0, 1 << 30) as usize).collect(),
                    (None, Some(t)) => t.data.iter().map(|&v| v.clamp(0.0, 1e9) as usize).collect(),
                    (None, None) => {
                        let k = ctx
                            .attr_i("num_outputs", ctx.node.output.len() as i64)
                            .clamp(1, len.max(1) as i64) as usize;
                        let chunk = len.div_ceil(k);
                        (0..k)
                            .map(|i| chunk.min(len.saturating_sub(i * chunk)))
                            .collect()
                    }
                };
            if sizes.len() > ctx.node.output.len().max(1) || sizes.iter().sum::<usize>() != len {
                return Err(ctx.unsupported(format!("split sizes {sizes:?} for an axis of {len}")));
            }
            let mut outs = Vec::with_capacity(sizes.len());
            let mut start = 0;
            for s in sizes {
                let ranges: Vec<(usize, i64, usize)> = (0..rank)
                    .map(|k| {
                        if k == ax {
                            (start, 1, s)
                        } else {
                            (0, 1, x.dims[k])
                        }
                    })
                    .collect();
                let (dims, data) = nd::slice(&x.dims, &x.data, &ranges);
                outs.push(Nd { dims, data });
                start += s;
            }
            return Ok(outs);
        }
        "Slice" => {
            let (starts, ends, axes, steps) = match ctx.attr_ints("starts") {
                // opset < 10: attributes
                Some(s) => (
                    s.to_vec(),
                    ctx.attr_ints("ends").unwrap_or_default().to_vec(),
                    ctx.attr_ints("axes").map(|a| a.to_vec()),
                    None,
                ),
                None => (
                    ints(inputs.konst(ctx, 1, "starts")?),
                    ints(inputs.konst(ctx, 2, "ends")?),
                    inputs.opt_konst(ctx, 3, "axes")?.map(ints),
                    inputs.opt_konst(ctx, 4, "steps")?.map(ints),
                ),
            };
            let axes = axes.unwrap_or_else(|| (0..starts.len() as i64).collect());
            let steps = steps.unwrap_or_else(|| vec![1; starts.len()]);
            if ends.len() != starts.len()
                || axes.len() != starts.len()
                || steps.len() != starts.len()
            {
                return Err(ctx.unsupported("starts, ends, axes and steps differ in length"));
            }
            let mut ranges: Vec<(usize, i64, usize)> = x.dims.iter().map(|&d| (0, 1, d)).collect();
            for k in 0..starts.len() {
                let ax =
                    nd::axis(axes[k], rank).ok_or_else(|| ctx.unsupported("axis out of range"))?;
                let r = nd::slice_range(x.dims[ax], starts[k], ends[k], steps[k])
                    .ok_or_else(|| ctx.unsupported("step 0"))?;
                if dynamic && ax == 0 && r != (0, 1, x.dims[0]) {
                    return Err(ctx.unsupported("slices the batch axis"));
                }
                ranges[ax] = r;
            }
            let (dims, data) = nd::slice(&x.dims, &x.data, &ranges);
            Nd { dims, data }
        }
        "Gather" => {
            let idx = inputs.konst(ctx, 1, "the indices")?;
            let ax = axis_of(ctx, ctx.attr_i("axis", 0), rank, dynamic)?;
            let (dims, data) = nd::gather(&x.dims, &x.data, ax, &idx.dims, &idx.data)
                .ok_or_else(|| ctx.unsupported("index out of range"))?;
            Nd { dims, data }
        }
        "Pad" => {
            let mode = ctx.attr_str("mode").unwrap_or_else(|| "constant".into());
            if mode != "constant" {
                return Err(ctx.unsupported(format!("mode={mode} (only constant)")));
            }
            let (pads, value) = match ctx.attr_ints("pads") {
                Some(p) => (p.to_vec(), ctx.attr_f("value", 0.0)),
                None => (
                    ints(inputs.konst(ctx, 1, "pads")?),
                    inputs
                        .opt_konst(ctx, 2, "constant_value")?
                        .and_then(|t| t.data.first().copied())
                        .unwrap_or(0.0),
                ),
            };
            let axes: Vec<usize> = match inputs.opt_konst(ctx, 3, "axes")? {
                Some(a) => ints(a)
                    .iter()
                    .map(|&a| nd::axis(a, rank).ok_or_else(|| ctx.unsupported("axis out of range")))
                    .collect::<Result<_>>()?,
                None => (0..rank).collect(),
            };
            if pads.len() != 2 * axes.len() || pads.iter().any(|&p| p < 0) {
                return Err(ctx.unsupported(format!("pads {pads:?} (non-negative, two per axis)")));
            }
            let mut full = vec![0usize; 2 * rank];
            for (k, &ax) in axes.iter().enumerate() {
                full[ax] = pads[k] as usize;
                full[ax + rank] = pads[k + axes.len()] as usize;
            }
            if dynamic && (full[0] != 0 || full[rank] != 0) {
                return Err(ctx.unsupported("pads the batch axis"));
            }
            let (dims, data) = nd::pad(&x.dims, &x.data, &full, T::constant(value))
                .ok_or_else(|| ctx.unsupported("padded tensor too large"))?;
            Nd { dims, data }
        }
        "Expand" => {
            let target = shape_of(inputs.konst(ctx, 1, "the shape")?);
            let (dims, pairs) = nd::broadcast(&x.dims, &target)
                .ok_or_else(|| ctx.unsupported("shapes do not broadcast"))?;
            Nd {
                dims,
                data: pairs.iter().map(|&(i, _)| x.data[i].clone()).collect(),
            }
        }
        _ => return Err(ctx.unsupported("unknown op")),
    };
    Ok(vec![out])
}
