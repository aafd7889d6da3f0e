//! The inference queue is bounded, and a request whose deadline passes (or that waits longer
//! than the queue wait bound) is never evaluated. Evaluations are held at a gate the test
//! opens, so nothing assumes a slow CPU; observed through the server's metrics.

use std::time::Duration;

use std::sync::Arc;
use tonic::Code;
use veil_client::{Client, KeyPair, RetryPolicy};

use veil_server::scheduler::EvalGate;
use veil_server::{BatchPolicy, Config};
use veil_tests::*;

const TMP: &str = env!("CARGO_TARGET_TMPDIR");

/// A digits server with one evaluation slot whose evaluations wait at a gate the test opens,
/// a client with an uploaded key and the model's test set.
struct Gated {
    server: TestServer,
    gate: Arc<EvalGate>,
    client: Client,
    keys: KeyPair,
    remote: veil_client::RemoteModel,
    model: veil_models::CompiledModel,
    test: veil_models::data::Dataset,
    _dirs: (TempDir, TempDir),
}

async fn gated(max_queue: usize, max_queue_wait: Option<Duration>) -> Gated {
    let models = TempDir::new(TMP, "limits-models");
    let data = TempDir::new(TMP, "limits-data");
    let model = compile_zoo("digits_mlp");
    install_model(models.path(), "digits", &model);
    let test = test_set("digits_mlp", model.n_features());
    let gate = EvalGate::new();
    let mut config = Config::new(models.path(), data.path());
    config.limits.concurrent_inferences = 1;
    config.limits.max_queue = max_queue;
    config.limits.max_queue_wait = max_queue_wait;
    config.limits.eval_gate = Some(Arc::clone(&gate));
    config.limits.batching = BatchPolicy {
        window: Duration::ZERO,
        ..BatchPolicy::default()
    };
    let server = TestServer::start(config).await;
    let client = Client::connect(&server.url()).await.unwrap();
    let keys = KeyPair::generate(model.params);
    client.ensure_key(&keys, |_, _| {}).await.unwrap();
    let remote = client.model("digits").await.unwrap();
    Gated {
        server,
        gate,
        client,
        keys,
        remote,
        model,
        test,
        _dirs: (models, data),
    }
}

impl Gated {
    /// An Infer of `rows` test rows on its own task, with an optional deadline.
    async fn spawn_infer(
        &self,
        rows: std::ops::Range<usize>,
        deadline: Option<Duration>,
    ) -> tokio::task::JoinHandle<veil_client::Result<veil_client::InferReply>> {
        let samples = self
            .remote
            .encrypt_batch(&self.keys, self.test.features[rows].to_vec())
            .await
            .unwrap();
        // No retry: these tests check the server's own answers.
        let c = self
            .client
            .clone()
            .with_deadline(deadline)
            .with_retry(RetryPolicy {
                attempts: 1,
                ..RetryPolicy::default()
            });
        let id = self.keys.key_id.clone();
        tokio::spawn(async move { c.infer("digits", &id, samples).await })
    }

    /// A one-sample request after the gate opens for it: answered and correct.
    async fn serves_normally(&self) {
        self.gate.open(1);
        let x = &self.test.features[0];
        let one = self.remote.encrypt(&self.keys, x).unwrap();
        let reply = self
            .client
            .infer("digits", &self.keys.key_id, vec![one])
            .await
            .unwrap();
        let accs = self
            .remote
            .decrypt_accs(&self.keys, &reply.outputs[0])
            .unwrap();
        check_sample_against_simulation(&self.model, x, &accs);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_at_once_and_expired_requests_never_run() {
    let g = gated(1, None).await;
    let pbs = g.remote.info.pbs_per_sample as f64;

    // A holds the only slot: it runs, held at the gate, however fast the machine is.
    let a = g.spawn_infer(0..2, None).await;
    wait_for_metrics(&g.server, "A running", |m| {
        metric(m, "veil_inferences_in_flight") == 1.0
    })
    .await;

    // B waits in the queue; C finds the queue full and is refused at once.
    let b = g.spawn_infer(0..1, None).await;
    wait_for_metrics(&g.server, "B queued", |m| {
        metric(m, "veil_inference_queue_depth") == 1.0
    })
    .await;
    let err = g.spawn_infer(0..1, None).await.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Some(Code::ResourceExhausted), "{err}");
    assert!(err.to_string().contains("busy"), "{err}");

    // B's client goes away: B leaves the queue without running.
    b.abort();
    wait_for_metrics(&g.server, "B gone", |m| {
        metric(m, "veil_inference_queue_depth") == 0.0
    })
    .await;

    // D's deadline passes while A still holds the slot: it ends with the deadline.
    let d = g.spawn_infer(0..1, Some(Duration::from_millis(300))).await;
    let err = d.await.unwrap().unwrap_err();
    assert!(
        matches!(err.code(), Some(Code::DeadlineExceeded | Code::Cancelled)),
        "{err}"
    );
    let m = wait_for_metrics(&g.server, "D gone", |m| {
        metric(m, "veil_inference_queue_depth") == 0.0
    })
    .await;
    assert_eq!(metric(&m, "veil_inferences_in_flight"), 1.0, "A still runs");

    // A finishes; neither B nor D was ever evaluated.
    g.gate.open(1);
    let reply = a.await.unwrap().expect("A succeeds");
    assert_eq!(reply.outputs.len(), 2);
    let m = wait_for_metrics(&g.server, "A done", |m| {
        metric(m, "veil_inferences_in_flight") == 0.0
    })
    .await;
    assert_eq!(
        metric(&m, "veil_bootstraps_total"),
        2.0 * pbs,
        "only A was evaluated"
    );
    assert_eq!(metric(&m, "veil_inferences_in_flight_max"), 1.0);
    g.serves_normally().await;
    g.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_waited_too_long_is_answered_at_once_not_run_late() {
    let g = gated(4, Some(Duration::from_millis(200))).await;
    let pbs = g.remote.info.pbs_per_sample as f64;
    let a = g.spawn_infer(0..1, None).await;
    wait_for_metrics(&g.server, "A running", |m| {
        metric(m, "veil_inferences_in_flight") == 1.0
    })
    .await;
    // E's deadline is far away, but the server's queue wait bound answers it while A still
    // runs (without the bound, E would end with DEADLINE_EXCEEDED instead).
    let err = g
        .spawn_infer(1..2, Some(Duration::from_secs(60)))
        .await
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::Unavailable), "{err}");
    assert!(err.to_string().contains("--max-queue-wait"), "{err}");
    let m = g.server.metrics().await;
    assert_eq!(metric(&m, "veil_inferences_in_flight"), 1.0, "A still runs");
    assert_eq!(
        metric(&m, "veil_inference_queue_depth"),
        0.0,
        "E left the queue"
    );
    assert_eq!(
        metric(
            &m,
            r#"veil_requests_total{code="UNAVAILABLE",method="Infer"}"#
        ),
        1.0
    );
    g.gate.open(1);
    a.await.unwrap().expect("A succeeds");
    let m = wait_for_metrics(&g.server, "A done", |m| {
        metric(m, "veil_inferences_in_flight") == 0.0
    })
    .await;
    assert_eq!(metric(&m, "veil_bootstraps_total"), pbs, "E never ran");
    g.serves_normally().await;
    g.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_retries_unavailable_until_a_slot_frees() {
    let g = gated(4, Some(Duration::from_millis(100))).await;
    let a = g.spawn_infer(0..1, None).await;
    wait_for_metrics(&g.server, "A running", |m| {
        metric(m, "veil_inferences_in_flight") == 1.0
    })
    .await;
    // E, with the client's retries, is answered UNAVAILABLE while A holds the slot...
    let samples = g
        .remote
        .encrypt_batch(&g.keys, g.test.features[1..2].to_vec())
        .await
        .unwrap();
    let c = g.client.clone().with_retry(RetryPolicy {
        attempts: 1000,
        first_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(100),
    });
    let id = g.keys.key_id.clone();
    let e = tokio::spawn(async move { c.infer("digits", &id, samples).await });
    let unavailable = r#"veil_requests_total{code="UNAVAILABLE",method="Infer"}"#;
    wait_for_metrics(&g.server, "E turned away twice", |m| {
        m.contains(unavailable) && metric(m, unavailable) >= 2.0
    })
    .await;
    // ...and served by a retry once A is done, with the right answer.
    g.gate.open(2);
    a.await.unwrap().expect("A succeeds");
    let reply = tokio::time::timeout(Duration::from_secs(300), e)
        .await
        .expect("E ends")
        .unwrap()
        .expect("a retry of E is served");
    let accs = g.remote.decrypt_accs(&g.keys, &reply.outputs[0]).unwrap();
    check_sample_against_simulation(&g.model, &g.test.features[1], &accs);
    g.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_says_not_serving_while_draining() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let models = TempDir::new(TMP, "drain-models");
    let data = TempDir::new(TMP, "drain-data");
    install_model(models.path(), "iris", &compile_zoo("iris_logreg"));
    let mut config = Config::new(models.path(), data.path());
    // Longer than the test: the server drains for its whole remaining life.
    config.drain = Duration::from_secs(600);
    let mut server = TestServer::start(config).await;
    assert_healthy(&server.url()).await;
    server.begin_stop();
    // Still answering, but saying NOT_SERVING, overall and for the service.
    loop {
        let (overall, veil) = health(&server.url()).await;
        if overall == ServingStatus::NotServing {
            assert_eq!(veil, ServingStatus::NotServing);
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(metric(&server.metrics().await, "veil_draining"), 1.0);
    let client = Client::connect(&server.url()).await.unwrap();
    assert_eq!(
        client.list_models().await.unwrap().len(),
        1,
        "calls still served"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_that_never_ends_meets_the_overall_deadline() {
    let models = TempDir::new(TMP, "upload-deadline-models");
    let data = TempDir::new(TMP, "upload-deadline-data");
    install_model(models.path(), "iris", &compile_zoo("iris_logreg"));
    let mut config = Config::new(models.path(), data.path());
    config.limits.upload_idle_timeout = Duration::from_secs(60);
    config.limits.upload_timeout = Duration::from_secs(1);
    let server = TestServer::start(config).await;
    let client = Client::connect(&server.url()).await.unwrap();
    // A client that keeps sending a little, never idle long enough for the idle timeout,
    // and never finishing.
    let (stream, sender) = trickle(Duration::from_millis(50));
    let err = client.rpc().upload_key(stream).await.unwrap_err();
    sender.abort();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(err.message().contains("longer than"), "{err:?}");
    server.stop().await;
}

/// A client stream that sends 1 KiB chunks, one per `every`, until dropped.
fn trickle(
    every: Duration,
) -> (
    tokio_stream::wrappers::ReceiverStream<veil_proto::v1::UploadKeyRequest>,
    tokio::task::JoinHandle<()>,
) {
    use veil_proto::v1;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let task = tokio::spawn(async move {
        loop {
            let chunk = v1::UploadKeyRequest {
                part: Some(v1::upload_key_request::Part::Chunk(vec![0; 1024])),
            };
            if tx.send(chunk).await.is_err() {
                return;
            }
            tokio::time::sleep(every).await;
        }
    });
    (tokio_stream::wrappers::ReceiverStream::new(rx), task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickling_upload_holds_no_validation_permit() {
    let models = TempDir::new(TMP, "trickle-models");
    let data = TempDir::new(TMP, "trickle-data");
    let model = compile_zoo("iris_logreg");
    install_model(models.path(), "iris", &model);
    let mut config = Config::new(models.path(), data.path());
    // One validation at a time; the trickle is never cut by a rate or a timeout here.
    config.limits.concurrent_uploads = 1;
    config.limits.upload_min_rate = 0;
    let server = TestServer::start(config).await;
    let client = Client::connect(&server.url()).await.unwrap();
    let (stream, sender) = trickle(Duration::from_millis(50));
    let slow = {
        let mut rpc = client.rpc();
        tokio::spawn(async move { rpc.upload_key(stream).await })
    };
    wait_for_metrics(&server, "the trickle arriving", |m| {
        metric(m, "veil_uploads_receiving") == 1.0
    })
    .await;
    // A real key is received, validated and stored meanwhile.
    let keys = KeyPair::generate(model.params);
    let status = tokio::time::timeout(
        Duration::from_secs(120),
        client.ensure_key(&keys, |_, _| {}),
    )
    .await
    .expect("the upload is not held behind the trickle")
    .unwrap();
    assert!(status.uploaded);
    assert!(!slow.is_finished(), "the trickle is still arriving");
    assert_eq!(
        metric(&server.metrics().await, "veil_uploads_receiving"),
        1.0
    );
    sender.abort();
    slow.abort();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_below_the_minimum_rate_is_ended() {
    let models = TempDir::new(TMP, "slow-models");
    let data = TempDir::new(TMP, "slow-data");
    install_model(models.path(), "iris", &compile_zoo("iris_logreg"));
    let mut config = Config::new(models.path(), data.path());
    // No grace and 1 MB/s: a client sending 1 KiB per 20 ms (at most 51 KB/s) is below it
    // from its second chunk on, however fast the machine.
    config.limits.upload_rate_grace = Duration::ZERO;
    config.limits.upload_min_rate = 1_000_000;
    let server = TestServer::start(config).await;
    let client = Client::connect(&server.url()).await.unwrap();
    let (stream, sender) = trickle(Duration::from_millis(20));
    let err = client.rpc().upload_key(stream).await.unwrap_err();
    sender.abort();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(err.message().contains("too slow"), "{err:?}");
    let m = wait_for_metrics(&server, "the upload to end", |m| {
        metric(m, "veil_uploads_receiving") == 0.0
    })
    .await;
    assert_eq!(
        metric(
            &m,
            r#"veil_requests_total{code="DEADLINE_EXCEEDED",method="UploadKey"}"#
        ),
        1.0
    );
    server.stop().await;
}
