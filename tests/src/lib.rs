//! Helpers for the end-to-end tests: compile shipped models into a temporary directory,
//! start the real server on a loopback port, check its health.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

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
    let float = onnx::import_file(&zoo_dir(name).join("model.onnx")).expect("zoo model imports");
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

/// The real server, running in-process on a loopback port until [`TestServer::stop`].
pub struct TestServer {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<()>,
}

impl TestServer {
    /// Loads the models and serves on 127.0.0.1 with a free port.
    pub async fn start(config: Config) -> TestServer {
        let server = Server::load(config).await.expect("server loads");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().unwrap();
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
            stop: Some(tx),
            handle,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
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
    let spread = sim.accs.iter().fold(0.0f64, |m, a| m.max(a.abs())).max(1.0);
    for (e, s) in accs.iter().zip(&sim.accs) {
        assert!(
            (e - s).abs() < 0.25 * spread,
            "encrypted {accs:?} vs simulated {:?}",
            sim.accs
        );
    }
    model.decode(accs).label == model.decode(&sim.accs).label
}
