//! `veil compile --json` counts, per node and in all, the lookups read exactly (tree tests and
//! leaf tables) and those read with the bootstrap's noise (activations).

use std::process::Command;

fn compile_json(zoo: &str, tag: &str) -> serde_json::Value {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/zoo");
    let out = std::env::temp_dir().join(format!("veil-json-{tag}-{}.veil", std::process::id()));
    let run = Command::new(env!("CARGO_BIN_EXE_veil"))
        .args([
            "compile",
            &format!("{dir}/{zoo}/model.onnx"),
            "--calibration",
        ])
        .arg(format!("{dir}/{zoo}/train.csv"))
        .arg("-o")
        .arg(&out)
        .args(["--json", "--fixed-widths"])
        .output()
        .expect("veil runs");
    let _ = std::fs::remove_file(&out);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    serde_json::from_slice(&run.stdout).expect("JSON on stdout")
}

fn total(j: &serde_json::Value, key: &str) -> u64 {
    j[key].as_u64().unwrap_or_else(|| panic!("no {key} in {j}"))
}

#[test]
fn compile_json_counts_exact_and_approximate_reads() {
    for (zoo, exact) in [("iris_lgbm", true), ("wine_mlp", false)] {
        let j = compile_json(zoo, zoo);
        let nodes = j["nodes"].as_array().unwrap();
        let mut sums = (0, 0);
        for n in nodes {
            let (e, a) = (total(n, "exact_reads"), total(n, "approximate_reads"));
            assert_eq!(e + a, total(n, "pbs"), "{zoo}: {n}");
            sums = (sums.0 + e, sums.1 + a);
        }
        assert_eq!(
            sums,
            (total(&j, "exact_reads"), total(&j, "approximate_reads"))
        );
        assert_eq!(sums.0 + sums.1, total(&j, "pbs_per_sample"), "{zoo}");
        if exact {
            // A tree ensemble: every test and leaf table is read exactly.
            assert!(sums.0 > 0 && sums.1 == 0, "{zoo}: {sums:?}");
        } else {
            assert!(sums.0 == 0 && sums.1 > 0, "{zoo}: {sums:?}");
        }
    }
}
