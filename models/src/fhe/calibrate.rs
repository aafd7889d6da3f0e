//! A short measurement of this machine's bootstrap throughput, for latency predictions.

use std::time::Instant;

use rayon::prelude::*;
use tfhe::core_crypto::algorithms::slice_algorithms::slice_wrapping_add_scalar_mul_assign;
use tfhe::core_crypto::prelude::{
    CiphertextModulus, GlweCiphertextList, LweCiphertextCount, LweCiphertextList,
    generate_programmable_bootstrap_glwe_lut,
};

use super::{
    ClientKey, CpuBackend, PbsBackend, ServerKey, keys::eval_key_to_bytes, shortint_params,
};
use crate::cost::MachineProfile;
use crate::plan::{POSITIONS, ParamSet};

/// Measures keyswitch + bootstrap latency and throughput with real keys (a few seconds).
pub fn calibrate(params: ParamSet) -> MachineProfile {
    let client = ClientKey::generate(params);
    let compressed = client.compressed_server_key();
    let eval_key_bytes = eval_key_to_bytes(&compressed).len() as u64;
    let server = ServerKey::from_compressed(params, &compressed).expect("own key");
    let backend = CpuBackend::new(&server);
    let sp = shortint_params(params);
    let (poly, glwe_size) = (sp.polynomial_size, sp.glwe_dimension.to_glwe_size());
    let size = super::big_lwe_size(params);
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
        backend.bootstrap_batch(
            input.as_view(),
            luts.as_view(),
            &vec![0; n],
            out.as_mut_view(),
        );
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
