//! Bounded load test on loopback: starts `veil-server` (a separate process) with one tenant
//! per client, then N clients with their own keys and tokens send requests concurrently.
//! Every answer is decrypted and checked against the simulation; the server's peak RSS
//! (VmHWM) is reported beside the bound its limits imply.
//!
//! ```sh
//! cargo build --release --workspace --examples
//! target/release/examples/load target/release/veil-server [CLIENTS=8] [REQUESTS=8]
//! ```

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

use veil_client::{Client, ConnectOptions, KeyPair};
use veil_tests::*;

const KEY_CACHE: usize = 4;
const CONCURRENT: usize = 2;
const UPLOADS: usize = 2;

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let bin = args
        .get(1)
        .expect("usage: load PATH/TO/veil-server [CLIENTS] [REQUESTS]");
    let clients: usize = args.get(2).map_or(8, |v| v.parse().unwrap());
    let requests: usize = args.get(3).map_or(8, |v| v.parse().unwrap());

    let root = std::env::temp_dir().join(format!("veil-load-{}", std::process::id()));
    let models = root.join("models");
    std::fs::create_dir_all(&models).unwrap();
    let model = compile_zoo("digits_mlp");
    install_model(&models, "digits", &model);
    let test = test_set("digits_mlp", model.n_features());
    let tenants: String = (0..clients)
        .map(|i| tenant_toml(&format!("t{i}"), &format!("token-{i}"), "max_keys = 1"))
        .collect();
    std::fs::write(root.join("tenants.toml"), tenants).unwrap();

    let mut child = Command::new(bin)
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .arg("--models")
        .arg(&models)
        .arg("--data-dir")
        .arg(root.join("data"))
        .arg("--tenants")
        .arg(root.join("tenants.toml"))
        .args([
            "--key-cache",
            &KEY_CACHE.to_string(),
            "--concurrent-inferences",
            &CONCURRENT.to_string(),
            "--concurrent-uploads",
            &UPLOADS.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("veil-server starts");
    let pid = child.id();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let addr = read_listen_address(&mut out);
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let metrics_addr: std::net::SocketAddr = line
        .trim()
        .strip_prefix("veil-server metrics on http://")
        .and_then(|s| s.strip_suffix("/metrics"))
        .unwrap()
        .parse()
        .unwrap();
    let url = format!("http://{addr}");
    let idle_rss = status_kib(pid, "VmRSS:");
    eprintln!(
        "server pid {pid} at {url}, idle RSS {} MiB",
        idle_rss / 1024
    );

    eprintln!("generating {clients} key pairs");
    let keys: Vec<Arc<KeyPair>> = (0..clients)
        .map(|_| Arc::new(KeyPair::generate(model.params)))
        .collect();
    let t = Instant::now();
    let mut tasks = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        let (url, k, model, test) = (url.clone(), Arc::clone(k), model.clone(), test.clone());
        tasks.push(tokio::spawn(async move {
            let options = ConnectOptions {
                token: Some(format!("token-{i}")),
                ..ConnectOptions::default()
            };
            let client = Client::connect_with(&url, &options).await.unwrap();
            client.ensure_key(&k, |_, _| {}).await.unwrap();
            let remote = client.model("digits").await.unwrap();
            let mut agree = 0;
            for r in 0..requests {
                let row = (i * requests + r) % test.len();
                let x = test.features[row].clone();
                let samples = remote.encrypt_batch(&k, vec![x.clone()]).await.unwrap();
                let reply = loop {
                    match client.infer("digits", &k.key_id, samples.clone()).await {
                        Ok(r) => break r,
                        // The queue is bounded: a full one says so; retry.
                        Err(e) if e.code() == Some(tonic::Code::ResourceExhausted) => {
                            tokio::time::sleep(std::time::Duration::from_millis(200)).await
                        }
                        Err(e) => panic!("client {i}: {e}"),
                    }
                };
                let accs = remote.decrypt_accs(&k, &reply.outputs[0]).unwrap();
                if check_sample_against_simulation(&model, &x, &accs) {
                    agree += 1;
                }
            }
            agree
        }));
    }
    let mut agree = 0;
    for t in tasks {
        agree += t.await.unwrap();
    }
    let elapsed = t.elapsed();
    let metrics = scrape(metrics_addr).await;
    let peak = status_kib(pid, "VmHWM:");
    terminate(pid);
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&root);

    let total = clients * requests;
    // Expanded keys: the cache's, plus one held by each running evaluation after eviction.
    // An expansion (upload or load from disk) holds the key's bytes, its deserialized form
    // and a standard-domain bootstrapping key besides its result: count twice the result.
    // Plus the evaluations' working memory.
    let csk = veil_runtime::keys::eval_key_from_bytes(model.params, &keys[0].eval_key).unwrap();
    let expanded =
        veil_runtime::EvalKey::from_compressed(veil_runtime::BackendKind::Cpu, model.params, &csk)
            .unwrap()
            .memory_bytes() as f64
            / 1048576.0;
    let compressed = keys[0].eval_key.len() as f64 / 1048576.0;
    let working = CONCURRENT as f64
        * veil_runtime::FheModel::new(model.clone())
            .unwrap()
            .working_bytes_per_sample() as f64
        / 1048576.0;
    let bound = idle_rss as f64 / 1024.0
        + (KEY_CACHE + CONCURRENT) as f64 * expanded
        + (UPLOADS + 1) as f64 * 2.0 * expanded
        + working;
    println!(
        "{clients} clients x {requests} requests: {total} answers, all within the simulation's \
         noise, {agree} labels equal to the simulation's; {:.1} s ({:.2} requests/s); key cache \
         hits {} misses {}; peak RSS {} MiB (idle {} MiB; bound from the limits ~{bound:.0} MiB, \
         with {expanded:.0} MiB per expanded key, {compressed:.1} MiB per serialized key, \
         {working:.0} MiB of evaluation working memory)",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64(),
        metric(&metrics, "veil_key_cache_hits_total"),
        metric(&metrics, "veil_key_cache_misses_total"),
        peak / 1024,
        idle_rss / 1024,
    );
    assert!(agree + total / 50 + 1 >= total, "labels agree");
    assert!((peak as f64 / 1024.0) < bound, "peak RSS within the bound");
}

/// SIGTERM to the server (graceful stop).
fn terminate(pid: u32) {
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
}
