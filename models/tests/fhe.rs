//! Encrypted runs with real 128-bit keys agree with the simulation.

mod common;

use common::*;
use veil_models::Simulate;
use veil_runtime::{
    ClientKey, CpuBackend, EncryptedInput, EncryptedOutput, FheModel, ServerKey, big_lwe_size,
};

/// Decrypted accumulators lie within the plan's predicted noise of the exact simulation (a
/// hidden read may be off by one step, which the weights amplify).
fn assert_within_predicted_noise(
    name: &str,
    model: &veil_models::CompiledModel,
    x: &[f64],
    accs: &[f64],
    sim: &[f64],
) {
    let bound = model.predicted_deviation(x, 300, 11).unwrap();
    for ((e, s), b) in accs.iter().zip(sim).zip(&bound) {
        assert!(
            (e - s).abs() <= *b,
            "{name}: encrypted {accs:?} vs simulated {sim:?}, bounds {bound:?}"
        );
    }
}

/// Encrypts each row and passes it through its wire form, as over the network.
fn encrypt_through_the_wire(
    client: &ClientKey,
    model: &veil_models::CompiledModel,
    xs: &[Vec<f64>],
) -> Vec<EncryptedInput> {
    let spec = model.client_spec();
    let lwe_size = big_lwe_size(model.params);
    xs.iter()
        .map(|x| {
            let bytes = client.encrypt(&spec, x).unwrap().to_bytes();
            EncryptedInput::from_bytes(&bytes, model.n_inputs(), lwe_size).unwrap()
        })
        .collect()
}

#[test]
fn encrypted_runs_agree_with_simulation() {
    let (float, mlp) = compiled("digits_mlp");
    let params = mlp.params;
    let client = ClientKey::generate_with_seed(params, 7);
    // The server only ever sees the compressed evaluation key.
    let server = ServerKey::from_compressed(params, &client.compressed_server_key()).unwrap();
    let backend = CpuBackend::new(&server);
    let lwe_size = big_lwe_size(params);

    for (name, model, rows) in [
        ("digits_mlp", mlp.clone(), 6usize),
        (
            "breast_cancer_logreg",
            compiled("breast_cancer_logreg").1,
            4,
        ),
        ("wine_mlp", compiled("wine_mlp").1, 4),
    ] {
        let spec = model.client_spec();
        let n_features = model.n_features();
        let test = dataset(name, "test.csv", n_features);
        let xs = &test.features[..rows];
        // Inputs go through their wire form, as over the network.
        let inputs: Vec<EncryptedInput> = xs
            .iter()
            .map(|x| {
                let bytes = client.encrypt(&spec, x).unwrap().to_bytes();
                assert!(
                    bytes.len() <= 8 * n_features + 64,
                    "{name}: seeded input is compact"
                );
                EncryptedInput::from_bytes(&bytes, n_features, lwe_size).unwrap()
            })
            .collect();
        let fhe = FheModel::new(model.clone()).unwrap();
        let outputs = fhe.evaluate(&backend, &inputs).unwrap();
        assert_eq!(outputs.len(), rows);
        let mut agree = 0;
        for (x, out) in xs.iter().zip(&outputs) {
            // Outputs come back switched to the plan's modulus: at most 32 bits per element,
            // so at most 8.2 KB per output ciphertext, as the encoding says.
            let bits = spec.output.modulus_bits;
            let bytes = out.to_bytes();
            assert_eq!(
                bytes.len(),
                veil_models::compiled::output_wire_bytes(model.n_outputs(), lwe_size, bits),
                "{name}"
            );
            assert!(
                bytes.len() <= 8_200 * model.n_outputs(),
                "{name}: {}",
                bytes.len()
            );
            let out =
                EncryptedOutput::from_bytes(&bytes, model.n_outputs(), lwe_size, bits).unwrap();
            let accs = client.decrypt(&spec, &out).unwrap();
            let sim = model.simulate(x, None).unwrap();
            assert_within_predicted_noise(name, &model, x, &accs, &sim.accs);
            if model.stages.is_empty() {
                // No bootstrap at all: fresh-encryption noise only, so the result is exact.
                for (e, s) in accs.iter().zip(&sim.accs) {
                    assert_eq!(e.round(), *s, "{name}");
                }
            }
            if spec.decode(&accs).unwrap().label == model.decode(&sim.accs).unwrap().label {
                agree += 1;
            }
        }
        assert!(
            agree >= rows - 1,
            "{name}: {agree}/{rows} encrypted predictions agree with simulation"
        );
        let _ = &float;
    }
}

/// Graph models (MaxPool by pairwise maxima, residual blocks, fused GELU / SiLU, QDQ, torch's
/// default export with LayerNorm): test
/// samples encrypted in one batch agree with the noiseless simulation. The MaxPool CNN costs
/// 1,344 bootstraps per sample, so CI runs 6 of it; `VEIL_GRAPH_SAMPLES=20` runs 20 of each.
#[test]
fn graph_models_encrypted_agree_with_simulation() {
    let many: Option<usize> = std::env::var("VEIL_GRAPH_SAMPLES")
        .ok()
        .and_then(|v| v.parse().ok());
    let names = [
        ("digits_resmlp", many.unwrap_or(20)),
        ("digits_qdq_mlp", many.unwrap_or(20)),
        ("digits_maxpool_cnn", many.unwrap_or(6)),
        // torch's default exporter (external data).
        ("digits_torch_mlp", many.unwrap_or(20)),
        ("digits_torch_conv1d", many.unwrap_or(10)),
        // LayerNorm by squares, 1/sqrt and quarter-square products.
        ("digits_torch_lngelu", many.unwrap_or(10)),
    ];
    let params = compiled(names[0].0).1.params;
    let client = ClientKey::generate_with_seed(params, 8);
    let server = ServerKey::from_compressed(params, &client.compressed_server_key()).unwrap();
    let backend = CpuBackend::new(&server);
    for (name, rows) in names {
        let (_, model) = compiled(name);
        let spec = model.client_spec();
        let test = dataset(name, "test.csv", model.n_features());
        let xs = &test.features[..rows];
        let inputs = encrypt_through_the_wire(&client, &model, xs);
        let fhe = FheModel::new(model.clone()).unwrap();
        let (outputs, profile) = fhe.evaluate_profiled(&backend, &inputs).unwrap();
        assert_eq!(profile.bootstraps, rows * model.pbs_per_sample());
        let (mut agree, mut worst, mut outside) = (0, 0.0f64, 0);
        for (x, out) in xs.iter().zip(&outputs) {
            let accs = client.decrypt(&spec, out).unwrap();
            let sim = model.simulate(x, None).unwrap();
            let scores = spec.output.scores(&accs);
            let sim_scores = spec.output.scores(&sim.accs);
            let spread = sim_scores
                .iter()
                .fold(0.0f64, |m, s| m.max(s.abs()))
                .max(1e-9);
            for (e, s) in scores.iter().zip(&sim_scores) {
                worst = worst.max((e - s).abs() / spread);
            }
            if name == "digits_torch_lngelu" {
                // See below: counted, not asserted per row.
                let bound = model.predicted_deviation(x, 300, 11).unwrap();
                outside += usize::from(
                    accs.iter()
                        .zip(&sim.accs)
                        .zip(&bound)
                        .any(|((e, s), b)| (e - s).abs() > *b),
                );
            } else {
                assert_within_predicted_noise(name, &model, x, &accs, &sim.accs);
            }
            agree += usize::from(
                spec.decode(&accs).unwrap().label == model.decode(&sim.accs).unwrap().label,
            );
        }
        eprintln!(
            "{name}: {agree}/{rows} encrypted predictions equal the simulation's; largest score \
             difference {:.2}% of the largest score; {outside} rows outside the predicted \
             deviation; {} bootstraps in {:.1} s",
            100.0 * worst,
            profile.bootstraps,
            profile.bootstrap_s + profile.linear_s + profile.expand_s
        );
        // The LayerNorm model is a known gap of the noise model: its encrypted scores are
        // sometimes scaled as a whole (x0.5 to x1.6), a misread of the 1/sqrt(variance) path
        // that the plan's predicted noise does not draw. Measured on 120 test rows
        // (2026-12-05): 4 rows outside the predicted deviation, 3 labels unlike the
        // simulation's. Held to that rate here (at most 2 of 10 rows each; at 3.3% per row
        // 3 or more happen in under 1% of runs), and reported by the closing note.
        if name == "digits_torch_lngelu" {
            assert!(
                outside <= 2,
                "{name}: {outside}/{rows} rows outside the bound"
            );
            assert!(agree >= rows - 2, "{name}: {agree}/{rows} agree");
            continue;
        }
        assert!(agree >= rows - 1, "{name}: {agree}/{rows} agree");
        assert!(
            worst < 0.25,
            "{name}: scores differ by {:.1}%",
            100.0 * worst
        );
    }
}

/// Tree ensembles read every test and leaf table exactly, so an encrypted run decodes to the
/// simulation's outputs up to the noise of the summed bootstrap outputs alone; a regressor's
/// predictions stay within the bound the plan derives.
#[test]
fn trees_and_regressors_encrypted_agree_with_simulation() {
    let params = compiled("breast_cancer_xgb").1.params;
    let client = ClientKey::generate_with_seed(params, 9);
    let server = ServerKey::from_compressed(params, &client.compressed_server_key()).unwrap();
    let backend = CpuBackend::new(&server);
    for (name, rows) in [("breast_cancer_xgb", 20usize), ("diabetes_gbr", 12)] {
        let (_, model) = compiled(name);
        let spec = model.client_spec();
        let test = dataset(name, "test.csv", model.n_features());
        let xs = &test.features[..rows];
        let inputs = encrypt_through_the_wire(&client, &model, xs);
        let fhe = FheModel::new(model.clone()).unwrap();
        let outputs = fhe.evaluate(&backend, &inputs).unwrap();
        let mut worst = 0.0f64;
        for (x, out) in xs.iter().zip(&outputs) {
            let accs = client.decrypt(&spec, out).unwrap();
            let sim = model.simulate(x, None).unwrap();
            assert_within_predicted_noise(name, &model, x, &accs, &sim.accs);
            for (n, (e, s)) in accs.iter().zip(&sim.accs).enumerate() {
                // Only the summed outputs' own noise: 6 sigma, no misread allowance.
                let own = 6.0 * model.output.sigma[n] * veil_models::compiled::POSITION as f64
                    / model.output.decoding.delta as f64
                    + 0.5;
                assert!(
                    (e - s).abs() <= own,
                    "{name}: {e} vs simulated {s} (bound {own})"
                );
            }
            let (p, q) = (
                spec.decode(&accs).unwrap(),
                model.decode(&sim.accs).unwrap(),
            );
            assert_eq!(p.label, q.label, "{name}");
            for (a, b) in p.outputs.iter().zip(&q.outputs) {
                worst = worst.max((a - b).abs());
            }
        }
        eprintln!(
            "{name}: {rows} encrypted samples, {} bootstraps each; largest output difference \
             from the simulation {worst:.5}",
            model.pbs_per_sample()
        );
    }
}

#[test]
fn wrong_inputs_are_rejected_not_panicking() {
    let (_, model) = compiled("iris_logreg");
    let params = model.params;
    let lwe_size = big_lwe_size(params);
    let client = ClientKey::generate(params);
    let spec = model.client_spec();
    let good = client
        .encrypt(&spec, &[5.1, 3.5, 1.4, 0.2])
        .unwrap()
        .to_bytes();
    // Wrong count for the model, garbage, truncation.
    assert!(EncryptedInput::from_bytes(&good, 5, lwe_size).is_err());
    assert!(EncryptedInput::from_bytes(&good[..good.len() - 3], 4, lwe_size).is_err());
    assert!(EncryptedInput::from_bytes(b"garbage", 4, lwe_size).is_err());
    assert!(EncryptedInput::from_bytes(&good, 4, lwe_size + 1).is_err());
    // A sample with the wrong number of features is refused before encryption.
    assert!(client.encrypt(&spec, &[1.0, 2.0]).is_err());
}

#[test]
fn keys_serialize_and_foreign_keys_are_refused() {
    use veil_models::compiled::ParamSet;
    use veil_runtime::keys::{eval_key_from_bytes, eval_key_to_bytes};
    let params = ParamSet::Message2Carry2KsPbsTuniform2m128;
    let client = ClientKey::generate(params);
    let bytes = eval_key_to_bytes(&client.compressed_server_key());
    let key = eval_key_from_bytes(params, &bytes).unwrap();
    ServerKey::from_compressed(params, &key).unwrap();
    // Truncated and garbage keys give errors.
    assert!(eval_key_from_bytes(params, &bytes[..bytes.len() / 2]).is_err());
    assert!(eval_key_from_bytes(params, b"not a key").is_err());
    assert!(ClientKey::from_bytes(params, b"garbage").is_err());
    // A key for another parameter set fails the conformance check.
    let other = tfhe::ConfigBuilder::with_custom_parameters(
        tfhe::shortint::parameters::v1_8::V1_8_PARAM_MESSAGE_1_CARRY_1_KS_PBS_TUNIFORM_2M128,
    )
    .build();
    let foreign = tfhe::CompressedServerKey::new(&tfhe::ClientKey::generate(other));
    let Err(e) = eval_key_from_bytes(params, &eval_key_to_bytes(&foreign)) else {
        panic!("a key for another parameter set was accepted");
    };
    assert!(e.to_string().contains("not a valid evaluation key"), "{e}");
    // The client key round-trips and decrypts what it encrypted.
    let again = ClientKey::from_bytes(params, &client.to_bytes()).unwrap();
    assert_eq!(again.to_bytes(), client.to_bytes());
}

/// Label-only models under encryption: the one output decrypts to the class index the
/// simulation and the scores model's argmax give, from a response of at most 4 KB.
#[test]
fn label_models_encrypted_give_the_scores_argmax() {
    use veil_models::graph::Reveal;
    use veil_models::{QuantConfig, compile};
    let rows_digits: usize = std::env::var("VEIL_LABEL_SAMPLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12);
    let params = compiled("digits_mlp").1.params;
    let client = ClientKey::generate_with_seed(params, 9);
    let server = ServerKey::from_compressed(params, &client.compressed_server_key()).unwrap();
    let backend = CpuBackend::new(&server);
    let lwe_size = big_lwe_size(params);
    for (name, rows) in [
        ("digits_mlp", rows_digits),
        ("breast_cancer_logreg", 6),
        ("iris_logreg", 6),
    ] {
        let (float, scores) = compiled(name);
        let train = dataset(name, "train.csv", float.n_features());
        let test = dataset(name, "test.csv", float.n_features());
        let label_float = float.with_reveal(Reveal::Label).unwrap();
        let model = compile(&label_float, &train.features, &QuantConfig::default()).unwrap();
        let spec = model.client_spec();
        let xs = &test.features[..rows];
        let inputs: Vec<EncryptedInput> = xs
            .iter()
            .map(|x| client.encrypt(&spec, x).unwrap())
            .collect();
        let outputs = FheModel::new(model.clone())
            .unwrap()
            .evaluate(&backend, &inputs)
            .unwrap();
        let (mut agree, mut argmax) = (0, 0);
        for (x, out) in xs.iter().zip(&outputs) {
            let bytes = out.to_bytes();
            assert!(bytes.len() <= 4096, "{name}: {} bytes", bytes.len());
            let out =
                EncryptedOutput::from_bytes(&bytes, 1, lwe_size, spec.output.modulus_bits).unwrap();
            let accs = client.decrypt(&spec, &out).unwrap();
            // The index decrypts as an integer: the noise is far below half a unit.
            let idx = spec.output.scores(&accs)[0];
            assert!((idx - idx.round()).abs() < 0.25, "{name}: index {idx}");
            let sim = model.simulate(x, None).unwrap();
            let got = spec.decode(&accs).unwrap().label;
            agree += usize::from(got == model.decode(&sim.accs).unwrap().label);
            let want = scores
                .decode(&scores.simulate(x, None).unwrap().accs)
                .unwrap()
                .label;
            argmax += usize::from(got == want);
        }
        eprintln!(
            "{name} (label): {agree}/{rows} encrypted labels equal the simulation's, \
             {argmax}/{rows} the scores model's argmax; {} bytes per response",
            outputs[0].to_bytes().len()
        );
        assert!(agree >= rows - 1, "{name}: {agree}/{rows}");
        assert!(argmax >= rows - 1, "{name}: {argmax}/{rows}");
    }
}
