//! Veil's FHE runtime: encrypted execution of a compiled model with TFHE (the `tfhe` crate,
//! shortint parameter sets). It reads the format (`veil-format`) and knows nothing of ONNX or
//! of the compiler.
//!
//! - [`keys`]: the client's secret key, the evaluation key it uploads, and the server-side
//!   key material (keyswitching key, Fourier bootstrapping key, modulus-switch setting);
//!   [`key_dir`]: a key pair on disk, as `veil keygen` writes it.
//! - [`backend`]: the batched keyswitch + bootstrap interface and [`EvalKey`], a client's key
//!   in one backend's form; [`backend::CpuBackend`] runs batches on rayon.
//! - `gpu` (feature `gpu`): the same batches on a CUDA device, with the key and the model's
//!   lookup tables kept in device memory.
//! - [`executor`]: runs a compiled model on encrypted inputs: PBS-free linear layers, one
//!   batched bootstrap per hidden neuron.
//! - [`wire`]: ciphertexts as bytes, with size limits and shape checks.
//! - [`encrypted_model`]: encrypted-model mode: the owner's weights and tables encrypted
//!   under her key, run on clear inputs, results only she decrypts.

pub mod backend;
pub mod calibrate;
pub mod encrypted_model;
pub mod error;
pub mod executor;
#[cfg(feature = "gpu")]
pub mod gpu;
pub mod key_dir;
pub mod keys;
pub mod wire;

pub use backend::{BackendKind, CpuBackend, EvalKey, LookupTables, PbsBackend, gpu_available};
pub use calibrate::calibrate;
pub use encrypted_model::{EncryptedModel, EncryptedResults};
pub use error::{Result, RuntimeError};
pub use executor::{FheModel, Profile};
pub use keys::{ClientKey, ServerKey};
pub use wire::{EncryptedInput, EncryptedOutput};

use tfhe::shortint::ClassicPBSParameters;

use veil_format::compiled::ParamSet;

/// The tfhe parameter set behind a [`ParamSet`].
pub fn shortint_params(p: ParamSet) -> ClassicPBSParameters {
    match p {
        ParamSet::Message2Carry2KsPbsTuniform2m128 => {
            tfhe::shortint::parameters::PARAM_MESSAGE_2_CARRY_2_KS_PBS_TUNIFORM_2M128
        }
    }
}

/// LWE size of ciphertexts between operations (the big key, k * N + 1).
pub fn big_lwe_size(p: ParamSet) -> usize {
    p.dims().big_lwe_size()
}

#[cfg(test)]
mod tests {
    use veil_format::LweDims;

    use super::*;

    /// The format sizes keys and ciphertexts from its own table; it must be tfhe's.
    #[test]
    fn format_dims_are_tfhes() {
        for p in ParamSet::ALL {
            let sp = shortint_params(p);
            let tfhe = LweDims {
                lwe_dimension: sp.lwe_dimension.0,
                glwe_dimension: sp.glwe_dimension.0,
                polynomial_size: sp.polynomial_size.0,
                ks_level: sp.ks_level.0,
                pbs_level: sp.pbs_level.0,
            };
            assert_eq!(p.dims(), tfhe, "{}", p.name());
        }
    }
}
