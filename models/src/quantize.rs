//! Post-training quantization from calibration data.
//!
//! Inputs get one uniform quantizer per feature, hidden activations one per neuron, weights
//! one symmetric scale per output neuron. Per-feature and per-neuron scales cost nothing
//! under FHE: input scales fold into the next layer's weights before they are rounded, and
//! each neuron's output scale lives in its own lookup table.

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
use crate::ir::{Activation, FloatModel};

/// Bit widths and range margin; recorded in the compiled model.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct QuantConfig {
    /// Bits per input feature (unsigned, with a zero point).
    pub input_bits: u32,
    /// Bits per weight of the first layer, sign included (symmetric, per output neuron). Its
    /// inputs are fresh encryptions with negligible noise, so wide weights cost nothing.
    pub first_weight_bits: u32,
    /// Bits per weight of later layers. Their inputs are bootstrap outputs whose noise the
    /// weights amplify (variance grows with the sum of squared weights), so they stay narrow.
    pub weight_bits: u32,
    /// Bits per hidden activation (unsigned, with a zero point, per neuron).
    pub act_bits: u32,
    /// Extra room around each calibrated accumulator range, as a fraction of its width.
    pub range_margin: f64,
}

impl Default for QuantConfig {
    fn default() -> Self {
        QuantConfig {
            input_bits: 8,
            first_weight_bits: 8,
            weight_bits: 5,
            act_bits: 5,
            range_margin: 0.1,
        }
    }
}

impl QuantConfig {
    pub fn validate(&self) -> Result<()> {
        let ok = (2..=12).contains(&self.input_bits)
            && (2..=12).contains(&self.weight_bits)
            && (2..=12).contains(&self.first_weight_bits)
            && (1..=10).contains(&self.act_bits)
            && (0.0..=4.0).contains(&self.range_margin);
        if ok {
            Ok(())
        } else {
            Err(ModelError::Plan(format!(
                "quantization settings out of range: {self:?} (input 2-12 bits, weights 2-12, activations 1-10, margin 0-4)"
            )))
        }
    }
}

/// An affine quantizer: `x ~ scale * (q - zero)`, `q` in `[0, max_q]`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct UniformQuant {
    pub scale: f64,
    pub zero: i64,
    pub max_q: i64,
}

impl UniformQuant {
    /// Covers `[lo, hi]` widened to include 0, so that 0 is exact.
    pub fn from_range(lo: f64, hi: f64, bits: u32) -> Self {
        let max_q = (1i64 << bits) - 1;
        let lo = lo.min(0.0);
        let mut hi = hi.max(0.0);
        if hi - lo < 1e-12 {
            hi = lo + 1.0; // a constant feature or dead neuron: any scale will do
        }
        let scale = (hi - lo) / max_q as f64;
        let zero = ((-lo / scale).round() as i64).clamp(0, max_q);
        UniformQuant { scale, zero, max_q }
    }

    pub fn quantize(&self, x: f64) -> i64 {
        ((x / self.scale).round() as i64 + self.zero).clamp(0, self.max_q)
    }

    pub fn dequantize(&self, q: i64) -> f64 {
        self.scale * (q - self.zero) as f64
    }
}

/// One linear layer in integers: `pre_n ~ scale[n] * sum_j rows[n][j].1 * q_j + offset[n]`.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantLayer {
    pub n_in: usize,
    pub rows: Vec<Vec<(u32, i64)>>,
    pub scale: Vec<f64>,
    pub offset: Vec<f64>,
}

/// The quantized model, before the FHE plan fixes encodings and lookup tables.
#[derive(Clone, Debug)]
pub struct QuantModel {
    pub input: Vec<UniformQuant>,
    pub layers: Vec<QuantLayer>,
    /// `acts[l]`: the activation chain after layer `l` and one output quantizer per neuron.
    pub acts: Vec<(Vec<Activation>, Vec<UniformQuant>)>,
}

/// Quantizes `model` using the value ranges seen on `calibration`.
pub fn quantize(
    model: &FloatModel,
    calibration: &[Vec<f64>],
    cfg: &QuantConfig,
) -> Result<QuantModel> {
    cfg.validate()?;
    if calibration.is_empty() {
        return Err(ModelError::Plan("the calibration set is empty".into()));
    }
    let n_features = model.n_features();
    if let Some(bad) = calibration.iter().find(|x| x.len() != n_features) {
        return Err(ModelError::Shape(format!(
            "calibration row has {} features, the model takes {n_features}",
            bad.len()
        )));
    }

    // Ranges: inputs per feature, then each hidden layer's activations per neuron.
    let mut input_range = vec![(f64::INFINITY, f64::NEG_INFINITY); n_features];
    let mut act_ranges: Vec<Vec<(f64, f64)>> = model
        .affines
        .iter()
        .take(model.acts.len())
        .map(|a| vec![(f64::INFINITY, f64::NEG_INFINITY); a.n_out()])
        .collect();
    let widen = |r: &mut (f64, f64), v: f64| {
        r.0 = r.0.min(v);
        r.1 = r.1.max(v);
    };
    for x in calibration {
        x.iter()
            .zip(&mut input_range)
            .for_each(|(&v, r)| widen(r, v));
        let mut v = x.clone();
        for (l, acts) in model.acts.iter().enumerate() {
            v = model.affines[l].apply(&v);
            v.iter_mut()
                .for_each(|e| *e = Activation::apply_chain(acts, *e));
            v.iter()
                .zip(&mut act_ranges[l])
                .for_each(|(&e, r)| widen(r, e));
        }
    }
    let input: Vec<UniformQuant> = input_range
        .iter()
        .map(|&(lo, hi)| UniformQuant::from_range(lo, hi, cfg.input_bits))
        .collect();
    let act_quants: Vec<Vec<UniformQuant>> = act_ranges
        .iter()
        .map(|rs| {
            rs.iter()
                .map(|&(lo, hi)| UniformQuant::from_range(lo, hi, cfg.act_bits))
                .collect()
        })
        .collect();

    let mut layers = Vec::with_capacity(model.affines.len());
    for (l, affine) in model.affines.iter().enumerate() {
        let in_q: &[UniformQuant] = if l == 0 { &input } else { &act_quants[l - 1] };
        let bits = if l == 0 {
            cfg.first_weight_bits
        } else {
            cfg.weight_bits
        };
        let w_max = ((1i64 << (bits - 1)) - 1) as f64;
        let mut rows = Vec::with_capacity(affine.n_out());
        let mut scale = Vec::with_capacity(affine.n_out());
        let mut offset = Vec::with_capacity(affine.n_out());
        for (row, &b) in affine.rows.iter().zip(&affine.bias) {
            // Fold the input scales into the weights, then round with one scale per neuron.
            let folded: Vec<(u32, f64)> = row
                .iter()
                .map(|&(c, w)| (c, w * in_q[c as usize].scale))
                .collect();
            let max_abs = folded.iter().fold(0.0f64, |m, &(_, v)| m.max(v.abs()));
            let t = if max_abs > 0.0 { max_abs / w_max } else { 1.0 };
            let int_row: Vec<(u32, i64)> = folded
                .iter()
                .map(|&(c, v)| (c, (v / t).round() as i64))
                .filter(|&(_, w)| w != 0)
                .collect();
            let zero_term: i64 = int_row
                .iter()
                .map(|&(c, w)| w * in_q[c as usize].zero)
                .sum();
            offset.push(b - t * zero_term as f64);
            scale.push(t);
            rows.push(int_row);
        }
        layers.push(QuantLayer {
            n_in: affine.n_in,
            rows,
            scale,
            offset,
        });
    }
    let acts = model.acts.iter().cloned().zip(act_quants).collect();
    Ok(QuantModel {
        input,
        layers,
        acts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_quant_round_trips_within_half_a_step() {
        let q = UniformQuant::from_range(-1.0, 3.0, 8);
        for i in 0..=100 {
            let x = -1.0 + 4.0 * i as f64 / 100.0;
            assert!((q.dequantize(q.quantize(x)) - x).abs() <= q.scale / 2.0 + 1e-12);
        }
        assert_eq!(q.dequantize(q.quantize(0.0)), 0.0);
        assert_eq!(q.quantize(100.0), 255);
        assert_eq!(q.quantize(-100.0), 0);
    }
}
