//! `--backend gpu` where it cannot run (a build without the `gpu` feature, or no device) is
//! a clear error and a non-zero exit, before any work: never a panic or a hang.

use std::process::Command;
use std::time::{Duration, Instant};

use veil_runtime::gpu_available;

fn run_veil(args: &[&str]) -> (i32, String) {
    let t = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_veil"))
        .args(args)
        .output()
        .expect("veil runs");
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "veil {args:?} took {:?} to refuse",
        t.elapsed()
    );
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn gpu_backend_without_a_gpu_is_a_clean_error() {
    if gpu_available() {
        eprintln!("skipped: this build has the gpu feature and a CUDA device is present");
        return;
    }
    let zoo = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/zoo/iris_logreg");
    let dir = std::env::temp_dir().join(format!("veil-backend-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let model = dir.join("iris.veil");
    let (code, err) = run_veil(&[
        "compile",
        &format!("{zoo}/model.onnx"),
        "--calibration",
        &format!("{zoo}/train.csv"),
        "-o",
        model.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "compile: {err}");

    let test_csv = format!("{zoo}/test.csv");
    let runs: [Vec<&str>; 2] = [
        vec![
            "eval",
            model.to_str().unwrap(),
            "--data",
            &test_csv,
            "--mode",
            "fhe",
            "--backend",
            "gpu",
        ],
        vec!["bench-pbs", "--backend", "gpu"],
    ];
    for args in runs {
        let (code, err) = run_veil(&args);
        assert_eq!(code, 1, "veil {args:?} exits 1; stderr: {err}");
        assert!(err.contains("error: backend unavailable"), "{err}");
        let why = if cfg!(feature = "gpu") {
            "no CUDA device"
        } else {
            "without the `gpu` feature"
        };
        assert!(err.contains(why), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    // The CPU backend is always there; simulate mode never needs one.
    let (code, err) = run_veil(&[
        "eval",
        model.to_str().unwrap(),
        "--data",
        &test_csv,
        "--limit",
        "3",
        "--backend",
        "gpu",
    ]);
    assert_eq!(code, 0, "simulate mode ignores the backend: {err}");
    let _ = std::fs::remove_dir_all(&dir);
}
