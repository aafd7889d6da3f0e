use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use veil_client::KeyPair;
use veil_models::data::{Labels, read_csv};
use veil_models::eval::{accuracy, regression_metrics};
use veil_models::graph::Task;

use super::conn::Conn;
use super::eval::median;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    conn: Conn,
    /// Model name, as `veil models` lists it.
    #[arg(long)]
    model: String,
    /// Key directory from `veil keygen`.
    #[arg(long)]
    keys: PathBuf,
    /// CSV of samples (features in model-input order; an optional `label` column).
    #[arg(long)]
    data: PathBuf,
    /// Use only the first N rows.
    #[arg(long)]
    limit: Option<usize>,
    /// Samples per request; 1 measures single-sample latency.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// gRPC deadline of each Infer request, in milliseconds; a request still queued on the
    /// server when it passes is never evaluated (DEADLINE_EXCEEDED).
    #[arg(long)]
    deadline_ms: Option<u64>,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

fn bar(len: u64, template: &str, msg: &str) -> ProgressBar {
    let b = ProgressBar::new(len).with_style(
        ProgressStyle::with_template(template)
            .expect("valid template")
            .progress_chars("=> "),
    );
    b.set_message(msg.to_string());
    b
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    if a.batch == 0 {
        bail!("--batch must be at least 1");
    }
    let keys = KeyPair::load(&a.keys)?;
    if a.deadline_ms == Some(0) {
        bail!("--deadline-ms must be at least 1");
    }
    let client = a
        .conn
        .connect()
        .await?
        .with_deadline(a.deadline_ms.map(std::time::Duration::from_millis));
    let model = client.model(&a.model).await?;
    if model.spec.params != keys.params {
        bail!(
            "model '{}' uses {}, the keys in {} are for {}",
            a.model,
            model.spec.params.name(),
            a.keys.display(),
            keys.params.name()
        );
    }
    let mut data = read_csv(&a.data, model.n_features(), Labels::Optional)
        .with_context(|| format!("reading {}", a.data.display()))?;
    if let Some(n) = a.limit {
        data.truncate(n);
    }
    if data.is_empty() {
        bail!("{} has no rows", a.data.display());
    }

    // The evaluation key: uploaded only when the server does not have it yet.
    let key_uploaded;
    let mut upload_s = 0.0;
    if client.key_info(&keys.key_id).await?.is_some() {
        key_uploaded = false;
    } else {
        let total = keys.eval_key.len() as u64;
        let pb = bar(
            total,
            "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec}",
            "uploading evaluation key",
        );
        let t = Instant::now();
        let pb2 = pb.clone();
        client
            .upload_key(&keys, move |sent, _| pb2.set_position(sent))
            .await
            .context("uploading the evaluation key")?;
        pb.finish_and_clear();
        upload_s = t.elapsed().as_secs_f64();
        key_uploaded = true;
    }

    let batch = a.batch.min(model.max_batch());
    let pb = bar(
        data.len() as u64,
        "{msg} [{bar:40}] {pos}/{len} {elapsed_precise} eta {eta}",
        "encrypted inference",
    );
    let mut predictions = Vec::with_capacity(data.len());
    let (mut latency, mut encrypt, mut rpc, mut server, mut decrypt) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut request_bytes, mut response_bytes, mut ciphertext_bytes) = (0usize, 0usize, 0usize);
    for chunk in data.features.chunks(batch) {
        let n = chunk.len() as f64;
        let t0 = Instant::now();
        let samples = model.encrypt_batch(&keys, chunk.to_vec()).await?;
        ciphertext_bytes += samples.iter().map(Vec::len).sum::<usize>();
        let t1 = Instant::now();
        let reply = client.infer_model(&model, &keys.key_id, samples).await?;
        let t2 = Instant::now();
        let (request_len, response_len, server_eval) =
            (reply.request_bytes, reply.response_bytes, reply.server_eval);
        predictions.extend(model.decrypt_batch(&keys, reply.outputs).await?);
        let t3 = Instant::now();
        request_bytes += request_len;
        response_bytes += response_len;
        for _ in chunk {
            let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3 / n;
            latency.push(ms(t3 - t0));
            encrypt.push(ms(t1 - t0));
            rpc.push(ms(t2 - t1));
            server.push(ms(server_eval));
            decrypt.push(ms(t3 - t2));
        }
        pb.inc(chunk.len() as u64);
    }
    pb.finish_and_clear();

    let n = data.len();
    let regression = model.spec.task == Task::Regression;
    let labels: Vec<i64> = predictions.iter().map(|p| p.label).collect();
    let values: Vec<Vec<f64>> = predictions.iter().map(|p| p.outputs.clone()).collect();
    let acc = data
        .labels
        .as_ref()
        .filter(|_| !regression)
        .map(|l| accuracy(&labels, l));
    let fit = data
        .targets
        .as_ref()
        .filter(|_| regression)
        .map(|t| regression_metrics(&values, t));
    let mut out = serde_json::json!({
        "model": model.name(),
        "task": model.spec.task.name(),
        "n": n,
        "batch": batch,
        "predictions": if regression {
            serde_json::json!(predictions.iter().map(|p| &p.outputs).collect::<Vec<_>>())
        } else {
            serde_json::json!(labels)
        },
        "key_id": keys.key_id,
        "key_uploaded": key_uploaded,
        "key_upload_bytes": if key_uploaded { keys.eval_key.len() } else { 0 },
        "key_upload_s": upload_s,
        "request_bytes_per_sample": request_bytes as f64 / n as f64,
        "ciphertext_bytes_per_sample": ciphertext_bytes as f64 / n as f64,
        "response_bytes_per_sample": response_bytes as f64 / n as f64,
        "latency_ms_median": median(&latency),
        "encrypt_ms_median": median(&encrypt),
        "rpc_ms_median": median(&rpc),
        "server_eval_ms_median": median(&server),
        "decrypt_ms_median": median(&decrypt),
        "latency_ms_per_sample": latency,
        "pbs_per_sample": model.info.pbs_per_sample,
        "reveal": model.info.reveal,
        "model_digest": model.info.model_digest,
        "parameter_set": model.info.parameter_set,
    });
    if let Some(labels) = &data.labels {
        out["labels"] = serde_json::json!(labels);
    }
    if let Some(acc) = acc {
        out["accuracy"] = serde_json::json!(acc);
    }
    if let Some(t) = &data.targets {
        out["targets"] = serde_json::json!(t);
    }
    if let Some(m) = fit {
        out["r2"] = serde_json::json!(m.r2);
        out["mae"] = serde_json::json!(m.mae);
        out["rmse"] = serde_json::json!(m.rmse);
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "model {} ({} output) on {}: {n} samples, key {} ({})",
        model.name(),
        if model.spec.reveal == veil_models::graph::Reveal::Label {
            "label-only"
        } else {
            "scores"
        },
        a.conn.server,
        &keys.key_id[..12],
        if key_uploaded {
            format!(
                "uploaded {:.1} MB in {upload_s:.1} s",
                keys.eval_key.len() as f64 / 1e6
            )
        } else {
            "already on the server".to_string()
        }
    );
    if regression {
        println!(
            "{:>6}  {:>14}  {:>14}  {:>12}",
            "row", "prediction", "target", "latency ms"
        );
        for (i, p) in predictions.iter().enumerate() {
            let shown: Vec<String> = p.outputs.iter().map(|v| format!("{v:.6}")).collect();
            let target = data.targets.as_ref().map(|t| {
                t[i].iter()
                    .map(|v| format!("{v:.6}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            });
            println!(
                "{i:>6}  {:>14}  {:>14}  {:>12.1}",
                shown.join(" "),
                target.unwrap_or_else(|| "-".to_string()),
                latency[i]
            );
        }
        if let Some(m) = fit {
            println!(
                "r2 {:.4}, mae {:.4}, rmse {:.4} ({n} samples)",
                m.r2, m.mae, m.rmse
            );
        }
    } else {
        println!(
            "{:>6}  {:>10}  {:>6}  {:>12}",
            "row", "prediction", "label", "latency ms"
        );
        for (i, p) in labels.iter().enumerate() {
            let label = data.labels.as_ref().map(|l| l[i]);
            println!(
                "{i:>6}  {p:>10}  {:>6}  {:>12.1}{}",
                label.map_or("-".to_string(), |l| l.to_string()),
                latency[i],
                match label {
                    Some(l) if l == *p => "",
                    Some(_) => "  (miss)",
                    None => "",
                }
            );
        }
        if let Some(acc) = acc {
            println!("accuracy {:.1}% ({n} samples)", acc * 100.0);
        }
    }
    println!(
        "per sample (median): {:.1} ms end to end = encrypt {:.1} + request {:.1} (server eval {:.1}) + decrypt {:.1}; \
         request {:.0} bytes, response {:.0} bytes",
        median(&latency),
        median(&encrypt),
        median(&rpc),
        median(&server),
        median(&decrypt),
        request_bytes as f64 / n as f64,
        response_bytes as f64 / n as f64,
    );
    Ok(())
}
