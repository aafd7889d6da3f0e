//! `veil` against a server with TLS and tenants: `--ca-cert`, the token from `--token-file`
//! or `VEIL_TOKEN`, and clear errors when one is missing or wrong.

use std::process::Command;
use std::sync::Arc;

use veil_server::{Config, Tenants, TlsFiles};
use veil_tests::*;

const TMP: &str = env!("CARGO_TARGET_TMPDIR");

/// Runs `veil` with `args` (and `VEIL_TOKEN` when given) off the async runtime.
async fn veil(args: Vec<String>, token_env: Option<&str>) -> (i32, String, String) {
    let token_env = token_env.map(str::to_string);
    tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_veil"));
        cmd.args(&args).env_remove("VEIL_TOKEN");
        if let Some(t) = token_env {
            cmd.env("VEIL_TOKEN", t);
        }
        let out = cmd.output().expect("veil runs");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn veil_speaks_tls_with_a_token() {
    let models = TempDir::new(TMP, "cli-tls-models");
    let data = TempDir::new(TMP, "cli-tls-data");
    let files = TempDir::new(TMP, "cli-tls-files");
    install_model(models.path(), "iris", &compile_zoo("iris_logreg"));
    let pki = Pki::generate();
    let mut config = Config::new(models.path(), data.path());
    config.tls = Some(TlsFiles {
        cert_pem: pki.server_cert_pem.clone().into_bytes(),
        key_pem: pki.server_key_pem.clone().into_bytes(),
        client_ca_pem: None,
    });
    config.tenants = Some(Arc::new(
        Tenants::parse(&tenant_toml("acme", "s3cret", "")).unwrap(),
    ));
    let server = TestServer::start(config).await;
    let ca = files.path().join("ca.pem");
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let token_file = files.path().join("token");
    std::fs::write(&token_file, "s3cret\n").unwrap();
    let base = |extra: &[&str]| {
        let mut a: Vec<String> = ["models", "--json", "--server", &server.url(), "--ca-cert"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.push(ca.display().to_string());
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };

    let token_arg = token_file.display().to_string();
    let (code, out, err) = veil(base(&["--token-file", &token_arg]), None).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"iris\""), "{out}");
    let (code, out, err) = veil(base(&[]), Some("s3cret")).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"iris\""), "{out}");

    let (code, _, err) = veil(base(&[]), None).await;
    assert_eq!(code, 1);
    assert!(
        err.contains("Unauthenticated") && err.contains("bearer token"),
        "{err}"
    );
    let (code, _, err) = veil(base(&[]), Some("wrong")).await;
    assert_eq!(code, 1);
    assert!(err.contains("unknown token"), "{err}");
    let missing = files.path().join("nope").display().to_string();
    let (code, _, err) = veil(base(&["--token-file", &missing]), None).await;
    assert_eq!(code, 1);
    assert!(err.contains("reading the token file"), "{err}");
    // Without the CA, the server's certificate is not trusted.
    let (code, _, err) = veil(
        vec![
            "models".into(),
            "--server".into(),
            server.url(),
            "--token-file".into(),
            token_arg.clone(),
        ],
        None,
    )
    .await;
    assert_eq!(code, 1);
    assert!(err.contains("certificate"), "{err}");
    // A client certificate needs its key.
    let (code, _, err) = veil(base(&["--client-cert", &token_arg]), None).await;
    assert_eq!(code, 2, "a usage error: {err}");
    server.stop().await;
}
