//! `veil bench-pbs`: keyswitch + bootstrap throughput by batch size on one backend, with
//! real keys, and how that backend's reads compare with the CPU's.

use veil_models::compiled::ParamSet;
use veil_runtime::calibrate::bench_backend;

use super::eval::Backend;

#[derive(clap::Args)]
pub struct Args {
    /// Where bootstraps run; default as for `veil eval`.
    #[arg(long)]
    backend: Option<Backend>,
    /// Batch sizes to time, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 16, 64, 256, 1024, 4096])]
    batches: Vec<usize>,
    /// Keep repeating each batch size for at least this many seconds (best run counts).
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
    /// Ciphertexts read by this backend and by the CPU, to compare their reads (0: skip).
    #[arg(long, default_value_t = 0)]
    reads: usize,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if a.batches.iter().any(|&b| b == 0 || b > 1 << 20) {
        anyhow::bail!("--batches: each size must be between 1 and {}", 1 << 20);
    }
    let kind = Backend::resolve(a.backend)?;
    let params = ParamSet::Message2Carry2KsPbsTuniform2m128;
    let r = bench_backend(kind, params, &a.batches, a.seconds, a.reads)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!(
        "{} on {}: key {} B compressed, {} B expanded, set up in {:.0} ms",
        r.parameter_set,
        r.backend,
        r.eval_key_bytes_compressed,
        r.eval_key_bytes_expanded,
        r.key_setup_ms
    );
    for t in &r.throughput {
        println!(
            "  batch {:6}: {:10.2} ms  {:10.0} KS+PBS/s",
            t.batch, t.batch_ms, t.pbs_per_second
        );
    }
    if let Some(g) = &r.agreement {
        println!(
            "  reads vs CPU: {:.4} same position over {} reads; error {:+.2} ± {:.2} (max {}), CPU {:+.2} ± {:.2} (max {})",
            g.same_position_as_cpu,
            g.reads,
            g.error_mean,
            g.error_std,
            g.max_abs_error,
            g.cpu_error_mean,
            g.cpu_error_std,
            g.cpu_max_abs_error
        );
    }
    Ok(())
}
