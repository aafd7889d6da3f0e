//! Helpers for the end-to-end tests: compile shipped models into a temporary directory,
//! start the real server on a loopback port, check its health.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use veil_models::Simulate;

use tokio::sync::oneshot;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use veil_models::data::{Dataset, Labels, read_csv};
use veil_models::{CompiledModel, QuantConfig, compile, onnx};
use veil_server::{Config, Server};

/// The shipped model zoo.
pub fn zoo_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../models/zoo")
        .join(name)
}

/// Compiles a zoo model with the default quantization, as `veil compile` does.
pub fn compile_zoo(name: &str) -> CompiledModel {
    compile_zoo_revealing(name, veil_models::graph::Reveal::Scores)
}

/// [`compile_zoo`] with a reveal mode, as `veil compile --reveal` does.
pub fn compile_zoo_revealing(name: &str, reveal: veil_models::graph::Reveal) -> CompiledModel {
    let float = onnx::import_file(&zoo_dir(name).join("model.onnx"))
        .expect("zoo model imports")
        .with_reveal(reveal)
        .expect("a zoo classifier has a label mode");
    let train = read_csv(
        &zoo_dir(name).join("train.csv"),
        float.n_features(),
        Labels::Optional,
    )
    .expect("zoo calibration data");
    compile(&float, &train.features, &QuantConfig::default()).expect("zoo model compiles")
}

/// The zoo model's test set.
pub fn test_set(name: &str, n_features: usize) -> Dataset {
    read_csv(
        &zoo_dir(name).join("test.csv"),
        n_features,
        Labels::Required,
    )
    .expect("test set")
}

/// The address a `veil-server` process prints on its first line of stdout.
pub fn read_listen_address(out: &mut impl std::io::BufRead) -> String {
    let mut line = String::new();
    out.read_line(&mut line).expect("veil-server's stdout");
    line.trim()
        .strip_prefix("veil-server listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string()
}

/// A fresh directory under `root`, removed when dropped.
pub struct TempDir(pub PathBuf);

static COUNTER: AtomicU64 = AtomicU64::new(0);

impl TempDir {
    pub fn new(root: &str, label: &str) -> Self {
        let dir = Path::new(root).join(format!(
            "{label}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The real server, running in-process on a loopback port until [`TestServer::stop`], with
/// its metrics on a second loopback port.
pub struct TestServer {
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    tls: bool,
    stop: Option<oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<()>,
}

impl TestServer {
    /// Loads the models and serves on 127.0.0.1 with a free port.
    pub async fn start(config: Config) -> TestServer {
        let tls = config.tls.is_some();
        let server = Server::load(config).await.expect("server loads");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().unwrap();
        let metrics_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let metrics_addr = metrics_listener.local_addr().unwrap();
        let server = server.with_metrics_listener(metrics_listener);
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(async move {
            server
                .serve(listener, async move {
                    let _ = rx.await;
                })
                .await
                .expect("server runs");
        });
        TestServer {
            addr,
            metrics_addr,
            tls,
            stop: Some(tx),
            handle,
        }
    }

    /// `http://` or, when the server has TLS, `https://` and its loopback address.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// The Prometheus text the server exports, fetched over HTTP as a scraper would.
    pub async fn metrics(&self) -> String {
        scrape(self.metrics_addr).await
    }

    /// Asks the server to stop (as SIGTERM does) without waiting for it.
    pub fn begin_stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }

    /// Graceful shutdown, as on SIGTERM; waits until the server has stopped.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(std::time::Duration::from_secs(30), &mut self.handle)
            .await
            .expect("server stops within 30 s")
            .expect("server task ends cleanly");
    }
}

/// `GET /metrics` on `addr`; the body.
pub async fn scrape(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the metrics port");
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: veil\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(
        out.starts_with("HTTP/1.1 200"),
        "metrics answer: {out:.200}"
    );
    out.split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_string())
}

/// The value of one sample of the exposition text: `name` with its labels exactly as printed
/// (`veil_requests_total{code="OK",method="Infer"}`), or a bare name. A missing sample fails
/// the test: read as 0 it would let a renamed or unregistered metric pass every `== 0` check.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (n, v) = l.rsplit_once(' ')?;
            (n == name).then(|| v.parse().ok())?
        })
        .unwrap_or_else(|| panic!("no metric sample {name} in\n{text}"))
}

/// A test CA and certificates it signed: the server's (for 127.0.0.1 and localhost) and a
/// client's; plus an unrelated CA.
pub struct Pki {
    pub ca_pem: String,
    pub server_cert_pem: String,
    pub server_key_pem: String,
    pub client_cert_pem: String,
    pub client_key_pem: String,
    /// A second client certificate of the same CA, for `stranger.test` (URI
    /// `spiffe://test/stranger`, CN `stranger`).
    pub stranger_cert_pem: String,
    pub stranger_key_pem: String,
    pub other_ca_pem: String,
}

impl Pki {
    pub fn generate() -> Pki {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
            IsCa, KeyPair, SanType,
        };
        let ca = |name: &str| {
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.distinguished_name.push(DnType::CommonName, name);
            CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap()
        };
        let root = ca("Veil test CA");
        let other = ca("Another CA");
        let leaf = |names: Vec<String>, usage: ExtendedKeyUsagePurpose| {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::new(names.clone()).unwrap();
            if names[0] == "stranger.test" {
                p.distinguished_name.push(DnType::CommonName, "stranger");
                p.subject_alt_names
                    .push(SanType::URI("spiffe://test/stranger".try_into().unwrap()));
            }
            p.subject_alt_names
                .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
            p.extended_key_usages = vec![usage];
            let cert = p.signed_by(&key, &root).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert_pem, server_key_pem) = leaf(
            vec!["localhost".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client_cert_pem, client_key_pem) = leaf(
            vec!["client.test".into()],
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        let (stranger_cert_pem, stranger_key_pem) = leaf(
            vec!["stranger.test".into()],
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        Pki {
            stranger_cert_pem,
            stranger_key_pem,
            ca_pem: root.pem(),
            server_cert_pem,
            server_key_pem,
            client_cert_pem,
            client_key_pem,
            other_ca_pem: other.pem(),
        }
    }
}

/// A tenants file's `[[tenant]]` table for `name` with bearer `token` and extra TOML lines.
pub fn tenant_toml(name: &str, token: &str, extra: &str) -> String {
    format!(
        "[[tenant]]\nname = \"{name}\"\ntoken_sha256 = \"{}\"\n{extra}\n",
        veil_server::token_sha256(token)
    )
}

/// Writes `model` as `<dir>/<name>.veil`.
pub fn install_model(dir: &Path, name: &str, model: &CompiledModel) {
    model
        .save(&dir.join(format!("{name}.veil")))
        .expect("write model");
}

/// The server's overall health status (the empty service name) and the Veil service's.
pub async fn health(url: &str) -> (ServingStatus, ServingStatus) {
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .expect("connect for health");
    let h = HealthClient::new(channel);
    let status = |service: &'static str| {
        let mut h = h.clone();
        async move {
            let r = h
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .expect("health answers")
                .into_inner();
            ServingStatus::try_from(r.status).unwrap()
        }
    };
    let overall = status("").await;
    let veil = status("veil.v1.Veil").await;
    (overall, veil)
}

/// Asserts that the server answers health checks as SERVING.
pub async fn assert_healthy(url: &str) {
    let (overall, veil) = health(url).await;
    assert_eq!(overall, ServingStatus::Serving, "overall health");
    assert_eq!(veil, ServingStatus::Serving, "veil.v1.Veil health");
}

/// Asserts that decrypted accumulators `accs` are the encrypted result of `x`: each within
/// the noise of the exact simulation (bootstrap reads may be off by one activation step,
/// which the output weights amplify: up to ~9% of the largest accumulator was seen over
/// repeated runs, so the bound is 25%; another sample's result errs by the spread itself).
/// Returns whether the decoded labels agree.
pub fn check_sample_against_simulation(model: &CompiledModel, x: &[f64], accs: &[f64]) -> bool {
    let sim = model.simulate(x, None).unwrap();
    // Bounds from the plan's own noise model (seeded, deterministic), not a share of the
    // scores: a bias in the encoding larger than the predicted noise fails here.
    let bound = model.predicted_deviation(x, 300, 11).unwrap();
    for ((e, s), b) in accs.iter().zip(&sim.accs).zip(&bound) {
        assert!(
            (e - s).abs() <= *b,
            "encrypted {accs:?} vs simulated {:?}, bounds {bound:?}",
            sim.accs
        );
    }
    model.decode(accs).unwrap().label == model.decode(&sim.accs).unwrap().label
}

/// Polls the server's metrics until `ready` holds for them; returns them. Panics naming
/// `what` after two minutes, so a broken server fails the test instead of hanging it.
pub async fn wait_for_metrics(
    server: &TestServer,
    what: &str,
    mut ready: impl FnMut(&str) -> bool,
) -> String {
    let limit = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let m = server.metrics().await;
        if ready(&m) {
            return m;
        }
        assert!(
            std::time::Instant::now() < limit,
            "gave up waiting for {what}; metrics:\n{m}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}
