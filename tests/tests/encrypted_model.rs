//! Encrypted-model mode as a service: the evaluator runs the owner's encrypted model on his
//! clear rows, then asks the owner's server (`--owner-keys`) to decrypt the results. Tenants,
//! rate limits and label-only answers apply as for Infer. Real server on a loopback port, real
//! 128-bit keys.

use std::sync::Arc;

use tonic::Code;
use veil_client::{Client, ConnectOptions, KeyPair};
use veil_models::graph::Reveal;
use veil_models::{CompiledModel, QuantConfig, Simulate, compile};
use veil_runtime::encrypted_model::{EncryptedModel, EncryptedResults, owner_model_path};
use veil_runtime::keys::eval_key_from_bytes;
use veil_runtime::{CpuBackend, ServerKey};
use veil_server::{Config, Tenants};
use veil_tests::*;

const TMP: &str = env!("CARGO_TARGET_TMPDIR");

/// Compiles a zoo model as `veil compile --encrypt-model` does, encrypts it under `owner`
/// and, with `keep`, keeps the clear copy in the owner's key directory.
fn encrypt(
    name: &str,
    reveal: Reveal,
    owner: &KeyPair,
    dir: &std::path::Path,
    keep: bool,
) -> (CompiledModel, EncryptedModel) {
    let float = veil_models::onnx::import_file(&zoo_dir(name).join("model.onnx"))
        .unwrap()
        .with_reveal(reveal)
        .unwrap();
    let train = veil_models::data::read_csv(
        &zoo_dir(name).join("train.csv"),
        float.n_features(),
        veil_models::data::Labels::Optional,
    )
    .unwrap();
    let cfg = QuantConfig {
        keep_zero_weights: true,
        ..QuantConfig::default()
    };
    let model = compile(&float, &train.features, &cfg).unwrap();
    let sealed = EncryptedModel::encrypt(&model, &owner.client, &owner.key_id).unwrap();
    if keep {
        let path = owner_model_path(dir, sealed.digest()).unwrap();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        model.save(&path).unwrap();
    }
    (model, sealed)
}

/// What the evaluator does: runs `rows` test rows with the owner's evaluation key.
fn run(sealed: &EncryptedModel, eval_key: &[u8], xs: &[Vec<f64>]) -> Vec<u8> {
    let params = sealed.params();
    let key = ServerKey::from_compressed(params, &eval_key_from_bytes(params, eval_key).unwrap())
        .unwrap();
    let rows: Vec<Vec<i64>> = xs
        .iter()
        .enumerate()
        .map(|(i, x)| sealed.quantize_row(i, x).unwrap())
        .collect();
    let outputs = sealed
        .expand()
        .unwrap()
        .evaluate(&CpuBackend::new(&key), &rows)
        .unwrap();
    EncryptedResults {
        model_digest: sealed.digest().to_string(),
        key_id: sealed.key_id().to_string(),
        outputs,
    }
    .to_bytes()
}

async fn as_tenant(server: &TestServer, token: Option<&str>) -> Client {
    let options = ConnectOptions {
        token: token.map(str::to_string),
        ..ConnectOptions::default()
    };
    Client::connect_with(&server.url(), &options).await.unwrap()
}

fn code(e: veil_client::ClientError) -> Code {
    match e {
        veil_client::ClientError::Status(s) => s.code(),
        other => panic!("not a status: {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_owners_server_decrypts_results_for_the_evaluator() {
    let keys_dir = TempDir::new(TMP, "owner-keys");
    let models = TempDir::new(TMP, "owner-models");
    let data = TempDir::new(TMP, "owner-data");
    let alice = KeyPair::generate(veil_models::compiled::ParamSet::ALL[0]);
    alice.save(keys_dir.path(), false).unwrap();
    let (iris, iris_enc) = encrypt("iris_logreg", Reveal::Label, &alice, keys_dir.path(), true);
    let (wine, wine_enc) = encrypt("wine_mlp", Reveal::Scores, &alice, keys_dir.path(), true);
    // Encrypted with Alice's key, but its clear copy is not in her directory.
    let (_, stray) = encrypt(
        "breast_cancer_logreg",
        Reveal::Label,
        &alice,
        keys_dir.path(),
        false,
    );

    let tenants = [
        tenant_toml("bob", "bob-token", "requests_per_second = 100.0"),
        tenant_toml(
            "eve",
            "eve-token",
            &format!("models = [\"{}\"]", wine_enc.digest()),
        ),
        tenant_toml(
            "slow",
            "slow-token",
            "requests_per_second = 0.01\nburst = 1",
        ),
    ]
    .concat();
    let mut config = Config::new(models.path(), data.path());
    config.tenants = Some(Arc::new(Tenants::parse(&tenants).unwrap()));
    config.owner_keys = Some(keys_dir.path().to_path_buf());
    let server = TestServer::start(config).await;
    let bob = as_tenant(&server, Some("bob-token")).await;

    // Bob's rows stay with him; only the encrypted results travel.
    for (name, model, sealed, n) in [
        ("iris_logreg", &iris, &iris_enc, 6),
        ("wine_mlp", &wine, &wine_enc, 3),
    ] {
        // Rows whose class holds under the predicted noise (a near-tie may go either way).
        let xs: Vec<Vec<f64>> = test_set(name, model.n_features())
            .features
            .into_iter()
            .filter(|x| model.class_holds_under_noise(x, 500).unwrap())
            .take(n)
            .collect();
        let results = run(sealed, &alice.eval_key, &xs);
        let answer = bob.decrypt_results(results).await.unwrap();
        assert_eq!(answer.model_digest, sealed.digest());
        assert_eq!(answer.predictions.len(), n);
        for (x, p) in xs.iter().zip(&answer.predictions) {
            let sim = model.simulate(x, None).unwrap();
            let want = model.decode(&sim.accs).unwrap();
            assert_eq!(p.label, want.label, "{name}");
            match model.reveal {
                Reveal::Label => assert!(p.outputs.is_empty(), "{name}: label only"),
                Reveal::Scores => assert_eq!(p.outputs.len(), want.outputs.len(), "{name}"),
            }
        }
        assert_eq!(answer.reveal, model.reveal.name());
    }

    let xs = test_set("iris_logreg", iris.n_features()).features[..2].to_vec();
    let results = run(&iris_enc, &alice.eval_key, &xs);
    // Tenants: a model outside Eve's list, no token, a spent request rate.
    let eve = as_tenant(&server, Some("eve-token")).await;
    let e = eve.decrypt_results(results.clone()).await.unwrap_err();
    assert_eq!(code(e), Code::PermissionDenied);
    let anonymous = as_tenant(&server, None).await;
    let e = anonymous
        .decrypt_results(results.clone())
        .await
        .unwrap_err();
    assert_eq!(code(e), Code::Unauthenticated);
    let slow = as_tenant(&server, Some("slow-token")).await;
    slow.decrypt_results(results.clone()).await.unwrap();
    let e = slow.decrypt_results(results.clone()).await.unwrap_err();
    assert_eq!(code(e), Code::ResourceExhausted);

    // Results of another key, of a model whose clear copy the owner lacks, damaged bytes.
    let carol = KeyPair::generate(veil_models::compiled::ParamSet::ALL[0]);
    let carol_dir = TempDir::new(TMP, "carol-keys");
    let (_, carols) = encrypt("iris_logreg", Reveal::Label, &carol, carol_dir.path(), true);
    let e = bob
        .decrypt_results(run(&carols, &carol.eval_key, &xs))
        .await
        .unwrap_err();
    assert_eq!(code(e), Code::InvalidArgument);
    let bc = test_set("breast_cancer_logreg", 30).features[..1].to_vec();
    let e = bob
        .decrypt_results(run(&stray, &alice.eval_key, &bc))
        .await
        .unwrap_err();
    assert_eq!(code(e), Code::NotFound);
    for cut in [0, 12, results.len() / 2, results.len() - 1] {
        let e = bob
            .decrypt_results(results[..cut].to_vec())
            .await
            .unwrap_err();
        assert_eq!(code(e), Code::InvalidArgument, "cut at {cut}");
    }
    server.stop().await;

    // Label-only answers: the scores model's results come back as classes only.
    let data2 = TempDir::new(TMP, "owner-data2");
    let mut config = Config::new(models.path(), data2.path());
    config.owner_keys = Some(keys_dir.path().to_path_buf());
    config.decrypt_labels_only = true;
    let server = TestServer::start(config).await;
    let client = as_tenant(&server, None).await;
    let wine_x = test_set("wine_mlp", wine.n_features()).features[..2].to_vec();
    let answer = client
        .decrypt_results(run(&wine_enc, &alice.eval_key, &wine_x))
        .await
        .unwrap();
    assert_eq!(answer.reveal, "label");
    assert!(answer.predictions.iter().all(|p| p.outputs.is_empty()));
    server.stop().await;

    // A server without an owner key decrypts nothing.
    let models2 = TempDir::new(TMP, "plain-models");
    install_model(models2.path(), "iris", &compile_zoo("iris_logreg"));
    let data3 = TempDir::new(TMP, "plain-data");
    let server = TestServer::start(Config::new(models2.path(), data3.path())).await;
    let client = as_tenant(&server, None).await;
    let e = client.decrypt_results(results).await.unwrap_err();
    assert_eq!(code(e), Code::FailedPrecondition);
    server.stop().await;
}
