//! The inference queue is bounded and a request whose deadline passes while it waits is never
//! evaluated. Observed through the server's metrics, never through timing.

use std::time::Duration;

use tonic::Code;
use veil_client::{Client, KeyPair};
use veil_server::{BatchPolicy, Config};
use veil_tests::*;

const TMP: &str = env!("CARGO_TARGET_TMPDIR");

/// Polls the metrics until `ready` holds for them (or `gave_up` says to stop); returns them.
async fn wait_for(
    server: &TestServer,
    mut ready: impl FnMut(&str) -> bool,
    mut gave_up: impl FnMut() -> bool,
) -> String {
    loop {
        let m = server.metrics().await;
        if ready(&m) || gave_up() {
            return m;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_at_once_and_expired_requests_never_run() {
    let models = TempDir::new(TMP, "limits-models");
    let data = TempDir::new(TMP, "limits-data");
    let model = compile_zoo("digits_mlp");
    install_model(models.path(), "digits", &model);
    let test = test_set("digits_mlp", model.n_features());
    let mut config = Config::new(models.path(), data.path());
    config.limits.concurrent_inferences = 1;
    config.limits.max_queue = 1;
    config.limits.batching = BatchPolicy {
        window: Duration::ZERO,
        ..BatchPolicy::default()
    };
    let server = TestServer::start(config).await;
    let client = Client::connect(&server.url()).await.unwrap();
    let keys = KeyPair::generate(model.params);
    client.ensure_key(&keys, |_, _| {}).await.unwrap();
    let remote = client.model("digits").await.unwrap();
    let pbs = remote.info.pbs_per_sample as f64;

    // A: a long evaluation that holds the only slot.
    let long = 24;
    let a_samples = remote
        .encrypt_batch(&keys, test.features[..long].to_vec())
        .await
        .unwrap();
    let a = {
        let (c, id) = (client.clone(), keys.key_id.clone());
        tokio::spawn(async move { c.infer("digits", &id, a_samples).await })
    };
    wait_for(
        &server,
        |m| metric(m, "veil_inferences_in_flight") == 1.0,
        || a.is_finished(),
    )
    .await;
    assert!(!a.is_finished(), "A still running when B and C arrive");

    // B waits in the queue with a short deadline; C finds the queue full.
    let one = remote
        .encrypt_batch(&keys, vec![test.features[0].clone()])
        .await
        .unwrap();
    let b = {
        let c = client
            .clone()
            .with_deadline(Some(Duration::from_millis(300)));
        let (id, s) = (keys.key_id.clone(), one.clone());
        tokio::spawn(async move { c.infer("digits", &id, s).await })
    };
    let m = wait_for(
        &server,
        |m| metric(m, "veil_inference_queue_depth") == 1.0,
        || b.is_finished(),
    )
    .await;
    assert_eq!(metric(&m, "veil_inferences_in_flight"), 1.0, "A still runs");
    let err = client
        .infer("digits", &keys.key_id, one.clone())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::ResourceExhausted), "{err}");
    assert!(err.to_string().contains("busy"), "{err}");

    // B's deadline passes while A runs: it ends with the deadline, and is never evaluated.
    let err = b.await.unwrap().unwrap_err();
    assert!(
        matches!(err.code(), Some(Code::DeadlineExceeded | Code::Cancelled)),
        "{err}"
    );
    let reply = a.await.unwrap().expect("A succeeds");
    assert_eq!(reply.outputs.len(), long);
    let m = wait_for(
        &server,
        |m| metric(m, "veil_inference_queue_depth") == 0.0,
        || false,
    )
    .await;
    assert_eq!(
        metric(&m, "veil_bootstraps_total"),
        long as f64 * pbs,
        "only A was evaluated"
    );
    assert_eq!(metric(&m, "veil_inferences_in_flight_max"), 1.0);

    // The server answers normally afterwards.
    let reply = client.infer("digits", &keys.key_id, one).await.unwrap();
    let accs = remote.decrypt_accs(&keys, &reply.outputs[0]).unwrap();
    check_sample_against_simulation(&model, &test.features[0], &accs);
    server.stop().await;
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
    use veil_proto::v1;
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
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let trickle = tokio::spawn(async move {
        loop {
            let chunk = v1::UploadKeyRequest {
                part: Some(v1::upload_key_request::Part::Chunk(vec![0; 1024])),
            };
            if tx.send(chunk).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let err = client
        .rpc()
        .upload_key(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap_err();
    trickle.abort();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(err.message().contains("longer than"), "{err:?}");
    server.stop().await;
}
