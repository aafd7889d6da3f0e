//! Typed errors of the compiler.

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

    /// Inputs that do not fit the model (wrong number of features or ciphertexts).
    #[error("shape mismatch: {0}")]
    Shape(String),

    /// Quantization or planning could not find an encoding that fits the parameter set.
    #[error("cannot compile: {0}")]
    Plan(String),

    /// The format's rules (a compiled model, a spec, a feature value, a decoded output).
    #[error(transparent)]
    Format(#[from] veil_format::FormatError),

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
