//! The client library's typed errors.

use thiserror::Error;
use veil_format::FormatError;
use veil_runtime::RuntimeError;

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("cannot connect to {url}: {}", chain(.source))]
    Connect {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },

    /// The server answered with an error status (or the transport failed under the call).
    #[error("server says {:?}: {}", .0.code(), chain(.0))]
    Status(#[from] tonic::Status),

    #[error("unknown model '{name}'; the server serves: {served}")]
    UnknownModel { name: String, served: String },

    /// The server's client spec for `model` fails [`ClientSpec::validate`](veil_format::ClientSpec::validate).
    #[error("model '{model}': the server's client spec is refused: {source}")]
    InvalidSpec {
        model: String,
        #[source]
        source: FormatError,
    },

    /// Feature-value and decoding errors of the format; a refused feature is
    /// `Format(FormatError::InvalidFeature { row, column, .. })`.
    #[error(transparent)]
    Format(#[from] FormatError),

    /// Encryption and decryption errors of the runtime.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),

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

/// An error's message followed by its sources' (a TLS failure says why, not only
/// "transport error").
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = match e.downcast_ref::<tonic::Status>() {
        Some(s) => s.message().to_string(),
        None => e.to_string(),
    };
    let mut next = e.source();
    while let Some(s) = next {
        let m = s.to_string();
        if !out.contains(&m) {
            out.push_str(": ");
            out.push_str(&m);
        }
        next = s.source();
    }
    out
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
