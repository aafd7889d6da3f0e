//! Veil's client library: talk to a `veil-server` while keeping your keys.
//!
//! ```no_run
//! # async fn demo() -> veil_client::Result<()> {
//! use veil_client::{Client, KeyPair};
//! let keys = KeyPair::load("keys".as_ref())?;           // from `veil keygen -o keys`
//! let client = Client::connect("http://127.0.0.1:50051").await?;
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

use std::time::Duration;

use prost::Message;
use tokio_stream::StreamExt;
use tonic::transport::{Channel, Endpoint};
use veil_models::ClientSpec;
use veil_models::eval::Prediction;
use veil_models::fhe::{EncryptedOutput, big_lwe_size};
use veil_proto::v1;
use veil_proto::v1::veil_client::VeilClient;

pub use error::{ClientError, Result};
pub use keys::{KeyPair, key_id, param_set_by_name};
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
    fn from_info(info: ModelInfo) -> Result<Self> {
        let spec: ClientSpec = serde_json::from_str(&info.client_spec_json).map_err(|e| {
            ClientError::Protocol(format!("model '{}': client spec: {e}", info.name))
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

    /// Quantizes and encrypts one sample into its wire form (seeded LWE ciphertexts).
    pub fn encrypt(&self, keys: &KeyPair, x: &[f64]) -> Result<Vec<u8>> {
        self.check_keys(keys)?;
        Ok(keys.client.encrypt(&self.spec, x)?.to_bytes())
    }

    /// Decrypts one sample's outputs into accumulators.
    pub fn decrypt_accs(&self, keys: &KeyPair, output: &[u8]) -> Result<Vec<f64>> {
        self.check_keys(keys)?;
        let out =
            EncryptedOutput::from_bytes(output, self.n_outputs(), big_lwe_size(self.spec.params))?;
        Ok(keys.client.decrypt(&self.spec, &out)?)
    }

    /// Decrypts and decodes one sample's outputs.
    pub fn decrypt(&self, keys: &KeyPair, output: &[u8]) -> Result<Prediction> {
        Ok(self.spec.decode(&self.decrypt_accs(keys, output)?))
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

/// A connection to a `veil-server`. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    rpc: VeilClient<Channel>,
}

impl Client {
    /// Connects to `url`, e.g. `http://127.0.0.1:50051`.
    pub async fn connect(url: &str) -> Result<Self> {
        let connect_err = |source| ClientError::Connect {
            url: url.to_string(),
            source,
        };
        let channel = Endpoint::from_shared(url.to_string())
            .map_err(connect_err)?
            .connect_timeout(Duration::from_secs(10))
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(connect_err)?;
        Ok(Self::from_channel(channel))
    }

    /// Wraps an existing channel (the message-size limits are set to the server's).
    pub fn from_channel(channel: Channel) -> Self {
        Client {
            rpc: VeilClient::new(channel)
                .max_decoding_message_size(MAX_RESPONSE_BYTES)
                .max_encoding_message_size(MAX_REQUEST_BYTES),
        }
    }

    /// The raw generated stub, for calls the helpers do not cover.
    pub fn rpc(&self) -> VeilClient<Channel> {
        self.rpc.clone()
    }

    pub async fn list_models(&self) -> Result<Vec<RemoteModel>> {
        let reply = self
            .rpc()
            .list_models(v1::ListModelsRequest {})
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
            .rpc()
            .get_key(v1::GetKeyRequest {
                key_id: key_id.to_string(),
            })
            .await
        {
            Ok(r) => Ok(Some(r.into_inner())),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
            Err(s) => Err(s.into()),
        }
    }

    /// Uploads the evaluation key in 1 MiB chunks; `progress(sent, total)` is called as
    /// chunks go out. The server validates the key before storing it.
    pub async fn upload_key(
        &self,
        keys: &KeyPair,
        progress: impl Fn(u64, u64) + Send + Sync + 'static,
    ) -> Result<KeyInfo> {
        let total = keys.eval_key.len() as u64;
        let mut messages = vec![v1::UploadKeyRequest {
            part: Some(v1::upload_key_request::Part::Header(v1::UploadKeyHeader {
                parameter_set: keys.params.name().to_string(),
                total_bytes: total,
            })),
        }];
        messages.extend(
            keys.eval_key
                .chunks(UPLOAD_CHUNK_BYTES)
                .map(|c| v1::UploadKeyRequest {
                    part: Some(v1::upload_key_request::Part::Chunk(c.to_vec())),
                }),
        );
        let mut sent = 0u64;
        let stream = tokio_stream::iter(messages).map(move |m| {
            if let Some(v1::upload_key_request::Part::Chunk(c)) = &m.part {
                sent += c.len() as u64;
                progress(sent, total);
            }
            m
        });
        let info = self.rpc().upload_key(stream).await?.into_inner();
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

    /// Sends one batch of encrypted samples (each from [`RemoteModel::encrypt`]).
    pub async fn infer(
        &self,
        model: &str,
        key_id: &str,
        samples: Vec<Vec<u8>>,
    ) -> Result<InferReply> {
        let n = samples.len();
        let req = v1::InferRequest {
            model: model.to_string(),
            key_id: key_id.to_string(),
            samples,
        };
        let request_bytes = req.encoded_len();
        let reply = self.rpc().infer(req).await?.into_inner();
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
    /// The key must be on the server already (see [`Client::ensure_key`]).
    pub async fn predict(
        &self,
        model: &RemoteModel,
        keys: &KeyPair,
        xs: &[Vec<f64>],
    ) -> Result<Vec<Prediction>> {
        let mut out = Vec::with_capacity(xs.len());
        for chunk in xs.chunks(model.max_batch()) {
            let samples = chunk
                .iter()
                .map(|x| model.encrypt(keys, x))
                .collect::<Result<Vec<_>>>()?;
            let reply = self.infer(model.name(), &keys.key_id, samples).await?;
            for o in &reply.outputs {
                out.push(model.decrypt(keys, o)?);
            }
        }
        Ok(out)
    }
}
