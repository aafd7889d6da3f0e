//! `veil-server`: serves every `*.veil` model of a directory over gRPC.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use tracing_subscriber::EnvFilter;
use veil_server::{
    BackendKind, BatchPolicy, Config, ConnectionLimits, Limits, Server, Tenants, TlsFiles,
};

fn parse_backend(s: &str) -> Result<BackendKind, String> {
    s.parse()
        .map_err(|e: veil_runtime::RuntimeError| e.to_string())
}

#[derive(Parser)]
#[command(
    name = "veil-server",
    version,
    about = "Serves compiled Veil models for encrypted inference (gRPC)"
)]
struct Args {
    /// Directory of compiled models; `wine.veil` is served as `wine`.
    #[arg(long)]
    models: PathBuf,
    /// Address to listen on (port 0 picks a free port; the chosen one is printed).
    #[arg(long, default_value = "127.0.0.1:50051")]
    listen: String,
    /// Where uploaded evaluation keys are stored (kept across restarts).
    #[arg(long)]
    data_dir: PathBuf,
    /// Expanded evaluation keys kept in memory (~120 MB each).
    #[arg(long, default_value_t = 4)]
    key_cache: usize,
    /// Most samples per Infer request.
    #[arg(long, default_value_t = 256)]
    max_batch: usize,
    /// Evaluations running at once; further requests wait.
    #[arg(long, default_value_t = 2)]
    concurrent_inferences: usize,
    /// Infer requests that may wait for an evaluation; more get RESOURCE_EXHAUSTED at once.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Key uploads received and validated at once (each buffers the key and expands it).
    #[arg(long, default_value_t = 2)]
    concurrent_uploads: usize,
    /// Seconds an upload may stay silent before it is dropped.
    #[arg(long, default_value_t = 60)]
    upload_idle_timeout: u64,
    /// Seconds an upload may take in all before it is dropped.
    #[arg(long, default_value_t = 600)]
    upload_timeout: u64,
    /// Bytes per second an upload must average after --upload-rate-grace seconds, or it is
    /// dropped (0: no minimum).
    #[arg(long, default_value_t = 100_000)]
    upload_min_rate: u64,
    /// Seconds before --upload-min-rate applies.
    #[arg(long, default_value_t = 10)]
    upload_rate_grace: u64,
    /// Uploads arriving at once (each buffers up to 64 MiB); one more gets RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 16)]
    max_receiving_uploads: usize,
    /// Milliseconds an Infer request may wait for an evaluation before it is answered
    /// UNAVAILABLE instead of running late (0: only its deadline bounds the wait).
    #[arg(long, default_value_t = 0)]
    max_queue_wait: u64,
    /// Threads of each running evaluation (0: the machine's cores); each of the
    /// --concurrent-inferences evaluations has its own pool, so they share the cores fairly.
    #[arg(long, default_value_t = 0)]
    threads_per_evaluation: usize,
    /// Log lines as text or as JSON objects (one per line).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Tenants file (TOML: [[tenant]] name, token_sha256, max_keys, max_key_bytes, models,
    /// requests_per_second, burst). Without it the server is open to anyone who reaches it.
    #[arg(long)]
    tenants: Option<PathBuf>,
    /// Serve without --tenants on an address other than loopback: anyone who reaches it may
    /// upload keys and run inferences. Refused unless given.
    #[arg(long)]
    allow_open: bool,
    /// Most bytes of evaluation keys kept on disk (20 GiB unless set); least recently used
    /// keys are removed first.
    #[arg(long, default_value_t = veil_server::DEFAULT_MAX_KEY_STORE_BYTES)]
    max_key_store_bytes: u64,
    /// Keep evaluation keys in an S3-compatible object store shared by replicas
    /// (s3://BUCKET[/PREFIX]); --data-dir then caches them. Endpoint and credentials come
    /// from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION
    /// (AWS_ALLOW_HTTP=true for a plain-http endpoint).
    #[arg(long)]
    key_store: Option<String>,
    /// With --key-store: milliseconds a replica serves a key from its cache before asking the
    /// store again whether it still holds it (a key deleted through another replica keeps
    /// working here that long; 0: ask on every request).
    #[arg(long, default_value_t = 30_000, requires = "key_store")]
    key_revalidate_ms: u64,
    /// PEM certificate chain of the server: serve gRPC over TLS (with --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// PEM CA certificate(s): require client certificates signed by it (mutual TLS).
    #[arg(long, requires = "tls_cert")]
    client_ca: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long)]
    metrics_listen: Option<String>,
    /// Where bootstraps run: cpu, or gpu (needs a `gpu` build and a CUDA device). Default:
    /// the GPU when this binary has it and a device is present, else the CPU.
    #[arg(long, value_parser = parse_backend)]
    backend: Option<BackendKind>,
    /// Milliseconds a batch stays open for more requests for the same model and key (0: no
    /// merging).
    #[arg(long, default_value_t = 2)]
    batch_window_ms: u64,
    /// Most samples in one merged evaluation.
    #[arg(long, default_value_t = 1024)]
    max_merged_samples: usize,
    /// Most host memory (MiB) one merged evaluation may use, estimated from the model.
    #[arg(long, default_value_t = 4096)]
    max_merged_mib: u64,
    /// Connections open at once; one more is closed as soon as it is accepted.
    #[arg(long, default_value_t = 1024)]
    max_connections: usize,
    /// HTTP/2 streams (calls) one connection may have open at once.
    #[arg(long, default_value_t = 64)]
    max_concurrent_streams: u32,
    /// Authenticated calls in progress at once, server-wide; one more is answered
    /// UNAVAILABLE at once, before its body is read.
    #[arg(long, default_value_t = 128)]
    max_concurrent_calls: usize,
    /// Seconds in-flight requests get to finish after SIGINT / SIGTERM (and after
    /// --drain-ms); then the process exits, even if an evaluation is still running.
    #[arg(long, default_value_t = 30)]
    shutdown_grace: u64,
    /// Milliseconds health reports NOT_SERVING, still answering calls, after SIGINT / SIGTERM
    /// and before the listener closes. Behind a load balancer set it above the balancer's
    /// health-check interval times its unhealthy threshold (e.g. 10000).
    #[arg(long, default_value_t = 0)]
    drain_ms: u64,
    /// Encrypted-model mode: a model owner's key directory (`veil keygen`, where `veil
    /// compile --encrypt-model` keeps each model's clear copy). Serves Decrypt for results
    /// of those models; --models may then hold no model.
    #[arg(long)]
    owner_keys: Option<PathBuf>,
    /// With --owner-keys: Decrypt answers only the predicted class, even for a model whose
    /// results hold scores.
    #[arg(long, requires = "owner_keys")]
    decrypt_labels_only: bool,
}

fn read(path: &std::path::Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read the {what} {}: {e}", path.display()))
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match args.log_format {
        // One JSON object per line, with the fields of the enclosing spans (the request id).
        LogFormat::Json => logs
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .init(),
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
    let code = match run(args).await {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("error: {e}");
            1
        }
    };
    // Exit here: dropping the runtime would wait for blocking evaluations still running,
    // and --shutdown-grace is a hard bound.
    std::process::exit(code);
}

async fn run(a: Args) -> Result<(), Box<dyn std::error::Error>> {
    if a.tenants.is_none() && !a.allow_open {
        refuse_open_exposure(&a.listen).await?;
    }
    let backend = a
        .backend
        .unwrap_or_else(BackendKind::default_for_this_machine);
    backend.check_available()?;
    tracing::info!(backend = backend.name(), "bootstrap backend");
    let tenants = match &a.tenants {
        Some(p) => Some(std::sync::Arc::new(Tenants::load(p)?)),
        None => None,
    };
    let tls = match (&a.tls_cert, &a.tls_key) {
        (Some(c), Some(k)) => Some(TlsFiles {
            cert_pem: read(c, "TLS certificate")?,
            key_pem: read(k, "TLS key")?,
            client_ca_pem: match &a.client_ca {
                Some(p) => Some(read(p, "client CA certificate")?),
                None => None,
            },
        }),
        _ => None,
    };
    let config = Config {
        backend,
        key_cache: a.key_cache,
        max_batch: a.max_batch,
        limits: Limits {
            concurrent_inferences: a.concurrent_inferences,
            max_queue: a.max_queue,
            concurrent_uploads: a.concurrent_uploads.max(1),
            upload_idle_timeout: Duration::from_secs(a.upload_idle_timeout.max(1)),
            upload_timeout: Duration::from_secs(a.upload_timeout.max(1)),
            upload_min_rate: a.upload_min_rate,
            upload_rate_grace: Duration::from_secs(a.upload_rate_grace),
            max_receiving_uploads: a.max_receiving_uploads.max(1),
            max_queue_wait: (a.max_queue_wait > 0).then(|| Duration::from_millis(a.max_queue_wait)),
            threads_per_evaluation: a.threads_per_evaluation,
            eval_gate: None,
            batching: BatchPolicy {
                window: Duration::from_millis(a.batch_window_ms),
                max_samples: a.max_merged_samples.max(1),
                max_bytes: a.max_merged_mib.max(1) << 20,
            },
        },
        shutdown_grace: Duration::from_secs(a.shutdown_grace),
        drain: Duration::from_millis(a.drain_ms),
        tenants,
        max_key_store_bytes: Some(a.max_key_store_bytes),
        key_store: a.key_store.clone(),
        key_revalidate: Duration::from_millis(a.key_revalidate_ms),
        tls: tls.clone(),
        connections: ConnectionLimits {
            max_connections: a.max_connections.max(1),
            max_concurrent_streams: a.max_concurrent_streams.max(1),
            max_concurrent_calls: a.max_concurrent_calls.max(1),
        },
        owner_keys: a.owner_keys.clone(),
        decrypt_labels_only: a.decrypt_labels_only,
        ..Config::new(&a.models, &a.data_dir)
    };
    tracing::info!(models = %a.models.display(), data_dir = %a.data_dir.display(), "loading");
    let mut server = Server::load(config).await?;
    let listener = tokio::net::TcpListener::bind(&a.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", a.listen))?;
    let addr = listener.local_addr()?;
    if tls.is_none() && !addr.ip().is_loopback() {
        tracing::warn!(%addr, "serving plaintext gRPC on a non-loopback address; use --tls-cert and --tls-key");
    }
    let mut metrics_addr = None;
    if let Some(m) = &a.metrics_listen {
        let l = tokio::net::TcpListener::bind(m)
            .await
            .map_err(|e| format!("cannot listen for metrics on {m}: {e}"))?;
        metrics_addr = Some(l.local_addr()?);
        server = server.with_metrics_listener(l);
    }
    #[cfg(unix)]
    if let Some(path) = a.tenants.clone() {
        // Installed before the listening line, so a SIGHUP right after it never hits the
        // default action (terminate).
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        let reloader = server.tenants_reloader();
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                let (reloader, path) = (reloader.clone(), path.clone());
                let r = tokio::task::spawn_blocking(move || reloader.reload(&path)).await;
                match r {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::error!(
                        "SIGHUP: the tenants file was not reloaded, the previous tenants stay: {e}"
                    ),
                    Err(e) => tracing::error!("SIGHUP: reloading the tenants file failed: {e}"),
                }
            }
        });
    }
    tracing::info!(%addr, tls = tls.is_some(), mutual_tls = tls.as_ref().is_some_and(|t| t.client_ca_pem.is_some()), models = ?server.model_names(), "ready");
    // Machine-readable lines for scripts that start the server on port 0.
    println!("veil-server listening on {addr}");
    if let Some(m) = metrics_addr {
        println!("veil-server metrics on http://{m}/metrics");
    }
    server.serve(listener, shutdown_signal()).await?;
    tracing::info!("stopped");
    Ok(())
}

/// Open mode (no tenants file) is for a server only this machine reaches: refused on any
/// address that resolves to something other than loopback (`0.0.0.0` included).
async fn refuse_open_exposure(listen: &str) -> Result<(), String> {
    let addrs: Vec<std::net::SocketAddr> = tokio::net::lookup_host(listen)
        .await
        .map_err(|e| format!("cannot resolve --listen {listen}: {e}"))?
        .collect();
    match addrs.iter().find(|a| !a.ip().is_loopback()) {
        None => Ok(()),
        Some(exposed) => Err(format!(
            "refusing to serve without --tenants on {exposed}, which is not a loopback address: \
             anyone who reaches it could upload keys and run inferences; give --tenants FILE, \
             listen on 127.0.0.1, or pass --allow-open"
        )),
    }
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("received SIGINT"),
        _ = term => tracing::info!("received SIGTERM"),
    }
}
