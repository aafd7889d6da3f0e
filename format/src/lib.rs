//! Veil's compiled-model format: the contract between the compiler, the server and the client.
//!
//! - [`compiled`]: the `.veil` file ([`CompiledModel`]), the [`ClientSpec`] a server sends to
//!   its clients, and the TFHE parameter set ([`ParamSet`]) with its dimensions.
//! - [`quant`], [`tail`]: the quantizers and the clear-text functions a model records.
//! - [`input`], [`decode`]: the client's checks on its features and the decoding of decrypted
//!   outputs into predictions.
//! - [`cost`]: bootstraps, bytes and memory per sample, predicted from the format alone.
//! - [`digest`]: key ids and model digests (SHA-256).
//!
//! Nothing here runs FHE: the runtime (`veil-runtime`) and the compiler (`veil-models`) build
//! on it.

pub mod compiled;
pub mod cost;
pub mod decode;
pub mod digest;
pub mod error;
pub mod input;
pub mod quant;
pub mod tail;

pub use compiled::{ClientSpec, CompiledModel, LweDims, ParamSet};
pub use decode::Prediction;
pub use error::{FormatError, Result};
pub use quant::{QuantConfig, UniformQuant};
