//! The compiled-model format: the contract the server and the client share.
//!
//! A model is a list of values: the client's encrypted input features, then the outputs of
//! each [`Stage`] of lookups, each neuron a weighted sum of earlier values, shifted onto the
//! torus and read by one programmable bootstrap; then linear outputs the client decrypts.
//!
//! Encoding (see ARCHITECTURE.md): values are LWE encryptions of integers `q * delta`. A
//! neuron's accumulator `acc = sum_j w_j q_j` is computed with no bootstrap, scaled by an
//! integer `k` and shifted by a constant so that its calibrated range (with a margin) covers
//! the programmable half of the torus, positions `[GUARD, 2048 - GUARD)` of the 2N = 4096
//! circle the bootstrap reads. The bootstrap reads the position `p`, about 11 bits with a few
//! positions of noise, and its lookup table returns the neuron's quantized output times its
//! `delta_out`. [`Stage::phase`] and [`Stage::read`] are the one definition of that integer
//! arithmetic, shared by the planner, the simulator and the tests.

use std::io::{Read, Write};
use std::path::Path;

use bincode::Options;
use serde::{Deserialize, Serialize};

use crate::error::{FormatError, Result};
use crate::quant::{QuantConfig, UniformQuant};
use crate::tail::{Reveal, TailOp, Task};

/// Positions on the 2N = 4096 circle (2048 programmable with one padding bit).
pub const POSITIONS: i64 = 2048;
/// One position in torus units: 2^64 / 4096.
pub const POSITION: i128 = 1 << 52;
/// Positions kept free at each end of the programmable half, against noise and overflow.
pub const GUARD: i64 = 64;

/// Read noise of one keyswitch + centered modulus switch, in positions squared
/// (measured with real keys on the project machines: keyswitch std 1.94, modulus-switch
/// rounding std 4.38 positions; `examples/noise_probe.rs` reads the sum end to end).
pub const KS_MS_VARIANCE: f64 = 23.9;
/// Noise of one bootstrap output, in positions squared (std 0.137).
pub const PBS_OUTPUT_VARIANCE: f64 = 0.0187;

/// The tfhe parameter set a model is compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ParamSet {
    /// `tfhe::shortint::parameters::PARAM_MESSAGE_2_CARRY_2_KS_PBS_TUNIFORM_2M128`, tfhe 1.8.
    Message2Carry2KsPbsTuniform2m128,
}

/// The dimensions of a parameter set that size keys and ciphertexts. The runtime checks them
/// against tfhe's own parameters (`veil-runtime`'s `format_dims_are_tfhes` test), so the
/// format needs no FHE code to size a model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LweDims {
    /// Small LWE dimension `n` (ciphertexts after a keyswitch).
    pub lwe_dimension: usize,
    /// GLWE dimension `k`.
    pub glwe_dimension: usize,
    /// Polynomial size `N`.
    pub polynomial_size: usize,
    /// Keyswitching decomposition levels.
    pub ks_level: usize,
    /// Bootstrapping decomposition levels.
    pub pbs_level: usize,
}

impl LweDims {
    /// LWE size of ciphertexts between operations (the big key, `k * N + 1`).
    pub fn big_lwe_size(&self) -> usize {
        self.glwe_dimension * self.polynomial_size + 1
    }

    /// LWE size after a keyswitch (`n + 1`).
    pub fn small_lwe_size(&self) -> usize {
        self.lwe_dimension + 1
    }
}

impl ParamSet {
    /// Every parameter set Veil supports.
    pub const ALL: [ParamSet; 1] = [ParamSet::Message2Carry2KsPbsTuniform2m128];

    /// Key and ciphertext dimensions (tfhe 1.8.2's values for this set).
    pub fn dims(&self) -> LweDims {
        match self {
            ParamSet::Message2Carry2KsPbsTuniform2m128 => LweDims {
                lwe_dimension: 918,
                glwe_dimension: 1,
                polynomial_size: 2048,
                ks_level: 4,
                pbs_level: 1,
            },
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            ParamSet::Message2Carry2KsPbsTuniform2m128 => {
                "PARAM_MESSAGE_2_CARRY_2_KS_PBS_TUNIFORM_2M128"
            }
        }
    }
}

/// How the client turns a feature vector into plaintexts: `q_j = clamp(round(x_j / scale_j) +
/// zero_j, 0, 2^bits - 1)` per feature, then one value per [`InputWindow`]; each is encrypted
/// as `value * delta`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InputEncoding {
    pub quant: Vec<UniformQuant>,
    pub windows: Vec<InputWindow>,
    pub delta: u64,
}

/// Values one window holds: a bootstrap tells 16 values apart with no error (4 bits at the
/// parameter set's own failure rate).
pub const WINDOW: i64 = 16;
/// Offset between consecutive windows of a feature: they overlap by 3, so any 3 adjacent grid
/// values (an equality test and its neighbours) lie inside one window.
pub const WINDOW_STRIDE: i64 = 13;

/// A window of one feature's grid, `clamp(q - offset, 0, WINDOW - 1)`: a test `q <= t` with `t`
/// inside the window reads it exactly, whatever the feature's width. A model sends every
/// window of each feature it tests, so the windows reveal nothing about its thresholds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputWindow {
    pub feature: u32,
    pub offset: i64,
}

impl InputWindow {
    /// Every window of a grid of `max_q + 1` values.
    pub fn cover(feature: u32, max_q: i64) -> impl Iterator<Item = InputWindow> {
        let n = ((max_q - (WINDOW - 1)).max(0) + WINDOW_STRIDE - 1) / WINDOW_STRIDE + 1;
        (0..n).map(move |m| InputWindow {
            feature,
            offset: m * WINDOW_STRIDE,
        })
    }

    pub fn value(&self, q: i64) -> i64 {
        q.saturating_sub(self.offset).clamp(0, WINDOW - 1)
    }
}

impl InputEncoding {
    /// Ciphertexts per sample.
    pub fn n_values(&self) -> usize {
        self.quant.len() + self.windows.len()
    }

    /// Every integer the client encrypts for one sample: the features on their grids, then
    /// the windows. A NaN, infinite or huge feature is refused (as row 0; see
    /// [`Self::quantize_row`]).
    pub fn quantize(&self, x: &[f64]) -> Result<Vec<i64>> {
        self.quantize_row(0, x)
    }

    /// [`Self::quantize`] for sample `row` of a batch, which a refused feature's error names.
    pub fn quantize_row(&self, row: usize, x: &[f64]) -> Result<Vec<i64>> {
        if x.len() != self.quant.len() {
            return Err(FormatError::Shape(format!(
                "row {row}: {} features given, the model takes {}",
                x.len(),
                self.quant.len()
            )));
        }
        crate::input::check_row(row, x)?;
        let mut q: Vec<i64> = x
            .iter()
            .zip(&self.quant)
            .map(|(&v, u)| u.quantize(v))
            .collect();
        for w in &self.windows {
            let v = q.get(w.feature as usize).copied().ok_or_else(|| {
                FormatError::InvalidClientSpec(format!(
                    "a window reads feature {}, the model has {}",
                    w.feature,
                    self.quant.len()
                ))
            })?;
            q.push(w.value(v));
        }
        Ok(q)
    }

    /// The largest integer each input ciphertext holds (grid maximum, or the window's).
    fn max_values(&self) -> impl Iterator<Item = u64> + '_ {
        let quant = self.quant.iter().map(|u| u.max_q.max(0) as u64);
        quant.chain(self.windows.iter().map(|_| (WINDOW - 1) as u64))
    }

    /// Checks what the client relies on to quantize and encrypt: sane grids, windows inside
    /// their features' grids, and a bounded number of ciphertexts.
    pub fn check(&self) -> std::result::Result<(), String> {
        let n = self.quant.len().saturating_add(self.windows.len());
        if self.quant.is_empty() || n > MAX_INPUT_VALUES {
            return Err(format!(
                "{} features and {} windows; a sample holds 1 to {MAX_INPUT_VALUES} input \
                 ciphertexts",
                self.quant.len(),
                self.windows.len()
            ));
        }
        if let Some((j, u)) = self.quant.iter().enumerate().find(|(_, u)| {
            let ok = u.scale.is_finite()
                && u.scale > 0.0
                && (1..=MAX_GRID).contains(&u.max_q)
                && (0..=u.max_q).contains(&u.zero);
            !ok
        }) {
            return Err(format!(
                "feature {j}: grid scale {} zero {} max {} (the scale must be finite and \
                 positive, the grid 2 to {} values holding its zero)",
                u.scale,
                u.zero,
                u.max_q,
                MAX_GRID + 1
            ));
        }
        if let Some(w) = self.windows.iter().find(|w| {
            self.quant
                .get(w.feature as usize)
                .is_none_or(|u| !(0..=u.max_q).contains(&w.offset))
        }) {
            return Err(format!(
                "window at offset {} of feature {} lies outside the feature's grid",
                w.offset, w.feature
            ));
        }
        if self.delta == 0 {
            return Err("input scale (delta) is 0".into());
        }
        Ok(())
    }
}

/// Largest grid maximum of an input feature (16-bit grids).
pub const MAX_GRID: i64 = 1 << 16;
/// Most input ciphertexts of one sample (features plus windows): a client never encrypts more
/// per sample, whatever a server's spec says. The CIFAR-size CNN takes 3,072.
pub const MAX_INPUT_VALUES: usize = 1 << 16;
/// Most outputs a model decrypts per sample, and most class labels.
pub const MAX_OUTPUTS: usize = 1 << 16;
/// Most clear-text tail ops (models have at most 2).
pub const MAX_TAIL_OPS: usize = 16;
/// Most stages (bootstrap layers) of a model.
pub const MAX_STAGES: usize = 1 << 10;
/// Most lookups (bootstraps) per sample. Each holds a 16 KiB ciphertext while a sample runs,
/// so this bounds a sample's memory (2 GiB) and work; the CIFAR-size CNN has 53,248.
pub const MAX_LOOKUPS: usize = 1 << 17;
/// Most distinct lookup tables of a model: 256 MiB in the file, each expands to a 32 KiB
/// GLWE accumulator on the server (2 GiB at most).
pub const MAX_TABLES: usize = 1 << 16;
/// Most nonzero weights (multiply-accumulates of ciphertexts per sample); the CIFAR-size CNN
/// has 9.6 million.
pub const MAX_WEIGHTS: usize = 1 << 26;
/// Largest accumulator magnitude a linear form may reach (sum of |weight| times the largest
/// value it reads): the integer pipeline never overflows an i64.
pub const MAX_ACC: u128 = 1 << 62;

/// How the client turns decrypted accumulators into scores: `score_n = scale_n * acc_n +
/// offset_n`, where `acc_n = phase_n / delta` (phase read as a signed 64-bit value).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OutputDecoding {
    pub delta: u64,
    pub scale: Vec<f64>,
    pub offset: Vec<f64>,
    /// The server switches each output ciphertext from modulus 2^64 to 2^modulus_bits and
    /// sends only those bits (see [`switch_sigma_positions`]); 64 means no switch.
    pub modulus_bits: u32,
}

/// Standard deviation, in positions, that switching a big-key LWE ciphertext of dimension
/// `n` (binary key) from 2^64 to 2^bits adds to its phase: the body and each of the ~n/2
/// mask elements under a one bit of the key are rounded by a uniform error of variance 1/12
/// units of 2^(64 - bits).
pub fn switch_sigma_positions(bits: u32, n: usize) -> f64 {
    if bits >= 64 {
        return 0.0;
    }
    let unit = 2f64.powi(64 - bits as i32) / POSITION as f64;
    (n as f64 / 24.0 + 1.0 / 12.0).sqrt() * unit
}

/// Bytes of one sample's outputs on the wire: `count` ciphertexts of `lwe_size` elements of
/// `bits` bits each, packed, plus the wire header (`fhe::wire`).
pub fn output_wire_bytes(count: usize, lwe_size: usize, bits: u32) -> usize {
    OUTPUT_WIRE_HEADER + (count * lwe_size * bits as usize).div_ceil(64) * 8
}

/// Header of the output wire form: LWE size, count and bits (u64, u64, u32), the packed
/// words' length prefix (u64).
pub const OUTPUT_WIRE_HEADER: usize = 28;

impl OutputDecoding {
    /// Checks the decoding of `n_out` outputs: matching lengths, finite scales and offsets.
    fn check(&self, n_out: usize) -> std::result::Result<(), String> {
        if self.delta == 0
            || !(1..=64).contains(&self.modulus_bits)
            || self.scale.len() != n_out
            || self.offset.len() != n_out
        {
            return Err(format!(
                "output decoding: {} scales and {} offsets for {n_out} outputs, delta {}, \
                 {} bits",
                self.scale.len(),
                self.offset.len(),
                self.delta,
                self.modulus_bits
            ));
        }
        if !self.scale.iter().chain(&self.offset).all(|v| v.is_finite()) {
            return Err("output decoding: a scale or offset is not finite".into());
        }
        Ok(())
    }

    pub fn scores(&self, accs: &[f64]) -> Vec<f64> {
        accs.iter()
            .zip(self.scale.iter().zip(&self.offset))
            .map(|(a, (s, o))| s * a + o)
            .collect()
    }
}

/// Integer weights of one layer: row `n` lists `(input, weight)`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IntMatrix {
    pub n_in: u32,
    pub rows: Vec<Vec<(u32, i64)>>,
}

impl IntMatrix {
    pub fn apply(&self, q: &[i64]) -> Vec<i64> {
        self.rows
            .iter()
            .map(|row| row.iter().map(|&(c, w)| w * q[c as usize]).sum())
            .collect()
    }

    pub fn sum_sq(&self, n: usize) -> f64 {
        self.rows[n].iter().map(|&(_, w)| (w * w) as f64).sum()
    }

    pub fn n_out(&self) -> usize {
        self.rows.len()
    }

    /// Number of nonzero weights (the multiply-accumulates of one sample).
    pub fn nnz(&self) -> usize {
        self.rows.iter().map(Vec::len).sum()
    }
}

/// The lookups of one stage: every neuron reads values computed before the stage (inputs and
/// earlier stages' outputs) and ends in one bootstrap. A stage's outputs are appended to the
/// value list, after the inputs and the earlier stages.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Stage {
    /// Integer weights over the values before this stage, the per-neuron range multiplier
    /// `k` already folded in.
    pub weights: IntMatrix,
    /// Per-neuron torus constant added to the accumulator (`GUARD` positions minus the
    /// scaled range start), so that `phase = delta_in * acc + offset` lands in `[0, 2^63)`.
    pub offset: Vec<u64>,
    /// The stage's distinct tables, `POSITIONS` entries each: a table's quantized output at
    /// each position. Neurons whose tables come out identical share one (most neurons'
    /// calibrated ranges differ, so most tables are their own).
    pub lut: Vec<u16>,
    /// Per neuron: which table of `lut` it reads.
    pub lut_index: Vec<u32>,
    /// Torus scale of the values each neuron reads (they share one).
    pub delta_in: Vec<u64>,
    /// Torus scale each neuron's table writes its output at.
    pub delta_out: Vec<u64>,
    /// Predicted read noise per neuron, in positions (one standard deviation).
    pub read_sigma: Vec<f64>,
    /// Widest calibrated accumulator range of the stage (before `k`), in integer units.
    pub max_acc_width: u64,
}

impl Stage {
    pub fn lut_of(&self, n: usize) -> &[u16] {
        let t = self.lut_index[n] as usize;
        &self.lut[t * POSITIONS as usize..(t + 1) * POSITIONS as usize]
    }

    /// Appends neuron `n`'s table (POSITIONS entries), sharing an identical earlier one.
    pub fn push_table(
        &mut self,
        table: &[u16],
        seen: &mut std::collections::HashMap<Vec<u16>, u32>,
    ) {
        debug_assert_eq!(table.len(), POSITIONS as usize);
        let next = (self.lut.len() / POSITIONS as usize) as u32;
        let t = *seen.entry(table.to_vec()).or_insert(next);
        if t == next {
            self.lut.extend_from_slice(table);
        }
        self.lut_index.push(t);
    }

    pub fn len(&self) -> usize {
        self.weights.n_out()
    }

    pub fn is_empty(&self) -> bool {
        self.weights.rows.is_empty()
    }

    /// The torus phase neuron `n` bootstraps, from its integer accumulator (wrapping, as the
    /// ciphertexts do).
    pub fn phase(&self, n: usize, acc: i64) -> u64 {
        (acc as u64)
            .wrapping_mul(self.delta_in[n])
            .wrapping_add(self.offset[n])
    }

    /// What the bootstrap of neuron `n` returns for `phase`: the table entry at the nearest of
    /// the 4096 positions, negated in the negacyclic half (an overflow, reported as `true`).
    pub fn read(&self, n: usize, phase: u64) -> (i64, bool) {
        let p = (phase.wrapping_add(1 << 51) >> 52) as i64;
        if p < POSITIONS {
            (self.lut_of(n)[p as usize] as i64, false)
        } else {
            (-(self.lut_of(n)[(p - POSITIONS) as usize] as i64), true)
        }
    }
}

/// The linear outputs: computed without bootstrap and decrypted by the client.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OutputLayer {
    /// Integer weights over every value (inputs and all stages).
    pub weights: IntMatrix,
    pub decoding: OutputDecoding,
    /// Predicted noise of each output, in positions.
    pub sigma: Vec<f64>,
    pub max_acc_width: u64,
}

/// What one ONNX node costs, for `veil compile --json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeCost {
    pub node: String,
    pub pbs: usize,
    /// Widest output grid of the node's lookups, in bits.
    pub output_bits: u32,
    /// Widest weights of the lookups' inputs, in bits (sign included).
    pub weight_bits: u32,
    /// Widest accumulator of the node's lookups, in bits.
    pub acc_bits: u32,
    /// Lookups whose tables round the read to its integer and whose values sit
    /// `MIN_DECISION_SPACING` positions apart or more (tree tests, leaf tables).
    #[serde(default)]
    pub exact_reads: usize,
    /// Lookups read with the bootstrap's noise (activations).
    #[serde(default)]
    pub approximate_reads: usize,
}

/// What rounding weights to integers lost in one ONNX node's linear forms (its lookups'
/// inputs; the node `outputs` for the model's output forms), for `veil compile --json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeRounding {
    pub node: String,
    /// Forms of the node (one per lookup, or per output).
    pub forms: usize,
    /// Worst form's share of its span (sum of |weight| x atom range) carried by weights that
    /// rounded to zero.
    pub dropped_weight: f64,
    /// Worst form's total weight rounding error, as a share of its span.
    pub rounding_error: f64,
    /// The source (an upstream ONNX node, or `input`) that lost the largest share of its own
    /// weight mass in one of these forms, and that share: a residual or Concat branch much
    /// smaller than its sibling rounds to zero as a whole.
    pub worst_branch: Option<(String, f64)>,
}

/// A branch losing more than this share of its weight mass in a node is reported as a
/// warning: the node's output no longer depends on it.
pub const DROPPED_BRANCH_WARNING: f64 = 0.5;

impl NodeRounding {
    /// The warning `veil compile` prints for this node, if a branch it reads mostly vanishes.
    pub fn warning(&self) -> Option<String> {
        let (branch, share) = self.worst_branch.as_ref()?;
        (*share > DROPPED_BRANCH_WARNING).then(|| {
            format!(
                "node '{}': {:.0}% of the weight mass it reads from '{branch}' rounds to zero \
                 (a branch much smaller than its sibling); raise --weight-bits / \
                 --first-weight-bits or rescale the branch",
                self.node,
                100.0 * share
            )
        })
    }
}

/// A model ready for simulation and encrypted execution; what a `.veil` file holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CompiledModel {
    pub input_shape: Vec<usize>,
    pub params: ParamSet,
    pub config: QuantConfig,
    pub input: InputEncoding,
    pub stages: Vec<Stage>,
    pub output: OutputLayer,
    /// Clear-text ops the client applies to the decoded scores.
    pub tail: Vec<TailOp>,
    pub class_labels: Option<Vec<i64>>,
    pub task: Task,
    /// Bootstraps and widths per ONNX node, in graph order.
    pub nodes: Vec<NodeCost>,
    /// Weight rounding per ONNX node, in graph order.
    pub rounding: Vec<NodeRounding>,
    /// Scores, or the class index only (the argmax's lookups are in the stages).
    pub reveal: Reveal,
}

/// What a client needs to encrypt inputs and decode outputs: no weights, though in scores
/// mode each output's decoding offset carries the last layer's bias (ARCHITECTURE.md, threat model).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClientSpec {
    pub params: ParamSet,
    pub input_shape: Vec<usize>,
    pub input: InputEncoding,
    pub output: OutputDecoding,
    pub tail: Vec<TailOp>,
    pub class_labels: Option<Vec<i64>>,
    pub task: Task,
    pub pbs_per_sample: usize,
    pub reveal: Reveal,
}

/// Checks what a client and a model share beyond the encodings: the input shape, the tail
/// and the labels for `n_out` outputs.
fn check_common(
    input_shape: &[usize],
    n_features: usize,
    n_out: usize,
    tail: &[TailOp],
    class_labels: Option<&[i64]>,
    reveal: Reveal,
) -> std::result::Result<(), String> {
    let product = input_shape
        .iter()
        .try_fold(1usize, |p, &d| p.checked_mul(d));
    if product != Some(n_features) {
        return Err(format!(
            "input shape {input_shape:?} does not match {n_features} input quantizers"
        ));
    }
    if !(1..=MAX_OUTPUTS).contains(&n_out) || tail.len() > MAX_TAIL_OPS {
        return Err(format!(
            "{n_out} outputs and {} tail ops (at most {MAX_OUTPUTS} and {MAX_TAIL_OPS})",
            tail.len()
        ));
    }
    if reveal == Reveal::Label && (n_out != 1 || !tail.is_empty()) {
        return Err("a label-only model has one output and no tail".into());
    }
    if let Some(labels) = class_labels {
        let n = crate::tail::apply_tail(tail, vec![0.0; n_out]).len();
        // A label-only output is an index into the labels, whatever their number.
        if reveal == Reveal::Scores && labels.len() != n
            || labels.is_empty()
            || labels.len() > MAX_OUTPUTS
        {
            return Err(format!("{} class labels for {n} outputs", labels.len()));
        }
    }
    Ok(())
}

impl ClientSpec {
    /// Checks a spec before the client uses it: a spec comes from a server, which must not be
    /// able to make the client panic or encrypt more than [`MAX_INPUT_VALUES`] per sample.
    pub fn validate(&self) -> Result<()> {
        let bad = FormatError::InvalidClientSpec;
        self.input.check().map_err(bad)?;
        let n_out = self.output.scale.len();
        self.output.check(n_out).map_err(bad)?;
        check_common(
            &self.input_shape,
            self.input.quant.len(),
            n_out,
            &self.tail,
            self.class_labels.as_deref(),
            self.reveal,
        )
        .map_err(bad)?;
        if self.pbs_per_sample > MAX_LOOKUPS {
            return Err(bad(format!(
                "{} bootstraps per sample, at most {MAX_LOOKUPS}",
                self.pbs_per_sample
            )));
        }
        Ok(())
    }
}

/// File format: magic, format version (u32 little-endian), the schema hash (32 bytes, see
/// [`schema_hash`]), then the bincode body.
const MAGIC: &[u8; 8] = b"VEILMDL\0";
/// Bumped by hand on a format change; the schema hash catches the changes nobody bumped for.
pub const FORMAT_VERSION: u32 = 5;
/// Bytes before the body.
pub const HEADER_BYTES: usize = 8 + 4 + 32;

/// SHA-256 of the body's wire types, traced from [`CompiledModel`] with `serde-reflection`:
/// every container's name and its fields' names, order and types, every enum's variants, and
/// the bincode options. Any change to a serialized type changes it, so a file written by
/// another build of the format is refused instead of misread.
pub fn schema_hash() -> &'static [u8; 32] {
    static HASH: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
    HASH.get_or_init(|| {
        let registry = schema_registry().expect("the compiled model's types can be traced");
        let text = serde_json::to_string(&registry).expect("a registry serializes");
        hash_schema_text(&text)
    })
}

/// The traced wire types of [`CompiledModel`] (a sorted map, so its JSON is deterministic).
pub fn schema_registry() -> std::result::Result<serde_reflection::Registry, String> {
    use serde_reflection::{Samples, Tracer, TracerConfig};
    let mut tracer = Tracer::new(TracerConfig::default());
    let samples = Samples::new();
    // Enums nested in the model are traced on their own first so that every variant is
    // seen; `registry` refuses a model with an enum left incomplete.
    let trace = |t: &mut Tracer| -> serde_reflection::Result<()> {
        t.trace_simple_type::<ParamSet>()?;
        t.trace_simple_type::<Task>()?;
        t.trace_simple_type::<Reveal>()?;
        t.trace_simple_type::<crate::tail::Rule>()?;
        t.trace_simple_type::<crate::tail::Activation>()?;
        t.trace_simple_type::<TailOp>()?;
        t.trace_type::<CompiledModel>(&samples)?;
        Ok(())
    };
    trace(&mut tracer).map_err(|e| e.to_string())?;
    tracer.registry().map_err(|e| e.to_string())
}

/// The schema hash of a registry's JSON text, with the body's encoding named.
pub fn hash_schema_text(registry_json: &str) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"veil compiled model; bincode 1, fixint, little-endian\n");
    h.update(registry_json.as_bytes());
    h.finalize().into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
/// Largest compiled model a reader accepts. Every neuron has a table of its own (its
/// calibrated range sets its scale), so a CIFAR-size CNN of 53,248 neurons takes 318 MB.
pub const MAX_MODEL_BYTES: u64 = 1 << 30;

fn bincode_options() -> impl Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_limit(MAX_MODEL_BYTES)
        .reject_trailing_bytes()
}

impl CompiledModel {
    pub fn pbs_per_sample(&self) -> usize {
        self.stages.iter().map(Stage::len).sum()
    }

    /// Values one sample holds: inputs plus every stage's outputs.
    pub fn n_values(&self) -> usize {
        self.n_inputs() + self.pbs_per_sample()
    }

    /// Features of one sample (the CSV columns).
    pub fn n_features(&self) -> usize {
        self.input.quant.len()
    }

    /// Ciphertexts of one sample's input: the features, then the windows.
    pub fn n_inputs(&self) -> usize {
        self.input.n_values()
    }

    pub fn n_outputs(&self) -> usize {
        self.output.weights.n_out()
    }

    pub fn client_spec(&self) -> ClientSpec {
        ClientSpec {
            params: self.params,
            input_shape: self.input_shape.clone(),
            input: self.input.clone(),
            output: self.output.decoding.clone(),
            tail: self.tail.clone(),
            class_labels: self.class_labels.clone(),
            task: self.task,
            pbs_per_sample: self.pbs_per_sample(),
            reveal: self.reveal,
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(schema_hash());
        // No size limit when writing (`save` refuses what a reader would): plain data
        // always serializes into a Vec.
        out.extend(
            bincode::DefaultOptions::new()
                .with_fixint_encoding()
                .serialize(self)
                .expect("a compiled model always serializes"),
        );
        out
    }

    /// Parses and checks a compiled model; never panics on damaged or hostile bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let bad = |why: String| FormatError::InvalidCompiledModel(why);
        if bytes.len() < 12 || &bytes[..8] != MAGIC {
            return Err(bad("not a Veil compiled model (bad magic bytes)".into()));
        }
        let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
        if version != FORMAT_VERSION {
            return Err(bad(format!(
                "format version {version}; this build reads version {FORMAT_VERSION}: \
                 recompile the model with this build's `veil compile`"
            )));
        }
        let hash = bytes
            .get(12..HEADER_BYTES)
            .ok_or_else(|| bad("truncated header".into()))?;
        if hash != schema_hash() {
            return Err(bad(format!(
                "written by a different Veil format (schema {}, this build reads {}); \
                 recompile the model",
                hex(&hash[..8]),
                hex(&schema_hash()[..8])
            )));
        }
        let model: CompiledModel = bincode_options()
            .deserialize(&bytes[HEADER_BYTES..])
            .map_err(|e| bad(format!("damaged body: {e}")))?;
        model.validate()?;
        Ok(model)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = self.to_bytes();
        if bytes.len() as u64 > MAX_MODEL_BYTES + HEADER_BYTES as u64 {
            return Err(FormatError::InvalidCompiledModel(format!(
                "the compiled model is {} bytes, more than the {MAX_MODEL_BYTES} a reader \
                 accepts: use fewer or smaller layers",
                bytes.len()
            )));
        }
        let mut f = std::fs::File::create(path)
            .map_err(|e| FormatError::io(format!("creating {}", path.display()), e))?;
        f.write_all(&bytes)
            .map_err(|e| FormatError::io(format!("writing {}", path.display()), e))
    }

    pub fn load(path: &Path) -> Result<Self> {
        let f = std::fs::File::open(path)
            .map_err(|e| FormatError::io(format!("opening {}", path.display()), e))?;
        let mut bytes = Vec::new();
        f.take(MAX_MODEL_BYTES + HEADER_BYTES as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| FormatError::io(format!("reading {}", path.display()), e))?;
        if bytes.len() as u64 > MAX_MODEL_BYTES + HEADER_BYTES as u64 {
            return Err(FormatError::InvalidCompiledModel(format!(
                "{} is larger than {MAX_MODEL_BYTES} bytes",
                path.display()
            )));
        }
        Self::from_bytes(&bytes)
    }

    /// Checks every size and index the simulator and executor rely on, and bounds the work
    /// and memory a model can ask for ([`MAX_STAGES`], [`MAX_LOOKUPS`], [`MAX_TABLES`],
    /// [`MAX_WEIGHTS`], [`MAX_ACC`]): a small hostile file cannot expand into gigabytes of
    /// tables or ciphertexts.
    pub fn validate(&self) -> Result<()> {
        let bad = |why: String| Err(FormatError::InvalidCompiledModel(why));
        if let Err(why) = self.input.check() {
            return bad(why);
        }
        let n_out = self.output.weights.n_out();
        if let Err(why) = check_common(
            &self.input_shape,
            self.n_features(),
            n_out,
            &self.tail,
            self.class_labels.as_deref(),
            self.reveal,
        ) {
            return bad(why);
        }
        if self.stages.len() > MAX_STAGES {
            return bad(format!(
                "{} stages, at most {MAX_STAGES}",
                self.stages.len()
            ));
        }
        let (mut lookups, mut tables) = (0usize, 0usize);
        for h in &self.stages {
            lookups = lookups.saturating_add(h.weights.n_out());
            tables = tables.saturating_add(h.lut.len() / POSITIONS as usize);
        }
        if lookups > MAX_LOOKUPS || tables > MAX_TABLES {
            return bad(format!(
                "{lookups} lookups and {tables} tables, at most {MAX_LOOKUPS} and {MAX_TABLES}"
            ));
        }
        let mut weights = 0usize;
        // Largest magnitude of each value, for the accumulator bound.
        let mut max_value: Vec<u64> = self.input.max_values().collect();
        let mut check_matrix = |m: &IntMatrix, max_value: &[u64], what: &str| -> Result<()> {
            let n_in = max_value.len();
            if m.n_in as usize != n_in || m.rows.is_empty() {
                return bad(format!(
                    "{what}: reads {} values, {n_in} are computed before it",
                    m.n_in
                ));
            }
            weights = weights.saturating_add(m.nnz());
            if weights > MAX_WEIGHTS {
                return bad(format!("more than {MAX_WEIGHTS} weights"));
            }
            for row in &m.rows {
                let mut acc = 0u128;
                for &(c, w) in row {
                    let Some(&v) = max_value.get(c as usize) else {
                        return bad(format!("{what}: weight index out of range"));
                    };
                    if w.unsigned_abs() > 1 << 40 {
                        return bad(format!("{what}: weight {w} out of range"));
                    }
                    acc += w.unsigned_abs() as u128 * v as u128;
                    if acc > MAX_ACC {
                        return bad(format!(
                            "{what}: an accumulator can reach more than 2^62 (overflow)"
                        ));
                    }
                }
            }
            Ok(())
        };
        let mut deltas: Vec<u64> = vec![self.input.delta; self.n_inputs()];
        for (l, h) in self.stages.iter().enumerate() {
            let what = format!("stage {l}");
            check_matrix(&h.weights, &max_value, &what)?;
            let n_out = h.weights.n_out();
            let n_tables = h.lut.len() / POSITIONS as usize;
            if h.offset.len() != n_out
                || h.read_sigma.len() != n_out
                || h.delta_in.len() != n_out
                || h.delta_out.len() != n_out
                || h.lut_index.len() != n_out
                || !h.lut.len().is_multiple_of(POSITIONS as usize)
                || n_tables > n_out
                || h.lut_index.iter().any(|&t| t as usize >= n_tables)
            {
                return bad(format!("{what}: per-neuron tables have the wrong length"));
            }
            if h.max_acc_width as u128 > MAX_ACC
                || !h.read_sigma.iter().all(|s| s.is_finite() && *s >= 0.0)
            {
                return bad(format!("{what}: accumulator width or noise out of range"));
            }
            for (n, row) in h.weights.rows.iter().enumerate() {
                if h.delta_out[n] == 0
                    || row
                        .iter()
                        .any(|&(c, _)| deltas[c as usize] != h.delta_in[n])
                {
                    return bad(format!("{what}: encoding scales do not match"));
                }
            }
            let table_max: Vec<u64> = h
                .lut
                .chunks_exact(POSITIONS as usize)
                .map(|t| t.iter().copied().max().unwrap_or(0) as u64)
                .collect();
            max_value.extend(h.lut_index.iter().map(|&t| table_max[t as usize]));
            deltas.extend_from_slice(&h.delta_out);
        }
        check_matrix(&self.output.weights, &max_value, "output layer")?;
        let d = &self.output.decoding;
        if let Err(why) = d.check(n_out) {
            return bad(why);
        }
        if self.output.sigma.len() != n_out
            || !self.output.sigma.iter().all(|s| s.is_finite() && *s >= 0.0)
            || self.output.max_acc_width as u128 > MAX_ACC
            || self
                .output
                .weights
                .rows
                .iter()
                .flatten()
                .any(|&(c, _)| deltas[c as usize] != d.delta)
        {
            return bad("output decoding does not match the output layer".into());
        }
        Ok(())
    }

    /// A summary for `veil compile --json` and logs.
    pub fn summary(&self) -> serde_json::Value {
        let mut stages = Vec::new();
        let mut widest = 0u64;
        for h in &self.stages {
            widest = widest.max(h.max_acc_width);
            stages.push(serde_json::json!({
                "kind": "linear+pbs",
                "reads": h.weights.n_in,
                "outputs": h.weights.n_out(),
                "weights": h.weights.nnz(),
                "pbs": h.weights.n_out(),
                "acc_bits": bits(h.max_acc_width),
                "max_read_sigma_positions": h.read_sigma.iter().cloned().fold(0.0, f64::max),
            }));
        }
        widest = widest.max(self.output.max_acc_width);
        stages.push(serde_json::json!({
            "kind": "linear (decrypted by the client)",
            "reads": self.output.weights.n_in,
            "outputs": self.output.weights.n_out(),
            "weights": self.output.weights.nnz(),
            "pbs": 0,
            "acc_bits": bits(self.output.max_acc_width),
        }));
        serde_json::json!({
            "input_shape": self.input_shape,
            "task": self.task.name(),
            "input_ciphertexts": self.n_inputs(),
            "stages": stages,
            "nodes": self.nodes,
            "rounding": self.rounding,
            "warnings": self.rounding.iter().filter_map(NodeRounding::warning).collect::<Vec<_>>(),
            "exact_reads": self.nodes.iter().map(|n| n.exact_reads).sum::<usize>(),
            "approximate_reads": self.nodes.iter().map(|n| n.approximate_reads).sum::<usize>(),
            "input_bits": self.input.quant.iter().map(|q| 64 - (q.max_q.max(1) as u64).leading_zeros()).max(),
            "first_layer_weight_bits": self.config.first_weight_bits,
            "weight_bits": self.config.weight_bits,
            "model_grid_bits": self.config.model_grid_bits,
            "widths_searched": self.config.search,
            "activation_bits": self.config.act_bits,
            "widest_accumulator_bits": bits(widest),
            "pbs_per_sample": self.pbs_per_sample(),
            "parameter_set": self.params.name(),
            "outputs": self.n_outputs(),
            "reveal": self.reveal.name(),
            "argmax_pbs_per_sample": self.nodes.iter().filter(|n| n.node == crate::tail::LABEL_ORIGIN).map(|n| n.pbs).sum::<usize>(),
            "output_modulus_bits": self.output.decoding.modulus_bits,
            "response_bytes_per_sample": output_wire_bytes(self.n_outputs(), self.params.dims().big_lwe_size(), self.output.decoding.modulus_bits),
        })
    }
}

/// Bits needed to hold `width + 1` distinct values.
pub fn bits(width: u64) -> u32 {
    64 - width.leading_zeros()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_is_traced_whole_and_deterministic() {
        let registry = schema_registry().unwrap();
        for name in [
            "CompiledModel",
            "Stage",
            "IntMatrix",
            "InputEncoding",
            "InputWindow",
            "UniformQuant",
            "OutputLayer",
            "OutputDecoding",
            "QuantConfig",
            "NodeCost",
            "TailOp",
            "Activation",
            "Grid",
            "Rule",
            "ParamSet",
            "Task",
            "Reveal",
        ] {
            assert!(
                registry.contains_key(name),
                "{name} missing from the schema"
            );
        }
        let text = serde_json::to_string(&registry).unwrap();
        assert!(text.contains("\"lut_index\"") && text.contains("\"HardSigmoid\""));
        let again = serde_json::to_string(&schema_registry().unwrap()).unwrap();
        assert_eq!(text, again);
        assert_eq!(*schema_hash(), hash_schema_text(&text));
        // One renamed field changes the hash.
        let renamed = text.replacen("\"lut_index\"", "\"table_index\"", 1);
        assert_ne!(hash_schema_text(&renamed), *schema_hash());
    }
}
