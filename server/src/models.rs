//! The served models: every `*.veil` file of the models directory, under its file stem.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use veil_format::CompiledModel;
use veil_format::compiled::ParamSet;
use veil_proto::v1;
use veil_runtime::keys::eval_key_bytes;
use veil_runtime::{FheModel, big_lwe_size};

use crate::error::{Result, ServiceError};

/// Largest Infer request the server decodes (16 MiB).
pub const MAX_REQUEST_BYTES: usize = 16 << 20;
/// Largest response the server encodes (64 MiB).
pub const MAX_RESPONSE_BYTES: usize = 64 << 20;

/// One served model: the executor, built once, and its public metadata.
pub struct ServedModel {
    pub name: String,
    pub params: ParamSet,
    pub n_features: usize,
    pub lwe_size: usize,
    /// Most samples one Infer request may carry for this model.
    pub max_batch: usize,
    pub fhe: Arc<FheModel>,
    pub info: v1::ModelInfo,
    /// Hex SHA-256 of the model file as served (`ModelInfo.model_digest`).
    pub digest: String,
}

/// All served models, by name.
pub struct Registry {
    pub models: BTreeMap<String, Arc<ServedModel>>,
    /// The distinct parameter sets of the served models.
    pub params: Vec<ParamSet>,
}

impl Registry {
    /// Loads every `*.veil` file in `dir` (blocking). A file that does not load stops the
    /// server with a message naming it, rather than being skipped silently. A request holds at
    /// most `max_batch` samples, and no more than fit `max_batch_bytes` of working memory.
    /// With `allow_empty`, a directory with no model is a server that serves none.
    pub fn load(
        dir: &Path,
        max_batch: usize,
        max_batch_bytes: u64,
        allow_empty: bool,
    ) -> Result<Self> {
        let entries = std::fs::read_dir(dir).map_err(|e| {
            ServiceError::io(format!("reading the models dir {}", dir.display()), e)
        })?;
        let mut paths: Vec<_> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "veil") && p.is_file())
            .collect();
        paths.sort();
        if paths.is_empty() && !allow_empty {
            return Err(ServiceError::InvalidRequest(format!(
                "no *.veil files in {}; compile a model with `veil compile`",
                dir.display()
            )));
        }
        let mut compiled = Vec::new();
        let mut params = Vec::new();
        for path in &paths {
            let name = path
                .file_stem()
                .and_then(|s| s.to_str())
                .ok_or_else(|| {
                    ServiceError::InvalidRequest(format!(
                        "{}: model file names must be UTF-8",
                        path.display()
                    ))
                })?
                .to_string();
            let cannot = |e: String| {
                ServiceError::InvalidRequest(format!("cannot serve {}: {e}", path.display()))
            };
            let size = std::fs::metadata(path)
                .map_err(|e| cannot(e.to_string()))?
                .len();
            if size > veil_format::compiled::MAX_MODEL_BYTES + 12 {
                return Err(cannot(format!("{size} bytes is too large")));
            }
            // The digest is of the very bytes the model is loaded from.
            let bytes = std::fs::read(path).map_err(|e| cannot(e.to_string()))?;
            let model = CompiledModel::from_bytes(&bytes).map_err(|e| cannot(e.to_string()))?;
            let digest = veil_format::digest::sha256_hex(&bytes);
            if !params.contains(&model.params) {
                params.push(model.params);
            }
            compiled.push((name, model, digest));
        }
        let mut models = BTreeMap::new();
        for (name, model, digest) in compiled {
            let key_bytes = eval_key_bytes(model.params);
            let served = ServedModel::new(
                name.clone(),
                model,
                digest,
                key_bytes,
                max_batch,
                max_batch_bytes,
            )?;
            tracing::info!(
                model = %name,
                features = served.n_features,
                outputs = served.info.n_outputs,
                pbs_per_sample = served.info.pbs_per_sample,
                max_batch = served.max_batch,
                working_mib_per_sample = served.fhe.working_bytes_per_sample() as f64 / 1048576.0,
                "serving model"
            );
            models.insert(name, Arc::new(served));
        }
        Ok(Registry { models, params })
    }

    pub fn get(&self, name: &str) -> Result<&Arc<ServedModel>> {
        self.models
            .get(name)
            .ok_or_else(|| ServiceError::UnknownModel {
                name: name.chars().take(200).collect(),
                served: self.models.keys().cloned().collect::<Vec<_>>().join(", "),
            })
    }

    /// The parameter set named `name`, if a served model uses it.
    pub fn param_set(&self, name: &str) -> Option<ParamSet> {
        self.params.iter().copied().find(|p| p.name() == name)
    }
}

impl ServedModel {
    fn new(
        name: String,
        model: CompiledModel,
        digest: String,
        eval_key_bytes: u64,
        max_batch: usize,
        max_batch_bytes: u64,
    ) -> Result<Self> {
        let spec = model.client_spec();
        let params = model.params;
        let n_features = model.n_inputs();
        let n_outputs = model.n_outputs();
        let lwe_size = big_lwe_size(params);
        let fhe = Arc::new(FheModel::new(model)?);
        // Keep every request and response inside the message-size limits, and its
        // evaluation inside the working-memory bound (estimated from the plan).
        let in_bytes = 64 + 8 * n_features + 16;
        let out_bytes = 64
            + veil_format::compiled::output_wire_bytes(
                n_outputs,
                lwe_size,
                spec.output.modulus_bits,
            );
        let per_sample = fhe.working_bytes_per_sample().max(1);
        let max_batch = max_batch
            .min((MAX_REQUEST_BYTES - 4096) / in_bytes)
            .min((MAX_RESPONSE_BYTES - 4096) / out_bytes)
            .min((max_batch_bytes / per_sample).min(usize::MAX as u64) as usize)
            .max(1);
        let info = v1::ModelInfo {
            name: name.clone(),
            input_shape: spec.input_shape.iter().map(|&d| d as u64).collect(),
            input: Some(v1::InputEncoding {
                features: spec
                    .input
                    .quant
                    .iter()
                    .map(|q| v1::FeatureQuant {
                        scale: q.scale,
                        zero: q.zero,
                        max_q: q.max_q,
                    })
                    .collect(),
                delta: spec.input.delta,
                windows: spec
                    .input
                    .windows
                    .iter()
                    .map(|w| v1::InputWindow {
                        feature: w.feature,
                        offset: w.offset,
                    })
                    .collect(),
            }),
            n_outputs: n_outputs as u32,
            output: Some(v1::OutputDecoding {
                delta: spec.output.delta,
                scale: spec.output.scale.clone(),
                offset: spec.output.offset.clone(),
                modulus_bits: spec.output.modulus_bits,
            }),
            tail: spec.tail.iter().map(|t| format!("{t:?}")).collect(),
            class_labels: spec.class_labels.clone().unwrap_or_default(),
            parameter_set: params.name().to_string(),
            lwe_size: lwe_size as u64,
            pbs_per_sample: spec.pbs_per_sample as u64,
            eval_key_bytes,
            client_spec_json: serde_json::to_string(&spec)
                .map_err(|e| ServiceError::Internal(format!("client spec to JSON: {e}")))?,
            max_batch: max_batch as u32,
            task: spec.task.name().to_string(),
            reveal: spec.reveal.name().to_string(),
            model_digest: digest.clone(),
        };
        Ok(ServedModel {
            name,
            params,
            n_features,
            lwe_size,
            max_batch,
            fhe,
            info,
            digest,
        })
    }
}
