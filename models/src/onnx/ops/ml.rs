//! The ai.onnx.ml ops scikit-learn exports write: Scaler (linear), LinearClassifier (the
//! scores, then a clear-text tail), LinearRegressor; tree ensembles live in `trees.rs`.

use super::super::symbolic::{Elem, GraphBuilder};
use super::{Inputs, NodeCtx};
use crate::error::Result;
use crate::graph::{Activation, Lin, TailOp};
use crate::onnx::{Nd, NodeEffect, Value};

pub(crate) fn map(ctx: &NodeCtx, b: &mut GraphBuilder, inputs: &Inputs) -> Result<NodeEffect> {
    if matches!(
        ctx.node.op_type.as_str(),
        "TreeEnsembleClassifier" | "TreeEnsembleRegressor"
    ) {
        return super::trees::tree_ensemble(ctx, b, inputs);
    }
    let x = inputs.dynamic(ctx, 0)?;
    let n = x.data.len();
    if x.dims.len() != 2 {
        return Err(ctx.unsupported(format!("input of shape {:?}; flatten it first", x.dims)));
    }
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
            let data = x
                .data
                .iter()
                .zip(offset.iter().zip(&scale))
                .map(|(e, (o, s))| e.affine(*s, -o * s))
                .collect();
            Ok(NodeEffect::Values(vec![Value::Dyn(Nd {
                dims: x.dims.clone(),
                data,
            })]))
        }
        "LinearClassifier" => linear_classifier(ctx, &x.data),
        "LinearRegressor" => super::trees::linear_regressor(ctx, b, &x.data),
        "Normalizer" | "ZipMap" => Err(ctx.unsupported("must follow a classifier's scores")),
        _ => Err(ctx.unsupported("unknown ai.onnx.ml op")),
    }
}

fn linear_classifier(ctx: &NodeCtx, x: &[Elem]) -> Result<NodeEffect> {
    let n = x.len();
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
    // String labels become class indices, in the order the exporter lists them.
    let labels: Option<Vec<i64>> = ctx
        .attr_ints("classlabels_ints")
        .filter(|v| !v.is_empty())
        .map(|v| v.to_vec())
        .or_else(|| {
            ctx.attr("classlabels_strings")
                .filter(|a| !a.strings.is_empty())
                .map(|a| (0..a.strings.len() as i64).collect())
        });
    let n_classes = labels.as_ref().map_or(rows_n.max(2), Vec::len);
    let binary = rows_n == 1;
    if binary && n_classes != 2 {
        return Err(ctx.unsupported(format!("one coefficient row for {n_classes} classes")));
    }
    if !binary && rows_n != n_classes {
        return Err(ctx.unsupported(format!("{rows_n} coefficient rows for {n_classes} classes")));
    }
    let data = (0..rows_n)
        .map(|r| {
            Elem::linear(Lin::combine(
                (0..n).map(|i| (coefs[r * n + i] as f64, &*x[i].lin)),
                intercepts[r],
            ))
        })
        .collect();
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
        scores: Nd {
            dims: vec![1, rows_n],
            data,
        },
        ops,
        class_labels: labels,
    })
}
