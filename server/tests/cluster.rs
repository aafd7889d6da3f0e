//! The cluster on one machine, all on loopback: a real S3 server (s3s-fs), three `veil-server`
//! replicas keeping their keys in it, and HAProxy with the routing of `deploy/haproxy.cfg`
//! (consistent hashing on `veil-key-id`, gRPC health checks) in front. Six clients with their
//! own keys upload through the front and infer; one replica is killed (SIGKILL) mid-run; the
//! clients' retries land on the other replicas, which fetch the keys from the store.
//!
//! Checked: every request ends with the simulated label; before the kill each key was expanded
//! in exactly one replica; no key is uploaded twice (UploadKey calls and PUTs of key objects);
//! the survivors fetch the dead replica's keys from the store. Printed: request counts, key
//! loads per replica, latency before and after the kill.
//!
//! Needs haproxy (Debian's package): `cargo test --release --workspace --test cluster --
//! --ignored --nocapture` (`.ci/run` installs haproxy and runs it).

mod common;

use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::s3::S3;
use common::*;
use veil_client::{Client, KeyPair};
use veil_models::Simulate;

const CLIENTS: usize = 6;
const REQUESTS: usize = 12;
/// Each client's pause between requests, so that the kill falls mid-run.
const PACE: Duration = Duration::from_millis(150);
/// The kill comes once this many requests have completed, all clients together.
const KILL_AFTER: usize = CLIENTS * 4;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn http_get(addr: &str, path: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// A sample for the report only; a replica that never answered a method has no sample.
fn count(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            let (n, v) = l.rsplit_once(' ')?;
            (n == name).then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0.0)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[test]
#[ignore = "needs haproxy; run by .ci/run"]
fn a_replica_killed_mid_run_loses_nothing() {
    let dir = Scratch::new("cluster");
    let s3 = S3::start(&dir.0.join("s3"));
    let model = compile_zoo("iris_logreg");
    let test = test_set("iris_logreg", model.n_features());
    model.save(&dir.0.join("models/iris.veil")).unwrap();

    let mut replicas: Vec<Option<Proc>> = (0..3)
        .map(|i| {
            let d = dir.0.join(format!("replica{i}"));
            std::fs::create_dir_all(&d).unwrap();
            std::os::unix::fs::symlink(dir.0.join("models"), d.join("models")).unwrap();
            Some(Proc::start_with_env(
                &d,
                &[
                    "--key-store",
                    "s3://veil-keys/cluster",
                    "--key-cache",
                    &CLIENTS.to_string(),
                ],
                &s3.env(),
            ))
        })
        .collect();

    // deploy/haproxy.cfg, with this test's ports and replicas.
    let (front, stats) = (free_port(), free_port());
    let mut cfg = String::new();
    let mut servers = 0;
    for line in std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/haproxy.cfg"
    ))
    .unwrap()
    .lines()
    {
        let t = line.trim_start();
        let line = if t.starts_with("bind 127.0.0.1:50051") {
            line.replace("50051", &front.to_string())
        } else if t.starts_with("bind 127.0.0.1:8404") {
            line.replace("8404", &stats.to_string())
        } else if t.starts_with("stats socket") {
            format!(
                "    stats socket {}/haproxy.sock mode 600 level admin",
                dir.0.display()
            )
        } else if t.starts_with("server veil") {
            let p = replicas[servers].as_ref().unwrap();
            servers += 1;
            format!("    server veil{servers} {}", p.addr)
        } else {
            line.to_string()
        };
        cfg.push_str(&line);
        cfg.push('\n');
    }
    assert_eq!(servers, 3, "deploy/haproxy.cfg lists three replicas");
    std::fs::write(dir.0.join("haproxy.cfg"), cfg).unwrap();
    let mut haproxy = std::process::Command::new("haproxy")
        .arg("-f")
        .arg(dir.0.join("haproxy.cfg"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("haproxy (apt-get install haproxy)");
    let stats_addr = format!("127.0.0.1:{stats}");
    wait_until(
        "the front to see three replicas up",
        Duration::from_secs(60),
        || {
            http_get(&stats_addr, "/stats;csv").is_some_and(|csv| {
                csv.lines()
                    .filter(|l| l.starts_with("veil_replicas,veil") && l.contains(",UP,"))
                    .count()
                    == 3
            })
        },
    );

    let rt = runtime();
    let url = format!("http://127.0.0.1:{front}");
    let params = model.params;
    let keys: Vec<KeyPair> = rt.block_on(async {
        tokio::task::spawn_blocking(move || {
            (0..CLIENTS).map(|_| KeyPair::generate(params)).collect()
        })
        .await
        .unwrap()
    });
    let remote = rt.block_on(async {
        Client::connect(&url)
            .await
            .unwrap()
            .model("iris")
            .await
            .unwrap()
    });
    let rows: Vec<Vec<f64>> = (0..REQUESTS)
        .map(|i| test.features[i % test.features.len()].clone())
        .collect();
    let expected: Vec<i64> = rows
        .iter()
        .map(|x| {
            model
                .decode(&model.simulate(x, None).unwrap().accs)
                .unwrap()
                .label
        })
        .collect();

    // Every key uploaded once, through the front.
    rt.block_on(async {
        for k in &keys {
            let c = Client::connect(&url).await.unwrap();
            assert!(c.ensure_key(k, |_, _| {}).await.unwrap().uploaded);
        }
    });

    let done = Arc::new(AtomicUsize::new(0));
    let killed_at = Arc::new(std::sync::Mutex::new(None::<Instant>));
    let clients: Vec<_> = keys
        .into_iter()
        .map(|k| {
            let (url, remote, rows, done, killed_at) = (
                url.clone(),
                remote.clone(),
                rows.clone(),
                Arc::clone(&done),
                Arc::clone(&killed_at),
            );
            rt.spawn(async move {
                let client = Client::connect(&url).await.unwrap();
                let mut out = Vec::new();
                for x in rows {
                    tokio::time::sleep(PACE).await;
                    let one = remote.encrypt_batch(&k, vec![x]).await.unwrap();
                    let start = Instant::now();
                    let reply = client.infer("iris", &k.key_id, one).await;
                    let took = start.elapsed();
                    let after_kill = killed_at.lock().unwrap().is_some_and(|t| start >= t);
                    let accs = reply.map(|r| remote.decrypt_accs(&k, &r.outputs[0]).unwrap());
                    done.fetch_add(1, Ordering::SeqCst);
                    out.push((accs, took, after_kill));
                }
                out
            })
        })
        .collect();

    wait_until("a third of the requests", Duration::from_secs(600), || {
        done.load(Ordering::SeqCst) >= KILL_AFTER
    });
    let before: Vec<String> = replicas
        .iter()
        .map(|p| p.as_ref().unwrap().metrics())
        .collect();
    let expansions: Vec<f64> = before
        .iter()
        .map(|m| metric(m, "veil_key_expansions_total"))
        .collect();
    // The replica that holds the most keys dies.
    let victim = (0..3)
        .max_by(|&a, &b| expansions[a].total_cmp(&expansions[b]))
        .unwrap();
    *killed_at.lock().unwrap() = Some(Instant::now());
    let mut dead = replicas[victim].take().unwrap();
    dead.signal("-KILL");
    dead.wait_exit(Duration::from_secs(30)).unwrap();

    let results: Vec<_> = rt.block_on(async {
        let mut all = Vec::new();
        for c in clients {
            all.push(c.await.unwrap());
        }
        all
    });
    let after: Vec<Option<String>> = replicas
        .iter()
        .map(|p| p.as_ref().map(|p| p.metrics()))
        .collect();
    let _ = haproxy.kill();
    let _ = haproxy.wait();

    // The report.
    let (mut lat_before, mut lat_after) = (Vec::new(), Vec::new());
    for r in results.iter().flatten() {
        let ms = r.1.as_secs_f64() * 1e3;
        if r.2 {
            lat_after.push(ms)
        } else {
            lat_before.push(ms)
        }
    }
    let max_after = lat_after.iter().copied().fold(0.0, f64::max);
    println!(
        "cluster: {CLIENTS} clients x {REQUESTS} requests; replica {} killed after {KILL_AFTER} requests",
        victim + 1
    );
    for i in 0..3 {
        let b = &before[i];
        let a = after[i].as_deref();
        println!(
            "replica {}: uploads {} | before kill: infers {} expansions {} fetches {} | at end: {}",
            i + 1,
            count(b, "veil_requests_total{code=\"OK\",method=\"UploadKey\"}"),
            count(b, "veil_requests_total{code=\"OK\",method=\"Infer\"}"),
            expansions[i],
            count(b, "veil_key_store_fetches_total"),
            a.map_or("killed".to_string(), |a| format!(
                "infers {} expansions {} fetches {}",
                count(a, "veil_requests_total{code=\"OK\",method=\"Infer\"}"),
                metric(a, "veil_key_expansions_total"),
                metric(a, "veil_key_store_fetches_total")
            ))
        );
    }
    println!(
        "latency ms: before the kill median {:.0} ({} requests); after, median {:.0}, max {:.0} ({} requests)",
        median(&mut lat_before),
        lat_before.len(),
        median(&mut lat_after),
        max_after,
        lat_after.len()
    );

    // Every request ended with the right label.
    for (c, r) in results.iter().enumerate() {
        for (i, (accs, _, _)) in r.iter().enumerate() {
            match accs {
                Ok(a) => assert_eq!(
                    model.decode(a).unwrap().label,
                    expected[i],
                    "client {c} request {i}"
                ),
                Err(e) => panic!("client {c} request {i} failed: {e}"),
            }
        }
    }
    assert!(!lat_after.is_empty(), "requests ran after the kill");
    // Before the kill: each key expanded in exactly one replica, uploaded once.
    assert_eq!(
        expansions.iter().sum::<f64>(),
        CLIENTS as f64,
        "{expansions:?}"
    );
    assert_eq!(
        before
            .iter()
            .map(|m| count(m, "veil_requests_total{code=\"OK\",method=\"UploadKey\"}"))
            .sum::<f64>(),
        CLIENTS as f64
    );
    assert!(
        before
            .iter()
            .all(|m| metric(m, "veil_key_store_fetches_total") == 0.0)
    );
    // After: no upload since, and the survivors fetched the dead replica's keys.
    let survivors: Vec<&String> = after.iter().flatten().collect();
    for (m, b) in survivors
        .iter()
        .zip(before.iter().enumerate().filter(|(i, _)| *i != victim))
    {
        assert_eq!(
            count(m, "veil_requests_total{code=\"OK\",method=\"UploadKey\"}"),
            count(b.1, "veil_requests_total{code=\"OK\",method=\"UploadKey\"}"),
            "no upload after the kill"
        );
    }
    let fetched: f64 = survivors
        .iter()
        .map(|m| metric(m, "veil_key_store_fetches_total"))
        .sum();
    assert!(
        fetched >= expansions[victim],
        "the survivors fetched {fetched} keys; the dead replica held {}",
        expansions[victim]
    );
    assert_eq!(s3.puts(".key").len(), CLIENTS, "{:?}", s3.puts(".key"));
    assert_eq!(s3.objects(".key").len(), CLIENTS);
}
