//! The FHE plan: fixes how every accumulator is encoded on the torus, builds one lookup table
//! per hidden neuron, and writes the result as a versioned compiled-model file.
//!
//! Encoding (see ARCHITECTURE.md): a hidden layer's inputs are LWE encryptions of integers
//! `q_j * delta`. A neuron's accumulator `acc = sum_j w_j q_j` is computed with no bootstrap,
//! scaled by an integer `k` and shifted by a constant so that its calibrated range (with a
//! margin) covers the programmable half of the torus, positions `[GUARD, 2048 - GUARD)` of
//! the 2N = 4096 circle the bootstrap reads. The bootstrap reads the position `p`, about 11
//! bits with a few positions of noise, and its lookup table returns the next layer's
//! quantized activation times the next layer's `delta`. The last layer is not bootstrapped:
//! the client decrypts `delta * acc` and decodes the scores.

use std::io::{Read, Write};
use std::path::Path;

use bincode::Options;
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
use crate::ir::{Activation, FloatModel, TailOp};
use crate::quantize::{QuantConfig, QuantModel, UniformQuant, quantize};

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
/// zero_j, 0, 2^bits - 1)`, encrypted as `q_j * delta`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InputEncoding {
    pub quant: Vec<UniformQuant>,
    pub delta: u64,
}

impl InputEncoding {
    pub fn quantize(&self, x: &[f64]) -> Result<Vec<i64>> {
        if x.len() != self.quant.len() {
            return Err(ModelError::Shape(format!(
                "{} features given, the model takes {}",
                x.len(),
                self.quant.len()
            )));
        }
        Ok(x.iter()
            .zip(&self.quant)
            .map(|(&v, q)| q.quantize(v))
            .collect())
    }
}

/// How the client turns decrypted accumulators into scores: `score_n = scale_n * acc_n +
/// offset_n`, where `acc_n = phase_n / delta` (phase read as a signed 64-bit value).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OutputDecoding {
    pub delta: u64,
    pub scale: Vec<f64>,
    pub offset: Vec<f64>,
}

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

/// A layer whose neurons each end in one bootstrap.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HiddenLayer {
    /// Integer weights, the per-neuron range multiplier `k` already folded in.
    pub weights: IntMatrix,
    /// Per-neuron torus constant added to the accumulator (`GUARD` positions minus the
    /// scaled range start), so that `phase = delta_in * acc + offset` lands in `[0, 2^63)`.
    pub offset: Vec<u64>,
    /// `POSITIONS` entries per neuron: the next layer's quantized value at each position.
    pub lut: Vec<u16>,
    /// Input encoding scale (the previous layer's `delta_out`, or the input's `delta`).
    pub delta_in: u64,
    /// Scale of this layer's outputs on the torus.
    pub delta_out: u64,
    /// Predicted read noise per neuron, in positions (one standard deviation).
    pub read_sigma: Vec<f64>,
    /// Widest calibrated accumulator range of the layer (before `k`), in integer units.
    pub max_acc_width: u64,
}

impl HiddenLayer {
    pub fn lut_of(&self, n: usize) -> &[u16] {
        &self.lut[n * POSITIONS as usize..(n + 1) * POSITIONS as usize]
    }
}

/// The last linear layer: computed without bootstrap and decrypted by the client.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OutputLayer {
    pub weights: IntMatrix,
    pub decoding: OutputDecoding,
    /// Predicted noise of each output, in positions.
    pub sigma: Vec<f64>,
    pub max_acc_width: u64,
}

/// A model ready for simulation and encrypted execution; what a `.veil` file holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CompiledModel {
    pub input_shape: Vec<usize>,
    pub params: ParamSet,
    pub config: QuantConfig,
    pub input: InputEncoding,
    pub hidden: Vec<HiddenLayer>,
    pub output: OutputLayer,
    /// Clear-text ops the client applies to the decoded scores.
    pub tail: Vec<TailOp>,
    pub class_labels: Option<Vec<i64>>,
}

/// What a client needs to encrypt inputs and decode outputs; holds no weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClientSpec {
    pub params: ParamSet,
    pub input_shape: Vec<usize>,
    pub input: InputEncoding,
    pub output: OutputDecoding,
    pub tail: Vec<TailOp>,
    pub class_labels: Option<Vec<i64>>,
    pub pbs_per_sample: usize,
}

/// Compiles a float model: quantizes it on `calibration`, then plans its FHE encoding.
pub fn compile(
    model: &FloatModel,
    calibration: &[Vec<f64>],
    cfg: &QuantConfig,
) -> Result<CompiledModel> {
    let q = quantize(model, calibration, cfg)?;
    plan(model, &q, calibration, cfg)
}

fn plan(
    model: &FloatModel,
    q: &QuantModel,
    calibration: &[Vec<f64>],
    cfg: &QuantConfig,
) -> Result<CompiledModel> {
    let mut xs: Vec<Vec<i64>> = calibration
        .iter()
        .map(|x| {
            x.iter()
                .zip(&q.input)
                .map(|(&v, u)| u.quantize(v))
                .collect()
        })
        .collect();
    let n_hidden = q.acts.len();
    let mut hidden: Vec<HiddenLayer> = Vec::with_capacity(n_hidden);
    let mut input_delta = 0u64;
    for l in 0..n_hidden {
        let layer = &q.layers[l];
        let weights = IntMatrix {
            n_in: layer.n_in as u32,
            rows: layer.rows.clone(),
        };
        let accs: Vec<Vec<i64>> = xs.iter().map(|x| weights.apply(x)).collect();
        let n_out = weights.n_out();
        // Calibrated range of each accumulator, widened by the margin.
        let ranges: Vec<(i64, i64)> = (0..n_out)
            .map(|n| {
                let (lo, hi) = accs.iter().fold((i64::MAX, i64::MIN), |(lo, hi), a| {
                    (lo.min(a[n]), hi.max(a[n]))
                });
                let pad = ((hi - lo) as f64 * cfg.range_margin).ceil() as i64 + 1;
                (lo - pad, hi + pad)
            })
            .collect();
        let max_width = ranges
            .iter()
            .map(|(lo, hi)| hi - lo)
            .max()
            .unwrap_or(1)
            .max(1);
        let usable = ((POSITIONS - 2 * GUARD) as i128) * POSITION;
        let delta = usable / max_width as i128;
        if delta < 1 || delta > u64::MAX as i128 {
            return Err(ModelError::Plan(format!(
                "layer {l}: accumulators span {max_width} values, too wide for a 64-bit torus"
            )));
        }
        let delta = delta as u64;
        if l == 0 {
            input_delta = delta;
        } else {
            hidden[l - 1].delta_out = delta;
        }
        let (act_chain, out_quant) = &q.acts[l];
        let mut rows = Vec::with_capacity(n_out);
        let mut offset = Vec::with_capacity(n_out);
        let mut lut = Vec::with_capacity(n_out * POSITIONS as usize);
        let mut read_sigma = Vec::with_capacity(n_out);
        for n in 0..n_out {
            let (lo, hi) = ranges[n];
            let width = (hi - lo).max(1) as i128;
            let k = (usable / (delta as i128 * width)).max(1) as i64;
            rows.push(
                weights.rows[n]
                    .iter()
                    .map(|&(c, w)| (c, w * k))
                    .collect::<Vec<_>>(),
            );
            let off = GUARD as i128 * POSITION - (k as i128) * (delta as i128) * lo as i128;
            offset.push(off as u64); // two's complement: the torus wraps
            // The lookup table: decode the position back to an accumulator value, then apply
            // rescaling, bias, activation and the next layer's quantization.
            let step = POSITION as f64 / (k as f64 * delta as f64);
            let (t, c, uq) = (layer.scale[n], layer.offset[n], out_quant[n]);
            for p in 0..POSITIONS {
                let acc = lo as f64 + (p - GUARD) as f64 * step;
                let y = Activation::apply_chain(act_chain, t * acc + c);
                lut.push(uq.quantize(y) as u16);
            }
            let fresh_inputs = l == 0;
            let w2 = (k * k) as f64 * weights.sum_sq(n);
            read_sigma.push(
                (KS_MS_VARIANCE
                    + if fresh_inputs {
                        0.0
                    } else {
                        w2 * PBS_OUTPUT_VARIANCE
                    })
                .sqrt(),
            );
        }
        let layer_plan = HiddenLayer {
            weights: IntMatrix {
                n_in: weights.n_in,
                rows,
            },
            offset,
            lut,
            delta_in: if l == 0 {
                input_delta
            } else {
                hidden[l - 1].delta_out
            },
            delta_out: 0, // set by the next layer
            read_sigma,
            max_acc_width: max_width as u64,
        };
        // Next layer's calibration inputs: run this layer exactly as the plan does.
        xs = xs
            .iter()
            .map(|x| crate::simulate::hidden_layer(&layer_plan, x, None).0)
            .collect();
        hidden.push(layer_plan);
    }

    // Output layer: no bootstrap, so its accumulators only need to fit the signed torus.
    let last = &q.layers[n_hidden];
    let weights = IntMatrix {
        n_in: last.n_in as u32,
        rows: last.rows.clone(),
    };
    // Largest calibrated |acc|, with the margin; the signed torus holds twice that (2^62).
    let out_ranges = xs.iter().map(|x| weights.apply(x)).fold(
        vec![(i64::MAX, i64::MIN); weights.n_out()],
        |mut r, a| {
            for (r, v) in r.iter_mut().zip(a) {
                *r = (r.0.min(v), r.1.max(v));
            }
            r
        },
    );
    let max_abs = out_ranges
        .iter()
        .map(|&(lo, hi)| lo.unsigned_abs().max(hi.unsigned_abs()))
        .max()
        .unwrap_or(1);
    let bound = ((max_abs as f64 * (1.0 + cfg.range_margin)).ceil() as u64).max(1);
    let out_delta = ((1u64 << 62) / bound).max(1);
    if n_hidden == 0 {
        input_delta = out_delta;
    } else {
        hidden[n_hidden - 1].delta_out = out_delta;
    }
    let max_acc_width = out_ranges
        .iter()
        .map(|(lo, hi)| (hi - lo).max(0) as u64)
        .max()
        .unwrap_or(0);
    let sigma = (0..weights.n_out())
        .map(|n| {
            if n_hidden == 0 {
                0.0
            } else {
                (weights.sum_sq(n) * PBS_OUTPUT_VARIANCE).sqrt()
            }
        })
        .collect();
    let output = OutputLayer {
        decoding: OutputDecoding {
            delta: out_delta,
            scale: last.scale.clone(),
            offset: last.offset.clone(),
        },
        weights,
        sigma,
        max_acc_width,
    };
    let compiled = CompiledModel {
        input_shape: model.input_shape.clone(),
        params: ParamSet::Message2Carry2KsPbsTuniform2m128,
        config: *cfg,
        input: InputEncoding {
            quant: q.input.clone(),
            delta: input_delta,
        },
        hidden,
        output,
        tail: model.tail.clone(),
        class_labels: model.class_labels.clone(),
    };
    compiled.validate()?;
    Ok(compiled)
}

/// File format: magic, format version (u32 little-endian), then the bincode body.
const MAGIC: &[u8; 8] = b"VEILMDL\0";
pub const FORMAT_VERSION: u32 = 1;
/// Largest compiled model a reader accepts.
pub const MAX_MODEL_BYTES: u64 = 256 << 20;

fn bincode_options() -> impl Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_limit(MAX_MODEL_BYTES)
        .reject_trailing_bytes()
}

impl CompiledModel {
    pub fn pbs_per_sample(&self) -> usize {
        self.hidden.iter().map(|h| h.weights.n_out()).sum()
    }

    pub fn n_features(&self) -> usize {
        self.input.quant.len()
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
            pbs_per_sample: self.pbs_per_sample(),
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend(
            bincode_options()
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
        let mut f = std::fs::File::create(path)
            .map_err(|e| ModelError::io(format!("creating {}", path.display()), e))?;
        f.write_all(&self.to_bytes())
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
        if !self.input.quant.iter().all(quant_ok) || self.input.delta == 0 {
            return bad("invalid input encoding".into());
        }
        let check_matrix = |m: &IntMatrix, n_in: usize, what: &str| -> Result<()> {
            if m.n_in as usize != n_in || m.rows.is_empty() {
                return bad(format!(
                    "{what}: takes {} inputs, the previous layer gives {n_in}",
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
        let mut n_in = n_features;
        let mut delta = self.input.delta;
        for (l, h) in self.hidden.iter().enumerate() {
            let what = format!("hidden layer {l}");
            check_matrix(&h.weights, n_in, &what)?;
            let n_out = h.weights.n_out();
            if h.offset.len() != n_out
                || h.read_sigma.len() != n_out
                || h.lut.len() != n_out * POSITIONS as usize
            {
                return bad(format!("{what}: per-neuron tables have the wrong length"));
            }
            if h.delta_in != delta || h.delta_out == 0 {
                return bad(format!("{what}: encoding scales do not chain"));
            }
            delta = h.delta_out;
            n_in = n_out;
        }
        check_matrix(&self.output.weights, n_in, "output layer")?;
        let d = &self.output.decoding;
        let n_out = self.output.weights.n_out();
        if d.delta != delta
            || d.scale.len() != n_out
            || d.offset.len() != n_out
            || self.output.sigma.len() != n_out
        {
            return bad("output decoding does not match the output layer".into());
        }
        if let Some(labels) = &self.class_labels {
            let n = crate::ir::apply_tail(&self.tail, vec![0.0; n_out]).len();
            if labels.len() != n {
                return bad(format!("{} class labels for {n} outputs", labels.len()));
            }
        }
        Ok(())
    }

    /// A summary for `veil compile --json` and logs.
    pub fn summary(&self) -> serde_json::Value {
        let mut layers = Vec::new();
        let mut widest = 0u64;
        for h in &self.hidden {
            widest = widest.max(h.max_acc_width);
            layers.push(serde_json::json!({
                "kind": "linear+pbs",
                "inputs": h.weights.n_in,
                "outputs": h.weights.n_out(),
                "weights": h.weights.nnz(),
                "pbs": h.weights.n_out(),
                "acc_bits": bits(h.max_acc_width),
                "max_read_sigma_positions": h.read_sigma.iter().cloned().fold(0.0, f64::max),
            }));
        }
        widest = widest.max(self.output.max_acc_width);
        layers.push(serde_json::json!({
            "kind": "linear (decrypted by the client)",
            "inputs": self.output.weights.n_in,
            "outputs": self.output.weights.n_out(),
            "weights": self.output.weights.nnz(),
            "pbs": 0,
            "acc_bits": bits(self.output.max_acc_width),
        }));
        serde_json::json!({
            "input_shape": self.input_shape,
            "layers": layers,
            "input_bits": self.config.input_bits,
            "first_layer_weight_bits": self.config.first_weight_bits,
            "weight_bits": self.config.weight_bits,
            "activation_bits": self.config.act_bits,
            "widest_accumulator_bits": bits(widest),
            "pbs_per_sample": self.pbs_per_sample(),
            "parameter_set": self.params.name(),
            "outputs": self.n_outputs(),
        })
    }
}

/// Bits needed to hold `width + 1` distinct values.
fn bits(width: u64) -> u32 {
    64 - width.leading_zeros()
}
