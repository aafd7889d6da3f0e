//! How `veil` reaches a server: URL, TLS files and the bearer token.

use std::path::PathBuf;

use anyhow::{Context, bail};
use veil_client::{Client, ConnectOptions};

/// Environment variable holding the bearer token (`--token-file` takes precedence).
pub const TOKEN_ENV: &str = "VEIL_TOKEN";

#[derive(clap::Args)]
pub struct Conn {
    /// Server URL, e.g. http://127.0.0.1:50051 or https://veil.example.com:50051.
    #[arg(long)]
    pub server: String,
    /// PEM file of the CA that signed the server's certificate (https:// only; default: the
    /// system's trusted roots).
    #[arg(long)]
    ca_cert: Option<PathBuf>,
    /// PEM client certificate, for servers that require one (mutual TLS).
    #[arg(long, requires = "client_key")]
    client_cert: Option<PathBuf>,
    /// PEM private key of --client-cert.
    #[arg(long, requires = "client_cert")]
    client_key: Option<PathBuf>,
    /// File holding the bearer token (first line); otherwise $VEIL_TOKEN, if set.
    #[arg(long)]
    token_file: Option<PathBuf>,
}

impl Conn {
    fn token(&self) -> anyhow::Result<Option<String>> {
        let token = match &self.token_file {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading the token file {}", p.display()))?;
                Some(text.lines().next().unwrap_or("").trim().to_string())
            }
            None => std::env::var(TOKEN_ENV).ok().map(|t| t.trim().to_string()),
        };
        if token.as_deref() == Some("") {
            bail!("the token is empty (check --token-file or ${TOKEN_ENV})");
        }
        Ok(token)
    }

    pub async fn connect(&self) -> anyhow::Result<Client> {
        let options = ConnectOptions {
            token: self.token()?,
            ..ConnectOptions::default()
        }
        .with_pem_files(
            self.ca_cert.as_deref(),
            self.client_cert.as_deref(),
            self.client_key.as_deref(),
        )?;
        Ok(Client::connect_with(&self.server, &options).await?)
    }
}
