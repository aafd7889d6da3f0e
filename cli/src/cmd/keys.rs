//! `veil keys list|upload|delete`: the caller's evaluation keys on a server.

use std::path::PathBuf;

use anyhow::Context;
use veil_client::KeyPair;

use super::conn::Conn;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: KeysCommand,
}

#[derive(clap::Subcommand)]
enum KeysCommand {
    /// List your keys stored on the server (id, parameter set, size, last use).
    List {
        #[command(flatten)]
        conn: Conn,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Upload the evaluation key of a key directory (`veil keygen`), unless already stored.
    Upload {
        #[command(flatten)]
        conn: Conn,
        /// Key directory written by `veil keygen`.
        #[arg(long)]
        keys: PathBuf,
    },
    /// Delete one of your keys from the server.
    Delete {
        #[command(flatten)]
        conn: Conn,
        /// The key id (64 hex characters), as `veil keys list` shows it.
        key_id: String,
    },
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    match a.command {
        KeysCommand::List { conn, json } => {
            let keys = conn.connect().await?.list_keys().await?;
            if json {
                let list: Vec<_> = keys
                    .iter()
                    .map(|k| {
                        serde_json::json!({
                            "key_id": k.key_id,
                            "parameter_set": k.parameter_set,
                            "size_bytes": k.size_bytes,
                            "last_used_unix_s": k.last_used_unix_s,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(());
            }
            println!(
                "{:<64} {:>10} {:>12}  parameter set",
                "key id", "MB", "last used"
            );
            for k in &keys {
                println!(
                    "{:<64} {:>10.1} {:>12}  {}",
                    k.key_id,
                    k.size_bytes as f64 / 1e6,
                    k.last_used_unix_s,
                    k.parameter_set
                );
            }
        }
        KeysCommand::Upload { conn, keys } => {
            let pair = KeyPair::load(&keys)
                .with_context(|| format!("loading the keys in {}", keys.display()))?;
            let status = conn.connect().await?.ensure_key(&pair, |_, _| {}).await?;
            println!(
                "{} {}",
                status.key_id,
                if status.uploaded {
                    "uploaded"
                } else {
                    "already stored"
                }
            );
        }
        KeysCommand::Delete { conn, key_id } => {
            let freed = conn.connect().await?.delete_key(&key_id).await?;
            println!("{key_id} deleted ({freed} bytes freed)");
        }
    }
    Ok(())
}
