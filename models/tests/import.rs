//! Import of every shipped model, checked against onnxruntime's outputs recorded at export.

mod common;

use common::*;

#[test]
fn every_shipped_model_imports_and_matches_onnxruntime() {
    for name in ZOO {
        let reference = reference(name);
        let model = float_model(name);
        let shape: Vec<usize> = serde_json::from_value(reference["input_shape"].clone()).unwrap();
        assert_eq!(model.input_shape, shape, "{name}: input shape");
        let n_classes = reference["n_classes"].as_u64().unwrap() as usize;
        let test = dataset(name, "test.csv", model.n_features());
        let expected: Vec<Vec<f64>> =
            serde_json::from_value(reference["first_scores"].clone()).unwrap();
        let labels: Vec<i64> = serde_json::from_value(reference["first_labels"].clone()).unwrap();
        for (i, want) in expected.iter().enumerate() {
            let got = model.outputs(&test.features[i]);
            assert_eq!(got.len(), n_classes, "{name}: outputs of row {i}");
            for (g, w) in got.iter().zip(want) {
                assert!(
                    (g - w).abs() < 1e-4 * (1.0 + w.abs()),
                    "{name} row {i}: {got:?} vs onnxruntime {want:?}"
                );
            }
            assert_eq!(
                model.predict(&test.features[i]).unwrap().label,
                labels[i],
                "{name} row {i}"
            );
        }
    }
}

#[test]
fn shipped_models_have_the_expected_structure() {
    // One lookup per hidden neuron; linear ops compose into the forms around them.
    let mlp = float_model("digits_mlp");
    assert_eq!(
        (mlp.lookups.len(), mlp.n_features(), mlp.n_scores()),
        (32, 64, 10)
    );
    let cnn = float_model("digits_cnn");
    // Conv -> ReLU -> (AveragePool, Reshape, Gemm composed into one linear form per score)
    assert_eq!(cnn.lookups.len(), 4 * 6 * 6);
    assert!(cnn.lookups.iter().all(|l| l.input.terms.len() <= 9));
    assert!(
        cnn.outputs
            .iter()
            .all(|o| o.terms.iter().all(|t| t.0 >= 64))
    );
    // Scaler + LinearClassifier compose into one linear form; the tail is clear-text.
    let lr = float_model("breast_cancer_logreg");
    assert!(lr.lookups.is_empty());
    let wine = float_model("wine_mlp");
    assert_eq!(wine.lookups.len(), 16);
}

/// The CIFAR-size VGG (3x32x32, five 3x3 convolutions, average pools): one lookup per ReLU,
/// in five stages; each pool folds into the next layer's weights; the float model gives
/// onnxruntime's scores.
#[test]
fn cifar_size_cnn_imports_with_one_lookup_per_relu() {
    let name = "cifar_vgg";
    let model = float_model(name);
    assert_eq!(model.input_shape, vec![3, 32, 32]);
    assert_eq!(model.lookups.len(), 53_248);
    let stages = model.stages();
    let nf = model.n_features();
    let mut per_stage = [0usize; 6];
    for s in &stages[nf..] {
        per_stage[*s] += 1;
    }
    assert_eq!(per_stage, [0, 16_384, 16_384, 8_192, 8_192, 4_096]);
    // A convolution after a 2x2 average pool reads 4 pixels per tap: conv5, 32 x 3 x 3 x 4.
    let widest = model
        .lookups
        .iter()
        .map(|l| l.input.terms.len())
        .max()
        .unwrap();
    assert_eq!(widest, 32 * 9 * 4, "conv5 reads 32 channels through a pool");
    let reference = reference(name);
    let test = dataset(name, "test.csv", nf);
    let expected: Vec<Vec<f64>> =
        serde_json::from_value(reference["first_scores"].clone()).unwrap();
    for (i, want) in expected.iter().enumerate().take(4) {
        let got = model.outputs(&test.features[i]);
        for (g, w) in got.iter().zip(want) {
            assert!(
                (g - w).abs() < 1e-4 * (1.0 + w.abs()),
                "row {i}: {got:?} vs onnxruntime {want:?}"
            );
        }
    }
}
