use std::path::PathBuf;

use anyhow::Context;
use veil_models::data::{Labels, read_csv};
use veil_models::graph::{Reveal, Task};
use veil_models::{QuantConfig, compile, onnx};

#[derive(clap::Args)]
pub struct Args {
    /// The ONNX model (torch.onnx or skl2onnx export).
    model: PathBuf,
    /// CSV of calibration samples (features in model-input order; a last `label` column is ignored; a
    /// last `target` column is ignored too, and marks the model as a regressor).
    #[arg(long)]
    calibration: PathBuf,
    /// Where to write the compiled model (.veil).
    #[arg(short, long)]
    output: PathBuf,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    json: bool,
    /// Bits per input feature.
    #[arg(long, default_value_t = QuantConfig::default().input_bits)]
    input_bits: u32,
    /// Bits per weight of the first layer (signed).
    #[arg(long, default_value_t = QuantConfig::default().first_weight_bits)]
    first_weight_bits: u32,
    /// Bits per weight of later layers (signed); their noise grows with the weights.
    #[arg(long, default_value_t = QuantConfig::default().weight_bits)]
    weight_bits: u32,
    /// Bits per hidden activation.
    #[arg(long, default_value_t = QuantConfig::default().act_bits)]
    act_bits: u32,
    /// Margin around calibrated accumulator ranges, as a fraction of their width.
    #[arg(long, default_value_t = QuantConfig::default().range_margin)]
    margin: f64,
    /// Most bits kept of an activation grid the model fixes (QDQ models).
    #[arg(long, default_value_t = QuantConfig::default().model_grid_bits)]
    model_grid_bits: u32,
    /// Use exactly the widths given; by default later-layer weight bits and model grid bits
    /// are chosen per model by simulating candidates with the predicted bootstrap noise.
    #[arg(long)]
    fixed_widths: bool,
    /// What the client's decrypted result reveals: the model's scores, or only the predicted
    /// class (the argmax runs under encryption, costing K(K-1)/2 + K more bootstraps).
    #[arg(long, default_value = "scores", value_parser = ["scores", "label"])]
    reveal: String,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let mut float =
        onnx::import_file(&a.model).with_context(|| format!("importing {}", a.model.display()))?;
    let calib = read_csv(&a.calibration, float.n_features(), Labels::Optional)?;
    // A network's outputs do not say whether they are scores or values; a calibration file
    // with a `target` column says they are values.
    if calib.targets.is_some() {
        float.task = Task::Regression;
    }
    let reveal = match a.reveal.as_str() {
        "label" => Reveal::Label,
        _ => Reveal::Scores,
    };
    if reveal == Reveal::Label && float.task == Task::Regression {
        anyhow::bail!("--reveal label needs a classifier; this model predicts values");
    }
    let float = float.with_reveal(reveal)?;
    let cfg = QuantConfig {
        input_bits: a.input_bits,
        first_weight_bits: a.first_weight_bits,
        weight_bits: a.weight_bits,
        act_bits: a.act_bits,
        range_margin: a.margin,
        model_grid_bits: a.model_grid_bits,
        search: !a.fixed_widths,
    };
    let compiled = compile(&float, &calib.features, &cfg)?;
    compiled.save(&a.output)?;
    // On stderr, so that `--json` output stays parseable.
    for w in compiled.rounding.iter().filter_map(|r| r.warning()) {
        eprintln!("warning: {w}");
    }
    let mut summary = compiled.summary();
    summary["output"] = serde_json::json!(a.output.display().to_string());
    summary["calibration_samples"] = serde_json::json!(calib.len());
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!(
            "compiled {} -> {}: reveals {}, {} bootstraps per sample ({} for the argmax), \
             {} bytes per response, widest accumulator {} bits, {}",
            a.model.display(),
            a.output.display(),
            compiled.reveal.name(),
            summary["pbs_per_sample"],
            summary["argmax_pbs_per_sample"],
            summary["response_bytes_per_sample"],
            summary["widest_accumulator_bits"],
            compiled.params.name()
        );
    }
    Ok(())
}
