//! One small ONNX graph per op attribute (Conv padding, strides, dilations, groups, SAME
//! padding, 1-D convolution, pooling with `ceil_mode` and `count_include_pad`, MaxPool,
//! residual and branching graphs, re-indexing ops, element-wise functions, tree ensembles),
//! each checked against the outputs onnxruntime computed when `models/training/make_fixtures.py`
//! wrote it.

mod common;

use veil_models::onnx;

#[test]
fn every_fixture_imports_and_matches_onnxruntime() {
    let dir = common::zoo_dir("fixtures");
    let mut cases: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    cases.sort();
    assert!(cases.len() >= 30, "fixtures missing from {}", dir.display());
    for case in &cases {
        let name = case.file_stem().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(case).unwrap();
        let spec: serde_json::Value = serde_json::from_str(&text).unwrap();
        let model = onnx::import_file(&case.with_extension("onnx"))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let shape: Vec<usize> = serde_json::from_value(spec["input_shape"].clone()).unwrap();
        assert_eq!(model.input_shape, shape, "{name}: input shape");
        let inputs: Vec<Vec<f64>> = serde_json::from_value(spec["inputs"].clone()).unwrap();
        let outputs: Vec<Vec<f64>> = serde_json::from_value(spec["outputs"].clone()).unwrap();
        assert!(!inputs.is_empty());
        for (i, (x, want)) in inputs.iter().zip(&outputs).enumerate() {
            let got = model.outputs(x);
            assert_eq!(got.len(), want.len(), "{name} sample {i}: output count");
            for (g, w) in got.iter().zip(want) {
                assert!(
                    (g - w).abs() < 1e-4 * (1.0 + w.abs()),
                    "{name} sample {i}: {got:?}\n vs onnxruntime {want:?}"
                );
            }
        }
    }
}
