//! Encrypted-model mode, the owner's side as a service: the owner key this server holds
//! (`--owner-keys DIR`, a `veil keygen` directory in which `veil compile --encrypt-model`
//! kept each model's clear copy) decrypts results of those models for whoever ran them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use veil_format::CompiledModel;
use veil_format::tail::{Reveal, Task};
use veil_proto::v1;
use veil_runtime::encrypted_model::{EncryptedResults, owner_model_path};
use veil_runtime::key_dir::KeyPair;

use crate::error::{Result, ServiceError};

/// Clear models kept in memory; more are read again from disk.
const CACHED_MODELS: usize = 16;

pub struct Owner {
    keys: KeyPair,
    dir: PathBuf,
    /// Answer only the class, even for a model whose results reveal scores.
    labels_only: bool,
    models: Mutex<HashMap<String, Arc<CompiledModel>>>,
}

impl Owner {
    /// Loads the owner key directory (blocking).
    pub fn load(dir: &Path, labels_only: bool) -> Result<Self> {
        let keys = KeyPair::load(dir)?;
        Ok(Owner {
            keys,
            dir: dir.to_path_buf(),
            labels_only,
            models: Mutex::new(HashMap::new()),
        })
    }

    pub fn key_id(&self) -> &str {
        &self.keys.key_id
    }

    /// The digest the results name, checked to be this key's, before any work.
    pub fn model_digest(&self, results: &[u8]) -> Result<String> {
        let (digest, key_id) = EncryptedResults::names(results)?;
        if key_id != self.keys.key_id {
            return Err(ServiceError::InvalidRequest(format!(
                "these results were computed for key {key_id}; this server decrypts for key {} \
                 only",
                self.keys.key_id
            )));
        }
        owner_model_path(&self.dir, &digest)?;
        Ok(digest)
    }

    /// The clear model behind encrypted model `digest` (a hex digest already checked).
    fn model(&self, digest: &str) -> Result<Arc<CompiledModel>> {
        if let Some(m) = self.models.lock().expect("cache lock").get(digest) {
            return Ok(Arc::clone(m));
        }
        let path = owner_model_path(&self.dir, digest)?;
        if !path.is_file() {
            return Err(ServiceError::UnknownModel {
                name: digest.to_string(),
                served: "the encrypted models of this server's owner key".into(),
            });
        }
        let model = Arc::new(CompiledModel::load(&path)?);
        let mut cache = self.models.lock().expect("cache lock");
        if cache.len() >= CACHED_MODELS {
            cache.clear();
        }
        cache.insert(digest.to_string(), Arc::clone(&model));
        Ok(model)
    }

    /// Decrypts every row of a results file of model `digest` (blocking: tens of
    /// microseconds per row).
    pub fn decrypt(&self, digest: &str, results: &[u8]) -> Result<v1::DecryptResponse> {
        let model = self.model(digest)?;
        let parsed = EncryptedResults::from_bytes(
            results,
            model.params,
            model.n_outputs(),
            model.output.decoding.modulus_bits,
        )?;
        let accs = parsed.decrypt(&self.keys.client, &self.keys.key_id, &model)?;
        // A regressor's prediction is its values; a classifier's scores only when allowed.
        let scores =
            model.task == Task::Regression || (model.reveal == Reveal::Scores && !self.labels_only);
        let predictions = accs
            .iter()
            .enumerate()
            .map(|(i, acc)| {
                let p = model.decode(acc).map_err(|e| {
                    ServiceError::InvalidRequest(format!(
                        "row {i}: the decrypted output is not a prediction of this model ({e})"
                    ))
                })?;
                Ok(v1::Prediction {
                    label: if model.task == Task::Regression {
                        0
                    } else {
                        p.label
                    },
                    outputs: if scores { p.outputs } else { Vec::new() },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(v1::DecryptResponse {
            model_digest: digest.to_string(),
            reveal: if scores { "scores" } else { "label" }.to_string(),
            predictions,
        })
    }
}
