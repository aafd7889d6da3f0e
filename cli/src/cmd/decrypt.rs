//! `veil decrypt`: the results of an encrypted model (`veil run`) decrypted with the model
//! owner's key, locally (`--keys`, the owner) or by her server (`--server`, whoever ran it),
//! and printed one prediction per row.

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
    #[arg(long, required_unless_present = "server", conflicts_with = "server")]
    keys: Option<PathBuf>,
    /// Or ask the model owner's server (`veil-server --owner-keys`) to decrypt them.
    #[command(flatten)]
    conn: Option<super::conn::Conn>,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    match (&a.keys, &a.conn) {
        (Some(dir), _) => local(&a, dir),
        (None, Some(conn)) => remote(&a, conn).await,
        (None, None) => bail!("give --keys DIR (the owner's keys) or --server URL"),
    }
}

/// Asks the owner's server: the rows never travel, only the encrypted results.
async fn remote(a: &Args, conn: &super::conn::Conn) -> anyhow::Result<()> {
    let bytes = EncryptedResults::read(&a.results)?;
    let client = conn.connect().await?;
    let answer = client.decrypt_results(bytes).await?;
    if a.json {
        let out = serde_json::json!({
            "model_digest": answer.model_digest,
            "reveal": answer.reveal,
            "rows": answer.predictions.iter().map(|p| serde_json::json!({
                "label": p.label,
                "outputs": if p.outputs.is_empty() {
                    serde_json::Value::Null
                } else {
                    serde_json::json!(p.outputs)
                },
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        for (i, p) in answer.predictions.iter().enumerate() {
            let outs: Vec<String> = p.outputs.iter().map(|v| format!("{v:.6}")).collect();
            match outs.is_empty() {
                true => println!("{i}\t{}", p.label),
                false => println!("{i}\t{}\t{}", p.label, outs.join(",")),
            }
        }
    }
    Ok(())
}

fn local(a: &Args, keys_dir: &std::path::Path) -> anyhow::Result<()> {
    let keys = KeyPair::load(keys_dir)?;
    let bytes = EncryptedResults::read(&a.results)?;
    let (digest, key_id) = EncryptedResults::names(&bytes)
        .with_context(|| format!("reading {}", a.results.display()))?;
    if key_id != keys.key_id {
        bail!(
            "{} was computed for key {key_id}; {} holds key {}: only the key the model was \
             encrypted under decrypts it",
            a.results.display(),
            keys_dir.display(),
            keys.key_id
        );
    }
    let path = owner_model_path(keys_dir, &digest)?;
    if !path.exists() {
        bail!(
            "{} names model {digest}, which {} does not hold: the results come from a model \
             these keys did not encrypt (or its clear copy was removed)",
            a.results.display(),
            keys_dir.join("models").display()
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
