//! `--max-connections` against the real binary: with every slot held by idle HTTP/2
//! connections, one more connection is closed as soon as it is accepted (counted in
//! `veil_connections_refused_total`); closing a held one frees its slot for a real client.

mod common;

use std::time::Duration;

use common::*;
use veil_client::Client;

const SLOTS: usize = 3;

#[test]
fn connections_over_the_cap_are_closed_and_a_freed_slot_serves_again() {
    let dir = Scratch::new("max-connections");
    compile_zoo("iris_logreg")
        .save(&dir.0.join("models/iris.veil"))
        .unwrap();
    let server = Proc::start(&dir.0, &["--max-connections", &SLOTS.to_string()]);
    let rt = runtime();
    rt.block_on(async {
        // Fill every slot with a connection that completed its HTTP/2 handshake.
        let mut held = Vec::new();
        for _ in 0..SLOTS {
            let tcp = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
            let (send, conn) = h2::client::handshake(tcp).await.unwrap();
            let conn = tokio::spawn(conn);
            let send = send
                .ready()
                .await
                .expect("a connection within the cap is served");
            held.push((send, conn));
        }
        wait_until("every slot held", Duration::from_secs(30), || {
            metric(&server.metrics(), "veil_connections_open") == SLOTS as f64
        });
        assert_eq!(
            metric(&server.metrics(), "veil_connections_refused_total"),
            0.0
        );

        // One more: accepted by the kernel, then closed by the server unread.
        let extra = Client::connect(&server.url()).await;
        let refused = match extra {
            Err(_) => true,
            Ok(c) => c.list_models().await.is_err(),
        };
        assert!(refused, "a connection over --max-connections was served");
        wait_until("the refusal counted", Duration::from_secs(30), || {
            metric(&server.metrics(), "veil_connections_refused_total") >= 1.0
        });
        assert_eq!(
            metric(&server.metrics(), "veil_connections_open"),
            SLOTS as f64,
            "a refused connection never holds a slot"
        );

        // Closing one held connection frees its slot: a real client is served again.
        let (send, conn) = held.pop().unwrap();
        drop(send);
        conn.abort();
        let _ = conn.await;
        wait_until("the slot freed", Duration::from_secs(30), || {
            metric(&server.metrics(), "veil_connections_open") == (SLOTS - 1) as f64
        });
        let client = Client::connect(&server.url())
            .await
            .expect("a freed slot takes a new connection");
        let models = client
            .list_models()
            .await
            .expect("served once a slot is free");
        assert!(models.iter().any(|m| m.info.name == "iris"));
    });
}
