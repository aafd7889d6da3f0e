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

use crate::error::{ModelError, Result};
use crate::graph::{Reveal, TailOp, Task};
use crate::quantize::{QuantConfig, UniformQuant};

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

impl ParamSet {
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
        (q - self.offset).clamp(0, WINDOW - 1)
    }
}

impl InputEncoding {
    /// Ciphertexts per sample.
    pub fn n_values(&self) -> usize {
        self.quant.len() + self.windows.len()
    }

    /// Every integer the client encrypts for one sample: the features on their grids, then
    /// the windows.
    pub fn quantize(&self, x: &[f64]) -> Result<Vec<i64>> {
        if x.len() != self.quant.len() {
            return Err(ModelError::Shape(format!(
                "{} features given, the model takes {}",
                x.len(),
                self.quant.len()
            )));
        }
        let mut q: Vec<i64> = x
            .iter()
            .zip(&self.quant)
            .map(|(&v, u)| u.quantize(v))
            .collect();
        for w in &self.windows {
            q.push(w.value(q[w.feature as usize]));
        }
        Ok(q)
    }
}

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
    pub(crate) fn push_table(
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
    /// Worst form's share of its span carried by weights that rounded to zero: a branch much
    /// smaller than its sibling (a residual, a Concat) that quantization removed.
    pub dropped_weight: f64,
    /// Worst form's total weight rounding error, as a share of its span.
    pub rounding_error: f64,
}

/// A node whose forms lose more than this share of their span to dropped weights is worth a
/// warning: its output no longer depends on part of its input.
pub const DROPPED_WEIGHT_WARNING: f64 = 0.02;

impl NodeRounding {
    /// The warning `veil compile` prints for this node, if it drops too much.
    pub fn warning(&self) -> Option<String> {
        (self.dropped_weight > DROPPED_WEIGHT_WARNING).then(|| {
            format!(
                "node '{}': {:.1}% of its weight mass rounds to zero (a branch much smaller \
                 than its sibling?); raise --weight-bits / --first-weight-bits or rescale the \
                 branch",
                self.node,
                100.0 * self.dropped_weight
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

/// File format: magic, format version (u32 little-endian), then the bincode body.
const MAGIC: &[u8; 8] = b"VEILMDL\0";
pub const FORMAT_VERSION: u32 = 4;
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
        let bad = |why: String| ModelError::InvalidCompiledModel(why);
        if bytes.len() < 12 || &bytes[..8] != MAGIC {
            return Err(bad("not a Veil compiled model (bad magic bytes)".into()));
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
        if version != FORMAT_VERSION {
            return Err(bad(format!(
                "format version {version}; this build reads version {FORMAT_VERSION}"
            )));
        }
        let model: CompiledModel = bincode_options()
            .deserialize(&bytes[12..])
            .map_err(|e| bad(format!("damaged body: {e}")))?;
        model.validate()?;
        Ok(model)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = self.to_bytes();
        if bytes.len() as u64 > MAX_MODEL_BYTES + 12 {
            return Err(ModelError::InvalidCompiledModel(format!(
                "the compiled model is {} bytes, more than the {MAX_MODEL_BYTES} a reader \
                 accepts: use fewer or smaller layers",
                bytes.len()
            )));
        }
        let mut f = std::fs::File::create(path)
            .map_err(|e| ModelError::io(format!("creating {}", path.display()), e))?;
        f.write_all(&bytes)
            .map_err(|e| ModelError::io(format!("writing {}", path.display()), e))
    }

    pub fn load(path: &Path) -> Result<Self> {
        let f = std::fs::File::open(path)
            .map_err(|e| ModelError::io(format!("opening {}", path.display()), e))?;
        let mut bytes = Vec::new();
        f.take(MAX_MODEL_BYTES + 13)
            .read_to_end(&mut bytes)
            .map_err(|e| ModelError::io(format!("reading {}", path.display()), e))?;
        if bytes.len() as u64 > MAX_MODEL_BYTES + 12 {
            return Err(ModelError::InvalidCompiledModel(format!(
                "{} is larger than {MAX_MODEL_BYTES} bytes",
                path.display()
            )));
        }
        Self::from_bytes(&bytes)
    }

    /// Checks every size and index the simulator and executor rely on.
    pub fn validate(&self) -> Result<()> {
        let bad = |why: String| Err(ModelError::InvalidCompiledModel(why));
        let n_features = self.n_features();
        if n_features == 0 || self.input_shape.iter().product::<usize>() != n_features {
            return bad(format!(
                "input shape {:?} does not match {n_features} input quantizers",
                self.input_shape
            ));
        }
        let quant_ok = |u: &UniformQuant| {
            u.scale.is_finite() && u.scale > 0.0 && (1..=1 << 16).contains(&u.max_q)
        };
        let window_ok = |w: &InputWindow| {
            self.input
                .quant
                .get(w.feature as usize)
                .is_some_and(|u| (0..=u.max_q).contains(&w.offset))
        };
        if !self.input.quant.iter().all(quant_ok)
            || !self.input.windows.iter().all(window_ok)
            || self.input.delta == 0
        {
            return bad("invalid input encoding".into());
        }
        let check_matrix = |m: &IntMatrix, n_in: usize, what: &str| -> Result<()> {
            if m.n_in as usize != n_in || m.rows.is_empty() {
                return bad(format!(
                    "{what}: reads {} values, {n_in} are computed before it",
                    m.n_in
                ));
            }
            for row in &m.rows {
                if row
                    .iter()
                    .any(|&(c, w)| c as usize >= n_in || w.unsigned_abs() > 1 << 40)
                {
                    return bad(format!("{what}: weight index or value out of range"));
                }
            }
            Ok(())
        };
        let mut n_in = self.n_inputs();
        let mut deltas: Vec<u64> = vec![self.input.delta; n_in];
        for (l, h) in self.stages.iter().enumerate() {
            let what = format!("stage {l}");
            check_matrix(&h.weights, n_in, &what)?;
            let n_out = h.weights.n_out();
            if h.offset.len() != n_out
                || h.read_sigma.len() != n_out
                || h.delta_in.len() != n_out
                || h.delta_out.len() != n_out
                || h.lut_index.len() != n_out
                || !h.lut.len().is_multiple_of(POSITIONS as usize)
                || h.lut_index
                    .iter()
                    .any(|&t| (t as usize + 1) * POSITIONS as usize > h.lut.len())
            {
                return bad(format!("{what}: per-neuron tables have the wrong length"));
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
            deltas.extend_from_slice(&h.delta_out);
            n_in += n_out;
        }
        check_matrix(&self.output.weights, n_in, "output layer")?;
        let d = &self.output.decoding;
        let n_out = self.output.weights.n_out();
        if d.delta == 0
            || !(1..=64).contains(&d.modulus_bits)
            || d.scale.len() != n_out
            || d.offset.len() != n_out
            || self.output.sigma.len() != n_out
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
        if self.reveal == Reveal::Label && (n_out != 1 || !self.tail.is_empty()) {
            return bad("a label-only model has one output and no tail".into());
        }
        if let Some(labels) = &self.class_labels {
            let n = crate::graph::apply_tail(&self.tail, vec![0.0; n_out]).len();
            // A label-only output is an index into the labels, whatever their number.
            if self.reveal == Reveal::Scores && labels.len() != n || labels.is_empty() {
                return bad(format!("{} class labels for {n} outputs", labels.len()));
            }
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
            "argmax_pbs_per_sample": self.nodes.iter().filter(|n| n.node == crate::graph::LABEL_ORIGIN).map(|n| n.pbs).sum::<usize>(),
            "output_modulus_bits": self.output.decoding.modulus_bits,
            "response_bytes_per_sample": output_wire_bytes(self.n_outputs(), crate::fhe::big_lwe_size(self.params), self.output.decoding.modulus_bits),
        })
    }
}

/// Bits needed to hold `width + 1` distinct values.
pub(crate) fn bits(width: u64) -> u32 {
    64 - width.leading_zeros()
}
