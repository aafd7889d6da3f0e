//! ONNX external data, as torch's default exporter writes it (`model.onnx` + `model.onnx.data`):
//! read from the model's folder, honouring offset and length, and refused with a clear error
//! when the reference is unsafe, missing, short or too large.

mod common;

use std::path::{Path, PathBuf};

use prost::Message;
use veil_models::onnx::{self, pb};

const ZOO_MODEL: &str = "digits_torch_mlp";

/// A fresh folder under the target directory, holding a copy of the zoo model's two files.
fn workdir(case: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("external_data_{case}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let zoo = common::zoo_dir(ZOO_MODEL);
    for f in ["model.onnx", "model.onnx.data"] {
        std::fs::copy(zoo.join(f), dir.join(f)).unwrap();
    }
    dir
}

fn external_tensors(m: &pb::ModelProto) -> Vec<&pb::TensorProto> {
    let g = m.graph.as_ref().unwrap();
    g.initializer
        .iter()
        .filter(|t| t.data_location == 1)
        .collect()
}

/// Rewrites `model.onnx` in `dir` after `edit` changes its external references.
fn rewrite(dir: &Path, edit: impl FnOnce(&mut pb::ModelProto)) -> PathBuf {
    let path = dir.join("model.onnx");
    let mut m = pb::ModelProto::decode(std::fs::read(&path).unwrap().as_slice()).unwrap();
    edit(&mut m);
    std::fs::write(&path, m.encode_to_vec()).unwrap();
    path
}

fn set_entry(t: &mut pb::TensorProto, key: &str, value: &str) {
    t.external_data.retain(|e| e.key != key);
    t.external_data.push(pb::StringStringEntryProto {
        key: key.into(),
        value: value.into(),
    });
}

fn first_external(m: &mut pb::ModelProto) -> &mut pb::TensorProto {
    let g = m.graph.as_mut().unwrap();
    g.initializer
        .iter_mut()
        .find(|t| t.data_location == 1)
        .unwrap()
}

fn import_error(path: &Path) -> String {
    onnx::import_file(path).unwrap_err().to_string()
}

#[test]
fn the_default_export_stores_weights_externally_and_imports_like_onnxruntime() {
    let zoo = common::zoo_dir(ZOO_MODEL);
    let bytes = std::fs::read(zoo.join("model.onnx")).unwrap();
    let m = pb::ModelProto::decode(bytes.as_slice()).unwrap();
    let ext = external_tensors(&m);
    assert!(
        !ext.is_empty() && ext.iter().all(|t| t.raw_data.is_empty()),
        "the zoo model must keep its weights in model.onnx.data"
    );
    // From its path: the weights are read and the first test rows score like onnxruntime.
    let model = onnx::import_file(&zoo.join("model.onnx")).unwrap();
    let reference = common::reference(ZOO_MODEL);
    let test = common::dataset(ZOO_MODEL, "test.csv", model.n_features());
    let first: Vec<Vec<f64>> = serde_json::from_value(reference["first_scores"].clone()).unwrap();
    for (x, want) in test.features.iter().zip(&first) {
        for (g, w) in model.scores(x).iter().zip(want) {
            assert!((g - w).abs() < 1e-4 * (1.0 + w.abs()), "{g} vs {w}");
        }
    }
    // From bytes alone there is no folder to read them from.
    let msg = onnx::import_bytes(&bytes).unwrap_err().to_string();
    assert!(
        msg.contains("external file 'model.onnx.data'") && msg.contains("file path"),
        "{msg}"
    );
}

#[test]
fn offsets_and_lengths_select_the_bytes() {
    // Move the data 7 bytes into a renamed file, in a subfolder: the references follow.
    let dir = workdir("offset");
    let data = std::fs::read(dir.join("model.onnx.data")).unwrap();
    std::fs::create_dir_all(dir.join("weights")).unwrap();
    let mut shifted = b"garbage".to_vec();
    shifted.extend_from_slice(&data);
    std::fs::write(dir.join("weights/w.bin"), &shifted).unwrap();
    std::fs::remove_file(dir.join("model.onnx.data")).unwrap();
    let path = rewrite(&dir, |m| {
        for t in m.graph.as_mut().unwrap().initializer.iter_mut() {
            if t.data_location == 1 {
                let off: u64 = t
                    .external_data
                    .iter()
                    .find(|e| e.key == "offset")
                    .map_or(0, |e| e.value.parse().unwrap());
                set_entry(t, "location", "./weights/w.bin");
                set_entry(t, "offset", &(off + 7).to_string());
            }
        }
    });
    let moved = onnx::import_file(&path).unwrap();
    let original = common::float_model(ZOO_MODEL);
    assert_eq!(moved, original);

    // One byte off shifts every weight: caught as different predictions, not silently equal.
    let path = rewrite(&dir, |m| {
        let t = first_external(m);
        let off: u64 = t
            .external_data
            .iter()
            .find(|e| e.key == "offset")
            .map_or(0, |e| e.value.parse().unwrap());
        set_entry(t, "offset", &(off + 1).to_string());
    });
    // (Shifted float bytes may even decode to NaN, which the importer refuses.)
    if let Ok(m) = onnx::import_file(&path) {
        assert_ne!(m, original);
    }
}

#[test]
fn unsafe_missing_short_and_oversized_references_are_refused() {
    // Absolute paths and '..' could read any file on the machine.
    for (case, location) in [
        ("absolute", "/etc/passwd"),
        ("parent", "../model.onnx.data"),
        ("nested_parent", "weights/../../x"),
    ] {
        let dir = workdir(case);
        let path = rewrite(&dir, |m| set_entry(first_external(m), "location", location));
        let msg = import_error(&path);
        assert!(msg.contains("inside the model's folder"), "{case}: {msg}");
    }

    // A symbolic link inside the folder that points outside it.
    let dir = workdir("symlink");
    let outside = dir.parent().unwrap().join("external_data_outside.bin");
    std::fs::copy(dir.join("model.onnx.data"), &outside).unwrap();
    std::os::unix::fs::symlink(&outside, dir.join("link.data")).unwrap();
    let path = rewrite(&dir, |m| {
        for t in m.graph.as_mut().unwrap().initializer.iter_mut() {
            if t.data_location == 1 {
                set_entry(t, "location", "link.data");
            }
        }
    });
    let msg = import_error(&path);
    assert!(msg.contains("outside the model's folder"), "{msg}");

    // Missing file.
    let dir = workdir("missing");
    std::fs::remove_file(dir.join("model.onnx.data")).unwrap();
    let msg = import_error(&dir.join("model.onnx"));
    assert!(msg.contains("cannot be read"), "{msg}");

    // A data file shorter than offset + length.
    let dir = workdir("short");
    let data = std::fs::read(dir.join("model.onnx.data")).unwrap();
    std::fs::write(dir.join("model.onnx.data"), &data[..data.len() - 1]).unwrap();
    let msg = import_error(&dir.join("model.onnx"));
    assert!(msg.contains("fewer than offset"), "{msg}");

    // A length larger than the import limit, in a sparse file that really is that long: refused
    // before anything is read or allocated.
    let dir = workdir("huge");
    let huge = (onnx::MAX_ONNX_BYTES as u64) + 1;
    std::fs::File::options()
        .write(true)
        .open(dir.join("model.onnx.data"))
        .unwrap()
        .set_len(huge)
        .unwrap();
    let path = rewrite(&dir, |m| {
        let t = first_external(m);
        set_entry(t, "offset", "0");
        set_entry(t, "length", &huge.to_string());
    });
    let msg = import_error(&path);
    assert!(msg.contains("import limit"), "{msg}");

    // A named pipe or a folder where the data file should be: refused, never opened (opening
    // a pipe with no writer would block the import forever).
    for case in ["fifo", "folder"] {
        let dir = workdir(case);
        let data = dir.join("model.onnx.data");
        std::fs::remove_file(&data).unwrap();
        if case == "fifo" {
            let made = std::process::Command::new("mkfifo")
                .arg(&data)
                .status()
                .unwrap();
            assert!(made.success());
        } else {
            std::fs::create_dir(&data).unwrap();
        }
        let msg = import_error(&dir.join("model.onnx"));
        assert!(msg.contains("is not a file"), "{case}: {msg}");
    }

    // A length that is not a number.
    let dir = workdir("garbled");
    let path = rewrite(&dir, |m| set_entry(first_external(m), "length", "12kB"));
    let msg = import_error(&path);
    assert!(msg.contains("not a byte count"), "{msg}");
}
