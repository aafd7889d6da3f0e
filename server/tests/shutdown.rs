//! Promises about time: a client deadline that passes on the server is answered CANCELLED
//! (as the proto says), and `--shutdown-grace` is a hard bound: after SIGTERM the process
//! exits even while a blocking evaluation is still running. On the way: a small method
//! refuses a message over its 4 KiB decode limit, and with `--max-concurrent-calls 1` a call
//! made while the evaluation runs is shed with UNAVAILABLE at once.

mod common;

use std::time::Duration;

use common::*;
use veil_client::{Client, KeyPair};

#[test]
fn deadlines_answer_cancelled_and_the_grace_bounds_shutdown() {
    let dir = Scratch::new("shutdown");
    let model = compile_zoo("digits_cnn");
    model.save(&dir.0.join("models/digits.veil")).unwrap();
    let test = test_set("digits_cnn", model.n_features());
    let mut server = Proc::start(
        &dir.0,
        &[
            "--shutdown-grace",
            "1",
            "--batch-window-ms",
            "0",
            "--max-concurrent-calls",
            "1",
        ],
    );

    let rt = runtime();
    let long = rt.block_on(async {
        let client = Client::connect(&server.url()).await.unwrap();
        let remote = client.model("digits").await.unwrap();
        let params = model.params;
        let keys = tokio::task::spawn_blocking(move || KeyPair::generate(params))
            .await
            .unwrap();
        client.ensure_key(&keys, |_, _| {}).await.unwrap();

        // GetKey decodes at most 4 KiB: a 5 KiB key id is refused by the decoder
        // (OUT_OF_RANGE), not decoded and then judged malformed (INVALID_ARGUMENT).
        let err = client
            .rpc()
            .get_key(veil_proto::v1::GetKeyRequest {
                key_id: "a".repeat(5 << 10),
            })
            .await
            .expect_err("over the small methods' limit");
        assert_eq!(err.code(), tonic::Code::OutOfRange, "{err}");

        // A deadline far shorter than the evaluation: the client sees CANCELLED.
        let eight = remote
            .encrypt_batch(&keys, test.features[..8].to_vec())
            .await
            .unwrap();
        let err = client
            .clone()
            .with_deadline(Some(Duration::from_millis(100)))
            .infer("digits", &keys.key_id, eight)
            .await
            .expect_err("100 ms is far shorter than 8 samples of digits_cnn");
        assert_eq!(err.code(), Some(tonic::Code::Cancelled), "{err}");
        wait_until(
            "the abandoned evaluation to end",
            Duration::from_secs(300),
            || metric(&server.metrics(), "veil_inferences_in_flight") == 0.0,
        );

        // A batch that takes minutes (the model's largest: 144 bootstraps per sample).
        let n = remote.max_batch().min(256);
        let rows: Vec<Vec<f64>> = (0..n)
            .map(|i| test.features[i % test.features.len()].clone())
            .collect();
        let batch = remote.encrypt_batch(&keys, rows).await.unwrap();
        (client, keys.key_id.clone(), batch)
    });
    let (client, id, batch) = long;
    let _long = rt.spawn(async move { client.infer("digits", &id, batch).await });
    wait_until(
        "the long evaluation to start",
        Duration::from_secs(120),
        || metric(&server.metrics(), "veil_inferences_in_flight") == 1.0,
    );
    // The one call slot is the evaluation's: another call is shed at once.
    let shed =
        rt.block_on(async {
            // No retry: this checks the server's own answer.
            let client = Client::connect(&server.url()).await.unwrap().with_retry(
                veil_client::RetryPolicy {
                    attempts: 1,
                    ..Default::default()
                },
            );
            client.list_models().await.map(|_| ())
        });
    let err = shed.expect_err("every call slot is taken");
    assert_eq!(err.code(), Some(tonic::Code::Unavailable), "{err}");
    assert!(err.to_string().contains("calls in progress"), "{err}");
    server.signal("-TERM");
    // Generous against the 1 s grace, far shorter than the evaluation.
    let status = server
        .wait_exit(Duration::from_secs(30))
        .expect("the server exits within 30 s of SIGTERM while an evaluation still runs");
    assert!(status.success(), "{status:?}");
    drop(rt);
}
