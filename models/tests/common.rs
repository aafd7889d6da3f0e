//! Shared helpers: the shipped model zoo and its recorded onnxruntime references.
#![allow(dead_code)]

use std::path::PathBuf;

use veil_models::data::{Dataset, Labels, read_csv};
use veil_models::{CompiledModel, FloatModel, QuantConfig, compile, onnx};

pub const ZOO: [&str; 13] = [
    "digits_mlp",
    "digits_cnn",
    "breast_cancer_logreg",
    "iris_logreg",
    "wine_mlp",
    "digits_maxpool_cnn",
    "digits_resmlp",
    "digits_qdq_mlp",
    "digits_qdq_cnn",
    "digits_torch_mlp",
    "digits_torch_cnn",
    "digits_torch_conv1d",
    "digits_torch_lngelu",
];

pub fn zoo_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("zoo")
        .join(name)
}

pub fn reference(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(zoo_dir(name).join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

pub fn float_model(name: &str) -> FloatModel {
    onnx::import_file(&zoo_dir(name).join("model.onnx")).unwrap()
}

pub fn dataset(name: &str, file: &str, n_features: usize) -> Dataset {
    read_csv(&zoo_dir(name).join(file), n_features, Labels::Required).unwrap()
}

pub fn compiled(name: &str) -> (FloatModel, CompiledModel) {
    let float = float_model(name);
    let train = dataset(name, "train.csv", float.n_features());
    let model = compile(&float, &train.features, &QuantConfig::default()).unwrap();
    (float, model)
}
