//! `veil keys list|upload|delete` and `veil health` against a real server with two tenants:
//! each tenant sees only its own keys.

use std::process::Command;
use std::sync::Arc;

use veil_server::{Config, Tenants};
use veil_tests::*;

const TMP: &str = env!("CARGO_TARGET_TMPDIR");

/// Runs `veil` with `args` and `VEIL_TOKEN` off the async runtime.
async fn veil(args: &[&str], token: Option<&str>) -> (i32, String, String) {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let token = token.map(str::to_string);
    tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_veil"));
        cmd.args(&args).env_remove("VEIL_TOKEN");
        if let Some(t) = token {
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

fn ids(json: &str) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json}"));
    v.as_array()
        .unwrap()
        .iter()
        .map(|k| k["key_id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn veil_keys_and_health_against_a_real_server() {
    let models = TempDir::new(TMP, "cli-keys-models");
    let data = TempDir::new(TMP, "cli-keys-data");
    let files = TempDir::new(TMP, "cli-keys-files");
    install_model(models.path(), "iris", &compile_zoo("iris_logreg"));
    let mut config = Config::new(models.path(), data.path());
    config.tenants = Some(Arc::new(
        Tenants::parse(&format!(
            "{}{}",
            tenant_toml("acme", "acme-token", ""),
            tenant_toml("other", "other-token", "")
        ))
        .unwrap(),
    ));
    let server = TestServer::start(config).await;
    let url = server.url();
    let keys_dir = files.path().join("keys");
    let keys_arg = keys_dir.display().to_string();

    let (code, _, err) = veil(&["keygen", "--output", &keys_arg], None).await;
    assert_eq!(code, 0, "{err}");
    let key_id = veil_client::KeyPair::load(&keys_dir).unwrap().key_id;

    let list = |token: &'static str| {
        let url = url.clone();
        async move {
            let (code, out, err) =
                veil(&["keys", "list", "--json", "--server", &url], Some(token)).await;
            assert_eq!(code, 0, "{err}");
            ids(&out)
        }
    };
    assert!(list("acme-token").await.is_empty());

    let upload = &["keys", "upload", "--server", &url, "--keys", &keys_arg];
    let (code, out, err) = veil(upload, Some("acme-token")).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), format!("{key_id} uploaded"));
    let (code, out, err) = veil(upload, Some("acme-token")).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), format!("{key_id} already stored"));

    assert_eq!(list("acme-token").await, vec![key_id.clone()]);
    // Another tenant sees none of acme's keys, and cannot delete them.
    assert!(list("other-token").await.is_empty());
    let delete = &["keys", "delete", "--server", &url, &key_id];
    let (code, _, err) = veil(delete, Some("other-token")).await;
    assert_ne!(code, 0);
    assert!(err.contains("unknown key id"), "{err}");
    assert_eq!(list("acme-token").await, vec![key_id.clone()]);
    // Without a token: refused.
    let (code, _, err) = veil(&["keys", "list", "--server", &url], None).await;
    assert_ne!(code, 0);
    assert!(err.to_lowercase().contains("token"), "{err}");

    let (code, out, err) = veil(delete, Some("acme-token")).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("deleted"), "{out}");
    assert!(list("acme-token").await.is_empty());

    let (code, out, err) = veil(&["health", "--server", &url], None).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "SERVING");
    server.stop().await;
}
