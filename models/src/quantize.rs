//! Post-training quantization of the float graph from calibration data.
//!
//! Every atom gets a uniform quantizer: input features one each (or the grid the model fixes),
//! lookup outputs one each from their calibrated range, except where exactness needs a shared
//! grid (the inputs of one MaxPool channel, the differences inside a pairwise maximum) or the
//! model fixes one (QDQ). Every linear form (a lookup's input, an output) gets integer weights
//! with one scale per form. Per-atom scales cost nothing under FHE: they fold into the
//! consumer's weights before rounding, and each lookup's output scale lives in its table.

use std::collections::HashMap;
use std::sync::Arc;

use crate::error::{ModelError, Result};
pub use veil_format::quant::{QuantConfig, UniformQuant};

use crate::graph::{Activation, FloatModel, LABEL_LEVELS, Lin, OutputGrid, Reveal, UFn};

/// Bits of a [`OutputGrid::Summed`] grid. Its values reach the client through sums it
/// decrypts, with no bootstrap to fit, so the grid can be much finer than an activation's; the
/// bootstrap noise on each summed value (about 2^-13 of the output range) is the real limit.
pub const SUMMED_BITS: u32 = 12;

/// Output bits of the lookups inside a product or a normalization ([`OutputGrid::Arithmetic`]).
/// On digits_torch_lngelu (`Linear, LayerNorm, GELU, Linear`) 5-bit grids there gave 86.4%
/// simulated and 52.8% with noise, 7 bits 96.9% and 90.3%, 8 bits 96.7% and 96.1%, against
/// 96.4% in onnxruntime (`veil compile ... --act-bits N`, then `veil eval`, before this
/// constant existed).
pub const ARITHMETIC_BITS: u32 = 8;

/// A linear form in integers: `value ~ scale * sum_k w_k * q_k + offset`.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantLin {
    pub terms: Vec<(u32, i64)>,
    pub scale: f64,
    pub offset: f64,
    /// Weight bits used (sign included).
    pub weight_bits: u32,
    /// The weights are exact (no rounding): the accumulator's range is then known from the
    /// atoms' grids, not only from calibration.
    pub exact: bool,
}

impl QuantLin {
    /// Smallest and largest accumulator over every grid value of the atoms read.
    pub fn bounds(&self, atoms: &[UniformQuant]) -> (i64, i64) {
        self.terms.iter().fold((0, 0), |(lo, hi), &(a, w)| {
            let m = w * atoms[a as usize].max_q;
            (lo + m.min(0), hi + m.max(0))
        })
    }
}

impl QuantLin {
    pub fn acc(&self, q: &[i64]) -> i64 {
        self.terms.iter().map(|&(a, w)| w * q[a as usize]).sum()
    }
}

/// The quantized model, before the FHE plan fixes encodings and lookup tables.
#[derive(Clone, Debug)]
pub struct QuantModel {
    /// One quantizer per atom (inputs first, then lookups).
    pub atoms: Vec<UniformQuant>,
    /// The integer input form of each lookup.
    pub lookups: Vec<QuantLin>,
    pub outputs: Vec<QuantLin>,
}

impl QuantModel {
    /// Every atom's integer for one sample, computed exactly as quantization intends (no
    /// bootstrap rounding): the reference the plan sizes its encodings on.
    pub fn ideal_atoms(&self, model: &FloatModel, x: &[f64]) -> Vec<i64> {
        let nf = model.n_features();
        let mut q: Vec<i64> = Vec::with_capacity(self.atoms.len());
        q.extend(x.iter().zip(&self.atoms).map(|(&v, u)| u.quantize(v)));
        for (i, (l, ql)) in model.lookups.iter().zip(&self.lookups).enumerate() {
            let pre = ql.scale * ql.acc(&q) as f64 + ql.offset;
            q.push(self.atoms[nf + i].quantize(l.func.eval(pre)));
        }
        q
    }
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
    let nf = model.n_features();
    if let Some(bad) = calibration.iter().find(|x| x.len() != nf) {
        return Err(ModelError::Shape(format!(
            "calibration row has {} features, the model takes {nf}",
            bad.len()
        )));
    }
    // Float range of every atom; per label-score group, the lowest and highest top score.
    let mut range = vec![(f64::INFINITY, f64::NEG_INFINITY); model.n_atoms()];
    let mut top: HashMap<u32, (f64, f64)> = HashMap::new();
    for x in calibration {
        let atoms = model.atoms(x);
        let mut row_top: HashMap<u32, f64> = HashMap::new();
        for (i, l) in model.lookups.iter().enumerate() {
            if let OutputGrid::LabelScores(g) = l.grid {
                let t = row_top.entry(g).or_insert(f64::NEG_INFINITY);
                *t = t.max(atoms[nf + i]);
            }
        }
        for (g, t) in row_top {
            let r = top.entry(g).or_insert((f64::INFINITY, f64::NEG_INFINITY));
            *r = (r.0.min(t), r.1.max(t));
        }
        for (r, v) in range.iter_mut().zip(atoms) {
            r.0 = r.0.min(v);
            r.1 = r.1.max(v);
        }
    }
    let mut tied: HashMap<u32, (f64, f64)> = HashMap::new();
    for (i, l) in model.lookups.iter().enumerate() {
        if let OutputGrid::Tied(g) | OutputGrid::Summed(g) = l.grid {
            let r = tied.entry(g).or_insert((f64::INFINITY, f64::NEG_INFINITY));
            r.0 = r.0.min(range[nf + i].0);
            r.1 = r.1.max(range[nf + i].1);
            // A table's every value, not only those calibration reached (a rare leaf).
            if let UFn::Act(Activation::Select { table, .. }, _) = &*l.func {
                for &v in table {
                    r.0 = r.0.min(v);
                    r.1 = r.1.max(v);
                }
            }
        }
    }
    let fixed = |g: &crate::graph::Grid| UniformQuant {
        scale: g.scale,
        zero: g.zero - g.qmin,
        max_q: g.qmax - g.qmin,
    };
    // A coarser grid of the same family: every 2^k-th level, zero kept (rounded) in place.
    let coarse = |g: &crate::graph::Grid| {
        let u = fixed(g);
        let k = u.bits().saturating_sub(cfg.model_grid_bits);
        let f = 1i64 << k;
        UniformQuant {
            scale: u.scale * f as f64,
            zero: (u.zero as f64 / f as f64).round() as i64,
            max_q: u.max_q / f,
        }
    };
    let mut atoms: Vec<UniformQuant> = (0..nf)
        .map(|j| match &model.input_grids[j] {
            Some(g) => fixed(g),
            None => UniformQuant::from_range(range[j].0, range[j].1, cfg.input_bits),
        })
        .collect();
    for (i, l) in model.lookups.iter().enumerate() {
        let (lo, hi) = range[nf + i];
        let calibrated = UniformQuant::from_range(lo, hi, cfg.act_bits);
        let u = match &l.grid {
            OutputGrid::Calibrated => calibrated,
            OutputGrid::Arithmetic => UniformQuant::from_range(lo, hi, ARITHMETIC_BITS),
            OutputGrid::Tied(g) => {
                let (lo, hi) = tied[g];
                UniformQuant::from_range(lo, hi, cfg.act_bits)
            }
            OutputGrid::Summed(g) => {
                let (lo, hi) = tied[g];
                UniformQuant::from_range(lo, hi, SUMMED_BITS)
            }
            // A label's weighted bits keep every level: their values are the class index's.
            OutputGrid::Fixed(g) if &*l.origin == crate::graph::LABEL_ORIGIN => fixed(g),
            OutputGrid::Fixed(g) => coarse(g),
            OutputGrid::LabelScores(g) => {
                let (lo, hi) = top[g];
                label_grid(lo, hi, cfg.range_margin)
            }
            OutputGrid::DifferenceOfInputs => {
                difference_grid(&l.input, &atoms).unwrap_or(calibrated)
            }
        };
        atoms.push(u);
    }
    let lookups = model
        .lookups
        .iter()
        .map(|l| quantize_form(&l.input, &atoms, nf, cfg, l.decision))
        .collect();
    let outputs = model
        .outputs
        .iter()
        // A label's output sums exact bits with exact weights.
        .map(|o| quantize_form(o, &atoms, nf, cfg, model.reveal == Reveal::Label))
        .collect();
    Ok(QuantModel {
        atoms,
        lookups,
        outputs,
    })
}

/// The label scores' grid: [`LABEL_LEVELS`] levels over `[lo, hi]` widened by `margin` of its
/// width each side; `lo` need not be 0 (the zero point may lie off the grid).
pub fn label_grid(lo: f64, hi: f64, margin: f64) -> UniformQuant {
    let w = (hi - lo).max(1e-9);
    let (lo, hi) = (lo - margin * w, hi + margin * w);
    let scale = (hi - lo) / (LABEL_LEVELS - 1) as f64;
    UniformQuant {
        scale,
        zero: (-lo / scale).round() as i64,
        max_q: LABEL_LEVELS - 1,
    }
}

/// The grid of `relu(b - a)` inside a pairwise maximum: when every atom of the difference
/// has one scale and unit weights, the difference is an exact multiple of that scale.
fn difference_grid(input: &Lin, atoms: &[UniformQuant]) -> Option<UniformQuant> {
    let first = atoms[input.terms.first()?.0 as usize];
    let exact = input.bias == 0.0
        && input.terms.iter().all(|&(a, w)| {
            let u = atoms[a as usize];
            (w == 1.0 || w == -1.0) && u.scale == first.scale
        });
    let max_q = input
        .terms
        .iter()
        .map(|&(a, _)| atoms[a as usize].max_q)
        .max()?;
    exact.then_some(UniformQuant {
        scale: first.scale,
        zero: 0,
        max_q,
    })
}

/// What rounding one term of a form to its integer weight lost, in the form's output units
/// over the atom's whole range.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TermRounding {
    pub atom: u32,
    /// |weight| times the atom's range: the term's share of the form's span.
    pub span: f64,
    /// |weight - kept weight| times the atom's range.
    pub error: f64,
    /// The weight rounded to zero.
    pub dropped: bool,
}

/// Each term of `lin` against its integer weight in `ql`.
pub fn rounding_terms(lin: &Lin, ql: &QuantLin, atoms: &[UniformQuant]) -> Vec<TermRounding> {
    let kept: HashMap<u32, i64> = ql.terms.iter().copied().collect();
    lin.terms
        .iter()
        .map(|&(a, w)| {
            let u = &atoms[a as usize];
            let range = u.scale * u.max_q as f64;
            let kept = kept.get(&a).map_or(0.0, |&q| q as f64 * ql.scale / u.scale);
            TermRounding {
                atom: a,
                span: w.abs() * range,
                error: (w - kept).abs() * range,
                dropped: kept == 0.0 && w != 0.0,
            }
        })
        .collect()
}

/// Integer weights for one form: input scales folded in, then one rounding scale chosen so
/// that weights on fresh inputs use `first_weight_bits` and weights on bootstrap outputs
/// `weight_bits`. A decision's form (a tree's tests) keeps its exact unit at any width.
fn quantize_form(
    lin: &Lin,
    atoms: &[UniformQuant],
    nf: usize,
    cfg: &QuantConfig,
    decision: bool,
) -> QuantLin {
    let folded: Vec<(u32, f64)> = lin
        .terms
        .iter()
        .map(|&(a, w)| (a, w * atoms[a as usize].scale))
        .collect();
    let max_of = |fresh: bool| {
        folded
            .iter()
            .filter(|&&(a, _)| ((a as usize) < nf) == fresh)
            .fold(0.0f64, |m, &(_, v)| m.max(v.abs()))
    };
    let w_max = |bits: u32| ((1i64 << (bits - 1)) - 1) as f64;
    let (fresh, later) = (max_of(true), max_of(false));
    let t = (fresh / w_max(cfg.first_weight_bits)).max(later / w_max(cfg.weight_bits));
    let t = if t > 0.0 { t } else { 1.0 };
    // Weights that are already small integer multiples of one unit (a difference of values
    // on one grid, a sum pooled by MaxPool) keep that unit: exact, and as narrow as can be.
    let smallest = folded
        .iter()
        .map(|t| t.1.abs())
        .fold(f64::INFINITY, f64::min);
    let exact_with = |unit: f64| {
        unit.is_finite()
            && (unit >= t || decision)
            && folded.iter().all(|&(_, v)| {
                let r = v / unit;
                (r - r.round()).abs() < 1e-9
                    && r.abs()
                        <= if decision {
                            1024.0
                        } else {
                            w_max(cfg.first_weight_bits)
                        }
            })
    };
    // A decision may also take a fraction of its smallest weight as unit (weights 3 and 2).
    let fractions = if decision { 8 } else { 1 };
    let unit = (1..=fractions)
        .map(|n| smallest / n as f64)
        .find(|&u| exact_with(u));
    let exact_unit = unit.is_some();
    let t = unit.unwrap_or(t);
    let terms: Vec<(u32, i64)> = folded
        .iter()
        .map(|&(a, v)| (a, (v / t).round() as i64))
        .filter(|&(_, w)| w != 0 || cfg.keep_zero_weights)
        .collect();
    let zero_term: i64 = terms.iter().map(|&(a, w)| w * atoms[a as usize].zero).sum();
    let weight_bits = if later > 0.0 {
        cfg.weight_bits
    } else {
        cfg.first_weight_bits
    };
    QuantLin {
        terms,
        scale: t,
        offset: lin.bias - t * zero_term as f64,
        weight_bits,
        exact: exact_unit,
    }
}

/// Rebalances every product of two computed values before quantization.
///
/// The importer reads `ab` as `(P - M) / 4` with `P = (a + b)^2`, `M = (a - b)^2`. When `a`
/// and `b` have very different ranges (a normalization's centred value, within ±1, and its
/// `1 / sqrt(var)`, between 3 and 10), the cross term is a small difference of two large
/// squares, and the squares' 5-bit output grids swamp it. So each operand is centred on its
/// calibrated mid-range (`a0`, `b0`) and `b` is scaled to `a`'s half-range (`λ`):
/// `ab = ((a' + λb')^2 - (a' - λb')^2) / (4λ) + a0 b + b0 a - a0 b0`, with `a' = a - a0`,
/// `b' = b - b0`. The two lookups stay (now of `a' ± λb'`, scaled by `1/λ`) and the linear
/// correction joins every form that reads `P - M`. A pair whose readers read `P` and `M`
/// other than as `P - M` is left as it is.
pub fn balance_products(model: &FloatModel, rows: &[Vec<f64>]) -> FloatModel {
    let mut halves: HashMap<u32, [Option<usize>; 2]> = HashMap::new();
    for (i, l) in model.lookups.iter().enumerate() {
        if let Some(h) = l.product {
            halves.entry(h.pair).or_default()[usize::from(!h.plus)] = Some(i);
        }
    }
    let mut pairs: Vec<(usize, usize)> = halves
        .into_values()
        .filter_map(|[p, m]| Some((p?, m?)))
        .collect();
    pairs.sort_unstable();
    if pairs.is_empty() || rows.is_empty() {
        return model.clone();
    }
    // Ranges of a = (s + d) / 2 and b = (s - d) / 2, s and d the two lookups' inputs.
    let mut ranges = vec![
        [
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::INFINITY,
            f64::NEG_INFINITY
        ];
        pairs.len()
    ];
    for x in rows.iter().step_by(rows.len().div_ceil(1024)) {
        let atoms = model.atoms(x);
        for (r, &(p, m)) in ranges.iter_mut().zip(&pairs) {
            let s = model.lookups[p].input.eval(&atoms);
            let d = model.lookups[m].input.eval(&atoms);
            let (a, b) = ((s + d) / 2.0, (s - d) / 2.0);
            *r = [r[0].min(a), r[1].max(a), r[2].min(b), r[3].max(b)];
        }
    }
    let nf = model.n_features();
    let mut out = model.clone();
    for (&[alo, ahi, blo, bhi], &(p, m)) in ranges.iter().zip(&pairs) {
        let (ha, hb) = ((ahi - alo) / 2.0, (bhi - blo) / 2.0);
        if !(ha > 0.0 && hb > 0.0 && ha.is_finite() && hb.is_finite()) {
            continue;
        }
        let (a0, b0, lam) = ((alo + ahi) / 2.0, (blo + bhi) / 2.0, ha / hb);
        let (pa, ma) = ((nf + p) as u32, (nf + m) as u32);
        let reads_difference = |lin: &Lin| {
            let w = |atom| lin.terms.iter().find(|t| t.0 == atom).map_or(0.0, |t| t.1);
            let (wp, wm) = (w(pa), w(ma));
            (wp + wm).abs() <= 1e-9 * wp.abs().max(wm.abs())
        };
        if !out
            .lookups
            .iter()
            .map(|l| &l.input)
            .chain(&out.outputs)
            .all(reads_difference)
        {
            continue;
        }
        let (s, d) = (&model.lookups[p].input, &model.lookups[m].input);
        let a = Lin::combine([(0.5, s), (0.5, d)], 0.0);
        let b = Lin::combine([(0.5, s), (-0.5, d)], 0.0);
        let correction = Lin::combine([(a0, &b), (b0, &a)], -a0 * b0);
        let square = Arc::new(UFn::Affine(
            1.0 / lam,
            0.0,
            Arc::new(UFn::Act(Activation::Pow { p: 2.0 }, Arc::new(UFn::X))),
        ));
        out.lookups[p].input = Lin::combine([(1.0, &a), (lam, &b)], -a0 - lam * b0);
        out.lookups[m].input = Lin::combine([(1.0, &a), (-lam, &b)], -a0 + lam * b0);
        out.lookups[p].func = square.clone();
        out.lookups[m].func = square;
        let fix = |lin: &mut Lin| {
            let wp = lin.terms.iter().find(|t| t.0 == pa).map_or(0.0, |t| t.1);
            if wp != 0.0 {
                *lin = Lin::combine([(1.0, &*lin), (4.0 * wp, &correction)], 0.0);
            }
        };
        out.lookups.iter_mut().for_each(|l| fix(&mut l.input));
        out.outputs.iter_mut().for_each(fix);
    }
    out
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

    #[test]
    fn extreme_values_and_grids_clamp_without_overflow() {
        let q = UniformQuant::from_range(-1.0, 3.0, 8);
        assert_eq!(q.quantize(1e300), 255);
        assert_eq!(q.quantize(-1e300), 0);
        assert_eq!(q.quantize(f64::NAN), 0);
        // A hostile grid: the old `round() as i64 + zero` overflowed here.
        let h = UniformQuant {
            scale: 1e-300,
            zero: i64::MAX,
            max_q: 15,
        };
        assert_eq!(h.quantize(1e30), 15);
        assert_eq!(h.quantize(-1e30), 0);
        let h = UniformQuant {
            scale: 1.0,
            zero: i64::MIN,
            max_q: -3,
        };
        assert_eq!(h.quantize(5.0), 0);
    }
}
