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

fn predict(
    reveal: Reveal,
    tail: &[TailOp],
    labels: Option<&[i64]>,
    scores: Vec<f64>,
) -> Prediction {
    let outputs = apply_tail(tail, scores.clone());
    let idx = match reveal {
        Reveal::Scores => predict_class(&outputs, single_output_threshold(tail)),
        // The one output is the class index (noise rounds away; a misread clamps).
        Reveal::Label => outputs.first().map_or(0.0, |v| v.round().max(0.0)) as usize,
    };
    let label = labels
        .and_then(|l| l.get(idx).copied())
        .unwrap_or(idx as i64);
    Prediction {
        scores,
        outputs,
        label,
    }
}

fn decode(
    reveal: Reveal,
    d: &OutputDecoding,
    tail: &[TailOp],
    labels: Option<&[i64]>,
    accs: &[f64],
) -> Prediction {
    predict(reveal, tail, labels, d.scores(accs))
}

impl ClientSpec {
    /// Decodes the output accumulators of one sample (decrypted phases divided by `delta`).
    pub fn decode(&self, accs: &[f64]) -> Prediction {
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
    pub fn decode(&self, accs: &[f64]) -> Prediction {
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
    pub fn predict(&self, x: &[f64]) -> Prediction {
        predict(
            self.reveal,
            &self.tail,
            self.class_labels.as_deref(),
            self.scores(x),
        )
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
    /// Simulated predicted labels for `xs`; with `noise_seed`, with the predicted bootstrap noise.
    pub fn simulate_labels(
        &self,
        xs: &[Vec<f64>],
        noise_seed: Option<u64>,
    ) -> crate::Result<Vec<i64>> {
        let mut rng = noise_seed.map(crate::simulate::NoiseRng::new);
        xs.iter()
            .map(|x| {
                self.simulate(x, rng.as_mut())
                    .map(|s| self.decode(&s.accs).label)
            })
            .collect()
    }
}
