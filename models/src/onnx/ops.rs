//! The op mapping: what each supported ONNX node does to the chain.

use super::{NodeEffect, SUPPORTED_OPS, Tensor, pb};
use crate::error::{ModelError, Result};
use crate::ir::{Activation, Affine, TailOp};

pub(crate) struct NodeCtx<'a> {
    pub node: &'a pb::NodeProto,
    pub name: &'a str,
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
        return Ok(Tensor {
            dims: vec![],
            data: vec![a.f as f64],
        });
    }
    if let Some(a) = ctx.attr("value_floats") {
        return Ok(Tensor {
            dims: vec![a.floats.len()],
            data: a.floats.iter().map(|&v| v as f64).collect(),
        });
    }
    if let Some(a) = ctx.attr("value_int") {
        return Ok(Tensor {
            dims: vec![],
            data: vec![a.i as f64],
        });
    }
    if let Some(a) = ctx.attr("value_ints") {
        return Ok(Tensor {
            dims: vec![a.ints.len()],
            data: a.ints.iter().map(|&v| v as f64).collect(),
        });
    }
    Err(ctx.unsupported("Constant without a tensor, float(s) or int(s) value"))
}

/// Ops that only turn scores into probabilities or a label, and may follow the tail.
pub(crate) fn is_tail_op(node: &pb::NodeProto) -> bool {
    matches!(
        node.op_type.as_str(),
        "Softmax"
            | "ArgMax"
            | "Cast"
            | "Identity"
            | "ZipMap"
            | "Normalizer"
            | "ArrayFeatureExtractor"
            | "Flatten"
            | "Reshape"
    )
}

/// The clear-text ops a tail node adds when it reads the scores themselves.
pub(crate) fn tail_ops_of(ctx: &NodeCtx) -> Result<Vec<TailOp>> {
    Ok(match ctx.node.op_type.as_str() {
        "Softmax" => vec![TailOp::Softmax],
        _ => vec![],
    })
}

fn n_elems(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// A diagonal affine map `y_i = scale_i * x_i + offset_i`.
fn diagonal(scale: &[f64], offset: &[f64]) -> Affine {
    Affine {
        n_in: scale.len(),
        rows: scale
            .iter()
            .enumerate()
            .map(|(i, &s)| {
                if s == 0.0 {
                    vec![]
                } else {
                    vec![(i as u32, s)]
                }
            })
            .collect(),
        bias: offset.to_vec(),
    }
}

/// Maps one node on the main chain. `main_pos` is the index of the input holding the
/// activation; `consts[i]` holds input `i` when it is a constant.
pub(crate) fn map_node(
    ctx: &NodeCtx,
    shape: &[usize],
    main_pos: usize,
    consts: &[Option<Tensor>],
) -> Result<NodeEffect> {
    let op = ctx.node.op_type.as_str();
    if ctx.is_ml() {
        return map_ml_node(ctx, shape, consts);
    }
    if !ctx.is_default_domain() {
        return Err(ctx.unsupported(format!("unknown op domain '{}'", ctx.node.domain)));
    }
    let n = n_elems(shape);
    let konst = |i: usize, what: &str| -> Result<&Tensor> {
        consts.get(i).and_then(|c| c.as_ref()).ok_or_else(|| {
            ctx.unsupported(format!("{what} (input {i}) must be a constant initializer"))
        })
    };
    let act = |a: Activation| Ok(NodeEffect::Activation(a));
    match op {
        "Identity" | "Dropout" => Ok(NodeEffect::PassThrough),
        "Cast" => {
            // float, double or float16 keep the values; anything else would truncate them
            let to = ctx.attr_i("to", 1);
            if matches!(to, 1 | 10 | 11 | 16) {
                Ok(NodeEffect::PassThrough)
            } else {
                Err(ctx.unsupported(format!("Cast to element type {to} inside the model")))
            }
        }
        "Flatten" => {
            let axis = ctx.attr_i("axis", 1);
            if axis != 1 {
                return Err(ctx.unsupported(format!(
                    "Flatten with axis={axis} (only axis=1, which keeps the batch dimension)"
                )));
            }
            Ok(NodeEffect::Reshape(vec![n]))
        }
        "Reshape" => {
            let target = konst(1, "the shape")?;
            reshape(ctx, shape, &target.data).map(NodeEffect::Reshape)
        }
        "Relu" => act(Activation::Relu),
        "Sigmoid" => act(Activation::Sigmoid),
        "Tanh" => act(Activation::Tanh),
        "LeakyRelu" => act(Activation::LeakyRelu {
            alpha: ctx.attr_f("alpha", 0.01),
        }),
        "Elu" => act(Activation::Elu {
            alpha: ctx.attr_f("alpha", 1.0),
        }),
        "Selu" => act(Activation::Selu {
            alpha: ctx.attr_f("alpha", 1.673_263_192_176_818_8),
            gamma: ctx.attr_f("gamma", 1.050_701_022_148_132_3),
        }),
        "Softplus" => act(Activation::Softplus),
        "Softsign" => act(Activation::Softsign),
        "HardSigmoid" => act(Activation::HardSigmoid {
            alpha: ctx.attr_f("alpha", 0.2),
            beta: ctx.attr_f("beta", 0.5),
        }),
        "HardSwish" => act(Activation::HardSwish),
        "Abs" => act(Activation::Abs),
        "Neg" => act(Activation::Neg),
        "Exp" => act(Activation::Exp),
        "Clip" => {
            // opset >= 11: min and max are optional inputs; before: attributes
            let bound = |i: usize, attr: &str, default: f64| -> Result<f64> {
                match consts.get(i).and_then(|c| c.as_ref()) {
                    Some(t) if t.len() == 1 => Ok(t.data[0]),
                    Some(_) => Err(ctx.unsupported("Clip bounds must be scalars")),
                    None => Ok(ctx.attr_f(attr, default)),
                }
            };
            act(Activation::Clip {
                min: bound(1, "min", f64::NEG_INFINITY)?,
                max: bound(2, "max", f64::INFINITY)?,
            })
        }
        "Softmax" => {
            let axis = ctx.attr_i("axis", -1);
            if shape.len() != 1 || !(axis == -1 || axis == 1) {
                return Err(ctx.unsupported(
                    "Softmax over anything but the last axis of a flat score vector",
                ));
            }
            Ok(NodeEffect::StartTail {
                affine: None,
                ops: vec![TailOp::Softmax],
                class_labels: None,
            })
        }
        "ArgMax" => Ok(NodeEffect::StartTail {
            affine: None,
            ops: vec![],
            class_labels: None,
        }),
        "Gemm" => gemm(ctx, shape, consts),
        "MatMul" => {
            if main_pos != 0 {
                return Err(ctx.unsupported("MatMul with the activation as the right operand"));
            }
            if shape.len() != 1 {
                return Err(ctx.unsupported(format!(
                    "MatMul on an activation of shape {shape:?} (only flat vectors)"
                )));
            }
            let w = konst(1, "the weight matrix")?;
            if w.dims.len() != 2 || w.dims[0] != n {
                return Err(ctx.unsupported(format!(
                    "weight of shape {:?} for an input of {n} features",
                    w.dims
                )));
            }
            let m = w.dims[1];
            let rows = (0..m)
                .map(|o| {
                    (0..n)
                        .filter_map(|i| {
                            let v = w.data[i * m + o];
                            (v != 0.0).then_some((i as u32, v))
                        })
                        .collect()
                })
                .collect();
            Ok(NodeEffect::Affine(
                Affine {
                    n_in: n,
                    rows,
                    bias: vec![0.0; m],
                },
                vec![m],
            ))
        }
        "Add" | "Sub" | "Mul" | "Div" => {
            let other = 1 - main_pos.min(1);
            let c = konst(other, "the other operand")?;
            let c = c.broadcast_to_sample(shape).ok_or_else(|| {
                ctx.unsupported(format!(
                    "constant of shape {:?} does not broadcast to the activation's shape {shape:?}",
                    c.dims
                ))
            })?;
            let ones = vec![1.0; n];
            let zeros = vec![0.0; n];
            let neg: Vec<f64> = c.iter().map(|v| -v).collect();
            let a = match (op, main_pos) {
                ("Add", _) => diagonal(&ones, &c),
                ("Sub", 0) => diagonal(&ones, &neg),
                ("Sub", _) => diagonal(&vec![-1.0; n], &c),
                ("Mul", _) => diagonal(&c, &zeros),
                ("Div", 0) => {
                    if c.contains(&0.0) {
                        return Err(ctx.unsupported("division by zero"));
                    }
                    let inv: Vec<f64> = c.iter().map(|v| 1.0 / v).collect();
                    diagonal(&inv, &zeros)
                }
                _ => return Err(ctx.unsupported("dividing a constant by the activation")),
            };
            Ok(NodeEffect::Affine(a, shape.to_vec()))
        }
        "BatchNormalization" => {
            if ctx.attr_i("training_mode", 0) != 0 {
                return Err(ctx.unsupported("training_mode=1"));
            }
            let eps = ctx.attr_f("epsilon", 1e-5);
            let (scale, bias, mean, var) = (
                konst(1, "scale")?,
                konst(2, "B")?,
                konst(3, "input_mean")?,
                konst(4, "input_var")?,
            );
            let channels = shape[0];
            if [scale, bias, mean, var].iter().any(|t| t.len() != channels) {
                return Err(ctx.unsupported(format!(
                    "parameters do not have one value per channel ({channels})"
                )));
            }
            let per_channel = n / channels;
            let mut s = Vec::with_capacity(n);
            let mut o = Vec::with_capacity(n);
            for c in 0..channels {
                let k = scale.data[c] / (var.data[c] + eps).sqrt();
                for _ in 0..per_channel {
                    s.push(k);
                    o.push(bias.data[c] - k * mean.data[c]);
                }
            }
            Ok(NodeEffect::Affine(diagonal(&s, &o), shape.to_vec()))
        }
        "Conv" => conv(ctx, shape, consts),
        "AveragePool" => average_pool(ctx, shape),
        "GlobalAveragePool" => {
            if shape.len() < 2 {
                return Err(ctx.unsupported("GlobalAveragePool needs a [C, spatial...] input"));
            }
            let c = shape[0];
            let per = n / c;
            let rows = (0..c)
                .map(|ch| {
                    (0..per)
                        .map(|k| ((ch * per + k) as u32, 1.0 / per as f64))
                        .collect()
                })
                .collect();
            let mut out = vec![c];
            out.extend(std::iter::repeat_n(1, shape.len() - 1));
            Ok(NodeEffect::Affine(
                Affine {
                    n_in: n,
                    rows,
                    bias: vec![0.0; c],
                },
                out,
            ))
        }
        "MaxPool" => Err(ctx
            .unsupported("MaxPool is not linear and would cost many bootstraps; use AveragePool")),
        _ => Err(ctx.unsupported("unknown op")),
    }
}

fn reshape(ctx: &NodeCtx, shape: &[usize], target: &[f64]) -> Result<Vec<usize>> {
    let n = n_elems(shape);
    if target.is_empty() {
        return Err(ctx.unsupported("empty target shape"));
    }
    // The first entry is the batch dimension: -1, 0 (copy) or 1.
    let b = target[0] as i64;
    if !matches!(b, -1..=1) {
        return Err(ctx.unsupported(format!(
            "target shape {target:?} must keep the batch dimension first (-1, 0 or 1)"
        )));
    }
    let mut out = Vec::new();
    let mut infer_at = None;
    for (k, &d) in target[1..].iter().enumerate() {
        match d as i64 {
            -1 if infer_at.is_none() && b != -1 => {
                infer_at = Some(k);
                out.push(1);
            }
            0 if k + 1 < shape.len() + 1 && k < shape.len() => out.push(shape[k]),
            d if d > 0 => out.push(d as usize),
            _ => return Err(ctx.unsupported(format!("target shape {target:?}"))),
        }
    }
    let known: usize = out.iter().product();
    if let Some(k) = infer_at {
        if known == 0 || !n.is_multiple_of(known) {
            return Err(ctx.unsupported(format!("cannot reshape {shape:?} to {target:?}")));
        }
        out[k] = n / known;
    }
    if n_elems(&out) != n {
        return Err(ctx.unsupported(format!(
            "cannot reshape {shape:?} ({n} values per sample) to {target:?}"
        )));
    }
    Ok(out)
}

fn gemm(ctx: &NodeCtx, shape: &[usize], consts: &[Option<Tensor>]) -> Result<NodeEffect> {
    if shape.len() != 1 {
        return Err(ctx.unsupported(format!(
            "Gemm on an activation of shape {shape:?}; flatten it first"
        )));
    }
    ctx.require_attr_i("transA", &[0], 0)?;
    let n = shape[0];
    let trans_b = ctx.attr_i("transB", 0) != 0;
    let alpha = ctx.attr_f("alpha", 1.0);
    let beta = ctx.attr_f("beta", 1.0);
    let w = consts
        .get(1)
        .and_then(|c| c.as_ref())
        .ok_or_else(|| ctx.unsupported("B must be a constant initializer"))?;
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
    let at = |i: usize, o: usize| {
        if trans_b {
            w.data[o * n + i]
        } else {
            w.data[i * m + o]
        }
    };
    let rows = (0..m)
        .map(|o| {
            (0..n)
                .filter_map(|i| {
                    let v = alpha * at(i, o);
                    (v != 0.0).then_some((i as u32, v))
                })
                .collect()
        })
        .collect();
    let bias = match consts.get(2).and_then(|c| c.as_ref()) {
        Some(c) => c
            .broadcast_to_sample(&[m])
            .ok_or_else(|| ctx.unsupported(format!("C of shape {:?}", c.dims)))?
            .into_iter()
            .map(|v| beta * v)
            .collect(),
        None if ctx.node.input.get(2).is_some_and(|i| !i.is_empty()) => {
            return Err(ctx.unsupported("C must be a constant initializer"));
        }
        None => vec![0.0; m],
    };
    Ok(NodeEffect::Affine(
        Affine {
            n_in: n,
            rows,
            bias,
        },
        vec![m],
    ))
}

/// Spatial attributes shared by Conv and AveragePool.
struct Window {
    kernel: [usize; 2],
    strides: [usize; 2],
    dilations: [usize; 2],
    /// top, left, bottom, right
    pads: [usize; 4],
}

impl Window {
    fn read(ctx: &NodeCtx, kernel: [usize; 2], in_hw: [usize; 2]) -> Result<Self> {
        let two = |name: &str| -> Result<[usize; 2]> {
            match ctx.attr_ints(name) {
                None => Ok([1, 1]),
                Some([a, b]) if *a > 0 && *b > 0 => Ok([*a as usize, *b as usize]),
                Some(v) => Err(ctx.unsupported(format!("{name}={v:?}"))),
            }
        };
        let strides = two("strides")?;
        let dilations = two("dilations")?;
        let auto_pad = ctx.attr_str("auto_pad").unwrap_or_default();
        let pads = match auto_pad.as_str() {
            "" | "NOTSET" => match ctx.attr_ints("pads") {
                None => [0; 4],
                Some([a, b, c, d]) if [a, b, c, d].iter().all(|v| **v >= 0) => {
                    [*a as usize, *b as usize, *c as usize, *d as usize]
                }
                Some(v) => return Err(ctx.unsupported(format!("pads={v:?}"))),
            },
            "VALID" => [0; 4],
            "SAME_UPPER" | "SAME_LOWER" => {
                let mut p = [0; 4];
                for ax in 0..2 {
                    let out = in_hw[ax].div_ceil(strides[ax]);
                    let span = dilations[ax] * (kernel[ax] - 1) + 1;
                    let total = ((out - 1) * strides[ax] + span).saturating_sub(in_hw[ax]);
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
            kernel,
            strides,
            dilations,
            pads,
        })
    }

    fn out_hw(&self, ctx: &NodeCtx, in_hw: [usize; 2]) -> Result<[usize; 2]> {
        let mut out = [0; 2];
        for ax in 0..2 {
            let span = self.dilations[ax] * (self.kernel[ax] - 1) + 1;
            let padded = in_hw[ax] + self.pads[ax] + self.pads[ax + 2];
            if padded < span {
                return Err(ctx.unsupported("kernel larger than the padded input"));
            }
            out[ax] = (padded - span) / self.strides[ax] + 1;
        }
        Ok(out)
    }

    /// Input coordinate for output `o`, kernel tap `k`, on axis `ax`; None in the padding.
    fn input_at(&self, ax: usize, o: usize, k: usize, size: usize) -> Option<usize> {
        let pos = (o * self.strides[ax] + k * self.dilations[ax]) as isize - self.pads[ax] as isize;
        (pos >= 0 && (pos as usize) < size).then_some(pos as usize)
    }
}

fn conv(ctx: &NodeCtx, shape: &[usize], consts: &[Option<Tensor>]) -> Result<NodeEffect> {
    let w = consts
        .get(1)
        .and_then(|c| c.as_ref())
        .ok_or_else(|| ctx.unsupported("the weight must be a constant initializer"))?;
    if shape.len() != 3 || w.dims.len() != 4 {
        return Err(ctx.unsupported(format!(
            "only 2-D convolution (input [C,H,W], weight [M,C/group,kH,kW]); got input {shape:?}, weight {:?}",
            w.dims
        )));
    }
    let [c_in, h, wd] = [shape[0], shape[1], shape[2]];
    let [m, cg, kh, kw] = [w.dims[0], w.dims[1], w.dims[2], w.dims[3]];
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
    if let Some(k) = ctx.attr_ints("kernel_shape")
        && k != [kh as i64, kw as i64]
    {
        return Err(ctx.unsupported(format!("kernel_shape {k:?} disagrees with the weight")));
    }
    let win = Window::read(ctx, [kh, kw], [h, wd])?;
    let [oh, ow] = win.out_hw(ctx, [h, wd])?;
    let bias = match consts.get(2).and_then(|c| c.as_ref()) {
        Some(b) if b.len() == m => b.data.clone(),
        Some(b) => return Err(ctx.unsupported(format!("bias of shape {:?}", b.dims))),
        None => vec![0.0; m],
    };
    let m_per_group = m / group;
    let mut rows = Vec::with_capacity(m * oh * ow);
    let mut out_bias = Vec::with_capacity(m * oh * ow);
    for (oc, &oc_bias) in bias.iter().enumerate() {
        let g = oc / m_per_group;
        for y in 0..oh {
            for x in 0..ow {
                let mut row = Vec::new();
                for ci in 0..cg {
                    let c = g * cg + ci;
                    for ky in 0..kh {
                        let Some(iy) = win.input_at(0, y, ky, h) else {
                            continue;
                        };
                        for kx in 0..kw {
                            let Some(ix) = win.input_at(1, x, kx, wd) else {
                                continue;
                            };
                            let v = w.data[((oc * cg + ci) * kh + ky) * kw + kx];
                            if v != 0.0 {
                                row.push(((c * h + iy) * wd + ix, v));
                            }
                        }
                    }
                }
                row.sort_unstable_by_key(|e| e.0);
                rows.push(row.into_iter().map(|(c, v)| (c as u32, v)).collect());
                out_bias.push(oc_bias);
            }
        }
    }
    Ok(NodeEffect::Affine(
        Affine {
            n_in: c_in * h * wd,
            rows,
            bias: out_bias,
        },
        vec![m, oh, ow],
    ))
}

fn average_pool(ctx: &NodeCtx, shape: &[usize]) -> Result<NodeEffect> {
    if shape.len() != 3 {
        return Err(ctx.unsupported(format!("only 2-D pooling over [C,H,W]; got {shape:?}")));
    }
    ctx.require_attr_i("ceil_mode", &[0], 0)?;
    let kernel = match ctx.attr_ints("kernel_shape") {
        Some([a, b]) if *a > 0 && *b > 0 => [*a as usize, *b as usize],
        other => return Err(ctx.unsupported(format!("kernel_shape={other:?}"))),
    };
    let include_pad = ctx.attr_i("count_include_pad", 0) != 0;
    let [c, h, w] = [shape[0], shape[1], shape[2]];
    let win = Window::read(ctx, kernel, [h, w])?;
    if win.dilations != [1, 1] {
        return Err(ctx.unsupported("dilated pooling"));
    }
    let [oh, ow] = win.out_hw(ctx, [h, w])?;
    let mut rows = Vec::with_capacity(c * oh * ow);
    for ch in 0..c {
        for y in 0..oh {
            for x in 0..ow {
                let mut taps = Vec::new();
                for ky in 0..kernel[0] {
                    for kx in 0..kernel[1] {
                        if let (Some(iy), Some(ix)) =
                            (win.input_at(0, y, ky, h), win.input_at(1, x, kx, w))
                        {
                            taps.push(((ch * h + iy) * w + ix) as u32);
                        }
                    }
                }
                let count = if include_pad {
                    kernel[0] * kernel[1]
                } else {
                    taps.len()
                };
                taps.sort_unstable();
                rows.push(taps.into_iter().map(|t| (t, 1.0 / count as f64)).collect());
            }
        }
    }
    let n_out = rows.len();
    Ok(NodeEffect::Affine(
        Affine {
            n_in: c * h * w,
            rows,
            bias: vec![0.0; n_out],
        },
        vec![c, oh, ow],
    ))
}

/// The ai.onnx.ml ops that scikit-learn exports write.
fn map_ml_node(ctx: &NodeCtx, shape: &[usize], _consts: &[Option<Tensor>]) -> Result<NodeEffect> {
    let n = n_elems(shape);
    match ctx.node.op_type.as_str() {
        "Scaler" => {
            // y = (x - offset) * scale, one value per feature or one for all
            let per_feature = |name: &str, default: f64| -> Result<Vec<f64>> {
                match ctx.attr_floats(name) {
                    None => Ok(vec![default; n]),
                    Some([v]) => Ok(vec![*v as f64; n]),
                    Some(v) if v.len() == n => Ok(v.iter().map(|&x| x as f64).collect()),
                    Some(v) => {
                        Err(ctx
                            .unsupported(format!("{name} has {} values for {n} features", v.len())))
                    }
                }
            };
            let offset = per_feature("offset", 0.0)?;
            let scale = per_feature("scale", 1.0)?;
            let bias: Vec<f64> = offset.iter().zip(&scale).map(|(o, s)| -o * s).collect();
            Ok(NodeEffect::Affine(diagonal(&scale, &bias), shape.to_vec()))
        }
        "LinearClassifier" => linear_classifier(ctx, shape),
        "Normalizer" | "ZipMap" => Err(ctx.unsupported("must follow a classifier's scores")),
        _ => Err(ctx.unsupported("unknown ai.onnx.ml op")),
    }
}

fn linear_classifier(ctx: &NodeCtx, shape: &[usize]) -> Result<NodeEffect> {
    if shape.len() != 1 {
        return Err(ctx.unsupported(format!("input of shape {shape:?}; flatten it first")));
    }
    let n = shape[0];
    let coefs = ctx
        .attr_floats("coefficients")
        .ok_or_else(|| ctx.unsupported("no coefficients"))?;
    if coefs.is_empty() || coefs.len() % n != 0 {
        return Err(ctx.unsupported(format!("{} coefficients for {n} features", coefs.len())));
    }
    let rows_n = coefs.len() / n;
    let intercepts: Vec<f64> = match ctx.attr_floats("intercepts") {
        Some(v) if v.len() == rows_n => v.iter().map(|&x| x as f64).collect(),
        None => vec![0.0; rows_n],
        Some(v) => {
            return Err(ctx.unsupported(format!("{} intercepts for {rows_n} classes", v.len())));
        }
    };
    // multi_class only changes how one-vs-rest label outputs break ties; the scores (and
    // the argmax the client takes) are the same, so it needs no handling.
    let labels: Option<Vec<i64>> = ctx
        .attr_ints("classlabels_ints")
        .filter(|v| !v.is_empty())
        .map(|v| v.to_vec());
    if labels.is_none() && ctx.attr("classlabels_strings").is_some() {
        return Err(ctx.unsupported("string class labels (only integer labels are supported)"));
    }
    let n_classes = labels.as_ref().map_or(rows_n.max(2), Vec::len);
    let binary = rows_n == 1;
    if binary && n_classes != 2 {
        return Err(ctx.unsupported(format!("one coefficient row for {n_classes} classes")));
    }
    if !binary && rows_n != n_classes {
        return Err(ctx.unsupported(format!("{rows_n} coefficient rows for {n_classes} classes")));
    }
    let rows = (0..rows_n)
        .map(|r| {
            (0..n)
                .filter_map(|i| {
                    let v = coefs[r * n + i] as f64;
                    (v != 0.0).then_some((i as u32, v))
                })
                .collect()
        })
        .collect();
    let affine = Affine {
        n_in: n,
        rows,
        bias: intercepts,
    };
    let post = ctx
        .attr_str("post_transform")
        .unwrap_or_else(|| "NONE".into());
    let mut ops = Vec::new();
    match (post.as_str(), binary) {
        ("NONE", true) => ops.push(TailOp::BinaryScores),
        ("NONE", false) => {}
        ("LOGISTIC", true) => {
            ops.push(TailOp::Activation(Activation::Sigmoid));
            ops.push(TailOp::BinaryProbabilities);
        }
        ("LOGISTIC", false) => ops.push(TailOp::Activation(Activation::Sigmoid)),
        ("SOFTMAX", true) => {
            ops.push(TailOp::BinaryScores);
            ops.push(TailOp::Softmax);
        }
        ("SOFTMAX", false) => ops.push(TailOp::Softmax),
        (other, _) => {
            return Err(ctx.unsupported(format!(
                "post_transform={other} (NONE, LOGISTIC and SOFTMAX are supported)"
            )));
        }
    }
    Ok(NodeEffect::StartTail {
        affine: Some((affine, vec![rows_n])),
        ops,
        class_labels: labels,
    })
}
