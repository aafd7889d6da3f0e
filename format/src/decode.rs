//! Decoding decrypted outputs into predictions, shared by simulation, encrypted runs and the
//! client.

use crate::compiled::{ClientSpec, CompiledModel, OutputDecoding};
use crate::error::{FormatError, Result};
use crate::tail::{Reveal, TailOp, apply_tail, predict_class, single_output_threshold};

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
/// 0 when the final comparison read consistently (see the compiler's `FloatModel::with_reveal`). An output
/// off the integers (more than a quarter unit: the output noise is far below), a failed check
/// or an index past the classes is an error, never a guess.
pub fn decode_label(output: f64, n_classes: Option<usize>) -> Result<usize> {
    let bad = |reason: String| FormatError::InconsistentLabel {
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

/// The prediction for `scores` under `reveal` and the clear-text `tail`.
pub fn predict(
    reveal: Reveal,
    tail: &[TailOp],
    labels: Option<&[i64]>,
    scores: Vec<f64>,
) -> Result<Prediction> {
    let outputs = apply_tail(tail, scores.clone());
    let idx = match reveal {
        Reveal::Scores => predict_class(&outputs, single_output_threshold(tail)),
        Reveal::Label => {
            let [v] = outputs[..] else {
                return Err(FormatError::Shape(format!(
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
) -> Result<Prediction> {
    predict(reveal, tail, labels, d.scores(accs))
}

impl ClientSpec {
    /// Decodes the output accumulators of one sample (decrypted phases divided by `delta`).
    pub fn decode(&self, accs: &[f64]) -> Result<Prediction> {
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
    pub fn decode(&self, accs: &[f64]) -> Result<Prediction> {
        decode(
            self.reveal,
            &self.output.decoding,
            &self.tail,
            self.class_labels.as_deref(),
            accs,
        )
    }
}
