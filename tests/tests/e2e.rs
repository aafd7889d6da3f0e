//! End to end: the real server on a loopback port, a real key uploaded by the client library,
//! encrypted inference on a shipped model checked against simulation; then a restart, after
//! which the stored key still works without a new upload.

use std::time::{Duration, Instant};
use veil_models::Simulate;

use veil_client::{Client, KeyPair, key_id};
use veil_models::CompiledModel;
use veil_server::Config;
use veil_tests::*;

const TMP: &str = env!("CARGO_TARGET_TMPDIR");

/// Decrypted accumulators match the simulation within the noise, and the labels agree,
/// allowing one flipped close call as the engine's own test does.
fn check_against_simulation(
    model: &CompiledModel,
    xs: &[Vec<f64>],
    accs: &[Vec<f64>],
    labels: &[i64],
) {
    let mut agree = 0;
    for ((x, acc), label) in xs.iter().zip(accs).zip(labels) {
        check_sample_against_simulation(model, x, acc);
        let sim = model.simulate(x, None).unwrap();
        if model.decode(&sim.accs).unwrap().label == *label {
            agree += 1;
        }
    }
    assert!(
        agree + 1 >= xs.len(),
        "{agree} of {} predictions agree with simulation",
        xs.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_inference_over_grpc_and_keys_survive_restarts() {
    let models = TempDir::new(TMP, "e2e-models");
    let data = TempDir::new(TMP, "e2e-data");
    let model = compile_zoo("digits_mlp");
    install_model(models.path(), "digits", &model);
    let test = test_set("digits_mlp", model.n_features());
    let config = Config::new(models.path(), data.path());

    // ---- first server ----
    let server = TestServer::start(config.clone()).await;
    assert_healthy(&server.url()).await;
    let client = Client::connect(&server.url()).await.unwrap();

    let listed = client.list_models().await.unwrap();
    assert_eq!(listed.len(), 1);
    let remote = &listed[0];
    assert_eq!(remote.name(), "digits");
    assert_eq!(
        remote.spec,
        model.client_spec(),
        "the client gets the spec, no weights"
    );
    assert_eq!(remote.info.input_shape, vec![64]);
    assert_eq!(remote.info.n_outputs, 10);
    assert_eq!(remote.info.input.as_ref().unwrap().features.len(), 64);
    assert_eq!(remote.info.pbs_per_sample, model.pbs_per_sample() as u64);
    assert_eq!(remote.info.parameter_set, model.params.name());

    let keys = KeyPair::generate(model.params);
    assert_eq!(keys.key_id, key_id(&keys.eval_key));
    assert_eq!(
        remote.info.eval_key_bytes,
        keys.eval_key.len() as u64,
        "advertised key size: the constant `eval_key_bytes` of the parameter set"
    );
    assert!(client.key_info(&keys.key_id).await.unwrap().is_none());

    let status = client.ensure_key(&keys, |_, _| {}).await.unwrap();
    assert!(status.uploaded);
    assert_eq!(
        status.key_id, keys.key_id,
        "server and client agree on the key id"
    );
    assert_eq!(status.bytes_sent, keys.eval_key.len() as u64);
    // Stored atomically under the data dir, named by its hash.
    let stored = data
        .path()
        .join("keys")
        .join(model.params.name())
        .join(format!("{}.key", keys.key_id));
    assert_eq!(std::fs::read(&stored).unwrap(), keys.eval_key);

    // Asking again skips the upload; uploading again is cheap and gives the same id.
    let again = client.ensure_key(&keys, |_, _| {}).await.unwrap();
    assert!(!again.uploaded);
    let t = Instant::now();
    let re = client.upload_key(&keys, |_, _| {}).await.unwrap();
    assert_eq!(re.key_id, keys.key_id);
    assert!(!re.newly_stored, "a stored key is not stored again");
    eprintln!("re-upload of a stored key: {:?}", t.elapsed());

    // Encrypted inference, through the wire, against simulation.
    let rows = 4;
    let xs = &test.features[..rows];
    let samples: Vec<Vec<u8>> = xs
        .iter()
        .map(|x| remote.encrypt(&keys, x).unwrap())
        .collect();
    let reply = client
        .infer(remote.name(), &keys.key_id, samples)
        .await
        .unwrap();
    let per_sample = reply.request_bytes as f64 / rows as f64;
    eprintln!(
        "request {per_sample:.0} bytes/sample, response {} bytes/sample, server eval {:?}",
        reply.response_bytes / rows,
        reply.server_eval
    );
    assert!(
        per_sample <= 1024.0,
        "one digits sample costs <= 1 KB on the wire"
    );
    let accs: Vec<Vec<f64>> = reply
        .outputs
        .iter()
        .map(|o| remote.decrypt_accs(&keys, o).unwrap())
        .collect();
    let labels: Vec<i64> = accs
        .iter()
        .map(|a| remote.spec.decode(a).unwrap().label)
        .collect();
    check_against_simulation(&model, xs, &accs, &labels);

    // Health and listing stay responsive while the server evaluates a batch: they answer
    // between two metric readings that both show the evaluation running. (A machine fast
    // enough to finish the batch in between gets another try, not a failure.)
    let mut bracketed = None;
    for _ in 0..5 {
        let busy = {
            let client = client.clone();
            let name = remote.name().to_string();
            let id = keys.key_id.clone();
            let samples = remote
                .encrypt_batch(&keys, test.features[..8].to_vec())
                .await
                .unwrap();
            tokio::spawn(async move { client.infer(&name, &id, samples).await })
        };
        let running = || async { metric(&server.metrics().await, "veil_inferences_in_flight") };
        while running().await < 1.0 && !busy.is_finished() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let before = running().await;
        let t = Instant::now();
        assert_healthy(&server.url()).await;
        client.list_models().await.unwrap();
        let answered = t.elapsed();
        let after = running().await;
        busy.await.unwrap().unwrap();
        if before >= 1.0 && after >= 1.0 {
            bracketed = Some(answered);
            break;
        }
    }
    let answered = bracketed.expect("health and listing answered while an evaluation ran");
    eprintln!("health + list during inference: {answered:?}");

    server.stop().await;

    // ---- restart: the stored key still works, with no new upload ----
    let server = TestServer::start(config.clone()).await;
    let client = Client::connect(&server.url()).await.unwrap();
    let info = client
        .key_info(&keys.key_id)
        .await
        .unwrap()
        .expect("key kept");
    assert_eq!(info.size_bytes, keys.eval_key.len() as u64);
    let status = client.ensure_key(&keys, |_, _| {}).await.unwrap();
    assert!(!status.uploaded, "no new upload after a restart");
    let remote = client.model("digits").await.unwrap();
    let xs = &test.features[rows..rows + 2];
    let predictions = client.predict(&remote, &keys, xs).await.unwrap();
    let labels: Vec<i64> = predictions.iter().map(|p| p.label).collect();
    let reply = client
        .infer(
            remote.name(),
            &keys.key_id,
            xs.iter()
                .map(|x| remote.encrypt(&keys, x).unwrap())
                .collect(),
        )
        .await
        .unwrap();
    let accs: Vec<Vec<f64>> = reply
        .outputs
        .iter()
        .map(|o| remote.decrypt_accs(&keys, o).unwrap())
        .collect();
    check_against_simulation(&model, xs, &accs, &labels);
    server.stop().await;

    // ---- a damaged stored key is caught when loaded, not used ----
    let mut bytes = std::fs::read(&stored).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&stored, &bytes).unwrap();
    let server = TestServer::start(config).await;
    let client = Client::connect(&server.url()).await.unwrap();
    let x = remote.encrypt(&keys, &test.features[0]).unwrap();
    let err = client
        .infer(remote.name(), &keys.key_id, vec![x])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::NotFound), "{err}");
    assert!(err.to_string().contains("damaged"), "{err}");
    assert!(client.key_info(&keys.key_id).await.unwrap().is_none());
    assert_healthy(&server.url()).await;
    // Uploading it again repairs it.
    assert!(client.ensure_key(&keys, |_, _| {}).await.unwrap().uploaded);
    server.stop().await;
}
