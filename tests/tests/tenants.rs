//! Tenants: bearer tokens, key ownership, quotas, DeleteKey, allowed models, request rates,
//! and the key store's bounds. Real server on a loopback port, real 128-bit keys.

use std::sync::Arc;

use tonic::Code;
use veil_client::{Client, ConnectOptions, KeyPair, RemoteModel};
use veil_models::CompiledModel;
use veil_server::{Config, Tenants};
use veil_tests::*;

const TMP: &str = env!("CARGO_TARGET_TMPDIR");

struct Setup {
    server: TestServer,
    model: CompiledModel,
    data: TempDir,
    _models: TempDir,
}

/// Serves the iris model as `iris` and again as `iris_private`, with these tenants.
async fn serve(label: &str, tenants: &str, adjust: impl FnOnce(&mut Config)) -> Setup {
    let models = TempDir::new(TMP, &format!("{label}-models"));
    let data = TempDir::new(TMP, &format!("{label}-data"));
    let model = compile_zoo("iris_logreg");
    install_model(models.path(), "iris", &model);
    install_model(models.path(), "iris_private", &model);
    let mut config = Config::new(models.path(), data.path());
    config.tenants = Some(Arc::new(Tenants::parse(tenants).expect("tenants parse")));
    adjust(&mut config);
    let server = TestServer::start(config).await;
    Setup {
        server,
        model,
        data,
        _models: models,
    }
}

async fn as_tenant(server: &TestServer, token: &str) -> Client {
    let options = ConnectOptions {
        token: Some(token.into()),
        ..ConnectOptions::default()
    };
    Client::connect_with(&server.url(), &options).await.unwrap()
}

/// Runs one encrypted inference and checks it against the simulation.
async fn infer_ok(client: &Client, remote: &RemoteModel, model: &CompiledModel, keys: &KeyPair) {
    let x = model_input(model);
    let samples = remote.encrypt_batch(keys, vec![x.clone()]).await.unwrap();
    let reply = client
        .infer(remote.name(), &keys.key_id, samples)
        .await
        .unwrap();
    let accs = remote.decrypt_accs(keys, &reply.outputs[0]).unwrap();
    check_sample_against_simulation(model, &x, &accs);
}

fn model_input(model: &CompiledModel) -> Vec<f64> {
    test_set("iris_logreg", model.n_features()).features[0].clone()
}

fn code<T: std::fmt::Debug>(r: veil_client::Result<T>) -> Code {
    r.expect_err("the call is refused")
        .code()
        .expect("a gRPC status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_are_authenticated_isolated_and_held_to_their_quotas() {
    let tenants = [
        tenant_toml("alice", "alice-token", "max_keys = 1\nmodels = [\"iris\"]"),
        tenant_toml("bob", "bob-token", ""),
        tenant_toml(
            "carol",
            "carol-token",
            "requests_per_second = 0.001\nburst = 2",
        ),
    ]
    .concat();
    let Setup {
        server,
        model,
        data,
        ..
    } = serve("tenants", &tenants, |_| {}).await;

    // No token, an unknown token: UNAUTHENTICATED, for every method.
    let anonymous = Client::connect(&server.url()).await.unwrap();
    assert_eq!(code(anonymous.list_models().await), Code::Unauthenticated);
    assert_eq!(
        code(anonymous.key_info(&"0".repeat(64)).await),
        Code::Unauthenticated
    );
    let stranger = as_tenant(&server, "not-a-token").await;
    assert_eq!(code(stranger.list_models().await), Code::Unauthenticated);
    assert_eq!(
        code(stranger.infer("iris", &"0".repeat(64), vec![vec![1]]).await),
        Code::Unauthenticated
    );

    let alice = as_tenant(&server, "alice-token").await;
    let bob = as_tenant(&server, "bob-token").await;
    // Each tenant lists the models it may use.
    let names = |ms: Vec<RemoteModel>| ms.iter().map(|m| m.name().to_string()).collect::<Vec<_>>();
    assert_eq!(names(alice.list_models().await.unwrap()), vec!["iris"]);
    assert_eq!(
        names(bob.list_models().await.unwrap()),
        vec!["iris", "iris_private"]
    );
    let remote = alice.model("iris").await.unwrap();

    // Alice's key is hers: Bob can neither see, use nor delete it, knowing its id.
    let alice_keys = KeyPair::generate(model.params);
    assert!(
        alice
            .ensure_key(&alice_keys, |_, _| {})
            .await
            .unwrap()
            .uploaded
    );
    assert!(bob.key_info(&alice_keys.key_id).await.unwrap().is_none());
    let x = remote
        .encrypt_batch(&alice_keys, vec![model_input(&model)])
        .await
        .unwrap();
    assert_eq!(
        code(bob.infer("iris", &alice_keys.key_id, x.clone()).await),
        Code::NotFound
    );
    assert_eq!(
        code(bob.delete_key(&alice_keys.key_id).await),
        Code::NotFound
    );
    assert!(alice.key_info(&alice_keys.key_id).await.unwrap().is_some());
    infer_ok(&alice, &remote, &model, &alice_keys).await;

    // A model she may not use; Bob's error for an unknown model lists what he may use.
    assert_eq!(
        code(
            alice
                .infer("iris_private", &alice_keys.key_id, x.clone())
                .await
        ),
        Code::PermissionDenied
    );
    let err = bob.infer("nope", &alice_keys.key_id, x).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::NotFound), "{err}");
    assert!(err.to_string().contains("iris, iris_private"), "{err}");

    // Her quota is one key.
    let second = KeyPair::generate(model.params);
    let err = alice.upload_key(&second, |_, _| {}).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::ResourceExhausted), "{err}");
    assert!(err.to_string().contains("quota"), "{err}");

    // DeleteKey removes it from disk and memory, and frees the quota.
    let stored = data
        .path()
        .join("tenants/alice/keys")
        .join(model.params.name())
        .join(format!("{}.key", alice_keys.key_id));
    assert!(stored.exists());
    let freed = alice.delete_key(&alice_keys.key_id).await.unwrap();
    assert_eq!(freed, alice_keys.eval_key.len() as u64);
    assert!(!stored.exists(), "deleted from disk");
    assert!(alice.key_info(&alice_keys.key_id).await.unwrap().is_none());
    let x = remote
        .encrypt_batch(&alice_keys, vec![model_input(&model)])
        .await
        .unwrap();
    assert_eq!(
        code(alice.infer("iris", &alice_keys.key_id, x).await),
        Code::NotFound
    );
    assert_eq!(
        code(alice.delete_key(&alice_keys.key_id).await),
        Code::NotFound
    );
    assert!(alice.ensure_key(&second, |_, _| {}).await.unwrap().uploaded);
    infer_ok(&alice, &remote, &model, &second).await;

    // Carol's rate: a burst of two calls, then RESOURCE_EXHAUSTED.
    let carol = as_tenant(&server, "carol-token").await;
    carol.list_models().await.unwrap();
    carol.list_models().await.unwrap();
    let err = carol.list_models().await.unwrap_err();
    assert_eq!(err.code(), Some(Code::ResourceExhausted), "{err}");
    assert!(err.to_string().contains("rate"), "{err}");

    let m = server.metrics().await;
    for (sample, at_least) in [
        (
            r#"veil_requests_total{code="UNAUTHENTICATED",method="ListModels"}"#,
            2.0,
        ),
        (
            r#"veil_requests_total{code="PERMISSION_DENIED",method="Infer"}"#,
            1.0,
        ),
        (
            r#"veil_requests_total{code="RESOURCE_EXHAUSTED",method="UploadKey"}"#,
            1.0,
        ),
        (r#"veil_requests_total{code="OK",method="DeleteKey"}"#, 1.0),
        (r#"veil_requests_total{code="OK",method="Infer"}"#, 2.0),
    ] {
        assert!(metric(&m, sample) >= at_least, "{sample} in\n{m}");
    }
    assert_eq!(
        metric(&m, "veil_key_store_bytes"),
        second.eval_key.len() as f64
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_store_evicts_cold_keys_and_uploads_spare_other_tenants_hot_keys() {
    let params = compile_zoo("iris_logreg").params;
    let k1 = KeyPair::generate(params);
    let k2 = KeyPair::generate(params);
    let k3 = KeyPair::generate(params);
    let size = k1.eval_key.len() as u64;
    let tenants = [
        tenant_toml("a", "a-token", ""),
        tenant_toml("b", "b-token", ""),
    ]
    .concat();
    // One expanded key in memory; two and a half keys on disk.
    let Setup { server, model, .. } = serve("store", &tenants, |c| {
        c.key_cache = 1;
        c.max_key_store_bytes = Some(size * 5 / 2);
    })
    .await;
    let a = as_tenant(&server, "a-token").await;
    let b = as_tenant(&server, "b-token").await;
    let remote = a.model("iris").await.unwrap();

    a.ensure_key(&k1, |_, _| {}).await.unwrap();
    infer_ok(&a, &remote, &model, &k1).await;
    let before = server.metrics().await;

    // B's upload does not push A's hot key out of memory: A's next request is a cache hit.
    b.ensure_key(&k2, |_, _| {}).await.unwrap();
    infer_ok(&a, &remote, &model, &k1).await;
    let after = server.metrics().await;
    assert_eq!(
        metric(&after, "veil_key_cache_misses_total"),
        metric(&before, "veil_key_cache_misses_total"),
        "A's key stayed in memory"
    );
    assert_eq!(
        metric(&after, "veil_key_cache_hits_total"),
        metric(&before, "veil_key_cache_hits_total") + 1.0
    );

    // A third key does not fit: the least recently used key that is not in memory goes (k2);
    // A's hot key stays.
    b.ensure_key(&k3, |_, _| {}).await.unwrap();
    assert!(
        b.key_info(&k2.key_id).await.unwrap().is_none(),
        "k2 evicted"
    );
    assert!(b.key_info(&k3.key_id).await.unwrap().is_some());
    assert!(a.key_info(&k1.key_id).await.unwrap().is_some());
    let m = server.metrics().await;
    assert_eq!(metric(&m, "veil_key_store_bytes"), (2 * size) as f64);
    assert_eq!(metric(&m, "veil_key_store_evictions_total"), 1.0);
    // B's evicted key is gone for good: a request with it is NOT_FOUND, and B can upload it
    // again.
    infer_ok(&b, &remote, &model, &k3).await;
    let x = remote
        .encrypt_batch(&k2, vec![model_input(&model)])
        .await
        .unwrap();
    assert_eq!(code(b.infer("iris", &k2.key_id, x).await), Code::NotFound);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tenants_uploads_never_evict_a_tenant_within_its_max_keys() {
    let params = compile_zoo("iris_logreg").params;
    let keys: Vec<KeyPair> = (0..4).map(|_| KeyPair::generate(params)).collect();
    let size = keys[0].eval_key.len() as u64;
    let tenants = [
        tenant_toml("a", "a-token", "max_keys = 1"),
        tenant_toml("b", "b-token", "max_keys = 3"),
    ]
    .concat();
    // One expanded key in memory; three and a half keys on disk.
    let Setup { server, model, .. } = serve("fair", &tenants, |c| {
        c.key_cache = 1;
        c.max_key_store_bytes = Some(size * 7 / 2);
    })
    .await;
    let a = as_tenant(&server, "a-token").await;
    let b = as_tenant(&server, "b-token").await;
    let remote = b.model("iris").await.unwrap();
    a.ensure_key(&keys[0], |_, _| {}).await.unwrap();
    b.ensure_key(&keys[1], |_, _| {}).await.unwrap();
    // B's inference loads its key into the one cache slot: A's key is now the least
    // recently used key on disk, and not in memory.
    infer_ok(&b, &remote, &model, &keys[1]).await;
    b.ensure_key(&keys[2], |_, _| {}).await.unwrap();
    // The store is full: B's fourth key must evict one of B's own, not A's (within its
    // max_keys of 1).
    b.ensure_key(&keys[3], |_, _| {}).await.unwrap();
    assert!(
        a.key_info(&keys[0].key_id).await.unwrap().is_some(),
        "A's key stayed"
    );
    let b_left: Vec<String> = b
        .list_keys()
        .await
        .unwrap()
        .into_iter()
        .map(|k| k.key_id)
        .collect();
    assert_eq!(b_left.len(), 2, "{b_left:?}");
    assert!(b_left.contains(&keys[3].key_id), "{b_left:?}");
    let a_keys = a.list_keys().await.unwrap();
    assert_eq!(a_keys.len(), 1);
    assert_eq!(a_keys[0].key_id, keys[0].key_id);
    assert_eq!(a_keys[0].size_bytes, size);
    let m = server.metrics().await;
    assert_eq!(metric(&m, "veil_key_store_evictions_total"), 1.0);
    infer_ok(&a, &remote, &model, &keys[0]).await;
    server.stop().await;
}
