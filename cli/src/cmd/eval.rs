use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use veil_models::data::{Labels, read_csv};
use veil_models::eval::{Prediction, accuracy, regression_metrics};
use veil_models::graph::Task;
use veil_models::{CompiledModel, Simulate};
use veil_runtime::{BackendKind, ClientKey, EvalKey, FheModel, Profile};

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Simulate,
    Fhe,
}

#[derive(clap::Args)]
pub struct Args {
    /// The compiled model (.veil).
    model: PathBuf,
    /// CSV with the features and a `label` column (classifiers) or a `target` column
    /// (regressors).
    #[arg(long)]
    data: PathBuf,
    #[arg(long, value_enum, default_value_t = Mode::Simulate)]
    mode: Mode,
    /// Evaluate only the first N rows.
    #[arg(long)]
    limit: Option<usize>,
    /// Samples per encrypted batch (fhe mode); 1 measures single-sample latency.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Where bootstraps run (fhe mode): cpu, or gpu (needs the `gpu` build and a device).
    /// Default: the GPU when this binary has it and a device is present, else the CPU.
    #[arg(long)]
    backend: Option<Backend>,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    Cpu,
    Gpu,
}

impl Backend {
    /// The backend asked for, or this machine's default; an error if it cannot run here.
    pub fn resolve(choice: Option<Backend>) -> anyhow::Result<BackendKind> {
        let kind = match choice {
            Some(Backend::Cpu) => BackendKind::Cpu,
            Some(Backend::Gpu) => BackendKind::Gpu,
            None => BackendKind::default_for_this_machine(),
        };
        kind.check_available()?;
        Ok(kind)
    }
}

pub fn run(a: Args) -> anyhow::Result<()> {
    // Refuse an unavailable backend before any work.
    let backend = match a.mode {
        Mode::Fhe => Some(Backend::resolve(a.backend)?),
        Mode::Simulate => None,
    };
    let model = CompiledModel::load(&a.model)?;
    let mut data = read_csv(&a.data, model.n_features(), Labels::Required)?;
    if let Some(n) = a.limit {
        data.truncate(n);
    }
    let regression = model.task == Task::Regression;
    let labels = data.labels.clone();
    let targets = data.targets.clone();
    match (regression, &labels, &targets) {
        (false, None, _) => bail!(
            "{} has no 'label' column (the model is a classifier)",
            a.data.display()
        ),
        (true, _, None) => bail!(
            "{} has no 'target' column (the model is a regressor)",
            a.data.display()
        ),
        _ => {}
    }

    // Exact and noisy simulation, always: they are the reference for the encrypted run.
    let t0 = Instant::now();
    let sim: Vec<_> = data
        .features
        .iter()
        .map(|x| model.simulate(x, None))
        .collect::<Result<_, _>>()?;
    let sim_secs = t0.elapsed().as_secs_f64();
    let sim_pred: Vec<Prediction> = sim
        .iter()
        .map(|s| model.decode(&s.accs))
        .collect::<Result<_, _>>()?;
    let overflow_samples = sim.iter().filter(|s| s.overflows > 0).count();
    let noisy_pred = model.simulate_predictions(&data.features, Some(0x5eed))?;
    // Accuracy for classifiers, fit for regressors.
    let quality = |prefix: &str, p: &[Prediction]| -> serde_json::Value {
        match (&labels, &targets) {
            (Some(l), _) if !regression => {
                let pred: Vec<i64> = p.iter().map(|p| p.label).collect();
                serde_json::json!({ format!("{prefix}accuracy"): accuracy(&pred, l) })
            }
            (_, Some(t)) => {
                let pred: Vec<Vec<f64>> = p.iter().map(|p| p.outputs.clone()).collect();
                let m = regression_metrics(&pred, t);
                serde_json::json!({
                    format!("{prefix}r2"): m.r2,
                    format!("{prefix}mae"): m.mae,
                    format!("{prefix}rmse"): m.rmse,
                })
            }
            _ => serde_json::json!({}),
        }
    };

    let mut out = serde_json::json!({
        "mode": match a.mode { Mode::Simulate => "simulate", Mode::Fhe => "fhe" },
        "task": model.task.name(),
        "n": data.len(),
        "overflow_samples": overflow_samples,
        "simulated_samples_per_second": data.len() as f64 / sim_secs.max(1e-9),
        "pbs_per_sample": model.pbs_per_sample(),
        "parameter_set": model.params.name(),
    });
    let merge = |out: &mut serde_json::Value, v: serde_json::Value| {
        for (k, v) in v.as_object().expect("an object") {
            out[k] = v.clone();
        }
    };
    merge(&mut out, quality("simulated_", &sim_pred));
    let noisy = quality("simulated_", &noisy_pred);
    for (k, v) in noisy.as_object().expect("an object") {
        out[format!("{k}_with_noise")] = v.clone();
    }

    match a.mode {
        Mode::Simulate => merge(&mut out, quality("", &sim_pred)),
        Mode::Fhe => {
            if a.batch == 0 {
                bail!("--batch must be at least 1");
            }
            let backend = backend.expect("resolved for fhe mode");
            let fhe = fhe_run(&model, &data.features, a.batch, backend)?;
            merge(&mut out, quality("", &fhe.predictions));
            if regression {
                let diff = fhe
                    .predictions
                    .iter()
                    .zip(&sim_pred)
                    .flat_map(|(a, b)| a.outputs.iter().zip(&b.outputs).map(|(x, y)| (x - y).abs()))
                    .fold(0.0, f64::max);
                out["max_abs_diff_vs_simulated"] = serde_json::json!(diff);
            } else {
                let agree = fhe
                    .predictions
                    .iter()
                    .zip(&sim_pred)
                    .filter(|(a, b)| a.label == b.label)
                    .count();
                out["agreement"] = serde_json::json!(agree as f64 / data.len().max(1) as f64);
            }
            out["latency_ms_median"] = serde_json::json!(median(&fhe.latency_ms));
            out["latency_ms_per_sample"] = serde_json::json!(fhe.latency_ms);
            out["batch"] = serde_json::json!(a.batch);
            out["keygen_s"] = serde_json::json!(fhe.keygen_s);
            out["encrypt_ms_median"] = serde_json::json!(median(&fhe.encrypt_ms));
            out["threads"] = serde_json::json!(rayon_threads());
            out["backend"] = serde_json::json!(backend.name());
            out["eval_key_memory_bytes"] = serde_json::json!(fhe.key_bytes);
            // Throughput: samples over the summed wall time of every batch's evaluation. (Not
            // over the profile's sum: on the GPU the host's input expansion overlaps the
            // device's work, so the parts add up to more than the wall time.)
            let wall_s = fhe.latency_ms.iter().sum::<f64>() / 1e3;
            out["samples_per_second"] = serde_json::json!(data.len() as f64 / wall_s.max(1e-9));
            out["evaluation_wall_s"] = serde_json::json!(wall_s);
            out["profile_sum_s"] = serde_json::json!(fhe.profile_total_s());
            let p = &fhe.profile;
            let mut split = serde_json::json!({
                "expand_s": p.expand_s,
                "linear_s": p.linear_s,
                "bootstrap_s": p.bootstrap_s,
                "bootstraps": p.bootstraps,
            });
            for (name, secs) in &p.bootstrap_phases {
                split[format!("bootstrap_{name}_s")] = serde_json::json!(secs);
            }
            out["time_split"] = split;
        }
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        // The same figures, one per line.
        for (k, v) in out.as_object().expect("an object") {
            if !v.is_array() {
                println!("{k}: {v}");
            }
        }
    }
    Ok(())
}

struct FheRun {
    predictions: Vec<Prediction>,
    latency_ms: Vec<f64>,
    encrypt_ms: Vec<f64>,
    keygen_s: f64,
    key_bytes: u64,
    /// Summed over every batch.
    profile: Profile,
}

impl FheRun {
    fn profile_total_s(&self) -> f64 {
        self.profile.expand_s + self.profile.linear_s + self.profile.bootstrap_s
    }
}

fn fhe_run(
    model: &CompiledModel,
    xs: &[Vec<f64>],
    batch: usize,
    kind: BackendKind,
) -> anyhow::Result<FheRun> {
    let spec = model.client_spec();
    let t = Instant::now();
    eprintln!("generating keys ({})...", model.params.name());
    let client = ClientKey::generate(model.params);
    let eval_key = EvalKey::from_compressed(kind, model.params, &client.compressed_server_key())
        .context("expanding the evaluation key")?;
    let keygen_s = t.elapsed().as_secs_f64();
    let fhe = FheModel::new(model.clone())?;
    let backend = eval_key.backend();
    // One untimed batch first: device tables upload, FFT plans, page faults.
    if let Some(x) = xs.first() {
        fhe.evaluate(backend.as_ref(), &[client.encrypt(&spec, x)?])?;
    }
    let bar = ProgressBar::new(xs.len() as u64).with_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} {elapsed_precise} eta {eta}")
            .expect("valid template"),
    );
    bar.set_message(format!("encrypted inference ({})", backend.name()));
    let mut run = FheRun {
        predictions: Vec::new(),
        latency_ms: Vec::new(),
        encrypt_ms: Vec::new(),
        keygen_s,
        key_bytes: eval_key.memory_bytes(),
        profile: Profile::default(),
    };
    for chunk in xs.chunks(batch) {
        let t = Instant::now();
        let inputs = chunk
            .iter()
            .map(|x| client.encrypt(&spec, x))
            .collect::<Result<Vec<_>, _>>()?;
        let enc_ms = t.elapsed().as_secs_f64() * 1e3 / chunk.len() as f64;
        let t = Instant::now();
        let (outputs, p) = fhe.evaluate_profiled(backend.as_ref(), &inputs)?;
        let eval_ms = t.elapsed().as_secs_f64() * 1e3 / chunk.len() as f64;
        add_profile(&mut run.profile, &p);
        for o in &outputs {
            let accs = client.decrypt(&spec, o)?;
            run.predictions.push(spec.decode(&accs)?);
            run.latency_ms.push(eval_ms);
            run.encrypt_ms.push(enc_ms);
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Ok(run)
}

fn add_profile(total: &mut Profile, p: &Profile) {
    total.expand_s += p.expand_s;
    total.linear_s += p.linear_s;
    total.bootstrap_s += p.bootstrap_s;
    total.bootstraps += p.bootstraps;
    for (name, secs) in &p.bootstrap_phases {
        match total.bootstrap_phases.iter_mut().find(|(n, _)| n == name) {
            Some(e) => e.1 += secs,
            None => total.bootstrap_phases.push((name, *secs)),
        }
    }
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

pub(crate) fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let m = s.len() / 2;
    if s.len().is_multiple_of(2) {
        (s[m - 1] + s[m]) / 2.0
    } else {
        s[m]
    }
}
