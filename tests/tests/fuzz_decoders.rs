//! Randomized robustness of every decoder of untrusted bytes: arbitrary bytes and mutations
//! (byte changes, truncation, appended bytes) of real encodings must give a value or an
//! error, never a panic. The decoders bound their allocations by the input size or an
//! explicit limit, so a case that allocated without bound would abort the run.
//!
//! Cases per decoder: `VEIL_FUZZ_CASES` (default 256; the evaluation-key decoder, whose real
//! input is 30 MB, runs an eighth of them unless `VEIL_FUZZ_KEY_CASES` says otherwise). For a
//! long run: `VEIL_FUZZ_CASES=20000 VEIL_FUZZ_KEY_CASES=20000 cargo test --release --workspace
//! --test fuzz_decoders -- --nocapture`.

use std::sync::OnceLock;
use veil_models::Simulate;

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestRunner};
use prost::Message;
use veil_client::KeyPair;
use veil_models::data::{Labels, parse_csv};
use veil_models::{ClientSpec, CompiledModel, onnx};
use veil_proto::v1;
use veil_runtime::keys::eval_key_from_bytes;
use veil_runtime::{ClientKey, EncryptedInput, EncryptedOutput, big_lwe_size};
use veil_server::Tenants;
use veil_tests::*;

fn cases() -> u32 {
    std::env::var("VEIL_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

/// Cases for the evaluation-key decoder.
fn key_cases() -> u32 {
    std::env::var("VEIL_FUZZ_KEY_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or((cases() / 8).max(4))
}

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    })
}

/// Real encodings to mutate, made once.
struct Corpus {
    model: CompiledModel,
    model_bytes: Vec<u8>,
    onnx: Vec<u8>,
    csv: Vec<u8>,
    keys: KeyPair,
    client_key: Vec<u8>,
    input: Vec<u8>,
    output: Vec<u8>,
    spec_json: String,
    tenants: String,
}

fn corpus() -> &'static Corpus {
    static C: OnceLock<Corpus> = OnceLock::new();
    C.get_or_init(|| {
        let model = compile_zoo("iris_logreg");
        let keys = KeyPair::generate(model.params);
        let spec = model.client_spec();
        let x = test_set("iris_logreg", model.n_features()).features[0].clone();
        let input = keys.client.encrypt(&spec, &x).unwrap().to_bytes();
        // A well-formed output list (fixint bincode: lwe size, count, bits, then the packed
        // words with their length).
        let lwe = big_lwe_size(model.params) as u64;
        let bits = model.output.decoding.modulus_bits;
        let n = (model.n_outputs() as u64) * lwe;
        let words = (n * bits as u64).div_ceil(64);
        let mut output = Vec::new();
        output.extend(lwe.to_le_bytes());
        output.extend((model.n_outputs() as u64).to_le_bytes());
        output.extend(bits.to_le_bytes());
        output.extend(words.to_le_bytes());
        for i in 0..words {
            output.extend(i.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes());
        }
        assert!(
            EncryptedOutput::from_bytes(&output, model.n_outputs(), lwe as usize, bits).is_ok()
        );
        Corpus {
            model_bytes: model.to_bytes(),
            onnx: std::fs::read(zoo_dir("iris_logreg").join("model.onnx")).unwrap(),
            csv: std::fs::read(zoo_dir("iris_logreg").join("test.csv")).unwrap(),
            client_key: keys.client.to_bytes(),
            spec_json: serde_json::to_string(&spec).unwrap(),
            tenants: [
                tenant_toml("a", "t1", "max_keys = 2\nmodels = [\"iris\"]"),
                tenant_toml("b", "t2", "requests_per_second = 5.0\nburst = 10"),
            ]
            .concat(),
            model,
            keys,
            input,
            output,
        }
    })
}

/// A mutation of some bytes: up to 8 byte changes, an optional cut, optional appended bytes.
#[derive(Clone, Debug)]
struct Mutation {
    edits: Vec<(Index, u8)>,
    cut: Option<Index>,
    tail: Vec<u8>,
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let edits = || prop::collection::vec((any::<Index>(), any::<u8>()), 1..8);
    // One kind at a time, so that byte changes alone (the structure intact, the content
    // hostile) get a third of the cases.
    prop_oneof![
        edits().prop_map(|edits| Mutation {
            edits,
            cut: None,
            tail: vec![],
        }),
        (edits(), any::<Index>()).prop_map(|(edits, c)| Mutation {
            edits,
            cut: Some(c),
            tail: vec![],
        }),
        (edits(), prop::collection::vec(any::<u8>(), 1..16)).prop_map(|(edits, tail)| {
            Mutation {
                edits,
                cut: None,
                tail,
            }
        }),
    ]
}

impl Mutation {
    fn apply(&self, base: &[u8]) -> Vec<u8> {
        let mut b = base.to_vec();
        if !b.is_empty() {
            for (i, v) in &self.edits {
                let at = i.index(b.len());
                b[at] = *v;
            }
        }
        if let Some(c) = &self.cut {
            b.truncate(c.index(b.len() + 1));
        }
        b.extend_from_slice(&self.tail);
        b
    }
}

/// Arbitrary bytes, or a mutation of `base`.
fn input_for(base: &'static [u8]) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..512),
        mutation().prop_map(move |m| m.apply(base)),
    ]
}

/// Runs `decode` on `cases` inputs; counts the ones it accepted.
fn fuzz(name: &str, cases: u32, base: &'static [u8], decode: impl Fn(&[u8]) -> bool) {
    let t = std::time::Instant::now();
    let accepted = std::cell::Cell::new(0u32);
    runner(cases)
        .run(&input_for(base), |bytes| {
            if decode(&bytes) {
                accepted.set(accepted.get() + 1);
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    eprintln!(
        "{name}: {cases} cases, {} accepted, {:.1} s",
        accepted.get(),
        t.elapsed().as_secs_f64()
    );
}

#[test]
fn ciphertexts() {
    let c = corpus();
    let (n_in, n_out) = (c.model.n_features(), c.model.n_outputs());
    let lwe = big_lwe_size(c.model.params);
    fuzz("input ciphertexts", cases(), &c.input, |b| {
        EncryptedInput::from_bytes(b, n_in, lwe).is_ok()
    });
    let bits = c.model.output.decoding.modulus_bits;
    fuzz("output ciphertexts", cases(), &c.output, |b| {
        EncryptedOutput::from_bytes(b, n_out, lwe, bits).is_ok()
    });
}

#[test]
fn evaluation_and_client_keys() {
    let c = corpus();
    let p = c.model.params;
    fuzz("evaluation keys", key_cases(), &c.keys.eval_key, |b| {
        eval_key_from_bytes(p, b).is_ok()
    });
    fuzz("client keys", cases(), &c.client_key, |b| {
        ClientKey::from_bytes(p, b).is_ok()
    });
}

#[test]
fn compiled_models() {
    let c = corpus();
    // A model with stages that read earlier stages (residual blocks) beside the linear one.
    let staged: &'static [u8] =
        Box::leak(compile_zoo("digits_resmlp").to_bytes().into_boxed_slice());
    for (name, base) in [
        ("compiled models", &c.model_bytes[..]),
        ("staged compiled models", staged),
    ] {
        // What the server does with a model file it accepted: build its executor and describe
        // it; and a simulation, as `veil eval` runs it.
        fuzz(name, cases(), base, |b| {
            let Ok(m) = CompiledModel::from_bytes(b) else {
                return false;
            };
            let x = vec![0.5; m.n_features()];
            let _ = m.client_spec();
            let _ = m.simulate(&x, None);
            let _ = veil_runtime::FheModel::new(m).map(|f| f.working_bytes_per_sample());
            true
        });
    }
}

#[test]
fn onnx_files() {
    fuzz("onnx files", cases(), &corpus().onnx, |b| {
        onnx::import_bytes(b).is_ok()
    });
    // Graph models and single-op fixtures: convolutions, pooling, QDQ, re-indexing ops.
    let graphs = [
        zoo_dir("digits_maxpool_cnn").join("model.onnx"),
        zoo_dir("digits_resmlp").join("model.onnx"),
        zoo_dir("digits_qdq_cnn").join("model.onnx"),
        zoo_dir("fixtures").join("slice.onnx"),
        zoo_dir("fixtures").join("pad_constant.onnx"),
        zoo_dir("fixtures").join("split_add.onnx"),
        zoo_dir("fixtures").join("gather_channels.onnx"),
        zoo_dir("fixtures").join("conv1d.onnx"),
        zoo_dir("fixtures").join("maxpool_ceil.onnx"),
    ];
    for path in graphs {
        let base: &'static [u8] = Box::leak(std::fs::read(&path).unwrap().into_boxed_slice());
        let name = format!("onnx {}", path.file_name().unwrap().to_string_lossy());
        fuzz(&name, cases(), base, |b| onnx::import_bytes(b).is_ok());
    }
}

#[test]
fn csv_rows() {
    let n = corpus().model.n_features();
    fuzz("csv rows", cases(), &corpus().csv, |b| {
        parse_csv(b, "fuzz.csv", n, Labels::Optional).is_ok()
    });
}

#[test]
fn grpc_messages() {
    let infer = v1::InferRequest {
        model: "iris".into(),
        key_id: "ab".repeat(32),
        samples: vec![corpus().input.clone(); 2],
        model_digest: String::new(),
    }
    .encode_to_vec();
    let infer: &'static [u8] = Box::leak(infer.into_boxed_slice());
    fuzz("InferRequest", cases(), infer, |b| {
        v1::InferRequest::decode(b).is_ok()
    });
    let upload = v1::UploadKeyRequest {
        part: Some(v1::upload_key_request::Part::Chunk(vec![7; 300])),
    }
    .encode_to_vec();
    let upload: &'static [u8] = Box::leak(upload.into_boxed_slice());
    fuzz("UploadKeyRequest", cases(), upload, |b| {
        v1::UploadKeyRequest::decode(b).is_ok()
    });
}

#[test]
fn tenants_files_and_client_specs() {
    let c = corpus();
    fuzz("tenants files", cases(), c.tenants.as_bytes(), |b| {
        std::str::from_utf8(b).is_ok_and(|t| Tenants::parse(t).is_ok())
    });
    fuzz(
        "client specs (JSON)",
        cases(),
        c.spec_json.as_bytes(),
        |b| serde_json::from_slice::<ClientSpec>(b).is_ok(),
    );
}
