//! Typed errors of the compiled-model format and of client-side decoding.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum FormatError {
    /// A compiled model file is damaged, from another format version, or inconsistent.
    #[error("invalid compiled model: {0}")]
    InvalidCompiledModel(String),

    /// A client specification (from a server or a file) that is inconsistent or asks for more
    /// work than any model Veil compiles.
    #[error("invalid client spec: {0}")]
    InvalidClientSpec(String),

    /// Quantization settings out of their supported ranges.
    #[error("quantization settings out of range: {0}")]
    QuantConfig(String),

    /// A feature value the client refuses to quantize: NaN, infinite or beyond
    /// [`crate::input::MAX_FEATURE_ABS`]. `row` and `column` count from 0.
    #[error("row {row}, column {column}: {value} {why}")]
    InvalidFeature {
        row: usize,
        column: usize,
        value: f64,
        why: &'static str,
    },

    /// Inputs or outputs that do not fit the model (wrong number of features or scores).
    #[error("shape mismatch: {0}")]
    Shape(String),

    /// A label-only output that is not a valid class index: its check failed (a misread
    /// final comparison), it lies off the integers, or it names no class.
    #[error("inconsistent label output {value}: {reason}")]
    InconsistentLabel { value: f64, reason: String },

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = FormatError> = std::result::Result<T, E>;

impl FormatError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        FormatError::Io {
            context: context.into(),
            source,
        }
    }
}
