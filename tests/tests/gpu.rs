//! The CUDA backend (feature `gpu`) against the CPU backend and the simulation. Needs an
//! NVIDIA GPU: where there is none, each test prints SKIPPED and returns, unless
//! `VEIL_REQUIRE_GPU=1` is set (as on the GPU machine), where a missing device fails.
#![cfg(feature = "gpu")]

use veil_models::Simulate;
use veil_runtime::calibrate::bench_backend;
use veil_runtime::{BackendKind, ClientKey, EvalKey, FheModel, gpu_available};
use veil_tests::{compile_zoo, test_set};

fn device() -> bool {
    let present = gpu_available();
    if !present {
        assert!(
            std::env::var("VEIL_REQUIRE_GPU").as_deref() != Ok("1"),
            "VEIL_REQUIRE_GPU=1 but no CUDA device answers"
        );
        // Straight to the process's stderr: libtest hides what a passing test prints.
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: no CUDA device on this machine; this GPU test checked nothing"
        );
    }
    present
}

/// Evaluates `n` test rows of `name` on the GPU and checks every output against the exact
/// simulation, within the plan's predicted noise; returns how many labels agree.
fn check_against_simulation(name: &str, n: usize, chunk_limit: usize) -> usize {
    let model = compile_zoo(name);
    let client = ClientKey::generate(model.params);
    let key = EvalKey::from_compressed(
        BackendKind::Gpu,
        model.params,
        &client.compressed_server_key(),
    )
    .unwrap();
    let spec = model.client_spec();
    let test = test_set(name, model.n_features());
    let xs = &test.features[..n];
    let inputs: Vec<_> = xs
        .iter()
        .map(|x| client.encrypt(&spec, x).unwrap())
        .collect();
    let fhe = FheModel::new(model.clone()).unwrap();
    veil_runtime::gpu::set_chunk_limit(chunk_limit);
    let result = fhe.evaluate_profiled(key.backend().as_ref(), &inputs);
    veil_runtime::gpu::set_chunk_limit(0);
    let (outputs, profile) = result.unwrap();
    assert_eq!(outputs.len(), n);
    let per_sample: usize = model.stages.iter().map(|s| s.len()).sum();
    assert_eq!(profile.bootstraps, n * per_sample, "every lookup ran once");
    let mut agree = 0;
    for (x, o) in xs.iter().zip(&outputs) {
        let sim = model.simulate(x, None).unwrap();
        let accs = client.decrypt(&spec, o).unwrap();
        let bound = model.predicted_deviation(x, 300, 11).unwrap();
        for ((e, s), b) in accs.iter().zip(&sim.accs).zip(&bound) {
            assert!(
                (e - s).abs() <= *b,
                "{name}: GPU {accs:?} vs simulated {:?}, bounds {bound:?}",
                sim.accs
            );
        }
        agree += usize::from(
            model.decode(&sim.accs).unwrap().label == spec.decode(&accs).unwrap().label,
        );
    }
    agree
}

#[test]
fn gpu_reads_the_positions_the_cpu_reads() {
    if !device() {
        return;
    }
    let params = compile_zoo("digits_mlp").params;
    let r = bench_backend(BackendKind::Gpu, params, &[1, 300], 0.0, 1024).unwrap();
    let g = r.agreement.unwrap();
    assert!(g.same_position_as_cpu >= 0.98, "{g:?}");
    assert!(
        (g.error_std - g.cpu_error_std).abs() < 0.1 * g.cpu_error_std,
        "{g:?}"
    );
    assert!(g.error_mean.abs() < 0.5, "{g:?}");
}

#[test]
fn gpu_runs_agree_with_simulation() {
    if !device() {
        return;
    }
    let agree = check_against_simulation("digits_mlp", 64, 0);
    assert!(
        agree >= 62,
        "{agree} of 64 GPU predictions agree with simulation"
    );
}

/// A model whose later stages read values of earlier ones (residual connections), so the
/// device keeps several activation blocks alive and frees each after its last reader.
#[test]
fn gpu_residual_model_matches_simulation() {
    if !device() {
        return;
    }
    let agree = check_against_simulation("digits_resmlp", 40, 0);
    assert!(agree >= 38, "{agree} of 40 labels agree with simulation");
}

/// Two convolution stages (max pooling in between), in chunks of 7 samples: the chunked
/// path, with the host expanding one chunk while the device runs another, gives every
/// sample its own answer in order.
#[test]
fn gpu_chunked_cnn_matches_simulation() {
    if !device() {
        return;
    }
    let agree = check_against_simulation("digits_maxpool_cnn", 23, 7);
    assert!(agree >= 22, "{agree} of 23 labels agree with simulation");
}
