//! Ciphertexts as bytes. Decoding checks sizes before anything is allocated or built, so
//! hostile bytes give an error, never a panic or an unbounded allocation.

use bincode::Options;
use serde::{Deserialize, Serialize};
use tfhe::core_crypto::commons::math::random::{CompressionSeed, Seed};
use tfhe::core_crypto::prelude::{
    CiphertextModulus, DefaultRandomGenerator, LweCiphertextList, LweCiphertextListOwned, LweSize,
    SeededLweCiphertextList, par_decompress_seeded_lwe_ciphertext_list,
};

use crate::error::{Result, RuntimeError};

/// One sample's encrypted inputs: LWE ciphertexts under the big key whose masks are derived
/// from one seed, so only the bodies travel (8 bytes per feature plus a 16-byte seed).
#[derive(Clone, Debug)]
pub struct EncryptedInput {
    pub(crate) seed: u128,
    pub(crate) list: SeededLweCiphertextList<Vec<u64>>,
}

/// One sample's encrypted outputs: big-key LWE ciphertexts whose elements keep only their
/// top `bits` bits (a modulus switch to 2^bits, rounded; the low bits are zero), so that the
/// wire form packs `bits` bits per element and decryption is the native one.
#[derive(Clone, Debug)]
pub struct EncryptedOutput {
    pub(crate) list: LweCiphertextListOwned<u64>,
    pub(crate) bits: u32,
}

#[derive(Serialize, Deserialize)]
struct SeededWire {
    lwe_size: u64,
    seed: u128,
    bodies: Vec<u64>,
}

#[derive(Serialize, Deserialize)]
struct ListWire {
    lwe_size: u64,
    count: u64,
    bits: u32,
    /// Every element's top `bits` bits, packed least significant first.
    words: Vec<u64>,
}

/// Rounds `x` to its top `bits` bits (the modulus switch from 2^64 to 2^bits), kept in place.
fn round_to_bits(x: u64, bits: u32) -> u64 {
    if bits >= 64 {
        return x;
    }
    let shift = 64 - bits;
    (x.wrapping_add(1 << (shift - 1)) >> shift) << shift
}

fn pack(values: &[u64], bits: u32) -> Vec<u64> {
    let mut words = vec![0u64; (values.len() * bits as usize).div_ceil(64)];
    let shift = 64 - bits;
    for (i, &v) in values.iter().enumerate() {
        let v = if bits == 64 { v } else { v >> shift };
        let at = i * bits as usize;
        let (w, o) = (at / 64, at % 64);
        words[w] |= v << o;
        if o + bits as usize > 64 {
            words[w + 1] |= v >> (64 - o);
        }
    }
    words
}

fn unpack(words: &[u64], count: usize, bits: u32) -> Vec<u64> {
    let mask = if bits == 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    };
    (0..count)
        .map(|i| {
            let at = i * bits as usize;
            let (w, o) = (at / 64, at % 64);
            let mut v = words[w] >> o;
            if o + bits as usize > 64 {
                v |= words[w + 1] << (64 - o);
            }
            let v = v & mask;
            if bits == 64 { v } else { v << (64 - bits) }
        })
        .collect()
}

/// Bincode as every Veil wire and file body uses it: fixed-width integers, a size limit, no
/// trailing bytes.
pub(crate) fn options(limit: u64) -> impl Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_limit(limit)
        .reject_trailing_bytes()
}

fn bad(why: String) -> RuntimeError {
    RuntimeError::Crypto(why)
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
            return Err(RuntimeError::Shape(format!(
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
        self.list.lwe_ciphertext_count().0
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bits kept per element (the ciphertext modulus is 2^bits).
    pub fn bits(&self) -> u32 {
        self.bits
    }

    /// The outputs in `words` (full-precision ciphertexts of `lwe_size` words), switched to
    /// `bits` bits in the same pass that copies them.
    pub(crate) fn switched_from(words: &[u64], lwe_size: usize, bits: u32) -> Result<Self> {
        if !(1..=64).contains(&bits) {
            return Err(bad(format!("cannot switch outputs to {bits} bits")));
        }
        let data = words.iter().map(|&x| round_to_bits(x, bits)).collect();
        Ok(EncryptedOutput {
            list: LweCiphertextListOwned::from_container(
                data,
                LweSize(lwe_size),
                CiphertextModulus::new_native(),
            ),
            bits,
        })
    }

    /// The same ciphertexts switched to modulus 2^bits (`bits` in 1..=64, at most the
    /// current): each element rounded to its top bits. The mask is not re-randomized.
    pub fn modulus_switched(&self, bits: u32) -> Result<Self> {
        if !(1..=self.bits).contains(&bits) {
            return Err(bad(format!(
                "cannot switch outputs of {} bits to {bits} bits",
                self.bits
            )));
        }
        Self::switched_from(self.list.as_ref(), self.list.lwe_size().0, bits)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let wire = ListWire {
            lwe_size: self.list.lwe_size().0 as u64,
            count: self.len() as u64,
            bits: self.bits,
            words: pack(self.list.as_ref(), self.bits),
        };
        options(u64::MAX)
            .serialize(&wire)
            .expect("plain data serializes")
    }

    /// Decodes one sample's outputs: `count` ciphertexts of LWE size `lwe_size`, `bits` bits
    /// per element.
    pub fn from_bytes(bytes: &[u8], count: usize, lwe_size: usize, bits: u32) -> Result<Self> {
        if !(1..=64).contains(&bits) {
            return Err(bad(format!("{bits} bits per output element")));
        }
        let n = count * lwe_size;
        let limit = veil_format::compiled::output_wire_bytes(count, lwe_size, bits) as u64;
        let wire: ListWire = options(limit)
            .deserialize(bytes)
            .map_err(|e| bad(format!("undecodable encrypted output ({e})")))?;
        if wire.lwe_size != lwe_size as u64
            || wire.count != count as u64
            || wire.bits != bits
            || wire.words.len() != (n * bits as usize).div_ceil(64)
        {
            return Err(bad(format!(
                "expected {count} ciphertexts of LWE size {lwe_size} at {bits} bits, got {} of \
                 LWE size {} at {} bits in {} words",
                wire.count,
                wire.lwe_size,
                wire.bits,
                wire.words.len()
            )));
        }
        Ok(EncryptedOutput {
            list: LweCiphertextListOwned::from_container(
                unpack(&wire.words, n, bits),
                LweSize(lwe_size),
                CiphertextModulus::new_native(),
            ),
            bits,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_round_trips_at_every_width() {
        let values: Vec<u64> = (0..37u64)
            .map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15))
            .collect();
        for bits in [1, 7, 12, 14, 16, 31, 32, 63, 64] {
            let rounded: Vec<u64> = values.iter().map(|&v| round_to_bits(v, bits)).collect();
            let words = pack(&rounded, bits);
            assert_eq!(words.len(), (37 * bits as usize).div_ceil(64));
            assert_eq!(unpack(&words, 37, bits), rounded, "{bits} bits");
        }
        // Rounding, not truncation: 0x..8 at 60 bits goes up.
        assert_eq!(round_to_bits(0x18, 60), 0x20);
        assert_eq!(round_to_bits(0x17, 60), 0x10);
    }
}
