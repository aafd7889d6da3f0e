//! Two `veil-server` replicas sharing their keys through a real S3 server (s3s-fs on
//! loopback, SigV4 and HTTP): a key uploaded to one replica serves on the other, which fetches
//! and expands it once; no key object is PUT twice; quotas count the store, whichever replica
//! stored the key; another tenant sees nothing; a delete through one replica is seen by the
//! other; a damaged object is refused and deleted; a replica restarted on an empty data dir
//! serves the keys from the store.

mod common;

use common::s3::S3;
use common::*;
use veil_client::{Client, ClientError, ConnectOptions, KeyPair};
use veil_models::Simulate;

const TENANTS_EXTRA_ALICE: &str = "max_keys = 1";

async fn connect(p: &Proc, token: &str) -> Client {
    Client::connect_with(
        &p.url(),
        &ConnectOptions {
            token: Some(token.into()),
            ..ConnectOptions::default()
        },
    )
    .await
    .unwrap()
}

fn code(e: &ClientError) -> Option<tonic::Code> {
    e.code()
}

#[test]
fn replicas_share_keys_through_a_real_s3_server() {
    let store_dir = Scratch::new("s3-objects");
    let s3 = S3::start(&store_dir.0.join("s3"));
    let model = compile_zoo("iris_logreg");
    let test = test_set("iris_logreg", model.n_features());
    let (da, db) = (Scratch::new("s3-replica-a"), Scratch::new("s3-replica-b"));
    let tenants = store_dir.0.join("tenants.toml");
    std::fs::write(
        &tenants,
        tenant_toml("alice", "alice-token", TENANTS_EXTRA_ALICE)
            + &tenant_toml("bob", "bob-token", ""),
    )
    .unwrap();
    for d in [&da, &db] {
        model.save(&d.0.join("models/iris.veil")).unwrap();
    }
    let args = [
        "--tenants",
        tenants.to_str().unwrap(),
        "--key-store",
        "s3://veil-keys/cluster-a",
        // Confirm cached keys on every request, so a delete elsewhere is seen at once.
        "--key-revalidate-ms",
        "0",
    ];
    let a = Proc::start_with_env(&da.0, &args, &s3.env());
    let mut b = Proc::start_with_env(&db.0, &args, &s3.env());

    let x = test.features[0].clone();
    let expected = model
        .decode(&model.simulate(&x, None).unwrap().accs)
        .unwrap()
        .label;
    let rt = runtime();
    let k2 = rt.block_on(async {
        let (alice_a, alice_b) = (
            connect(&a, "alice-token").await,
            connect(&b, "alice-token").await,
        );
        let bob_a = connect(&a, "bob-token").await;
        let params = model.params;
        let [k1, k2] =
            tokio::task::spawn_blocking(move || [1, 2].map(|_| KeyPair::generate(params)))
                .await
                .unwrap();
        let remote = alice_a.model("iris").await.unwrap();
        let infer = async |client: &Client, keys: &KeyPair| {
            let one = remote.encrypt_batch(keys, vec![x.clone()]).await.unwrap();
            let reply = client.infer("iris", &keys.key_id, one).await?;
            let accs = remote.decrypt_accs(keys, &reply.outputs[0]).unwrap();
            Ok::<_, ClientError>(model.decode(&accs).unwrap().label)
        };

        // Uploaded to A: one PUT of the key object.
        assert!(alice_a.ensure_key(&k1, |_, _| {}).await.unwrap().uploaded);
        assert_eq!(s3.puts(".key").len(), 1, "{:?}", s3.puts(""));
        assert_eq!(s3.objects(".key").len(), 1);
        assert_eq!(metric(&a.metrics(), "veil_key_expansions_total"), 1.0);

        // The same key uploaded to B, which has no copy: the store has it, so it is neither
        // validated nor written again.
        let again = alice_b.upload_key(&k1, |_, _| {}).await.unwrap();
        assert!(!again.newly_stored);
        assert_eq!(s3.puts(".key").len(), 1);
        assert_eq!(metric(&b.metrics(), "veil_key_expansions_total"), 0.0);

        // B has no copy: it fetches the key from the store once, expands it once.
        assert_eq!(infer(&alice_b, &k1).await.unwrap(), expected);
        assert_eq!(infer(&alice_b, &k1).await.unwrap(), expected);
        let mb = b.metrics();
        assert_eq!(metric(&mb, "veil_key_store_fetches_total"), 1.0);
        assert_eq!(metric(&mb, "veil_key_expansions_total"), 1.0);
        assert_eq!(metric(&a.metrics(), "veil_key_store_fetches_total"), 0.0);

        // Alice's quota (one key) counts the store's keys, not B's own.
        let err = alice_b.upload_key(&k2, |_, _| {}).await.unwrap_err();
        assert_eq!(code(&err), Some(tonic::Code::ResourceExhausted), "{err}");
        assert_eq!(alice_b.list_keys().await.unwrap().len(), 1);
        // Another tenant sees nothing of it.
        assert!(bob_a.key_info(&k1.key_id).await.unwrap().is_none());
        assert!(bob_a.list_keys().await.unwrap().is_empty());

        // Deleted through A: gone from the store, and B stops serving its copy.
        assert_eq!(
            alice_a.delete_key(&k1.key_id).await.unwrap(),
            k1.eval_key.len() as u64
        );
        assert!(s3.objects(".key").is_empty());
        let err = infer(&alice_b, &k1).await.unwrap_err();
        assert_eq!(code(&err), Some(tonic::Code::NotFound), "{err}");

        // Room again: uploaded through B. Then the store's copy is damaged: A, which has no
        // copy of its own, refuses it and deletes it.
        assert!(alice_b.ensure_key(&k2, |_, _| {}).await.unwrap().uploaded);
        let object = s3.objects(".key").pop().unwrap();
        let mut bytes = std::fs::read(&object).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x40;
        std::fs::write(&object, bytes).unwrap();
        let err = infer(&alice_a, &k2).await.unwrap_err();
        assert_eq!(code(&err), Some(tonic::Code::NotFound), "{err}");
        assert!(err.to_string().contains("damaged"), "{err}");
        assert_eq!(metric(&a.metrics(), "veil_key_store_damaged_total"), 1.0);
        assert!(s3.objects(".key").is_empty());

        // Uploaded again, then B restarts on an empty data dir: it serves from the store.
        assert!(alice_a.ensure_key(&k2, |_, _| {}).await.unwrap().uploaded);
        assert_eq!(infer(&alice_a, &k2).await.unwrap(), expected);
        k2
    });
    b.signal("-KILL");
    b.wait_exit(std::time::Duration::from_secs(30)).unwrap();
    std::fs::remove_dir_all(db.0.join("data")).unwrap();
    let b = Proc::start_with_env(&db.0, &args, &s3.env());
    rt.block_on(async {
        let alice_b = connect(&b, "alice-token").await;
        let remote = alice_b.model("iris").await.unwrap();
        // Found in the store: no upload.
        assert!(!alice_b.ensure_key(&k2, |_, _| {}).await.unwrap().uploaded);
        let one = remote.encrypt_batch(&k2, vec![x.clone()]).await.unwrap();
        let reply = alice_b.infer("iris", &k2.key_id, one).await.unwrap();
        let accs = remote.decrypt_accs(&k2, &reply.outputs[0]).unwrap();
        assert_eq!(model.decode(&accs).unwrap().label, expected);
        assert_eq!(metric(&b.metrics(), "veil_key_store_fetches_total"), 1.0);
    });
    // Every key object was PUT once: k1, k2, k2 again after the damaged copy was deleted.
    assert_eq!(s3.puts(".key").len(), 3, "{:?}", s3.puts(".key"));
    drop(a);
}
