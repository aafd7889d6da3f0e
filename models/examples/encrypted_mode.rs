//! Clear-weight mode against encrypted-model mode, side by side, with real 128-bit keys.
//!
//! `cargo run --release -p veil-models --example encrypted_mode -- [ROWS] [MODEL...]`
//!
//! For each zoo model (default: every model that encrypted-model mode takes) and the label
//! output (scores for a regressor): bootstraps per sample in both modes, the time to evaluate
//! ROWS test rows as one batch in each mode on this machine (clear-weight mode: encrypted
//! inputs, as the server runs them; encrypted-model mode: clear rows, encrypted weights, as
//! `veil run` runs them), the sizes of the model files and of one sample's request and
//! results, and whether every prediction equals the noiseless simulation's. A model whose
//! encrypted mode needs more than 20,000 bootstraps per sample is only counted, with the
//! latency `veil estimate` predicts.

use std::path::PathBuf;
use std::time::Instant;

use veil_models::data::{Labels, read_csv};
use veil_models::graph::{Reveal, Task};
use veil_models::{QuantConfig, Simulate, compile, onnx};
use veil_runtime::encrypted_model::{EncryptedModel, EncryptedResults};
use veil_runtime::keys::eval_key_to_bytes;
use veil_runtime::{ClientKey, CpuBackend, FheModel, ServerKey, calibrate};

const DEFAULT: [&str; 12] = [
    "iris_logreg",
    "wine_mlp",
    "breast_cancer_logreg",
    "diabetes_linear",
    "digits_mlp",
    "digits_torch_mlp",
    "digits_qdq_mlp",
    "digits_resmlp",
    "digits_torch_lngelu",
    "digits_cnn",
    "digits_torch_conv1d",
    "digits_maxpool_cnn",
];

fn main() {
    let mut args = std::env::args().skip(1);
    let rows: usize = args.next().map_or(4, |s| s.parse().expect("ROWS"));
    let mut names: Vec<String> = args.collect();
    if names.is_empty() {
        names = DEFAULT.map(String::from).to_vec();
    }
    let zoo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("zoo");
    let params = veil_models::compiled::ParamSet::ALL[0];
    let owner = ClientKey::generate(params);
    let eval_key = eval_key_to_bytes(&owner.compressed_server_key());
    let id = veil_format::digest::key_id(&eval_key);
    let server = ServerKey::from_compressed(params, &owner.compressed_server_key()).unwrap();
    let backend = CpuBackend::new(&server);
    let machine = calibrate(params);
    println!(
        "{} threads, {:.0} KS+PBS/s; evaluation key {} bytes; {rows} rows per batch",
        machine.threads,
        machine.pbs_per_second,
        eval_key.len()
    );
    println!(
        "| model | reveals | bootstraps per sample: clear weights / encrypted model (x) | \
         ms per row: clear weights / encrypted model (x) | model file: .veil / .enc.veil | \
         request / results per sample (bytes) | encrypted = simulated |"
    );
    println!("|---|---|---|---|---|---|---|");
    for name in names {
        let dir = zoo.join(&name);
        let mut float = onnx::import_file(&dir.join("model.onnx")).unwrap();
        let nf = float.n_features();
        let train = read_csv(&dir.join("train.csv"), nf, Labels::Optional).unwrap();
        let test = read_csv(&dir.join("test.csv"), nf, Labels::Optional).unwrap();
        if train.targets.is_some() {
            float.task = Task::Regression;
        }
        let reveal = match float.task {
            Task::Classification => Reveal::Label,
            Task::Regression => Reveal::Scores,
        };
        let float = float.with_reveal(reveal).unwrap();
        let clear = compile(&float, &train.features, &QuantConfig::default()).unwrap();
        let cfg = QuantConfig {
            keep_zero_weights: true,
            ..QuantConfig::default()
        };
        let model = compile(&float, &train.features, &cfg).unwrap();
        let enc_cost = model.encrypted_mode_cost(Some(&machine));
        let clear_cost = clear.cost(Some(&machine));
        let xs: Vec<Vec<f64>> = test.features.iter().take(rows).cloned().collect();
        let ratio = |a: f64, b: f64| b / a.max(1e-9);
        let times = |a: usize, b: usize| match a {
            0 => "-".to_string(),
            _ => format!("{:.1}x", b as f64 / a as f64),
        };

        // Clear-weight mode: the client encrypts, the server evaluates.
        let spec = clear.client_spec();
        let inputs: Vec<_> = xs
            .iter()
            .map(|x| owner.encrypt(&spec, x).unwrap())
            .collect();
        let fhe = FheModel::new(clear.clone()).unwrap();
        let measure_clear = clear_cost.pbs_per_sample <= 20_000;
        let clear_ms = measure_clear.then(|| {
            let t = Instant::now();
            let out = fhe.evaluate(&backend, &inputs).unwrap();
            let ms = t.elapsed().as_secs_f64() * 1e3 / rows as f64;
            let ok = xs
                .iter()
                .zip(&out)
                .filter(|(x, o)| {
                    let acc = owner.decrypt(&spec, o).unwrap();
                    let sim = clear.simulate(x, None).unwrap();
                    clear.decode(&acc).map(|p| p.label).ok()
                        == clear.decode(&sim.accs).map(|p| p.label).ok()
                })
                .count();
            (ms, ok)
        });

        // Encrypted-model mode.
        let measure = enc_cost.pbs_per_sample <= 20_000;
        let (enc_ms, enc_ok, file_bytes) = if measure {
            let sealed = EncryptedModel::encrypt(&model, &owner, &id).unwrap();
            let bytes = sealed.to_bytes().len();
            let q: Vec<Vec<i64>> = xs
                .iter()
                .enumerate()
                .map(|(i, x)| sealed.quantize_row(i, x).unwrap())
                .collect();
            let runnable = sealed.expand().unwrap();
            let t = Instant::now();
            let outputs = runnable.evaluate(&backend, &q).unwrap();
            let ms = t.elapsed().as_secs_f64() * 1e3 / rows as f64;
            let results = EncryptedResults {
                model_digest: sealed.digest().to_string(),
                key_id: id.clone(),
                outputs,
            };
            let accs = results.decrypt(&owner, &id, &model).unwrap();
            let ok = xs
                .iter()
                .zip(&accs)
                .filter(|(x, acc)| {
                    let sim = model.simulate(x, None).unwrap();
                    let close = acc
                        .iter()
                        .zip(&sim.accs)
                        .all(|(a, s)| (a - s).abs() <= 0.25 || reveal == Reveal::Scores);
                    close
                        && model.decode(acc).map(|p| p.label).ok()
                            == model.decode(&sim.accs).map(|p| p.label).ok()
                })
                .count();
            (Some(ms), Some(ok), bytes)
        } else {
            (None, None, enc_cost.model_file_bytes)
        };
        let fmt_ms = |m: Option<f64>, predicted: Option<f64>| match m {
            Some(ms) => format!("{ms:.0}"),
            None => format!("~{:.0} (predicted)", predicted.unwrap_or(0.0)),
        };
        let latency_ratio = match (clear_ms.map(|c| c.0), enc_ms) {
            (Some(a), Some(b)) => format!(" ({:.1}x)", ratio(a, b)),
            _ => String::new(),
        };
        println!(
            "| {name} | {} | {} / {} ({}) | {} / {}{latency_ratio} | {:.2} MB / {:.2} MB | {} / {} | {} |",
            reveal.name(),
            clear_cost.pbs_per_sample,
            enc_cost.pbs_per_sample,
            times(clear_cost.pbs_per_sample, enc_cost.pbs_per_sample),
            fmt_ms(clear_ms.map(|c| c.0), clear_cost.predicted_latency_ms),
            fmt_ms(enc_ms, enc_cost.predicted_latency_ms),
            clear.to_bytes().len() as f64 / 1e6,
            file_bytes as f64 / 1e6,
            clear_cost.request_bytes_per_sample,
            enc_cost.results_bytes_per_sample,
            match (clear_ms, enc_ok) {
                (Some((_, c)), Some(e)) => format!("{c}/{rows} clear, {e}/{rows} encrypted"),
                (_, Some(e)) => format!("{e}/{rows} encrypted"),
                _ => "not run".to_string(),
            }
        );
    }
}
