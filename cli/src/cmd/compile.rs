use std::path::PathBuf;

use anyhow::Context;
use veil_models::data::{Labels, read_csv};
use veil_models::graph::{Reveal, Task};
use veil_models::{QuantConfig, compile, onnx};
use veil_runtime::encrypted_model::{EncryptedModel, owner_model_path};

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
    /// What the decrypted result reveals: the model's scores, or only the predicted class
    /// (the argmax runs under encryption, costing K(K-1)/2 + K more bootstraps). Default:
    /// scores, or label with --encrypt-model (the owner then learns only the class).
    #[arg(long, value_parser = ["scores", "label"])]
    reveal: Option<String>,
    /// Encrypt the model's weights, constants and tables under the owner's key (--keys):
    /// the output file holds no clear weight; `veil run` evaluates it on clear rows and only
    /// this key decrypts the results (`veil decrypt`).
    #[arg(long, requires = "keys")]
    encrypt_model: bool,
    /// The owner's key directory from `veil keygen` (with --encrypt-model). Its eval.key goes
    /// with the encrypted model; the clear compiled model is kept in its models/ folder.
    #[arg(long)]
    keys: Option<PathBuf>,
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
    let reveal = match a.reveal.as_deref() {
        Some("label") => Reveal::Label,
        Some(_) => Reveal::Scores,
        None if a.encrypt_model && float.task == Task::Classification => Reveal::Label,
        None => Reveal::Scores,
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
        keep_zero_weights: a.encrypt_model,
    };
    let compiled = compile(&float, &calib.features, &cfg)?;
    if a.encrypt_model {
        let keys = a.keys.as_deref().context("--encrypt-model needs --keys")?;
        return encrypt(&a, &compiled, keys, calib.len());
    }
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

/// `--encrypt-model`: encrypts the compiled model under the owner's key, writes it, and keeps
/// the clear model in the key directory, where `veil decrypt` finds it by digest.
fn encrypt(
    a: &Args,
    compiled: &veil_models::CompiledModel,
    keys_dir: &std::path::Path,
    calibration_samples: usize,
) -> anyhow::Result<()> {
    let keys = veil_client::KeyPair::load(keys_dir)?;
    let t = std::time::Instant::now();
    let sealed = EncryptedModel::encrypt(compiled, &keys.client, &keys.key_id)?;
    let encrypt_s = t.elapsed().as_secs_f64();
    sealed.save(&a.output)?;
    let own = owner_model_path(keys_dir, sealed.digest())?;
    std::fs::create_dir_all(own.parent().expect("a models folder"))
        .with_context(|| format!("creating {}", keys_dir.join("models").display()))?;
    compiled.save(&own)?;
    let bytes = std::fs::metadata(&a.output)?.len();
    let summary = serde_json::json!({
        "model": a.model.display().to_string(),
        "output": a.output.display().to_string(),
        "encrypted": true,
        "reveal": compiled.reveal.name(),
        "digest": sealed.digest(),
        "key_id": keys.key_id,
        "pbs_per_sample": sealed.pbs_per_sample(),
        "clear_model_pbs_per_sample": compiled.pbs_per_sample(),
        "encrypted_weights": sealed.n_encrypted_weights(),
        "encrypted_tables": sealed.pbs_per_sample(),
        "file_bytes": bytes,
        "owner_copy": own.display().to_string(),
        "encrypt_s": encrypt_s,
        "calibration_samples": calibration_samples,
        "parameter_set": compiled.params.name(),
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!(
            "encrypted {} -> {} ({:.1} MB, digest {}): reveals {} to the key's owner, {} \
             bootstraps per sample ({} for the same model with clear weights)\n\
             give {} and {}/eval.key to whoever runs it; keep {} (the clear model, found \
             again by `veil decrypt`)",
            a.model.display(),
            a.output.display(),
            bytes as f64 / 1e6,
            &sealed.digest()[..16],
            compiled.reveal.name(),
            sealed.pbs_per_sample(),
            compiled.pbs_per_sample(),
            a.output.display(),
            keys_dir.display(),
            own.display()
        );
    }
    Ok(())
}
