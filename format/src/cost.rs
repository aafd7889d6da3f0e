//! What a compiled model costs per sample, before running it: bootstraps, linear work, bytes
//! on the wire and server memory; with a measured [`MachineProfile`], predicted latency.

use serde::{Deserialize, Serialize};

use crate::compiled::CompiledModel;

/// Throughput of this machine, measured by the runtime's `calibrate`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MachineProfile {
    pub cpu: String,
    pub threads: usize,
    pub parameter_set: String,
    /// tfhe's own keyswitch + bootstrap (shortint `apply_lookup_table`), one ciphertext on
    /// one thread: the reference for PBS efficiency.
    pub pbs_single_ms: f64,
    /// Keyswitch + bootstrap throughput with every thread busy, batched as the executor does.
    pub pbs_per_second: f64,
    /// Throughput on all threads by batch size per thread (batched blind rotation).
    pub pbs_per_second_by_batch: Vec<(usize, f64)>,
    /// Cleartext-weighted additions of big-key LWE ciphertexts per second, all threads.
    pub lwe_mac_per_second: f64,
    /// Regenerating one seeded input ciphertext's mask.
    pub expand_ms_per_feature: f64,
    /// Bytes of one compressed evaluation key (tfhe safe serialization).
    pub eval_key_bytes: u64,
    pub veil_version: String,
}

impl MachineProfile {
    /// Milliseconds one batch of `n` bootstraps takes: split evenly over the threads, at the
    /// throughput measured for the nearest batch size per thread (at most 32 per call).
    pub fn batch_ms(&self, n: usize) -> f64 {
        let t = self.threads.max(1);
        let per_thread = n.div_ceil(t);
        let rate = self
            .pbs_per_second_by_batch
            .iter()
            .min_by_key(|(b, _)| b.abs_diff(per_thread.min(32)))
            .map_or(self.pbs_per_second, |b| b.1);
        per_thread as f64 * 1e3 * t as f64 / rate
    }
}

/// Per-sample cost of a compiled model.
#[derive(Clone, Debug, Serialize)]
pub struct CostReport {
    pub pbs_per_sample: usize,
    /// Of those, the bootstraps of the argmax of a label-only model.
    pub argmax_pbs_per_sample: usize,
    /// `scores` or `label`: what the decrypted response reveals.
    pub reveal: &'static str,
    /// Bits per element of the returned ciphertexts (modulus 2^bits).
    pub output_modulus_bits: u32,
    pub keyswitches_per_sample: usize,
    /// Multiply-accumulates of LWE ciphertexts (nonzero weights), all layers.
    pub lwe_macs_per_sample: usize,
    pub request_bytes_per_sample: usize,
    pub response_bytes_per_sample: usize,
    /// Evaluation key as uploaded (compressed) and as held in server memory (expanded).
    pub eval_key_bytes: Option<u64>,
    pub server_bytes_per_loaded_key: usize,
    pub server_bytes_per_model: usize,
    pub predicted_latency_ms: Option<f64>,
    /// Bootstrap time alone divided by predicted latency.
    pub predicted_pbs_share: Option<f64>,
}

/// Per-sample cost of the same model in encrypted-model mode (`veil compile
/// --encrypt-model`): every weight on a lookup rides in an encrypted table of its own, so
/// each (lookup, reader) pair is one bootstrap; weights on inputs are encrypted LWEs that
/// clear features multiply. Exact for a model compiled with `keep_zero_weights` (what that
/// mode encrypts); a model compiled without it under-counts its zero weights.
#[derive(Clone, Debug, Serialize)]
pub struct EncryptedModeCost {
    pub pbs_per_sample: usize,
    /// One per lookup: its readers' bootstraps share the keyswitch.
    pub keyswitches_per_sample: usize,
    /// Encrypted LWE weights on inputs, plus one constant per lookup.
    pub encrypted_weights: usize,
    pub encrypted_tables: usize,
    /// LWE additions per sample: input terms (clear x encrypted) and table reads.
    pub lwe_macs_per_sample: usize,
    /// The encrypted model file: one seeded body word per weight, N per table, 4 bytes per
    /// term index.
    pub model_file_bytes: usize,
    /// The model once its ciphertexts are expanded from their seeds (what the evaluator holds).
    pub expanded_model_bytes: usize,
    pub results_bytes_per_sample: usize,
    pub predicted_latency_ms: Option<f64>,
}

impl CompiledModel {
    /// Counts what one sample costs in encrypted-model mode; with `machine`, predicts its
    /// latency (batch of one).
    pub fn encrypted_mode_cost(&self, machine: Option<&MachineProfile>) -> EncryptedModeCost {
        let sp = self.params.dims();
        let big = sp.big_lwe_size();
        let n_in = self.n_inputs();
        // Reads of each stage's lookups by every later form.
        let mut reads_of_stage = vec![0usize; self.stages.len()];
        let mut stage_of = Vec::with_capacity(self.pbs_per_sample());
        for (s, st) in self.stages.iter().enumerate() {
            stage_of.extend(std::iter::repeat_n(s, st.len()));
        }
        let (mut input_terms, mut tables) = (0usize, 0usize);
        let forms = self
            .stages
            .iter()
            .map(|st| &st.weights)
            .chain([&self.output.weights]);
        for &(c, _) in forms.flat_map(|m| m.rows.iter().flatten()) {
            match (c as usize).checked_sub(n_in) {
                None => input_terms += 1,
                Some(l) => {
                    tables += 1;
                    reads_of_stage[stage_of[l]] += 1;
                }
            }
        }
        let weights = input_terms + self.pbs_per_sample();
        let n = sp.polynomial_size;
        let glwe = sp.glwe_dimension + 1;
        let latency = machine.map(|m| {
            let pbs_ms: f64 = reads_of_stage.iter().map(|&n| m.batch_ms(n)).sum();
            pbs_ms + 1e3 * (input_terms + tables) as f64 / m.lwe_mac_per_second
        });
        EncryptedModeCost {
            pbs_per_sample: tables,
            keyswitches_per_sample: self.pbs_per_sample(),
            encrypted_weights: weights,
            encrypted_tables: tables,
            lwe_macs_per_sample: input_terms + tables,
            model_file_bytes: 8 * weights + 8 * n * tables + 4 * (input_terms + tables),
            expanded_model_bytes: 8 * (big * weights + glwe * n * tables),
            results_bytes_per_sample: crate::compiled::output_wire_bytes(
                self.n_outputs(),
                big,
                self.output.decoding.modulus_bits,
            ),
            predicted_latency_ms: latency,
        }
    }

    /// Counts what one sample costs; with `machine`, predicts its latency (batch of one).
    pub fn cost(&self, machine: Option<&MachineProfile>) -> CostReport {
        let sp = self.params.dims();
        let big = sp.big_lwe_size();
        let small = sp.small_lwe_size();
        let pbs = self.pbs_per_sample();
        let macs: usize =
            self.stages.iter().map(|h| h.weights.nnz()).sum::<usize>() + self.output.weights.nnz();
        // Keyswitching key: big dimension x levels x small LWE size, u64.
        let ksk = (big - 1) * sp.ks_level * small * 8;
        // Fourier bootstrapping key: n GGSWs of (k+1)^2 x levels polynomials of N/2 complex f64.
        let glwe = sp.glwe_dimension + 1;
        let bsk = sp.lwe_dimension * glwe * glwe * sp.pbs_level * (sp.polynomial_size / 2) * 16;
        let lut_bytes: usize = self
            .stages
            .iter()
            .map(|h| h.weights.n_out() * glwe * sp.polynomial_size * 8)
            .sum();
        let weight_bytes = macs * 12;
        // Request: one body per input ciphertext (features, then windows), a 16-byte seed and the wire header; response:
        // big-key ciphertexts switched to the plan's modulus, packed.
        let request = 8 * self.n_inputs() + 16 + 16;
        let response = crate::compiled::output_wire_bytes(
            self.n_outputs(),
            big,
            self.output.decoding.modulus_bits,
        );
        let (latency, share) = match machine {
            Some(m) => {
                let pbs_ms: f64 = self.stages.iter().map(|h| m.batch_ms(h.len())).sum();
                let linear_ms = 1e3 * macs as f64 / m.lwe_mac_per_second;
                let expand_ms = m.expand_ms_per_feature * self.n_inputs() as f64;
                let total = pbs_ms + linear_ms + expand_ms;
                (Some(total), (total > 0.0).then(|| pbs_ms / total))
            }
            None => (None, None),
        };
        CostReport {
            pbs_per_sample: pbs,
            argmax_pbs_per_sample: self
                .nodes
                .iter()
                .filter(|n| n.node == crate::tail::LABEL_ORIGIN)
                .map(|n| n.pbs)
                .sum(),
            reveal: self.reveal.name(),
            output_modulus_bits: self.output.decoding.modulus_bits,
            keyswitches_per_sample: pbs,
            lwe_macs_per_sample: macs,
            request_bytes_per_sample: request,
            response_bytes_per_sample: response,
            eval_key_bytes: machine.map(|m| m.eval_key_bytes),
            server_bytes_per_loaded_key: ksk + bsk,
            server_bytes_per_model: lut_bytes + weight_bytes,
            predicted_latency_ms: latency,
            predicted_pbs_share: share,
        }
    }
}
