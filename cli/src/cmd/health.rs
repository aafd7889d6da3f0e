//! `veil health`: the server's gRPC health (grpc.health.v1).

use super::conn::Conn;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    conn: Conn,
    /// Service to ask about ("" for the whole server).
    #[arg(long, default_value = "veil.v1.Veil")]
    service: String,
}

/// Prints the status; fails (exit status 1) unless it is SERVING.
pub async fn run(a: Args) -> anyhow::Result<()> {
    let status = a.conn.connect().await?.health(&a.service).await?;
    println!("{status}");
    if status != "SERVING" {
        anyhow::bail!("the server is not serving ({status})");
    }
    Ok(())
}
