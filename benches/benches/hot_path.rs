//! The hot path, piece by piece: keyswitch + bootstrap per parameter set (one thread, and
//! throughput on every core), keyswitch alone, the linear part of a dense layer, and one
//! neuron end to end. `cargo bench -p veil-benches --bench hot_path`

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tfhe::core_crypto::algorithms::slice_algorithms::slice_wrapping_add_scalar_mul_assign;
use tfhe::core_crypto::prelude::*;
use tfhe::shortint::ClassicPBSParameters;
use tfhe::shortint::parameters::v1_8::{
    V1_8_PARAM_MESSAGE_1_CARRY_1_KS_PBS_TUNIFORM_2M128,
    V1_8_PARAM_MESSAGE_2_CARRY_2_KS_PBS_TUNIFORM_2M128,
};
use veil_models::compiled::{POSITIONS, ParamSet};
use veil_runtime::{ClientKey, CpuBackend, PbsBackend, ServerKey, big_lwe_size};

/// shortint's own KS + PBS (`apply_lookup_table`, centered modulus switch) for each
/// parameter set small enough for this machine. MESSAGE_3_CARRY_3 (917 MB key, ~200 ms per
/// bootstrap) and MESSAGE_4_CARRY_4 (keygen > 11 GiB) are left out.
fn shortint_pbs(c: &mut Criterion) {
    let sets: [(&str, ClassicPBSParameters); 2] = [
        (
            "MESSAGE_1_CARRY_1_KS_PBS_TUNIFORM_2M128",
            V1_8_PARAM_MESSAGE_1_CARRY_1_KS_PBS_TUNIFORM_2M128,
        ),
        (
            "MESSAGE_2_CARRY_2_KS_PBS_TUNIFORM_2M128",
            V1_8_PARAM_MESSAGE_2_CARRY_2_KS_PBS_TUNIFORM_2M128,
        ),
    ];
    let mut g = c.benchmark_group("shortint_ks_pbs");
    g.sample_size(20);
    for (name, params) in sets {
        let (ck, sk) = tfhe::shortint::gen_keys(params);
        let lut = sk.generate_lookup_table(|x| x);
        let ct = ck.encrypt(1);
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        g.throughput(Throughput::Elements(1));
        g.bench_function(BenchmarkId::new("one_thread", name), |b| {
            one.install(|| b.iter(|| sk.apply_lookup_table(&ct, &lut)))
        });
        let n = 16 * rayon::current_num_threads();
        let cts: Vec<_> = (0..n).map(|i| ck.encrypt(i as u64 % 2)).collect();
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(BenchmarkId::new("all_threads", name), |b| {
            use rayon::prelude::*;
            b.iter(|| {
                cts.par_iter()
                    .map(|c| sk.apply_lookup_table(c, &lut))
                    .collect::<Vec<_>>()
            })
        });
    }
    g.finish();
}

struct Setup {
    server: ServerKey,
    size: usize,
    luts: GlweCiphertextListOwned<u64>,
}

fn setup() -> Setup {
    let params = ParamSet::Message2Carry2KsPbsTuniform2m128;
    let client = ClientKey::generate(params);
    let server = ServerKey::from_compressed(params, &client.compressed_server_key()).unwrap();
    let sp = veil_runtime::shortint_params(params);
    let (poly, glwe) = (sp.polynomial_size, sp.glwe_dimension.to_glwe_size());
    let lut = generate_programmable_bootstrap_glwe_lut(
        poly,
        glwe,
        POSITIONS as usize,
        CiphertextModulus::new_native(),
        1u64,
        |p: u64| p << 52,
    );
    Setup {
        server,
        size: big_lwe_size(params),
        luts: GlweCiphertextList::from_container(
            lut.as_ref().to_vec(),
            glwe,
            poly,
            CiphertextModulus::new_native(),
        ),
    }
}

/// Veil's backend: keyswitch, centered modulus switch, batched blind rotation, extraction.
fn veil_backend(c: &mut Criterion) {
    let s = setup();
    let backend = CpuBackend::new(&s.server);
    let modulus = CiphertextModulus::new_native();
    let mut g = c.benchmark_group("veil_backend_2_2");
    g.sample_size(10);
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    for n in [1usize, 16, 32, 64] {
        let input =
            LweCiphertextList::new(1u64 << 60, LweSize(s.size), LweCiphertextCount(n), modulus);
        let mut out = LweCiphertextList::new(0u64, LweSize(s.size), LweCiphertextCount(n), modulus);
        let idx = vec![0; n];
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(BenchmarkId::new("ks_pbs_all_threads", n), |b| {
            b.iter(|| {
                backend
                    .bootstrap_batch(input.as_view(), s.luts.as_view(), &idx, out.as_mut_view())
                    .unwrap()
            })
        });
        if n <= 16 {
            g.bench_function(BenchmarkId::new("ks_pbs_one_thread", n), |b| {
                one.install(|| {
                    b.iter(|| {
                        backend
                            .bootstrap_batch(
                                input.as_view(),
                                s.luts.as_view(),
                                &idx,
                                out.as_mut_view(),
                            )
                            .unwrap()
                    })
                })
            });
        }
    }
    g.finish();
}

fn keyswitch_and_linear(c: &mut Criterion) {
    let s = setup();
    let modulus = CiphertextModulus::new_native();
    let mut g = c.benchmark_group("linear_2_2");
    let input = LweCiphertext::new(3u64 << 58, LweSize(s.size), modulus);
    let ksk = veil_runtime::keys::keyswitch_key(&s.server);
    let mut small = LweCiphertext::new(0u64, ksk.output_key_lwe_dimension().to_lwe_size(), modulus);
    g.bench_function("keyswitch", |b| {
        b.iter(|| keyswitch_lwe_ciphertext(ksk, &input, &mut small))
    });
    // The linear part of the digits MLP's first layer: 32 neurons x 64 inputs, 5-bit weights.
    // Pseudo-random words: a constant input would keyswitch to a zero mask, and blind rotation
    // skips zero mask elements, which would time almost nothing.
    let xs: Vec<u64> = (0..64 * s.size as u64)
        .map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .collect();
    let weights: Vec<u64> = (0..64 * 32).map(|i| (i as i64 % 31 - 15) as u64).collect();
    let mut out = vec![0u64; 32 * s.size];
    g.throughput(Throughput::Elements(64 * 32));
    g.bench_function("dense_64x32_one_thread", |b| {
        b.iter(|| {
            out.fill(0);
            for (n, acc) in out.chunks_exact_mut(s.size).enumerate() {
                for j in 0..64 {
                    slice_wrapping_add_scalar_mul_assign(
                        acc,
                        &xs[j * s.size..(j + 1) * s.size],
                        weights[n * 64 + j],
                    );
                }
            }
        })
    });
    g.finish();
    // One neuron end to end: 64-term weighted sum, keyswitch, bootstrap.
    let backend = CpuBackend::new(&s.server);
    let mut g = c.benchmark_group("neuron_2_2");
    g.sample_size(20);
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let mut acc = LweCiphertextList::new(0u64, LweSize(s.size), LweCiphertextCount(1), modulus);
    let mut res = LweCiphertextList::new(0u64, LweSize(s.size), LweCiphertextCount(1), modulus);
    g.bench_function("dense64_ks_pbs_one_thread", |b| {
        one.install(|| {
            b.iter(|| {
                acc.as_mut().fill(0);
                for j in 0..64 {
                    slice_wrapping_add_scalar_mul_assign(
                        acc.as_mut(),
                        &xs[j * s.size..(j + 1) * s.size],
                        weights[j],
                    );
                }
                backend
                    .bootstrap_batch(acc.as_view(), s.luts.as_view(), &[0], res.as_mut_view())
                    .unwrap();
            })
        })
    });
    g.finish();
}

criterion_group!(benches, shortint_pbs, veil_backend, keyswitch_and_linear);
criterion_main!(benches);
