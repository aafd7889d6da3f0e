//! The server's typed errors. They become gRPC statuses in one place: [`crate::status`].

use std::sync::Arc;

use thiserror::Error;
use veil_format::FormatError;
use veil_runtime::RuntimeError;

#[derive(Debug, Error)]
pub enum ServiceError {
    /// No served model has this name.
    #[error("unknown model '{name}'; served models: {served}")]
    UnknownModel { name: String, served: String },

    /// The server holds no evaluation key with this id.
    #[error("unknown key id {0}; upload the evaluation key first (UploadKey)")]
    UnknownKey(String),

    /// A request that is malformed as a whole (not a crypto or shape problem of its payload).
    #[error("{0}")]
    InvalidRequest(String),

    /// More bytes or samples than the server accepts.
    #[error("{0}")]
    TooLarge(String),

    /// A request naming a model digest that is not the served model's (it was recompiled).
    #[error("{0}")]
    StaleModel(String),

    /// A well-formed key for another parameter set than the one needed.
    #[error("{0}")]
    WrongParameterSet(String),

    /// An upload stream that stopped sending, or took longer than the upload deadline.
    #[error("{0}")]
    Stalled(String),

    /// A request whose gRPC deadline passed before its evaluation started.
    #[error("{0}")]
    DeadlineExceeded(String),

    /// A missing or unknown bearer token.
    #[error("{0}")]
    Unauthenticated(String),

    /// A tenant asking for a model it may not use.
    #[error("{0}")]
    PermissionDenied(String),

    /// A limit of the server or the tenant that a retry later may pass: a full inference queue,
    /// a key quota, the request rate, a full key store.
    #[error("{0}")]
    Exhausted(String),

    /// The server is at a server-wide cap on work in progress; another replica, or a retry
    /// later, may serve the call.
    #[error("{0}")]
    Overloaded(String),
    /// The server cannot take the request now (it waited too long in the queue); a retry may
    /// succeed.
    #[error("{0}")]
    Unavailable(String),

    /// One error reported to every request of a merged batch.
    #[error(transparent)]
    Shared(Arc<ServiceError>),

    /// A call this server is not set up to answer (Decrypt without an owner key).
    #[error("{0}")]
    NotConfigured(String),
    /// A configuration the server cannot start with (tenants file, TLS files).
    #[error("{0}")]
    Config(String),

    /// A format error: a damaged or inconsistent model.
    #[error(transparent)]
    Format(#[from] FormatError),

    /// A runtime error: bad ciphertexts or keys, shapes, an unavailable backend.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),

    /// A file-system error on the server's side.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    /// A fault of the server (a panicked worker, a broken invariant).
    #[error("{0}")]
    Internal(String),
}

impl ServiceError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        ServiceError::Io {
            context: context.into(),
            source,
        }
    }
}

pub type Result<T, E = ServiceError> = std::result::Result<T, E>;
