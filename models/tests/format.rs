//! The `.veil` format against golden files: `golden/wine_mlp.veil`, compiled from
//! `zoo/wine_mlp` with the default settings, and `golden/wine_mlp.json`, its noiseless
//! simulated outputs on the first rows of the zoo's `test.csv`.
//!
//! A failure here means the bytes of the format or the compiler's output changed. If the
//! change is deliberate (a serialized type changed, with `FORMAT_VERSION` bumped; or the
//! compiler now plans differently), regenerate the files with
//! `cargo test --release --workspace --test format -- --ignored regenerate`, check the JSON
//! diff, and commit both. If nobody meant to change the format, the test caught a silent one.

mod common;

use std::path::PathBuf;
use veil_models::Simulate;

use common::*;
use serde::{Deserialize, Serialize};
use veil_models::CompiledModel;
use veil_models::compiled::{
    FORMAT_VERSION, HEADER_BYTES, IntMatrix, MAX_LOOKUPS, MAX_STAGES, POSITIONS, schema_hash,
};

const MODEL: &str = "wine_mlp";
const ROWS: usize = 12;

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Golden {
    format_version: u32,
    schema_hash: String,
    rows: Vec<Vec<f64>>,
    /// Noiseless simulated output accumulators (integers) and the decoded labels.
    accs: Vec<Vec<f64>>,
    labels: Vec<i64>,
}

fn golden_path(ext: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!("{MODEL}.{ext}"))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

fn expected(model: &CompiledModel) -> Golden {
    let test = dataset(MODEL, "test.csv", model.n_features());
    let rows: Vec<Vec<f64>> = test.features.into_iter().take(ROWS).collect();
    let (mut accs, mut labels) = (Vec::new(), Vec::new());
    for x in &rows {
        let sim = model.simulate(x, None).unwrap();
        labels.push(model.decode(&sim.accs).unwrap().label);
        accs.push(sim.accs);
    }
    Golden {
        format_version: FORMAT_VERSION,
        schema_hash: hex(schema_hash()),
        rows,
        accs,
        labels,
    }
}

fn golden() -> (Vec<u8>, Golden) {
    let bytes = std::fs::read(golden_path("veil")).unwrap();
    let text = std::fs::read_to_string(golden_path("json")).unwrap();
    (bytes, serde_json::from_str(&text).unwrap())
}

#[test]
#[ignore = "rewrites the golden files; see the module doc"]
fn regenerate() {
    let (_, model) = compiled(MODEL);
    model.save(&golden_path("veil")).unwrap();
    let json = serde_json::to_string_pretty(&expected(&model)).unwrap();
    std::fs::write(golden_path("json"), json + "\n").unwrap();
}

#[test]
fn golden_file_loads_and_simulates_to_the_recorded_outputs() {
    let (_, want) = golden();
    let model = CompiledModel::load(&golden_path("veil")).unwrap_or_else(|e| {
        panic!("the golden file no longer loads ({e}); see this file's doc comment")
    });
    assert!(
        !model.stages.is_empty(),
        "the golden model should bootstrap"
    );
    assert_eq!(want.format_version, FORMAT_VERSION);
    assert_eq!(want.schema_hash, hex(schema_hash()));
    let got = expected(&model);
    assert_eq!(got.rows, want.rows, "zoo test rows changed");
    assert_eq!(got.accs, want.accs);
    assert_eq!(got.labels, want.labels);
}

#[test]
fn compiler_writes_the_golden_bytes() {
    let (bytes, _) = golden();
    let (_, model) = compiled(MODEL);
    let now = model.to_bytes();
    assert_eq!(now.len(), bytes.len(), "the compiled size changed");
    assert!(
        now == bytes,
        "the compiler's output changed; see the doc comment"
    );
}

#[test]
fn a_file_of_another_format_is_refused() {
    let (bytes, _) = golden();
    let mut other = bytes.clone();
    other[12] ^= 1; // first byte of the schema hash
    let e = CompiledModel::from_bytes(&other).unwrap_err().to_string();
    assert!(
        e.contains("written by a different Veil format") && e.contains("recompile the model"),
        "{e}"
    );
    let mut old = bytes.clone();
    old[8..12].copy_from_slice(&4u32.to_le_bytes());
    let e = CompiledModel::from_bytes(&old).unwrap_err().to_string();
    assert!(
        e.contains("format version 4") && e.contains("recompile"),
        "{e}"
    );
    let e = CompiledModel::from_bytes(&bytes[..HEADER_BYTES - 1])
        .unwrap_err()
        .to_string();
    assert!(e.contains("truncated header"), "{e}");
}

fn load_err(model: &CompiledModel) -> String {
    CompiledModel::from_bytes(&model.to_bytes())
        .unwrap_err()
        .to_string()
}

/// The model freshly compiled, so that these tests do not hang on the golden file.
fn golden_model() -> CompiledModel {
    compiled(MODEL).1
}

#[test]
fn too_many_lookups_are_refused() {
    // One more lookup than allowed, in a file of a few MB: each would hold a 16 KiB
    // ciphertext per sample.
    let mut wide = golden_model();
    let st = &mut wide.stages[0];
    let n = MAX_LOOKUPS + 1;
    st.weights = IntMatrix {
        n_in: st.weights.n_in,
        rows: vec![Vec::new(); n],
    };
    st.lut.truncate(POSITIONS as usize);
    for v in [&mut st.offset, &mut st.delta_in, &mut st.delta_out] {
        *v = vec![v[0]; n];
    }
    st.lut_index = vec![0; n];
    st.read_sigma = vec![0.0; n];
    assert!(wide.to_bytes().len() < 8 << 20);
    let e = load_err(&wide);
    assert!(e.contains("131073 lookups"), "{e}");
}

#[test]
fn too_many_stages_are_refused() {
    let model = golden_model();
    let mut deep = model.clone();
    deep.stages = vec![model.stages[0].clone(); MAX_STAGES + 1];
    let e = load_err(&deep);
    assert!(e.contains("1025 stages"), "{e}");
}

#[test]
fn more_tables_than_neurons_are_refused() {
    // Tables no neuron reads: only memory on the server.
    let mut tables = golden_model();
    let st = &mut tables.stages[0];
    let extra = st.lut[..POSITIONS as usize].repeat(st.len() + 1);
    st.lut.extend(extra);
    let e = load_err(&tables);
    assert!(e.contains("stage 0: per-neuron tables"), "{e}");
}

#[test]
fn accumulators_that_could_overflow_are_refused() {
    // 65 terms of 2^40 times a 2^16 grid pass 2^62.
    let mut acc = golden_model();
    acc.input.quant[0].max_q = 1 << 16;
    acc.output.decoding.delta = acc.input.delta;
    let n_out = acc.n_outputs();
    acc.output.weights.rows = vec![vec![(0, 1 << 40); 64]; n_out];
    acc.output.weights.rows[0].push((0, 1 << 40));
    let e = load_err(&acc);
    assert!(e.contains("output layer") && e.contains("2^62"), "{e}");
    // 64 such terms still fit.
    acc.output.weights.rows[0].pop();
    CompiledModel::from_bytes(&acc.to_bytes()).unwrap();
}
