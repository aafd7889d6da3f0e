//! The encrypted-model flow with the `veil` binary: the owner compiles with
//! `--encrypt-model`, the evaluator runs the file on his clear rows with `veil run`, the owner
//! decrypts with `veil decrypt`. Real 128-bit keys, real zoo models.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use veil_models::data::{Labels, read_csv};
use veil_models::{CompiledModel, Simulate};

fn veil(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_veil"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("veil runs")
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn refused(out: Output, want: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "accepted; wanted an error with '{want}'"
    );
    assert!(err.contains(want), "wanted '{want}' in: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

fn zoo(name: &str, file: &str) -> String {
    format!("{}/../models/zoo/{name}/{file}", env!("CARGO_MANIFEST_DIR"))
}

fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("veil-enc-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The first `n` rows of a zoo test set, with its header, as the evaluator's own CSV.
fn first_rows(name: &str, n: usize, to: &Path) {
    let text = std::fs::read_to_string(zoo(name, "test.csv")).unwrap();
    let rows: Vec<&str> = text.lines().take(n + 1).collect();
    std::fs::write(to, rows.join("\n") + "\n").unwrap();
}

/// The first `n` test rows whose class holds under the predicted noise (near-ties may
/// decrypt to either class in any mode), with the header, as the evaluator's own CSV.
fn clear_winner_rows(name: &str, model: &CompiledModel, n: usize, to: &Path) {
    let text = std::fs::read_to_string(zoo(name, "test.csv")).unwrap();
    let data = read_csv(
        Path::new(&zoo(name, "test.csv")),
        model.n_features(),
        Labels::Required,
    )
    .unwrap();
    let mut lines = text.lines();
    let mut out = vec![lines.next().unwrap()];
    for (line, x) in lines.zip(&data.features) {
        if out.len() > n {
            break;
        }
        if model.class_holds_under_noise(x, 500).unwrap() {
            out.push(line);
        }
    }
    assert_eq!(out.len(), n + 1, "{name}: clear-winner rows");
    std::fs::write(to, out.join("\n") + "\n").unwrap();
}

#[test]
fn owner_encrypts_evaluator_runs_owner_decrypts() {
    let dir = scratch("flow");
    ok(veil(&["keygen", "-o", "alice"], &dir));
    ok(veil(&["keygen", "-o", "carol"], &dir));
    for (name, n) in [("digits_mlp", 10), ("breast_cancer_logreg", 20)] {
        let enc = format!("{name}.enc.veil");
        let summary: serde_json::Value = serde_json::from_str(&ok(veil(
            &[
                "compile",
                &zoo(name, "model.onnx"),
                "--calibration",
                &zoo(name, "train.csv"),
                "--encrypt-model",
                "--keys",
                "alice",
                "-o",
                &enc,
                "--json",
            ],
            &dir,
        )))
        .unwrap();
        assert_eq!(
            summary["reveal"], "label",
            "label-only is this mode's default"
        );
        let digest = summary["digest"].as_str().unwrap();
        let clear = dir.join("alice/models").join(format!("{digest}.veil"));
        let model = CompiledModel::load(&clear).unwrap();

        let rows = dir.join(format!("{name}.csv"));
        clear_winner_rows(name, &model, n, &rows);
        let results = format!("{name}.results");
        let rows_arg = rows.to_str().unwrap();
        let run: serde_json::Value = serde_json::from_str(&ok(veil(
            &[
                "run",
                &enc,
                "--eval-key",
                "alice/eval.key",
                "--data",
                rows_arg,
                "-o",
                &results,
                "--backend",
                "cpu",
                "--json",
            ],
            &dir,
        )))
        .unwrap();
        assert_eq!(run["rows"], n);
        assert_eq!(run["pbs_per_sample"], summary["pbs_per_sample"]);

        let out: serde_json::Value = serde_json::from_str(&ok(veil(
            &["decrypt", &results, "--keys", "alice", "--json"],
            &dir,
        )))
        .unwrap();
        let got: Vec<i64> = out["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["label"].as_i64().unwrap())
            .collect();
        let data = read_csv(&rows, model.n_features(), Labels::Required).unwrap();
        let want = model.simulate_labels(&data.features, None).unwrap();
        assert_eq!(got, want, "{name}: decrypted labels = simulated labels");
        let truth = data.labels.unwrap();
        let right = got.iter().zip(&truth).filter(|(g, t)| g == t).count();
        eprintln!("{name}: {n} rows, decrypted = simulated, {right}/{n} equal the true label");

        // Only the owner's key decrypts; another key's run or a missing clear copy is refused.
        refused(
            veil(&["decrypt", &results, "--keys", "carol"], &dir),
            "only the key the model was encrypted under",
        );
        refused(
            veil(
                &[
                    "run",
                    &enc,
                    "--eval-key",
                    "carol/eval.key",
                    "--data",
                    rows_arg,
                    "-o",
                    "x",
                ],
                &dir,
            ),
            "use the eval.key its owner gave with it",
        );
    }

    // Results of a model these keys did not encrypt: carol's model, run with carol's key.
    ok(veil(
        &[
            "compile",
            &zoo("iris_logreg", "model.onnx"),
            "--calibration",
            &zoo("iris_logreg", "train.csv"),
            "--encrypt-model",
            "--keys",
            "carol",
            "-o",
            "carol.enc.veil",
        ],
        &dir,
    ));
    first_rows("iris_logreg", 3, &dir.join("iris.csv"));
    ok(veil(
        &[
            "run",
            "carol.enc.veil",
            "--eval-key",
            "carol/eval.key",
            "--data",
            "iris.csv",
            "-o",
            "carol.results",
        ],
        &dir,
    ));
    refused(
        veil(&["decrypt", "carol.results", "--keys", "alice"], &dir),
        "only the key the model was encrypted under",
    );
    std::fs::remove_dir_all(dir.join("carol/models")).unwrap();
    refused(
        veil(&["decrypt", "carol.results", "--keys", "carol"], &dir),
        "does not hold",
    );
    // Damaged files: clear errors.
    let bytes = std::fs::read(dir.join("carol.results")).unwrap();
    std::fs::write(dir.join("cut.results"), &bytes[..bytes.len() / 2]).unwrap();
    let err = veil(&["decrypt", "cut.results", "--keys", "carol"], &dir);
    assert!(!err.status.success());
    assert!(!String::from_utf8_lossy(&err.stderr).contains("panicked"));
    let model = std::fs::read(dir.join("carol.enc.veil")).unwrap();
    std::fs::write(dir.join("cut.enc.veil"), &model[..model.len() / 3]).unwrap();
    refused(
        veil(
            &[
                "run",
                "cut.enc.veil",
                "--eval-key",
                "carol/eval.key",
                "--data",
                "iris.csv",
                "-o",
                "y",
            ],
            &dir,
        ),
        "damaged encrypted model",
    );
    let _ = std::fs::remove_dir_all(&dir);
}
