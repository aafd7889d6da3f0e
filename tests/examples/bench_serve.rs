//! The server measured as its clients see it: starts `veil-server` (a separate process) on
//! loopback, then N clients, each with its own keys, send pre-encrypted Infer requests over
//! gRPC with several requests in flight. Reports throughput, latency percentiles, the
//! evaluation batch sizes the server merged, the time to make a new key usable (upload,
//! then the first request, which expands the key where the server computes), and, where
//! `nvidia-smi` exists, GPU utilisation and memory sampled every 100 ms. Every answer is
//! decrypted and its label compared with the exact simulation's.
//!
//! ```sh
//! cargo build --release -p veil-tests --example bench_serve
//! target/release/examples/bench_serve --server target/release/veil-server \
//!     --model digits_mlp.veil --data models/zoo/digits_mlp/test.csv --backend gpu \
//!     --clients 8 --requests 16 --samples 64 --in-flight 2 --json out.json
//! ```
//!
//! Nothing here is asserted about speed: it is a measurement, not a test. The requests are
//! encrypted before the clock starts, so the figures are the server's and the transport's.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use veil_models::Simulate;

use clap::Parser;
use veil_client::{Client, ConnectOptions, KeyPair};
use veil_models::CompiledModel;
use veil_models::data::{Labels, read_csv};
use veil_tests::read_listen_address;

#[derive(Parser)]
struct Args {
    /// The veil-server binary.
    #[arg(long)]
    server: PathBuf,
    /// A compiled model (`veil compile -o`).
    #[arg(long)]
    model: PathBuf,
    /// CSV rows to send (the model's features, then a label), cycled through.
    #[arg(long)]
    data: PathBuf,
    /// The server's --backend.
    #[arg(long, default_value = "cpu")]
    backend: String,
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Requests per client.
    #[arg(long, default_value_t = 8)]
    requests: usize,
    /// Samples per request.
    #[arg(long, default_value_t = 1)]
    samples: usize,
    /// Requests each client keeps in flight.
    #[arg(long, default_value_t = 1)]
    in_flight: usize,
    /// The server's --concurrent-inferences (default: one per client).
    #[arg(long)]
    concurrent: Option<usize>,
    /// The server's --batch-window-ms.
    #[arg(long, default_value_t = 2)]
    batch_window_ms: u64,
    /// The server's --max-merged-samples.
    #[arg(long, default_value_t = 4096)]
    max_merged: usize,
    /// Write the report here as JSON too.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// `nvidia-smi` sampling: (seconds since start, utilisation %, memory used MiB).
struct GpuSampler {
    child: std::process::Child,
    samples: Arc<Mutex<Vec<(f64, f64, f64)>>>,
}

impl GpuSampler {
    fn start(t0: Instant) -> Option<Self> {
        let mut child = Command::new("nvidia-smi")
            .args([
                "--query-gpu=utilization.gpu,memory.used",
                "--format=csv,noheader,nounits",
                "-lms",
                "100",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let out = BufReader::new(child.stdout.take()?);
        let samples = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&samples);
        std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                let v: Vec<f64> = line
                    .split(',')
                    .filter_map(|f| f.trim().parse().ok())
                    .collect();
                if let [util, mem] = v[..] {
                    let t = t0.elapsed().as_secs_f64();
                    sink.lock().unwrap().push((t, util, mem));
                }
            }
        });
        Some(GpuSampler { child, samples })
    }

    /// Mean and max utilisation, and max memory, over samples taken in [from, to].
    fn window(&self, from: f64, to: f64) -> serde_json::Value {
        let s = self.samples.lock().unwrap();
        let w: Vec<_> = s.iter().filter(|x| x.0 >= from && x.0 <= to).collect();
        let n = w.len().max(1) as f64;
        serde_json::json!({
            "samples": w.len(),
            "utilization_mean_pct": w.iter().map(|x| x.1).sum::<f64>() / n,
            "utilization_max_pct": w.iter().map(|x| x.1).fold(0.0, f64::max),
            "memory_used_max_mib": w.iter().map(|x| x.2).fold(0.0, f64::max),
        })
    }

    fn memory_at(&self, t: f64) -> f64 {
        let s = self.samples.lock().unwrap();
        s.iter().rfind(|x| x.0 <= t).map_or(f64::NAN, |x| x.2)
    }
}

impl Drop for GpuSampler {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let a = Args::parse();
    let model = CompiledModel::load(&a.model).expect("the compiled model loads");
    let data = read_csv(&a.data, model.n_features(), Labels::Optional).expect("the data loads");
    assert!(!data.features.is_empty(), "no rows in {}", a.data.display());
    let t0 = Instant::now();
    let gpu = GpuSampler::start(t0);

    let root = std::env::temp_dir().join(format!("veil-bench-serve-{}", std::process::id()));
    let models = root.join("models");
    std::fs::create_dir_all(&models).unwrap();
    std::fs::copy(&a.model, models.join("bench.veil")).unwrap();
    let concurrent = a.concurrent.unwrap_or(a.clients).max(1);
    let mut child = Command::new(&a.server)
        .args(["--listen", "127.0.0.1:0", "--backend", &a.backend])
        .arg("--models")
        .arg(&models)
        .arg("--data-dir")
        .arg(root.join("data"))
        .args(["--key-cache", &a.clients.max(1).to_string()])
        .args(["--concurrent-inferences", &concurrent.to_string()])
        .args(["--concurrent-uploads", &a.clients.max(1).to_string()])
        .args(["--max-queue", &(a.clients * a.in_flight + 16).to_string()])
        .args(["--max-batch", &a.samples.max(1).to_string()])
        .args(["--batch-window-ms", &a.batch_window_ms.to_string()])
        .args(["--max-merged-samples", &a.max_merged.to_string()])
        .args(["--max-merged-mib", "65536"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("veil-server starts");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let addr = read_listen_address(&mut out);
    let url = format!("http://{addr}");
    eprintln!("server at {url} ({} backend)", a.backend);

    eprintln!("generating {} key pairs", a.clients);
    let params = model.params;
    let keys: Vec<Arc<KeyPair>> = (0..a.clients)
        .map(|_| std::thread::spawn(move || Arc::new(KeyPair::generate(params))))
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();

    // Keys go up one client at a time, so that each one's times are its own.
    let client = Client::connect_with(&url, &ConnectOptions::default())
        .await
        .unwrap();
    let remote = client.model("bench").await.unwrap();
    let mem_before_keys = gpu
        .as_ref()
        .map_or(f64::NAN, |g| g.memory_at(t0.elapsed().as_secs_f64()));
    let mut key_setup = Vec::new();
    for k in &keys {
        let t = Instant::now();
        client.ensure_key(k, |_, _| {}).await.unwrap();
        let upload = t.elapsed().as_secs_f64();
        let x = vec![data.features[0].clone()];
        let one = remote.encrypt_batch(k, x).await.unwrap();
        let t = Instant::now();
        client.infer("bench", &k.key_id, one.clone()).await.unwrap();
        let first = t.elapsed().as_secs_f64();
        let t = Instant::now();
        client.infer("bench", &k.key_id, one).await.unwrap();
        let second = t.elapsed().as_secs_f64();
        key_setup.push((upload, first, second));
    }
    // Let the sampler see the keys resident.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mem_after_keys = gpu
        .as_ref()
        .map_or(f64::NAN, |g| g.memory_at(t0.elapsed().as_secs_f64()));

    eprintln!(
        "encrypting {} requests of {} samples",
        a.clients * a.requests,
        a.samples
    );
    // Every request is encrypted at once, on the blocking pool (all cores).
    let mut pending = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        for r in 0..a.requests {
            let rows: Vec<usize> = (0..a.samples)
                .map(|j| ((i * a.requests + r) * a.samples + j) % data.features.len())
                .collect();
            let xs = rows.iter().map(|&row| data.features[row].clone()).collect();
            let (remote, k) = (remote.clone(), Arc::clone(k));
            pending.push(tokio::spawn(async move {
                (i, rows, remote.encrypt_batch(&k, xs).await.unwrap())
            }));
        }
    }
    // Per client: (rows, encrypted samples) of each request.
    type Plan = Vec<(Vec<usize>, Vec<Vec<u8>>)>;
    let mut plans: Vec<Plan> = vec![Vec::new(); a.clients];
    for p in pending {
        let (i, rows, samples) = p.await.unwrap();
        plans[i].push((rows, samples));
    }
    eprintln!("sending");
    let start = t0.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut tasks = Vec::new();
    for (i, reqs) in plans.into_iter().enumerate() {
        let key_id = keys[i].key_id.clone();
        let client = client.clone();
        let gate = Arc::new(tokio::sync::Semaphore::new(a.in_flight.max(1)));
        tasks.push(tokio::spawn(async move {
            let mut inner = Vec::new();
            for (rows, samples) in reqs {
                let permit = Arc::clone(&gate).acquire_owned().await.unwrap();
                let (client, key_id) = (client.clone(), key_id.clone());
                inner.push(tokio::spawn(async move {
                    let sent = Instant::now();
                    let reply = loop {
                        match client.infer("bench", &key_id, samples.clone()).await {
                            Ok(r) => break r,
                            Err(e) if e.code() == Some(tonic::Code::ResourceExhausted) => {
                                tokio::time::sleep(Duration::from_millis(20)).await
                            }
                            Err(e) => panic!("client {i}: {e}"),
                        }
                    };
                    drop(permit);
                    (rows, reply, sent.elapsed().as_secs_f64())
                }));
            }
            let mut done = Vec::new();
            for h in inner {
                done.push(h.await.unwrap());
            }
            (i, done)
        }));
    }
    let mut results = Vec::new();
    for h in tasks {
        results.push(h.await.unwrap());
    }
    let wall = t.elapsed().as_secs_f64();
    let end = t0.elapsed().as_secs_f64();

    // Check every answer against the exact simulation.
    let mut agree = 0usize;
    let mut total = 0usize;
    let mut latencies = Vec::new();
    let mut merged = Vec::new();
    let mut evals = Vec::new();
    for (i, done) in &results {
        for (rows, reply, secs) in done {
            latencies.push(secs * 1e3);
            merged.push(reply.merged_samples as f64);
            evals.push(reply.server_eval.as_secs_f64() * 1e3);
            for (row, out) in rows.iter().zip(&reply.outputs) {
                let got = remote.decrypt(&keys[*i], out).unwrap();
                let sim = model.simulate(&data.features[*row], None).unwrap();
                agree += usize::from(model.decode(&sim.accs).unwrap().label == got.label);
                total += 1;
            }
        }
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&root);

    latencies.sort_by(f64::total_cmp);
    evals.sort_by(f64::total_cmp);
    let mut merged_sorted = merged.clone();
    merged_sorted.sort_by(f64::total_cmp);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let setup = |f: fn(&(f64, f64, f64)) -> f64| {
        let mut v: Vec<f64> = key_setup.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        serde_json::json!({ "median_ms": percentile(&v, 0.5) * 1e3, "max_ms": v.last().copied().unwrap_or(f64::NAN) * 1e3 })
    };
    let report = serde_json::json!({
        "backend": a.backend,
        "model": a.model.display().to_string(),
        "pbs_per_sample": model.stages.iter().map(|s| s.len()).sum::<usize>(),
        "clients": a.clients,
        "requests_per_client": a.requests,
        "samples_per_request": a.samples,
        "in_flight_per_client": a.in_flight,
        "concurrent_inferences": concurrent,
        "batch_window_ms": a.batch_window_ms,
        "samples": total,
        "wall_s": wall,
        "samples_per_second": total as f64 / wall,
        "requests_per_second": latencies.len() as f64 / wall,
        "latency_ms": {
            "p50": percentile(&latencies, 0.5),
            "p90": percentile(&latencies, 0.9),
            "p99": percentile(&latencies, 0.99),
            "max": latencies.last().copied().unwrap_or(f64::NAN),
        },
        "server_eval_ms": { "p50": percentile(&evals, 0.5), "p99": percentile(&evals, 0.99) },
        "merged_samples": {
            "mean": mean(&merged),
            "min": merged_sorted.first().copied().unwrap_or(f64::NAN),
            "p50": percentile(&merged_sorted, 0.5),
            "max": merged_sorted.last().copied().unwrap_or(f64::NAN),
        },
        "agreement_with_simulation": agree as f64 / total.max(1) as f64,
        "key_setup": {
            "upload": setup(|k| k.0),
            "first_request": setup(|k| k.1),
            "second_request": setup(|k| k.2),
        },
        "gpu": gpu.as_ref().map(|g| {
            let mut w = g.window(start, end);
            w["memory_before_keys_mib"] = mem_before_keys.into();
            w["memory_after_keys_mib"] = mem_after_keys.into();
            w["keys"] = a.clients.into();
            w
        }),
    });
    let text = serde_json::to_string_pretty(&report).unwrap();
    println!("{text}");
    if let Some(p) = &a.json {
        std::fs::write(p, text).unwrap();
    }
}
