//! Veil's compiler: import ONNX models, quantize them, plan their FHE encoding and simulate
//! them in the clear, with one programmable bootstrap per activation.
//!
//! The pipeline: [`onnx::import_file`] gives a [`FloatModel`]; [`compile`] quantizes it on
//! calibration data and plans it into a [`CompiledModel`] (the `.veil` format of
//! `veil-format`); the model then runs in the clear through [`Simulate`], or encrypted through
//! `veil-runtime`. Nothing here links TFHE.

pub mod data;
pub mod error;
pub mod eval;
pub mod graph;
pub mod onnx;
pub mod plan;
pub mod quantize;
pub mod simulate;

// The format the compiler writes, under the paths the compiler's modules use.
pub use veil_format::{compiled, cost};

pub use compiled::{ClientSpec, CompiledModel};
pub use error::{ModelError, Result};
pub use graph::FloatModel;
pub use plan::compile;
pub use quantize::QuantConfig;
pub use simulate::Simulate;
