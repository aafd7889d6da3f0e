//! Typed errors of the engine. The server maps them to gRPC status codes in one place.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ModelError {
    /// The bytes are not a readable ONNX model (truncated, not protobuf, no graph).
    #[error("not a valid ONNX model: {0}")]
    InvalidOnnx(String),

    /// A node uses an op, attribute or shape that Veil cannot compile.
    #[error("unsupported node '{node}' (op {op_type}): {reason}. Supported: {supported}")]
    Unsupported {
        node: String,
        op_type: String,
        reason: String,
        supported: &'static str,
    },

    /// A CSV file does not match what the model expects.
    #[error("{path}: line {line}: {reason}")]
    Csv {
        path: String,
        line: usize,
        reason: String,
    },

    /// A compiled model file is damaged, from another format version, or inconsistent.
    #[error("invalid compiled model: {0}")]
    InvalidCompiledModel(String),

    /// A feature value the client refuses to quantize: NaN, infinite or beyond
    /// [`crate::data::MAX_FEATURE_ABS`]. `row` and `column` count from 0.
    #[error("row {row}, column {column}: {value} {why}")]
    InvalidFeature {
        row: usize,
        column: usize,
        value: f64,
        why: &'static str,
    },

    /// A client specification (from a server or a file) that is inconsistent or asks for more
    /// work than any model Veil compiles.
    #[error("invalid client spec: {0}")]
    InvalidClientSpec(String),

    /// Inputs that do not fit the model (wrong number of features or ciphertexts).
    #[error("shape mismatch: {0}")]
    Shape(String),

    /// A key or ciphertext that does not match the parameter set or cannot be decoded.
    #[error("invalid key or ciphertext: {0}")]
    Crypto(String),

    /// Quantization or planning could not find an encoding that fits the parameter set.
    #[error("cannot compile: {0}")]
    Plan(String),

    /// A label-only output that is not a valid class index: its check failed (a misread
    /// final comparison), it lies off the integers, or it names no class.
    #[error("inconsistent label output {value}: {reason}")]
    InconsistentLabel { value: f64, reason: String },

    /// The requested compute backend cannot run here (no `gpu` feature, no device).
    #[error("backend unavailable: {0}")]
    Backend(String),

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

impl ModelError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        ModelError::Io {
            context: context.into(),
            source,
        }
    }
}
