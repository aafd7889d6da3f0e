//! Prometheus metrics, and a minimal HTTP responder for `GET /metrics`.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tonic::Code;

use crate::status::code_name;

/// Every metric the server exports. Cheap to share (`Arc`).
pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub latency: HistogramVec,
    pub in_flight: IntGauge,
    in_flight_peak: AtomicI64,
    pub in_flight_max: IntGauge,
    pub queue_depth: IntGauge,
    pub bootstraps: IntCounter,
    pub evaluated_samples: IntCounter,
    pub evaluation_seconds: Histogram,
    /// Uploads whose bytes are arriving now (no validation permit held).
    pub uploads_receiving: IntGauge,
    /// Time a request waited in the queue before its evaluation started.
    pub queue_wait_seconds: Histogram,
    /// Samples per merged evaluation.
    pub merged_samples: Histogram,
    /// Billing: evaluated requests, samples and bootstraps per tenant and model.
    pub tenant_requests: IntCounterVec,
    pub tenant_samples: IntCounterVec,
    pub tenant_bootstraps: IntCounterVec,
    pub key_cache_hits: IntCounter,
    pub key_cache_misses: IntCounter,
    pub key_cache_keys: IntGauge,
    pub key_store_bytes: IntGauge,
    pub key_store_keys: IntGauge,
    pub key_evictions: IntCounter,
    pub key_expirations: IntCounter,
    pub key_damaged: IntCounter,
    pub key_expansions: IntCounter,
    pub key_fetches: IntCounter,
    pub tenants_reloads: IntCounter,
    pub draining: IntGauge,
    pub connections_open: IntGauge,
    pub connections_refused: IntCounter,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let registry = Registry::new();
        let latency_buckets = vec![
            0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
        ];
        let m = Metrics {
            requests: IntCounterVec::new(
                Opts::new(
                    "veil_requests_total",
                    "gRPC calls by method and status code",
                ),
                &["method", "code"],
            )
            .expect("valid metric"),
            latency: HistogramVec::new(
                HistogramOpts::new(
                    "veil_request_duration_seconds",
                    "Time from receiving a call to answering it, by method",
                )
                .buckets(latency_buckets.clone()),
                &["method"],
            )
            .expect("valid metric"),
            in_flight: IntGauge::new(
                "veil_inferences_in_flight",
                "Evaluations running now (at most --concurrent-inferences)",
            )
            .expect("valid metric"),
            in_flight_peak: AtomicI64::new(0),
            in_flight_max: IntGauge::new(
                "veil_inferences_in_flight_max",
                "Most evaluations that ran at once since the server started",
            )
            .expect("valid metric"),
            queue_depth: IntGauge::new(
                "veil_inference_queue_depth",
                "Infer requests waiting for an evaluation slot (at most --max-queue)",
            )
            .expect("valid metric"),
            bootstraps: IntCounter::new(
                "veil_bootstraps_total",
                "Programmable bootstraps evaluated",
            )
            .expect("valid metric"),
            evaluated_samples: IntCounter::new("veil_evaluated_samples_total", "Samples evaluated")
                .expect("valid metric"),
            evaluation_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "veil_evaluation_duration_seconds",
                    "Wall time of one (merged) evaluation",
                )
                .buckets(latency_buckets),
            )
            .expect("valid metric"),
            uploads_receiving: IntGauge::new(
                "veil_uploads_receiving",
                "Key uploads whose bytes are arriving now (at most --max-receiving-uploads)",
            )
            .expect("valid metric"),
            queue_wait_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "veil_queue_wait_seconds",
                    "Time an Infer request waited for an evaluation slot before it started",
                )
                .buckets(vec![
                    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                ]),
            )
            .expect("valid metric"),
            merged_samples: Histogram::with_opts(
                HistogramOpts::new(
                    "veil_merged_batch_samples",
                    "Samples in one (merged) evaluation",
                )
                .buckets(vec![
                    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
                ]),
            )
            .expect("valid metric"),
            tenant_requests: IntCounterVec::new(
                Opts::new(
                    "veil_tenant_requests_total",
                    "Infer requests evaluated, by tenant (\"-\" on an open server) and model",
                ),
                &["tenant", "model"],
            )
            .expect("valid metric"),
            tenant_samples: IntCounterVec::new(
                Opts::new(
                    "veil_tenant_samples_total",
                    "Samples evaluated, by tenant and model",
                ),
                &["tenant", "model"],
            )
            .expect("valid metric"),
            tenant_bootstraps: IntCounterVec::new(
                Opts::new(
                    "veil_tenant_bootstraps_total",
                    "Bootstraps evaluated (the billing unit), by tenant and model",
                ),
                &["tenant", "model"],
            )
            .expect("valid metric"),
            key_cache_hits: IntCounter::new(
                "veil_key_cache_hits_total",
                "Evaluation keys found expanded in memory",
            )
            .expect("valid metric"),
            key_cache_misses: IntCounter::new(
                "veil_key_cache_misses_total",
                "Evaluation keys loaded from disk and expanded",
            )
            .expect("valid metric"),
            key_cache_keys: IntGauge::new(
                "veil_key_cache_keys",
                "Expanded evaluation keys in memory",
            )
            .expect("valid metric"),
            key_store_bytes: IntGauge::new(
                "veil_key_store_bytes",
                "Bytes of evaluation keys stored on disk",
            )
            .expect("valid metric"),
            key_store_keys: IntGauge::new("veil_key_store_keys", "Evaluation keys stored on disk")
                .expect("valid metric"),
            key_evictions: IntCounter::new(
                "veil_key_store_evictions_total",
                "Keys removed from disk to stay under --max-key-store-bytes",
            )
            .expect("valid metric"),
            key_expirations: IntCounter::new(
                "veil_key_store_expirations_total",
                "Keys removed from disk after going unused longer than their tenant's key_ttl_secs",
            )
            .expect("valid metric"),
            key_damaged: IntCounter::new(
                "veil_key_store_damaged_total",
                "Stored keys found damaged on load (removed)",
            )
            .expect("valid metric"),
            key_expansions: IntCounter::new(
                "veil_key_expansions_total",
                "Evaluation keys expanded into the backend's form (on upload, or loaded from disk \
                 or the object store)",
            )
            .expect("valid metric"),
            key_fetches: IntCounter::new(
                "veil_key_store_fetches_total",
                "Keys read from the object store because this replica had no copy",
            )
            .expect("valid metric"),
            tenants_reloads: IntCounter::new(
                "veil_tenants_reloads_total",
                "Tenants files reloaded on SIGHUP (successfully)",
            )
            .expect("valid metric"),
            draining: IntGauge::new(
                "veil_draining",
                "1 once a shutdown began (health says NOT_SERVING)",
            )
            .expect("valid metric"),
            connections_open: IntGauge::new(
                "veil_connections_open",
                "gRPC connections open now (at most --max-connections)",
            )
            .expect("valid metric"),
            connections_refused: IntCounter::new(
                "veil_connections_refused_total",
                "Connections closed on accept because --max-connections were open",
            )
            .expect("valid metric"),
            registry,
        };
        let collectors: [Box<dyn prometheus::core::Collector>; 30] = [
            Box::new(m.uploads_receiving.clone()),
            Box::new(m.queue_wait_seconds.clone()),
            Box::new(m.merged_samples.clone()),
            Box::new(m.tenant_requests.clone()),
            Box::new(m.tenant_samples.clone()),
            Box::new(m.tenant_bootstraps.clone()),
            // RSS, CPU seconds, open and max fds, virtual memory, start time (Linux).
            Box::new(prometheus::process_collector::ProcessCollector::for_self()),
            Box::new(m.requests.clone()),
            Box::new(m.latency.clone()),
            Box::new(m.in_flight.clone()),
            Box::new(m.in_flight_max.clone()),
            Box::new(m.queue_depth.clone()),
            Box::new(m.bootstraps.clone()),
            Box::new(m.evaluated_samples.clone()),
            Box::new(m.evaluation_seconds.clone()),
            Box::new(m.key_cache_hits.clone()),
            Box::new(m.key_cache_misses.clone()),
            Box::new(m.key_cache_keys.clone()),
            Box::new(m.key_store_bytes.clone()),
            Box::new(m.key_store_keys.clone()),
            Box::new(m.key_evictions.clone()),
            Box::new(m.key_expirations.clone()),
            Box::new(m.key_damaged.clone()),
            Box::new(m.key_expansions.clone()),
            Box::new(m.key_fetches.clone()),
            Box::new(m.tenants_reloads.clone()),
            Box::new(m.draining.clone()),
            Box::new(m.connections_open.clone()),
            Box::new(m.connections_refused.clone()),
            Box::new(ProcessThreads::new()),
        ];
        for c in collectors {
            m.registry.register(c).expect("metric registered once");
        }
        Arc::new(m)
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding into a Vec");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }

    /// Counts one evaluated request of `tenant` (empty: the open server's anonymous one):
    /// its samples and bootstraps.
    pub fn work(&self, tenant: &str, model: &str, samples: u64, pbs_per_sample: u64) {
        let tenant = if tenant.is_empty() { "-" } else { tenant };
        let labels = [tenant, model];
        self.tenant_requests.with_label_values(&labels).inc();
        self.tenant_samples
            .with_label_values(&labels)
            .inc_by(samples);
        self.tenant_bootstraps
            .with_label_values(&labels)
            .inc_by(samples * pbs_per_sample);
    }

    /// Marks one evaluation as running until the guard drops.
    pub fn inference_running(self: &Arc<Self>) -> InFlight {
        self.in_flight.inc();
        let now = self.in_flight.get();
        let peak = self
            .in_flight_peak
            .fetch_max(now, Ordering::Relaxed)
            .max(now);
        self.in_flight_max.set(peak);
        InFlight(Arc::clone(self))
    }

    /// Times one call of `method`; the guard records its code when finished, or CANCELLED if
    /// the call is dropped first (the client went away or its deadline passed).
    pub fn call(self: &Arc<Self>, method: &'static str) -> Call {
        Call {
            metrics: Arc::clone(self),
            method,
            start: Instant::now(),
            done: false,
        }
    }
}

/// Counts one unit in a gauge until dropped (inc and dec, so the gauge is never stale).
pub struct GaugeGuard(IntGauge);

impl GaugeGuard {
    pub fn new(gauge: &IntGauge) -> Self {
        gauge.inc();
        GaugeGuard(gauge.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

pub struct InFlight(Arc<Metrics>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.dec();
    }
}

pub struct Call {
    metrics: Arc<Metrics>,
    method: &'static str,
    start: Instant,
    done: bool,
}

impl Call {
    pub fn finish(mut self, code: Code) {
        self.record(code);
    }

    fn record(&mut self, code: Code) {
        self.done = true;
        self.metrics
            .requests
            .with_label_values(&[self.method, code_name(code)])
            .inc();
        self.metrics
            .latency
            .with_label_values(&[self.method])
            .observe(self.start.elapsed().as_secs_f64());
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        if !self.done {
            self.record(Code::Cancelled);
        }
    }
}

/// `veil_process_threads`: the server process's thread count (Linux), to see from outside
/// that cancelled work does not pile up.
struct ProcessThreads {
    desc: prometheus::core::Desc,
}

impl ProcessThreads {
    fn new() -> Self {
        ProcessThreads {
            desc: prometheus::core::Desc::new(
                "veil_process_threads".into(),
                "Threads of the server process".into(),
                vec![],
                Default::default(),
            )
            .expect("valid metric"),
        }
    }
}

impl prometheus::core::Collector for ProcessThreads {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let Some(n) = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Threads:"))
                    .and_then(|v| v.trim().parse::<i64>().ok())
            })
        else {
            return vec![];
        };
        let g = IntGauge::with_opts(Opts::new(
            "veil_process_threads",
            "Threads of the server process",
        ))
        .expect("valid metric");
        g.set(n);
        prometheus::core::Collector::collect(&g)
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown` completes. One short-lived task per
/// connection; a request head is read with a size cap and a timeout.
pub async fn serve_http(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let conn = tokio::select! {
            _ = &mut shutdown => return,
            c = listener.accept() => c,
        };
        let Ok((stream, _)) = conn else { continue };
        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(10), answer(stream, &metrics)).await;
        });
    }
}

async fn answer(mut stream: tokio::net::TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, path) = (parts.next(), parts.next());
    let (status, ctype, body) = match (method, path) {
        (Some(b"GET"), Some(b"/metrics")) => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.render(),
        ),
        (Some(b"GET"), _) => ("404 Not Found", "text/plain", "try /metrics\n".into()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET /metrics only\n".into(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_named_metric() {
        let m = Metrics::new();
        m.call("Infer").finish(Code::Ok);
        drop(m.call("Infer"));
        m.work("", "m", 3, 8);
        {
            let _a = m.inference_running();
            let _b = m.inference_running();
        }
        let text = m.render();
        for name in [
            "veil_requests_total{code=\"OK\",method=\"Infer\"} 1",
            "veil_requests_total{code=\"CANCELLED\",method=\"Infer\"} 1",
            "veil_request_duration_seconds_bucket",
            "veil_inferences_in_flight 0",
            "veil_inferences_in_flight_max 2",
            "veil_inference_queue_depth 0",
            "veil_bootstraps_total 0",
            "veil_key_cache_hits_total 0",
            "veil_key_cache_misses_total 0",
            "veil_key_store_bytes 0",
            "veil_queue_wait_seconds_count 0",
            "veil_merged_batch_samples_count 0",
            "veil_tenant_bootstraps_total{model=\"m\",tenant=\"-\"} 24",
            "veil_tenant_samples_total{model=\"m\",tenant=\"-\"} 3",
            "veil_tenant_requests_total{model=\"m\",tenant=\"-\"} 1",
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_cpu_seconds_total",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
    }
}
