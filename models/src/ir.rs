//! The float model the importer produces: a chain of affine maps and element-wise
//! activations, then a tail computed in the clear by the client.
//!
//! Every linear ONNX op (Gemm, MatMul, Conv, AveragePool, BatchNormalization, Add/Sub/Mul/Div
//! by a constant, Scaler, Flatten/Reshape) becomes one sparse [`Affine`] map; neighbouring
//! affine maps are composed into one, and neighbouring activations into one lookup table.
//! So a model is always `Affine, Acts, Affine, Acts, ..., Affine`, which is exactly the shape
//! the FHE plan needs: linear sums without bootstrap, one bootstrap per activation.

use serde::{Deserialize, Serialize};

/// An element-wise function. Under FHE each one (or a chain of them) is a lookup table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Activation {
    Relu,
    Sigmoid,
    Tanh,
    LeakyRelu {
        alpha: f64,
    },
    Elu {
        alpha: f64,
    },
    Selu {
        alpha: f64,
        gamma: f64,
    },
    Softplus,
    Softsign,
    HardSigmoid {
        alpha: f64,
        beta: f64,
    },
    HardSwish,
    Clip {
        min: f64,
        max: f64,
    },
    Abs,
    Neg,
    Exp,
    /// `x * scale + offset`, from element-wise Mul/Add that follow an activation.
    Affine {
        scale: f64,
        offset: f64,
    },
}

impl Activation {
    pub fn apply(&self, x: f64) -> f64 {
        match *self {
            Activation::Relu => x.max(0.0),
            Activation::Sigmoid => 1.0 / (1.0 + (-x).exp()),
            Activation::Tanh => x.tanh(),
            Activation::LeakyRelu { alpha } => {
                if x >= 0.0 {
                    x
                } else {
                    alpha * x
                }
            }
            Activation::Elu { alpha } => {
                if x >= 0.0 {
                    x
                } else {
                    alpha * (x.exp() - 1.0)
                }
            }
            Activation::Selu { alpha, gamma } => {
                if x > 0.0 {
                    gamma * x
                } else {
                    gamma * alpha * (x.exp() - 1.0)
                }
            }
            Activation::Softplus => {
                // log(1 + e^x) without overflow for large x
                if x > 30.0 { x } else { x.exp().ln_1p() }
            }
            Activation::Softsign => x / (1.0 + x.abs()),
            Activation::HardSigmoid { alpha, beta } => (alpha * x + beta).clamp(0.0, 1.0),
            Activation::HardSwish => x * (x / 6.0 + 0.5).clamp(0.0, 1.0),
            Activation::Clip { min, max } => x.clamp(min, max),
            Activation::Abs => x.abs(),
            Activation::Neg => -x,
            Activation::Exp => x.exp(),
            Activation::Affine { scale, offset } => x * scale + offset,
        }
    }

    /// Applies a chain of activations in order.
    pub fn apply_chain(chain: &[Activation], x: f64) -> f64 {
        chain.iter().fold(x, |v, a| a.apply(v))
    }
}

/// A sparse affine map `y = W x + b`: row `r` of `W` is `rows[r]`, a list of `(column, weight)`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Affine {
    pub n_in: usize,
    pub rows: Vec<Vec<(u32, f64)>>,
    pub bias: Vec<f64>,
}

impl Affine {
    pub fn identity(n: usize) -> Self {
        Affine {
            n_in: n,
            rows: (0..n).map(|i| vec![(i as u32, 1.0)]).collect(),
            bias: vec![0.0; n],
        }
    }

    pub fn n_out(&self) -> usize {
        self.rows.len()
    }

    pub fn apply(&self, x: &[f64]) -> Vec<f64> {
        self.rows
            .iter()
            .zip(&self.bias)
            .map(|(row, b)| row.iter().map(|&(c, w)| w * x[c as usize]).sum::<f64>() + b)
            .collect()
    }

    /// The map `next(self(x))`.
    pub fn then(&self, next: &Affine) -> Affine {
        assert_eq!(
            next.n_in,
            self.n_out(),
            "composing affine maps of mismatched sizes"
        );
        let mut dense = vec![0.0f64; self.n_in];
        let mut touched = vec![false; self.n_in];
        let mut rows = Vec::with_capacity(next.n_out());
        let mut bias = Vec::with_capacity(next.n_out());
        for (next_row, next_b) in next.rows.iter().zip(&next.bias) {
            let mut cols: Vec<u32> = Vec::new();
            let mut b = *next_b;
            for &(k, w) in next_row {
                b += w * self.bias[k as usize];
                for &(c, v) in &self.rows[k as usize] {
                    if !touched[c as usize] {
                        touched[c as usize] = true;
                        cols.push(c);
                    }
                    dense[c as usize] += w * v;
                }
            }
            cols.sort_unstable();
            let row = cols
                .iter()
                .filter_map(|&c| {
                    let v = std::mem::take(&mut dense[c as usize]);
                    touched[c as usize] = false;
                    (v != 0.0).then_some((c, v))
                })
                .collect();
            rows.push(row);
            bias.push(b);
        }
        Affine {
            n_in: self.n_in,
            rows,
            bias,
        }
    }
}

/// What the client does with the decrypted scores, in the clear.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum TailOp {
    Activation(Activation),
    /// Softmax over all outputs.
    Softmax,
    /// One score `s` becomes the two class scores `[-s, s]` (binary linear classifiers).
    BinaryScores,
    /// One probability `p` becomes `[1 - p, p]`.
    BinaryProbabilities,
}

/// The float model: `affine[0], acts[0], affine[1], ..., acts[n-2], affine[n-1]`, then `tail`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FloatModel {
    /// Shape of one sample, without the batch dimension (e.g. `[64]` or `[1, 8, 8]`).
    pub input_shape: Vec<usize>,
    pub affines: Vec<Affine>,
    /// `acts[i]` follows `affines[i]`; one fewer than `affines`.
    pub acts: Vec<Vec<Activation>>,
    pub tail: Vec<TailOp>,
    /// The label of each output class, when the exporter recorded them.
    pub class_labels: Option<Vec<i64>>,
}

impl FloatModel {
    pub fn n_features(&self) -> usize {
        self.input_shape.iter().product()
    }

    pub fn n_scores(&self) -> usize {
        self.affines.last().map_or(0, Affine::n_out)
    }

    /// Runs the float model up to the scores (the last affine map's outputs).
    pub fn scores(&self, x: &[f64]) -> Vec<f64> {
        let mut v = self.affines[0].apply(x);
        for (acts, affine) in self.acts.iter().zip(&self.affines[1..]) {
            v.iter_mut()
                .for_each(|e| *e = Activation::apply_chain(acts, *e));
            v = affine.apply(&v);
        }
        v
    }

    /// Runs the full float model, tail included: what the exported model outputs.
    pub fn outputs(&self, x: &[f64]) -> Vec<f64> {
        apply_tail(&self.tail, self.scores(x))
    }
}

/// Applies the clear-text tail to decrypted scores.
pub fn apply_tail(tail: &[TailOp], mut v: Vec<f64>) -> Vec<f64> {
    for op in tail {
        match op {
            TailOp::Activation(a) => v.iter_mut().for_each(|e| *e = a.apply(*e)),
            TailOp::Softmax => {
                let m = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let s: f64 = v.iter().map(|e| (e - m).exp()).sum();
                v.iter_mut().for_each(|e| *e = (*e - m).exp() / s);
            }
            TailOp::BinaryScores if v.len() == 1 => v = vec![-v[0], v[0]],
            TailOp::BinaryProbabilities if v.len() == 1 => v = vec![1.0 - v[0], v[0]],
            TailOp::BinaryScores | TailOp::BinaryProbabilities => {}
        }
    }
    v
}

/// The predicted class index for a model output vector: argmax, or for a single output a
/// threshold at `threshold` (0 for raw scores, 0.5 for probabilities).
pub fn predict_class(outputs: &[f64], single_output_threshold: f64) -> usize {
    if outputs.len() == 1 {
        return usize::from(outputs[0] > single_output_threshold);
    }
    let mut best = 0;
    for (i, v) in outputs.iter().enumerate() {
        if *v > outputs[best] {
            best = i;
        }
    }
    best
}

/// The threshold for a single-output model: 0.5 after a sigmoid-like tail, else 0.
pub fn single_output_threshold(tail: &[TailOp]) -> f64 {
    match tail.last() {
        Some(TailOp::Activation(Activation::Sigmoid | Activation::HardSigmoid { .. })) => 0.5,
        _ => 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn composition_matches_sequential_application() {
        let a = Affine {
            n_in: 3,
            rows: vec![vec![(0, 1.0), (2, -2.0)], vec![(1, 0.5)]],
            bias: vec![0.25, -1.0],
        };
        let b = Affine {
            n_in: 2,
            rows: vec![vec![(0, 3.0), (1, 1.0)], vec![(1, -1.0)], vec![]],
            bias: vec![0.0, 2.0, 7.0],
        };
        let x = [0.3, -1.2, 2.5];
        let seq = b.apply(&a.apply(&x));
        let comp = a.then(&b).apply(&x);
        for (s, c) in seq.iter().zip(&comp) {
            assert!((s - c).abs() < 1e-12, "{seq:?} vs {comp:?}");
        }
        assert_eq!(a.then(&b).n_out(), 3);
    }

    #[test]
    fn tail_binary_and_softmax() {
        let out = apply_tail(&[TailOp::BinaryScores, TailOp::Softmax], vec![0.0]);
        assert!((out[0] - 0.5).abs() < 1e-12 && (out[1] - 0.5).abs() < 1e-12);
        assert_eq!(predict_class(&[0.1, 0.7, 0.2], 0.0), 1);
        assert_eq!(predict_class(&[0.7], 0.5), 1);
        assert_eq!(predict_class(&[-0.2], 0.0), 0);
    }
}
