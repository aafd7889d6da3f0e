use super::conn::Conn;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    conn: Conn,
    /// Print the server's metadata as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    let client = a.conn.connect().await?;
    let models = client.list_models().await?;
    if a.json {
        let list: Vec<_> = models
            .iter()
            .map(|m| {
                serde_json::json!({
                    "name": m.info.name,
                    "task": m.info.task,
                    "input_shape": m.info.input_shape,
                    "n_features": m.n_features(),
                    "n_outputs": m.info.n_outputs,
                    "class_labels": m.info.class_labels,
                    "tail": m.info.tail,
                    "parameter_set": m.info.parameter_set,
                    "pbs_per_sample": m.info.pbs_per_sample,
                    "eval_key_bytes": m.info.eval_key_bytes,
                    "max_batch": m.info.max_batch,
                    "reveal": m.info.reveal,
                    "model_digest": m.info.model_digest,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    println!(
        "{:<24} {:<10} {:>12} {:>8} {:>7} {:>10} {:>10} {:>14}  parameter set",
        "model", "task", "input", "outputs", "reveals", "pbs/sample", "key MB", "digest"
    );
    for m in &models {
        println!(
            "{:<24} {:<10} {:>12} {:>8} {:>7} {:>10} {:>10.1} {:>14}  {}",
            m.info.name,
            m.info.task,
            format!("{:?}", m.info.input_shape),
            m.info.n_outputs,
            m.info.reveal,
            m.info.pbs_per_sample,
            m.info.eval_key_bytes as f64 / 1e6,
            m.info.model_digest.get(..12).unwrap_or(""),
            m.info.parameter_set
        );
    }
    Ok(())
}
