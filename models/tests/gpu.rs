//! The CUDA backend (feature `gpu`) against the CPU backend and the simulation. Needs an
//! NVIDIA GPU: where there is none, each test says so and returns.
#![cfg(feature = "gpu")]

mod common;

use common::*;
use veil_models::fhe::calibrate::bench_backend;
use veil_models::fhe::{BackendKind, ClientKey, EvalKey, FheModel, gpu_available};

fn device() -> bool {
    if !gpu_available() {
        eprintln!("skipped: no CUDA device on this machine");
    }
    gpu_available()
}

#[test]
fn gpu_reads_the_positions_the_cpu_reads() {
    if !device() {
        return;
    }
    let params = compiled("digits_mlp").1.params;
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
    let (_, model) = compiled("digits_mlp");
    let client = ClientKey::generate(model.params);
    let key = EvalKey::from_compressed(
        BackendKind::Gpu,
        model.params,
        &client.compressed_server_key(),
    )
    .unwrap();
    let spec = model.client_spec();
    let test = dataset("digits_mlp", "test.csv", model.n_features());
    let xs = &test.features[..64];
    let inputs: Vec<_> = xs
        .iter()
        .map(|x| client.encrypt(&spec, x).unwrap())
        .collect();
    let fhe = FheModel::new(model.clone()).unwrap();
    let outputs = fhe.evaluate(key.backend().as_ref(), &inputs).unwrap();
    let agree = xs
        .iter()
        .zip(&outputs)
        .filter(|(x, o)| {
            let sim = model.simulate(x, None).unwrap();
            let accs = client.decrypt(&spec, o).unwrap();
            model.decode(&sim.accs).label == spec.decode(&accs).label
        })
        .count();
    assert!(
        agree >= 62,
        "{agree} of 64 GPU predictions agree with simulation"
    );
}
