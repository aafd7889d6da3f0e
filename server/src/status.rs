//! The one place where errors become gRPC statuses.
//!
//! | error | code |
//! |---|---|
//! | undecodable key or ciphertext bytes, wrong number of ciphertexts, malformed request | INVALID_ARGUMENT |
//! | unknown model, unknown key id | NOT_FOUND |
//! | a valid key for another parameter set (at upload or for the model) | FAILED_PRECONDITION |
//! | upload over the key size limit, batch over the sample limit | RESOURCE_EXHAUSTED |
//! | upload stream that stalls | DEADLINE_EXCEEDED |
//! | anything else (I/O, damaged model file, panics) | INTERNAL, details logged only |
//!
//! A key for another parameter set is FAILED_PRECONDITION rather than INVALID_ARGUMENT: the
//! bytes are a well-formed evaluation key, but the server's state (the parameter sets it
//! serves, the model's parameter set) does not admit it.

use tonic::{Code, Status};
use veil_models::ModelError;

use crate::error::ServiceError;

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Status {
        let code = match &e {
            ServiceError::UnknownModel { .. } | ServiceError::UnknownKey(_) => Code::NotFound,
            ServiceError::InvalidRequest(_) => Code::InvalidArgument,
            ServiceError::TooLarge(_) => Code::ResourceExhausted,
            ServiceError::WrongParameterSet(_) => Code::FailedPrecondition,
            ServiceError::Stalled(_) => Code::DeadlineExceeded,
            ServiceError::Model(m) => match m {
                ModelError::Shape(_) | ModelError::Crypto(_) | ModelError::Csv { .. } => {
                    Code::InvalidArgument
                }
                _ => Code::Internal,
            },
            ServiceError::Io { .. } | ServiceError::Internal(_) => Code::Internal,
        };
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
            code(ModelError::Crypto("x".into()).into()),
            Code::InvalidArgument
        );
        assert_eq!(
            code(ModelError::Shape("x".into()).into()),
            Code::InvalidArgument
        );
        assert_eq!(code(ServiceError::UnknownKey("k".into())), Code::NotFound);
        assert_eq!(
            code(ServiceError::TooLarge("t".into())),
            Code::ResourceExhausted
        );
        assert_eq!(
            code(ServiceError::WrongParameterSet("p".into())),
            Code::FailedPrecondition
        );
        let internal = Status::from(ServiceError::io(
            "reading /secret/path",
            std::io::Error::other("disk"),
        ));
        assert_eq!(internal.code(), Code::Internal);
        assert!(!internal.message().contains("/secret/path"), "not leaked");
    }
}
