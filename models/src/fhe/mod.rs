//! Encrypted execution with TFHE (the `tfhe` crate, shortint parameter sets).
//!
//! - [`keys`]: the client's secret key, the evaluation key it uploads, and the server-side
//!   key material (keyswitching key, Fourier bootstrapping key, modulus-switch setting).
//! - [`backend`]: the batched keyswitch + bootstrap interface and [`EvalKey`], a client's key
//!   in one backend's form; [`backend::CpuBackend`] runs batches on rayon.
//! - `gpu` (feature `gpu`): the same batches on a CUDA device, with the key and the model's
//!   lookup tables kept in device memory.
//! - [`executor`]: runs a compiled model on encrypted inputs: PBS-free linear layers, one
//!   batched bootstrap per hidden neuron.
//! - [`wire`]: ciphertexts as bytes, with size limits and shape checks.

pub mod backend;
pub mod calibrate;
pub mod executor;
#[cfg(feature = "gpu")]
pub mod gpu;
pub mod keys;
pub mod wire;

pub use backend::{BackendKind, CpuBackend, EvalKey, LookupTables, PbsBackend, gpu_available};
pub use calibrate::calibrate;
pub use executor::{FheModel, Profile};
pub use keys::{ClientKey, ServerKey};
pub use wire::{EncryptedInput, EncryptedOutput};

use tfhe::shortint::ClassicPBSParameters;

use crate::compiled::ParamSet;

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
    let sp = shortint_params(p);
    sp.glwe_dimension.0 * sp.polynomial_size.0 + 1
}
