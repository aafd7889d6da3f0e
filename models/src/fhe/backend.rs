//! The hot path: keyswitch + programmable bootstrap of a whole layer, as one batch.

use rayon::prelude::*;
use tfhe::core_crypto::fft_impl::fft64::crypto::bootstrap::batch_blind_rotate_assign_scratch;
use tfhe::core_crypto::prelude::{
    CiphertextCount, CiphertextModulusLog, ComputationBuffers, ContiguousEntityContainer, Fft,
    GlweCiphertextList, GlweCiphertextListView, LweCiphertext, LweCiphertextListMutView,
    LweCiphertextListView, LweDimension, LweSize, ModulusSwitchedLweCiphertext, MonomialDegree,
    extract_lwe_sample_from_glwe_ciphertext, keyswitch_lwe_ciphertext,
};

use super::ServerKey;

/// A modulus-switched LWE ciphertext, materialized once. tfhe's lazy form recomputes the
/// switch on every access, and batched blind rotation reads mask element `i` of every
/// ciphertext for each of the n bootstrapping-key rows, which is quadratic in n.
struct SwitchedLwe {
    mask: Vec<usize>,
    body: usize,
    log_modulus: CiphertextModulusLog,
}

impl SwitchedLwe {
    fn from_switched(ct: &impl ModulusSwitchedLweCiphertext<usize>) -> Self {
        SwitchedLwe {
            mask: ct.mask().collect(),
            body: ct.body(),
            log_modulus: ct.log_modulus(),
        }
    }
}

impl ModulusSwitchedLweCiphertext<usize> for SwitchedLwe {
    fn log_modulus(&self) -> CiphertextModulusLog {
        self.log_modulus
    }

    fn lwe_dimension(&self) -> LweDimension {
        LweDimension(self.mask.len())
    }

    fn body(&self) -> usize {
        self.body
    }

    fn mask(&self) -> impl ExactSizeIterator<Item = usize> + '_ {
        self.mask.iter().copied()
    }
}

/// Runs batches of keyswitch + bootstrap. `luts` holds one GLWE lookup table per neuron;
/// input `i` is bootstrapped through `luts[lut_index[i]]` into output `i`.
pub trait PbsBackend: Send + Sync {
    fn name(&self) -> &'static str;

    fn bootstrap_batch(
        &self,
        inputs: LweCiphertextListView<'_, u64>,
        luts: GlweCiphertextListView<'_, u64>,
        lut_index: &[usize],
        outputs: LweCiphertextListMutView<'_, u64>,
    );
}

/// Bootstraps per rayon task. Batched blind rotation reads the 60 MB bootstrapping key once
/// per chunk instead of once per ciphertext (`../shared/notes/pbs-throughput-measured.md`:
/// 16-64 per call is best on these machines).
const CHUNK: usize = 32;

/// CPU backend: every core takes chunks of the batch. Each chunk is keyswitched, modulus
/// switched with the parameter set's own (centered) switch, blind-rotated in one batched
/// call, and sample-extracted.
pub struct CpuBackend<'k> {
    key: &'k ServerKey,
    fft: Fft,
}

impl<'k> CpuBackend<'k> {
    pub fn new(key: &'k ServerKey) -> Self {
        CpuBackend {
            key,
            fft: Fft::new(key.bsk.polynomial_size()),
        }
    }

    fn run_chunk(
        &self,
        inputs: &[u64],
        in_size: usize,
        luts: &GlweCiphertextListView<'_, u64>,
        lut_index: &[usize],
        outputs: &mut [u64],
    ) {
        let key = self.key;
        let modulus = luts.ciphertext_modulus();
        let small_size = key.ksk.output_key_lwe_dimension().to_lwe_size();
        let count = lut_index.len();
        let mut small = vec![0u64; small_size.0 * count];
        for (inp, out) in inputs
            .chunks_exact(in_size)
            .zip(small.chunks_exact_mut(small_size.0))
        {
            let inp = LweCiphertext::from_container(inp, modulus);
            let mut out = LweCiphertext::from_container(out, modulus);
            keyswitch_lwe_ciphertext(&key.ksk, &inp, &mut out);
        }
        let poly = key.bsk.polynomial_size();
        let log_modulus = poly.to_blind_rotation_input_modulus_log();
        let small_cts: Vec<LweCiphertext<&[u64]>> = small
            .chunks_exact(small_size.0)
            .map(|c| LweCiphertext::from_container(c, modulus))
            .collect();
        let msed: Vec<SwitchedLwe> = small_cts
            .iter()
            .map(|ct| {
                let lazy = key
                    .ms
                    .lwe_ciphertext_modulus_switch::<usize, _>(ct, log_modulus);
                SwitchedLwe::from_switched(&lazy)
            })
            .collect();
        let glwe_size = luts.glwe_size();
        let glwe_len = glwe_size.0 * poly.0;
        let mut acc = vec![0u64; glwe_len * count];
        for (dst, &l) in acc.chunks_exact_mut(glwe_len).zip(lut_index) {
            dst.copy_from_slice(&luts.as_ref()[l * glwe_len..(l + 1) * glwe_len]);
        }
        let mut acc =
            GlweCiphertextList::from_container(acc.as_mut_slice(), glwe_size, poly, modulus);
        let fft = self.fft.as_view();
        let mut buffers = ComputationBuffers::new();
        buffers.resize(
            batch_blind_rotate_assign_scratch::<u64>(glwe_size, poly, CiphertextCount(count), fft)
                .unaligned_bytes_required(),
        );
        key.bsk
            .as_view()
            .batch_blind_rotate_assign(acc.as_mut_view(), &msed, fft, buffers.stack());
        let out_size = in_size;
        for (glwe, out) in acc.iter().zip(outputs.chunks_exact_mut(out_size)) {
            let mut out = LweCiphertext::from_container(out, modulus);
            extract_lwe_sample_from_glwe_ciphertext(&glwe, &mut out, MonomialDegree(0));
        }
    }
}

impl PbsBackend for CpuBackend<'_> {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn bootstrap_batch(
        &self,
        inputs: LweCiphertextListView<'_, u64>,
        luts: GlweCiphertextListView<'_, u64>,
        lut_index: &[usize],
        mut outputs: LweCiphertextListMutView<'_, u64>,
    ) {
        let in_size: LweSize = inputs.lwe_size();
        assert_eq!(inputs.lwe_ciphertext_count().0, lut_index.len());
        assert_eq!(outputs.lwe_ciphertext_count().0, lut_index.len());
        // Spread the batch evenly over the cores: a multiple of `threads` chunks of at most
        // CHUNK each, so that no core is left with a last round alone.
        let threads = rayon::current_num_threads().max(1);
        let n = lut_index.len();
        let chunks = n.div_ceil(CHUNK).div_ceil(threads).max(1) * threads;
        let per_thread = n.div_ceil(chunks).max(1);
        let out_size = outputs.lwe_size().0;
        inputs
            .as_ref()
            .par_chunks(per_thread * in_size.0)
            .zip(outputs.as_mut().par_chunks_mut(per_thread * out_size))
            .zip(lut_index.par_chunks(per_thread))
            .for_each(|((inp, out), idx)| self.run_chunk(inp, in_size.0, &luts, idx, out));
    }
}
