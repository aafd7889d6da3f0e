//! A cancellation flood: requests whose deadlines expire during evaluation, sent back to back.
//! Cancelling never frees an evaluation slot early, so at most `concurrent_inferences`
//! evaluations ever run, as the server's own gauges and its thread count show; afterwards it
//! answers normally. (Alone in its test binary, so the thread count is the server's.)
//! Evaluations wait at a gate the test opens, so "the deadline passes mid-evaluation" holds
//! on any machine, however fast.

use std::time::Duration;

use veil_client::{Client, KeyPair};
use veil_server::scheduler::EvalGate;
use veil_server::{BatchPolicy, Config};
use veil_tests::*;

const TMP: &str = env!("CARGO_TARGET_TMPDIR");
const CONCURRENT: usize = 2;
const FLOOD: usize = 16;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_flood_never_runs_more_evaluations_than_allowed() {
    let models = TempDir::new(TMP, "flood-models");
    let data = TempDir::new(TMP, "flood-data");
    let model = compile_zoo("digits_mlp");
    install_model(models.path(), "digits", &model);
    let test = test_set("digits_mlp", model.n_features());
    let gate = EvalGate::new();
    let mut config = Config::new(models.path(), data.path());
    config.limits.eval_gate = Some(std::sync::Arc::clone(&gate));
    config.limits.concurrent_inferences = CONCURRENT;
    config.limits.batching = BatchPolicy {
        window: Duration::ZERO,
        ..BatchPolicy::default()
    };
    let server = TestServer::start(config).await;
    let client = Client::connect(&server.url()).await.unwrap();
    let keys = KeyPair::generate(model.params);
    client.ensure_key(&keys, |_, _| {}).await.unwrap();
    let remote = client.model("digits").await.unwrap();
    // Warm up (the evaluation thread pool starts on first use).
    gate.open(1);
    let one = remote
        .encrypt_batch(&keys, vec![test.features[0].clone()])
        .await
        .unwrap();
    client
        .infer("digits", &keys.key_id, one.clone())
        .await
        .unwrap();
    let threads_before = metric(&server.metrics().await, "veil_process_threads");
    assert!(threads_before > 0.0, "the thread gauge is exported");

    // The gate is shut. CONCURRENT requests of 8 samples start and are held; then their
    // clients give up.
    let samples = remote
        .encrypt_batch(&keys, test.features[..8].to_vec())
        .await
        .unwrap();
    let held: Vec<_> = (0..CONCURRENT)
        .map(|_| {
            let (c, id, s) = (client.clone(), keys.key_id.clone(), samples.clone());
            tokio::spawn(async move { c.infer("digits", &id, s).await })
        })
        .collect();
    wait_for_metrics(&server, "the first requests running", |m| {
        metric(m, "veil_inferences_in_flight") == CONCURRENT as f64
    })
    .await;
    for h in held {
        h.abort();
    }
    wait_for_metrics(&server, "the server to see them cancelled", |m| {
        // The sample appears with the first cancellation: match it as text until then.
        m.contains(&format!(
            "veil_requests_total{{code=\"CANCELLED\",method=\"Infer\"}} {CONCURRENT}\n"
        ))
    })
    .await;
    // Then a flood, each with a 50 ms deadline: every one expires in the queue.
    let hurried = client
        .clone()
        .with_deadline(Some(Duration::from_millis(50)));
    let mut peak_seen = 0.0f64;
    let mut peak_threads = threads_before;
    for _ in 0..FLOOD {
        let err = hurried
            .infer("digits", &keys.key_id, samples.clone())
            .await
            .expect_err("the evaluation is held past the deadline");
        assert!(
            matches!(
                err.code(),
                Some(tonic::Code::DeadlineExceeded | tonic::Code::Cancelled)
            ),
            "{err}"
        );
        let m = server.metrics().await;
        peak_seen = peak_seen.max(metric(&m, "veil_inferences_in_flight"));
        peak_threads = peak_threads.max(metric(&m, "veil_process_threads"));
    }
    let m = server.metrics().await;
    eprintln!(
        "flood of {FLOOD}: in flight seen {peak_seen}, max {}, threads {threads_before} -> peak \
         {peak_threads}, cancelled {}",
        metric(&m, "veil_inferences_in_flight_max"),
        metric(
            &m,
            r#"veil_requests_total{code="CANCELLED",method="Infer"}"#
        ),
    );
    assert!(peak_seen <= CONCURRENT as f64);
    // The abandoned evaluations still hold their slots: cancelling freed none.
    assert_eq!(
        metric(&m, "veil_inferences_in_flight"),
        CONCURRENT as f64,
        "{m}"
    );
    assert!(
        metric(&m, "veil_inferences_in_flight_max") <= CONCURRENT as f64,
        "never more than {CONCURRENT} evaluations at once:\n{m}"
    );
    // Abandoned evaluations do not pile up threads either (without the limit, each would
    // hold a blocking thread of its own).
    assert!(
        peak_threads <= threads_before + 8.0,
        "threads grew from {threads_before} to {peak_threads}"
    );

    // Once the abandoned work drains, the server answers normally and correctly.
    gate.open(CONCURRENT as u64 + 1);
    wait_for_metrics(&server, "the abandoned evaluations to end", |m| {
        metric(m, "veil_inferences_in_flight") == 0.0
            && metric(m, "veil_inference_queue_depth") == 0.0
    })
    .await;
    assert_healthy(&server.url()).await;
    let reply = client.infer("digits", &keys.key_id, one).await.unwrap();
    let accs = remote.decrypt_accs(&keys, &reply.outputs[0]).unwrap();
    check_sample_against_simulation(&model, &test.features[0], &accs);
    server.stop().await;
}
