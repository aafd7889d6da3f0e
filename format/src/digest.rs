//! SHA-256 names: an evaluation key's id and a model file's digest.

use sha2::{Digest, Sha256};

/// Lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The id a server stores an evaluation key under: the hex SHA-256 of its serialized bytes,
/// so client and server name a key alike without asking each other.
pub fn key_id(eval_key: &[u8]) -> String {
    sha256_hex(eval_key)
}

#[cfg(test)]
mod tests {
    #[test]
    fn key_ids_are_lowercase_hex_sha256() {
        assert_eq!(
            super::key_id(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
