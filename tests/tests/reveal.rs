//! Output modes and model digests over a real socket: a scores model and its label-only
//! build served side by side, response sizes from the encoding, and a stale digest refused.

use veil_client::{Client, KeyPair, key_id};
use veil_models::Simulate;
use veil_models::compiled::output_wire_bytes;
use veil_models::graph::Reveal;
use veil_runtime::big_lwe_size;
use veil_server::Config;
use veil_tests::*;

const TMP: &str = env!("CARGO_TARGET_TMPDIR");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn label_only_and_scores_models_and_stale_digests() {
    let models = TempDir::new(TMP, "reveal-models");
    let data = TempDir::new(TMP, "reveal-data");
    let scores = compile_zoo("digits_mlp");
    let label = compile_zoo_revealing("digits_mlp", Reveal::Label);
    install_model(models.path(), "digits", &scores);
    install_model(models.path(), "digits_label", &label);
    let test = test_set("digits_mlp", scores.n_features());
    let config = Config::new(models.path(), data.path());
    let server = TestServer::start(config.clone()).await;
    let client = Client::connect(&server.url()).await.unwrap();

    // ListModels says what each model reveals and which build it is.
    let s_remote = client.model("digits").await.unwrap();
    let l_remote = client.model("digits_label").await.unwrap();
    assert_eq!(s_remote.info.reveal, "scores");
    assert_eq!(l_remote.info.reveal, "label");
    assert_eq!(l_remote.info.n_outputs, 1);
    assert_eq!(
        l_remote.info.pbs_per_sample,
        scores.pbs_per_sample() as u64 + 45,
        "the bracket argmax's 45 bootstraps for 10 classes (10 score reads, 9 matches, index \
         bits, the output's reads) are counted"
    );
    let file = |n: &str| std::fs::read(models.path().join(format!("{n}.veil"))).unwrap();
    assert_eq!(
        s_remote.digest(),
        key_id(&file("digits")),
        "SHA-256 of the file"
    );
    assert_eq!(l_remote.digest(), key_id(&file("digits_label")));

    let keys = KeyPair::generate(scores.params);
    client.ensure_key(&keys, |_, _| {}).await.unwrap();
    let rows = 6;
    let xs = &test.features[..rows];
    let lwe = big_lwe_size(scores.params);

    // Scores: compact ciphertexts, decoded within the plan's noise of the simulation.
    let s_samples: Vec<Vec<u8>> = xs
        .iter()
        .map(|x| s_remote.encrypt(&keys, x).unwrap())
        .collect();
    let s_reply = client
        .infer_model(&s_remote, &keys.key_id, s_samples)
        .await
        .unwrap();
    let s_bits = s_remote.spec.output.modulus_bits;
    assert!(s_bits <= 31 && s_remote.info.output.as_ref().unwrap().modulus_bits == s_bits);
    let mut s_labels = Vec::new();
    for (x, o) in xs.iter().zip(&s_reply.outputs) {
        assert_eq!(o.len(), output_wire_bytes(10, lwe, s_bits));
        assert!(o.len() <= 10 * 8_200, "{} bytes for 10 outputs", o.len());
        let accs = s_remote.decrypt_accs(&keys, o).unwrap();
        check_sample_against_simulation(&scores, x, &accs);
        s_labels.push(s_remote.spec.decode(&accs).unwrap().label);
    }

    // Label only: one ciphertext of at most 4 KB that decrypts to the class index.
    let l_predictions = client.predict(&l_remote, &keys, xs).await.unwrap();
    let l_samples: Vec<Vec<u8>> = xs
        .iter()
        .map(|x| l_remote.encrypt(&keys, x).unwrap())
        .collect();
    let l_reply = client
        .infer_model(&l_remote, &keys.key_id, l_samples)
        .await
        .unwrap();
    for (x, (o, p)) in xs.iter().zip(l_reply.outputs.iter().zip(&l_predictions)) {
        assert_eq!(
            o.len(),
            output_wire_bytes(1, lwe, l_remote.spec.output.modulus_bits)
        );
        assert!(o.len() <= 4096, "{} bytes", o.len());
        let decoded = l_remote.decrypt(&keys, o).unwrap();
        let sim = label.simulate(x, None).unwrap();
        assert_eq!(decoded.label, label.decode(&sim.accs).unwrap().label);
        assert_eq!(decoded.label, p.label);
    }
    let agree = l_predictions
        .iter()
        .zip(&s_labels)
        .filter(|(p, s)| p.label == **s)
        .count();
    eprintln!(
        "scores response {} bytes/sample ({s_bits} bits), label response {} bytes/sample; \
         label = scores argmax on {agree}/{rows}",
        s_reply.response_bytes / rows,
        l_reply.response_bytes / rows
    );
    assert!(agree + 1 >= rows, "{agree}/{rows}");

    // A digest that is not the served model's: FAILED_PRECONDITION, nothing evaluated.
    let x = s_remote.encrypt(&keys, &xs[0]).unwrap();
    let err = client
        .infer_with_digest("digits", l_remote.digest(), &keys.key_id, vec![x.clone()])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::FailedPrecondition), "{err}");
    assert!(err.to_string().contains("digits"), "{err}");
    server.stop().await;

    // The owner recompiles "digits" (here: as its label-only build) and restarts: a client
    // holding the old listing is refused instead of decoding with the old encoding.
    install_model(models.path(), "digits", &label);
    let server = TestServer::start(config).await;
    let client = Client::connect(&server.url()).await.unwrap();
    let err = client
        .infer_model(&s_remote, &keys.key_id, vec![x])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::FailedPrecondition), "{err}");
    let fresh = client.model("digits").await.unwrap();
    assert_eq!(fresh.info.reveal, "label");
    let p = client.predict(&fresh, &keys, &xs[..1]).await.unwrap();
    assert_eq!(p[0].label, l_predictions[0].label);
    server.stop().await;
}
