//! TLS and mutual TLS, with a CA and certificates made here; a plaintext client against the
//! TLS port fails cleanly; a token works over TLS.

use std::sync::Arc;
use std::time::Duration;

use veil_client::{Client, ConnectOptions};
use veil_server::{Config, Tenants, TlsFiles};
use veil_tests::*;

const TMP: &str = env!("CARGO_TARGET_TMPDIR");

async fn serve(
    label: &str,
    pki: &Pki,
    mutual: bool,
    tenants: Option<&str>,
) -> (TestServer, TempDir, TempDir) {
    let models = TempDir::new(TMP, &format!("{label}-models"));
    let data = TempDir::new(TMP, &format!("{label}-data"));
    install_model(models.path(), "iris", &compile_zoo("iris_logreg"));
    let mut config = Config::new(models.path(), data.path());
    config.tls = Some(TlsFiles {
        cert_pem: pki.server_cert_pem.clone().into_bytes(),
        key_pem: pki.server_key_pem.clone().into_bytes(),
        client_ca_pem: mutual.then(|| pki.ca_pem.clone().into_bytes()),
    });
    config.tenants = tenants.map(|t| Arc::new(Tenants::parse(t).unwrap()));
    (TestServer::start(config).await, models, data)
}

/// Connects and lists the models, within a bound: Ok(number of models) or the error text.
async fn try_list(url: &str, options: ConnectOptions) -> Result<usize, String> {
    let attempt = async {
        let client = Client::connect_with(url, &options)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        client
            .list_models()
            .await
            .map(|m| m.len())
            .map_err(|e| format!("list: {e}"))
    };
    tokio::time::timeout(Duration::from_secs(30), attempt)
        .await
        .expect("the attempt ends (no hang)")
}

fn trusting(ca: &str) -> ConnectOptions {
    ConnectOptions {
        ca_cert_pem: Some(ca.as_bytes().to_vec()),
        ..ConnectOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_clients_that_trust_the_ca_and_refuses_the_rest() {
    let pki = Pki::generate();
    let (server, _m, _d) = serve("tls", &pki, false, None).await;
    let url = server.url();
    assert!(url.starts_with("https://"));

    assert_eq!(try_list(&url, trusting(&pki.ca_pem)).await, Ok(1));
    // A client that does not trust the server's CA refuses the connection.
    let err = try_list(&url, trusting(&pki.other_ca_pem))
        .await
        .unwrap_err();
    eprintln!("untrusted CA: {err}");
    // A plaintext client against the TLS port gets an error, not an answer or a hang.
    let plain = url.replace("https://", "http://");
    let err = try_list(&plain, ConnectOptions::default())
        .await
        .unwrap_err();
    eprintln!("plaintext client on the TLS port: {err}");
    // TLS options on a plaintext URL are a configuration error, before any connection.
    let err = Client::connect_with(&plain, &trusting(&pki.ca_pem))
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("https://"), "{err}");
    // The server still serves trusting clients afterwards.
    assert_eq!(try_list(&url, trusting(&pki.ca_pem)).await, Ok(1));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_requires_a_client_certificate_and_tokens_still_apply() {
    let pki = Pki::generate();
    let tenants = tenant_toml("acme", "acme-token", "");
    let (server, _m, _d) = serve("mtls", &pki, true, Some(&tenants)).await;
    let url = server.url();
    let with_cert = |token: Option<&str>| ConnectOptions {
        client_identity_pem: Some((
            pki.client_cert_pem.clone().into_bytes(),
            pki.client_key_pem.clone().into_bytes(),
        )),
        token: token.map(str::to_string),
        ..trusting(&pki.ca_pem)
    };

    // No client certificate: the handshake (or the first call) fails.
    let err = try_list(
        &url,
        ConnectOptions {
            token: Some("acme-token".into()),
            ..trusting(&pki.ca_pem)
        },
    )
    .await
    .unwrap_err();
    eprintln!("no client certificate: {err}");
    // A certificate but no token: the server knows the client but not the tenant.
    let err = try_list(&url, with_cert(None)).await.unwrap_err();
    assert!(err.contains("Unauthenticated"), "{err}");
    // Both: served.
    assert_eq!(try_list(&url, with_cert(Some("acme-token"))).await, Ok(1));
    server.stop().await;
}
