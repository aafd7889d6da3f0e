//! ONNX external data: tensors whose bytes live in a file beside the model. torch.onnx.export
//! (the dynamo exporter, the default since torch 2.9) writes `model.onnx` plus
//! `model.onnx.data` this way, keeping only small tensors inline.
//!
//! The file named by a tensor's `location` is read relative to the model's folder; `offset`
//! and `length` select its bytes. A location may not leave that folder (absolute paths, `..`,
//! or a symbolic link pointing elsewhere), and all the data read counts against the one size
//! limit of an ONNX import.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};

use super::pb;
use crate::error::{ModelError, Result};

/// `TensorProto.DataLocation.EXTERNAL`.
pub(crate) const EXTERNAL: i32 = 1;

/// Replaces every external tensor's reference by its bytes read from `dir`. `budget` is how
/// many bytes of external data the import may still read.
pub(crate) fn resolve(model: &mut pb::ModelProto, dir: &Path, budget: u64) -> Result<()> {
    let Some(graph) = model.graph.as_mut() else {
        return Ok(());
    };
    let mut reader = Reader {
        dir,
        canonical_dir: None,
        files: HashMap::new(),
        left: budget,
        limit: budget,
    };
    for t in graph.initializer.iter_mut() {
        reader.load(t)?;
    }
    for node in graph.node.iter_mut() {
        for a in node.attribute.iter_mut() {
            if let Some(t) = a.t.as_mut() {
                reader.load(t)?;
            }
        }
    }
    Ok(())
}

/// The error for a tensor that names external data when no folder is known.
pub(crate) fn unreadable(t: &pb::TensorProto) -> ModelError {
    let location = entry(t, "location").unwrap_or("?");
    ModelError::InvalidOnnx(format!(
        "tensor '{}': data is stored in the external file '{location}'; import the model from \
         its file path so that the data file beside it can be read",
        t.name
    ))
}

struct Reader<'a> {
    dir: &'a Path,
    canonical_dir: Option<PathBuf>,
    /// Opened files and their lengths, by location.
    files: HashMap<String, (File, u64)>,
    left: u64,
    limit: u64,
}

fn entry<'t>(t: &'t pb::TensorProto, key: &str) -> Option<&'t str> {
    t.external_data
        .iter()
        .rev()
        .find(|e| e.key == key)
        .map(|e| e.value.as_str())
}

impl Reader<'_> {
    fn load(&mut self, t: &mut pb::TensorProto) -> Result<()> {
        if t.data_location != EXTERNAL {
            return Ok(());
        }
        let bad = |why: String| ModelError::InvalidOnnx(format!("tensor '{}': {why}", t.name));
        let location = entry(t, "location")
            .filter(|l| !l.is_empty())
            .ok_or_else(|| bad("external data without a location".into()))?
            .to_string();
        let number = |key: &str| -> Result<Option<u64>> {
            entry(t, key)
                .map(|v| {
                    v.trim()
                        .parse::<u64>()
                        .map_err(|_| bad(format!("external data {key} '{v}' is not a byte count")))
                })
                .transpose()
        };
        let offset = number("offset")?.unwrap_or(0);
        let length = number("length")?;
        let file_len = self.open(&location).map_err(bad)?;
        let length = match length {
            Some(l) => l,
            None => file_len.checked_sub(offset).ok_or_else(|| {
                bad(format!(
                    "external data offset {offset} is past the end of '{location}' ({file_len} bytes)"
                ))
            })?,
        };
        let end = offset
            .checked_add(length)
            .filter(|&e| e <= file_len)
            .ok_or_else(|| {
                bad(format!(
                    "external data '{location}' holds {file_len} bytes, fewer than offset \
                     {offset} + length {length}"
                ))
            })?;
        if length > self.left {
            return Err(bad(format!(
                "the model's external data exceeds the {} byte import limit",
                self.limit
            )));
        }
        self.left -= length;
        let mut bytes = vec![0u8; length as usize];
        let (file, _) = self.files.get_mut(&location).expect("opened above");
        file.seek(SeekFrom::Start(offset))
            .and_then(|_| file.read_exact(&mut bytes))
            .map_err(|e| {
                bad(format!(
                    "reading bytes {offset}..{end} of '{location}': {e}"
                ))
            })?;
        t.raw_data = bytes;
        t.data_location = 0;
        t.external_data.clear();
        Ok(())
    }

    /// Opens a location once, refusing any that could leave the model's folder.
    fn open(&mut self, location: &str) -> Result<u64, String> {
        if !self.files.contains_key(location) {
            let rel = Path::new(location);
            if rel.is_absolute()
                || rel
                    .components()
                    .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
            {
                return Err(format!(
                    "external data location '{location}' must be a path inside the model's \
                     folder (no absolute path, no '..')"
                ));
            }
            let path = self.dir.join(rel);
            let missing = |e: std::io::Error| {
                format!(
                    "external data file '{}' cannot be read: {e}",
                    path.display()
                )
            };
            let real = path.canonicalize().map_err(missing)?;
            if self.canonical_dir.is_none() {
                self.canonical_dir = Some(self.dir.canonicalize().map_err(missing)?);
            }
            if !real.starts_with(self.canonical_dir.as_ref().expect("set above")) {
                return Err(format!(
                    "external data file '{}' resolves outside the model's folder",
                    path.display()
                ));
            }
            // Checked before opening: opening a named pipe would block.
            if !std::fs::metadata(&real).map_err(missing)?.is_file() {
                return Err(format!(
                    "external data location '{}' is not a file",
                    path.display()
                ));
            }
            let file = File::open(&real).map_err(missing)?;
            let len = file.metadata().map_err(missing)?.len();
            self.files.insert(location.to_string(), (file, len));
        }
        Ok(self.files[location].1)
    }
}
