//! Requests for the same model and key that arrive together are merged into one evaluation;
//! each client still gets exactly its own outputs. Real server on a loopback port, two
//! clients with their own keys, concurrent requests.

use std::time::Duration;

use veil_client::{Client, KeyPair, RemoteModel};
use veil_server::{BatchPolicy, Config};
use veil_tests::*;

const TMP: &str = env!("CARGO_TARGET_TMPDIR");

/// Decrypts a reply with `keys` and checks each sample against its own simulation; returns
/// how many labels agree.
fn assert_own_outputs(
    model: &veil_models::CompiledModel,
    remote: &RemoteModel,
    keys: &KeyPair,
    xs: &[Vec<f64>],
    outputs: &[Vec<u8>],
) -> usize {
    assert_eq!(outputs.len(), xs.len());
    xs.iter()
        .zip(outputs)
        .filter(|(x, o)| {
            let accs = remote
                .decrypt_accs(keys, o)
                .expect("decrypts with its own key");
            check_sample_against_simulation(model, x, &accs)
        })
        .count()
}

/// A served zoo model with a batching policy, a connected client and the test set. The
/// directories live as long as the returned value.
struct Setup {
    server: TestServer,
    client: Client,
    model: veil_models::CompiledModel,
    test: veil_models::data::Dataset,
    _dirs: (TempDir, TempDir),
}

async fn serve(zoo: &str, name: &str, policy: BatchPolicy, concurrent: usize) -> Setup {
    let models = TempDir::new(TMP, &format!("{name}-models"));
    let data = TempDir::new(TMP, &format!("{name}-data"));
    let model = compile_zoo(zoo);
    install_model(models.path(), name, &model);
    let test = test_set(zoo, model.n_features());
    let mut config = Config::new(models.path(), data.path());
    config.limits.batching = policy;
    config.limits.concurrent_inferences = concurrent;
    let server = TestServer::start(config).await;
    let client = Client::connect(&server.url()).await.unwrap();
    Setup {
        server,
        client,
        model,
        test,
        _dirs: (models, data),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_are_merged_and_each_gets_its_own_outputs() {
    // A window longer than the test: each batch closes when it holds exactly max_samples,
    // whenever its requests arrive, so the merge does not depend on the machine's speed.
    let policy = BatchPolicy {
        window: Duration::from_secs(60),
        max_samples: 4,
        ..BatchPolicy::default()
    };
    let Setup {
        server,
        client,
        model,
        test,
        _dirs,
    } = serve("digits_mlp", "digits", policy, 1).await;
    let alice = KeyPair::generate(model.params);
    let bob = KeyPair::generate(model.params);
    client.ensure_key(&alice, |_, _| {}).await.unwrap();
    client.ensure_key(&bob, |_, _| {}).await.unwrap();
    let remote = client.model("digits").await.unwrap();

    // Alice: three requests of 1, 2 and 1 samples (different rows); Bob: two of 2 samples.
    let rows: [&[Vec<f64>]; 5] = [
        &test.features[0..1],
        &test.features[1..3],
        &test.features[3..4],
        &test.features[4..6],
        &test.features[6..8],
    ];
    let who = [&alice, &alice, &alice, &bob, &bob];
    let mut tasks = Vec::new();
    for (xs, keys) in rows.iter().zip(who) {
        let samples: Vec<Vec<u8>> = xs
            .iter()
            .map(|x| remote.encrypt(keys, x).unwrap())
            .collect();
        let client = Client::connect(&server.url()).await.unwrap();
        let id = keys.key_id.clone();
        tasks.push(tokio::spawn(async move {
            client.infer("digits", &id, samples).await
        }));
    }
    let mut replies = Vec::new();
    for t in tasks {
        replies.push(t.await.unwrap().expect("infer succeeds"));
    }

    // Alice's three requests ran as one evaluation of 4 samples, Bob's two as another: a
    // batch mixing keys would fail the decryptions below.
    for r in &replies {
        assert_eq!(r.merged_samples, 4, "requests of one key merged");
    }
    assert_eq!(
        replies[0].server_eval, replies[2].server_eval,
        "one evaluation"
    );
    assert_eq!(
        replies[3].server_eval, replies[4].server_eval,
        "one evaluation"
    );
    let mut agree = 0;
    let mut total = 0;
    for ((xs, keys), r) in rows.iter().zip(who).zip(&replies) {
        agree += assert_own_outputs(&model, &remote, keys, xs, &r.outputs);
        total += xs.len();
    }
    assert!(
        agree + 1 >= total,
        "{agree} of {total} labels agree with simulation"
    );

    // A request for a key that is not uploaded fails alone, without disturbing a batch.
    let stranger = KeyPair::generate(model.params);
    let x = remote.encrypt(&stranger, &test.features[0]).unwrap();
    let err = client
        .infer("digits", &stranger.key_id, vec![x])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::NotFound), "{err}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_window_never_merges() {
    let policy = BatchPolicy {
        window: Duration::ZERO,
        max_samples: 64,
        ..BatchPolicy::default()
    };
    let Setup {
        server,
        client,
        model,
        test,
        _dirs,
    } = serve("iris_logreg", "iris", policy, 2).await;
    let keys = KeyPair::generate(model.params);
    client.ensure_key(&keys, |_, _| {}).await.unwrap();
    let remote = client.model("iris").await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..3 {
        let xs = test.features[2 * i..2 * i + 2].to_vec();
        let samples: Vec<Vec<u8>> = xs
            .iter()
            .map(|x| remote.encrypt(&keys, x).unwrap())
            .collect();
        let client = client.clone();
        let id = keys.key_id.clone();
        tasks.push(tokio::spawn(async move {
            (xs, client.infer("iris", &id, samples).await)
        }));
    }
    for t in tasks {
        let (xs, reply) = t.await.unwrap();
        let reply = reply.unwrap();
        assert_eq!(reply.merged_samples, 2, "each request evaluated alone");
        assert_own_outputs(&model, &remote, &keys, &xs, &reply.outputs);
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merged_batches_stay_within_their_memory_bound() {
    let model = compile_zoo("iris_logreg");
    let per_sample = veil_runtime::FheModel::new(model)
        .unwrap()
        .working_bytes_per_sample();
    // Room for two samples' working set, not three; a window longer than the test, so each
    // batch closes at the bound.
    let policy = BatchPolicy {
        window: Duration::from_secs(60),
        max_samples: 64,
        max_bytes: 2 * per_sample + per_sample / 2,
    };
    let Setup {
        server,
        client,
        model,
        test,
        _dirs,
    } = serve("iris_logreg", "iris", policy, 2).await;
    let keys = KeyPair::generate(model.params);
    client.ensure_key(&keys, |_, _| {}).await.unwrap();
    let remote = client.model("iris").await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..4 {
        let xs = test.features[i..i + 1].to_vec();
        let samples = vec![remote.encrypt(&keys, &xs[0]).unwrap()];
        let client = client.clone();
        let id = keys.key_id.clone();
        tasks.push(tokio::spawn(async move {
            (xs, client.infer("iris", &id, samples).await)
        }));
    }
    let mut merged = Vec::new();
    for t in tasks {
        let (xs, reply) = t.await.unwrap();
        let reply = reply.unwrap();
        merged.push(reply.merged_samples);
        assert_own_outputs(&model, &remote, &keys, &xs, &reply.outputs);
    }
    assert_eq!(
        merged,
        vec![2, 2, 2, 2],
        "merged up to the bound, never past it"
    );
    server.stop().await;
}
