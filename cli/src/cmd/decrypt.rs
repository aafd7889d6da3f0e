//! `veil decrypt`: the model owner decrypts the results of her encrypted model
//! (`veil run`) with her key, and prints the predictions.

use std::path::PathBuf;

use anyhow::{Context, bail};
use veil_client::KeyPair;
use veil_models::CompiledModel;
use veil_runtime::encrypted_model::{EncryptedResults, owner_model_path};

#[derive(clap::Args)]
pub struct Args {
    /// The results file from `veil run`.
    results: PathBuf,
    /// The key directory the model was encrypted with (`veil compile --encrypt-model --keys`).
    #[arg(long)]
    keys: PathBuf,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let keys = KeyPair::load(&a.keys)?;
    let bytes = EncryptedResults::read(&a.results)?;
    let (digest, key_id) = EncryptedResults::names(&bytes)
        .with_context(|| format!("reading {}", a.results.display()))?;
    if key_id != keys.key_id {
        bail!(
            "{} was computed for key {key_id}; {} holds key {}: only the key the model was \
             encrypted under decrypts it",
            a.results.display(),
            a.keys.display(),
            keys.key_id
        );
    }
    let path = owner_model_path(&a.keys, &digest)?;
    if !path.exists() {
        bail!(
            "{} names model {digest}, which {} does not hold: the results come from a model \
             these keys did not encrypt (or its clear copy was removed)",
            a.results.display(),
            a.keys.join("models").display()
        );
    }
    let model = CompiledModel::load(&path)?;
    let results = EncryptedResults::from_bytes(
        &bytes,
        model.params,
        model.n_outputs(),
        model.output.decoding.modulus_bits,
    )?;
    let accs = results.decrypt(&keys.client, &keys.key_id, &model)?;
    let mut rows = Vec::with_capacity(accs.len());
    for (i, acc) in accs.iter().enumerate() {
        let p = model.decode(acc).with_context(|| {
            format!("row {i}: the decrypted output is not a prediction of this model")
        })?;
        rows.push(p);
    }
    if a.json {
        let out = serde_json::json!({
            "model_digest": digest,
            "reveal": model.reveal.name(),
            "rows": rows.iter().map(|p| serde_json::json!({
                "label": p.label,
                "outputs": if model.reveal == veil_format::tail::Reveal::Scores {
                    serde_json::json!(p.outputs)
                } else {
                    serde_json::Value::Null
                },
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        for (i, p) in rows.iter().enumerate() {
            match model.reveal {
                veil_format::tail::Reveal::Label => println!("{i}\t{}", p.label),
                veil_format::tail::Reveal::Scores => {
                    let outs: Vec<String> = p.outputs.iter().map(|v| format!("{v:.6}")).collect();
                    println!("{i}\t{}\t{}", p.label, outs.join(","));
                }
            }
        }
    }
    Ok(())
}
