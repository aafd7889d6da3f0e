//! Runs a compiled model on encrypted inputs.

use rayon::prelude::*;
use tfhe::core_crypto::algorithms::slice_algorithms::slice_wrapping_add_scalar_mul_assign;
use tfhe::core_crypto::prelude::{
    CiphertextModulus, GlweCiphertextList, GlweSize, LweCiphertextList, LweCiphertextListOwned,
    LweSize, PolynomialSize, generate_programmable_bootstrap_glwe_lut,
};

use std::time::Instant;

use super::{
    EncryptedInput, EncryptedOutput, LookupTables, PbsBackend, big_lwe_size, shortint_params,
};
use crate::error::{ModelError, Result};
use crate::plan::{CompiledModel, IntMatrix, POSITIONS};

/// The centered modulus switch moves every phase down by half a position; adding it back
/// keeps the read centred on the position the plan (and the simulator) round to.
const CENTERED_SWITCH_FIX: u64 = 1 << 51;

/// A compiled model with its lookup tables laid out as GLWE accumulators, built once.
pub struct FheModel {
    model: CompiledModel,
    luts: Vec<LookupTables>,
    lwe_size: usize,
}

impl FheModel {
    pub fn new(model: CompiledModel) -> Result<Self> {
        let sp = shortint_params(model.params);
        let poly: PolynomialSize = sp.polynomial_size;
        let glwe_size: GlweSize = sp.glwe_dimension.to_glwe_size();
        if poly.0 != POSITIONS as usize {
            return Err(ModelError::Plan(format!(
                "the plan assumes N = {POSITIONS}, {} has N = {}",
                model.params.name(),
                poly.0
            )));
        }
        let modulus = CiphertextModulus::<u64>::new_native();
        let luts = model
            .hidden
            .iter()
            .map(|h| {
                let mut data = Vec::with_capacity(h.weights.n_out() * glwe_size.0 * poly.0);
                for n in 0..h.weights.n_out() {
                    let table = h.lut_of(n);
                    // One box per position (box size N / 2048 = 1), the value pre-scaled.
                    let glwe = generate_programmable_bootstrap_glwe_lut(
                        poly,
                        glwe_size,
                        POSITIONS as usize,
                        modulus,
                        1u64,
                        |p: u64| (table[p as usize] as u64).wrapping_mul(h.delta_out),
                    );
                    data.extend_from_slice(glwe.as_ref());
                }
                LookupTables::new(GlweCiphertextList::from_container(
                    data, glwe_size, poly, modulus,
                ))
            })
            .collect();
        let lwe_size = big_lwe_size(model.params);
        Ok(FheModel {
            model,
            luts,
            lwe_size,
        })
    }

    pub fn model(&self) -> &CompiledModel {
        &self.model
    }

    /// Peak host bytes one sample occupies during [`Self::evaluate`]: the widest step's
    /// input and output ciphertexts (plus the bootstrap outputs next to them), big-key LWE.
    pub fn working_bytes_per_sample(&self) -> u64 {
        let widths = self.model.hidden.iter().map(|h| h.weights.n_out());
        let mut peak = 0usize;
        let mut n_in = self.model.n_features();
        for n_out in widths.chain([self.model.output.weights.n_out()]) {
            // Layer input, weighted sums, and the bootstrapped copy of the sums.
            peak = peak.max(n_in + 2 * n_out);
            n_in = n_out;
        }
        (peak * self.lwe_size * 8) as u64
    }

    /// Evaluates a batch of samples. Every layer's bootstraps go to the backend as one batch
    /// across all samples, so every core (or the whole GPU) stays busy.
    pub fn evaluate(
        &self,
        backend: &dyn PbsBackend,
        batch: &[EncryptedInput],
    ) -> Result<Vec<EncryptedOutput>> {
        Ok(self.evaluate_profiled(backend, batch)?.0)
    }

    /// [`Self::evaluate`], also returning where the time went.
    pub fn evaluate_profiled(
        &self,
        backend: &dyn PbsBackend,
        batch: &[EncryptedInput],
    ) -> Result<(Vec<EncryptedOutput>, Profile)> {
        let mut profile = Profile::default();
        let n_features = self.model.n_features();
        for (i, s) in batch.iter().enumerate() {
            if s.len() != n_features || s.list.lwe_size().0 != self.lwe_size {
                return Err(ModelError::Shape(format!(
                    "sample {i}: {} ciphertexts of LWE size {}, the model takes {n_features} of size {}",
                    s.len(),
                    s.list.lwe_size().0,
                    self.lwe_size
                )));
            }
        }
        let samples = batch.len();
        if samples == 0 {
            return Ok((Vec::new(), profile));
        }
        let mut t = Instant::now();
        // Each sample regenerates its masks straight into its slice of the layer input.
        let per_sample = n_features * self.lwe_size;
        let mut x: Vec<u64> = vec![0u64; samples * per_sample];
        x.par_chunks_mut(per_sample)
            .zip(batch.par_iter())
            .for_each(|(dst, s)| s.expand_into(dst));
        profile.expand_s += lap(&mut t);

        let modulus = CiphertextModulus::<u64>::new_native();
        for (h, luts) in self.model.hidden.iter().zip(&self.luts) {
            let n_out = h.weights.n_out();
            let acc = self.linear(&x, samples, &h.weights, Some(&h.offset));
            profile.linear_s += lap(&mut t);
            let lut_index: Vec<usize> = (0..samples * n_out).map(|i| i % n_out).collect();
            let mut next = vec![0u64; samples * n_out * self.lwe_size];
            let acc_list =
                LweCiphertextList::from_container(acc.as_slice(), LweSize(self.lwe_size), modulus);
            let out_list = LweCiphertextList::from_container(
                next.as_mut_slice(),
                LweSize(self.lwe_size),
                modulus,
            );
            backend.bootstrap_layer(acc_list, luts, &lut_index, out_list);
            profile.bootstrap_s += lap(&mut t);
            profile.bootstraps += lut_index.len();
            x = next;
        }
        let out = &self.model.output.weights;
        let acc = self.linear(&x, samples, out, None);
        profile.linear_s += lap(&mut t);
        profile.bootstrap_phases = backend.take_phase_seconds();
        let per_sample = out.n_out() * self.lwe_size;
        let outputs = acc
            .chunks_exact(per_sample)
            .map(|c| {
                EncryptedOutput(LweCiphertextListOwned::from_container(
                    c.to_vec(),
                    LweSize(self.lwe_size),
                    modulus,
                ))
            })
            .collect();
        Ok((outputs, profile))
    }

    /// `out[s][n] = sum_j w[n][j] * x[s][j] (+ offset[n])`: cleartext-weighted sums of LWE
    /// ciphertexts, no bootstrap.
    fn linear(&self, x: &[u64], samples: usize, w: &IntMatrix, offset: Option<&[u64]>) -> Vec<u64> {
        let size = self.lwe_size;
        let n_in = w.n_in as usize;
        let n_out = w.n_out();
        // A task computes a group of one sample's outputs, walking the group's weights input
        // by input, so each input ciphertext is read once per group rather than once per
        // output. Groups shrink until there are enough tasks for every core.
        let threads = rayon::current_num_threads().max(1);
        let group = (samples * n_out / (4 * threads)).clamp(1, 16);
        let terms: Vec<Vec<(usize, usize, u64)>> = (0..n_out)
            .step_by(group)
            .map(|first| {
                let mut t: Vec<(usize, usize, u64)> = (first..(first + group).min(n_out))
                    .flat_map(|n| {
                        w.rows[n]
                            .iter()
                            .map(move |&(c, wt)| (c as usize, n - first, wt as u64))
                    })
                    .collect();
                t.sort_unstable_by_key(|&(c, _, _)| c);
                t
            })
            .collect();
        let mut out = vec![0u64; samples * n_out * size];
        out.par_chunks_mut(n_out * size)
            .enumerate()
            .for_each(|(s, sample_out)| {
                let xs = &x[s * n_in * size..(s + 1) * n_in * size];
                sample_out
                    .par_chunks_mut(group * size)
                    .enumerate()
                    .for_each(|(g, cts)| {
                        for &(c, local, wt) in &terms[g] {
                            slice_wrapping_add_scalar_mul_assign(
                                &mut cts[local * size..(local + 1) * size],
                                &xs[c * size..(c + 1) * size],
                                wt,
                            );
                        }
                        if let Some(off) = offset {
                            for (local, ct) in cts.chunks_exact_mut(size).enumerate() {
                                let body = &mut ct[size - 1];
                                *body = body
                                    .wrapping_add(off[g * group + local])
                                    .wrapping_add(CENTERED_SWITCH_FIX);
                            }
                        }
                    });
            });
        out
    }
}

/// Where one evaluation's time went, in seconds.
#[derive(Clone, Debug, Default)]
pub struct Profile {
    /// Regenerating the inputs' masks from their seeds.
    pub expand_s: f64,
    /// The weighted sums (host).
    pub linear_s: f64,
    /// Keyswitch + bootstrap, as the backend reports it.
    pub bootstrap_s: f64,
    pub bootstraps: usize,
    /// The backend's own split of `bootstrap_s` (GPU: upload, keyswitch, bootstrap, download).
    pub bootstrap_phases: Vec<(&'static str, f64)>,
}

fn lap(t: &mut Instant) -> f64 {
    let s = t.elapsed().as_secs_f64();
    *t = Instant::now();
    s
}
