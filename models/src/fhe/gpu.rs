//! CUDA backend (cargo feature `gpu`): keyswitch + programmable bootstrap of whole batches
//! on one NVIDIA GPU, through tfhe's CUDA API.
//!
//! It reads exactly what the CPU backend reads: the same parameter set, the same keyswitch,
//! and the same centered modulus switch before blind rotation (the device key is built with
//! `CudaModulusSwitchNoiseReductionConfiguration::Centered`, the switch the CPU key carries),
//! so the plan, the simulator and the noise budget hold unchanged.
//!
//! What lives on the device: a client's keyswitching key and standard-domain bootstrapping
//! key (made from the compressed key, never from the CPU's Fourier form), and each model
//! layer's lookup tables (uploaded once, on first use). Per layer a batch is uploaded once,
//! keyswitched and bootstrapped on the device, and downloaded once; the weighted sums between
//! layers stay on the host (tfhe has no device API for LWE linear combinations).

use std::sync::Mutex;

use rayon::prelude::*;
use std::time::Instant;

use tfhe::core_crypto::gpu::glwe_ciphertext_list::CudaGlweCiphertextList;
use tfhe::core_crypto::gpu::lwe_bootstrap_key::{
    CudaLweBootstrapKey, CudaModulusSwitchNoiseReductionConfiguration,
};
use tfhe::core_crypto::gpu::lwe_ciphertext_list::CudaLweCiphertextList;
use tfhe::core_crypto::gpu::lwe_keyswitch_key::CudaLweKeyswitchKey;
use tfhe::core_crypto::gpu::vec::{CudaVec, GpuIndex};
use tfhe::core_crypto::gpu::{
    CudaStreams, cuda_keyswitch_lwe_ciphertext, cuda_programmable_bootstrap_lwe_ciphertext,
};
use tfhe::core_crypto::prelude::{
    CiphertextModulus, GlweCiphertextListView, LweBootstrapKeyOwned, LweCiphertextCount,
    LweCiphertextList, LweCiphertextListMutView, LweCiphertextListView, LweKeyswitchKeyOwned,
    lwe_bootstrap_key_size,
};
use tfhe::shortint::atomic_pattern::compressed::CompressedAtomicPatternServerKey;
use tfhe::shortint::server_key::{
    CompressedModulusSwitchConfiguration, ShortintCompressedBootstrappingKey,
};

use super::backend::{BackendKind, LookupTables, PbsBackend};
use super::keys::check_key_dimensions;
use crate::compiled::ParamSet;
use crate::error::{ModelError, Result};

/// The device every key and table goes to. One GPU per server process; more GPUs would
/// mean one process each, or keys spread over devices.
const GPU: u32 = 0;

/// Largest number of ciphertexts in one device call. Bounds the bootstrap scratch memory
/// (tens of KB per ciphertext) whatever the batch; larger batches run in slices.
pub const MAX_DEVICE_BATCH: usize = 32_768;

/// Keyswitch batches at least this large use tfhe's GEMM keyswitch kernel.
const GEMM_KEYSWITCH_FROM: usize = 256;

/// True when a CUDA device answers (false, never a panic, where there is no driver).
pub fn device_present() -> bool {
    tfhe::core_crypto::gpu::is_cuda_available() && tfhe::core_crypto::gpu::get_number_of_gpus() > 0
}

fn streams() -> CudaStreams {
    CudaStreams::new_single_gpu(GpuIndex::new(GPU))
}

/// A client's evaluation key in device memory.
pub struct GpuKey {
    ksk: CudaLweKeyswitchKey<u64>,
    bsk: CudaLweBootstrapKey,
    small_dimension: tfhe::core_crypto::prelude::LweDimension,
    device_bytes: u64,
}

impl GpuKey {
    /// Decompresses the seeded keys on the host (standard domain) and uploads them.
    pub fn from_compressed(params: ParamSet, key: &tfhe::CompressedServerKey) -> Result<Self> {
        let integer = key.clone().into_raw_parts().0;
        let shortint = integer.into_raw_parts();
        let CompressedAtomicPatternServerKey::Standard(std_key) = shortint.into_raw_parts().0
        else {
            return Err(ModelError::Crypto(
                "the evaluation key is not a standard KS-PBS key".into(),
            ));
        };
        let (seeded_ksk, bootstrapping_key, _order) = std_key.into_raw_parts();
        let ShortintCompressedBootstrappingKey::Classic {
            bsk: seeded_bsk,
            modulus_switch_noise_reduction_key,
        } = bootstrapping_key
        else {
            return Err(ModelError::Crypto(
                "the evaluation key uses multi-bit bootstrapping; Veil needs the classic one"
                    .into(),
            ));
        };
        let ms = match modulus_switch_noise_reduction_key {
            CompressedModulusSwitchConfiguration::CenteredMeanNoiseReduction => {
                Some(CudaModulusSwitchNoiseReductionConfiguration::Centered)
            }
            CompressedModulusSwitchConfiguration::Standard => None,
            CompressedModulusSwitchConfiguration::DriftTechniqueNoiseReduction(_) => {
                return Err(ModelError::Crypto(
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
        let fourier_len = lwe_bootstrap_key_size(
            bsk.input_lwe_dimension(),
            bsk.glwe_size(),
            bsk.polynomial_size(),
            bsk.decomposition_level_count(),
        );
        let device_bytes = (ksk.as_ref().len() * 8 + fourier_len * 8) as u64;
        let s = streams();
        if !tfhe::core_crypto::gpu::check_valid_cuda_malloc(device_bytes, GpuIndex::new(GPU)) {
            return Err(ModelError::Backend(format!(
                "the GPU has no room for another evaluation key ({device_bytes} bytes)"
            )));
        }
        let d_ksk = CudaLweKeyswitchKey::from_lwe_keyswitch_key(&ksk, &s);
        let d_bsk = CudaLweBootstrapKey::from_lwe_bootstrap_key(&bsk, ms, &s);
        s.synchronize();
        Ok(GpuKey {
            small_dimension: ksk.output_key_lwe_dimension(),
            ksk: d_ksk,
            bsk: d_bsk,
            device_bytes,
        })
    }

    /// Device bytes of the keyswitching key and the (Fourier-converted) bootstrapping key.
    pub fn device_bytes(&self) -> u64 {
        self.device_bytes
    }
}

/// A layer's lookup tables in device memory.
pub struct DeviceLuts(CudaGlweCiphertextList<u64>);

impl DeviceLuts {
    fn upload(luts: GlweCiphertextListView<'_, u64>, s: &CudaStreams) -> Self {
        DeviceLuts(CudaGlweCiphertextList::from_glwe_ciphertext_list(&luts, s))
    }
}

/// Runs batches with one [`GpuKey`] on a stream of its own.
pub struct GpuBackend<'k> {
    key: &'k GpuKey,
    streams: CudaStreams,
    phases: Mutex<[f64; 4]>,
}

const PHASES: [&str; 4] = ["upload", "keyswitch", "bootstrap", "download"];

impl<'k> GpuBackend<'k> {
    pub fn new(key: &'k GpuKey) -> Self {
        GpuBackend {
            key,
            streams: streams(),
            phases: Mutex::new([0.0; 4]),
        }
    }

    fn indexes(&self, values: impl Iterator<Item = usize>, n: usize) -> CudaVec<u64> {
        let host: Vec<u64> = values.map(|v| v as u64).collect();
        debug_assert_eq!(host.len(), n);
        let mut d = CudaVec::<u64>::new(n, &self.streams, 0);
        // SAFETY: `host` outlives the copy, which is synchronized below.
        unsafe { d.copy_from_cpu_async(&host, &self.streams, 0) };
        self.streams.synchronize();
        d
    }

    /// One slice of at most MAX_DEVICE_BATCH ciphertexts: upload, keyswitch, bootstrap,
    /// download.
    fn run_slice(
        &self,
        inputs: &[u64],
        in_size: usize,
        luts: &DeviceLuts,
        lut_index: &[usize],
        outputs: &mut [u64],
    ) {
        let s = &self.streams;
        let n = lut_index.len();
        let modulus = CiphertextModulus::<u64>::new_native();
        let mut t = Instant::now();
        let mut phase = [0.0f64; 4];
        let mut lap = |i: usize, t: &mut Instant| {
            phase[i] += t.elapsed().as_secs_f64();
            *t = Instant::now();
        };
        let host_in = LweCiphertextList::from_container(
            inputs,
            tfhe::core_crypto::prelude::LweSize(in_size),
            modulus,
        );
        let d_in = CudaLweCiphertextList::from_lwe_ciphertext_list(&host_in, s);
        let idx = self.indexes(0..n, n);
        let d_lut_index = self.indexes(lut_index.iter().copied(), n);
        let mut d_small =
            CudaLweCiphertextList::new(self.key.small_dimension, LweCiphertextCount(n), modulus, s);
        lap(0, &mut t);
        cuda_keyswitch_lwe_ciphertext(
            &self.key.ksk,
            &d_in,
            &mut d_small,
            &idx,
            &idx,
            true,
            s,
            n >= GEMM_KEYSWITCH_FROM,
        );
        lap(1, &mut t);
        // Our own output buffer, so that the download can land straight in `outputs`.
        let out_vec = CudaVec::<u64>::new(n * in_size, s, 0);
        let out_ptr = out_vec.ptr[0];
        let mut d_out =
            CudaLweCiphertextList::from_cuda_vec(out_vec, LweCiphertextCount(n), modulus);
        cuda_programmable_bootstrap_lwe_ciphertext(
            &d_small,
            &mut d_out,
            &luts.0,
            &d_lut_index,
            &idx,
            &idx,
            &self.key.bsk,
            s,
        );
        s.synchronize();
        lap(2, &mut t);
        // Touch the destination pages on every core first: a copy into freshly allocated
        // memory otherwise faults its pages in one at a time, on one thread.
        outputs.par_chunks_mut(1 << 15).for_each(|c| c.fill(0));
        assert_eq!(outputs.len(), n * in_size);
        // SAFETY: `out_ptr` is the device buffer `d_out` owns (alive here), of exactly
        // `outputs.len()` words; the copy completes before `synchronize` returns.
        unsafe {
            tfhe_cuda_common::cuda_bind::cuda_memcpy_async_to_cpu(
                outputs.as_mut_ptr().cast(),
                out_ptr,
                std::mem::size_of_val(outputs) as u64,
                s.ptr[0],
                GPU,
            );
        }
        s.synchronize();
        drop(d_out);
        lap(3, &mut t);
        let mut total = self.phases.lock().unwrap_or_else(|p| p.into_inner());
        for (acc, p) in total.iter_mut().zip(phase) {
            *acc += p;
        }
    }

    fn run(
        &self,
        inputs: LweCiphertextListView<'_, u64>,
        luts: &DeviceLuts,
        lut_index: &[usize],
        mut outputs: LweCiphertextListMutView<'_, u64>,
    ) {
        let in_size = inputs.lwe_size().0;
        assert_eq!(inputs.lwe_ciphertext_count().0, lut_index.len());
        assert_eq!(outputs.lwe_ciphertext_count().0, lut_index.len());
        assert_eq!(outputs.lwe_size().0, in_size);
        for ((inp, out), idx) in inputs
            .as_ref()
            .chunks(MAX_DEVICE_BATCH * in_size)
            .zip(outputs.as_mut().chunks_mut(MAX_DEVICE_BATCH * in_size))
            .zip(lut_index.chunks(MAX_DEVICE_BATCH))
        {
            self.run_slice(inp, in_size, luts, idx, out);
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
    ) {
        if lut_index.is_empty() {
            return;
        }
        let d_luts = DeviceLuts::upload(luts, &self.streams);
        self.run(inputs, &d_luts, lut_index, outputs);
    }

    fn bootstrap_layer(
        &self,
        inputs: LweCiphertextListView<'_, u64>,
        luts: &LookupTables,
        lut_index: &[usize],
        outputs: LweCiphertextListMutView<'_, u64>,
    ) {
        if lut_index.is_empty() {
            return;
        }
        let d_luts = luts
            .device
            .get_or_init(|| DeviceLuts::upload(luts.host(), &self.streams));
        self.run(inputs, d_luts, lut_index, outputs);
    }

    fn take_phase_seconds(&self) -> Vec<(&'static str, f64)> {
        let mut total = self.phases.lock().unwrap_or_else(|p| p.into_inner());
        let out = PHASES.iter().copied().zip(total.iter().copied()).collect();
        *total = [0.0; 4];
        out
    }
}
