//! Ciphertexts as bytes. Decoding checks sizes before anything is allocated or built, so
//! hostile bytes give an error, never a panic or an unbounded allocation.

use bincode::Options;
use serde::{Deserialize, Serialize};
use tfhe::core_crypto::commons::math::random::{CompressionSeed, Seed};
use tfhe::core_crypto::prelude::{
    CiphertextModulus, DefaultRandomGenerator, LweCiphertextList, LweCiphertextListOwned, LweSize,
    SeededLweCiphertextList, par_decompress_seeded_lwe_ciphertext_list,
};

use crate::error::{ModelError, Result};

/// One sample's encrypted inputs: LWE ciphertexts under the big key whose masks are derived
/// from one seed, so only the bodies travel (8 bytes per feature plus a 16-byte seed).
#[derive(Clone, Debug)]
pub struct EncryptedInput {
    pub(crate) seed: u128,
    pub(crate) list: SeededLweCiphertextList<Vec<u64>>,
}

/// One sample's encrypted outputs (full LWE ciphertexts).
#[derive(Clone, Debug)]
pub struct EncryptedOutput(pub(crate) LweCiphertextListOwned<u64>);

#[derive(Serialize, Deserialize)]
struct SeededWire {
    lwe_size: u64,
    seed: u128,
    bodies: Vec<u64>,
}

#[derive(Serialize, Deserialize)]
struct ListWire {
    lwe_size: u64,
    data: Vec<u64>,
}

fn options(limit: u64) -> impl Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_limit(limit)
        .reject_trailing_bytes()
}

fn bad(why: String) -> ModelError {
    ModelError::Crypto(why)
}

impl EncryptedInput {
    pub(crate) fn new(seed: u128, list: SeededLweCiphertextList<Vec<u64>>) -> Self {
        EncryptedInput { seed, list }
    }

    pub fn len(&self) -> usize {
        self.list.lwe_ciphertext_count().0
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let wire = SeededWire {
            lwe_size: self.list.lwe_size().0 as u64,
            seed: self.seed,
            bodies: self.list.as_ref().to_vec(),
        };
        options(u64::MAX)
            .serialize(&wire)
            .expect("plain data serializes")
    }

    /// Decodes one sample's inputs, which must be `count` ciphertexts of LWE size `lwe_size`.
    pub fn from_bytes(bytes: &[u8], count: usize, lwe_size: usize) -> Result<Self> {
        let limit = 64 + 8 * count as u64;
        let wire: SeededWire = options(limit)
            .deserialize(bytes)
            .map_err(|e| bad(format!("undecodable encrypted input ({e})")))?;
        if wire.lwe_size != lwe_size as u64 {
            return Err(bad(format!(
                "input ciphertexts have LWE size {}, the parameter set uses {lwe_size}",
                wire.lwe_size
            )));
        }
        if wire.bodies.len() != count {
            return Err(ModelError::Shape(format!(
                "{} input ciphertexts, the model takes {count}",
                wire.bodies.len()
            )));
        }
        let list = SeededLweCiphertextList::from_container(
            wire.bodies,
            LweSize(lwe_size),
            CompressionSeed::from(Seed(wire.seed)),
            CiphertextModulus::new_native(),
        );
        Ok(EncryptedInput {
            seed: wire.seed,
            list,
        })
    }

    /// Regenerates the masks from the seed into `dst` (this sample's slice of a layer input),
    /// one ciphertext per rayon task (the mask stream is forked per ciphertext, so the result
    /// equals the sequential expansion). A lone sample then expands on every core.
    pub(crate) fn expand_into(&self, dst: &mut [u64]) {
        let mut out = LweCiphertextList::from_container(
            dst,
            self.list.lwe_size(),
            self.list.ciphertext_modulus(),
        );
        par_decompress_seeded_lwe_ciphertext_list::<_, _, _, DefaultRandomGenerator>(
            &mut out, &self.list,
        );
    }
}

impl EncryptedOutput {
    pub fn len(&self) -> usize {
        self.0.lwe_ciphertext_count().0
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let wire = ListWire {
            lwe_size: self.0.lwe_size().0 as u64,
            data: self.0.as_ref().to_vec(),
        };
        options(u64::MAX)
            .serialize(&wire)
            .expect("plain data serializes")
    }

    /// Decodes one sample's outputs: `count` ciphertexts of LWE size `lwe_size`.
    pub fn from_bytes(bytes: &[u8], count: usize, lwe_size: usize) -> Result<Self> {
        let limit = 64 + 8 * (count * lwe_size) as u64;
        let wire: ListWire = options(limit)
            .deserialize(bytes)
            .map_err(|e| bad(format!("undecodable encrypted output ({e})")))?;
        if wire.lwe_size != lwe_size as u64 || wire.data.len() != count * lwe_size {
            return Err(bad(format!(
                "expected {count} ciphertexts of LWE size {lwe_size}, got {} values of LWE size {}",
                wire.data.len(),
                wire.lwe_size
            )));
        }
        Ok(EncryptedOutput(LweCiphertextListOwned::from_container(
            wire.data,
            LweSize(lwe_size),
            CiphertextModulus::new_native(),
        )))
    }
}
