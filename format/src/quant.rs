//! The quantizers a compiled model records: the client quantizes its features with them and
//! the compiler's settings are kept beside them.

use serde::{Deserialize, Serialize};

use crate::error::{FormatError, Result};

/// Bit widths and range margin; recorded in the compiled model.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]

pub struct QuantConfig {
    /// Bits per input feature (unsigned, with a zero point).
    pub input_bits: u32,
    /// Bits per weight on fresh inputs, sign included (symmetric, per linear form). Fresh
    /// encryptions carry negligible noise, so wide weights cost nothing.
    pub first_weight_bits: u32,
    /// Bits per weight on bootstrap outputs, whose noise the weights amplify (variance grows
    /// with the sum of squared weights), so they stay narrow.
    pub weight_bits: u32,
    /// Bits per lookup output (unsigned, with a zero point), where the model fixes none.
    pub act_bits: u32,
    /// Extra room around each calibrated accumulator range, as a fraction of its width.
    pub range_margin: f64,
    /// Most bits kept of an output grid the model fixes (QDQ); a finer grid is coarsened by a
    /// power of two, which narrows its readers' accumulators and so their noise.
    pub model_grid_bits: u32,
    /// Let the compiler choose `weight_bits` and `model_grid_bits` per model from the
    /// noise budget (see `plan::compile`); the values above are then its starting point.
    pub search: bool,
    /// Keep the weights that round to zero as explicit zero terms. An encrypted model
    /// (`veil compile --encrypt-model`) needs them: a term it leaves out would show which
    /// weights are small. Not recorded in the file: it changes no value the model computes.
    #[serde(skip)]
    pub keep_zero_weights: bool,
}

impl Default for QuantConfig {
    fn default() -> Self {
        QuantConfig {
            input_bits: 8,
            first_weight_bits: 8,
            weight_bits: 5,
            act_bits: 5,
            range_margin: 0.1,
            model_grid_bits: 8,
            search: true,
            keep_zero_weights: false,
        }
    }
}

impl QuantConfig {
    pub fn validate(&self) -> Result<()> {
        let ok = (2..=12).contains(&self.input_bits)
            && (2..=12).contains(&self.weight_bits)
            && (2..=12).contains(&self.first_weight_bits)
            && (1..=10).contains(&self.act_bits)
            && (2..=16).contains(&self.model_grid_bits)
            && (0.0..=4.0).contains(&self.range_margin);
        if ok {
            Ok(())
        } else {
            Err(FormatError::QuantConfig(format!(
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

    /// The grid value nearest `x`. Clamped in floating point, so no `x`, `scale` or `zero`
    /// can overflow an integer (callers refuse non-finite features first; NaN gives 0).
    pub fn quantize(&self, x: f64) -> i64 {
        ((x / self.scale).round() + self.zero as f64)
            .max(0.0)
            .min(self.max_q.max(0) as f64) as i64
    }

    pub fn dequantize(&self, q: i64) -> f64 {
        self.scale * (q - self.zero) as f64
    }

    /// Bits an unsigned value of this quantizer needs.
    pub fn bits(&self) -> u32 {
        64 - (self.max_q.max(1) as u64).leading_zeros()
    }
}
