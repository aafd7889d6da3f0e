//! Python exceptions: `VeilError` and one subclass per gRPC status code. Every error of the
//! client library and the compiler is mapped to them here, and only here.

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use veil_client::{ClientError, Code};
use veil_format::FormatError;
use veil_models::ModelError;
use veil_runtime::RuntimeError;

create_exception!(
    veil_client,
    VeilError,
    PyException,
    "Base of Veil's errors. `code` is the gRPC status code (an int, as in grpc.StatusCode's \
     value[0]), `code_name` its name (e.g. \"NOT_FOUND\"), `message` the text. Errors found \
     on this side (a NaN feature, keys for another parameter set) carry the code the server \
     would have answered."
);

macro_rules! codes {
    ($($class:ident = $code:ident, $name:literal, $doc:literal;)*) => {
        $(create_exception!(veil_client, $class, VeilError, $doc);)*

        /// The exception class and name of `code`.
        fn class_of(py: Python<'_>, code: Code) -> (Bound<'_, pyo3::types::PyType>, &'static str) {
            match code {
                $(Code::$code => (py.get_type::<$class>(), $name),)*
                Code::Ok => (py.get_type::<VeilError>(), "OK"),
            }
        }

        /// Adds the exception classes to the module.
        pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
            let py = m.py();
            m.add("VeilError", py.get_type::<VeilError>())?;
            $(m.add(stringify!($class), py.get_type::<$class>())?;)*
            Ok(())
        }
    };
}

codes! {
    Cancelled = Cancelled, "CANCELLED", "The call was cancelled.";
    Unknown = Unknown, "UNKNOWN", "An error without a better code (e.g. a file that cannot be written).";
    InvalidArgument = InvalidArgument, "INVALID_ARGUMENT",
        "Bad input: a NaN, infinite or huge feature, the wrong number of features, a bad ONNX file or option.";
    DeadlineExceeded = DeadlineExceeded, "DEADLINE_EXCEEDED", "The call's deadline passed.";
    NotFound = NotFound, "NOT_FOUND", "No such model or key (for this caller).";
    AlreadyExists = AlreadyExists, "ALREADY_EXISTS", "Already exists.";
    PermissionDenied = PermissionDenied, "PERMISSION_DENIED", "The token's tenant may not use this model.";
    ResourceExhausted = ResourceExhausted, "RESOURCE_EXHAUSTED", "A quota or rate limit of the server.";
    FailedPrecondition = FailedPrecondition, "FAILED_PRECONDITION",
        "Not possible in this state: the server now serves another build of the model (stale \
         digest), keys for another parameter set, scores of a label-only model.";
    Aborted = Aborted, "ABORTED", "The call was aborted.";
    OutOfRange = OutOfRange, "OUT_OF_RANGE", "A value out of range.";
    Unimplemented = Unimplemented, "UNIMPLEMENTED", "Not supported (e.g. an ONNX op the compiler does not know).";
    Internal = Internal, "INTERNAL", "A broken invariant: an unexpected server answer, a failed decryption.";
    Unavailable = Unavailable, "UNAVAILABLE", "The server cannot be reached or is overloaded (retried before raising).";
    DataLoss = DataLoss, "DATA_LOSS", "A decrypted output that does not decode (noise beyond the model's bounds).";
    Unauthenticated = Unauthenticated, "UNAUTHENTICATED", "A missing or unknown token.";
}

/// The exception for `code` with `message` as its text; `detail` (the server's own message,
/// when there is one) becomes `.message`.
pub fn error(code: Code, text: String, detail: Option<String>) -> PyErr {
    Python::with_gil(|py| {
        let (class, name) = class_of(py, code);
        let make = || -> PyResult<PyErr> {
            let value = class.call1((text.clone(),))?;
            value.setattr("code", code as i32)?;
            value.setattr("code_name", name)?;
            value.setattr("message", detail.clone().unwrap_or_else(|| text.clone()))?;
            Ok(PyErr::from_value(value))
        };
        make().unwrap_or_else(|e| e)
    })
}

fn format_code(e: &FormatError) -> Code {
    match e {
        FormatError::InvalidFeature { .. }
        | FormatError::Shape(_)
        | FormatError::QuantConfig(_) => Code::InvalidArgument,
        FormatError::InconsistentLabel { .. } => Code::DataLoss,
        FormatError::Io { source, .. } => io_code(source),
        _ => Code::Internal,
    }
}

fn io_code(e: &std::io::Error) -> Code {
    match e.kind() {
        std::io::ErrorKind::NotFound => Code::NotFound,
        std::io::ErrorKind::PermissionDenied => Code::PermissionDenied,
        _ => Code::Unknown,
    }
}

/// The code of a client-library error: the server's status, or what the server would say.
pub fn client_code(e: &ClientError) -> Code {
    match e {
        ClientError::Status(s) => s.code(),
        ClientError::Connect { .. } => Code::Unavailable,
        ClientError::UnknownModel { .. } => Code::NotFound,
        ClientError::Format(f) => format_code(f),
        ClientError::Runtime(RuntimeError::Format(f)) => format_code(f),
        // A ciphertext of the wrong size: bytes the caller passed in.
        ClientError::Runtime(RuntimeError::Shape(_)) => Code::InvalidArgument,
        ClientError::Runtime(RuntimeError::Keys(_)) => Code::FailedPrecondition,
        ClientError::Runtime(RuntimeError::Io { source, .. }) => io_code(source),
        ClientError::Runtime(_) | ClientError::InvalidSpec { .. } | ClientError::Protocol(_) => {
            Code::Internal
        }
        ClientError::Config(_) => Code::InvalidArgument,
        ClientError::Keys(_) => Code::FailedPrecondition,
        ClientError::Io { source, .. } => io_code(source),
    }
}

pub fn client_error(e: ClientError) -> PyErr {
    let detail = match &e {
        ClientError::Status(s) => Some(s.message().to_string()),
        _ => None,
    };
    error(client_code(&e), e.to_string(), detail)
}

pub fn model_error(e: ModelError) -> PyErr {
    let code = match &e {
        ModelError::InvalidOnnx(_) | ModelError::Csv { .. } | ModelError::Shape(_) => {
            Code::InvalidArgument
        }
        ModelError::Unsupported { .. } => Code::Unimplemented,
        ModelError::Plan(_) => Code::FailedPrecondition,
        ModelError::Format(f) => format_code(f),
        ModelError::Io { source, .. } => io_code(source),
    };
    error(code, e.to_string(), None)
}

/// An error raised on this side with `code`.
pub fn local(code: Code, text: impl Into<String>) -> PyErr {
    error(code, text.into(), None)
}
