//! `veil estimate`: what a model costs before running it, and `--sweep`, how latency and
//! accuracy move with hidden width and bit widths for an MLP on digits.

use std::path::{Path, PathBuf};
use veil_models::Simulate;

use anyhow::{Context, bail};
use veil_models::compiled::ParamSet;
use veil_models::cost::MachineProfile;
use veil_models::data::{Labels, read_csv};
use veil_models::eval::accuracy;
use veil_models::{CompiledModel, QuantConfig, compile, onnx};
use veil_runtime::calibrate::{calibrate, cpu_model};

#[derive(clap::Args)]
pub struct Args {
    /// A compiled model (.veil), or an ONNX model to compile on the fly with --calibration.
    model: Option<PathBuf>,
    /// Calibration CSV, when MODEL is an ONNX file.
    #[arg(long)]
    calibration: Option<PathBuf>,
    /// Re-measure this machine's bootstrap throughput instead of using the cached figures.
    #[arg(long)]
    calibrate: bool,
    /// Sweep hidden width and bit widths of a digits MLP; writes a CSV and an SVG chart.
    #[arg(long)]
    sweep: bool,
    /// Folder of the sweep's models (mlp_h*.onnx) and where its outputs go.
    #[arg(long, default_value = "models/zoo/digits_sweep")]
    sweep_dir: PathBuf,
    /// Digits data for the sweep (train.csv and test.csv).
    #[arg(long, default_value = "models/zoo/digits_mlp")]
    sweep_data: PathBuf,
    /// Also cost encrypted-model mode (`compile --encrypt-model`): an ONNX model is then
    /// compiled as that mode compiles it (zero weights kept, label output for a classifier).
    #[arg(long)]
    encrypt_model: bool,
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let params = ParamSet::Message2Carry2KsPbsTuniform2m128;
    let machine = machine_profile(params, a.calibrate)?;
    if a.sweep {
        return sweep(&a, &machine);
    }
    let Some(path) = &a.model else {
        bail!("give a model (.veil or .onnx with --calibration), or --sweep");
    };
    let model = load_or_compile(path, a.calibration.as_deref(), a.encrypt_model)?;
    let cost = model.cost(Some(&machine));
    let encrypted = a
        .encrypt_model
        .then(|| model.encrypted_mode_cost(Some(&machine)));
    let out = serde_json::json!({
        "model": path.display().to_string(),
        "parameter_set": model.params.name(),
        "cost": cost,
        "encrypted_model_cost": encrypted,
        "machine": machine,
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        let mb = |b: f64| b / 1e6;
        println!("{}: {}", path.display(), model.params.name());
        println!(
            "  per sample: {} bootstraps ({} for the argmax; reveals {}), {} keyswitches, {} LWE \
             multiply-accumulates",
            cost.pbs_per_sample,
            cost.argmax_pbs_per_sample,
            cost.reveal,
            cost.keyswitches_per_sample,
            cost.lwe_macs_per_sample
        );
        println!(
            "  predicted latency: {:.1} ms per sample on {} threads ({})",
            cost.predicted_latency_ms.unwrap_or(0.0),
            machine.threads,
            machine.cpu
        );
        println!(
            "  bytes: request {} per sample, response {} per sample ({}-bit ciphertexts), \
             evaluation key {:.1} MB",
            cost.request_bytes_per_sample,
            cost.response_bytes_per_sample,
            cost.output_modulus_bits,
            mb(machine.eval_key_bytes as f64)
        );
        println!(
            "  server memory: {:.1} MB per loaded key, {:.2} MB for the model",
            mb(cost.server_bytes_per_loaded_key as f64),
            mb(cost.server_bytes_per_model as f64)
        );
        if let Some(e) = &encrypted {
            println!(
                "  encrypted-model mode (weights encrypted, inputs clear): {} bootstraps per \
                 sample ({:.1}x), {} keyswitches, predicted latency {:.1} ms",
                e.pbs_per_sample,
                e.pbs_per_sample as f64 / cost.pbs_per_sample.max(1) as f64,
                e.keyswitches_per_sample,
                e.predicted_latency_ms.unwrap_or(0.0)
            );
            println!(
                "    {} encrypted weights, {} encrypted tables: model file {:.1} MB ({:.1} MB \
                 expanded), results {} bytes per sample",
                e.encrypted_weights,
                e.encrypted_tables,
                mb(e.model_file_bytes as f64),
                mb(e.expanded_model_bytes as f64),
                e.results_bytes_per_sample
            );
        }
    }
    Ok(())
}

fn load_or_compile(
    path: &Path,
    calibration: Option<&Path>,
    encrypt_model: bool,
) -> anyhow::Result<CompiledModel> {
    if path.extension().is_some_and(|e| e == "onnx") {
        let Some(calib) = calibration else {
            bail!("an ONNX model needs --calibration TRAIN.csv");
        };
        let mut float = onnx::import_file(path)?;
        let data = read_csv(calib, float.n_features(), Labels::Optional)?;
        if data.targets.is_some() {
            float.task = veil_models::graph::Task::Regression;
        }
        let cfg = QuantConfig {
            keep_zero_weights: encrypt_model,
            ..QuantConfig::default()
        };
        if encrypt_model && float.task == veil_models::graph::Task::Classification {
            float = float.with_reveal(veil_models::graph::Reveal::Label)?;
        }
        Ok(compile(&float, &data.features, &cfg)?)
    } else {
        Ok(CompiledModel::load(path)?)
    }
}

/// Cached per machine (CPU model, thread count, parameter set, Veil version).
fn machine_profile(params: ParamSet, force: bool) -> anyhow::Result<MachineProfile> {
    let dir = std::env::var_os("VEIL_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("veil")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/veil")))
        .unwrap_or_else(|| PathBuf::from(".veil-cache"));
    let file = dir.join(format!("machine-{}.json", params.name()));
    let threads = rayon::current_num_threads();
    if !force
        && let Ok(text) = std::fs::read_to_string(&file)
        && let Ok(p) = serde_json::from_str::<MachineProfile>(&text)
        && p.cpu == cpu_model()
        && p.threads == threads
        && p.veil_version == env!("CARGO_PKG_VERSION")
    {
        return Ok(p);
    }
    eprintln!("measuring bootstrap throughput on this machine (a few seconds)...");
    let p = calibrate(params);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(&file, serde_json::to_string_pretty(&p)?)
        .with_context(|| format!("writing {}", file.display()))?;
    eprintln!("cached in {}", file.display());
    Ok(p)
}

struct SweepRow {
    hidden: usize,
    bits: u32,
    pbs: usize,
    latency_ms: f64,
    float_acc: f64,
    sim_acc: f64,
    noisy_acc: f64,
}

fn sweep(a: &Args, machine: &MachineProfile) -> anyhow::Result<()> {
    let train = read_csv(&a.sweep_data.join("train.csv"), 64, Labels::Optional)?;
    let test = read_csv(&a.sweep_data.join("test.csv"), 64, Labels::Required)?;
    let labels = test.labels.clone().expect("required");
    let mut models: Vec<(usize, PathBuf)> = std::fs::read_dir(&a.sweep_dir)
        .with_context(|| format!("reading {}", a.sweep_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| {
            let stem = p
                .file_stem()?
                .to_str()?
                .strip_prefix("mlp_h")?
                .parse()
                .ok()?;
            (p.extension()? == "onnx").then_some((stem, p))
        })
        .collect();
    models.sort();
    if models.is_empty() {
        bail!("no mlp_h*.onnx in {}", a.sweep_dir.display());
    }
    let mut rows = Vec::new();
    for (hidden, path) in &models {
        let float = onnx::import_file(path)?;
        let float_pred: Vec<i64> = test
            .features
            .iter()
            .map(|x| float.predict(x).map(|p| p.label))
            .collect::<Result<_, _>>()?;
        let float_acc = accuracy(&float_pred, &labels);
        for bits in [2u32, 3, 4, 5, 6, 7] {
            let cfg = QuantConfig {
                weight_bits: bits,
                act_bits: bits,
                search: false,
                ..QuantConfig::default()
            };
            let model = compile(&float, &train.features, &cfg)?;
            let sim = model.simulate_labels(&test.features, None)?;
            let noisy = model.simulate_labels(&test.features, Some(1))?;
            let cost = model.cost(Some(machine));
            rows.push(SweepRow {
                hidden: *hidden,
                bits,
                pbs: cost.pbs_per_sample,
                latency_ms: cost.predicted_latency_ms.unwrap_or(0.0),
                float_acc,
                sim_acc: accuracy(&sim, &labels),
                noisy_acc: accuracy(&noisy, &labels),
            });
        }
    }
    let csv_path = a.sweep_dir.join("sweep.csv");
    let mut csv = String::from(
        "hidden,weight_bits,act_bits,pbs_per_sample,predicted_latency_ms,float_accuracy,simulated_accuracy,simulated_accuracy_with_noise\n",
    );
    for r in &rows {
        csv.push_str(&format!(
            "{},{},{},{},{:.1},{:.4},{:.4},{:.4}\n",
            r.hidden, r.bits, r.bits, r.pbs, r.latency_ms, r.float_acc, r.sim_acc, r.noisy_acc
        ));
    }
    std::fs::write(&csv_path, &csv).with_context(|| format!("writing {}", csv_path.display()))?;
    let svg_path = a.sweep_dir.join("sweep.svg");
    draw(&rows, &svg_path, machine)?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"csv": csv_path, "chart": svg_path, "rows": rows.len()})
        );
    } else {
        print!("{csv}");
        eprintln!("wrote {} and {}", csv_path.display(), svg_path.display());
    }
    Ok(())
}

fn draw(rows: &[SweepRow], path: &Path, machine: &MachineProfile) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let max_latency = rows.iter().map(|r| r.latency_ms).fold(1.0, f64::max) * 1.1;
    let min_acc = rows
        .iter()
        .map(|r| r.noisy_acc)
        .fold(1.0, f64::min)
        .min(0.8);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "Digits MLP 64-h-10: predicted latency vs accuracy ({} threads)",
                machine.threads
            ),
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..max_latency, min_acc..1.0)?;
    chart
        .configure_mesh()
        .x_desc("predicted latency per sample (ms)")
        .y_desc("accuracy (simulated with bootstrap noise)")
        .draw()?;
    let bit_set: Vec<u32> = {
        let mut b: Vec<u32> = rows.iter().map(|r| r.bits).collect();
        b.sort_unstable();
        b.dedup();
        b
    };
    for (i, bits) in bit_set.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let pts: Vec<(f64, f64)> = rows
            .iter()
            .filter(|r| r.bits == *bits)
            .map(|r| (r.latency_ms, r.noisy_acc))
            .collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(format!("{bits}-bit weights and activations"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
        chart.draw_series(rows.iter().filter(|r| r.bits == *bits && i == 0).map(|r| {
            Text::new(
                format!("h={}", r.hidden),
                (r.latency_ms, r.noisy_acc - (1.0 - min_acc) * 0.04),
                ("sans-serif", 12),
            )
        }))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
