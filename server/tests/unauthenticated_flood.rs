//! Nothing is decoded before it is authorized: 200 unauthenticated Infer calls, each
//! declaring a 16 MiB message and sending its bytes, at once and again, over raw HTTP/2 to
//! the real binary. The server refuses each from its headers (UNAUTHENTICATED), so its
//! resident memory stays within 100 MiB of idle, and a tenant with a token is served
//! meanwhile.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use veil_models::Simulate;

use bytes::Bytes;
use common::*;
use tonic::codegen::http;
use veil_client::{Client, ConnectOptions, KeyPair};

const CONNECTIONS: usize = 20;
const STREAMS_PER_CONNECTION: usize = 10;
const BODY: usize = 16 << 20;
const MARGIN: u64 = 100 << 20;

/// One gRPC call over `send` declaring a `BODY`-byte message; the grpc-status answered.
async fn unauthenticated_infer(
    send: &mut h2::client::SendRequest<Bytes>,
    addr: &str,
    payload: &Bytes,
) -> Option<String> {
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}/veil.v1.Veil/Infer"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let mut ready = send.clone().ready().await.ok()?;
    let (resp, mut stream) = ready.send_request(req, false).ok()?;
    let mut header = vec![0u8];
    header.extend_from_slice(&(BODY as u32).to_be_bytes());
    // Queued without waiting for flow control; the server's reset drops what is unsent.
    let _ = stream.send_data(Bytes::from(header), false);
    let _ = stream.send_data(payload.clone(), true);
    let resp = resp.await.ok()?;
    let status = resp
        .headers()
        .get("grpc-status")
        .map(|v| v.to_str().unwrap_or("?").to_string());
    *send = ready;
    status
}

#[test]
fn unauthenticated_16_mib_bodies_leave_memory_flat_and_tenants_served() {
    let dir = Scratch::new("unauth-flood");
    let model = compile_zoo("iris_logreg");
    model.save(&dir.0.join("models/iris.veil")).unwrap();
    let tenants = dir.0.join("tenants.toml");
    std::fs::write(&tenants, tenant_toml("alice", "alice-token", "")).unwrap();
    let server = Proc::start(&dir.0, &["--tenants", tenants.to_str().unwrap()]);
    let test = test_set("iris_logreg", model.n_features());

    let rt = runtime();
    rt.block_on(async {
        let alice = Client::connect_with(
            &server.url(),
            &ConnectOptions {
                token: Some("alice-token".into()),
                ..ConnectOptions::default()
            },
        )
        .await
        .unwrap();
        let remote = alice.model("iris").await.unwrap();
        let params = model.params;
        let keys = tokio::task::spawn_blocking(move || KeyPair::generate(params))
            .await
            .unwrap();
        alice.ensure_key(&keys, |_, _| {}).await.unwrap();
        let x = test.features[0].clone();
        let expected = model
            .decode(&model.simulate(&x, None).unwrap().accs)
            .unwrap()
            .label;
        let one = remote.encrypt_batch(&keys, vec![x]).await.unwrap();
        let served = async || {
            let reply = alice
                .infer("iris", &keys.key_id, one.clone())
                .await
                .unwrap();
            let accs = remote.decrypt_accs(&keys, &reply.outputs[0]).unwrap();
            assert_eq!(model.decode(&accs).unwrap().label, expected);
        };
        served().await;
        let idle = server.rss();

        let stop = Arc::new(AtomicBool::new(false));
        let refused = Arc::new(AtomicU64::new(0));
        let other = Arc::new(AtomicU64::new(0));
        let payload = Bytes::from(vec![0x55u8; BODY]);
        let mut tasks = Vec::new();
        for _ in 0..CONNECTIONS {
            let tcp = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
            let (send, conn) = h2::client::handshake(tcp).await.unwrap();
            tokio::spawn(conn);
            for _ in 0..STREAMS_PER_CONNECTION {
                let (mut send, addr, payload) =
                    (send.clone(), server.addr.clone(), payload.clone());
                let (stop, refused, other) =
                    (Arc::clone(&stop), Arc::clone(&refused), Arc::clone(&other));
                tasks.push(tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        match unauthenticated_infer(&mut send, &addr, &payload).await {
                            // 16: UNAUTHENTICATED.
                            Some(s) if s == "16" => refused.fetch_add(1, Ordering::Relaxed),
                            _ => other.fetch_add(1, Ordering::Relaxed),
                        };
                    }
                }));
            }
        }
        let calls = (CONNECTIONS * STREAMS_PER_CONNECTION) as u64;
        let peak = std::cell::Cell::new(idle);
        let wait_for = |n: u64, what: &str| {
            let start = std::time::Instant::now();
            while refused.load(Ordering::Relaxed) < n {
                peak.set(peak.get().max(server.rss()));
                assert!(
                    peak.get() <= idle + MARGIN,
                    "RSS grew from {:.1} MiB to {:.1} MiB under the flood",
                    idle as f64 / (1 << 20) as f64,
                    peak.get() as f64 / (1 << 20) as f64
                );
                assert!(
                    start.elapsed() < Duration::from_secs(120),
                    "timed out waiting for {what}: {} refused, {} other",
                    refused.load(Ordering::Relaxed),
                    other.load(Ordering::Relaxed)
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        wait_for(calls, "the first round of refusals");
        // The tenant is served while the flood goes on (refusals keep coming after it).
        let before = refused.load(Ordering::Relaxed);
        alice.list_models().await.unwrap();
        served().await;
        peak.set(peak.get().max(server.rss()));
        let during_served = refused.load(Ordering::Relaxed);
        wait_for(
            during_served.max(3 * calls) + 1,
            "refusals after the tenant's call",
        );
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            tokio::time::timeout(Duration::from_secs(60), t)
                .await
                .expect("flood tasks end")
                .unwrap();
        }
        let after = server.rss();
        let total = refused.load(Ordering::Relaxed);
        let m = server.metrics();
        let counted = metric(
            &m,
            r#"veil_requests_total{code="UNAUTHENTICATED",method="Infer"}"#,
        );
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        eprintln!(
            "RSS idle {:.1} MiB, peak during the flood {:.1} MiB, after {:.1} MiB; {total} \
             unauthenticated 16 MiB Infer calls refused ({counted} counted by the server; \
             {} before and {during_served} by the end of the tenant's calls), {} other outcomes",
            mib(idle),
            mib(peak.get()),
            mib(after),
            before,
            other.load(Ordering::Relaxed)
        );
        assert_eq!(
            other.load(Ordering::Relaxed),
            0,
            "every flood call was refused"
        );
        assert!(counted >= total as f64, "the server counted each refusal");
        assert!(
            peak.get() <= idle + MARGIN,
            "RSS grew from {:.1} MiB to {:.1} MiB under the flood",
            mib(idle),
            mib(peak.get())
        );
        // Still served afterwards.
        served().await;
    });
}
