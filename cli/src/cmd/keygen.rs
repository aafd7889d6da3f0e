use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use veil_client::{KeyPair, keys::PARAM_SETS, param_set_by_name};

#[derive(clap::Args)]
pub struct Args {
    /// Directory to write client.key (secret), eval.key (to upload) and keys.json into.
    #[arg(short, long)]
    output: PathBuf,
    /// TFHE parameter set; it must match the models you will use.
    #[arg(long, default_value = PARAM_SETS[0].name())]
    params: String,
    /// Replace keys already in the directory.
    #[arg(long)]
    force: bool,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let params = param_set_by_name(&a.params).with_context(|| {
        let known: Vec<_> = PARAM_SETS.iter().map(|p| p.name()).collect();
        format!(
            "unknown parameter set {}; known: {}",
            a.params,
            known.join(", ")
        )
    })?;
    let t = Instant::now();
    eprintln!("generating keys ({})...", params.name());
    let keys = KeyPair::generate(params);
    let keygen_s = t.elapsed().as_secs_f64();
    keys.save(&a.output, a.force)?;
    let out = serde_json::json!({
        "dir": a.output.display().to_string(),
        "parameter_set": params.name(),
        "key_id": keys.key_id,
        "eval_key_bytes": keys.eval_key.len(),
        "keygen_s": keygen_s,
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "keys in {}: key id {}, evaluation key {:.1} MB ({}), generated in {:.1} s\n\
             client.key is your secret key: keep it; only eval.key is uploaded",
            a.output.display(),
            keys.key_id,
            keys.eval_key.len() as f64 / 1e6,
            params.name(),
            keygen_s
        );
    }
    Ok(())
}
