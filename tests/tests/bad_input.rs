//! Bad input gets a clear gRPC status, and the server stays healthy afterwards.
//!
//! One real server (on a loopback port, in a background thread) serves every test here; each
//! test sends one kind of bad input, checks the status code and message, then checks that the
//! server still answers health checks and lists its models.

use std::sync::OnceLock;
use std::time::Duration;

use tonic::Code;
use veil_client::{Client, KeyPair, RemoteModel};
use veil_proto::v1;
use veil_proto::v1::upload_key_request::Part;
use veil_runtime::keys::MAX_EVAL_KEY_BYTES;
use veil_server::{Config, Limits, Server};
use veil_tests::*;

const TMP: &str = env!("CARGO_TARGET_TMPDIR");
const MAX_BATCH: usize = 8;
const IDLE_TIMEOUT: Duration = Duration::from_secs(2);

struct Shared {
    url: String,
    keys: KeyPair,
    model: RemoteModel,
}

/// The shared server, with a real key already uploaded (so that ciphertext tests fail on the
/// ciphertexts alone).
fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| {
        let root = std::path::Path::new(TMP).join("bad-input");
        let _ = std::fs::remove_dir_all(&root);
        let models = root.join("models");
        let data = root.join("data");
        std::fs::create_dir_all(&models).unwrap();
        let compiled = compile_zoo("digits_mlp");
        install_model(&models, "digits", &compiled);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let config = Config {
                    max_batch: MAX_BATCH,
                    limits: Limits {
                        upload_idle_timeout: IDLE_TIMEOUT,
                        ..Limits::default()
                    },
                    ..Config::new(&models, &data)
                };
                let server = Server::load(config).await.unwrap();
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(listener.local_addr().unwrap()).unwrap();
                server
                    .serve(listener, std::future::pending())
                    .await
                    .unwrap();
            });
        });
        let url = format!("http://{}", rx.recv().unwrap());
        let keys = KeyPair::generate(compiled.params);
        let model = block_on(async {
            let client = Client::connect(&url).await.unwrap();
            client.ensure_key(&keys, |_, _| {}).await.unwrap();
            client.model("digits").await.unwrap()
        });
        Shared { url, keys, model }
    })
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// Runs `f` against the shared server, returns its error status, and checks that the server
/// is still healthy and still lists its models.
fn expect_status<F, Fut>(f: F) -> tonic::Status
where
    F: FnOnce(Client) -> Fut,
    Fut: std::future::Future<Output = Result<(), tonic::Status>>,
{
    let s = shared();
    block_on(async {
        let client = Client::connect(&s.url).await.unwrap();
        let status = tokio::time::timeout(Duration::from_secs(120), f(client.clone()))
            .await
            .expect("the server answers (no hang)")
            .expect_err("the request is rejected");
        assert_healthy(&s.url).await;
        assert_eq!(client.list_models().await.unwrap().len(), 1);
        status
    })
}

fn assert_status(status: &tonic::Status, code: Code, words: &[&str]) {
    assert_eq!(status.code(), code, "{status:?}");
    for w in words {
        assert!(
            status.message().contains(w),
            "message {:?} should mention {w:?}",
            status.message()
        );
    }
}

fn header(parameter_set: &str, total_bytes: u64) -> v1::UploadKeyRequest {
    v1::UploadKeyRequest {
        part: Some(Part::Header(v1::UploadKeyHeader {
            parameter_set: parameter_set.into(),
            total_bytes,
        })),
    }
}

fn chunk(bytes: Vec<u8>) -> v1::UploadKeyRequest {
    v1::UploadKeyRequest {
        part: Some(Part::Chunk(bytes)),
    }
}

async fn upload(client: Client, msgs: Vec<v1::UploadKeyRequest>) -> Result<(), tonic::Status> {
    client
        .rpc()
        .upload_key(tokio_stream::iter(msgs))
        .await
        .map(|_| ())
}

async fn infer(
    client: Client,
    model: &str,
    key_id: &str,
    samples: Vec<Vec<u8>>,
) -> Result<(), tonic::Status> {
    client
        .rpc()
        .infer(v1::InferRequest {
            model: model.into(),
            key_id: key_id.into(),
            samples,
            model_digest: String::new(),
        })
        .await
        .map(|_| ())
}

fn params_name() -> String {
    shared().keys.params.name().to_string()
}

// ---------------- keys ----------------

#[test]
fn garbage_key_bytes() {
    let status =
        expect_status(|c| upload(c, vec![chunk(b"definitely not a tfhe key".repeat(1000))]));
    assert_status(
        &status,
        Code::InvalidArgument,
        &["not a valid evaluation key"],
    );
}

#[test]
fn truncated_key_bytes() {
    let key = &shared().keys.eval_key;
    let half: Vec<v1::UploadKeyRequest> = key[..key.len() / 2]
        .chunks(1 << 20)
        .map(|c| chunk(c.to_vec()))
        .collect();
    // Without a declared size, safe deserialization catches it.
    let status = expect_status(|c| upload(c, half.clone()));
    assert_status(
        &status,
        Code::InvalidArgument,
        &["not a valid evaluation key"],
    );
    // With the size declared, the server says it is truncated.
    let status = expect_status(|c| {
        upload(
            c,
            std::iter::once(header(&params_name(), key.len() as u64))
                .chain(half)
                .collect(),
        )
    });
    assert_status(&status, Code::InvalidArgument, &["truncated"]);
}

#[test]
fn key_for_another_parameter_set() {
    // A real, well-formed evaluation key, for MESSAGE_1_CARRY_1.
    let config = tfhe::ConfigBuilder::with_custom_parameters(
        tfhe::shortint::parameters::v1_8::V1_8_PARAM_MESSAGE_1_CARRY_1_KS_PBS_TUNIFORM_2M128,
    )
    .build();
    let ck = tfhe::ClientKey::generate(config);
    let mut other = Vec::new();
    tfhe::safe_serialization::safe_serialize(
        &tfhe::CompressedServerKey::new(&ck),
        &mut other,
        MAX_EVAL_KEY_BYTES,
    )
    .unwrap();
    let status = expect_status(|c| {
        upload(
            c,
            std::iter::once(header(&params_name(), other.len() as u64))
                .chain(other.chunks(1 << 20).map(|c| chunk(c.to_vec())))
                .collect(),
        )
    });
    assert_status(
        &status,
        Code::FailedPrecondition,
        &["well-formed but not for", &params_name()],
    );
    // Declaring a parameter set the server does not serve is refused up front.
    let status = expect_status(|c| {
        upload(
            c,
            vec![header("PARAM_MESSAGE_1_CARRY_1", 10), chunk(vec![0; 10])],
        )
    });
    assert_status(
        &status,
        Code::FailedPrecondition,
        &["no model for parameter set"],
    );
}

#[test]
fn oversized_key_upload() {
    // Streamed without a declared size: refused as soon as the running total passes the limit.
    let status = expect_status(|c| async move {
        let chunks = (0..(MAX_EVAL_KEY_BYTES >> 20) + 2).map(|_| chunk(vec![7u8; 1 << 20]));
        c.rpc()
            .upload_key(tokio_stream::iter(chunks))
            .await
            .map(|_| ())
    });
    assert_status(&status, Code::InvalidArgument, &["exceeds the limit"]);
    // Declared up front: refused before any bytes are sent.
    let status = expect_status(|c| upload(c, vec![header("", MAX_EVAL_KEY_BYTES + 1)]));
    assert_status(&status, Code::InvalidArgument, &["exceeds the limit"]);
}

#[test]
fn empty_and_stalled_uploads() {
    let status = expect_status(|c| upload(c, vec![]));
    assert_status(&status, Code::InvalidArgument, &["no key bytes"]);
    // A client that opens an upload and then sends nothing is dropped after the idle timeout.
    let status = expect_status(|c| async move {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(chunk(vec![1, 2, 3])).await.unwrap();
        let r = c
            .rpc()
            .upload_key(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map(|_| ());
        drop(tx);
        r
    });
    assert_status(&status, Code::DeadlineExceeded, &["stalled"]);
}

// ---------------- inference ----------------

#[test]
fn garbage_ciphertext_bytes() {
    let s = shared();
    let status = expect_status(|c| infer(c, "digits", &s.keys.key_id, vec![vec![0xAB; 100]]));
    assert_status(&status, Code::InvalidArgument, &["sample 0", "undecodable"]);
    let status = expect_status(|c| infer(c, "digits", &s.keys.key_id, vec![vec![]]));
    assert_status(&status, Code::InvalidArgument, &["sample 0"]);
}

#[test]
fn wrong_number_of_ciphertexts() {
    let s = shared();
    let spec = &s.model.spec;
    let q: Vec<i64> = vec![1; 65];
    let good = s.model.encrypt(&s.keys, &vec![0.0; 64]).unwrap();
    let too_few = s
        .keys
        .client
        .encrypt_quantized(spec, &q[..63])
        .unwrap()
        .to_bytes();
    let too_many = s
        .keys
        .client
        .encrypt_quantized(spec, &q)
        .unwrap()
        .to_bytes();
    let status = expect_status(|c| infer(c, "digits", &s.keys.key_id, vec![good.clone(), too_few]));
    assert_status(
        &status,
        Code::InvalidArgument,
        &["sample 1", "63 input ciphertexts", "takes 64"],
    );
    let status = expect_status(|c| infer(c, "digits", &s.keys.key_id, vec![too_many]));
    assert_status(&status, Code::InvalidArgument, &["sample 0", "takes 64"]);
}

#[test]
fn wrong_number_of_samples() {
    let s = shared();
    let status = expect_status(|c| infer(c, "digits", &s.keys.key_id, vec![]));
    assert_status(&status, Code::InvalidArgument, &["no samples"]);
    let x = s.model.encrypt(&s.keys, &vec![0.0; 64]).unwrap();
    let status = expect_status(|c| infer(c, "digits", &s.keys.key_id, vec![x; MAX_BATCH + 1]));
    assert_status(&status, Code::InvalidArgument, &["at most 8"]);
}

#[test]
fn unknown_model() {
    let s = shared();
    let x = s.model.encrypt(&s.keys, &vec![0.0; 64]).unwrap();
    let status = expect_status(|c| infer(c, "no_such_model", &s.keys.key_id, vec![x]));
    assert_status(
        &status,
        Code::NotFound,
        &["unknown model 'no_such_model'", "digits"],
    );
}

#[test]
fn unknown_key_id() {
    let s = shared();
    let x = s.model.encrypt(&s.keys, &vec![0.0; 64]).unwrap();
    let unknown = "0".repeat(64);
    let status = expect_status(|c| infer(c, "digits", &unknown, vec![x.clone()]));
    assert_status(&status, Code::NotFound, &["unknown key id", "upload"]);
    let status = expect_status(|c| async move {
        c.rpc()
            .get_key(v1::GetKeyRequest {
                key_id: "0".repeat(64),
            })
            .await
            .map(|_| ())
    });
    assert_status(&status, Code::NotFound, &["unknown key id"]);
    // Not a key id at all (and never used as a path).
    let status = expect_status(|c| infer(c, "digits", "../../etc/passwd", vec![x]));
    assert_status(&status, Code::InvalidArgument, &["malformed key id"]);
}

#[test]
fn oversized_message() {
    // One message over the server's 16 MiB decoding limit is refused by the transport.
    let s = shared();
    let status = expect_status(|c| async move {
        let client = c.rpc().max_encoding_message_size(64 << 20);
        let mut client = client;
        client
            .infer(v1::InferRequest {
                model: "digits".into(),
                key_id: s.keys.key_id.clone(),
                samples: vec![vec![0; 17 << 20]],
                model_digest: String::new(),
            })
            .await
            .map(|_| ())
    });
    eprintln!("oversized message: {status:?}");
    assert!(
        matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{status:?}"
    );
}

// ---------------- routing header ----------------

/// `req` with `veil-key-id: id`.
fn routed<T>(msg: T, id: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut()
        .insert(veil_proto::KEY_ID_HEADER, id.parse().unwrap());
    req
}

#[test]
fn a_routing_header_naming_another_key_is_refused() {
    let s = shared();
    let real = s.keys.key_id.clone();
    let other = "0".repeat(64);
    let x = s.model.encrypt(&s.keys, &vec![0.0; 64]).unwrap();

    let (r, o) = (real.clone(), other.clone());
    let status = expect_status(|c| async move {
        c.rpc()
            .infer(routed(
                v1::InferRequest {
                    model: "digits".into(),
                    key_id: r,
                    samples: vec![x],
                    model_digest: String::new(),
                },
                &o,
            ))
            .await
            .map(|_| ())
    });
    assert_status(
        &status,
        Code::InvalidArgument,
        &["veil-key-id", "another key"],
    );

    let (r, o) = (real.clone(), other.clone());
    let status = expect_status(|c| async move {
        c.rpc()
            .get_key(routed(v1::GetKeyRequest { key_id: r }, &o))
            .await
            .map(|_| ())
    });
    assert_status(&status, Code::InvalidArgument, &["veil-key-id"]);

    // A delete whose header disagrees deletes nothing.
    let (r, o) = (real.clone(), other.clone());
    let status = expect_status(|c| async move {
        c.rpc()
            .delete_key(routed(v1::DeleteKeyRequest { key_id: r }, &o))
            .await
            .map(|_| ())
    });
    assert_status(&status, Code::InvalidArgument, &["veil-key-id"]);

    // An upload is checked against the id of the bytes it carried.
    let bytes = s.keys.eval_key.clone();
    let o = other.clone();
    let status = expect_status(|c| async move {
        let mut msgs = vec![header(&params_name(), bytes.len() as u64)];
        msgs.extend(bytes.chunks(1 << 20).map(|c| chunk(c.to_vec())));
        c.rpc()
            .upload_key(routed(tokio_stream::iter(msgs), &o))
            .await
            .map(|_| ())
    });
    assert_status(&status, Code::InvalidArgument, &["veil-key-id"]);

    // A matching header is served, and the key is still there.
    block_on(async {
        let c = Client::connect(&s.url).await.unwrap();
        let info = c
            .rpc()
            .get_key(routed(
                v1::GetKeyRequest {
                    key_id: real.clone(),
                },
                &real,
            ))
            .await
            .expect("a matching header is served")
            .into_inner();
        assert_eq!(info.key_id, real);
    });
}
