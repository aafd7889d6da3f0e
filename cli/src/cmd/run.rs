//! `veil run`: evaluates an encrypted model (`veil compile --encrypt-model`) on clear rows,
//! on this machine; the results are encrypted under the model owner's key.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use veil_format::digest::key_id;
use veil_models::data::{Labels, read_csv};
use veil_runtime::encrypted_model::{EncryptedModel, EncryptedResults};
use veil_runtime::keys::{MAX_EVAL_KEY_BYTES, eval_key_from_bytes};
use veil_runtime::{BackendKind, EvalKey};

#[derive(clap::Args)]
pub struct Args {
    /// The encrypted model (.enc.veil) from its owner.
    model: PathBuf,
    /// The owner's evaluation key (eval.key), given with the model.
    #[arg(long)]
    eval_key: PathBuf,
    /// CSV of your rows (features in model-input order; a `label` or `target` column is
    /// ignored). They stay on this machine.
    #[arg(long)]
    data: PathBuf,
    /// Where to write the encrypted results (for the owner's `veil decrypt`).
    #[arg(short, long)]
    output: PathBuf,
    /// Use only the first N rows.
    #[arg(long)]
    limit: Option<usize>,
    /// Rows evaluated together (one bootstrap batch per layer).
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Where bootstraps run: cpu, or gpu (a build with the `gpu` feature). Default: the GPU
    /// when there is one.
    #[arg(long)]
    backend: Option<BackendKind>,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if a.batch == 0 {
        bail!("--batch must be at least 1");
    }
    let model =
        EncryptedModel::load(&a.model).with_context(|| format!("loading {}", a.model.display()))?;
    let meta = std::fs::metadata(&a.eval_key)
        .with_context(|| format!("reading {}", a.eval_key.display()))?;
    if meta.len() > MAX_EVAL_KEY_BYTES {
        bail!(
            "{} is {} bytes, more than an evaluation key's {MAX_EVAL_KEY_BYTES}",
            a.eval_key.display(),
            meta.len()
        );
    }
    let key_bytes =
        std::fs::read(&a.eval_key).with_context(|| format!("reading {}", a.eval_key.display()))?;
    let id = key_id(&key_bytes);
    if id != model.key_id() {
        bail!(
            "{} was encrypted for evaluation key {}, and {} is key {id}: use the eval.key \
             its owner gave with it",
            a.model.display(),
            model.key_id(),
            a.eval_key.display()
        );
    }
    let mut data = read_csv(&a.data, model.n_features(), Labels::Optional)
        .with_context(|| format!("reading {}", a.data.display()))?;
    if let Some(n) = a.limit {
        data.truncate(n);
    }
    if data.is_empty() {
        bail!("{} holds no rows", a.data.display());
    }
    let rows: Vec<Vec<i64>> = data
        .features
        .iter()
        .enumerate()
        .map(|(i, x)| model.quantize_row(i, x))
        .collect::<Result<_, _>>()?;

    let t = Instant::now();
    let kind = a
        .backend
        .unwrap_or_else(BackendKind::default_for_this_machine);
    let compressed = eval_key_from_bytes(model.params(), &key_bytes)?;
    let key = EvalKey::from_compressed(kind, model.params(), &compressed)?;
    let runnable = model.expand()?;
    let setup_s = t.elapsed().as_secs_f64();

    let bar = if a.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(rows.len() as u64).with_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} rows, {elapsed} ({eta} left)")
                .expect("valid template")
                .progress_chars("=> "),
        )
    };
    let t = Instant::now();
    let backend = key.backend();
    let mut outputs = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(a.batch) {
        outputs.extend(runnable.evaluate(backend.as_ref(), chunk)?);
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    let run_s = t.elapsed().as_secs_f64();
    let results = EncryptedResults {
        model_digest: model.digest().to_string(),
        key_id: model.key_id().to_string(),
        outputs,
    };
    results.save(&a.output)?;
    let bytes = std::fs::metadata(&a.output)?.len();
    let out = serde_json::json!({
        "model": a.model.display().to_string(),
        "digest": model.digest(),
        "reveals": model.reveal().name(),
        "rows": rows.len(),
        "backend": kind.name(),
        "pbs_per_sample": model.pbs_per_sample(),
        "setup_s": setup_s,
        "run_s": run_s,
        "seconds_per_row": run_s / rows.len() as f64,
        "output": a.output.display().to_string(),
        "output_bytes": bytes,
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "ran {} rows on {} ({} bootstraps each) in {:.1} s ({:.2} s per row, {:.1} s to \
             load the key and model) -> {} ({} bytes)\nthe results are encrypted under the \
             model owner's key; decrypted, they reveal the {} of each row to the owner",
            rows.len(),
            kind.name(),
            model.pbs_per_sample(),
            run_s,
            run_s / rows.len() as f64,
            setup_s,
            a.output.display(),
            bytes,
            match model.reveal() {
                veil_format::tail::Reveal::Label => "predicted class",
                veil_format::tail::Reveal::Scores => "model's scores",
            }
        );
    }
    Ok(())
}
