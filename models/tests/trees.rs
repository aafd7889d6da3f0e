//! Tree ensembles and regressors: import against onnxruntime on every test row, simulated
//! accuracy and R^2 against the float model, and one bootstrap per distinct test.

mod common;

use common::*;
use veil_models::Simulate;
use veil_models::eval::{accuracy, regression_metrics};
use veil_models::graph::{Activation, Task, UFn};

pub const TREE_ZOO: [&str; 5] = [
    "breast_cancer_xgb",
    "wine_rf",
    "iris_lgbm",
    "diabetes_linear",
    "diabetes_gbr",
];

fn is_regressor(name: &str) -> bool {
    reference(name)["task"] == "regression"
}

#[test]
fn tree_and_regression_models_match_onnxruntime_on_every_test_row() {
    for name in TREE_ZOO {
        let reference = reference(name);
        let model = float_model(name);
        let test = dataset(name, "test.csv", model.n_features());
        if is_regressor(name) {
            assert_eq!(model.task, Task::Regression, "{name}");
            let want: Vec<f64> = serde_json::from_value(reference["predictions"].clone()).unwrap();
            assert_eq!(want.len(), test.len());
            for (i, (x, w)) in test.features.iter().zip(&want).enumerate() {
                let got = model.outputs(x);
                assert_eq!(got.len(), 1, "{name}");
                // onnxruntime sums in single precision
                assert!(
                    (got[0] - w).abs() < 1e-4 * (1.0 + w.abs()),
                    "{name} row {i}: {} vs onnxruntime {w}",
                    got[0]
                );
            }
        } else {
            assert_eq!(model.task, Task::Classification, "{name}");
            let want: Vec<Vec<f64>> = serde_json::from_value(reference["scores"].clone()).unwrap();
            let labels: Vec<i64> = serde_json::from_value(reference["labels"].clone()).unwrap();
            assert_eq!(want.len(), test.len());
            for (i, x) in test.features.iter().enumerate() {
                let got = model.outputs(x);
                assert_eq!(got.len(), want[i].len(), "{name} row {i}");
                for (g, w) in got.iter().zip(&want[i]) {
                    assert!(
                        (g - w).abs() < 1e-5 * (1.0 + w.abs()),
                        "{name} row {i}: {got:?} vs onnxruntime {:?}",
                        want[i]
                    );
                }
                assert_eq!(model.predict(x).unwrap().label, labels[i], "{name} row {i}");
            }
        }
    }
}

#[test]
fn simulated_accuracy_and_r2_stay_close_to_float() {
    for name in TREE_ZOO {
        let (float, model) = compiled(name);
        let test = dataset(name, "test.csv", float.n_features());
        let reference = reference(name);
        let sims: Vec<_> = test
            .features
            .iter()
            .map(|x| model.simulate(x, None).unwrap())
            .collect();
        assert!(sims.iter().all(|s| s.overflows == 0), "{name}: overflow");
        let exact: Vec<_> = sims
            .iter()
            .map(|s| model.decode(&s.accs).unwrap())
            .collect();
        let noisy = model.simulate_predictions(&test.features, Some(3)).unwrap();
        if is_regressor(name) {
            let truth = test.targets.clone().unwrap();
            let float_r2 = reference["r2"].as_f64().unwrap();
            for (what, p) in [("exact", &exact), ("noisy", &noisy)] {
                let pred: Vec<Vec<f64>> = p.iter().map(|p| p.outputs.clone()).collect();
                let r2 = regression_metrics(&pred, &truth).r2;
                assert!(
                    (r2 - float_r2).abs() <= 0.03,
                    "{name}: {what} simulated R^2 {r2:.4} vs float {float_r2:.4}"
                );
            }
        } else {
            let labels = test.labels.clone().unwrap();
            let float_acc = reference["onnxruntime_accuracy"].as_f64().unwrap();
            let slack = 0.015f64.max(1.0 / labels.len() as f64) + 1e-9;
            for (what, p) in [("exact", &exact), ("noisy", &noisy)] {
                let pred: Vec<i64> = p.iter().map(|p| p.label).collect();
                let acc = accuracy(&pred, &labels);
                assert!(
                    acc >= float_acc - slack,
                    "{name}: {what} simulated accuracy {acc:.4} vs float {float_acc:.4}"
                );
            }
        }
    }
}

/// The tests of an ensemble cost one bootstrap each however many trees ask them, and leaf
/// values cost fewer bootstraps than there are leaves.
#[test]
fn each_distinct_test_is_one_bootstrap() {
    for name in ["breast_cancer_xgb", "wine_rf", "iris_lgbm", "diabetes_gbr"] {
        let stats = &reference(name)["tree_ensemble"];
        let distinct = stats["distinct_comparisons"].as_u64().unwrap() as usize;
        let leaves = stats["leaves"].as_u64().unwrap() as usize;
        let internal = stats["internal_nodes"].as_u64().unwrap() as usize;
        let float = float_model(name);
        let tests = float
            .lookups
            .iter()
            .filter(|l| matches!(&*l.func, UFn::Act(Activation::Compare { .. }, _)))
            .count();
        assert_eq!(tests, distinct, "{name}: one lookup per distinct test");
        assert!(distinct <= internal, "{name}");
        let (_, model) = compiled(name);
        let leaf_lookups = model.pbs_per_sample() - distinct;
        assert!(
            leaf_lookups < leaves,
            "{name}: {leaf_lookups} leaf lookups for {leaves} leaves"
        );
        // Every test and leaf table reads exactly: 128 positions or more between values.
        for st in &model.stages {
            for n in 0..st.len() {
                // The row's weights are k times small integers that include 1 (a code bit or a
                // window), so their gcd is the multiplier k.
                let k = st.weights.rows[n]
                    .iter()
                    .fold(0i64, |g, &(_, w)| gcd(g, w.abs())) as f64;
                let spacing = k * st.delta_in[n] as f64 / veil_models::compiled::POSITION as f64;
                assert!(
                    spacing >= 120.0,
                    "{name}: values {spacing:.0} positions apart"
                );
            }
        }
    }
}

/// Features wider than one exact read reach their tests through windows of their grid, and a
/// model sends every window of each feature it tests (so they reveal no threshold).
#[test]
fn tested_features_are_sent_as_every_window_of_their_grid() {
    let (float, model) = compiled("breast_cancer_xgb");
    let tested: std::collections::BTreeSet<u32> =
        model.input.windows.iter().map(|w| w.feature).collect();
    assert!(!tested.is_empty());
    for f in &tested {
        let max_q = model.input.quant[*f as usize].max_q;
        let offsets: Vec<i64> = model
            .input
            .windows
            .iter()
            .filter(|w| w.feature == *f)
            .map(|w| w.offset)
            .collect();
        let cover: Vec<i64> = veil_models::compiled::InputWindow::cover(*f, max_q)
            .map(|w| w.offset)
            .collect();
        assert_eq!(offsets, cover, "feature {f}");
        assert!(*offsets.last().unwrap() + 15 >= max_q);
    }
    // The client's values: the features, then each window's clamp of its feature.
    let test = dataset("breast_cancer_xgb", "test.csv", float.n_features());
    let q = model.input.quantize(&test.features[0]).unwrap();
    assert_eq!(q.len(), model.n_inputs());
    for (i, w) in model.input.windows.iter().enumerate() {
        let v = q[model.n_features() + i];
        assert_eq!(v, (q[w.feature as usize] - w.offset).clamp(0, 15));
    }
}

fn gcd(a: i64, b: i64) -> i64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// The hand-written tree fixtures (every branch rule, AVERAGE, base values, onnxruntime's
/// binary cases, SOFTMAX_ZERO, PROBIT, string labels, a path deeper than one exact read,
/// tensor attributes) compile, and their quantized simulation equals onnxruntime's outputs:
/// their samples lie on a quarter grid with thresholds between grid values, so only the leaf
/// values' 12-bit grid separates the two.
#[test]
fn tree_fixtures_simulate_exactly() {
    let dir = zoo_dir("fixtures");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        if !name.starts_with("tree_") || path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        n += 1;
        let spec: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let inputs: Vec<Vec<f64>> = serde_json::from_value(spec["inputs"].clone()).unwrap();
        let outputs: Vec<Vec<f64>> = serde_json::from_value(spec["outputs"].clone()).unwrap();
        let float = veil_models::onnx::import_file(&path.with_extension("onnx")).unwrap();
        let model = veil_models::compile(&float, &inputs, &veil_models::QuantConfig::default())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        for (x, want) in inputs.iter().zip(&outputs) {
            let sim = model.simulate(x, None).unwrap();
            assert_eq!(sim.overflows, 0, "{name}");
            let got = model.decode(&sim.accs).unwrap().outputs;
            for (g, w) in got.iter().zip(want) {
                assert!(
                    (g - w).abs() < 5e-3 * (1.0 + w.abs()),
                    "{name}: simulated {got:?} vs onnxruntime {want:?}"
                );
            }
        }
    }
    assert!(n >= 6, "tree fixtures missing");
}

/// Classifiers whose onnxruntime outputs follow a per-sample rule Veil does not reproduce (a
/// class weighted on only some leaves, one PROBIT score) or that make no sense (one label) are
/// refused with the node named, never a panic.
#[test]
fn refused_tree_fixtures_name_the_node_and_the_reason() {
    let dir = zoo_dir("fixtures").join("refused");
    let cases = [
        (
            "tree_clf_one_label",
            "1 class label; a classifier needs two or more",
        ),
        (
            "tree_clf_partial_class1",
            "class 1 is weighted by the leaves some samples reach",
        ),
        (
            "tree_clf_partial0_base",
            "class 0 weighted by the leaves some samples reach",
        ),
        ("tree_clf_binary_probit", "PROBIT on one binary score"),
    ];
    for (name, reason) in cases {
        let err = veil_models::onnx::import_file(&dir.join(format!("{name}.onnx")))
            .err()
            .unwrap_or_else(|| panic!("{name}: imported"));
        match &err {
            veil_models::ModelError::Unsupported { node, .. } => {
                assert_eq!(node, "n0_TreeEnsembleClassifier", "{name}: {err}")
            }
            other => panic!("{name}: {other}"),
        }
        assert!(err.to_string().contains(reason), "{name}: {err}");
    }
}

/// A tree test on a computed value is read exactly or refused, naming the tree: a unit-weight
/// projection of 2-bit integer inputs (sums of 7 levels) simulates exactly what onnxruntime
/// computes; at 8 bits (511 levels), with random weights, or on a ReLU's output (an 8-bit
/// grid) no exact read fits, and none is made approximately.
#[test]
fn tree_tests_on_computed_values_are_exact_or_refused() {
    let load = |name: &str| {
        let path = zoo_dir("fixtures").join(format!("{name}.onnx"));
        let spec: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path.with_extension("json")).unwrap())
                .unwrap();
        let inputs: Vec<Vec<f64>> = serde_json::from_value(spec["inputs"].clone()).unwrap();
        let outputs: Vec<Vec<f64>> = serde_json::from_value(spec["outputs"].clone()).unwrap();
        (
            veil_models::onnx::import_file(&path).unwrap(),
            inputs,
            outputs,
        )
    };
    let tree = "n9_TreeEnsembleRegressor";

    let (float, inputs, outputs) = load("proj_tree_unit");
    let two_bits = veil_models::QuantConfig {
        input_bits: 2,
        ..Default::default()
    };
    let model = veil_models::compile(&float, &inputs, &two_bits).unwrap();
    let cost = model.nodes.iter().find(|n| n.node == tree).unwrap();
    assert!(
        cost.exact_reads > 0 && cost.approximate_reads == 0,
        "{cost:?}"
    );
    for (x, want) in inputs.iter().zip(&outputs) {
        let sim = model.simulate(x, None).unwrap();
        assert_eq!(sim.overflows, 0);
        let got = model.decode(&sim.accs).unwrap().outputs;
        // A test read wrongly moves the output by a leaf difference (0.5 or more).
        assert!(
            (got[0] - want[0]).abs() < 5e-3,
            "x {x:?}: simulated {got:?} vs onnxruntime {want:?}"
        );
    }

    let refused = [
        ("proj_tree_unit", "511 integer levels"),
        ("proj_tree_random", "not integer multiples of one unit"),
        ("relu_tree", "integer levels"),
    ];
    for (name, reason) in refused {
        let (float, inputs, _) = load(name);
        let err = veil_models::compile(&float, &inputs, &Default::default())
            .err()
            .unwrap_or_else(|| panic!("{name}: compiled"))
            .to_string();
        assert!(
            err.contains(&format!("node '{tree}'")) && err.contains(reason),
            "{name}: {err}"
        );
    }
}
