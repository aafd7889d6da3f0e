//! Veil's gRPC server: serves compiled models to clients who keep their own keys.
//!
//! The server holds the models and the clients' evaluation keys; it never sees a secret key,
//! a plaintext input or a plaintext result. [`Server::load`] reads the models and opens the
//! key store; [`Server::serve`] serves `veil.v1.Veil`, `grpc.health.v1.Health` and server
//! reflection (over TLS when configured) until a shutdown signal, and Prometheus metrics on
//! a second listener when one is given.

pub mod batcher;
pub mod error;
pub mod gate;
pub mod key_store;
pub mod metrics;
pub mod models;
pub mod owner;
pub mod scheduler;
pub mod service;
pub mod status;
pub mod tenants;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use veil_proto::v1::veil_server::VeilServer;

pub use batcher::BatchPolicy;
pub use error::{Result, ServiceError};
pub use gate::ConnectionLimits;
pub use metrics::Metrics;
pub use service::Limits;
pub use tenants::{SharedTenants, Tenants, token_sha256};
pub use veil_runtime::BackendKind;

use gate::{Counted, Gate};
use key_store::KeyStore;
use models::{MAX_REQUEST_BYTES, MAX_RESPONSE_BYTES, Registry};
use service::VeilService;
use tokio_stream::StreamExt;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

/// PEM files of the server's TLS identity, and the CA its clients' certificates must chain
/// to when client certificates are required (mutual TLS).
#[derive(Clone)]
pub struct TlsFiles {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub client_ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for TlsFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsFiles")
            .field("mutual", &self.client_ca_pem.is_some())
            .finish_non_exhaustive()
    }
}

impl TlsFiles {
    fn config(&self) -> ServerTlsConfig {
        let mut c = ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .timeout(Duration::from_secs(10));
        if let Some(ca) = &self.client_ca_pem {
            c = c.client_ca_root(Certificate::from_pem(ca));
        }
        c
    }
}

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
    /// After a shutdown signal, how long the server keeps accepting calls while health says
    /// NOT_SERVING, so that load balancers stop sending before it closes.
    pub drain: Duration,
    /// Who may call, with which limits; `None`: an open server (no token needed).
    pub tenants: Option<Arc<Tenants>>,
    /// Most bytes of keys on disk (least recently used evicted first); `None`: unbounded.
    pub max_key_store_bytes: Option<u64>,
    /// An object store holding the keys (`s3://bucket/prefix`), shared by replicas; the data
    /// dir is then its cache. `None`: the data dir holds the keys.
    pub key_store: Option<String>,
    /// With `key_store`: how long a replica serves a cached key without confirming that the
    /// store still holds it (a key deleted through another replica works here that long).
    pub key_revalidate: Duration,
    /// Serve gRPC over TLS.
    pub tls: Option<TlsFiles>,
    /// Caps on connections, streams and calls in progress.
    pub connections: ConnectionLimits,
    /// An encrypted-model owner's key directory (`veil keygen`, with the clear copies
    /// `veil compile --encrypt-model` keeps): serves Decrypt for results of those models.
    pub owner_keys: Option<PathBuf>,
    /// With `owner_keys`: Decrypt answers only the predicted class, even for models whose
    /// results hold scores.
    pub decrypt_labels_only: bool,
}

/// Disk bound on stored evaluation keys unless the operator sets one.
pub const DEFAULT_MAX_KEY_STORE_BYTES: u64 = 20 << 30;

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
            drain: Duration::ZERO,
            tenants: None,
            max_key_store_bytes: Some(DEFAULT_MAX_KEY_STORE_BYTES),
            key_store: None,
            key_revalidate: key_store::DEFAULT_REVALIDATE,
            tls: None,
            connections: ConnectionLimits::default(),
            owner_keys: None,
            decrypt_labels_only: false,
        }
    }
}

/// A loaded server, ready to serve.
pub struct Server {
    registry: Arc<Registry>,
    keys: Arc<KeyStore>,
    tenants: SharedTenants,
    metrics: Arc<Metrics>,
    limits: Limits,
    shutdown_grace: Duration,
    drain: Duration,
    tls: Option<ServerTlsConfig>,
    connections: ConnectionLimits,
    metrics_listener: Option<TcpListener>,
    owner: Option<Arc<owner::Owner>>,
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
            drain,
            tenants,
            max_key_store_bytes,
            key_store,
            key_revalidate,
            tls,
            connections,
            owner_keys,
            decrypt_labels_only,
        } = config;
        backend.check_available().map_err(ServiceError::Runtime)?;
        let tls = match tls {
            None => None,
            Some(files) => {
                let c = files.config();
                // Parse the PEM files now, so a bad one stops the server at start.
                tonic::transport::Server::builder()
                    .tls_config(c.clone())
                    .map_err(|e| ServiceError::Config(format!("TLS: {e}")))?;
                Some(c)
            }
        };
        let max_bytes = limits.batching.max_bytes;
        // A server that only decrypts for a model owner may serve no model.
        let allow_empty = owner_keys.is_some();
        let registry = tokio::task::spawn_blocking(move || {
            Registry::load(&models_dir, max_batch.max(1), max_bytes, allow_empty)
        })
        .await
        .map_err(|e| ServiceError::Internal(format!("loading models: {e}")))??;
        let tenants = match tenants {
            Some(t) => {
                for (name, models) in t.model_lists() {
                    for m in models {
                        if !registry.models.contains_key(m) {
                            tracing::warn!(tenant = name, model = %m, "the tenants file allows a model this server does not serve");
                        }
                    }
                }
                tracing::info!(tenants = ?t.names(), "tenants loaded; calls need a bearer token");
                t
            }
            None => {
                tracing::warn!(
                    "NO TENANTS FILE: this server is OPEN. Anyone who can reach it can upload \
                     keys and run inference, without a token or quota. Use --tenants FILE \
                     unless it listens only for you."
                );
                Arc::new(Tenants::open())
            }
        };
        let metrics = Metrics::new();
        let keys = KeyStore::open(
            &data_dir,
            key_cache,
            backend,
            max_key_store_bytes,
            &registry.params,
            Arc::clone(&metrics),
        )?;
        let keys = match key_store {
            None => keys,
            Some(url) => {
                let remote = key_store::RemoteStore::connect(&url).await?;
                tracing::info!(store = %url, "keys are kept in the object store; the data dir caches them");
                keys.with_remote(
                    Arc::new(remote),
                    tokio::runtime::Handle::current(),
                    key_revalidate,
                )
            }
        };
        keys.set_shares(tenants.shares());
        let owner = match owner_keys {
            None => None,
            Some(dir) => {
                let owner = tokio::task::spawn_blocking(move || {
                    owner::Owner::load(&dir, decrypt_labels_only)
                })
                .await
                .map_err(|e| ServiceError::Internal(format!("loading the owner key: {e}")))??;
                tracing::info!(key = %key_store::short(owner.key_id()), labels_only = decrypt_labels_only, "serving Decrypt for this owner key's encrypted models");
                Some(Arc::new(owner))
            }
        };
        Ok(Server {
            owner,
            registry: Arc::new(registry),
            keys: Arc::new(keys),
            tenants: SharedTenants::new(tenants),
            metrics,
            limits,
            shutdown_grace,
            drain,
            tls,
            connections,
            metrics_listener: None,
        })
    }

    /// Also serves Prometheus metrics at `GET /metrics` on `listener`, while the server runs.
    pub fn with_metrics_listener(mut self, listener: TcpListener) -> Self {
        self.metrics_listener = Some(listener);
        self
    }

    /// The server's metrics (also served over HTTP with [`Server::with_metrics_listener`]).
    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.metrics)
    }

    /// Reloads the tenants file at `path` (on SIGHUP): new calls authenticate against it,
    /// the key store's eviction shares and TTLs follow it. A file that does not parse is
    /// refused and the tenants in force stay.
    pub fn tenants_reloader(&self) -> TenantsReloader {
        TenantsReloader {
            tenants: self.tenants.clone(),
            keys: Arc::clone(&self.keys),
            metrics: Arc::clone(&self.metrics),
        }
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
        let sweep = tokio::spawn(expire_keys(Arc::clone(&self.keys), self.tenants.clone()));
        let veil = Gate::new(
            VeilService::new(
                self.registry,
                self.keys,
                Arc::clone(&self.metrics),
                self.limits,
            )
            .with_owner(self.owner),
            self.tenants,
            Arc::clone(&self.metrics),
            self.connections.max_concurrent_calls,
            MAX_REQUEST_BYTES,
            MAX_RESPONSE_BYTES,
        );
        let health_service = health_service.max_decoding_message_size(MAX_SMALL_MESSAGE);

        let reporter = health.clone();
        let (grace_tx, grace_rx) = tokio::sync::oneshot::channel::<()>();
        let (metrics_stop_tx, metrics_stop_rx) = tokio::sync::oneshot::channel::<()>();
        let grace = self.shutdown_grace;
        let drain = self.drain;
        let metrics = Arc::clone(&self.metrics);
        let shutdown = async move {
            shutdown.await;
            // Health says NOT_SERVING first (overall and for the service), while calls are
            // still accepted for the drain period; then the listener closes.
            reporter
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
            reporter.set_not_serving::<VeilServer<VeilService>>().await;
            metrics.draining.set(1);
            tracing::info!(
                drain_s = drain.as_secs_f64(),
                "draining: health says NOT_SERVING"
            );
            tokio::time::sleep(drain).await;
            let _ = grace_tx.send(());
            tracing::info!("shutting down: no new requests, finishing those in flight");
        };
        if let Some(l) = self.metrics_listener {
            let m = Arc::clone(&self.metrics);
            tokio::spawn(metrics::serve_http(l, m, async move {
                let _ = metrics_stop_rx.await;
            }));
        }
        // A connection over --max-connections is closed as soon as it is accepted.
        let slots = Arc::new(tokio::sync::Semaphore::new(
            self.connections.max_connections.max(1),
        ));
        let conn_metrics = Arc::clone(&self.metrics);
        // The builder's tcp_nodelay applies only to sockets it binds itself; accepted ones
        // get it here. Without it a one-sample request waited ~40 ms on Nagle's algorithm and
        // delayed ACKs (seen with bench_serve on loopback).
        let incoming = tonic::transport::server::TcpIncoming::from(listener)
            .with_nodelay(Some(true))
            .filter_map(move |accepted| match accepted {
                Ok(io) => Counted::admit(io, &slots, &conn_metrics).map(Ok),
                Err(e) => Some(Err(e)),
            });
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = self.tls {
            builder = builder.tls_config(tls)?;
        }
        let serve = builder
            .tcp_nodelay(true)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            .max_concurrent_streams(self.connections.max_concurrent_streams.max(1))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(veil)
            .serve_with_incoming_shutdown(incoming, shutdown);
        let grace_over = async move {
            if grace_rx.await.is_ok() {
                tokio::time::sleep(grace).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        let result = tokio::select! {
            r = serve => r,
            _ = grace_over => {
                tracing::warn!(
                    grace_s = grace.as_secs_f64(),
                    "requests still open after the shutdown grace period; stopping anyway"
                );
                Ok(())
            }
        };
        let _ = metrics_stop_tx.send(());
        // Awaited so the sweep's handle on the key store (and its data-dir lock) is gone when
        // serve returns: a restart on the same directory can take the lock at once.
        sweep.abort();
        let _ = sweep.await;
        result?;
        Ok(())
    }
}

/// How often keys past their tenant's TTL are looked for.
const KEY_EXPIRY_SWEEP: Duration = Duration::from_secs(60);

/// Removes, every [`KEY_EXPIRY_SWEEP`], the keys unused for longer than their tenant's TTL.
async fn expire_keys(keys: Arc<KeyStore>, tenants: SharedTenants) {
    let mut tick = tokio::time::interval(KEY_EXPIRY_SWEEP);
    loop {
        tick.tick().await;
        let current = tenants.current();
        // With an object store a sweep lists the whole store: only when a TTL is set.
        if !current.any_key_ttl() {
            continue;
        }
        let keys = Arc::clone(&keys);
        let _ = tokio::task::spawn_blocking(move || {
            keys.expire(std::time::SystemTime::now(), |owner| current.key_ttl(owner))
        })
        .await;
    }
}

/// Swaps in a new tenants file; see [`Server::tenants_reloader`].
#[derive(Clone)]
pub struct TenantsReloader {
    tenants: SharedTenants,
    keys: Arc<KeyStore>,
    metrics: Arc<Metrics>,
}

impl TenantsReloader {
    pub fn reload(&self, path: &std::path::Path) -> Result<()> {
        if self.tenants.current().is_open() {
            return Err(ServiceError::Config(
                "this server was started without --tenants; restart it to add tenants".into(),
            ));
        }
        let t = Tenants::load(path)?;
        self.keys.set_shares(t.shares());
        tracing::info!(tenants = ?t.names(), "tenants reloaded");
        self.tenants.replace(t);
        self.metrics.tenants_reloads.inc();
        Ok(())
    }
}
