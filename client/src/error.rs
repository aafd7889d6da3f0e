//! The client library's typed errors.

use thiserror::Error;
use veil_models::ModelError;

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("cannot connect to {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },

    /// The server answered with an error status.
    #[error("server says {:?}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),

    #[error("unknown model '{name}'; the server serves: {served}")]
    UnknownModel { name: String, served: String },

    /// Encryption, decryption, decoding or data errors from the engine.
    #[error(transparent)]
    Model(#[from] ModelError),

    /// Connection options that do not fit together (TLS options for http://, a bad token).
    #[error("{0}")]
    Config(String),

    /// A key directory that is missing, incomplete or inconsistent.
    #[error("{0}")]
    Keys(String),

    /// A server answer that does not fit the protocol (wrong number of outputs, bad JSON).
    #[error("unexpected answer from the server: {0}")]
    Protocol(String),

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl ClientError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        ClientError::Io {
            context: context.into(),
            source,
        }
    }

    /// The gRPC status code, when the server answered with an error.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            ClientError::Status(s) => Some(s.code()),
            _ => None,
        }
    }
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;
