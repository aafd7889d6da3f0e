//! Typed errors of the FHE runtime.

use thiserror::Error;
use veil_format::FormatError;

#[derive(Debug, Error)]
pub enum RuntimeError {
    /// The model, spec or inputs break the format's rules.
    #[error(transparent)]
    Format(#[from] FormatError),

    /// Inputs that do not fit the model (wrong number of features or ciphertexts).
    #[error("shape mismatch: {0}")]
    Shape(String),

    /// A key or ciphertext that does not match the parameter set or cannot be decoded.
    #[error("invalid key or ciphertext: {0}")]
    Crypto(String),

    /// A model this mode cannot run (encrypted-model mode: trees, models past its limits).
    #[error("unsupported: {0}")]
    Unsupported(String),

    /// A key directory that is missing, incomplete or inconsistent.
    #[error("{0}")]
    Keys(String),

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    /// The requested compute backend cannot run here (no `gpu` feature, no device).
    #[error("backend unavailable: {0}")]
    Backend(String),
}

impl RuntimeError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        RuntimeError::Io {
            context: context.into(),
            source,
        }
    }
}

pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;
