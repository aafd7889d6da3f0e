//! CUDA backend (cargo feature `gpu`): a whole model evaluation on one NVIDIA GPU.
//!
//! It reads exactly what the CPU backend reads: the same parameter set, the same keyswitch,
//! and the same centered modulus switch before blind rotation (the bootstrap runs with the
//! backend's `CENTERED` switch when the key carries it), so the plan, the simulator and the
//! noise budget hold unchanged.
//!
//! - [`GpuKey`]: a client's keyswitching key and bootstrapping key in device memory, made
//!   from the compressed key (never from the CPU's Fourier form), with a pool of
//!   [`Workspace`]s.
//! - [`Workspace`]: what one evaluation slot reuses from call to call: its CUDA stream, the
//!   bootstrap scratch (one per power-of-two batch size: the backend picks its kernel when
//!   the scratch is made), index arrays, activation buffers and page-locked staging.
//! - `model`: the model's weights and lookup tables on the device, and the evaluation:
//!   inputs uploaded once, linear layers by Veil's kernel (`kernels.cu`), keyswitch and
//!   bootstrap by tfhe-cuda-backend, only the outputs downloaded.

mod ffi;
pub(crate) mod model;

use std::collections::BTreeMap;
use std::ffi::c_void;
use std::sync::Mutex;
use std::time::Instant;

use tfhe::core_crypto::gpu::vec::{CudaVec, GpuIndex};
use tfhe::core_crypto::gpu::{CudaStreams, convert_lwe_programmable_bootstrap_key_async};
use tfhe::core_crypto::prelude::{
    GlweCiphertextListView, LweBootstrapKeyOwned, LweCiphertextListMutView, LweCiphertextListView,
    LweKeyswitchKeyOwned,
};
use tfhe::shortint::atomic_pattern::compressed::CompressedAtomicPatternServerKey;
use tfhe::shortint::server_key::{
    CompressedModulusSwitchConfiguration, ShortintCompressedBootstrappingKey,
};
use tfhe_cuda_backend::bindings as raw;

use crate::backend::{BackendKind, PbsBackend};
use crate::error::{Result, RuntimeError};
use crate::keys::check_key_dimensions;
use ffi::{DeviceBuf, PinnedBuf};
pub(crate) use model::DeviceModel;
use veil_format::compiled::ParamSet;

/// The device every key and table goes to. One GPU per server process; more GPUs would
/// mean one process each, or keys spread over devices.
const GPU: u32 = 0;

/// Largest number of ciphertexts in one keyswitch + bootstrap call. Bounds the bootstrap
/// scratch (about 100 KB per ciphertext); larger layers run in slices of the same buffers.
pub const MAX_DEVICE_BATCH: usize = 32_768;

/// Keyswitch batches at least this large use tfhe's GEMM keyswitch kernel. On an H200 the
/// per-ciphertext kernel took 0.27 ms for 16 ciphertexts and 1.8 ms for 144 (a digits CNN
/// layer), the GEMM kernel 0.83 ms for 256 (BENCHMARKS.md).
const GEMM_KEYSWITCH_FROM: usize = 64;

/// Most samples per device chunk; 0 lets device memory alone decide.
static CHUNK_LIMIT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Caps the samples of one device chunk (0: device memory alone decides), for a GPU shared
/// with other work, and for tests of the chunked path.
pub fn set_chunk_limit(samples: usize) {
    CHUNK_LIMIT.store(samples, std::sync::atomic::Ordering::Relaxed);
}

fn chunk_limit() -> usize {
    match CHUNK_LIMIT.load(std::sync::atomic::Ordering::Relaxed) {
        0 => usize::MAX,
        n => n,
    }
}

/// True when a CUDA device answers (false, never a panic, where there is no driver).
pub fn device_present() -> bool {
    tfhe::core_crypto::gpu::is_cuda_available() && tfhe::core_crypto::gpu::get_number_of_gpus() > 0
}

/// Free and total device memory in bytes (free counts memory the allocator pool holds
/// unused).
pub fn device_memory() -> Result<(u64, u64)> {
    ffi::mem_info(GPU)
}

/// The dimensions the raw keyswitch and bootstrap calls take.
#[derive(Clone, Copy, Debug)]
struct KeyDims {
    big_dim: u32,
    small_dim: u32,
    glwe_dim: u32,
    poly: u32,
    pbs_base_log: u32,
    pbs_level: u32,
    ks_base_log: u32,
    ks_level: u32,
    ms_reduction: raw::PBS_MS_REDUCTION_T,
}

impl KeyDims {
    fn big_size(&self) -> usize {
        self.big_dim as usize + 1
    }

    fn small_size(&self) -> usize {
        self.small_dim as usize + 1
    }
}

/// A client's evaluation key in device memory, with the workspaces of the evaluations
/// that used it (kept for the next ones).
pub struct GpuKey {
    ksk: DeviceBuf<u64>,
    bsk: CudaVec<f64>,
    dims: KeyDims,
    device_bytes: u64,
    workspaces: Mutex<Vec<Workspace>>,
}

impl GpuKey {
    /// Decompresses the seeded keys on the host (standard domain) and uploads them.
    pub fn from_compressed(params: ParamSet, key: &tfhe::CompressedServerKey) -> Result<Self> {
        let integer = key.clone().into_raw_parts().0;
        let shortint = integer.into_raw_parts();
        let CompressedAtomicPatternServerKey::Standard(std_key) = shortint.into_raw_parts().0
        else {
            return Err(RuntimeError::Crypto(
                "the evaluation key is not a standard KS-PBS key".into(),
            ));
        };
        let (seeded_ksk, bootstrapping_key, _order) = std_key.into_raw_parts();
        let ShortintCompressedBootstrappingKey::Classic {
            bsk: seeded_bsk,
            modulus_switch_noise_reduction_key,
        } = bootstrapping_key
        else {
            return Err(RuntimeError::Crypto(
                "the evaluation key uses multi-bit bootstrapping; Veil needs the classic one"
                    .into(),
            ));
        };
        let ms_reduction = match modulus_switch_noise_reduction_key {
            CompressedModulusSwitchConfiguration::CenteredMeanNoiseReduction => {
                raw::PBS_MS_REDUCTION_T_CENTERED
            }
            CompressedModulusSwitchConfiguration::Standard => raw::PBS_MS_REDUCTION_T_NO_REDUCTION,
            CompressedModulusSwitchConfiguration::DriftTechniqueNoiseReduction(_) => {
                return Err(RuntimeError::Crypto(
                    "the evaluation key uses the drift modulus switch, which the GPU backend \
                     does not implement"
                        .into(),
                ));
            }
        };
        let ksk: LweKeyswitchKeyOwned<u64> = seeded_ksk.par_decompress_into_lwe_keyswitch_key();
        let bsk: LweBootstrapKeyOwned<u64> = seeded_bsk.par_decompress_into_lwe_bootstrap_key();
        check_key_dimensions(
            params,
            &ksk,
            bsk.polynomial_size(),
            bsk.glwe_size(),
            bsk.input_lwe_dimension(),
        )?;
        let dims = KeyDims {
            big_dim: ksk.input_key_lwe_dimension().0 as u32,
            small_dim: ksk.output_key_lwe_dimension().0 as u32,
            glwe_dim: bsk.glwe_size().to_glwe_dimension().0 as u32,
            poly: bsk.polynomial_size().0 as u32,
            pbs_base_log: bsk.decomposition_base_log().0 as u32,
            pbs_level: bsk.decomposition_level_count().0 as u32,
            ks_base_log: ksk.decomposition_base_log().0 as u32,
            ks_level: ksk.decomposition_level_count().0 as u32,
            ms_reduction,
        };
        // The Fourier key holds one f64 per standard-domain word.
        let bsk_len = bsk.as_ref().len();
        let device_bytes = (ksk.as_ref().len() * 8 + bsk_len * 8) as u64;
        let (free, _) = device_memory()?;
        if free < device_bytes {
            return Err(RuntimeError::Backend(format!(
                "the GPU has no room for another evaluation key ({device_bytes} bytes, \
                 {free} free)"
            )));
        }
        let null = std::ptr::null_mut();
        let d_ksk = DeviceBuf::from_host(ksk.as_ref(), null)?;
        let s = streams();
        let mut d_bsk = CudaVec::<f64>::new(bsk_len, &s, 0);
        // SAFETY: `bsk` outlives the conversion, which is synchronized right after.
        unsafe {
            convert_lwe_programmable_bootstrap_key_async(
                &s,
                &mut d_bsk,
                bsk.as_ref(),
                bsk.input_lwe_dimension(),
                bsk.glwe_size().to_glwe_dimension(),
                bsk.decomposition_level_count(),
                bsk.polynomial_size(),
            );
        }
        s.synchronize();
        Ok(GpuKey {
            ksk: d_ksk,
            bsk: d_bsk,
            dims,
            device_bytes,
            workspaces: Mutex::new(Vec::new()),
        })
    }

    /// Device bytes of the keyswitching key and the (Fourier-converted) bootstrapping key.
    pub fn device_bytes(&self) -> u64 {
        self.device_bytes
    }

    fn take_workspace(&self) -> Workspace {
        let pooled = self
            .workspaces
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop();
        pooled.unwrap_or_else(Workspace::new)
    }

    fn return_workspace(&self, ws: Workspace) {
        self.workspaces
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(ws);
    }

    /// Bytes of bootstrap scratch for a call of `n` ciphertexts (nothing is allocated).
    fn scratch_bytes(&self, ws: &Workspace, n: usize) -> u64 {
        let d = &self.dims;
        let mut buffer: *mut i8 = std::ptr::null_mut();
        // SAFETY: with allocate_gpu_memory false the call only sizes the buffer; the
        // cleanup frees the host-side descriptor it made.
        unsafe {
            let bytes = raw::scratch_cuda_programmable_bootstrap_64_async(
                ws.stream(),
                GPU,
                &mut buffer,
                d.small_dim,
                d.glwe_dim,
                d.poly,
                d.pbs_level,
                n as u32,
                false,
                d.ms_reduction,
            );
            raw::cleanup_cuda_programmable_bootstrap_64(ws.stream(), GPU, &mut buffer);
            bytes
        }
    }
}

fn streams() -> CudaStreams {
    CudaStreams::new_single_gpu(GpuIndex::new(GPU))
}

/// Bootstrap scratch made by tfhe-cuda-backend for up to `capacity` ciphertexts.
struct Scratch {
    buffer: *mut i8,
}

/// Everything one evaluation slot reuses between calls. Dropped fields are freed on its
/// stream, which is destroyed last.
pub struct Workspace {
    scratch: BTreeMap<usize, Scratch>,
    /// `identity[i] = i`, the input and output indexes of every call.
    identity: Option<DeviceBuf<u64>>,
    /// Lookup-table index of each ciphertext of the current call.
    lut_index: Option<DeviceBuf<u64>>,
    /// Free device buffers for activations and keyswitch outputs, reused by size.
    pool: Vec<DeviceBuf<u64>>,
    pinned: [PinnedBuf; 2],
    pinned_out: PinnedBuf,
    streams: CudaStreams,
}

// SAFETY: the raw scratch pointers are device memory owned by this workspace alone; a
// workspace is used by one thread at a time (it is moved, never shared).
unsafe impl Send for Workspace {}

impl Workspace {
    fn new() -> Self {
        Workspace {
            scratch: BTreeMap::new(),
            identity: None,
            lut_index: None,
            pool: Vec::new(),
            pinned: Default::default(),
            pinned_out: PinnedBuf::default(),
            streams: streams(),
        }
    }

    fn stream(&self) -> *mut c_void {
        self.streams.ptr[0]
    }

    fn sync(&self) -> Result<()> {
        ffi::sync(self.stream())
    }

    /// A device buffer of at least `len` words: the smallest free one that fits, else a new
    /// one.
    fn buffer(&mut self, len: usize) -> Result<DeviceBuf<u64>> {
        let best = (0..self.pool.len())
            .filter(|&i| self.pool[i].len() >= len)
            .min_by_key(|&i| self.pool[i].len());
        if let Some(i) = best {
            return Ok(self.pool.swap_remove(i));
        }
        match DeviceBuf::new(len, self.stream()) {
            Ok(b) => Ok(b),
            Err(_) => {
                // Give the pool's buffers back to the allocator and try once more.
                self.pool.clear();
                DeviceBuf::new(len, self.stream())
            }
        }
    }

    fn give_back(&mut self, buf: DeviceBuf<u64>) {
        self.pool.push(buf);
    }

    /// `identity[0..n]`, grown when needed.
    fn identity(&mut self, n: usize) -> Result<*const u64> {
        if self.identity.as_ref().is_none_or(|b| b.len() < n) {
            let len = n.next_power_of_two();
            let buf = DeviceBuf::new(len, self.stream())?;
            // SAFETY: null map: identity.
            unsafe { ffi::fill_index(self.stream(), &buf, len, std::ptr::null(), 0)? };
            self.identity = Some(buf);
        }
        Ok(self.identity.as_ref().expect("set above").ptr())
    }

    /// The lookup-table index array, filled with `map[i % map_len]` for `i < n`.
    fn lut_index(&mut self, n: usize, map: *const u64, map_len: usize) -> Result<*const u64> {
        if self.lut_index.as_ref().is_none_or(|b| b.len() < n) {
            self.lut_index = None;
            self.lut_index = Some(DeviceBuf::new(n.next_power_of_two(), self.stream())?);
        }
        let buf = self.lut_index.as_ref().expect("set above");
        // SAFETY: `map` is a device array of `map_len` entries (the caller's).
        unsafe { ffi::fill_index(self.stream(), buf, n, map, map_len)? };
        Ok(buf.ptr())
    }

    /// Scratch for a call of `n` ciphertexts: the one made for the next power of two,
    /// made on first use and kept.
    fn scratch(&mut self, key: &GpuKey, n: usize) -> Result<*mut i8> {
        let capacity = n.next_power_of_two().min(MAX_DEVICE_BATCH);
        if let Some(s) = self.scratch.get(&capacity) {
            return Ok(s.buffer);
        }
        let need = key.scratch_bytes(self, capacity);
        let (mut free, _) = device_memory()?;
        if free < need {
            self.pool.clear();
            self.sync()?;
            free = device_memory()?.0;
        }
        if free < need {
            return Err(RuntimeError::Backend(format!(
                "the GPU has no room for the bootstrap scratch of {capacity} ciphertexts \
                 ({need} bytes, {free} free)"
            )));
        }
        let d = key.dims;
        let mut buffer: *mut i8 = std::ptr::null_mut();
        // SAFETY: the backend allocates the scratch for `capacity` ciphertexts on this
        // workspace's stream; it is freed in Drop.
        unsafe {
            raw::scratch_cuda_programmable_bootstrap_64_async(
                self.stream(),
                GPU,
                &mut buffer,
                d.small_dim,
                d.glwe_dim,
                d.poly,
                d.pbs_level,
                capacity as u32,
                true,
                d.ms_reduction,
            );
        }
        self.scratch.insert(capacity, Scratch { buffer });
        Ok(buffer)
    }

    /// Keyswitch + bootstrap of `n` big-key ciphertexts at `input` into `output` (device
    /// pointers), ciphertext `i` through table `lut_index[i]` of `luts`. Runs in slices of
    /// at most MAX_DEVICE_BATCH; adds the keyswitch and bootstrap seconds to `phases`.
    #[allow(clippy::too_many_arguments)]
    fn keyswitch_bootstrap(
        &mut self,
        key: &GpuKey,
        input: *const u64,
        output: *mut u64,
        n: usize,
        luts: *const u64,
        lut_index: *const u64,
        phases: &mut [f64; 4],
    ) -> Result<()> {
        let d = key.dims;
        let (big, small_size) = (d.big_size(), d.small_size());
        let slice = n.min(MAX_DEVICE_BATCH);
        let idx = self.identity(slice)?;
        let small = self.buffer(slice * small_size)?;
        let mut done = 0;
        let mut result = Ok(());
        while done < n && result.is_ok() {
            let m = (n - done).min(MAX_DEVICE_BATCH);
            result = self.slice(
                key,
                input.wrapping_add(done * big),
                &small,
                output.wrapping_add(done * big),
                m,
                luts,
                lut_index.wrapping_add(done),
                idx,
                phases,
            );
            done += m;
        }
        self.give_back(small);
        result
    }

    #[allow(clippy::too_many_arguments)]
    fn slice(
        &mut self,
        key: &GpuKey,
        input: *const u64,
        small: &DeviceBuf<u64>,
        output: *mut u64,
        m: usize,
        luts: *const u64,
        lut_index: *const u64,
        idx: *const u64,
        phases: &mut [f64; 4],
    ) -> Result<()> {
        let d = key.dims;
        let scratch = self.scratch(key, m)?;
        let t = Instant::now();
        // SAFETY: every pointer is a live device buffer of at least `m` ciphertexts (or
        // indexes); `small` holds `m` small-key ciphertexts.
        unsafe {
            let (stream, out, ksk) = (self.stream(), small.ptr().cast(), key.ksk.ptr().cast());
            if m >= GEMM_KEYSWITCH_FROM {
                raw::cuda_keyswitch_gemm_64_64_async(
                    stream,
                    GPU,
                    out,
                    idx.cast(),
                    input.cast(),
                    idx.cast(),
                    ksk,
                    d.big_dim,
                    d.small_dim,
                    d.ks_base_log,
                    d.ks_level,
                    m as u32,
                    true,
                );
            } else {
                raw::cuda_keyswitch_lwe_ciphertext_vector_64_64_async(
                    stream,
                    GPU,
                    out,
                    idx.cast(),
                    input.cast(),
                    idx.cast(),
                    ksk,
                    d.big_dim,
                    d.small_dim,
                    d.ks_base_log,
                    d.ks_level,
                    m as u32,
                );
            }
        }
        self.sync()?;
        phases[1] += t.elapsed().as_secs_f64();
        let t = Instant::now();
        // SAFETY: as above; `luts` holds every table `lut_index` names, `scratch` was made
        // for at least `m` ciphertexts with this key's dimensions.
        unsafe {
            raw::cuda_programmable_bootstrap_64_async(
                self.stream(),
                GPU,
                output.cast(),
                idx.cast(),
                luts.cast(),
                lut_index.cast(),
                small.ptr().cast_const().cast(),
                idx.cast(),
                key.bsk.ptr[0].cast_const(),
                scratch,
                d.small_dim,
                d.glwe_dim,
                d.poly,
                d.pbs_base_log,
                d.pbs_level,
                m as u32,
                1,
                0,
            );
        }
        self.sync()?;
        phases[2] += t.elapsed().as_secs_f64();
        Ok(())
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        let _ = self.sync();
        for (_, mut s) in std::mem::take(&mut self.scratch) {
            // SAFETY: made by scratch_cuda_programmable_bootstrap_64_async on this stream.
            unsafe {
                raw::cleanup_cuda_programmable_bootstrap_64(self.stream(), GPU, &mut s.buffer)
            };
        }
        self.identity = None;
        self.lut_index = None;
        self.pool.clear();
        let _ = self.sync();
    }
}

/// Runs evaluations with one [`GpuKey`], in a workspace taken from the key's pool (and
/// given back when dropped).
pub struct GpuBackend<'k> {
    key: &'k GpuKey,
    ws: Mutex<Option<Workspace>>,
    phases: Mutex<[f64; 4]>,
}

const PHASES: [&str; 4] = ["upload", "keyswitch", "bootstrap", "download"];

impl<'k> GpuBackend<'k> {
    pub fn new(key: &'k GpuKey) -> Self {
        GpuBackend {
            key,
            ws: Mutex::new(Some(key.take_workspace())),
            phases: Mutex::new([0.0; 4]),
        }
    }

    pub(crate) fn key(&self) -> &GpuKey {
        self.key
    }

    /// Runs `f` with this backend's workspace, adding the seconds it reports per phase.
    pub(crate) fn with_workspace<R>(
        &self,
        f: impl FnOnce(&mut Workspace, &mut [f64; 4]) -> Result<R>,
    ) -> Result<R> {
        let mut slot = self.ws.lock().unwrap_or_else(|p| p.into_inner());
        let ws = slot.get_or_insert_with(|| self.key.take_workspace());
        let mut phase = [0.0f64; 4];
        let r = f(ws, &mut phase);
        if r.is_err() {
            // A failed call may leave work queued or buffers in any state: start afresh.
            *slot = None;
        }
        let mut total = self.phases.lock().unwrap_or_else(|p| p.into_inner());
        for (acc, p) in total.iter_mut().zip(phase) {
            *acc += p;
        }
        r
    }

    /// Host batch in, host batch out: upload, keyswitch, bootstrap, download.
    fn run(
        &self,
        inputs: LweCiphertextListView<'_, u64>,
        luts: &DeviceBuf<u64>,
        lut_index: &[usize],
        mut outputs: LweCiphertextListMutView<'_, u64>,
    ) -> Result<()> {
        let in_size = inputs.lwe_size().0;
        assert_eq!(inputs.lwe_ciphertext_count().0, lut_index.len());
        assert_eq!(outputs.lwe_ciphertext_count().0, lut_index.len());
        assert_eq!(outputs.lwe_size().0, in_size);
        assert_eq!(in_size, self.key.dims.big_size());
        let n = lut_index.len();
        self.with_workspace(|ws, phase| {
            let t = Instant::now();
            let mut d_in = ws.buffer(n * in_size)?;
            d_in.upload(inputs.as_ref(), 0)?;
            let index: Vec<u64> = lut_index.iter().map(|&i| i as u64).collect();
            let mut d_index = ws.buffer(n)?;
            d_index.upload(&index, 0)?;
            let d_out = ws.buffer(n * in_size)?;
            ws.sync()?;
            phase[0] += t.elapsed().as_secs_f64();
            let r = ws.keyswitch_bootstrap(
                self.key,
                d_in.ptr(),
                d_out.ptr(),
                n,
                luts.ptr(),
                d_index.ptr(),
                phase,
            );
            let t = Instant::now();
            let r = r.and_then(|()| {
                d_out.download(0, outputs.as_mut())?;
                ws.sync()
            });
            phase[3] += t.elapsed().as_secs_f64();
            for b in [d_in, d_index, d_out] {
                ws.give_back(b);
            }
            r
        })
    }
}

impl Drop for GpuBackend<'_> {
    fn drop(&mut self) {
        let slot = self.ws.get_mut().unwrap_or_else(|p| p.into_inner());
        if let Some(ws) = slot.take() {
            self.key.return_workspace(ws);
        }
    }
}

impl PbsBackend for GpuBackend<'_> {
    fn kind(&self) -> BackendKind {
        BackendKind::Gpu
    }

    fn bootstrap_batch(
        &self,
        inputs: LweCiphertextListView<'_, u64>,
        luts: GlweCiphertextListView<'_, u64>,
        lut_index: &[usize],
        outputs: LweCiphertextListMutView<'_, u64>,
    ) -> Result<()> {
        if lut_index.is_empty() {
            return Ok(());
        }
        let d_luts = DeviceBuf::from_host(luts.as_ref(), std::ptr::null_mut())?;
        self.run(inputs, &d_luts, lut_index, outputs)
    }

    fn take_phase_seconds(&self) -> Vec<(&'static str, f64)> {
        let mut total = self.phases.lock().unwrap_or_else(|p| p.into_inner());
        let out = PHASES.iter().copied().zip(total.iter().copied()).collect();
        *total = [0.0; 4];
        out
    }

    fn as_gpu(&self) -> Option<&GpuBackend<'_>> {
        Some(self)
    }
}
