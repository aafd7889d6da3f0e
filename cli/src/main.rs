//! `veil`: the command line for model owners (compile, eval) and clients (keygen, models,
//! infer).

mod cmd;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "veil",
    version,
    about = "Private ML inference under fully homomorphic encryption"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Import an ONNX model, quantize it on calibration data and plan it for FHE.
    Compile(cmd::compile::Args),
    /// Measure a compiled model's accuracy, simulated or encrypted.
    Eval(cmd::eval::Args),
    /// Size what a model costs per sample: bootstraps, bytes, memory, predicted latency.
    Estimate(cmd::estimate::Args),
    /// Time keyswitch + bootstrap by batch size on the CPU or GPU backend.
    BenchPbs(cmd::bench_pbs::Args),
    /// Generate a client key and its compressed evaluation key.
    Keygen(cmd::keygen::Args),
    /// List the models a server serves.
    Models(cmd::models::Args),
    /// Encrypt samples, run them on a server, decrypt and print the predictions.
    Infer(cmd::infer::Args),
    /// Your evaluation keys on a server: list, upload, delete.
    Keys(cmd::keys::Args),
    /// Ask a server's gRPC health (exit status 1 unless SERVING).
    Health(cmd::health::Args),
    /// Run an encrypted model (`compile --encrypt-model`) on your clear rows, locally: the
    /// results are encrypted under the model owner's key.
    Run(cmd::run::Args),
    /// Decrypt the results of an encrypted model: the owner with her keys, or anyone through
    /// her server (--server); prints one prediction per row.
    Decrypt(cmd::decrypt::Args),
}

fn block_on<F: std::future::Future<Output = anyhow::Result<()>>>(f: F) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(f)
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Compile(a) => cmd::compile::run(a),
        Command::Eval(a) => cmd::eval::run(a),
        Command::Estimate(a) => cmd::estimate::run(a),
        Command::BenchPbs(a) => cmd::bench_pbs::run(a),
        Command::Keygen(a) => cmd::keygen::run(a),
        Command::Models(a) => block_on(cmd::models::run(a)),
        Command::Infer(a) => block_on(cmd::infer::run(a)),
        Command::Keys(a) => block_on(cmd::keys::run(a)),
        Command::Health(a) => block_on(cmd::health::run(a)),
        Command::Run(a) => cmd::run::run(a),
        Command::Decrypt(a) => block_on(cmd::decrypt::run(a)),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
