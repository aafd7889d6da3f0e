//! The one place where errors become gRPC statuses.
//!
//! | error | code |
//! |---|---|
//! | undecodable key or ciphertext bytes, wrong number of ciphertexts, malformed request, a `veil-key-id` header naming another key; upload over the key size limit, a key larger than the whole tenant quota or key store, batch over the sample limit (they can never succeed) | INVALID_ARGUMENT |
//! | unknown model, unknown key id | NOT_FOUND |
//! | a valid key for another parameter set (at upload or for the model); a request naming a model digest that is not the served model's; Decrypt on a server without an owner key | FAILED_PRECONDITION |
//! | missing or unknown bearer token | UNAUTHENTICATED |
//! | a model the tenant may not use | PERMISSION_DENIED |
//! | full queue, key quota, request rate, work rate, full key store (a retry later may pass) | RESOURCE_EXHAUSTED |
//! | upload stream that stalls, outlasts its deadline or runs below the minimum rate; a request whose deadline passed while it waited | DEADLINE_EXCEEDED |
//! | every one of `--max-concurrent-calls` taken (answered at once, before the body is read); a request that waited longer than `--max-queue-wait` | UNAVAILABLE |
//! | anything else (I/O, damaged model file, panics) | INTERNAL, details logged only |
//!
//! A key for another parameter set is FAILED_PRECONDITION rather than INVALID_ARGUMENT: the
//! bytes are a well-formed evaluation key, but the server's state (the parameter sets it
//! serves, the model's parameter set) does not admit it.

use tonic::{Code, Status};
use veil_format::FormatError;
use veil_runtime::RuntimeError;

use crate::error::ServiceError;

/// The gRPC code of an error.
pub fn code_of(e: &ServiceError) -> Code {
    match e {
        ServiceError::UnknownModel { .. } | ServiceError::UnknownKey(_) => Code::NotFound,
        ServiceError::InvalidRequest(_) => Code::InvalidArgument,
        // Too large for this server whatever happens: retrying cannot help.
        ServiceError::TooLarge(_) => Code::InvalidArgument,
        ServiceError::Exhausted(_) => Code::ResourceExhausted,
        ServiceError::WrongParameterSet(_)
        | ServiceError::StaleModel(_)
        | ServiceError::NotConfigured(_) => Code::FailedPrecondition,
        ServiceError::Stalled(_) | ServiceError::DeadlineExceeded(_) => Code::DeadlineExceeded,
        ServiceError::Unauthenticated(_) => Code::Unauthenticated,
        ServiceError::Overloaded(_) | ServiceError::Unavailable(_) => Code::Unavailable,
        ServiceError::PermissionDenied(_) => Code::PermissionDenied,
        ServiceError::Shared(inner) => code_of(inner),
        ServiceError::Runtime(RuntimeError::Format(f)) | ServiceError::Format(f) => match f {
            FormatError::Shape(_) | FormatError::InvalidFeature { .. } => Code::InvalidArgument,
            _ => Code::Internal,
        },
        ServiceError::Runtime(r) => match r {
            RuntimeError::Shape(_) | RuntimeError::Crypto(_) => Code::InvalidArgument,
            _ => Code::Internal,
        },
        ServiceError::Io { .. } | ServiceError::Internal(_) | ServiceError::Config(_) => {
            Code::Internal
        }
    }
}

/// The name Prometheus labels and logs use for a code (`NOT_FOUND`).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Status {
        let code = code_of(&e);
        if code == Code::Internal {
            tracing::error!(error = %e, "internal error");
            Status::internal("internal server error (logged on the server)")
        } else {
            tracing::info!(code = ?code, error = %e, "request rejected");
            Status::new(code, e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        let code = |e: ServiceError| Status::from(e).code();
        assert_eq!(
            code(RuntimeError::Crypto("x".into()).into()),
            Code::InvalidArgument
        );
        assert_eq!(
            code(RuntimeError::Shape("x".into()).into()),
            Code::InvalidArgument
        );
        assert_eq!(code(ServiceError::UnknownKey("k".into())), Code::NotFound);
        assert_eq!(
            code(ServiceError::TooLarge("t".into())),
            Code::InvalidArgument
        );
        assert_eq!(
            code(ServiceError::WrongParameterSet("p".into())),
            Code::FailedPrecondition
        );
        assert_eq!(
            code(ServiceError::StaleModel("s".into())),
            Code::FailedPrecondition
        );
        assert_eq!(
            code(ServiceError::Unauthenticated("u".into())),
            Code::Unauthenticated
        );
        assert_eq!(
            code(ServiceError::PermissionDenied("p".into())),
            Code::PermissionDenied
        );
        assert_eq!(
            code(ServiceError::Unavailable("w".into())),
            Code::Unavailable
        );
        assert_eq!(
            code(ServiceError::Exhausted("q".into())),
            Code::ResourceExhausted
        );
        assert_eq!(
            code(ServiceError::Shared(std::sync::Arc::new(
                ServiceError::UnknownKey("k".into())
            ))),
            Code::NotFound
        );
        let internal = Status::from(ServiceError::io(
            "reading /secret/path",
            std::io::Error::other("disk"),
        ));
        assert_eq!(internal.code(), Code::Internal);
        assert!(!internal.message().contains("/secret/path"), "not leaked");
    }
}
