//! Veil's gRPC contract, package `veil.v1`: generated messages, client and server stubs, and
//! the encoded file descriptor set that server reflection serves.

#[allow(clippy::doc_lazy_continuation, clippy::large_enum_variant)]
pub mod v1 {
    tonic::include_proto!("veil.v1");
}

/// gRPC metadata that repeats the request's key id (Infer, GetKey, UploadKey, DeleteKey), so a
/// load balancer can route every call of one key to the same replica, where its expanded
/// form is cached. The server refuses a call whose header and body disagree.
pub const KEY_ID_HEADER: &str = "veil-key-id";

/// The encoded `FileDescriptorSet` of `veil/v1/veil.proto`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("veil_descriptor");

#[cfg(test)]
mod tests {
    use prost::Message;

    #[test]
    fn descriptor_set_decodes_and_names_the_service() {
        let fds = prost_types_fds(super::FILE_DESCRIPTOR_SET);
        assert_eq!(fds.0, vec!["veil/v1/veil.proto".to_string()]);
        assert_eq!(fds.1, "veil.v1");
        assert!(fds.2.contains(&"Veil".to_string()));
    }

    /// Decodes just enough of descriptor.proto (file name, package, service names) to check
    /// the embedded set without another dependency.
    fn prost_types_fds(bytes: &[u8]) -> (Vec<String>, String, Vec<String>) {
        #[derive(Message)]
        struct Fds {
            #[prost(message, repeated, tag = "1")]
            file: Vec<File>,
        }
        #[derive(Message)]
        struct File {
            #[prost(string, tag = "1")]
            name: String,
            #[prost(string, tag = "2")]
            package: String,
            #[prost(message, repeated, tag = "6")]
            service: Vec<Service>,
        }
        #[derive(Message)]
        struct Service {
            #[prost(string, tag = "1")]
            name: String,
        }
        let fds = Fds::decode(bytes).expect("the descriptor set decodes");
        let names = fds.file.iter().map(|f| f.name.clone()).collect();
        let package = fds.file[0].package.clone();
        let services = fds.file[0].service.iter().map(|s| s.name.clone()).collect();
        (names, package, services)
    }

    #[test]
    fn messages_round_trip() {
        let req = super::v1::InferRequest {
            model: "digits_mlp".into(),
            key_id: "ab".repeat(32),
            samples: vec![vec![1, 2, 3]],
            model_digest: String::new(),
        };
        let back = super::v1::InferRequest::decode(req.encode_to_vec().as_slice()).unwrap();
        assert_eq!(req, back);
    }
}
