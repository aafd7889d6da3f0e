//! Bad input gets a clear error naming what is wrong, never a panic.

mod common;

use common::*;
use prost::Message;
use veil_format::FormatError;
use veil_models::ModelError;
use veil_models::Simulate;
use veil_models::data::{Labels, parse_csv};
use veil_models::onnx::{self, pb};

fn tensor(name: &str, dims: &[i64], data: &[f32]) -> pb::TensorProto {
    pb::TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: 1,
        float_data: data.to_vec(),
        ..Default::default()
    }
}

fn node(op: &str, inputs: &[&str], output: &str) -> pb::NodeProto {
    pb::NodeProto {
        op_type: op.into(),
        name: format!("{op}_node"),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        ..Default::default()
    }
}

fn input(name: &str, dims: &[i64]) -> pb::ValueInfoProto {
    use pb::tensor_shape_proto::{Dimension, dimension::Value};
    pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: 1,
                shape: Some(pb::TensorShapeProto {
                    dim: std::iter::once(Value::DimParam("N".into()))
                        .chain(dims.iter().map(|&d| Value::DimValue(d)))
                        .map(|v| Dimension { value: Some(v) })
                        .collect(),
                }),
            })),
        }),
    }
}

fn model(
    nodes: Vec<pb::NodeProto>,
    inits: Vec<pb::TensorProto>,
    in_dims: &[i64],
    out: &str,
) -> Vec<u8> {
    pb::ModelProto {
        ir_version: 8,
        opset_import: vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: 13,
        }],
        graph: Some(pb::GraphProto {
            node: nodes,
            initializer: inits,
            input: vec![input("x", in_dims)],
            output: vec![pb::ValueInfoProto {
                name: out.into(),
                r#type: None,
            }],
            name: "g".into(),
        }),
        ..Default::default()
    }
    .encode_to_vec()
}

#[test]
fn unsupported_op_names_the_node_and_lists_what_is_supported() {
    let bytes = model(
        vec![node("Gemm", &["x", "w"], "h"), node("Hardmax", &["h"], "y")],
        vec![tensor("w", &[2, 2], &[1.0, 0.0, 0.0, 1.0])],
        &[2],
        "y",
    );
    let err = onnx::import_bytes(&bytes).unwrap_err();
    assert!(matches!(err, ModelError::Unsupported { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains("Hardmax_node") && msg.contains("op Hardmax"),
        "{msg}"
    );
    assert!(msg.contains("Gemm, MatMul"), "{msg}");
}

#[test]
fn every_unsupported_node_is_reported_at_once() {
    let bytes = model(
        vec![
            node("Gemm", &["x", "w"], "h"),
            node("Hardmax", &["h"], "e"),
            node("LpNormalization", &["e"], "y"),
        ],
        vec![tensor("w", &[2, 2], &[1.0, 0.0, 0.0, 1.0])],
        &[2],
        "y",
    );
    let msg = onnx::import_bytes(&bytes).unwrap_err().to_string();
    assert!(
        msg.contains("op Hardmax") && msg.contains("op LpNormalization") && msg.contains("1 more"),
        "{msg}"
    );
}

#[test]
fn unsupported_attribute_is_named() {
    let mut gemm = node("Gemm", &["x", "w"], "y");
    gemm.attribute.push(pb::AttributeProto {
        name: "transA".into(),
        r#type: 2,
        i: 1,
        ..Default::default()
    });
    let bytes = model(vec![gemm], vec![tensor("w", &[2, 1], &[1.0; 2])], &[2], "y");
    let msg = onnx::import_bytes(&bytes).unwrap_err().to_string();
    assert!(msg.contains("Gemm") && msg.contains("transA=1"), "{msg}");
}

#[test]
fn truncated_or_foreign_files_give_clear_errors() {
    let bytes = std::fs::read(zoo_dir("digits_cnn").join("model.onnx")).unwrap();
    for cut in [1, 10, bytes.len() / 3, bytes.len() / 2, bytes.len() - 7] {
        let err = onnx::import_bytes(&bytes[..cut]).unwrap_err();
        assert!(
            matches!(err, ModelError::InvalidOnnx(_)),
            "truncated at {cut}: {err}"
        );
    }
    let err = onnx::import_bytes(b"this is not an onnx model").unwrap_err();
    assert!(
        err.to_string().starts_with("not a valid ONNX model"),
        "{err}"
    );
    let err = onnx::import_bytes(&[]).unwrap_err();
    assert!(err.to_string().contains("no graph"), "{err}");
}

#[test]
fn batch_norm_folds_into_the_linear_layer() {
    // Gemm (2 -> 2) -> BatchNormalization -> Relu -> Gemm (2 -> 1)
    let bytes = model(
        vec![
            node("Gemm", &["x", "w1", "b1"], "h"),
            node("BatchNormalization", &["h", "s", "bb", "m", "v"], "n"),
            node("Relu", &["n"], "r"),
            node("Gemm", &["r", "w2"], "y"),
        ],
        vec![
            tensor("w1", &[2, 2], &[1.0, 2.0, -1.0, 0.5]),
            tensor("b1", &[2], &[0.1, -0.2]),
            tensor("s", &[2], &[2.0, 0.5]),
            tensor("bb", &[2], &[0.3, 0.0]),
            tensor("m", &[2], &[1.0, -1.0]),
            tensor("v", &[2], &[4.0, 0.25]),
            tensor("w2", &[2, 1], &[1.0, -3.0]),
        ],
        &[2],
        "y",
    );
    let m = onnx::import_bytes(&bytes).unwrap();
    assert_eq!(
        m.lookups.len(),
        2,
        "BatchNormalization must fold into the first Gemm: one lookup per neuron"
    );
    assert!(m.lookups.iter().all(|l| l.input.terms.len() == 2));
    let x = [0.7, -1.3];
    // By hand: h = x W1 + b1; n = s (h - m) / sqrt(v + eps) + bb; y = relu(n) . w2
    let h = [x[0] - x[1] + 0.1, x[0] * 2.0 + x[1] * 0.5 - 0.2];
    let eps = 1e-5f64;
    let n = [
        2.0 * (h[0] - 1.0) / (4.0 + eps).sqrt() + 0.3,
        0.5 * (h[1] + 1.0) / (0.25 + eps).sqrt(),
    ];
    let y = n[0].max(0.0) * 1.0 + n[1].max(0.0) * -3.0;
    let got = m.outputs(&x);
    assert!((got[0] - y).abs() < 1e-5, "{got:?} vs {y}");
}

#[test]
fn csv_with_wrong_column_count_names_the_line() {
    let text = "f0,f1,f2,label\n0.1,0.2,0.3,1\n0.1,0.2,1\n";
    let err = parse_csv(text.as_bytes(), "bad.csv", 3, Labels::Required).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("bad.csv: line 3") && msg.contains("3 columns, expected 4"),
        "{msg}"
    );
    // A CSV for another model (wrong feature count) fails on the header.
    let path = zoo_dir("iris_logreg").join("test.csv");
    let err = veil_models::data::read_csv(&path, 64, Labels::Required).unwrap_err();
    assert!(err.to_string().contains("line 1"), "{err}");
}

#[test]
fn nan_infinite_and_huge_features_are_refused_naming_row_and_column() {
    let (_, model) = compiled("iris_logreg");
    let spec = model.client_spec();
    let x = vec![1.0, 2.0, 3.0, 4.0];
    spec.input.quantize(&x).unwrap();
    for (v, why) in [
        (f64::NAN, "NaN"),
        (f64::INFINITY, "infinite"),
        (-1.5e30, "beyond"),
    ] {
        let mut bad = x.clone();
        bad[2] = v;
        let e = spec.input.quantize_row(5, &bad).unwrap_err();
        assert!(
            matches!(
                e,
                FormatError::InvalidFeature {
                    row: 5,
                    column: 2,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().starts_with("row 5, column 2: ") && e.to_string().contains(why));
        let e = model.simulate(&bad, None).unwrap_err();
        assert!(
            matches!(
                e,
                ModelError::Format(FormatError::InvalidFeature { column: 2, .. })
            ),
            "{e}"
        );
    }
    // The bound itself quantizes (to the grid's end).
    let mut edge = x.clone();
    edge[0] = 1e30;
    let q = spec.input.quantize(&edge).unwrap();
    assert_eq!(q[0], spec.input.quant[0].max_q);
}

#[test]
fn a_hostile_client_spec_is_refused_not_obeyed() {
    let (_, model) = compiled("iris_logreg");
    let good = model.client_spec();
    good.validate().unwrap();
    let refused = |f: &dyn Fn(&mut veil_models::ClientSpec), want: &str| {
        let mut s = good.clone();
        f(&mut s);
        let e = s.validate().unwrap_err();
        assert!(matches!(e, FormatError::InvalidClientSpec(_)), "{e}");
        assert!(e.to_string().contains(want), "{want}: {e}");
    };
    use veil_models::compiled::InputWindow;
    refused(
        &|s| s.input.quant[1].scale = f64::NAN,
        "feature 1: grid scale NaN",
    );
    refused(&|s| s.input.quant[1].scale = 0.0, "finite and positive");
    refused(&|s| s.input.quant[1].scale = -1.0, "finite and positive");
    refused(&|s| s.input.quant[0].zero = i64::MAX, "holding its zero");
    refused(&|s| s.input.quant[0].max_q = 1 << 40, "feature 0");
    refused(
        &|s| {
            s.input.windows.push(InputWindow {
                feature: 9,
                offset: 0,
            })
        },
        "window at offset 0 of feature 9",
    );
    refused(
        &|s| {
            s.input.windows.push(InputWindow {
                feature: 0,
                offset: -3,
            })
        },
        "outside the feature's grid",
    );
    // Millions of windows would have the client encrypt millions of values per sample.
    refused(
        &|s| {
            s.input.windows = vec![
                InputWindow {
                    feature: 0,
                    offset: 0
                };
                1 << 20
            ]
        },
        "input ciphertexts",
    );
    refused(&|s| s.input.delta = 0, "delta");
    refused(&|s| s.input_shape = vec![usize::MAX, 2], "input shape");
    refused(&|s| s.input_shape = vec![5], "input shape");
    refused(&|s| s.output.scale.push(1.0), "output decoding");
    refused(&|s| s.output.offset[0] = f64::INFINITY, "not finite");
    refused(&|s| s.output.modulus_bits = 65, "output decoding");
    refused(
        &|s| {
            s.output.scale = vec![1.0; 1 << 17];
            s.output.offset = vec![0.0; 1 << 17];
        },
        "131072 outputs",
    );
    refused(
        &|s| s.tail = vec![veil_models::graph::TailOp::Softmax; 1000],
        "tail ops",
    );
    refused(&|s| s.class_labels = Some(vec![0; 7]), "7 class labels");
    refused(&|s| s.pbs_per_sample = usize::MAX, "bootstraps per sample");
    // An unvalidated spec still never panics: a window naming a missing feature is an error.
    let mut s = good.clone();
    s.input.windows.push(InputWindow {
        feature: 9,
        offset: 0,
    });
    let e = s.input.quantize(&[0.0; 4]).unwrap_err();
    assert!(matches!(e, FormatError::InvalidClientSpec(_)), "{e}");
}
