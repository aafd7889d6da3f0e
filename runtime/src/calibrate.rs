//! A short measurement of this machine's bootstrap throughput, for latency predictions.

use std::time::Instant;

use rayon::prelude::*;
use tfhe::core_crypto::algorithms::slice_algorithms::slice_wrapping_add_scalar_mul_assign;
use tfhe::core_crypto::prelude::{
    CiphertextModulus, GlweCiphertextList, LweCiphertextCount, LweCiphertextList,
    generate_programmable_bootstrap_glwe_lut,
};

use crate::{
    ClientKey, CpuBackend, PbsBackend, ServerKey, keys::eval_key_to_bytes, shortint_params,
};
use veil_format::compiled::{POSITIONS, ParamSet};
use veil_format::cost::MachineProfile;

/// Measures keyswitch + bootstrap latency and throughput with real keys (a few seconds).
pub fn calibrate(params: ParamSet) -> MachineProfile {
    let client = ClientKey::generate(params);
    let compressed = client.compressed_server_key();
    let eval_key_bytes = eval_key_to_bytes(&compressed).len() as u64;
    let server = ServerKey::from_compressed(params, &compressed).expect("own key");
    let backend = CpuBackend::new(&server);
    let sp = shortint_params(params);
    let (poly, glwe_size) = (sp.polynomial_size, sp.glwe_dimension.to_glwe_size());
    let size = crate::big_lwe_size(params);
    let modulus = CiphertextModulus::new_native();
    let lut = generate_programmable_bootstrap_glwe_lut(
        poly,
        glwe_size,
        POSITIONS as usize,
        modulus,
        1u64,
        |p: u64| p << 52,
    );
    let luts = GlweCiphertextList::from_container(lut.as_ref().to_vec(), glwe_size, poly, modulus);
    let threads = rayon::current_num_threads().max(1);
    // Trivial ciphertexts cost the same to bootstrap as real ones.
    let run = |n: usize| -> f64 {
        let input = LweCiphertextList::new(
            1u64 << 60,
            tfhe::core_crypto::prelude::LweSize(size),
            LweCiphertextCount(n),
            modulus,
        );
        let mut out = LweCiphertextList::new(
            0u64,
            tfhe::core_crypto::prelude::LweSize(size),
            LweCiphertextCount(n),
            modulus,
        );
        let t = Instant::now();
        backend
            .bootstrap_batch(
                input.as_view(),
                luts.as_view(),
                &vec![0; n],
                out.as_mut_view(),
            )
            .expect("the CPU backend reports no errors");
        t.elapsed().as_secs_f64()
    };
    run(threads); // warm up (FFT plans, page faults)
    // The reference single bootstrap: tfhe's own shortint KS + PBS on one thread.
    let single = {
        let shortint = compressed.decompress().into_raw_parts().0.into_raw_parts();
        let integer: &tfhe::integer::ClientKey = client.high_level().as_ref();
        let sck: &tfhe::shortint::ClientKey = integer.as_ref();
        let ct = sck.encrypt(1);
        let acc = shortint.generate_lookup_table(|x| x);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .expect("pool");
        pool.install(|| {
            let _ = shortint.apply_lookup_table(&ct, &acc);
            let reps = 10;
            let t = Instant::now();
            for _ in 0..reps {
                let _ = std::hint::black_box(shortint.apply_lookup_table(&ct, &acc));
            }
            t.elapsed().as_secs_f64() / reps as f64
        })
    };
    // The batch a digits layer gives: 16 per thread.
    // Throughput depends on how many ciphertexts each thread blind-rotates per batch.
    let by_batch: Vec<(usize, f64)> = [1usize, 4, 8, 16, 32]
        .iter()
        .map(|&per_thread| {
            let n = per_thread * threads;
            let best = (0..2).map(|_| run(n)).fold(f64::MAX, f64::min);
            (per_thread, n as f64 / best)
        })
        .collect();
    let pbs_per_second = by_batch.iter().find(|b| b.0 == 16).map_or(0.0, |b| b.1);
    // Linear part: 64-term weighted sums of big-key ciphertexts.
    let terms = 64;
    let xs = vec![7u64; terms * size];
    let outs = 256;
    let t = Instant::now();
    (0..outs).into_par_iter().for_each(|_| {
        let mut acc = vec![0u64; size];
        for j in 0..terms {
            slice_wrapping_add_scalar_mul_assign(&mut acc, &xs[j * size..(j + 1) * size], 3);
        }
        std::hint::black_box(&acc);
    });
    let lin = t.elapsed().as_secs_f64();
    // Expanding seeded inputs (regenerating masks from the seed), per feature.
    let features = 256;
    let seeded = tfhe::core_crypto::prelude::SeededLweCiphertextList::new(
        0u64,
        tfhe::core_crypto::prelude::LweSize(size),
        LweCiphertextCount(features),
        tfhe::core_crypto::commons::math::random::CompressionSeed::from(
            tfhe::core_crypto::commons::math::random::Seed(1),
        ),
        modulus,
    );
    let t = Instant::now();
    std::hint::black_box(seeded.decompress_into_lwe_ciphertext_list());
    let expand = t.elapsed().as_secs_f64();
    MachineProfile {
        cpu: cpu_model(),
        threads,
        parameter_set: params.name().to_string(),
        pbs_single_ms: single * 1e3,
        pbs_per_second,
        pbs_per_second_by_batch: by_batch,
        lwe_mac_per_second: (outs * terms) as f64 / lin,
        expand_ms_per_feature: expand * 1e3 / features as f64,
        eval_key_bytes,
        veil_version: env!("CARGO_PKG_VERSION").to_string(),
    }
}

/// The CPU model from /proc/cpuinfo, or "unknown".
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// Keyswitch + bootstrap throughput of one batch size on one backend.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BatchThroughput {
    pub batch: usize,
    /// Best wall time of one batch over the repetitions, in milliseconds.
    pub batch_ms: f64,
    pub pbs_per_second: f64,
    pub repetitions: usize,
    /// The backend's own split of the best run (GPU: upload, keyswitch, bootstrap, download).
    pub phases_ms: Vec<(String, f64)>,
}

/// How one backend's bootstrap reads accumulators, against the CPU backend on the same
/// ciphertexts (positions of the 2048-step table; `read - target`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct ReadAgreement {
    pub reads: usize,
    /// Fraction of reads where this backend and the CPU read the same position.
    pub same_position_as_cpu: f64,
    pub error_mean: f64,
    pub error_std: f64,
    pub max_abs_error: i64,
    pub cpu_error_mean: f64,
    pub cpu_error_std: f64,
    pub cpu_max_abs_error: i64,
}

/// What `veil bench-pbs` measures.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BackendBench {
    pub backend: String,
    pub parameter_set: String,
    pub eval_key_bytes_compressed: u64,
    /// Bytes of the expanded key where the backend keeps it (GPU: device memory).
    pub eval_key_bytes_expanded: u64,
    pub key_setup_ms: f64,
    pub throughput: Vec<BatchThroughput>,
    pub agreement: Option<ReadAgreement>,
}

/// Measures keyswitch + bootstrap throughput by batch size on `kind`, with real keys and
/// real encryptions, and (when `reads > 0`) how its reads compare with the CPU backend's.
pub fn bench_backend(
    kind: crate::BackendKind,
    params: ParamSet,
    batches: &[usize],
    min_seconds: f64,
    reads: usize,
) -> crate::error::Result<BackendBench> {
    use tfhe::core_crypto::prelude::{
        ContiguousEntityContainer, decrypt_lwe_ciphertext, encrypt_lwe_ciphertext_list,
    };
    use tfhe::core_crypto::prelude::{
        DefaultRandomGenerator, EncryptionRandomGenerator, LweSize, PlaintextList,
    };
    use tfhe::core_crypto::seeders::new_seeder;

    use veil_format::compiled::{GUARD, POSITION};

    let client = ClientKey::generate(params);
    let compressed = client.compressed_server_key();
    let compressed_bytes = eval_key_to_bytes(&compressed).len() as u64;
    let t = Instant::now();
    let key = crate::EvalKey::from_compressed(kind, params, &compressed)?;
    let key_setup_ms = t.elapsed().as_secs_f64() * 1e3;
    let backend = key.backend();

    let integer: &tfhe::integer::ClientKey = client.high_level().as_ref();
    let shortint: &tfhe::shortint::ClientKey = integer.as_ref();
    let (lwe_key, noise) = shortint.encryption_key_and_noise();
    let size = LweSize(crate::big_lwe_size(params));
    let modulus = CiphertextModulus::new_native();
    let sp = shortint_params(params);
    let (poly, glwe_size) = (sp.polynomial_size, sp.glwe_dimension.to_glwe_size());
    let mut seeder = new_seeder();
    let mut enc =
        EncryptionRandomGenerator::<DefaultRandomGenerator>::new(seeder.seed(), seeder.as_mut());
    // Identity table: position p decrypts back to p.
    let lut = generate_programmable_bootstrap_glwe_lut(
        poly,
        glwe_size,
        POSITIONS as usize,
        modulus,
        1u64,
        |p: u64| p.wrapping_mul(POSITION as u64),
    );
    let luts = GlweCiphertextList::from_container(lut.as_ref().to_vec(), glwe_size, poly, modulus);
    // The executor's centered-switch correction (half a position).
    let fix = 1u64 << 51;
    let mut state = 0x5eed_u64;
    let mut next_target = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        GUARD + ((state >> 33) % (POSITIONS - 2 * GUARD) as u64) as i64
    };
    let mut encrypt = |targets: &[i64]| {
        let plain: Vec<u64> = targets
            .iter()
            .map(|&v| ((v as u64) << 52).wrapping_add(fix))
            .collect();
        let mut list = LweCiphertextList::new(0u64, size, LweCiphertextCount(plain.len()), modulus);
        encrypt_lwe_ciphertext_list(
            &lwe_key,
            &mut list,
            &PlaintextList::from_container(plain),
            noise,
            &mut enc,
        );
        list
    };

    // Throughput: a pool of real encryptions, repeated up to the batch size.
    let pool_targets: Vec<i64> = (0..1024).map(|_| next_target()).collect();
    let pool = encrypt(&pool_targets);
    let mut throughput = Vec::new();
    for &b in batches {
        let b = b.max(1);
        let mut input = Vec::with_capacity(b * size.0);
        while input.len() < b * size.0 {
            let take = (b * size.0 - input.len()).min(pool.as_ref().len());
            input.extend_from_slice(&pool.as_ref()[..take]);
        }
        let input = LweCiphertextList::from_container(input, size, modulus);
        let mut out = LweCiphertextList::new(0u64, size, LweCiphertextCount(b), modulus);
        let idx = vec![0usize; b];
        // Warm-up (device tables, scratch, FFT plans).
        backend.bootstrap_batch(input.as_view(), luts.as_view(), &idx, out.as_mut_view())?;
        backend.take_phase_seconds();
        let started = Instant::now();
        let mut best = f64::MAX;
        let mut best_phases = Vec::new();
        let mut reps = 0;
        while reps < 2 || (started.elapsed().as_secs_f64() < min_seconds && reps < 1000) {
            let t = Instant::now();
            backend.bootstrap_batch(input.as_view(), luts.as_view(), &idx, out.as_mut_view())?;
            let secs = t.elapsed().as_secs_f64();
            let phases = backend.take_phase_seconds();
            if secs < best {
                best = secs;
                best_phases = phases
                    .into_iter()
                    .map(|(n, s)| (n.to_string(), s * 1e3))
                    .collect();
            }
            reps += 1;
        }
        throughput.push(BatchThroughput {
            batch: b,
            batch_ms: best * 1e3,
            pbs_per_second: b as f64 / best,
            repetitions: reps,
            phases_ms: best_phases,
        });
    }

    let agreement = if reads > 0 {
        let targets: Vec<i64> = (0..reads).map(|_| next_target()).collect();
        let input = encrypt(&targets);
        let read = |backend: &dyn PbsBackend| -> crate::error::Result<Vec<i64>> {
            let mut out = LweCiphertextList::new(0u64, size, LweCiphertextCount(reads), modulus);
            backend.bootstrap_batch(
                input.as_view(),
                luts.as_view(),
                &vec![0; reads],
                out.as_mut_view(),
            )?;
            Ok(out
                .iter()
                .map(|ct| {
                    let d = decrypt_lwe_ciphertext(&lwe_key, &ct).0;
                    (d.wrapping_add(1 << 51) >> 52) as i64
                })
                .collect())
        };
        let mine = read(backend.as_ref())?;
        let cpu_key =
            crate::EvalKey::from_compressed(crate::BackendKind::Cpu, params, &compressed)?;
        let theirs = read(cpu_key.backend().as_ref())?;
        let stats = |got: &[i64]| {
            let errs: Vec<f64> = got
                .iter()
                .zip(&targets)
                .map(|(g, t)| (g - t) as f64)
                .collect();
            let n = errs.len() as f64;
            let mean = errs.iter().sum::<f64>() / n;
            let var = errs.iter().map(|e| (e - mean).powi(2)).sum::<f64>() / n;
            let max = errs.iter().map(|e| e.abs() as i64).max().unwrap_or(0);
            (mean, var.sqrt(), max)
        };
        let (m, s, x) = stats(&mine);
        let (cm, cs, cx) = stats(&theirs);
        Some(ReadAgreement {
            reads,
            same_position_as_cpu: mine.iter().zip(&theirs).filter(|(a, b)| a == b).count() as f64
                / reads as f64,
            error_mean: m,
            error_std: s,
            max_abs_error: x,
            cpu_error_mean: cm,
            cpu_error_std: cs,
            cpu_max_abs_error: cx,
        })
    } else {
        None
    };
    Ok(BackendBench {
        backend: kind.name().to_string(),
        parameter_set: params.name().to_string(),
        eval_key_bytes_compressed: compressed_bytes,
        eval_key_bytes_expanded: key.memory_bytes(),
        key_setup_ms,
        throughput,
        agreement,
    })
}
