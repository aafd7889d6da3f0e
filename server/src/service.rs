//! The `veil.v1.Veil` service: validates requests, calls the engine off the async runtime,
//! encodes the results. Errors go through [`crate::status`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tonic::{Request, Response, Status, Streaming};
use veil_models::compiled::ParamSet;
use veil_models::fhe::EncryptedInput;
use veil_models::fhe::keys::MAX_EVAL_KEY_BYTES;
use veil_proto::v1;
use veil_proto::v1::upload_key_request::Part;

use crate::batcher::{BatchPolicy, Batcher};
use crate::error::{Result, ServiceError};
use crate::key_store::{KeyStore, StoredKey, check_key_id, short};
use crate::models::Registry;

/// Limits of the service, besides the message sizes set on the transport.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Most evaluations running at once; more requests wait their turn.
    pub concurrent_inferences: usize,
    /// Most uploads being received at once (each buffers up to the key size limit).
    pub concurrent_uploads: usize,
    /// An upload that sends nothing for this long is dropped.
    pub upload_idle_timeout: Duration,
    /// How requests for the same model and key are merged into one evaluation.
    pub batching: BatchPolicy,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            concurrent_inferences: 2,
            concurrent_uploads: 2,
            upload_idle_timeout: Duration::from_secs(60),
            batching: BatchPolicy::default(),
        }
    }
}

pub struct VeilService {
    models: Arc<Registry>,
    keys: Arc<KeyStore>,
    limits: Limits,
    batcher: Arc<Batcher>,
    upload_permits: Arc<Semaphore>,
}

impl VeilService {
    pub fn new(models: Arc<Registry>, keys: Arc<KeyStore>, limits: Limits) -> Self {
        VeilService {
            batcher: Batcher::new(
                limits.batching.clone(),
                Arc::new(Semaphore::new(limits.concurrent_inferences.max(1))),
            ),
            upload_permits: Arc::new(Semaphore::new(limits.concurrent_uploads.max(1))),
            models,
            keys,
            limits,
        }
    }

    fn key_info(k: StoredKey) -> v1::KeyInfo {
        v1::KeyInfo {
            key_id: k.id,
            parameter_set: k.params.name().to_string(),
            size_bytes: k.size,
            newly_stored: k.newly_stored,
        }
    }

    async fn upload(&self, mut stream: Streaming<v1::UploadKeyRequest>) -> Result<v1::KeyInfo> {
        let _permit = self
            .upload_permits
            .acquire()
            .await
            .map_err(|_| ServiceError::Internal("upload semaphore closed".into()))?;
        let mut candidates: Vec<ParamSet> = self.models.params.clone();
        let mut declared: Option<u64> = None;
        let mut bytes: Vec<u8> = Vec::new();
        let mut first = true;
        loop {
            let next = tokio::time::timeout(self.limits.upload_idle_timeout, stream.message())
                .await
                .map_err(|_| {
                    ServiceError::Stalled(format!(
                        "upload stalled: no data for {} s after {} bytes",
                        self.limits.upload_idle_timeout.as_secs(),
                        bytes.len()
                    ))
                })?;
            let msg = match next {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(status) => {
                    tracing::info!(%status, "upload stream ended with an error");
                    return Err(ServiceError::InvalidRequest(format!(
                        "upload stream broken after {} bytes: {}",
                        bytes.len(),
                        status.message()
                    )));
                }
            };
            match msg.part {
                Some(Part::Header(h)) => {
                    if !first {
                        return Err(ServiceError::InvalidRequest(
                            "the upload header must be the first message".into(),
                        ));
                    }
                    if !h.parameter_set.is_empty() {
                        let p = self.models.param_set(&h.parameter_set).ok_or_else(|| {
                            ServiceError::WrongParameterSet(format!(
                                "the server has no model for parameter set '{}'; it serves {}",
                                h.parameter_set.chars().take(100).collect::<String>(),
                                self.served_param_names()
                            ))
                        })?;
                        candidates = vec![p];
                    }
                    if h.total_bytes > 0 {
                        if h.total_bytes > MAX_EVAL_KEY_BYTES {
                            return Err(too_large(h.total_bytes));
                        }
                        bytes.reserve_exact(h.total_bytes as usize);
                        declared = Some(h.total_bytes);
                    }
                }
                Some(Part::Chunk(chunk)) => {
                    let total = bytes.len() as u64 + chunk.len() as u64;
                    if total > MAX_EVAL_KEY_BYTES {
                        return Err(too_large(total));
                    }
                    if declared.is_some_and(|d| total > d) {
                        return Err(ServiceError::InvalidRequest(format!(
                            "upload sent more than the {} bytes its header declared",
                            declared.unwrap_or_default()
                        )));
                    }
                    bytes.extend_from_slice(&chunk);
                }
                None => {
                    return Err(ServiceError::InvalidRequest(
                        "upload message with neither header nor chunk".into(),
                    ));
                }
            }
            first = false;
        }
        if bytes.is_empty() {
            return Err(ServiceError::InvalidRequest(
                "the upload carried no key bytes".into(),
            ));
        }
        if let Some(d) = declared
            && d != bytes.len() as u64
        {
            return Err(ServiceError::InvalidRequest(format!(
                "truncated upload: received {} of the {d} bytes the header declared",
                bytes.len()
            )));
        }
        let keys = Arc::clone(&self.keys);
        let t = Instant::now();
        let stored = tokio::task::spawn_blocking(move || keys.store(&bytes, &candidates))
            .await
            .map_err(|e| ServiceError::Internal(format!("key validation task failed: {e}")))??;
        tracing::info!(
            key = %short(&stored.id),
            bytes = stored.size,
            newly_stored = stored.newly_stored,
            ms = t.elapsed().as_millis() as u64,
            "key upload"
        );
        Ok(Self::key_info(stored))
    }

    async fn infer(&self, req: v1::InferRequest) -> Result<v1::InferResponse> {
        let model = Arc::clone(self.models.get(&req.model)?);
        let n = req.samples.len();
        if n == 0 {
            return Err(ServiceError::InvalidRequest(
                "the request has no samples".into(),
            ));
        }
        if n > model.max_batch {
            return Err(ServiceError::TooLarge(format!(
                "{n} samples in one request; model '{}' takes at most {} per request",
                model.name, model.max_batch
            )));
        }
        check_key_id(&req.key_id)?;
        // Decode (and size-check) every ciphertext before touching the key or the CPU.
        let inputs = req
            .samples
            .iter()
            .enumerate()
            .map(|(i, bytes)| decode_sample(i, bytes, model.n_features, model.lwe_size))
            .collect::<Result<Vec<_>>>()?;
        let key = self
            .keys
            .get(&req.key_id, model.params, &self.models.params)
            .await?;
        let reply = self
            .batcher
            .submit(Arc::clone(&model), &req.key_id, key, inputs)
            .await?;
        tracing::info!(
            model = %model.name,
            samples = n,
            batch_samples = reply.batch_samples,
            key = %short(&req.key_id),
            eval_ms = reply.eval.as_millis() as u64,
            "infer"
        );
        Ok(v1::InferResponse {
            outputs: reply.outputs.iter().map(|o| o.to_bytes()).collect(),
            eval_micros: reply.eval.as_micros() as u64,
            merged_samples: reply.batch_samples as u32,
        })
    }

    fn served_param_names(&self) -> String {
        self.models
            .params
            .iter()
            .map(|p| p.name())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn too_large(bytes: u64) -> ServiceError {
    ServiceError::TooLarge(format!(
        "evaluation key upload of {bytes} bytes exceeds the limit of {MAX_EVAL_KEY_BYTES} bytes"
    ))
}

/// Decodes one sample's ciphertexts, naming the sample and the expected count on failure.
fn decode_sample(
    i: usize,
    bytes: &[u8],
    n_features: usize,
    lwe_size: usize,
) -> Result<EncryptedInput> {
    EncryptedInput::from_bytes(bytes, n_features, lwe_size).map_err(|e| {
        // The seeded wire form holds one 8-byte body per ciphertext: a payload longer than
        // n_features of them is a wrong count, not just garbage.
        let why = if bytes.len() > 64 + 8 * n_features {
            format!(
                "{} bytes is more than {n_features} ciphertexts take; the model takes \
                 {n_features} input ciphertexts ({e})",
                bytes.len()
            )
        } else {
            e.to_string()
        };
        match e {
            veil_models::ModelError::Shape(_) => {
                ServiceError::Model(veil_models::ModelError::Shape(format!("sample {i}: {why}")))
            }
            _ => ServiceError::Model(veil_models::ModelError::Crypto(format!(
                "sample {i}: {why}"
            ))),
        }
    })
}

#[tonic::async_trait]
impl v1::veil_server::Veil for VeilService {
    async fn list_models(
        &self,
        _req: Request<v1::ListModelsRequest>,
    ) -> Result<Response<v1::ListModelsResponse>, Status> {
        Ok(Response::new(v1::ListModelsResponse {
            models: self
                .models
                .models
                .values()
                .map(|m| m.info.clone())
                .collect(),
        }))
    }

    async fn get_key(
        &self,
        req: Request<v1::GetKeyRequest>,
    ) -> Result<Response<v1::KeyInfo>, Status> {
        let id = req.into_inner().key_id;
        let found = self.keys.find(&id, &self.models.params)?;
        match found {
            Some(k) => Ok(Response::new(Self::key_info(k))),
            None => Err(ServiceError::UnknownKey(id).into()),
        }
    }

    async fn upload_key(
        &self,
        req: Request<Streaming<v1::UploadKeyRequest>>,
    ) -> Result<Response<v1::KeyInfo>, Status> {
        Ok(Response::new(self.upload(req.into_inner()).await?))
    }

    async fn infer(
        &self,
        req: Request<v1::InferRequest>,
    ) -> Result<Response<v1::InferResponse>, Status> {
        Ok(Response::new(self.infer(req.into_inner()).await?))
    }
}
