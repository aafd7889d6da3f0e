//! Veil's client library: talk to a `veil-server` while keeping your keys.
//!
//! ```no_run
//! # async fn demo() -> veil_client::Result<()> {
//! use veil_client::{Client, KeyPair};
//! let keys = KeyPair::load("keys".as_ref())?;           // from `veil keygen -o keys`
//! let client = Client::connect("http://127.0.0.1:50051").await?; // or connect_with(url, &options)
//! let model = client.model("digits_mlp").await?;        // public metadata, no weights
//! client.ensure_key(&keys, |_sent, _total| {}).await?; // uploads only if the server lacks it
//! let x = vec![0.0; model.n_features()];
//! let predictions = client.predict(&model, &keys, &[x]).await?;
//! println!("{}", predictions[0].label);
//! # Ok(()) }
//! ```
//!
//! The secret key never leaves the process: inputs are encrypted here, the server computes on
//! ciphertexts with the uploaded evaluation key, and the outputs are decrypted and decoded here.

pub mod error;
pub mod keys;

use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use veil_format::Prediction;
use veil_format::{ClientSpec, FormatError};
use veil_proto::v1;
use veil_proto::v1::veil_client::VeilClient;
use veil_runtime::{EncryptedOutput, big_lwe_size};

pub use error::{ClientError, Result};
pub use keys::{KeyPair, key_id, param_set_by_name};
pub use tonic::Code;
pub use veil_proto::v1::{KeyInfo, ModelInfo};

/// Bytes per upload message.
pub const UPLOAD_CHUNK_BYTES: usize = 1 << 20;
/// Largest message the client sends (the server's request limit).
pub const MAX_REQUEST_BYTES: usize = 16 << 20;
/// Largest message the client accepts (the server's response limit).
pub const MAX_RESPONSE_BYTES: usize = 64 << 20;

/// A served model as the client sees it: public metadata and the client specification.
#[derive(Clone, Debug)]
pub struct RemoteModel {
    pub info: ModelInfo,
    pub spec: ClientSpec,
}

impl RemoteModel {
    /// Parses and checks the server's client spec: a hostile or broken server gets a clear
    /// error here, never a panic or an oversized encryption later.
    pub fn from_info(info: ModelInfo) -> Result<Self> {
        let spec: ClientSpec = serde_json::from_str(&info.client_spec_json).map_err(|e| {
            ClientError::Protocol(format!("model '{}': client spec: {e}", info.name))
        })?;
        spec.validate().map_err(|source| ClientError::InvalidSpec {
            model: info.name.clone(),
            source,
        })?;
        Ok(RemoteModel { info, spec })
    }

    pub fn name(&self) -> &str {
        &self.info.name
    }

    pub fn n_features(&self) -> usize {
        self.spec.input.quant.len()
    }

    pub fn n_outputs(&self) -> usize {
        self.spec.output.scale.len()
    }

    /// Hex SHA-256 of the compiled model the server serves; sent with each Infer request so
    /// that a recompiled model is refused rather than decoded with stale metadata.
    pub fn digest(&self) -> &str {
        &self.info.model_digest
    }

    /// Most samples per Infer request.
    pub fn max_batch(&self) -> usize {
        (self.info.max_batch as usize).max(1)
    }

    fn check_keys(&self, keys: &KeyPair) -> Result<()> {
        if keys.params != self.spec.params {
            return Err(ClientError::Keys(format!(
                "model '{}' uses {}, the keys are for {}; generate keys for {}",
                self.name(),
                self.spec.params.name(),
                keys.params.name(),
                self.spec.params.name()
            )));
        }
        Ok(())
    }

    /// Quantizes and encrypts one sample into its wire form (seeded LWE ciphertexts). A NaN,
    /// infinite or huge feature is refused ([`FormatError::InvalidFeature`], row 0).
    pub fn encrypt(&self, keys: &KeyPair, x: &[f64]) -> Result<Vec<u8>> {
        self.check_keys(keys)?;
        Ok(keys.client.encrypt(&self.spec, x)?.to_bytes())
    }

    /// Checks samples before anything is encrypted or sent: the right number of features,
    /// each finite and within 1e30; an error names the first bad row and column.
    pub fn check_rows(&self, xs: &[Vec<f64>]) -> Result<()> {
        for (row, x) in xs.iter().enumerate() {
            if x.len() != self.n_features() {
                return Err(FormatError::Shape(format!(
                    "row {row}: {} features given, model '{}' takes {}",
                    x.len(),
                    self.name(),
                    self.n_features()
                ))
                .into());
            }
            veil_format::input::check_row(row, x)?;
        }
        Ok(())
    }

    /// Decrypts one sample's outputs into accumulators.
    pub fn decrypt_accs(&self, keys: &KeyPair, output: &[u8]) -> Result<Vec<f64>> {
        self.check_keys(keys)?;
        let out = EncryptedOutput::from_bytes(
            output,
            self.n_outputs(),
            big_lwe_size(self.spec.params),
            self.spec.output.modulus_bits,
        )?;
        Ok(keys.client.decrypt(&self.spec, &out)?)
    }

    /// Decrypts and decodes one sample's outputs.
    pub fn decrypt(&self, keys: &KeyPair, output: &[u8]) -> Result<Prediction> {
        Ok(self.spec.decode(&self.decrypt_accs(keys, output)?)?)
    }

    /// [`RemoteModel::encrypt`] for many samples, on the blocking pool.
    pub async fn encrypt_batch(&self, keys: &KeyPair, xs: Vec<Vec<f64>>) -> Result<Vec<Vec<u8>>> {
        self.check_keys(keys)?;
        self.check_rows(&xs)?;
        let (spec, client) = (self.spec.clone(), Arc::clone(&keys.client));
        blocking(move || {
            xs.iter()
                .map(|x| Ok(client.encrypt(&spec, x)?.to_bytes()))
                .collect()
        })
        .await
    }

    /// [`RemoteModel::decrypt`] for many samples, on the blocking pool.
    pub async fn decrypt_batch(
        &self,
        keys: &KeyPair,
        outputs: Vec<Vec<u8>>,
    ) -> Result<Vec<Prediction>> {
        self.check_keys(keys)?;
        let (spec, client) = (self.spec.clone(), Arc::clone(&keys.client));
        let (n, lwe) = (self.n_outputs(), big_lwe_size(self.spec.params));
        let bits = self.spec.output.modulus_bits;
        blocking(move || {
            outputs
                .iter()
                .map(|o| {
                    let out = EncryptedOutput::from_bytes(o, n, lwe, bits)?;
                    Ok(spec.decode(&client.decrypt(&spec, &out)?)?)
                })
                .collect()
        })
        .await
    }
}

/// Whether [`Client::ensure_key`] had to upload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyStatus {
    pub key_id: String,
    /// True when this call uploaded the key; false when the server already had it.
    pub uploaded: bool,
    /// Key bytes sent by this call (0 when nothing was uploaded).
    pub bytes_sent: u64,
}

/// The answer to one Infer request, with its sizes.
#[derive(Clone, Debug)]
pub struct InferReply {
    /// One entry per sample: the encrypted outputs.
    pub outputs: Vec<Vec<u8>>,
    /// Encoded size of the request message (protobuf, without gRPC framing).
    pub request_bytes: usize,
    /// Encoded size of the response message.
    pub response_bytes: usize,
    /// Time the server spent evaluating.
    pub server_eval: Duration,
    /// Samples in the server's evaluation: this request's plus any it was merged with.
    pub merged_samples: usize,
}

/// How to reach a server: TLS trust and identity, and the bearer token.
#[derive(Clone, Default)]
pub struct ConnectOptions {
    /// PEM certificate(s) of the CA that signed the server's certificate, for `https://` URLs.
    /// Without it the system's trusted roots are used.
    pub ca_cert_pem: Option<Vec<u8>>,
    /// PEM certificate and private key of this client, for servers that require client
    /// certificates (mutual TLS).
    pub client_identity_pem: Option<(Vec<u8>, Vec<u8>)>,
    /// Sent as `authorization: Bearer <token>` with every call.
    pub token: Option<String>,
    /// The name to check the server's certificate against, when it differs from the URL's host.
    pub tls_domain: Option<String>,
}

/// Secrets are shown only as present or absent, so that options can be logged.
impl std::fmt::Debug for ConnectOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redacted = |present: bool| if present { "<redacted>" } else { "None" };
        f.debug_struct("ConnectOptions")
            .field("ca_cert_pem", &self.ca_cert_pem.as_ref().map(Vec::len))
            .field(
                "client_identity_pem",
                &self
                    .client_identity_pem
                    .as_ref()
                    .map(|(cert, _)| (cert.len(), "<redacted key>")),
            )
            .field("token", &redacted(self.token.is_some()))
            .field("tls_domain", &self.tls_domain)
            .finish()
    }
}

impl ConnectOptions {
    /// Reads the PEM files named (any of them may be absent).
    pub fn with_pem_files(
        mut self,
        ca_cert: Option<&std::path::Path>,
        client_cert: Option<&std::path::Path>,
        client_key: Option<&std::path::Path>,
    ) -> Result<Self> {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| ClientError::io(format!("reading {}", p.display()), e))
        };
        if let Some(p) = ca_cert {
            self.ca_cert_pem = Some(read(p)?);
        }
        match (client_cert, client_key) {
            (Some(c), Some(k)) => self.client_identity_pem = Some((read(c)?, read(k)?)),
            (None, None) => {}
            _ => {
                return Err(ClientError::Config(
                    "a client certificate needs its key and the key its certificate \
                     (give both --client-cert and --client-key)"
                        .into(),
                ));
            }
        }
        Ok(self)
    }
}

/// The URL's host is `localhost` or a loopback IP address (127.0.0.0/8, ::1).
fn is_loopback_url(url: &str) -> bool {
    let Ok(uri) = url.parse::<tonic::codegen::http::Uri>() else {
        return false;
    };
    match uri.host() {
        Some(h) if h.eq_ignore_ascii_case("localhost") => true,
        Some(h) => h
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback()),
        None => false,
    }
}

/// Adds the bearer token to every call.
#[derive(Clone)]
pub struct Auth(Option<MetadataValue<Ascii>>);

impl Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A request carrying `key_id` in the routing header too (see [`veil_proto::KEY_ID_HEADER`]).
fn routed<T>(msg: T, key_id: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    // Key ids are hex; anything else is sent without the header and refused by the server.
    if let Ok(v) = key_id.parse::<MetadataValue<Ascii>>() {
        req.metadata_mut().insert(veil_proto::KEY_ID_HEADER, v);
    }
    req
}

/// The generated stub with the token interceptor.
pub type Rpc = VeilClient<InterceptedService<Channel, Auth>>;

/// A connection to a `veil-server`. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    rpc: Rpc,
    channel: Channel,
    deadline: Option<Duration>,
    retry: RetryPolicy,
}

/// How calls answered UNAVAILABLE are retried: a server over its call cap or queue-wait
/// bound, one that is draining, or a replica that went away behind a load balancer. Every
/// Veil call may be repeated safely (an inference is a pure function of its inputs, an
/// upload of the same key stores it once).
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    /// Tries in all, the first included (1: no retry).
    pub attempts: u32,
    /// Wait before the first retry; each next wait doubles, up to `max_backoff`, with up to
    /// half of it added at random so that clients turned away together do not return together.
    pub first_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 5,
            first_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(3),
        }
    }
}

impl RetryPolicy {
    /// The wait before retry number `retry` (1 for the first).
    fn backoff(&self, retry: u32) -> Duration {
        let base = self
            .first_backoff
            .saturating_mul(1u32 << (retry - 1).min(16))
            .min(self.max_backoff);
        // Jitter from the clock's low bits: good enough to spread clients, no RNG needed.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        base + base.mul_f64(f64::from(nanos % 1000) / 2000.0)
    }
}

impl Client {
    /// Connects to `url`, e.g. `http://127.0.0.1:50051`, without TLS options or a token.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(url, &ConnectOptions::default()).await
    }

    /// Connects to `url` (`http://` or `https://`) with TLS options and a token.
    pub async fn connect_with(url: &str, options: &ConnectOptions) -> Result<Self> {
        let connect_err = |source| ClientError::Connect {
            url: url.to_string(),
            source,
        };
        let mut endpoint = Endpoint::from_shared(url.to_string())
            .map_err(connect_err)?
            .connect_timeout(Duration::from_secs(10))
            .tcp_nodelay(true);
        let tls = options.ca_cert_pem.is_some()
            || options.client_identity_pem.is_some()
            || options.tls_domain.is_some();
        if url.starts_with("https://") {
            let mut config = ClientTlsConfig::new();
            config = match &options.ca_cert_pem {
                Some(pem) => config.ca_certificate(Certificate::from_pem(pem)),
                None => config.with_native_roots(),
            };
            if let Some((cert, key)) = &options.client_identity_pem {
                config = config.identity(Identity::from_pem(cert, key));
            }
            if let Some(d) = &options.tls_domain {
                config = config.domain_name(d.clone());
            }
            endpoint = endpoint.tls_config(config).map_err(connect_err)?;
        } else if tls {
            return Err(ClientError::Config(format!(
                "TLS options given for {url}; use an https:// URL"
            )));
        }
        if options.token.is_some() && !url.starts_with("https://") && !is_loopback_url(url) {
            return Err(ClientError::Config(format!(
                "refusing to send the bearer token in the clear to {url}: use an https:// URL \
                 (plain http carries a token only to a loopback address)"
            )));
        }
        let auth = match &options.token {
            None => Auth(None),
            Some(t) => Auth(Some(
                MetadataValue::try_from(format!("Bearer {}", t.trim())).map_err(|_| {
                    ClientError::Config(
                        "the token has characters that cannot go in a header".into(),
                    )
                })?,
            )),
        };
        let channel = endpoint.connect().await.map_err(connect_err)?;
        Ok(Self::from_channel_with_auth(channel, auth))
    }

    /// Wraps an existing channel (the message-size limits are set to the server's).
    pub fn from_channel(channel: Channel) -> Self {
        Self::from_channel_with_auth(channel, Auth(None))
    }

    fn from_channel_with_auth(channel: Channel, auth: Auth) -> Self {
        Client {
            channel: channel.clone(),
            rpc: VeilClient::with_interceptor(channel, auth)
                .max_decoding_message_size(MAX_RESPONSE_BYTES)
                .max_encoding_message_size(MAX_REQUEST_BYTES),
            deadline: None,
            retry: RetryPolicy::default(),
        }
    }

    /// The same connection with another retry policy for UNAVAILABLE answers.
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Runs `call` until it succeeds, fails with another code than UNAVAILABLE, or the
    /// policy's attempts are spent; the call's own deadline (if any) bounds the whole.
    async fn retrying<T, Fut>(
        &self,
        mut call: impl FnMut() -> Fut,
    ) -> std::result::Result<T, tonic::Status>
    where
        Fut: std::future::Future<Output = std::result::Result<T, tonic::Status>>,
    {
        let until = self.deadline.map(|d| std::time::Instant::now() + d);
        let mut retry = 0;
        loop {
            let err = match call().await {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            retry += 1;
            if err.code() != tonic::Code::Unavailable || retry >= self.retry.attempts.max(1) {
                return Err(err);
            }
            let wait = self.retry.backoff(retry);
            if until.is_some_and(|u| std::time::Instant::now() + wait >= u) {
                return Err(err);
            }
            tokio::time::sleep(wait).await;
        }
    }

    /// The same connection, with a gRPC deadline on each Infer call (`None`: no deadline).
    /// A request still waiting for its turn when the deadline passes is never evaluated.
    pub fn with_deadline(mut self, deadline: Option<Duration>) -> Self {
        self.deadline = deadline;
        self
    }

    /// The raw generated stub, for calls the helpers do not cover.
    pub fn rpc(&self) -> Rpc {
        self.rpc.clone()
    }

    pub async fn list_models(&self) -> Result<Vec<RemoteModel>> {
        let reply = self
            .retrying(|| {
                let mut rpc = self.rpc();
                async move { rpc.list_models(v1::ListModelsRequest {}).await }
            })
            .await?
            .into_inner();
        reply
            .models
            .into_iter()
            .map(RemoteModel::from_info)
            .collect()
    }

    /// The served model called `name`.
    pub async fn model(&self, name: &str) -> Result<RemoteModel> {
        let models = self.list_models().await?;
        let served = models
            .iter()
            .map(|m| m.name().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        models
            .into_iter()
            .find(|m| m.name() == name)
            .ok_or_else(|| ClientError::UnknownModel {
                name: name.to_string(),
                served,
            })
    }

    /// The server's record of a key, or `None` when it does not have it.
    pub async fn key_info(&self, key_id: &str) -> Result<Option<KeyInfo>> {
        match self
            .retrying(|| {
                let (mut rpc, req) = (
                    self.rpc(),
                    routed(
                        v1::GetKeyRequest {
                            key_id: key_id.to_string(),
                        },
                        key_id,
                    ),
                );
                async move { rpc.get_key(req).await }
            })
            .await
        {
            Ok(r) => Ok(Some(r.into_inner())),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
            Err(s) => Err(s.into()),
        }
    }

    /// The server's gRPC health for `service` ("" for the server as a whole,
    /// "veil.v1.Veil" for the inference service): `SERVING`, `NOT_SERVING` (draining) or
    /// another status name.
    pub async fn health(&self, service: &str) -> Result<String> {
        use tonic_health::pb::HealthCheckRequest;
        use tonic_health::pb::health_check_response::ServingStatus;
        use tonic_health::pb::health_client::HealthClient;
        let status = HealthClient::new(self.channel.clone())
            .max_decoding_message_size(64 << 10)
            .check(HealthCheckRequest {
                service: service.to_string(),
            })
            .await?
            .into_inner()
            .status;
        Ok(ServingStatus::try_from(status).map_or_else(
            |_| format!("UNKNOWN({status})"),
            |s| s.as_str_name().to_string(),
        ))
    }

    /// The caller's keys stored on the server, most recently used first.
    pub async fn list_keys(&self) -> Result<Vec<v1::StoredKeyInfo>> {
        Ok(self
            .retrying(|| {
                let mut rpc = self.rpc();
                async move { rpc.list_keys(v1::ListKeysRequest {}).await }
            })
            .await?
            .into_inner()
            .keys)
    }

    /// Encrypted-model mode: sends the results of `veil run` (a results file's bytes) to the
    /// model owner's server, which decrypts them with her key and answers the predictions
    /// (`veil-server --owner-keys`).
    pub async fn decrypt_results(&self, results: Vec<u8>) -> Result<v1::DecryptResponse> {
        Ok(self
            .retrying(|| {
                let (mut rpc, results) = (self.rpc(), results.clone());
                async move { rpc.decrypt(v1::DecryptRequest { results }).await }
            })
            .await?
            .into_inner())
    }

    /// Removes the key from the server (disk and memory); the bytes it freed. NOT_FOUND when
    /// the server holds no such key of this caller.
    pub async fn delete_key(&self, key_id: &str) -> Result<u64> {
        Ok(self
            .retrying(|| {
                let (mut rpc, req) = (
                    self.rpc(),
                    routed(
                        v1::DeleteKeyRequest {
                            key_id: key_id.to_string(),
                        },
                        key_id,
                    ),
                );
                async move { rpc.delete_key(req).await }
            })
            .await?
            .into_inner()
            .size_bytes)
    }

    /// Uploads the evaluation key in 1 MiB chunks; `progress(sent, total)` is called as
    /// chunks go out. The server validates the key before storing it.
    pub async fn upload_key(
        &self,
        keys: &KeyPair,
        progress: impl Fn(u64, u64) + Send + Sync + 'static,
    ) -> Result<KeyInfo> {
        let total = keys.eval_key.len() as u64;
        let key: Arc<[u8]> = Arc::from(keys.eval_key.as_slice());
        let header = v1::UploadKeyRequest {
            part: Some(v1::upload_key_request::Part::Header(v1::UploadKeyHeader {
                parameter_set: keys.params.name().to_string(),
                total_bytes: total,
            })),
        };
        let progress = Arc::new(progress);
        // A fresh stream per attempt, cutting chunks as they go out.
        let attempt = || {
            let (key, progress) = (Arc::clone(&key), Arc::clone(&progress));
            let chunks = (0..key.len().div_ceil(UPLOAD_CHUNK_BYTES)).map(move |i| {
                let chunk =
                    &key[i * UPLOAD_CHUNK_BYTES..key.len().min((i + 1) * UPLOAD_CHUNK_BYTES)];
                let sent = (i * UPLOAD_CHUNK_BYTES + chunk.len()) as u64;
                progress(sent, total);
                v1::UploadKeyRequest {
                    part: Some(v1::upload_key_request::Part::Chunk(chunk.to_vec())),
                }
            });
            let stream = tokio_stream::iter(std::iter::once(header.clone()).chain(chunks));
            let (mut rpc, req) = (self.rpc(), routed(stream, &keys.key_id));
            async move { rpc.upload_key(req).await }
        };
        let info = self.retrying(attempt).await?.into_inner();
        if info.key_id != keys.key_id {
            return Err(ClientError::Protocol(format!(
                "the server stored the key as {}, the client computed {}",
                info.key_id, keys.key_id
            )));
        }
        Ok(info)
    }

    /// Makes sure the server has the evaluation key: asks first, uploads only if needed.
    pub async fn ensure_key(
        &self,
        keys: &KeyPair,
        progress: impl Fn(u64, u64) + Send + Sync + 'static,
    ) -> Result<KeyStatus> {
        if self.key_info(&keys.key_id).await?.is_some() {
            return Ok(KeyStatus {
                key_id: keys.key_id.clone(),
                uploaded: false,
                bytes_sent: 0,
            });
        }
        let info = self.upload_key(keys, progress).await?;
        Ok(KeyStatus {
            key_id: info.key_id,
            uploaded: true,
            bytes_sent: keys.eval_key.len() as u64,
        })
    }

    /// Sends one batch of encrypted samples (each from [`RemoteModel::encrypt`]), with no
    /// model digest check; prefer [`Client::infer_model`].
    pub async fn infer(
        &self,
        model: &str,
        key_id: &str,
        samples: Vec<Vec<u8>>,
    ) -> Result<InferReply> {
        self.infer_with_digest(model, "", key_id, samples).await
    }

    /// [`Client::infer`] for `model` as listed, naming its digest: the server answers
    /// FAILED_PRECONDITION if it now serves another build of the model.
    pub async fn infer_model(
        &self,
        model: &RemoteModel,
        key_id: &str,
        samples: Vec<Vec<u8>>,
    ) -> Result<InferReply> {
        self.infer_with_digest(model.name(), model.digest(), key_id, samples)
            .await
    }

    /// Sends one batch naming `model_digest` (empty: no check).
    pub async fn infer_with_digest(
        &self,
        model: &str,
        model_digest: &str,
        key_id: &str,
        samples: Vec<Vec<u8>>,
    ) -> Result<InferReply> {
        let n = samples.len();
        let req = v1::InferRequest {
            model: model.to_string(),
            key_id: key_id.to_string(),
            samples,
            model_digest: model_digest.to_string(),
        };
        let request_bytes = req.encoded_len();
        let until = self.deadline.map(|d| std::time::Instant::now() + d);
        let reply = self
            .retrying(|| {
                let mut r = routed(req.clone(), key_id);
                if let Some(u) = until {
                    // Retries share the one deadline.
                    r.set_timeout(u.saturating_duration_since(std::time::Instant::now()));
                }
                let mut rpc = self.rpc();
                async move { rpc.infer(r).await }
            })
            .await?
            .into_inner();
        if reply.outputs.len() != n {
            return Err(ClientError::Protocol(format!(
                "{} outputs for {n} samples",
                reply.outputs.len()
            )));
        }
        Ok(InferReply {
            response_bytes: reply.encoded_len(),
            request_bytes,
            server_eval: Duration::from_micros(reply.eval_micros),
            merged_samples: reply.merged_samples as usize,
            outputs: reply.outputs,
        })
    }

    /// Encrypts, infers (in batches the server accepts), decrypts and decodes `xs`.
    /// The key must be on the server already (see [`Client::ensure_key`]). Encryption and
    /// decryption run on the blocking pool, off the async runtime.
    pub async fn predict(
        &self,
        model: &RemoteModel,
        keys: &KeyPair,
        xs: &[Vec<f64>],
    ) -> Result<Vec<Prediction>> {
        // Every row first, so an error names its row in `xs` and nothing was sent.
        model.check_rows(xs)?;
        let mut out = Vec::with_capacity(xs.len());
        for chunk in xs.chunks(model.max_batch()) {
            let samples = model.encrypt_batch(keys, chunk.to_vec()).await?;
            let reply = self.infer_model(model, &keys.key_id, samples).await?;
            out.extend(model.decrypt_batch(keys, reply.outputs).await?);
        }
        Ok(out)
    }
}

/// Runs CPU-bound work on the blocking pool.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ClientError::Protocol(format!("encryption task failed: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_calls_carry_the_routing_header() {
        let id = "ab".repeat(32);
        let req = routed((), &id);
        assert_eq!(
            req.metadata().get(veil_proto::KEY_ID_HEADER).unwrap(),
            id.as_str()
        );
        // Not a valid header value: sent without one (the server refuses the body's id).
        assert!(routed((), "bad\nid").metadata().is_empty());
    }
    use veil_format::compiled::{InputEncoding, InputWindow, OutputDecoding, ParamSet};
    use veil_format::quant::UniformQuant;
    use veil_format::tail::{Reveal, Task};

    #[test]
    fn only_loopback_hosts_count_as_loopback() {
        for url in [
            "http://127.0.0.1:50051",
            "http://127.8.9.10:1",
            "http://localhost:50051",
            "http://LOCALHOST",
            "http://[::1]:50051",
        ] {
            assert!(is_loopback_url(url), "{url}");
        }
        for url in [
            "http://10.0.0.1:50051",
            "http://0.0.0.0:50051",
            "http://veil.example.com:50051",
            "http://localhost.example.com",
            "http://[::]:50051",
            "not a url",
        ] {
            assert!(!is_loopback_url(url), "{url}");
        }
    }

    /// A token is never sent over plain http beyond loopback: refused before connecting.
    #[tokio::test]
    async fn a_token_over_plain_http_beyond_loopback_is_refused() {
        let options = ConnectOptions {
            token: Some("s3cret".into()),
            ..ConnectOptions::default()
        };
        let Err(e) = Client::connect_with("http://192.0.2.7:50051", &options).await else {
            panic!("connected");
        };
        assert!(matches!(e, ClientError::Config(_)), "{e}");
        assert!(e.to_string().contains("https://"), "{e}");
        // Loopback over plain http may carry it: this fails only because nothing listens.
        let e = Client::connect_with("http://127.0.0.1:1", &options)
            .await
            .err()
            .unwrap();
        assert!(!matches!(e, ClientError::Config(_)), "{e}");
    }

    #[test]
    fn debug_output_hides_the_token_and_the_private_key() {
        let options = ConnectOptions {
            token: Some("tok-1234567890".into()),
            client_identity_pem: Some((b"CERT".to_vec(), b"PRIVATE-KEY-BYTES".to_vec())),
            ..ConnectOptions::default()
        };
        let shown = format!("{options:?}");
        assert!(!shown.contains("tok-1234567890"), "{shown}");
        assert!(!shown.contains("PRIVATE"), "{shown}");
        assert!(!shown.contains("80, 82, 73"), "{shown}"); // the key's bytes as numbers
        assert!(shown.contains("token: \"<redacted>\""), "{shown}");
    }

    fn spec() -> ClientSpec {
        ClientSpec {
            params: ParamSet::Message2Carry2KsPbsTuniform2m128,
            input_shape: vec![2],
            input: InputEncoding {
                quant: vec![
                    UniformQuant {
                        scale: 0.1,
                        zero: 10,
                        max_q: 255
                    };
                    2
                ],
                windows: vec![],
                delta: 1 << 50,
            },
            output: OutputDecoding {
                delta: 1 << 40,
                scale: vec![1.0; 2],
                offset: vec![0.0; 2],
                modulus_bits: 64,
            },
            tail: vec![],
            class_labels: None,
            task: Task::Classification,
            pbs_per_sample: 0,
            reveal: Reveal::Scores,
        }
    }

    fn info(spec: &ClientSpec) -> ModelInfo {
        ModelInfo {
            name: "m".into(),
            client_spec_json: serde_json::to_string(spec).unwrap(),
            ..Default::default()
        }
    }

    #[test]
    fn a_hostile_servers_spec_is_refused_when_received() {
        let model = RemoteModel::from_info(info(&spec())).unwrap();
        assert_eq!(model.n_features(), 2);
        let mut hostile = spec();
        // A million windows: a million ciphertexts per sample.
        hostile.input.windows = vec![
            InputWindow {
                feature: 0,
                offset: 0
            };
            1 << 20
        ];
        let e = RemoteModel::from_info(info(&hostile)).unwrap_err();
        assert!(
            matches!(
                &e,
                ClientError::InvalidSpec {
                    source: FormatError::InvalidClientSpec(_),
                    ..
                }
            ),
            "{e}"
        );
        assert!(
            e.to_string()
                .starts_with("model 'm': the server's client spec is refused")
        );
        let mut hostile = spec();
        hostile.input.quant[1].scale = -0.0;
        let e = RemoteModel::from_info(info(&hostile)).unwrap_err();
        assert!(e.to_string().contains("feature 1"), "{e}");
    }

    #[test]
    fn bad_rows_are_refused_before_anything_is_sent() {
        let model = RemoteModel::from_info(info(&spec())).unwrap();
        model
            .check_rows(&[vec![0.0, 1e30], vec![-1e30, 2.0]])
            .unwrap();
        let e = model
            .check_rows(&[vec![0.0, 1.0], vec![3.0, f64::INFINITY]])
            .unwrap_err();
        assert!(
            matches!(
                e,
                ClientError::Format(FormatError::InvalidFeature {
                    row: 1,
                    column: 1,
                    ..
                })
            ),
            "{e}"
        );
        let e = model.check_rows(&[vec![f64::NAN, 0.0]]).unwrap_err();
        assert_eq!(e.to_string(), "row 0, column 0: NaN is not a number (NaN)");
        let e = model.check_rows(&[vec![0.0, 0.0], vec![1.0]]).unwrap_err();
        assert!(e.to_string().contains("row 1: 1 features given"), "{e}");
    }
}
