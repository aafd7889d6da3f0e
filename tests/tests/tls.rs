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
    let iris = compile_zoo("iris_logreg");
    install_model(models.path(), "iris", &iris);
    if label == "mtls-map" {
        install_model(models.path(), "iris_private", &iris);
    }
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

/// Client certificates map to tenants: a certificate whose SAN (DNS or URI) or CN a tenant
/// lists is that tenant without a token; another certificate of the same CA is
/// UNAUTHENTICATED; a token still works, and wins over the certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_map_to_tenants() {
    let pki = Pki::generate();
    // Carol is known by her certificate only and may use "iris"; dave has a token and may
    // use both models; the stranger's certificate is listed for erin by its URI SAN.
    let tenants = format!(
        "[[tenant]]\nname = \"carol\"\nclient_cert_names = [\"dns:client.test\"]\n\
         models = [\"iris\"]\n\n{}",
        tenant_toml("dave", "dave-token", "")
    );
    let (server, _m, _d) = serve("mtls-map", &pki, true, Some(&tenants)).await;
    let url = server.url();
    let as_client = |stranger: bool, token: Option<&str>| {
        let (c, k) = if stranger {
            (&pki.stranger_cert_pem, &pki.stranger_key_pem)
        } else {
            (&pki.client_cert_pem, &pki.client_key_pem)
        };
        ConnectOptions {
            client_identity_pem: Some((c.clone().into_bytes(), k.clone().into_bytes())),
            token: token.map(str::to_string),
            ..trusting(&pki.ca_pem)
        }
    };
    // Mapped certificate, no token: carol, who sees only her one model.
    assert_eq!(try_list(&url, as_client(false, None)).await, Ok(1));
    // Unmapped certificate, no token: UNAUTHENTICATED, naming what it presented.
    let err = try_list(&url, as_client(true, None)).await.unwrap_err();
    assert!(err.contains("Unauthenticated"), "{err}");
    assert!(err.contains("uri:spiffe://test/stranger"), "{err}");
    // A token still works, with either certificate: dave sees both models.
    assert_eq!(
        try_list(&url, as_client(true, Some("dave-token"))).await,
        Ok(2)
    );
    assert_eq!(
        try_list(&url, as_client(false, Some("dave-token"))).await,
        Ok(2)
    );
    let m = server.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"veil_requests_total{code="UNAUTHENTICATED",method="ListModels"}"#
        ),
        1.0
    );
    server.stop().await;

    // The same tenants file, now also mapping the stranger by its URI SAN and by CN.
    for name in ["uri:spiffe://test/stranger", "cn:stranger"] {
        let tenants = format!(
            "{tenants}\n[[tenant]]\nname = \"erin\"\nclient_cert_names = [\"{name}\"]\n\
             models = [\"iris_private\"]\n"
        );
        let (server, _m, _d) = serve("mtls-map", &pki, true, Some(&tenants)).await;
        let client = Client::connect_with(&server.url(), &as_client(true, None))
            .await
            .unwrap();
        let models = client.list_models().await.unwrap();
        assert_eq!(models.len(), 1, "{name}");
        assert_eq!(models[0].name(), "iris_private", "{name}");
        server.stop().await;
    }
}
