//! Linear ops with constant weights: Gemm, MatMul, Conv (1-D and 2-D), AveragePool,
//! GlobalAveragePool, BatchNormalization, ReduceMean and ReduceSum. Each output element is a
//! weighted sum of input elements: no bootstrap.

use super::super::nd;
use super::super::symbolic::Elem;
use super::{Inputs, NodeCtx};
use crate::error::Result;
use crate::graph::Lin;
use crate::onnx::{DynTensor, Nd, Tensor};

/// Most multiply-accumulates one linear node may describe (guards memory against hostile
/// shapes; real models are far below).
const MAX_TERMS: usize = 1 << 27;

fn check_terms(ctx: &NodeCtx, factors: &[usize]) -> Result<()> {
    match factors.iter().try_fold(1usize, |a, &f| a.checked_mul(f)) {
        Some(n) if n <= MAX_TERMS => Ok(()),
        _ => Err(ctx.unsupported(format!(
            "more than {MAX_TERMS} multiply-accumulates per sample"
        ))),
    }
}

/// One output element per row: `sum (w * x[c]) + bias`.
fn weighted(
    x: &DynTensor,
    rows: impl IntoIterator<Item = (Vec<(usize, f64)>, f64)>,
    dims: Vec<usize>,
) -> DynTensor {
    let data = rows
        .into_iter()
        .map(|(row, bias)| {
            Elem::linear(Lin::combine(
                row.into_iter().map(|(c, w)| (w, &*x.data[c].lin)),
                bias,
            ))
        })
        .collect();
    Nd { dims, data }
}

pub(crate) fn map(ctx: &NodeCtx, inputs: &Inputs) -> Result<DynTensor> {
    let x = inputs
        .dynamic(ctx, 0)
        .or_else(|e| match ctx.node.op_type.as_str() {
            // constant @ computed
            "MatMul" => inputs.dynamic(ctx, 1),
            _ => Err(e),
        })?;
    match ctx.node.op_type.as_str() {
        "Gemm" => gemm(ctx, x, inputs),
        "MatMul" => matmul(ctx, inputs),
        "Conv" => conv(ctx, x, inputs),
        "AveragePool" => average_pool(ctx, x),
        "GlobalAveragePool" => {
            let w = global_windows(ctx, x)?;
            let rows = w.taps.into_iter().map(|taps| {
                let k = 1.0 / taps.len().max(1) as f64;
                (taps.into_iter().map(|t| (t, k)).collect(), 0.0)
            });
            Ok(weighted(x, rows.collect::<Vec<_>>(), w.dims))
        }
        "BatchNormalization" => {
            if ctx.attr_i("training_mode", 0) != 0 {
                return Err(ctx.unsupported("training_mode=1"));
            }
            let eps = ctx.attr_f("epsilon", 1e-5);
            let (scale, bias, mean, var) = (
                inputs.konst(ctx, 1, "scale")?,
                inputs.konst(ctx, 2, "B")?,
                inputs.konst(ctx, 3, "input_mean")?,
                inputs.konst(ctx, 4, "input_var")?,
            );
            let channels = *x.dims.get(1).unwrap_or(&0);
            if [scale, bias, mean, var].iter().any(|t| t.len() != channels) {
                return Err(ctx.unsupported(format!(
                    "parameters do not have one value per channel ({channels})"
                )));
            }
            let per: usize = x.dims[2..].iter().product();
            let data = x
                .data
                .iter()
                .enumerate()
                .map(|(i, e)| {
                    let c = i / per;
                    let k = scale.data[c] / (var.data[c] + eps).sqrt();
                    e.affine(k, bias.data[c] - k * mean.data[c])
                })
                .collect();
            Ok(Nd {
                dims: x.dims.clone(),
                data,
            })
        }
        "ReduceMean" | "ReduceSum" => reduce(ctx, x, inputs),
        _ => Err(ctx.unsupported("unknown op")),
    }
}

fn gemm(ctx: &NodeCtx, x: &DynTensor, inputs: &Inputs) -> Result<DynTensor> {
    if x.dims.len() != 2 {
        return Err(ctx.unsupported(format!(
            "Gemm on a value of shape {:?}; flatten it first",
            x.dims
        )));
    }
    ctx.require_attr_i("transA", &[0], 0)?;
    let n = x.dims[1];
    let trans_b = ctx.attr_i("transB", 0) != 0;
    let alpha = ctx.attr_f("alpha", 1.0);
    let beta = ctx.attr_f("beta", 1.0);
    let w = inputs.konst(ctx, 1, "B")?;
    if w.dims.len() != 2 {
        return Err(ctx.unsupported(format!("B of shape {:?}", w.dims)));
    }
    let (k, m) = if trans_b {
        (w.dims[1], w.dims[0])
    } else {
        (w.dims[0], w.dims[1])
    };
    if k != n {
        return Err(ctx.unsupported(format!(
            "B of shape {:?} (transB={}) for an input of {n} features",
            w.dims, trans_b as i32
        )));
    }
    check_terms(ctx, &[n, m])?;
    let at = |i: usize, o: usize| {
        if trans_b {
            w.data[o * n + i]
        } else {
            w.data[i * m + o]
        }
    };
    let bias: Vec<f64> = match inputs.opt_konst(ctx, 2, "C")? {
        Some(c) => c
            .broadcast_to_sample(&[m])
            .ok_or_else(|| ctx.unsupported(format!("C of shape {:?}", c.dims)))?
            .into_iter()
            .map(|v| beta * v)
            .collect(),
        None => vec![0.0; m],
    };
    let rows = (0..m).map(|o| {
        let row = (0..n)
            .filter_map(|i| {
                let v = alpha * at(i, o);
                (v != 0.0).then_some((i, v))
            })
            .collect();
        (row, bias[o])
    });
    Ok(weighted(x, rows, vec![1, m]))
}

fn matmul(ctx: &NodeCtx, inputs: &Inputs) -> Result<DynTensor> {
    match (
        inputs.dynamic(ctx, 0),
        inputs.konst(ctx, 1, "the right operand"),
    ) {
        (Ok(a), Ok(w)) => {
            // [..., M, K] @ [K, N] (or [K])
            let r = a.dims.len();
            let kk = a.dims[r - 1];
            let (wk, nn, vec_b) = match w.dims.as_slice() {
                [k, n] => (*k, *n, false),
                [k] => (*k, 1, true),
                _ => return Err(ctx.unsupported(format!("weight of shape {:?}", w.dims))),
            };
            if wk != kk {
                return Err(ctx.unsupported(format!(
                    "weight of shape {:?} for an input of shape {:?}",
                    w.dims, a.dims
                )));
            }
            let outer = a.data.len() / kk.max(1);
            check_terms(ctx, &[outer, nn, kk])?;
            let mut dims = a.dims[..r - 1].to_vec();
            if !vec_b {
                dims.push(nn);
            }
            if dims.is_empty() || dims[0] != 1 {
                return Err(ctx.unsupported("contracts the batch dimension"));
            }
            let rows = (0..outer).flat_map(|o| {
                (0..nn).map(move |j| {
                    let row = (0..kk)
                        .filter_map(|k| {
                            let v = w.data[k * nn + j];
                            (v != 0.0).then_some((o * kk + k, v))
                        })
                        .collect();
                    (row, 0.0)
                })
            });
            Ok(weighted(a, rows.collect::<Vec<_>>(), dims))
        }
        _ => {
            // constant [M, K] @ computed [1, ..., K, N]
            let w = inputs.konst(
                ctx,
                0,
                "the left operand of a product of two computed tensors",
            )?;
            let b = inputs.dynamic(ctx, 1)?;
            let r = b.dims.len();
            let [m, kk] = w.dims[..] else {
                return Err(ctx.unsupported(format!("left weight of shape {:?}", w.dims)));
            };
            if r < 3 || b.dims[r - 2] != kk {
                return Err(ctx.unsupported(format!(
                    "left weight {:?} for a right operand of shape {:?}",
                    w.dims, b.dims
                )));
            }
            let nn = b.dims[r - 1];
            let outer = b.data.len() / (kk * nn).max(1);
            check_terms(ctx, &[outer, m, nn, kk])?;
            let mut dims = b.dims.clone();
            dims[r - 2] = m;
            let mut rows = Vec::with_capacity(outer * m * nn);
            for o in 0..outer {
                for i in 0..m {
                    for j in 0..nn {
                        let row = (0..kk)
                            .filter_map(|k| {
                                let v = w.data[i * kk + k];
                                (v != 0.0).then_some(((o * kk + k) * nn + j, v))
                            })
                            .collect();
                        rows.push((row, 0.0));
                    }
                }
            }
            Ok(weighted(b, rows, dims))
        }
    }
}

fn reduce(ctx: &NodeCtx, x: &DynTensor, inputs: &Inputs) -> Result<DynTensor> {
    let rank = x.dims.len();
    let axes: Option<Vec<i64>> = match ctx.attr_ints("axes") {
        Some(a) => Some(a.to_vec()),
        None => inputs
            .opt_konst(ctx, 1, "axes")?
            .map(|t| t.data.iter().map(|&v| v as i64).collect()),
    };
    let axes: Vec<usize> = match axes {
        Some(a) if !a.is_empty() => a
            .iter()
            .map(|&a| nd::axis(a, rank).ok_or_else(|| ctx.unsupported("axis out of range")))
            .collect::<Result<_>>()?,
        _ if ctx.attr_i("noop_with_empty_axes", 0) != 0 => {
            return Ok(x.clone());
        }
        _ => (1..rank).collect(),
    };
    if axes.contains(&0) && x.dims[0] != 1 {
        return Err(ctx.unsupported("reduces over the batch axis"));
    }
    let keep = ctx.attr_i("keepdims", 1) != 0;
    let out_full: Vec<usize> = (0..rank)
        .map(|k| if axes.contains(&k) { 1 } else { x.dims[k] })
        .collect();
    let count: usize = axes.iter().map(|&a| x.dims[a]).product();
    let w = if ctx.node.op_type == "ReduceMean" {
        1.0 / count.max(1) as f64
    } else {
        1.0
    };
    let n_out: usize = out_full.iter().product();
    let mut rows: Vec<Vec<(usize, f64)>> = vec![Vec::new(); n_out];
    let in_st = nd::strides(&x.dims);
    let out_st = nd::strides(&out_full);
    for (i, row) in (0..x.data.len()).map(|i| {
        let mut o = 0;
        for k in 0..rank {
            let idx = (i / in_st[k]) % x.dims[k];
            if !axes.contains(&k) {
                o += idx * out_st[k];
            }
        }
        (i, o)
    }) {
        rows[row].push((i, w));
    }
    let dims = if keep {
        out_full
    } else {
        (0..rank)
            .filter(|k| !axes.contains(k))
            .map(|k| x.dims[k])
            .collect()
    };
    Ok(weighted(x, rows.into_iter().map(|r| (r, 0.0)), dims))
}

/// Spatial attributes shared by Conv and the pools, 1-D windows seen as 2-D of height 1.
pub(super) struct Window {
    pub kernel: [usize; 2],
    pub strides: [usize; 2],
    pub dilations: [usize; 2],
    /// top, left, bottom, right
    pub pads: [usize; 4],
    pub ceil: bool,
}

impl Window {
    /// `kernel` and `in_sp` have one entry per spatial axis (1 or 2).
    pub fn read(ctx: &NodeCtx, kernel: &[usize], in_sp: &[usize]) -> Result<Self> {
        let r = kernel.len();
        let lift = |v: &[usize], fill: usize| -> [usize; 2] {
            if r == 1 { [fill, v[0]] } else { [v[0], v[1]] }
        };
        let per_axis = |name: &str| -> Result<[usize; 2]> {
            match ctx.attr_ints(name) {
                None => Ok([1, 1]),
                Some(v) if v.len() == r && v.iter().all(|&x| x > 0) => {
                    Ok(lift(&v.iter().map(|&x| x as usize).collect::<Vec<_>>(), 1))
                }
                Some(v) => Err(ctx.unsupported(format!("{name}={v:?}"))),
            }
        };
        let strides = per_axis("strides")?;
        let dilations = per_axis("dilations")?;
        let kernel2 = lift(kernel, 1);
        let in2 = lift(in_sp, 1);
        let auto_pad = ctx.attr_str("auto_pad").unwrap_or_default();
        let pads = match auto_pad.as_str() {
            "" | "NOTSET" => match ctx.attr_ints("pads") {
                None => [0; 4],
                Some(v) if v.len() == 2 * r && v.iter().all(|&p| p >= 0) => {
                    let v: Vec<usize> = v.iter().map(|&p| p as usize).collect();
                    if r == 1 {
                        [0, v[0], 0, v[1]]
                    } else {
                        [v[0], v[1], v[2], v[3]]
                    }
                }
                Some(v) => return Err(ctx.unsupported(format!("pads={v:?}"))),
            },
            "VALID" => [0; 4],
            "SAME_UPPER" | "SAME_LOWER" => {
                let mut p = [0; 4];
                for ax in 0..2 {
                    let out = in2[ax].div_ceil(strides[ax]);
                    let span = dilations[ax] * (kernel2[ax] - 1) + 1;
                    let total = ((out - 1) * strides[ax] + span).saturating_sub(in2[ax]);
                    let (small, big) = (total / 2, total - total / 2);
                    let (begin, end) = if auto_pad == "SAME_UPPER" {
                        (small, big)
                    } else {
                        (big, small)
                    };
                    p[ax] = begin;
                    p[ax + 2] = end;
                }
                p
            }
            other => return Err(ctx.unsupported(format!("auto_pad={other}"))),
        };
        Ok(Window {
            kernel: kernel2,
            strides,
            dilations,
            pads,
            ceil: ctx.attr_i("ceil_mode", 0) != 0,
        })
    }

    pub fn out_hw(&self, ctx: &NodeCtx, in_hw: [usize; 2]) -> Result<[usize; 2]> {
        let mut out = [0; 2];
        for ax in 0..2 {
            let span = self.dilations[ax] * (self.kernel[ax] - 1) + 1;
            let padded = in_hw[ax] + self.pads[ax] + self.pads[ax + 2];
            if padded < span {
                return Err(ctx.unsupported("kernel larger than the padded input"));
            }
            let room = padded - span;
            let mut o = if self.ceil {
                room.div_ceil(self.strides[ax]) + 1
            } else {
                room / self.strides[ax] + 1
            };
            // The last window must start inside the input or its leading padding.
            if self.ceil && (o - 1) * self.strides[ax] >= in_hw[ax] + self.pads[ax] {
                o -= 1;
            }
            out[ax] = o;
        }
        Ok(out)
    }

    /// Signed input coordinate for output `o`, kernel tap `k`, on axis `ax`.
    pub fn coord(&self, ax: usize, o: usize, k: usize) -> isize {
        (o * self.strides[ax] + k * self.dilations[ax]) as isize - self.pads[ax] as isize
    }

    /// Input coordinate for output `o`, kernel tap `k`, on axis `ax`; None in the padding.
    pub fn input_at(&self, ax: usize, o: usize, k: usize, size: usize) -> Option<usize> {
        let pos = self.coord(ax, o, k);
        (pos >= 0 && (pos as usize) < size).then_some(pos as usize)
    }
}

/// `[1, C, H, W]` or `[1, C, L]` as (C, [H, W], spatial rank).
pub(super) fn spatial(ctx: &NodeCtx, dims: &[usize]) -> Result<(usize, [usize; 2], usize)> {
    match dims {
        [1, c, l] => Ok((*c, [1, *l], 1)),
        [1, c, h, w] => Ok((*c, [*h, *w], 2)),
        _ => Err(ctx.unsupported(format!(
            "only 1-D and 2-D spatial inputs ([N, C, L] or [N, C, H, W]); got {dims:?}"
        ))),
    }
}

fn out_dims(c: usize, o: [usize; 2], rank: usize) -> Vec<usize> {
    if rank == 1 {
        vec![1, c, o[1]]
    } else {
        vec![1, c, o[0], o[1]]
    }
}

fn conv(ctx: &NodeCtx, x: &DynTensor, inputs: &Inputs) -> Result<DynTensor> {
    let w: &Tensor = inputs.konst(ctx, 1, "the weight")?;
    let (c_in, [h, wd], rank) = spatial(ctx, &x.dims)?;
    if w.dims.len() != rank + 2 {
        return Err(ctx.unsupported(format!(
            "weight of shape {:?} for an input of shape {:?}",
            w.dims, x.dims
        )));
    }
    let (m, cg) = (w.dims[0], w.dims[1]);
    let (kh, kw) = if rank == 1 {
        (1, w.dims[2])
    } else {
        (w.dims[2], w.dims[3])
    };
    let group = ctx.attr_i("group", 1);
    if group < 1 || c_in % group as usize != 0 || m % group as usize != 0 {
        return Err(ctx.unsupported(format!("group={group} for {c_in} input channels")));
    }
    let group = group as usize;
    if cg != c_in / group {
        return Err(ctx.unsupported(format!(
            "weight has {cg} input channels per group, input has {c_in} channels in {group} groups"
        )));
    }
    let kernel_sp: Vec<usize> = w.dims[2..].to_vec();
    if let Some(k) = ctx.attr_ints("kernel_shape")
        && k.iter().map(|&v| v as usize).collect::<Vec<_>>() != kernel_sp
    {
        return Err(ctx.unsupported(format!("kernel_shape {k:?} disagrees with the weight")));
    }
    let in_sp: Vec<usize> = x.dims[2..].to_vec();
    let win = Window::read(ctx, &kernel_sp, &in_sp)?;
    let [oh, ow] = win.out_hw(ctx, [h, wd])?;
    check_terms(ctx, &[m, oh, ow, cg, kh, kw])?;
    let bias = match inputs.opt_konst(ctx, 2, "the bias")? {
        Some(b) if b.len() == m => b.data.clone(),
        Some(b) => return Err(ctx.unsupported(format!("bias of shape {:?}", b.dims))),
        None => vec![0.0; m],
    };
    let m_per_group = m / group;
    let mut rows = Vec::with_capacity(m * oh * ow);
    for (oc, &oc_bias) in bias.iter().enumerate() {
        let g = oc / m_per_group;
        for y in 0..oh {
            for xo in 0..ow {
                let mut row = Vec::new();
                for ci in 0..cg {
                    let c = g * cg + ci;
                    for ky in 0..kh {
                        let Some(iy) = win.input_at(0, y, ky, h) else {
                            continue;
                        };
                        for kx in 0..kw {
                            let Some(ix) = win.input_at(1, xo, kx, wd) else {
                                continue;
                            };
                            let v = w.data[((oc * cg + ci) * kh + ky) * kw + kx];
                            if v != 0.0 {
                                row.push(((c * h + iy) * wd + ix, v));
                            }
                        }
                    }
                }
                rows.push((row, oc_bias));
            }
        }
    }
    Ok(weighted(x, rows, out_dims(m, [oh, ow], rank)))
}

/// The windows of a pooling op, channel by channel.
pub(super) struct PoolWindows {
    /// Input indices of each window's taps inside the input.
    pub taps: Vec<Vec<usize>>,
    /// Taps of each window inside the input or its explicit padding (`count_include_pad`).
    pub padded_counts: Vec<usize>,
    pub dims: Vec<usize>,
}

/// One window per channel over all its spatial positions (GlobalAveragePool, GlobalMaxPool).
pub(super) fn global_windows(ctx: &NodeCtx, x: &DynTensor) -> Result<PoolWindows> {
    if x.dims.len() < 3 {
        return Err(ctx.unsupported("needs a [N, C, spatial...] input"));
    }
    let c = x.dims[1];
    let per: usize = x.dims[2..].iter().product();
    let mut dims = vec![1, c];
    dims.extend(std::iter::repeat_n(1, x.dims.len() - 2));
    Ok(PoolWindows {
        taps: (0..c)
            .map(|ch| (ch * per..(ch + 1) * per).collect())
            .collect(),
        padded_counts: vec![per; c],
        dims,
    })
}

/// The taps of each pooling window (input indices), channel by channel, and the output dims.
pub(super) fn pool_windows(ctx: &NodeCtx, x: &DynTensor) -> Result<PoolWindows> {
    let (c, [h, w], rank) = spatial(ctx, &x.dims)?;
    let kernel: Vec<usize> = match ctx.attr_ints("kernel_shape") {
        Some(k) if k.len() == rank && k.iter().all(|&v| v > 0) => {
            k.iter().map(|&v| v as usize).collect()
        }
        other => return Err(ctx.unsupported(format!("kernel_shape={other:?}"))),
    };
    let win = Window::read(ctx, &kernel, &x.dims[2..])?;
    let [oh, ow] = win.out_hw(ctx, [h, w])?;
    check_terms(ctx, &[c, oh, ow, win.kernel[0], win.kernel[1]])?;
    let mut windows = Vec::with_capacity(c * oh * ow);
    let mut counts = Vec::with_capacity(c * oh * ow);
    for ch in 0..c {
        for y in 0..oh {
            for xo in 0..ow {
                let mut taps = Vec::new();
                let mut in_padded = 0;
                for ky in 0..win.kernel[0] {
                    let cy = win.coord(0, y, ky);
                    for kx in 0..win.kernel[1] {
                        let cx = win.coord(1, xo, kx);
                        let inside_pads =
                            cy < (h + win.pads[2]) as isize && cx < (w + win.pads[3]) as isize;
                        in_padded += usize::from(inside_pads);
                        if cy >= 0 && (cy as usize) < h && cx >= 0 && (cx as usize) < w {
                            taps.push((ch * h + cy as usize) * w + cx as usize);
                        }
                    }
                }
                windows.push(taps);
                counts.push(in_padded);
            }
        }
    }
    Ok(PoolWindows {
        taps: windows,
        padded_counts: counts,
        dims: out_dims(c, [oh, ow], rank),
    })
}

fn average_pool(ctx: &NodeCtx, x: &DynTensor) -> Result<DynTensor> {
    let include_pad = ctx.attr_i("count_include_pad", 0) != 0;
    let PoolWindows {
        taps: windows,
        padded_counts: counts,
        dims,
    } = pool_windows(ctx, x)?;
    let rows = windows.into_iter().zip(counts).map(|(taps, padded)| {
        let count = if include_pad { padded } else { taps.len() };
        let w = 1.0 / count.max(1) as f64;
        (taps.into_iter().map(|t| (t, w)).collect(), 0.0)
    });
    Ok(weighted(x, rows.collect::<Vec<_>>(), dims))
}
