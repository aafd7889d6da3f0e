//! Runs a compiled model on encrypted inputs.

use rayon::prelude::*;
use tfhe::core_crypto::algorithms::slice_algorithms::slice_wrapping_add_scalar_mul_assign;
use tfhe::core_crypto::prelude::{
    CiphertextModulus, GlweCiphertextList, GlweSize, LweCiphertextList, LweSize, PolynomialSize,
    generate_programmable_bootstrap_glwe_lut,
};

use std::time::Instant;

use crate::error::{Result, RuntimeError};
use crate::{
    EncryptedInput, EncryptedOutput, LookupTables, PbsBackend, big_lwe_size, shortint_params,
};
use veil_format::FormatError;
use veil_format::compiled::{CompiledModel, IntMatrix, POSITIONS};

/// Where a model's values live during an evaluation: block 0 holds the inputs, block `s + 1`
/// the outputs of stage `s`; a block is freed after the last step that reads it.
pub(crate) struct Blocks {
    /// First value index of each block, and one past the last value.
    pub(crate) starts: Vec<usize>,
    /// Last step reading each block (stage index; `stages.len()` for the outputs).
    pub(crate) last_read: Vec<usize>,
}

impl Blocks {
    fn new(model: &CompiledModel) -> Self {
        let mut starts = vec![0, model.n_inputs()];
        for st in &model.stages {
            starts.push(starts.last().unwrap() + st.len());
        }
        let n_blocks = starts.len() - 1;
        let mut last_read = vec![0usize; n_blocks];
        let block_of = |v: u32| starts.partition_point(|&s| s <= v as usize) - 1;
        let readers = model
            .stages
            .iter()
            .map(|st| &st.weights)
            .chain([&model.output.weights]);
        for (step, w) in readers.enumerate() {
            for &(c, _) in w.rows.iter().flatten() {
                let b = block_of(c);
                last_read[b] = last_read[b].max(step);
            }
        }
        Blocks { starts, last_read }
    }

    pub(crate) fn block_of(&self, v: usize) -> usize {
        self.starts.partition_point(|&s| s <= v) - 1
    }

    pub(crate) fn len(&self, b: usize) -> usize {
        self.starts[b + 1] - self.starts[b]
    }
}

/// The centered modulus switch moves every phase down by half a position; adding it back
/// keeps the read centred on the position the plan (and the simulator) round to.
pub(crate) const CENTERED_SWITCH_FIX: u64 = 1 << 51;

/// A compiled model with its lookup tables laid out as GLWE accumulators, built once.
pub struct FheModel {
    pub(crate) model: CompiledModel,
    /// Each stage's distinct tables, and which table each neuron reads.
    pub(crate) luts: Vec<LookupTables>,
    pub(crate) table_of: Vec<Vec<usize>>,
    pub(crate) lwe_size: usize,
    pub(crate) blocks: Blocks,
    /// The weights and tables in GPU memory, uploaded on the first GPU evaluation.
    #[cfg(feature = "gpu")]
    pub(crate) device: std::sync::Mutex<Option<std::sync::Arc<crate::gpu::DeviceModel>>>,
}

impl FheModel {
    pub fn new(model: CompiledModel) -> Result<Self> {
        let sp = shortint_params(model.params);
        let poly: PolynomialSize = sp.polynomial_size;
        let glwe_size: GlweSize = sp.glwe_dimension.to_glwe_size();
        if poly.0 != POSITIONS as usize {
            return Err(FormatError::InvalidCompiledModel(format!(
                "the plan assumes N = {POSITIONS}, {} has N = {}",
                model.params.name(),
                poly.0
            ))
            .into());
        }
        let modulus = CiphertextModulus::<u64>::new_native();
        let mut luts = Vec::with_capacity(model.stages.len());
        let mut table_of = Vec::with_capacity(model.stages.len());
        for h in &model.stages {
            // The plan already shares identical tables; a shared table written at another
            // output scale still needs an accumulator of its own.
            let mut seen: std::collections::HashMap<(u32, u64), usize> = Default::default();
            let mut data = Vec::new();
            let mut which = Vec::with_capacity(h.weights.n_out());
            for n in 0..h.weights.n_out() {
                let table = h.lut_of(n);
                let next = seen.len();
                let t = *seen.entry((h.lut_index[n], h.delta_out[n])).or_insert(next);
                if t == next {
                    // One box per position (box size N / 2048 = 1), the value pre-scaled.
                    let glwe = generate_programmable_bootstrap_glwe_lut(
                        poly,
                        glwe_size,
                        POSITIONS as usize,
                        modulus,
                        1u64,
                        |p: u64| (table[p as usize] as u64).wrapping_mul(h.delta_out[n]),
                    );
                    data.extend_from_slice(glwe.as_ref());
                }
                which.push(t);
            }
            luts.push(LookupTables::new(GlweCiphertextList::from_container(
                data, glwe_size, poly, modulus,
            )));
            table_of.push(which);
        }
        let lwe_size = big_lwe_size(model.params);
        let blocks = Blocks::new(&model);
        Ok(FheModel {
            model,
            luts,
            table_of,
            lwe_size,
            blocks,
            #[cfg(feature = "gpu")]
            device: Default::default(),
        })
    }

    pub fn model(&self) -> &CompiledModel {
        &self.model
    }

    /// Peak host bytes one sample occupies during [`Self::evaluate`]: the values still to be
    /// read, plus one stage's weighted sums and their bootstrapped copies (big-key LWE).
    pub fn working_bytes_per_sample(&self) -> u64 {
        let b = &self.blocks;
        let n_steps = self.model.stages.len() + 1;
        let mut peak = 0usize;
        for step in 0..n_steps {
            let live: usize = (0..=step.min(b.last_read.len() - 1))
                .filter(|&k| b.last_read[k] >= step)
                .map(|k| b.len(k))
                .sum();
            let n_out = match self.model.stages.get(step) {
                Some(st) => 2 * st.len(),
                None => self.model.n_outputs(),
            };
            peak = peak.max(live + n_out);
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
        let n_features = self.model.n_inputs();
        for (i, s) in batch.iter().enumerate() {
            if s.len() != n_features || s.list.lwe_size().0 != self.lwe_size {
                return Err(RuntimeError::Shape(format!(
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
        #[cfg(feature = "gpu")]
        if let Some(gpu) = backend.as_gpu() {
            let outputs = crate::gpu::model::evaluate(self, gpu, batch, &mut profile)?;
            profile.bootstrap_phases = backend.take_phase_seconds();
            return Ok((outputs, profile));
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
        let mut blocks: Vec<Vec<u64>> = vec![x];
        for (step, (h, luts)) in self.model.stages.iter().zip(&self.luts).enumerate() {
            let n_out = h.len();
            let acc = self.linear(&blocks, samples, &h.weights, Some(&h.offset));
            profile.linear_s += lap(&mut t);
            // Blocks no later step reads are freed before the bootstraps allocate.
            for (b, block) in blocks.iter_mut().enumerate() {
                if self.blocks.last_read[b] <= step {
                    *block = Vec::new();
                }
            }
            let table_of = &self.table_of[step];
            let lut_index: Vec<usize> = (0..samples * n_out).map(|i| table_of[i % n_out]).collect();
            let mut next = vec![0u64; samples * n_out * self.lwe_size];
            let acc_list =
                LweCiphertextList::from_container(acc.as_slice(), LweSize(self.lwe_size), modulus);
            let out_list = LweCiphertextList::from_container(
                next.as_mut_slice(),
                LweSize(self.lwe_size),
                modulus,
            );
            backend.bootstrap_batch(acc_list, luts.host(), &lut_index, out_list)?;
            profile.bootstrap_s += lap(&mut t);
            profile.bootstraps += lut_index.len();
            blocks.push(next);
        }
        let out = &self.model.output.weights;
        let acc = self.linear(&blocks, samples, out, None);
        profile.linear_s += lap(&mut t);
        profile.bootstrap_phases = backend.take_phase_seconds();
        Ok((self.outputs(&acc)?, profile))
    }

    /// The output layer's sums, one sample after the other, as the client receives them.
    pub(crate) fn outputs(&self, acc: &[u64]) -> Result<Vec<EncryptedOutput>> {
        let per_sample = self.model.output.weights.n_out() * self.lwe_size;
        // Only the bits decoding needs go back (the plan chose them and counts their noise).
        let bits = self.model.output.decoding.modulus_bits;
        acc.par_chunks_exact(per_sample)
            .map(|c| EncryptedOutput::switched_from(c, self.lwe_size, bits))
            .collect()
    }

    /// `out[s][n] = sum_j w[n][j] * v[s][j] (+ offset[n])` over the model's values `v`, held
    /// in `blocks`: cleartext-weighted sums of LWE ciphertexts, no bootstrap.
    fn linear(
        &self,
        blocks: &[Vec<u64>],
        samples: usize,
        w: &IntMatrix,
        offset: Option<&[u64]>,
    ) -> Vec<u64> {
        let size = self.lwe_size;
        let n_out = w.n_out();
        // A task computes a group of one sample's outputs, walking the group's weights input
        // by input, so each input ciphertext is read once per group rather than once per
        // output. Groups shrink until there are enough tasks for every core.
        let threads = rayon::current_num_threads().max(1);
        let group = (samples * n_out / (4 * threads)).clamp(1, 16);
        // (block, index in block, output in group, weight)
        let terms: Vec<Vec<(usize, usize, usize, u64)>> = (0..n_out)
            .step_by(group)
            .map(|first| {
                let mut t: Vec<(usize, usize, usize, u64)> = (first..(first + group).min(n_out))
                    .flat_map(|n| {
                        w.rows[n].iter().map(move |&(c, wt)| {
                            let b = self.blocks.block_of(c as usize);
                            (b, c as usize - self.blocks.starts[b], n - first, wt as u64)
                        })
                    })
                    .collect();
                t.sort_unstable_by_key(|&(b, c, _, _)| (b, c));
                t
            })
            .collect();
        let mut out = vec![0u64; samples * n_out * size];
        out.par_chunks_mut(n_out * size)
            .enumerate()
            .for_each(|(s, sample_out)| {
                sample_out
                    .par_chunks_mut(group * size)
                    .enumerate()
                    .for_each(|(g, cts)| {
                        for &(b, c, local, wt) in &terms[g] {
                            let per_sample = self.blocks.len(b) * size;
                            let xs = &blocks[b][s * per_sample..(s + 1) * per_sample];
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
