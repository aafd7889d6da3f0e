//! Label-only output on synthetic linear classifiers: the bracket argmax reads every value
//! exactly after the one read of each score onto the label grid, for up to 100 classes.

use std::sync::Arc;

use veil_models::fhe::{ClientKey, CpuBackend, FheModel, ServerKey};
use veil_models::graph::{Activation, LABEL_LEVELS, Lin, Reveal, Task, UFn};
use veil_models::quantize::label_grid;
use veil_models::simulate::NoiseRng;
use veil_models::{CompiledModel, FloatModel, ModelError, QuantConfig, compile};

const FEATURES: usize = 12;

/// `K` scores `W x + b`, weights and biases from a seeded Gaussian.
fn linear_model(k: usize, seed: u64) -> FloatModel {
    let mut rng = NoiseRng::new(seed);
    let outputs = (0..k)
        .map(|_| {
            let w: Vec<Lin> = (0..FEATURES as u32).map(Lin::atom).collect();
            let parts: Vec<(f64, &Lin)> = w.iter().map(|l| (rng.gaussian(), l)).collect();
            Lin::combine(parts, 0.3 * rng.gaussian())
        })
        .collect();
    FloatModel {
        input_shape: vec![FEATURES],
        input_grids: vec![None; FEATURES],
        lookups: vec![],
        outputs,
        tail: vec![],
        class_labels: None,
        task: Task::Classification,
        reveal: Reveal::Scores,
    }
}

fn rows(n: usize, seed: u64) -> Vec<Vec<f64>> {
    let mut rng = NoiseRng::new(seed);
    (0..n)
        .map(|_| (0..FEATURES).map(|_| rng.gaussian()).collect())
        .collect()
}

fn cfg(bits: u32) -> QuantConfig {
    QuantConfig {
        weight_bits: bits,
        first_weight_bits: bits,
        search: false,
        ..QuantConfig::default()
    }
}

/// First index of the largest value: the client's argmax.
fn argmax<T: PartialOrd + Copy>(v: &[T]) -> usize {
    (0..v.len()).fold(0, |b, i| if v[i] > v[b] { i } else { b })
}

fn label_of(model: &CompiledModel, x: &[f64]) -> i64 {
    model
        .decode(&model.simulate(x, None).unwrap().accs)
        .unwrap()
        .label
}

/// The simulated label is the argmax of the quantized scores (the K grid reads of the first
/// stage) on every sample, and the float argmax wherever the float scores' top two differ by
/// more than the grid's rounding; every K compiles with every argmax read exact.
#[test]
fn label_is_the_argmax_of_the_quantized_scores() {
    for k in [2usize, 10, 17, 33, 100] {
        let float = linear_model(k, k as u64);
        let calibration = rows(400, 1);
        let test = rows(300, 2);
        let label_float = float.clone().with_reveal(Reveal::Label).unwrap();
        // The grid the quantizer derives: top scores' range with the margin.
        let tops: Vec<f64> = calibration
            .iter()
            .map(|x| float.scores(x).into_iter().fold(f64::MIN, f64::max))
            .collect();
        let (lo, hi) = tops
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), &t| (a.min(t), b.max(t)));
        for bits in [4u32, 8] {
            let model = compile(&label_float, &calibration, &cfg(bits)).unwrap();
            let grid = label_grid(lo, hi, cfg(bits).range_margin);
            assert_eq!(model.n_outputs(), 1);
            assert_eq!(model.stages[0].len(), k, "K = {k}: one grid read per score");
            let n_in = model.n_inputs();
            let (mut decisive, mut float_agree) = (0, 0);
            for x in &test {
                let values = model.simulate_values(x).unwrap();
                let levels = &values[n_in..n_in + k];
                assert_eq!(model.simulate(x, None).unwrap().overflows, 0, "K = {k}");
                assert!(levels.iter().all(|&l| (0..LABEL_LEVELS).contains(&l)));
                let got = label_of(&model, x);
                assert_eq!(
                    got,
                    argmax(levels) as i64,
                    "K = {k}, {bits} bits: {levels:?}"
                );
                assert_eq!(
                    label_float.predict(x).unwrap().label,
                    float.predict(x).unwrap().label,
                    "K = {k}: the float label graph is the float argmax"
                );
                let s = float.scores(x);
                let best = argmax(&s);
                let second = (0..k)
                    .filter(|&i| i != best)
                    .map(|i| s[i])
                    .fold(f64::MIN, f64::max);
                // Each score rounds by half a level (the form's own weight rounding adds
                // a little): a gap over 1.5 levels survives, inside the grid.
                if s[best] - second > 1.5 * grid.scale && grid.quantize(s[best]) < LABEL_LEVELS - 1
                {
                    decisive += 1;
                    float_agree += usize::from(got == best as i64);
                }
            }
            eprintln!(
                "K = {k}, {bits}-bit weights: {} bootstraps ({} argmax), label = float argmax on \
                 {float_agree}/{decisive} decisive samples of {}",
                model.pbs_per_sample(),
                model.nodes.iter().map(|n| n.pbs).sum::<usize>(),
                test.len()
            );
            assert_eq!(float_agree, decisive, "K = {k}, {bits} bits");
            assert!(decisive > 0, "K = {k}: some samples are decisive");
        }
    }
}

/// The decoder refuses what is not a class: a failed check (the output moved by the check's
/// weight `2^n`), a value off the integers, an index past the classes; never class 0.
#[test]
fn inconsistent_label_outputs_are_errors() {
    let k = 10;
    let float = linear_model(k, 3);
    let calibration = rows(200, 4);
    let label = float.with_reveal(Reveal::Label).unwrap();
    let model = compile(&label, &calibration, &cfg(8)).unwrap();
    let spec = model.client_spec();
    let check_weight = 16.0; // 2^4 index bits for 10 classes
    for x in &rows(20, 5) {
        let accs = model.simulate(x, None).unwrap().accs;
        let idx = spec.decode(&accs).unwrap().label as f64;
        for bad in [
            accs[0] + check_weight,
            accs[0] - check_weight,
            accs[0] + 0.5,
        ] {
            match spec.decode(&[bad]) {
                Err(ModelError::InconsistentLabel { .. }) => {}
                other => panic!("{bad} (class {idx}) decoded to {other:?}"),
            }
        }
    }
    // Two final comparisons that disagree (the second holds whatever the scores, as a
    // misread would) decode to an error, not to a class.
    let mut tie = linear_model(2, 6).with_reveal(Reveal::Label).unwrap();
    // The final check read, before the copies of the one bit and of the check.
    let last = tie.lookups.len() - 3;
    tie.lookups[last].func = Arc::new(UFn::Act(
        Activation::Compare {
            rule: veil_models::graph::Rule::Geq,
            threshold: -1e9,
        },
        Arc::new(UFn::X),
    ));
    let x = rows(50, 7)
        .into_iter()
        .find(|x| {
            let s = linear_model(2, 6).scores(x);
            s[1] > s[0]
        })
        .unwrap();
    assert!(
        matches!(tie.predict(&x), Err(ModelError::InconsistentLabel { .. })),
        "{:?}",
        tie.predict(&x)
    );
}

/// A 100-class label model under real 128-bit keys: its encrypted label equals the
/// simulated argmax on 20 samples.
#[test]
fn encrypted_100_class_label_equals_the_simulation() {
    let k = 100;
    let float = linear_model(k, 100);
    let calibration = rows(400, 1);
    let model = compile(
        &float.with_reveal(Reveal::Label).unwrap(),
        &calibration,
        &cfg(8),
    )
    .unwrap();
    let spec = model.client_spec();
    let client = ClientKey::generate_with_seed(model.params, 21);
    let server = ServerKey::from_compressed(model.params, &client.compressed_server_key()).unwrap();
    let backend = CpuBackend::new(&server);
    let xs = rows(20, 8);
    let inputs: Vec<_> = xs
        .iter()
        .map(|x| client.encrypt(&spec, x).unwrap())
        .collect();
    let fhe = FheModel::new(model.clone()).unwrap();
    let outputs = fhe.evaluate(&backend, &inputs).unwrap();
    let mut agree = 0;
    for (x, out) in xs.iter().zip(&outputs) {
        let accs = client.decrypt(&spec, out).unwrap();
        let got = spec.decode(&accs).unwrap().label;
        let want = label_of(&model, x);
        agree += usize::from(got == want);
    }
    eprintln!(
        "K = 100: {} bootstraps per sample; encrypted label = simulated on {agree}/{}",
        model.pbs_per_sample(),
        xs.len()
    );
    assert_eq!(agree, xs.len());
}
