//! The clear-text parts of a model that the client runs or reads: element-wise functions,
//! the tail applied to decrypted scores, what the outputs mean and what they reveal. They are
//! part of the `.veil` wire format, so the compiler and the client share one definition.

use serde::{Deserialize, Serialize};

/// An element-wise function. Under FHE each one (or any univariate expression of them) is a
/// lookup table.
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
    Celu {
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
    Mish,
    ThresholdedRelu {
        alpha: f64,
    },
    Clip {
        min: f64,
        max: f64,
    },
    Abs,
    Exp,
    Log,
    Sqrt,
    Reciprocal,
    Erf,
    Sin,
    Cos,
    Sign,
    Floor,
    Ceil,
    /// Round half to even, as ONNX's Round.
    Round,
    /// `x^p` for a constant exponent.
    Pow {
        p: f64,
    },
    /// ONNX Gelu: `x * Phi(x)`, exact (erf) or with the tanh approximation.
    Gelu {
        tanh: bool,
    },
    /// `x >= 0 ? x : slope * x` (PRelu, one slope per element).
    PRelu {
        slope: f64,
    },
    /// A QuantizeLinear + DequantizeLinear pair.
    FakeQuant(Grid),
    /// A tree node's test, 1 when it holds and 0 otherwise. The input is compared in single
    /// precision, as onnxruntime compares its float tensors.
    Compare {
        rule: Rule,
        threshold: f64,
    },
    /// A function of a small integer `s`: `table[s - base]`, 0 outside the table (a tree's
    /// leaf values selected by the tests on their path; see `onnx/ops/trees.rs`).
    Select {
        base: i64,
        table: Vec<f64>,
    },
    /// The normal distribution's quantile function (ONNX-ML `PROBIT` post transform).
    Probit,
}

/// A tree node's branch rule (ONNX-ML `nodes_modes`): `x <rule> threshold` takes the true
/// branch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Rule {
    Leq,
    Lt,
    Geq,
    Gt,
    Eq,
    Neq,
}

impl Rule {
    pub fn holds(self, x: f64, t: f64) -> bool {
        let (x, t) = (x as f32, t as f32);
        match self {
            Rule::Leq => x <= t,
            Rule::Lt => x < t,
            Rule::Geq => x >= t,
            Rule::Gt => x > t,
            Rule::Eq => x == t,
            Rule::Neq => x != t,
        }
    }

    /// The rule whose test this one negates, so that both share one bootstrap.
    pub fn canonical(self) -> (Rule, bool) {
        match self {
            Rule::Leq | Rule::Lt | Rule::Eq => (self, false),
            Rule::Gt => (Rule::Leq, true),
            Rule::Geq => (Rule::Lt, true),
            Rule::Neq => (Rule::Eq, true),
        }
    }
}

/// An integer grid a model fixes (QuantizeLinear): `x = scale * (q - zero)`, `q` in
/// `qmin..=qmax`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Grid {
    pub scale: f64,
    pub zero: i64,
    pub qmin: i64,
    pub qmax: i64,
}

impl Grid {
    /// `scale * (clamp(round_half_even(x / scale) + zero, qmin, qmax) - zero)`.
    pub fn fake_quant(&self, x: f64) -> f64 {
        // max/min, not clamp: a grid from an untrusted spec with qmin > qmax must not panic.
        let q = (round_half_even(x / self.scale) + self.zero as f64)
            .max(self.qmin as f64)
            .min(self.qmax as f64);
        self.scale * (q - self.zero as f64)
    }
}

fn erf(x: f64) -> f64 {
    // Abramowitz-Stegun 7.1.26 is too coarse for an 11-bit table near 0; use the series /
    // continued fraction split of W. J. Cody's rational approximations via libm-free code.
    // A Taylor series converges fast for |x| < 2.5, the complement's asymptotic form beyond.
    let ax = x.abs();
    let r = if ax < 2.5 {
        let mut sum = ax;
        let mut term = ax;
        let x2 = ax * ax;
        let mut n = 0.0;
        while term.abs() > 1e-17 * sum.abs() {
            n += 1.0;
            term *= -x2 / n;
            sum += term / (2.0 * n + 1.0);
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        // erfc(x) ~ e^{-x^2} / (x sqrt(pi)) * continued fraction (Lentz), accurate for x >= 2.5
        let x2 = ax * ax;
        let mut f = ax;
        for k in (1..60).rev() {
            f = ax + (k as f64 / 2.0) / f;
        }
        1.0 - (-x2).exp() / (f * std::f64::consts::PI.sqrt())
    };
    r.copysign(x)
}

fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 {
        2.0 * (x / 2.0).round()
    } else {
        r
    }
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
            Activation::Celu { alpha } => x.max(0.0) + (alpha * ((x / alpha).exp() - 1.0)).min(0.0),
            Activation::Selu { alpha, gamma } => {
                if x > 0.0 {
                    gamma * x
                } else {
                    gamma * alpha * (x.exp() - 1.0)
                }
            }
            Activation::Softplus => softplus(x),
            Activation::Softsign => x / (1.0 + x.abs()),
            Activation::HardSigmoid { alpha, beta } => (alpha * x + beta).clamp(0.0, 1.0),
            Activation::HardSwish => x * (x / 6.0 + 0.5).clamp(0.0, 1.0),
            Activation::Mish => x * softplus(x).tanh(),
            Activation::ThresholdedRelu { alpha } => {
                if x > alpha {
                    x
                } else {
                    0.0
                }
            }
            Activation::Clip { min, max } => x.max(min).min(max),
            Activation::Abs => x.abs(),
            Activation::Exp => x.min(700.0).exp(),
            // Out-of-domain inputs only occur off the calibrated range; keep tables finite.
            Activation::Log => x.max(1e-30).ln(),
            Activation::Sqrt => x.max(0.0).sqrt(),
            Activation::Reciprocal => {
                if x.abs() < 1e-30 {
                    1e30f64.copysign(x)
                } else {
                    1.0 / x
                }
            }
            Activation::Erf => erf(x),
            Activation::Sin => x.sin(),
            Activation::Cos => x.cos(),
            Activation::Sign => {
                if x > 0.0 {
                    1.0
                } else if x < 0.0 {
                    -1.0
                } else {
                    0.0
                }
            }
            Activation::Floor => x.floor(),
            Activation::Ceil => x.ceil(),
            Activation::Round => round_half_even(x),
            Activation::Pow { p } => {
                let v = x.powf(p);
                if v.is_finite() { v } else { 0.0 }
            }
            Activation::Gelu { tanh: false } => 0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2)),
            Activation::Gelu { tanh: true } => {
                let c = (2.0 / std::f64::consts::PI).sqrt();
                0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
            }
            Activation::PRelu { slope } => {
                if x >= 0.0 {
                    x
                } else {
                    slope * x
                }
            }
            Activation::FakeQuant(g) => g.fake_quant(x),
            Activation::Compare { rule, threshold } => {
                f64::from(u8::from(rule.holds(x, threshold)))
            }
            Activation::Select { base, ref table } => (x.round() as i64)
                .checked_sub(base)
                .and_then(|i| usize::try_from(i).ok())
                .and_then(|i| table.get(i))
                .copied()
                .unwrap_or(0.0),
            Activation::Probit => std::f64::consts::SQRT_2 * erf_inv(2.0 * x - 1.0),
        }
    }
}

/// Inverse error function: Giles' single-precision polynomial (relative error below 1e-7 in
/// its range) refined by two Newton steps on `erf`.
fn erf_inv(y: f64) -> f64 {
    if y <= -1.0 {
        return f64::NEG_INFINITY;
    }
    if y >= 1.0 {
        return f64::INFINITY;
    }
    let w = -((1.0 - y) * (1.0 + y)).ln();
    let mut x = if w < 5.0 {
        let w = w - 2.5;
        let mut p = 2.810_226_36e-08;
        for c in [
            3.432_739_39e-07,
            -3.523_387_7e-06,
            -4.391_506_54e-06,
            0.000_218_580_87,
            -0.001_253_725_03,
            -0.004_177_681_64,
            0.246_640_727,
            1.501_409_41,
        ] {
            p = c + p * w;
        }
        p * y
    } else {
        let w = w.sqrt() - 3.0;
        let mut p = -0.000_200_214_257;
        for c in [
            0.000_100_950_558,
            0.001_349_343_22,
            -0.003_673_428_44,
            0.005_739_507_73,
            -0.007_622_461_3,
            0.009_438_870_47,
            1.001_674_06,
            2.832_976_82,
        ] {
            p = c + p * w;
        }
        p * y
    };
    for _ in 0..2 {
        let err = erf(x) - y;
        x -= err / (2.0 / std::f64::consts::PI.sqrt() * (-x * x).exp());
    }
    x
}

fn softplus(x: f64) -> f64 {
    // log(1 + e^x) without overflow for large x
    if x > 30.0 { x } else { x.exp().ln_1p() }
}

/// What the client does with the decrypted scores, in the clear.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum TailOp {
    Activation(Activation),
    /// Softmax over all outputs.
    Softmax,
    /// Softmax over the nonzero outputs; zeros stay 0 (ONNX-ML `SOFTMAX_ZERO`).
    SoftmaxZero,
    /// One score `s` becomes the two class scores `[-s, s]` (binary linear classifiers).
    BinaryScores,
    /// One probability `p` becomes `[1 - p, p]`.
    BinaryProbabilities,
}

/// What the model's outputs mean.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Task {
    /// Class scores (or probabilities): the prediction is a class.
    #[default]
    Classification,
    /// Predicted values, one per target.
    Regression,
}

impl Task {
    pub fn name(self) -> &'static str {
        match self {
            Task::Classification => "classifier",
            Task::Regression => "regressor",
        }
    }
}

/// What the decrypted result of a classifier reveals to the client.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reveal {
    /// The model's scores (logits, decision values); the tail runs at the client.
    #[default]
    Scores,
    /// The predicted class index only: the argmax runs under encryption.
    Label,
}

impl Reveal {
    pub fn name(&self) -> &'static str {
        match self {
            Reveal::Scores => "scores",
            Reveal::Label => "label",
        }
    }
}

/// The node name the argmax's lookups are counted under (`veil compile --json`'s `nodes`).
pub const LABEL_ORIGIN: &str = "argmax (label output)";

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
            TailOp::SoftmaxZero => {
                let m = v
                    .iter()
                    .filter(|e| **e != 0.0)
                    .cloned()
                    .fold(f64::NEG_INFINITY, f64::max);
                let s: f64 = v.iter().filter(|e| **e != 0.0).map(|e| (e - m).exp()).sum();
                v.iter_mut()
                    .filter(|e| **e != 0.0)
                    .for_each(|e| *e = (*e - m).exp() / s);
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
    fn erf_and_gelu_match_known_values() {
        for (x, e) in [
            (0.5, 0.520_499_877_813_046_5),
            (1.5, 0.966_105_146_475_310_7),
            (3.0, 0.999_977_909_503_001_4),
        ] {
            assert!((erf(x) - e).abs() < 1e-12, "erf({x})");
            assert!((erf(-x) + e).abs() < 1e-12);
        }
        let g = Activation::Gelu { tanh: false }.apply(1.0);
        assert!((g - 0.841_344_746_068_542_9).abs() < 1e-12);
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
