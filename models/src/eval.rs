//! Decoding outputs into predictions, shared by simulation, encrypted runs and the client.

use crate::compiled::{ClientSpec, CompiledModel, OutputDecoding};
use crate::graph::{
    FloatModel, Reveal, TailOp, apply_tail, predict_class, single_output_threshold,
};

/// A decoded sample.
#[derive(Clone, Debug, PartialEq)]
pub struct Prediction {
    /// The last linear layer's outputs (logits, decision scores).
    pub scores: Vec<f64>,
    /// The model's outputs after the clear-text tail (probabilities where the model has them).
    pub outputs: Vec<f64>,
    /// The predicted class: its label when the model records labels, else its index.
    pub label: i64,
}

/// The class index a label-only output decodes to: `index + 2^n * check`, where the check is
/// 0 when the final comparison read consistently (see [`FloatModel::with_reveal`]). An output
/// off the integers (more than a quarter unit: the output noise is far below), a failed check
/// or an index past the classes is an error, never a guess.
pub fn decode_label(output: f64, n_classes: Option<usize>) -> crate::Result<usize> {
    let bad = |reason: String| crate::ModelError::InconsistentLabel {
        value: output,
        reason,
    };
    let r = output.round();
    if !output.is_finite() || (output - r).abs() > 0.25 {
        return Err(bad("not an integer".into()));
    }
    if r < 0.0 {
        return Err(bad("the final comparison's check failed".into()));
    }
    let idx = r as usize;
    match n_classes {
        Some(k) if idx >= k => Err(bad(format!(
            "index {idx} past the {k} classes, or the final comparison's check failed"
        ))),
        _ => Ok(idx),
    }
}

fn predict(
    reveal: Reveal,
    tail: &[TailOp],
    labels: Option<&[i64]>,
    scores: Vec<f64>,
) -> crate::Result<Prediction> {
    let outputs = apply_tail(tail, scores.clone());
    let idx = match reveal {
        Reveal::Scores => predict_class(&outputs, single_output_threshold(tail)),
        Reveal::Label => {
            let [v] = outputs[..] else {
                return Err(crate::ModelError::Shape(format!(
                    "a label output is one value, not {}",
                    outputs.len()
                )));
            };
            decode_label(v, labels.map(<[i64]>::len))?
        }
    };
    let label = labels
        .and_then(|l| l.get(idx).copied())
        .unwrap_or(idx as i64);
    Ok(Prediction {
        scores,
        outputs,
        label,
    })
}

fn decode(
    reveal: Reveal,
    d: &OutputDecoding,
    tail: &[TailOp],
    labels: Option<&[i64]>,
    accs: &[f64],
) -> crate::Result<Prediction> {
    predict(reveal, tail, labels, d.scores(accs))
}

impl ClientSpec {
    /// Decodes the output accumulators of one sample (decrypted phases divided by `delta`).
    pub fn decode(&self, accs: &[f64]) -> crate::Result<Prediction> {
        decode(
            self.reveal,
            &self.output,
            &self.tail,
            self.class_labels.as_deref(),
            accs,
        )
    }
}

impl CompiledModel {
    pub fn decode(&self, accs: &[f64]) -> crate::Result<Prediction> {
        decode(
            self.reveal,
            &self.output.decoding,
            &self.tail,
            self.class_labels.as_deref(),
            accs,
        )
    }
}

impl FloatModel {
    /// The float model's prediction, the reference the quantized model is compared with.
    pub fn predict(&self, x: &[f64]) -> crate::Result<Prediction> {
        predict(
            self.reveal,
            &self.tail,
            self.class_labels.as_deref(),
            self.scores(x),
        )
    }
}

/// How well predicted values fit the true ones.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct RegressionMetrics {
    /// Coefficient of determination, `1 - SS_res / SS_tot` (as scikit-learn's `r2_score`).
    pub r2: f64,
    pub mae: f64,
    pub rmse: f64,
}

/// Metrics of one target.
fn metrics_1d(predicted: &[f64], truth: &[f64]) -> RegressionMetrics {
    let n = truth.len().max(1) as f64;
    let mean = truth.iter().sum::<f64>() / n;
    let ss_res: f64 = predicted
        .iter()
        .zip(truth)
        .map(|(p, t)| (p - t).powi(2))
        .sum();
    let ss_tot: f64 = truth.iter().map(|t| (t - mean).powi(2)).sum();
    RegressionMetrics {
        r2: if ss_tot > 0.0 {
            1.0 - ss_res / ss_tot
        } else {
            0.0
        },
        mae: predicted
            .iter()
            .zip(truth)
            .map(|(p, t)| (p - t).abs())
            .sum::<f64>()
            / n,
        rmse: (ss_res / n).sqrt(),
    }
}

/// Per-target metrics averaged over the targets (scikit-learn's `uniform_average`); rows hold
/// one value per target.
pub fn regression_metrics(predicted: &[Vec<f64>], truth: &[Vec<f64>]) -> RegressionMetrics {
    let k = truth.first().map_or(0, Vec::len).max(1);
    let col = |rows: &[Vec<f64>], j: usize| -> Vec<f64> {
        rows.iter()
            .map(|r| r.get(j).copied().unwrap_or(f64::NAN))
            .collect()
    };
    let per: Vec<RegressionMetrics> = (0..k)
        .map(|j| metrics_1d(&col(predicted, j), &col(truth, j)))
        .collect();
    let avg = |f: fn(&RegressionMetrics) -> f64| per.iter().map(f).sum::<f64>() / k as f64;
    RegressionMetrics {
        r2: avg(|m| m.r2),
        mae: avg(|m| m.mae),
        rmse: avg(|m| m.rmse),
    }
}

/// Fraction of `predicted` equal to `labels`.
pub fn accuracy(predicted: &[i64], labels: &[i64]) -> f64 {
    if labels.is_empty() {
        return 0.0;
    }
    let hits = predicted.iter().zip(labels).filter(|(p, l)| p == l).count();
    hits as f64 / labels.len() as f64
}

impl CompiledModel {
    /// Simulated predictions for `xs`; with `noise_seed`, with the predicted bootstrap noise.
    /// A label output the decoder refuses (a noisy misread) is an error.
    pub fn simulate_predictions(
        &self,
        xs: &[Vec<f64>],
        noise_seed: Option<u64>,
    ) -> crate::Result<Vec<Prediction>> {
        let mut rng = noise_seed.map(crate::simulate::NoiseRng::new);
        xs.iter()
            .map(|x| {
                self.simulate(x, rng.as_mut())
                    .and_then(|s| self.decode(&s.accs))
            })
            .collect()
    }

    /// Simulated predicted labels for `xs`; with `noise_seed`, with the predicted bootstrap noise.
    pub fn simulate_labels(
        &self,
        xs: &[Vec<f64>],
        noise_seed: Option<u64>,
    ) -> crate::Result<Vec<i64>> {
        Ok(self
            .simulate_predictions(xs, noise_seed)?
            .into_iter()
            .map(|p| p.label)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn regression_metrics_match_their_definitions() {
        let rows = |v: &[f64]| v.iter().map(|&x| vec![x]).collect::<Vec<_>>();
        let m = super::regression_metrics(&rows(&[1.0, 2.0, 4.0]), &rows(&[1.0, 3.0, 5.0]));
        // mean 3, SS_tot = 4 + 0 + 4 = 8, SS_res = 0 + 1 + 1 = 2
        assert!((m.r2 - 0.75).abs() < 1e-12);
        assert!((m.mae - 2.0 / 3.0).abs() < 1e-12);
        assert!((m.rmse - (2.0f64 / 3.0).sqrt()).abs() < 1e-12);
    }
}
