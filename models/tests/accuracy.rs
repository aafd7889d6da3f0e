//! Quantization and simulation: accuracy against onnxruntime's float accuracy.

mod common;

use common::*;
use veil_models::CompiledModel;
use veil_models::Simulate;
use veil_models::eval::accuracy;
use veil_models::simulate::NoiseRng;

#[test]
fn simulated_accuracy_is_within_1_5_points_of_float() {
    for name in ZOO {
        let (float, model) = compiled(name);
        let test = dataset(name, "test.csv", float.n_features());
        let labels = test.labels.clone().unwrap();
        let float_acc = reference(name)["onnxruntime_accuracy"].as_f64().unwrap();
        let own_float: Vec<i64> = test
            .features
            .iter()
            .map(|x| float.predict(x).unwrap().label)
            .collect();
        assert!(
            (accuracy(&own_float, &labels) - float_acc).abs() < 1e-9,
            "{name}: the imported float model must reproduce onnxruntime's accuracy"
        );
        let sims: Vec<_> = test
            .features
            .iter()
            .map(|x| model.simulate(x, None).unwrap())
            .collect();
        assert!(
            sims.iter().all(|s| s.overflows == 0),
            "{name}: overflow on the test set"
        );
        let sim: Vec<i64> = sims
            .iter()
            .map(|s| model.decode(&s.accs).unwrap().label)
            .collect();
        let sim_acc = accuracy(&sim, &labels);
        assert!(
            sim_acc >= float_acc - 0.015,
            "{name}: simulated {sim_acc:.4} vs float {float_acc:.4}"
        );
        // With the predicted bootstrap noise the accuracy stays close too.
        let mut rng = NoiseRng::new(7);
        let noisy: Vec<i64> = test
            .features
            .iter()
            .map(|x| {
                model
                    .decode(&model.simulate(x, Some(&mut rng)).unwrap().accs)
                    .unwrap()
                    .label
            })
            .collect();
        let noisy_acc = accuracy(&noisy, &labels);
        eprintln!(
            "{name}: onnxruntime {float_acc:.4}, simulated {sim_acc:.4}, with predicted noise \
             {noisy_acc:.4}, {} bootstraps per sample",
            model.pbs_per_sample()
        );
        assert!(
            noisy_acc >= float_acc - 0.025,
            "{name}: noisy simulation {noisy_acc:.4} vs float {float_acc:.4}"
        );
    }
}

#[test]
fn quantization_records_scales_and_plans_one_bootstrap_per_hidden_neuron() {
    let (float, model) = compiled("digits_mlp");
    assert_eq!(model.pbs_per_sample(), 32);
    assert_eq!(model.n_features(), 64);
    assert_eq!(model.n_outputs(), 10);
    let cfg = model.config;
    for q in &model.input.quant {
        assert!(q.scale > 0.0 && q.max_q == (1 << cfg.input_bits) - 1);
    }
    let first_max = (1i64 << (cfg.first_weight_bits - 1)) - 1;
    let h = &model.stages[0];
    // Weights are integers of the configured width (times the per-neuron range multiplier).
    for row in &h.weights.rows {
        let k_times_max = row.iter().map(|&(_, w)| w.abs()).max().unwrap();
        let g = row.iter().fold(0i64, |g, &(_, w)| gcd(g, w.abs()));
        assert!(
            k_times_max / g <= first_max,
            "weights wider than {} bits",
            cfg.first_weight_bits
        );
    }
    // Every lookup table's outputs are valid activation codes.
    let act_max = (1u16 << cfg.act_bits) - 1;
    assert!(h.lut.iter().all(|&v| v <= act_max));
    // Deterministic: compiling twice gives the same bytes.
    let train = dataset("digits_mlp", "train.csv", float.n_features());
    let again = veil_models::compile(&float, &train.features, &cfg).unwrap();
    assert_eq!(model.to_bytes(), again.to_bytes());
}

fn gcd(a: i64, b: i64) -> i64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[test]
fn compiled_model_file_round_trips_and_rejects_damage() {
    let (_, model) = compiled("wine_mlp");
    let bytes = model.to_bytes();
    assert_eq!(CompiledModel::from_bytes(&bytes).unwrap(), model);
    // Truncated anywhere: a clear error, never a panic.
    for cut in [0, 5, 11, 12, 100, bytes.len() / 2, bytes.len() - 1] {
        let e = CompiledModel::from_bytes(&bytes[..cut]).unwrap_err();
        assert!(e.to_string().contains("invalid compiled model"), "{e}");
    }
    let mut wrong_version = bytes.clone();
    wrong_version[8] = 99;
    let e = CompiledModel::from_bytes(&wrong_version)
        .unwrap_err()
        .to_string();
    assert!(e.contains("format version 99"), "{e}");
    // A body that decodes but is inconsistent is caught by validation.
    let mut broken = model.clone();
    broken.stages[0].lut.pop();
    let e = CompiledModel::from_bytes(&broken.to_bytes())
        .unwrap_err()
        .to_string();
    assert!(e.contains("wrong length"), "{e}");
    // A neuron naming a table past the stage's last one.
    let mut broken = model.clone();
    let tables = broken.stages[0].lut.len() / 2048;
    broken.stages[0].lut_index[0] = tables as u32;
    let e = CompiledModel::from_bytes(&broken.to_bytes())
        .unwrap_err()
        .to_string();
    assert!(e.contains("wrong length"), "{e}");
    // Identical tables are stored once and still read back per neuron.
    let st = &model.stages[0];
    assert_eq!(st.lut_index.len(), st.len());
    assert!(st.lut.len() <= st.len() * 2048);
    for n in 0..st.len() {
        assert_eq!(st.lut_of(n).len(), 2048);
    }
}
