//! Evaluation: the float model's reference predictions, simulated predictions and the metrics that
//! compare them with the truth.
pub use veil_format::decode::{Prediction, decode_label, predict};

use crate::graph::FloatModel;

impl FloatModel {
    /// The float model's prediction, the reference the quantized model is compared with.
    pub fn predict(&self, x: &[f64]) -> crate::Result<Prediction> {
        predict(
            self.reveal,
            &self.tail,
            self.class_labels.as_deref(),
            self.scores(x),
        )
        .map_err(Into::into)
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
