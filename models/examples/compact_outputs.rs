//! The precision / size trade-off of switching output ciphertexts to a smaller modulus,
//! measured with real 128-bit keys.
//!
//! `cargo run --release -p veil-models --example compact_outputs -- [SAMPLES] [MODEL[:label]...]`
//!
//! For each zoo model (default: digits_mlp, digits_mlp:label, breast_cancer_logreg) it
//! encrypts SAMPLES test rows, evaluates them once at full precision (2^64), then switches the
//! same outputs to 2^b for several b and decrypts each: the difference to the full-precision
//! phase is exactly the switch's rounding noise. It prints, per b, the bytes per output
//! ciphertext, the measured and predicted noise in positions (2^52) and in output units, and
//! how many predictions still equal the noiseless simulation's. The row marked `*` is the
//! modulus the plan chose.

use std::path::PathBuf;
use veil_models::Simulate;

use veil_models::compiled::{POSITION, output_wire_bytes, switch_sigma_positions};
use veil_models::data::{Labels, read_csv};
use veil_models::graph::Reveal;
use veil_models::{QuantConfig, compile, onnx};
use veil_runtime::{ClientKey, CpuBackend, FheModel, ServerKey, big_lwe_size};

fn main() {
    let mut args = std::env::args().skip(1);
    let samples: usize = args.next().map_or(40, |s| s.parse().expect("SAMPLES"));
    let mut names: Vec<String> = args.collect();
    if names.is_empty() {
        names = ["digits_mlp", "digits_mlp:label", "breast_cancer_logreg"]
            .map(String::from)
            .to_vec();
    }
    let zoo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("zoo");
    for name in names {
        let (dir, reveal) = match name.split_once(':') {
            Some((d, "label")) => (d.to_string(), Reveal::Label),
            _ => (name.clone(), Reveal::Scores),
        };
        let float = onnx::import_file(&zoo.join(&dir).join("model.onnx")).unwrap();
        let float = float.with_reveal(reveal).unwrap();
        let nf = float.n_features();
        let train = read_csv(&zoo.join(&dir).join("train.csv"), nf, Labels::Optional).unwrap();
        let test = read_csv(&zoo.join(&dir).join("test.csv"), nf, Labels::Optional).unwrap();
        let model = compile(&float, &train.features, &QuantConfig::default()).unwrap();
        let chosen = model.output.decoding.modulus_bits;
        let mut full = model.clone();
        full.output.decoding.modulus_bits = 64;
        let params = model.params;
        let client = ClientKey::generate(params);
        let server = ServerKey::from_compressed(params, &client.compressed_server_key()).unwrap();
        let backend = CpuBackend::new(&server);
        let spec = full.client_spec();
        let xs: Vec<Vec<f64>> = test.features.iter().take(samples).cloned().collect();
        let inputs: Vec<_> = xs
            .iter()
            .map(|x| client.encrypt(&spec, x).unwrap())
            .collect();
        let outs = FheModel::new(full.clone())
            .unwrap()
            .evaluate(&backend, &inputs)
            .unwrap();
        let exact: Vec<Vec<f64>> = xs
            .iter()
            .map(|x| model.simulate(x, None).unwrap().accs)
            .collect();
        let lwe = big_lwe_size(params);
        let delta = model.output.decoding.delta as f64;
        let unit = delta / POSITION as f64; // one output unit, in positions
        let own: f64 = full.output.sigma.iter().cloned().fold(0.0, f64::max);
        println!(
            "\n{name}: {} outputs, {} samples, delta = {:.3} positions per output unit, plan \
             noise before the switch up to {own:.3} positions",
            model.n_outputs(),
            xs.len(),
            unit
        );
        println!(
            "| bits | bytes per output ciphertext | switch noise measured (positions) | predicted | in output units | predictions equal to simulation |"
        );
        println!("|---|---|---|---|---|---|");
        let mut widths = vec![64, 31, 24, 20, 16, 14, 12, 10, 8];
        if !widths.contains(&chosen) {
            widths.push(chosen);
            widths.sort_unstable_by(|a, b| b.cmp(a));
        }
        for bits in widths {
            let mut spec_b = spec.clone();
            spec_b.output.modulus_bits = bits;
            let (mut sq, mut n, mut agree) = (0.0f64, 0usize, 0usize);
            for ((out, ex), full_out) in outs.iter().zip(&exact).zip(&outs) {
                let reference = client.decrypt(&spec, full_out).unwrap();
                let switched = out.modulus_switched(bits).unwrap();
                let accs = client.decrypt(&spec_b, &switched).unwrap();
                for (a, r) in accs.iter().zip(&reference) {
                    let d = (a - r) * unit;
                    sq += d * d;
                    n += 1;
                }
                agree += usize::from(
                    spec.decode(&accs).unwrap().label == model.decode(ex).unwrap().label,
                );
            }
            let measured = (sq / n as f64).sqrt();
            let predicted = switch_sigma_positions(bits, lwe - 1);
            println!(
                "| {bits}{} | {} | {measured:.4} | {predicted:.4} | {:.4} | {agree}/{} |",
                if bits == chosen { " *" } else { "" },
                output_wire_bytes(1, lwe, bits),
                measured / unit,
                xs.len()
            );
        }
    }
}
