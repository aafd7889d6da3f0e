//! Fairness between tenants: one tenant floods the server with large batches while another
//! sends one sample at a time. The second tenant's median latency under the flood stays
//! within 3x of its median latency alone (measured in the same run, so the machine's load
//! cancels out). What makes it hold: the flooder's `max_requests` leaves an evaluation slot
//! free, permits go round-robin between tenants, and each running evaluation has its own
//! thread pool, so a one-sample evaluation shares the cores instead of queueing behind every
//! bootstrap of a large batch. Also: the work rate counts bootstraps, not calls.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tonic::Code;
use veil_client::{Client, ConnectOptions, KeyPair};
use veil_server::scheduler::EvalGate;
use veil_server::{BatchPolicy, Config, Tenants};
use veil_tests::*;

const TMP: &str = env!("CARGO_TARGET_TMPDIR");
/// Samples in each of the flooder's requests.
const FLOOD_BATCH: usize = 64;
/// The flooder's concurrent streams: more than its `max_requests` and than the server's slots.
const FLOOD_STREAMS: usize = 3;
/// One-sample requests per phase; the median of each phase is compared.
const PROBES: usize = 9;

async fn as_tenant(url: &str, token: &str) -> Client {
    let options = ConnectOptions {
        token: Some(token.into()),
        ..ConnectOptions::default()
    };
    Client::connect_with(url, &options).await.unwrap()
}

fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_large_batches_leaves_a_small_tenant_within_3x_of_its_latency_alone() {
    let models = TempDir::new(TMP, "fair-models");
    let data = TempDir::new(TMP, "fair-data");
    let model = compile_zoo("wine_mlp");
    install_model(models.path(), "wine", &model);
    let test = test_set("wine_mlp", model.n_features());
    let tenants = format!(
        "{}{}",
        tenant_toml("flood", "flood-token", "max_requests = 1"),
        tenant_toml("small", "small-token", "")
    );
    let mut config = Config::new(models.path(), data.path());
    config.tenants = Some(Arc::new(Tenants::parse(&tenants).unwrap()));
    config.limits.concurrent_inferences = 2;
    config.limits.batching = BatchPolicy {
        window: Duration::ZERO,
        ..BatchPolicy::default()
    };
    let server = TestServer::start(config).await;
    let flood = as_tenant(&server.url(), "flood-token").await;
    let small = as_tenant(&server.url(), "small-token").await;
    let (flood_keys, small_keys) = (
        KeyPair::generate(model.params),
        KeyPair::generate(model.params),
    );
    flood.ensure_key(&flood_keys, |_, _| {}).await.unwrap();
    small.ensure_key(&small_keys, |_, _| {}).await.unwrap();
    let remote = small.model("wine").await.unwrap();
    let pbs = remote.info.pbs_per_sample;
    let rows: Vec<Vec<f64>> = (0..FLOOD_BATCH)
        .map(|i| test.features[i % test.features.len()].clone())
        .collect();
    let big = remote.encrypt_batch(&flood_keys, rows).await.unwrap();
    let one = remote
        .encrypt_batch(&small_keys, vec![test.features[0].clone()])
        .await
        .unwrap();

    // The small tenant's latency as its client sees it, one request at a time; under the
    // flood each probe starts while a flood evaluation runs.
    let probe = |flooding: bool| {
        let (small, one, id, server) = (
            small.clone(),
            one.clone(),
            small_keys.key_id.clone(),
            &server,
        );
        async move {
            let mut latencies = Vec::new();
            for _ in 0..PROBES {
                if flooding {
                    wait_for_metrics(server, "a flood evaluation running", |m| {
                        metric(m, "veil_inferences_in_flight") >= 1.0
                    })
                    .await;
                }
                let t = Instant::now();
                let reply = small.infer("wine", &id, one.clone()).await.unwrap();
                latencies.push(t.elapsed());
                assert_eq!(reply.merged_samples, 1, "never merged with the flood");
            }
            latencies
        }
    };
    // Warm up both keys and pools, then alone.
    small
        .infer("wine", &small_keys.key_id, one.clone())
        .await
        .unwrap();
    let alone = probe(false).await;

    // The flood: FLOOD_STREAMS streams of large batches back to back, until told to stop.
    // Requests over the tenant's max_requests are refused at once; a refused stream backs
    // off briefly and retries, as a client would.
    let stop = Arc::new(AtomicBool::new(false));
    let flooders: Vec<_> = (0..FLOOD_STREAMS)
        .map(|_| {
            let (flood, big, id, stop) = (
                flood.clone(),
                big.clone(),
                flood_keys.key_id.clone(),
                Arc::clone(&stop),
            );
            tokio::spawn(async move {
                let (mut done, mut refused) = (0u64, 0u64);
                while !stop.load(Ordering::SeqCst) {
                    match flood.infer("wine", &id, big.clone()).await {
                        Ok(reply) => {
                            assert_eq!(reply.outputs.len(), FLOOD_BATCH);
                            done += 1;
                        }
                        Err(e) => {
                            assert_eq!(e.code(), Some(Code::ResourceExhausted), "{e}");
                            refused += 1;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
                (done, refused)
            })
        })
        .collect();
    let flooded = probe(true).await;
    stop.store(true, Ordering::SeqCst);
    let (mut flood_requests, mut flood_refused) = (0, 0);
    for f in flooders {
        let (done, refused) = tokio::time::timeout(Duration::from_secs(300), f)
            .await
            .expect("the flood ends")
            .unwrap();
        flood_requests += done;
        flood_refused += refused;
    }
    let (alone_median, flooded_median) = (median(alone.clone()), median(flooded.clone()));
    eprintln!(
        "small tenant, {PROBES} one-sample requests: median alone {alone_median:?}, under the \
         flood {flooded_median:?} (ratio {:.2}); flood: {FLOOD_BATCH}-sample requests, \
         {flood_requests} answered, {flood_refused} refused over max_requests\nalone: {alone:?}\nflooded: {flooded:?}",
        flooded_median.as_secs_f64() / alone_median.as_secs_f64(),
    );
    assert!(flood_requests >= 1, "the flood ran");
    assert!(
        flooded_median <= alone_median * 3,
        "median {flooded_median:?} under the flood, {alone_median:?} alone"
    );
    // Billing counts bootstraps per tenant: the flood's samples times the model's bootstraps.
    let m = server.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"veil_tenant_bootstraps_total{model="wine",tenant="small"}"#
        ),
        ((2 * PROBES + 1) as u64 * pbs) as f64
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_work_rate_counts_bootstraps_not_calls_and_caps_requests_per_tenant() {
    let models = TempDir::new(TMP, "work-models");
    let data = TempDir::new(TMP, "work-data");
    let model = compile_zoo("wine_mlp");
    install_model(models.path(), "wine", &model);
    let test = test_set("wine_mlp", model.n_features());
    let pbs = model.pbs_per_sample() as u64;
    // A burst of 20 samples' work and a negligible refill; one request at a time.
    let tenants = tenant_toml(
        "a",
        "a-token",
        &format!(
            "bootstraps_per_second = 0.001\nbootstrap_burst = {}\nmax_requests = 1",
            20 * pbs
        ),
    );
    let gate = EvalGate::new();
    let mut config = Config::new(models.path(), data.path());
    config.tenants = Some(Arc::new(Tenants::parse(&tenants).unwrap()));
    config.limits.eval_gate = Some(Arc::clone(&gate));
    let server = TestServer::start(config).await;
    let client = as_tenant(&server.url(), "a-token").await;
    let keys = KeyPair::generate(model.params);
    client.ensure_key(&keys, |_, _| {}).await.unwrap();
    let remote = client.model("wine").await.unwrap();
    let enc = |n: usize| remote.encrypt_batch(&keys, test.features[..n].to_vec());

    // One request held running at the gate: a second one of the tenant's is refused at once.
    let held = {
        let (c, id, s) = (client.clone(), keys.key_id.clone(), enc(1).await.unwrap());
        tokio::spawn(async move { c.infer("wine", &id, s).await })
    };
    wait_for_metrics(&server, "the first request running", |m| {
        metric(m, "veil_inferences_in_flight") == 1.0
    })
    .await;
    let err = client
        .infer("wine", &keys.key_id, enc(1).await.unwrap())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::ResourceExhausted), "{err}");
    assert!(err.to_string().contains("max_requests"), "{err}");
    gate.open(1);
    held.await.unwrap().unwrap();

    // 1 + 16 samples spend 17 samples' work, not two calls' worth...
    gate.open(2);
    client
        .infer("wine", &keys.key_id, enc(16).await.unwrap())
        .await
        .unwrap();
    // ... so 8 more are over the rate, while 3 still fit.
    let err = client
        .infer("wine", &keys.key_id, enc(8).await.unwrap())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::ResourceExhausted), "{err}");
    assert!(err.to_string().contains("bootstraps per second"), "{err}");
    client
        .infer("wine", &keys.key_id, enc(3).await.unwrap())
        .await
        .unwrap();
    // A request costing more than the whole burst could never pass: refused as invalid.
    let err = client
        .infer("wine", &keys.key_id, enc(21).await.unwrap())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");
    let m = server.metrics().await;
    assert_eq!(
        metric(&m, r#"veil_tenant_samples_total{model="wine",tenant="a"}"#),
        20.0
    );
    assert_eq!(
        metric(
            &m,
            r#"veil_tenant_bootstraps_total{model="wine",tenant="a"}"#
        ),
        (20 * pbs) as f64
    );
    assert_eq!(
        metric(&m, r#"veil_tenant_requests_total{model="wine",tenant="a"}"#),
        3.0
    );
    server.stop().await;
}
