//! Veil's gRPC server: serves compiled models to clients who keep their own keys.
//!
//! The server holds the models and the clients' evaluation keys; it never sees a secret key,
//! a plaintext input or a plaintext result. [`Server::load`] reads the models and opens the
//! key store; [`Server::serve`] serves `veil.v1.Veil`, `grpc.health.v1.Health` and server
//! reflection until a shutdown signal.

pub mod batcher;
pub mod error;
pub mod key_store;
pub mod models;
pub mod service;
pub mod status;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use veil_proto::v1::veil_server::VeilServer;

pub use batcher::BatchPolicy;
pub use error::{Result, ServiceError};
pub use service::Limits;
pub use veil_models::fhe::BackendKind;

use key_store::KeyStore;
use models::{MAX_REQUEST_BYTES, MAX_RESPONSE_BYTES, Registry};
use service::VeilService;

/// Largest message the server decodes on health and reflection (they are tiny).
const MAX_SMALL_MESSAGE: usize = 64 << 10;

#[derive(Clone, Debug)]
pub struct Config {
    /// Directory of `*.veil` files; each is served under its file stem.
    pub models_dir: PathBuf,
    /// Where uploaded keys are kept across restarts.
    pub data_dir: PathBuf,
    /// Expanded keys kept in memory (~120 MB each for MESSAGE_2_CARRY_2).
    pub key_cache: usize,
    /// Most samples per Infer request (lowered per model to fit the message-size limits).
    pub max_batch: usize,
    /// Where bootstraps run; keys are expanded into this backend's form.
    pub backend: BackendKind,
    pub limits: Limits,
    /// After a shutdown signal, how long in-flight requests may take before the server
    /// drops them and stops anyway.
    pub shutdown_grace: Duration,
}

impl Config {
    pub fn new(models_dir: impl Into<PathBuf>, data_dir: impl Into<PathBuf>) -> Self {
        Config {
            models_dir: models_dir.into(),
            data_dir: data_dir.into(),
            key_cache: 4,
            max_batch: 256,
            backend: BackendKind::Cpu,
            limits: Limits::default(),
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// A loaded server, ready to serve.
pub struct Server {
    registry: Arc<Registry>,
    keys: Arc<KeyStore>,
    limits: Limits,
    shutdown_grace: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Load(#[from] ServiceError),
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

impl Server {
    /// Loads the models (building each executor once) and opens the key store. Blocking work
    /// runs off the async runtime.
    pub async fn load(config: Config) -> Result<Self, ServeError> {
        let Config {
            models_dir,
            data_dir,
            key_cache,
            max_batch,
            backend,
            limits,
            shutdown_grace,
        } = config;
        backend.check_available().map_err(ServiceError::Model)?;
        let registry =
            tokio::task::spawn_blocking(move || Registry::load(&models_dir, max_batch.max(1)))
                .await
                .map_err(|e| ServiceError::Internal(format!("loading models: {e}")))??;
        let keys = KeyStore::open(&data_dir, key_cache, backend)?;
        Ok(Server {
            registry: Arc::new(registry),
            keys: Arc::new(keys),
            limits,
            shutdown_grace,
        })
    }

    pub fn model_names(&self) -> Vec<String> {
        self.registry.models.keys().cloned().collect()
    }

    /// Serves on `listener` until `shutdown` completes, then stops accepting and lets
    /// in-flight requests finish, for at most the configured grace period.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<VeilServer<VeilService>>().await;
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(veil_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?
            .max_decoding_message_size(MAX_SMALL_MESSAGE);
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(veil_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()?
            .max_decoding_message_size(MAX_SMALL_MESSAGE);
        let veil = VeilServer::new(VeilService::new(self.registry, self.keys, self.limits))
            .max_decoding_message_size(MAX_REQUEST_BYTES)
            .max_encoding_message_size(MAX_RESPONSE_BYTES);
        let health_service = health_service.max_decoding_message_size(MAX_SMALL_MESSAGE);

        let reporter = health.clone();
        let (grace_tx, grace_rx) = tokio::sync::oneshot::channel::<()>();
        let grace = self.shutdown_grace;
        let shutdown = async move {
            shutdown.await;
            let _ = grace_tx.send(());
            tracing::info!("shutting down: no new requests, finishing those in flight");
            reporter.set_not_serving::<VeilServer<VeilService>>().await;
        };
        let serve = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            .concurrency_limit_per_connection(64)
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(veil)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown);
        let grace_over = async move {
            if grace_rx.await.is_ok() {
                tokio::time::sleep(grace).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            r = serve => r?,
            _ = grace_over => tracing::warn!(
                grace_s = grace.as_secs_f64(),
                "requests still open after the shutdown grace period; stopping anyway"
            ),
        }
        Ok(())
    }
}
