//! `veil`: the command line for model owners (compile, eval) and clients.

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
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Compile(a) => cmd::compile::run(a),
        Command::Eval(a) => cmd::eval::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
