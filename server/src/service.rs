//! The `veil.v1.Veil` service: authenticates the caller, validates requests, calls the
//! engine off the async runtime, encodes the results. Errors go through [`crate::status`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use tonic::metadata::{Ascii, MetadataMap, MetadataValue};
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;
use veil_format::compiled::ParamSet;
use veil_proto::KEY_ID_HEADER;
use veil_proto::v1;
use veil_proto::v1::upload_key_request::Part;
use veil_runtime::EncryptedInput;
use veil_runtime::keys::MAX_EVAL_KEY_BYTES;

use crate::batcher::{BatchPolicy, Batcher, Job, QueuePolicy};
use crate::error::{Result, ServiceError};
use crate::gate::Caller;
use crate::key_store::{KeyStore, Quota, StoredKey, check_key_id, key_id, short};
use crate::metrics::{GaugeGuard, Metrics};
use crate::models::Registry;
use crate::owner::Owner;
use crate::scheduler::EvalGate;
use crate::status::code_of;
use crate::tenants::Tenant;

/// Limits of the service, besides the message sizes set on the transport.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Most evaluations running at once; more requests wait their turn.
    pub concurrent_inferences: usize,
    /// Most Infer requests waiting for an evaluation slot; one more gets RESOURCE_EXHAUSTED.
    pub max_queue: usize,
    /// Most uploads being received and validated at once (each buffers up to the key size
    /// limit, then expands the key).
    pub concurrent_uploads: usize,
    /// An upload that sends nothing for this long is dropped.
    pub upload_idle_timeout: Duration,
    /// An upload that has not finished arriving after this long is dropped.
    pub upload_timeout: Duration,
    /// After `upload_rate_grace`, an upload averaging fewer bytes per second than this is
    /// dropped (0: no minimum), so a slow client cannot hold a receive slot for long.
    pub upload_min_rate: u64,
    pub upload_rate_grace: Duration,
    /// Most uploads being received at once (each buffers up to the key size limit); the
    /// validation permit (`concurrent_uploads`) is taken only once all bytes are in.
    pub max_receiving_uploads: usize,
    /// How requests for the same model and key are merged into one evaluation.
    pub batching: BatchPolicy,
    /// A request that waited this long for an evaluation is answered UNAVAILABLE.
    pub max_queue_wait: Option<Duration>,
    /// Threads of each evaluation's pool; 0: the machine's cores.
    pub threads_per_evaluation: usize,
    /// Test hook: evaluations wait at this gate, running, until the test opens it.
    pub eval_gate: Option<Arc<EvalGate>>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            concurrent_inferences: 2,
            max_queue: 64,
            concurrent_uploads: 2,
            upload_idle_timeout: Duration::from_secs(60),
            upload_timeout: Duration::from_secs(600),
            upload_min_rate: 100_000,
            upload_rate_grace: Duration::from_secs(10),
            max_receiving_uploads: 16,
            batching: BatchPolicy::default(),
            max_queue_wait: None,
            threads_per_evaluation: 0,
            eval_gate: None,
        }
    }
}

pub struct VeilService {
    models: Arc<Registry>,
    keys: Arc<KeyStore>,
    metrics: Arc<Metrics>,
    limits: Limits,
    batcher: Arc<Batcher>,
    upload_permits: Arc<Semaphore>,
    receiving: Arc<Semaphore>,
    /// The model owner's key, when this server decrypts for one (`--owner-keys`).
    owner: Option<Arc<Owner>>,
}

impl VeilService {
    pub fn new(
        models: Arc<Registry>,
        keys: Arc<KeyStore>,
        metrics: Arc<Metrics>,
        limits: Limits,
    ) -> Self {
        VeilService {
            batcher: Batcher::new(
                limits.batching.clone(),
                QueuePolicy {
                    concurrent: limits.concurrent_inferences,
                    max_queue: limits.max_queue,
                    max_queue_wait: limits.max_queue_wait,
                    threads_per_evaluation: match limits.threads_per_evaluation {
                        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
                        n => n,
                    },
                    gate: limits.eval_gate.clone(),
                },
                Arc::clone(&keys),
                Arc::clone(&metrics),
            ),
            upload_permits: Arc::new(Semaphore::new(limits.concurrent_uploads.max(1))),
            receiving: Arc::new(Semaphore::new(limits.max_receiving_uploads.max(1))),
            models,
            keys,
            metrics,
            limits,
            owner: None,
        }
    }

    /// Serves Decrypt with `owner`'s key (encrypted-model mode).
    pub fn with_owner(mut self, owner: Option<Arc<Owner>>) -> Self {
        self.owner = owner;
        self
    }

    async fn decrypt(&self, tenant: &Tenant, results: Vec<u8>) -> Result<v1::DecryptResponse> {
        let Some(owner) = self.owner.clone() else {
            return Err(ServiceError::NotConfigured(
                "this server holds no model owner's key: it decrypts nothing (start it with \
                 --owner-keys)"
                    .into(),
            ));
        };
        let digest = owner.model_digest(&results)?;
        if !tenant.may_use(&digest) {
            return Err(ServiceError::PermissionDenied(format!(
                "tenant '{}' may not decrypt results of model {digest}",
                tenant.label()
            )));
        }
        tokio::task::spawn_blocking(move || owner.decrypt(&digest, &results))
            .await
            .map_err(|e| ServiceError::Internal(format!("decryption task failed: {e}")))?
    }

    /// The caller's tenant, authenticated (and its rate spent) by the [`Gate`] before the
    /// body was decoded.
    fn tenant<T>(&self, req: &Request<T>) -> Result<Arc<Tenant>> {
        req.extensions()
            .get::<Caller>()
            .map(|c| Arc::clone(&c.0))
            .ok_or_else(|| {
                ServiceError::Internal("a call reached the service without the gate".into())
            })
    }

    fn key_info(k: StoredKey) -> v1::KeyInfo {
        v1::KeyInfo {
            key_id: k.id,
            parameter_set: k.params.name().to_string(),
            size_bytes: k.size,
            newly_stored: k.newly_stored,
        }
    }

    async fn upload(
        &self,
        tenant: Arc<Tenant>,
        routed: Option<String>,
        stream: Streaming<v1::UploadKeyRequest>,
    ) -> Result<v1::KeyInfo> {
        // Receiving holds a receive slot only (refused at once when all are taken: each
        // buffers up to the key size); slow senders are cut by the minimum rate.
        let receiving = Arc::clone(&self.receiving)
            .try_acquire_owned()
            .map_err(|_| {
                ServiceError::Exhausted(format!(
                    "the server is busy: {} uploads are already arriving; retry later",
                    self.limits.max_receiving_uploads
                ))
            })?;
        let counted = GaugeGuard::new(&self.metrics.uploads_receiving);
        let overall = self.limits.upload_timeout;
        let (bytes, candidates) = tokio::time::timeout(overall, self.receive(stream))
            .await
            .map_err(|_| {
                ServiceError::Stalled(format!(
                    "upload took longer than the server's limit of {} s",
                    overall.as_secs()
                ))
            })??;
        drop((receiving, counted));
        // The validation permit is taken once the bytes are in; the validation task owns it,
        // so an upload cancelled mid-validation still counts until the work stops.
        let permit = Arc::clone(&self.upload_permits)
            .acquire_owned()
            .await
            .map_err(|_| ServiceError::Internal("upload semaphore closed".into()))?;
        self.validate_and_store(tenant, routed, permit, bytes, candidates)
            .await
    }

    /// Receives an upload's key bytes, with the idle timeout and the size limit.
    async fn receive(
        &self,
        mut stream: Streaming<v1::UploadKeyRequest>,
    ) -> Result<(Vec<u8>, Vec<ParamSet>)> {
        let mut candidates: Vec<ParamSet> = self.models.params.clone();
        let mut declared: Option<u64> = None;
        let mut bytes: Vec<u8> = Vec::new();
        let mut first = true;
        let start = Instant::now();
        let (min_rate, grace) = (self.limits.upload_min_rate, self.limits.upload_rate_grace);
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
                    let elapsed = start.elapsed();
                    if min_rate > 0
                        && elapsed > grace
                        && (bytes.len() as f64) < min_rate as f64 * elapsed.as_secs_f64()
                    {
                        return Err(ServiceError::Stalled(format!(
                            "upload too slow: {} bytes in {:.1} s, below the server's minimum \
                             of {min_rate} bytes/s",
                            bytes.len(),
                            elapsed.as_secs_f64()
                        )));
                    }
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
        Ok((bytes, candidates))
    }

    async fn validate_and_store(
        &self,
        tenant: Arc<Tenant>,
        routed: Option<String>,
        permit: OwnedSemaphorePermit,
        bytes: Vec<u8>,
        candidates: Vec<ParamSet>,
    ) -> Result<v1::KeyInfo> {
        let keys = Arc::clone(&self.keys);
        let t = Instant::now();
        let quota = Quota {
            max_keys: tenant.max_keys,
            max_bytes: tenant.max_key_bytes,
        };
        let owner = tenant.name.clone();
        let span = tracing::Span::current();
        let stored = tokio::task::spawn_blocking(move || {
            let _span = span.enter();
            let _permit = permit;
            // Hashing 30 MB takes tens of milliseconds: here, off the async runtime.
            if routed.is_some() {
                check_routing(routed.as_deref(), &key_id(&bytes))?;
            }
            keys.store(&owner, &bytes, &candidates, quota)
        })
        .await
        .map_err(|e| ServiceError::Internal(format!("key validation task failed: {e}")))??;
        tracing::info!(
            tenant = %tenant.label(),
            key = %short(&stored.id),
            bytes = stored.size,
            newly_stored = stored.newly_stored,
            ms = t.elapsed().as_millis() as u64,
            "key upload"
        );
        Ok(Self::key_info(stored))
    }

    async fn infer(
        &self,
        tenant: Arc<Tenant>,
        deadline: Option<Instant>,
        request_id: String,
        req: v1::InferRequest,
    ) -> Result<v1::InferResponse> {
        // Permission first, so a restricted tenant learns nothing of other models, and the
        // list in NOT_FOUND names only the models it may use.
        tenant.check_model(&req.model)?;
        let model = match self.models.get(&req.model) {
            Ok(m) => Arc::clone(m),
            Err(ServiceError::UnknownModel { name, .. }) => {
                return Err(ServiceError::UnknownModel {
                    name,
                    served: self
                        .models
                        .models
                        .keys()
                        .filter(|m| tenant.may_use(m))
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
            Err(e) => return Err(e),
        };
        // A client that encoded for another build of this model would decode garbage.
        if !req.model_digest.is_empty() && !req.model_digest.eq_ignore_ascii_case(&model.digest) {
            return Err(ServiceError::StaleModel(format!(
                "model '{}' is now {} (the request names {}); fetch its metadata again \
                 (ListModels) and re-encrypt",
                model.name,
                model.digest,
                req.model_digest.chars().take(64).collect::<String>()
            )));
        }
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
        // Check that every ciphertext decodes before queueing; the decoded form is dropped
        // (the evaluation decodes again once it has a slot), so a waiting request holds only
        // its wire bytes.
        for (i, bytes) in req.samples.iter().enumerate() {
            decode_sample(i, bytes, model.n_features, model.lwe_size)?;
        }
        match self
            .keys
            .find(&tenant.name, &req.key_id, &self.models.params)
            .await?
        {
            None => return Err(ServiceError::UnknownKey(req.key_id)),
            Some(k) if k.params != model.params => {
                return Err(ServiceError::WrongParameterSet(format!(
                    "key {} is for {}, the model uses {}; generate a key for {}",
                    req.key_id,
                    k.params.name(),
                    model.params.name(),
                    model.params.name()
                )));
            }
            Some(_) => {}
        }
        if deadline.is_some_and(|d| d <= Instant::now()) {
            return Err(ServiceError::DeadlineExceeded(
                "the request's deadline passed before it was queued".into(),
            ));
        }
        let key_id = req.key_id;
        let tenant_slot = Some(tenant.admit()?);
        // Work, not calls: a 256-sample request spends 256 times a one-sample one. Spent last,
        // once the request is known to be valid.
        tenant.check_work(n as u64 * model.info.pbs_per_sample.max(1))?;
        let reply = self
            .batcher
            .submit(Job {
                model: Arc::clone(&model),
                owner: tenant.name.clone(),
                key_id: key_id.clone(),
                samples: req.samples,
                deadline,
                tenant_slot,
                request_id,
            })
            .await?;
        tracing::info!(
            tenant = %tenant.label(),
            model = %model.name,
            samples = n,
            batch_samples = reply.batch_samples,
            key = %short(&key_id),
            eval_ms = reply.eval.as_millis() as u64,
            "infer"
        );
        Ok(v1::InferResponse {
            outputs: reply.outputs.iter().map(|o| o.to_bytes()).collect(),
            eval_micros: reply.eval.as_micros() as u64,
            merged_samples: reply.batch_samples as u32,
        })
    }

    /// Runs one call of `method`, counting it and its status code in the metrics.
    /// Every log line of the call carries its request id (a tracing span), and so does the
    /// answer's metadata (`x-request-id`), success or error.
    async fn observed<T>(
        &self,
        method: &'static str,
        id: MetadataValue<Ascii>,
        f: impl std::future::Future<Output = Result<T>>,
    ) -> Result<Response<T>, Status> {
        let span = tracing::info_span!(
            "request",
            request_id = id.to_str().unwrap_or_default(),
            method
        );
        async move {
            let call = self.metrics.call(method);
            match f.await {
                Ok(v) => {
                    call.finish(tonic::Code::Ok);
                    let mut r = Response::new(v);
                    r.metadata_mut().insert(REQUEST_ID, id);
                    Ok(r)
                }
                Err(e) => {
                    call.finish(code_of(&e));
                    let mut status: Status = e.into();
                    status.metadata_mut().insert(REQUEST_ID, id);
                    Err(status)
                }
            }
        }
        .instrument(span)
        .await
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
            veil_runtime::RuntimeError::Shape(_) => ServiceError::Runtime(
                veil_runtime::RuntimeError::Shape(format!("sample {i}: {why}")),
            ),
            _ => ServiceError::Runtime(veil_runtime::RuntimeError::Crypto(format!(
                "sample {i}: {why}"
            ))),
        }
    })
}

/// Metadata key of a call's request id, in the request (optional) and in every answer.
pub const REQUEST_ID: &str = "x-request-id";

/// The caller's `x-request-id` when it is a short, plain token (a proxy's id, kept so logs
/// join up), else a fresh one: the process start and a counter, unique per server run.
fn request_id(metadata: &MetadataMap) -> MetadataValue<Ascii> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    static START: OnceLock<u64> = OnceLock::new();
    if let Some(v) = metadata.get(REQUEST_ID)
        && let Ok(s) = v.to_str()
        && (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
    {
        return v.clone();
    }
    let start = START.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64)
    });
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{start:x}-{n:x}")
        .parse()
        .expect("hex digits and a dash are valid metadata")
}

/// The key id a call's routing header names (`veil-key-id`), if it has one. A load balancer
/// hashes on the header, so a body naming another key would be served by a replica that does
/// not cache it: the two must agree.
fn routing_key(metadata: &MetadataMap) -> Result<Option<String>> {
    let mut values = metadata.get_all(KEY_ID_HEADER).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    let id = first.to_str().map_err(|_| {
        ServiceError::InvalidRequest(format!("the {KEY_ID_HEADER} header is not text"))
    })?;
    if values.any(|v| v != first) {
        return Err(ServiceError::InvalidRequest(format!(
            "the {KEY_ID_HEADER} header is given more than once, with different values"
        )));
    }
    Ok(Some(id.to_string()))
}

/// INVALID_ARGUMENT when the routing header names another key than `key_id`.
fn check_routing(routed: Option<&str>, key_id: &str) -> Result<()> {
    match routed {
        Some(r) if r != key_id => Err(ServiceError::InvalidRequest(format!(
            "the {KEY_ID_HEADER} header ({}) names another key than the request ({}); a load \
             balancer routes on the header, so both must be the same key id",
            r.chars().take(80).collect::<String>(),
            key_id.chars().take(80).collect::<String>()
        ))),
        _ => Ok(()),
    }
}

/// The gRPC deadline of a request (`grpc-timeout`), as an instant.
fn deadline(metadata: &MetadataMap) -> Option<Instant> {
    let v = metadata.get("grpc-timeout")?.to_str().ok()?;
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    let d = match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    };
    Instant::now().checked_add(d)
}

#[tonic::async_trait]
impl v1::veil_server::Veil for VeilService {
    async fn list_models(
        &self,
        req: Request<v1::ListModelsRequest>,
    ) -> Result<Response<v1::ListModelsResponse>, Status> {
        let id = request_id(req.metadata());
        self.observed("ListModels", id, async {
            let tenant = self.tenant(&req)?;
            Ok(v1::ListModelsResponse {
                models: self
                    .models
                    .models
                    .values()
                    .filter(|m| tenant.may_use(&m.name))
                    .map(|m| m.info.clone())
                    .collect(),
            })
        })
        .await
    }

    async fn get_key(
        &self,
        req: Request<v1::GetKeyRequest>,
    ) -> Result<Response<v1::KeyInfo>, Status> {
        let id = request_id(req.metadata());
        self.observed("GetKey", id, async {
            let tenant = self.tenant(&req)?;
            check_routing(
                routing_key(req.metadata())?.as_deref(),
                &req.get_ref().key_id,
            )?;
            let id = req.into_inner().key_id;
            match self
                .keys
                .find(&tenant.name, &id, &self.models.params)
                .await?
            {
                Some(k) => Ok(Self::key_info(k)),
                None => Err(ServiceError::UnknownKey(id)),
            }
        })
        .await
    }

    async fn upload_key(
        &self,
        req: Request<Streaming<v1::UploadKeyRequest>>,
    ) -> Result<Response<v1::KeyInfo>, Status> {
        let id = request_id(req.metadata());
        self.observed("UploadKey", id, async {
            let tenant = self.tenant(&req)?;
            let routed = routing_key(req.metadata())?;
            self.upload(tenant, routed, req.into_inner()).await
        })
        .await
    }

    async fn infer(
        &self,
        req: Request<v1::InferRequest>,
    ) -> Result<Response<v1::InferResponse>, Status> {
        let id = request_id(req.metadata());
        let rid = id.to_str().unwrap_or_default().to_string();
        self.observed("Infer", id, async {
            let tenant = self.tenant(&req)?;
            check_routing(
                routing_key(req.metadata())?.as_deref(),
                &req.get_ref().key_id,
            )?;
            let deadline = deadline(req.metadata());
            self.infer(tenant, deadline, rid, req.into_inner()).await
        })
        .await
    }

    async fn decrypt(
        &self,
        req: Request<v1::DecryptRequest>,
    ) -> Result<Response<v1::DecryptResponse>, Status> {
        let id = request_id(req.metadata());
        self.observed("Decrypt", id, async {
            let tenant = self.tenant(&req)?;
            self.decrypt(&tenant, req.into_inner().results).await
        })
        .await
    }

    async fn list_keys(
        &self,
        req: Request<v1::ListKeysRequest>,
    ) -> Result<Response<v1::ListKeysResponse>, Status> {
        let id = request_id(req.metadata());
        self.observed("ListKeys", id, async {
            let tenant = self.tenant(&req)?;
            let keys = self
                .keys
                .list(&tenant.name)
                .await?
                .into_iter()
                .map(|k| v1::StoredKeyInfo {
                    key_id: k.id,
                    parameter_set: k.params.name().to_string(),
                    size_bytes: k.size,
                    last_used_unix_s: k
                        .last_used
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs()),
                })
                .collect();
            Ok(v1::ListKeysResponse { keys })
        })
        .await
    }

    async fn delete_key(
        &self,
        req: Request<v1::DeleteKeyRequest>,
    ) -> Result<Response<v1::DeleteKeyResponse>, Status> {
        let id = request_id(req.metadata());
        self.observed("DeleteKey", id, async {
            let tenant = self.tenant(&req)?;
            check_routing(
                routing_key(req.metadata())?.as_deref(),
                &req.get_ref().key_id,
            )?;
            let id = req.into_inner().key_id;
            let keys = Arc::clone(&self.keys);
            let params = self.models.params.clone();
            let owner = tenant.name.clone();
            let id2 = id.clone();
            let freed = tokio::task::spawn_blocking(move || keys.delete(&owner, &id2, &params))
                .await
                .map_err(|e| ServiceError::Internal(format!("key deletion task failed: {e}")))??;
            match freed {
                Some(size_bytes) => {
                    tracing::info!(tenant = %tenant.label(), key = %short(&id), "key deleted");
                    Ok(v1::DeleteKeyResponse { size_bytes })
                }
                None => Err(ServiceError::UnknownKey(id)),
            }
        })
        .await
    }
}
