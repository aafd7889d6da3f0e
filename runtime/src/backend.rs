//! The hot path: keyswitch + programmable bootstrap of a whole layer, as one batch.

use rayon::prelude::*;
use tfhe::core_crypto::fft_impl::fft64::crypto::bootstrap::batch_blind_rotate_assign_scratch;
use tfhe::core_crypto::prelude::{
    CiphertextCount, CiphertextModulusLog, ComputationBuffers, ContiguousEntityContainer, Fft,
    GlweCiphertextList, GlweCiphertextListOwned, GlweCiphertextListView, LweCiphertext,
    LweCiphertextList, LweCiphertextListMutView, LweCiphertextListView, LweDimension, LweSize,
    ModulusSwitchedLweCiphertext, MonomialDegree, extract_lwe_sample_from_glwe_ciphertext,
    keyswitch_lwe_ciphertext,
};

use crate::ServerKey;
use crate::error::{Result, RuntimeError};
use veil_format::compiled::ParamSet;

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

/// A borrowed [`SwitchedLwe`]: one switched input read by several blind rotations.
struct SwitchedRef<'a>(&'a SwitchedLwe);

impl ModulusSwitchedLweCiphertext<usize> for SwitchedRef<'_> {
    fn log_modulus(&self) -> CiphertextModulusLog {
        self.0.log_modulus
    }

    fn lwe_dimension(&self) -> LweDimension {
        LweDimension(self.0.mask.len())
    }

    fn body(&self) -> usize {
        self.0.body
    }

    fn mask(&self) -> impl ExactSizeIterator<Item = usize> + '_ {
        self.0.mask.iter().copied()
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

/// Where bootstraps run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackendKind {
    Cpu,
    Gpu,
}

impl BackendKind {
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Cpu => "cpu",
            BackendKind::Gpu => "gpu",
        }
    }

    /// The backend used when none is asked for: the GPU when this binary has the `gpu`
    /// feature and a CUDA device is present, the CPU otherwise.
    pub fn default_for_this_machine() -> Self {
        if gpu_available() {
            BackendKind::Gpu
        } else {
            BackendKind::Cpu
        }
    }

    /// Checks that this backend can run here, with a clear error when it cannot.
    pub fn check_available(self) -> Result<()> {
        match self {
            BackendKind::Cpu => Ok(()),
            BackendKind::Gpu if !cfg!(feature = "gpu") => Err(RuntimeError::Backend(
                "this binary was built without the `gpu` feature; build it with \
                 scripts/build-gpu.sh to bootstrap on a GPU"
                    .into(),
            )),
            BackendKind::Gpu if !gpu_available() => Err(RuntimeError::Backend(
                "no CUDA device is available (no NVIDIA GPU or driver found)".into(),
            )),
            BackendKind::Gpu => Ok(()),
        }
    }
}

impl std::str::FromStr for BackendKind {
    type Err = RuntimeError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(BackendKind::Cpu),
            "gpu" => Ok(BackendKind::Gpu),
            other => Err(RuntimeError::Backend(format!(
                "unknown backend '{other}': expected cpu or gpu"
            ))),
        }
    }
}

/// True when this binary has the `gpu` feature and a CUDA device answers.
pub fn gpu_available() -> bool {
    #[cfg(feature = "gpu")]
    {
        crate::gpu::device_present()
    }
    #[cfg(not(feature = "gpu"))]
    {
        false
    }
}

/// One layer's distinct lookup tables as GLWE accumulators, built once per model. (The GPU
/// evaluation keeps its own device copy with the model's weights.)
pub struct LookupTables {
    host: GlweCiphertextListOwned<u64>,
}

impl LookupTables {
    pub fn new(host: GlweCiphertextListOwned<u64>) -> Self {
        LookupTables { host }
    }

    pub fn host(&self) -> GlweCiphertextListView<'_, u64> {
        self.host.as_view()
    }
}

/// Runs batches of keyswitch + bootstrap with one client's evaluation key. Input `i` is
/// bootstrapped through table `lut_index[i]` into output `i`.
pub trait PbsBackend: Send + Sync {
    fn kind(&self) -> BackendKind;

    fn name(&self) -> &'static str {
        self.kind().name()
    }

    /// One batch: a model layer on the host path, benchmarks, calibration. A device backend
    /// reports a device failure (no memory left, a kernel error) as an error.
    fn bootstrap_batch(
        &self,
        inputs: LweCiphertextListView<'_, u64>,
        luts: GlweCiphertextListView<'_, u64>,
        lut_index: &[usize],
        outputs: LweCiphertextListMutView<'_, u64>,
    ) -> Result<()>;

    /// Bootstraps where several outputs read one input: output `i` is input `input_of[i]`
    /// through table `lut_index[i]` (an encrypted model reads each neuron through one table
    /// per consumer). A backend that keyswitches each input once overrides it; by default
    /// every output gets its own copy of its input.
    fn bootstrap_shared(
        &self,
        inputs: LweCiphertextListView<'_, u64>,
        input_of: &[usize],
        luts: GlweCiphertextListView<'_, u64>,
        lut_index: &[usize],
        outputs: LweCiphertextListMutView<'_, u64>,
    ) -> Result<()> {
        check_shared(&inputs, input_of, lut_index)?;
        let size = inputs.lwe_size().0;
        let mut copies = Vec::with_capacity(input_of.len() * size);
        for &i in input_of {
            copies.extend_from_slice(&inputs.as_ref()[i * size..(i + 1) * size]);
        }
        let copies = LweCiphertextList::from_container(
            copies.as_slice(),
            inputs.lwe_size(),
            inputs.ciphertext_modulus(),
        );
        self.bootstrap_batch(copies, luts, lut_index, outputs)
    }

    /// Seconds spent per phase since the last call (device backends: upload, keyswitch,
    /// bootstrap, download), for profiles; empty where the backend does not split them.
    fn take_phase_seconds(&self) -> Vec<(&'static str, f64)> {
        Vec::new()
    }

    /// The GPU backend, which runs whole evaluations on the device (linear layers too).
    #[cfg(feature = "gpu")]
    fn as_gpu(&self) -> Option<&crate::gpu::GpuBackend<'_>> {
        None
    }
}

/// The shapes [`PbsBackend::bootstrap_shared`] relies on: one table per output, every
/// output's input in range.
fn check_shared(
    inputs: &LweCiphertextListView<'_, u64>,
    input_of: &[usize],
    lut_index: &[usize],
) -> Result<()> {
    let n = inputs.lwe_ciphertext_count().0;
    if input_of.len() != lut_index.len() || input_of.iter().any(|&i| i >= n) {
        return Err(RuntimeError::Shape(format!(
            "{} outputs with {} tables over {n} inputs",
            input_of.len(),
            lut_index.len()
        )));
    }
    Ok(())
}

/// A client's evaluation key in the form one backend computes with: the CPU's
/// Fourier-domain bootstrapping key, or a GPU's copy in device memory.
pub enum EvalKey {
    Cpu(ServerKey),
    #[cfg(feature = "gpu")]
    Gpu(crate::gpu::GpuKey),
}

impl EvalKey {
    /// Expands a compressed evaluation key into `kind`'s form.
    pub fn from_compressed(
        kind: BackendKind,
        params: ParamSet,
        key: &tfhe::CompressedServerKey,
    ) -> Result<Self> {
        kind.check_available()?;
        match kind {
            BackendKind::Cpu => Ok(EvalKey::Cpu(ServerKey::from_compressed(params, key)?)),
            #[cfg(feature = "gpu")]
            BackendKind::Gpu => Ok(EvalKey::Gpu(crate::gpu::GpuKey::from_compressed(
                params, key,
            )?)),
            #[cfg(not(feature = "gpu"))]
            BackendKind::Gpu => unreachable!("check_available refuses the GPU without the feature"),
        }
    }

    /// Bytes the expanded key occupies where it lives (host RAM or device memory).
    pub fn memory_bytes(&self) -> u64 {
        match self {
            EvalKey::Cpu(k) => k.memory_bytes(),
            #[cfg(feature = "gpu")]
            EvalKey::Gpu(k) => k.device_bytes(),
        }
    }

    /// A backend that computes with this key. On the GPU each one has its own stream, so
    /// evaluations for different keys (or batches) run concurrently.
    pub fn backend(&self) -> Box<dyn PbsBackend + '_> {
        match self {
            EvalKey::Cpu(k) => Box::new(CpuBackend::new(k)),
            #[cfg(feature = "gpu")]
            EvalKey::Gpu(k) => Box::new(crate::gpu::GpuBackend::new(k)),
        }
    }
}

/// Bootstraps per rayon task. Batched blind rotation reads the 60 MB bootstrapping key once
/// per chunk instead of once per ciphertext (measured on the 2-core project machines: 16-64
/// per call is best; `veil estimate --calibrate` times 1 to 32 per thread).
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

    /// Keyswitches one big-key input to the small key and switches it to the blind
    /// rotation's modulus with the parameter set's own (centered) switch.
    fn switch(&self, input: &[u64]) -> SwitchedLwe {
        let key = self.key;
        let modulus = tfhe::core_crypto::prelude::CiphertextModulus::<u64>::new_native();
        let small_size = key.ksk.output_key_lwe_dimension().to_lwe_size();
        let mut small = vec![0u64; small_size.0];
        let inp = LweCiphertext::from_container(input, modulus);
        let mut out = LweCiphertext::from_container(small.as_mut_slice(), modulus);
        keyswitch_lwe_ciphertext(&key.ksk, &inp, &mut out);
        let log_modulus = key
            .bsk
            .polynomial_size()
            .to_blind_rotation_input_modulus_log();
        let out = LweCiphertext::from_container(small.as_slice(), modulus);
        let lazy = key
            .ms
            .lwe_ciphertext_modulus_switch::<usize, _>(&out, log_modulus);
        SwitchedLwe::from_switched(&lazy)
    }

    /// Blind-rotates table `lut_index[i]` by switched input `msed[i]` in one batched call,
    /// and sample-extracts each result into `outputs`.
    fn rotate(
        &self,
        msed: &[impl ModulusSwitchedLweCiphertext<usize>],
        luts: &GlweCiphertextListView<'_, u64>,
        lut_index: &[usize],
        outputs: &mut [u64],
    ) {
        let key = self.key;
        let modulus = luts.ciphertext_modulus();
        let count = lut_index.len();
        let poly = key.bsk.polynomial_size();
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
            .batch_blind_rotate_assign(acc.as_mut_view(), msed, fft, buffers.stack());
        let out_size = outputs.len() / count.max(1);
        for (glwe, out) in acc.iter().zip(outputs.chunks_exact_mut(out_size)) {
            let mut out = LweCiphertext::from_container(out, modulus);
            extract_lwe_sample_from_glwe_ciphertext(&glwe, &mut out, MonomialDegree(0));
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
        let msed: Vec<SwitchedLwe> = inputs
            .chunks_exact(in_size)
            .map(|inp| self.switch(inp))
            .collect();
        self.rotate(&msed, luts, lut_index, outputs);
    }

    /// Splits `n` bootstraps evenly over the cores: a multiple of `threads` chunks of at
    /// most CHUNK each, so that no core is left with a last round alone.
    fn per_thread(n: usize) -> usize {
        let threads = rayon::current_num_threads().max(1);
        let chunks = n.div_ceil(CHUNK).div_ceil(threads).max(1) * threads;
        n.div_ceil(chunks).max(1)
    }
}

impl PbsBackend for CpuBackend<'_> {
    fn kind(&self) -> BackendKind {
        BackendKind::Cpu
    }

    fn bootstrap_batch(
        &self,
        inputs: LweCiphertextListView<'_, u64>,
        luts: GlweCiphertextListView<'_, u64>,
        lut_index: &[usize],
        mut outputs: LweCiphertextListMutView<'_, u64>,
    ) -> Result<()> {
        let in_size: LweSize = inputs.lwe_size();
        assert_eq!(inputs.lwe_ciphertext_count().0, lut_index.len());
        assert_eq!(outputs.lwe_ciphertext_count().0, lut_index.len());
        let per_thread = Self::per_thread(lut_index.len());
        let out_size = outputs.lwe_size().0;
        inputs
            .as_ref()
            .par_chunks(per_thread * in_size.0)
            .zip(outputs.as_mut().par_chunks_mut(per_thread * out_size))
            .zip(lut_index.par_chunks(per_thread))
            .for_each(|((inp, out), idx)| self.run_chunk(inp, in_size.0, &luts, idx, out));
        Ok(())
    }

    fn bootstrap_shared(
        &self,
        inputs: LweCiphertextListView<'_, u64>,
        input_of: &[usize],
        luts: GlweCiphertextListView<'_, u64>,
        lut_index: &[usize],
        mut outputs: LweCiphertextListMutView<'_, u64>,
    ) -> Result<()> {
        check_shared(&inputs, input_of, lut_index)?;
        // Each input is keyswitched once, however many tables read it: the reads of one
        // neuron then agree, and the keyswitches cost once per neuron, not per table.
        let in_size = inputs.lwe_size().0;
        let msed: Vec<SwitchedLwe> = inputs
            .as_ref()
            .par_chunks_exact(in_size)
            .map(|inp| self.switch(inp))
            .collect();
        let per_thread = Self::per_thread(lut_index.len());
        let out_size = outputs.lwe_size().0;
        outputs
            .as_mut()
            .par_chunks_mut(per_thread * out_size)
            .zip(input_of.par_chunks(per_thread))
            .zip(lut_index.par_chunks(per_thread))
            .for_each(|((out, ins), idx)| {
                let refs: Vec<SwitchedRef<'_>> =
                    ins.iter().map(|&i| SwitchedRef(&msed[i])).collect();
                self.rotate(&refs, &luts, idx, out)
            });
        Ok(())
    }
}
