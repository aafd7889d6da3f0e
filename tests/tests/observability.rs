//! What an operator sees: process metrics, per-tenant billing counters, queue wait and merged
//! batch histograms, and a request id in every log line of a call and in its answer's
//! metadata. Logs are captured as JSON lines, as `--log-format json` writes them. (Alone in
//! its test binary: it installs the process's tracing subscriber.)

use std::io::Write;
use std::sync::{Arc, Mutex};

use tonic::Code;
use veil_client::{Client, KeyPair};
use veil_proto::v1;
use veil_server::Config;
use veil_tests::*;

const TMP: &str = env!("CARGO_TARGET_TMPDIR");

/// Log lines written by the server, shared with the test.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn lines_with(&self, needle: &str) -> Vec<String> {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .filter(|l| l.contains(needle))
            .map(String::from)
            .collect()
    }
}

fn with_id<T>(msg: T, id: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert("x-request-id", id.parse().unwrap());
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_request_ids_tell_an_operator_what_happened() {
    let logs = Captured::default();
    let writer = logs.clone();
    tracing_subscriber::fmt()
        .json()
        .with_current_span(true)
        .with_span_list(true)
        .with_max_level(tracing::Level::INFO)
        .with_writer(move || writer.clone())
        .init();

    let models = TempDir::new(TMP, "obs-models");
    let data = TempDir::new(TMP, "obs-data");
    let model = compile_zoo("wine_mlp");
    install_model(models.path(), "wine", &model);
    let test = test_set("wine_mlp", model.n_features());
    let server = TestServer::start(Config::new(models.path(), data.path())).await;
    let client = Client::connect(&server.url()).await.unwrap();
    let mut rpc = client.rpc();

    // The caller's id comes back, on success and on error; without one the server makes one.
    let r = rpc
        .list_models(with_id(v1::ListModelsRequest {}, "list-1"))
        .await
        .unwrap();
    assert_eq!(r.metadata().get("x-request-id").unwrap(), "list-1");
    let mut ids = Vec::new();
    for _ in 0..2 {
        let r = rpc.list_models(v1::ListModelsRequest {}).await.unwrap();
        let id = r.metadata().get("x-request-id").expect("a generated id");
        ids.push(id.to_str().unwrap().to_string());
    }
    assert_ne!(ids[0], ids[1], "ids are unique");
    let missing = "0".repeat(64);
    let status = rpc
        .get_key(with_id(
            v1::GetKeyRequest {
                key_id: missing.clone(),
            },
            "trace-me-42",
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(
        status.metadata().get("x-request-id").unwrap(),
        "trace-me-42"
    );
    // A header that is not a plain short token is replaced, not echoed.
    let r = rpc
        .list_models(with_id(v1::ListModelsRequest {}, &"x".repeat(65)))
        .await
        .unwrap();
    assert_ne!(
        r.metadata().get("x-request-id").unwrap().to_str().unwrap(),
        "x".repeat(65)
    );

    // An inference: its log lines (the call's and its batch's) carry its id.
    let keys = KeyPair::generate(model.params);
    client.ensure_key(&keys, |_, _| {}).await.unwrap();
    let remote = client.model("wine").await.unwrap();
    let samples = remote
        .encrypt_batch(&keys, test.features[..3].to_vec())
        .await
        .unwrap();
    let reply = rpc
        .infer(with_id(
            v1::InferRequest {
                model: "wine".into(),
                key_id: keys.key_id.clone(),
                samples,
                ..Default::default()
            },
            "infer-7",
        ))
        .await
        .unwrap();
    assert_eq!(reply.metadata().get("x-request-id").unwrap(), "infer-7");

    let rejected = logs.lines_with("trace-me-42");
    assert!(
        rejected.iter().any(|l| l.contains("request rejected")),
        "the rejection is logged with its id: {rejected:?}"
    );
    let infer_lines = logs.lines_with("infer-7");
    for message in ["\"infer batch\"", "\"infer\""] {
        assert!(
            infer_lines.iter().any(|l| l.contains(message)),
            "{message} logged with the request id: {infer_lines:?}"
        );
    }
    for line in &infer_lines {
        serde_json::from_str::<serde_json::Value>(line).expect("one JSON object per line");
    }

    // Metrics: the process, billing per tenant and model, queue wait and batch size.
    let m = server.metrics().await;
    assert!(metric(&m, "process_resident_memory_bytes") > 0.0);
    assert!(metric(&m, "process_open_fds") > 0.0);
    assert!(metric(&m, "process_cpu_seconds_total") > 0.0);
    let pbs = model.pbs_per_sample() as f64;
    let tenant = r#"{model="wine",tenant="-"}"#;
    assert_eq!(
        metric(&m, &format!("veil_tenant_requests_total{tenant}")),
        1.0
    );
    assert_eq!(
        metric(&m, &format!("veil_tenant_samples_total{tenant}")),
        3.0
    );
    assert_eq!(
        metric(&m, &format!("veil_tenant_bootstraps_total{tenant}")),
        3.0 * pbs
    );
    assert_eq!(metric(&m, "veil_queue_wait_seconds_count"), 1.0);
    assert_eq!(metric(&m, "veil_merged_batch_samples_count"), 1.0);
    assert_eq!(metric(&m, "veil_merged_batch_samples_sum"), 3.0);
    assert_eq!(metric(&m, "veil_inference_queue_depth"), 0.0);
    assert_eq!(metric(&m, "veil_uploads_receiving"), 0.0);
    server.stop().await;
}
