//! Veil's engine: import ONNX models, quantize them, plan their FHE encoding, simulate them
//! in the clear and run them under TFHE with one programmable bootstrap per activation.
//!
//! The pipeline: [`onnx::import_file`] gives a [`FloatModel`]; [`compile`] quantizes it on
//! calibration data and plans it into a [`CompiledModel`] (saved as a `.veil` file); the
//! model then runs in [`simulate`](CompiledModel::simulate) or encrypted through [`fhe`].

pub mod compiled;
pub mod cost;
pub mod data;
pub mod error;
pub mod eval;
pub mod fhe;
pub mod graph;
pub mod onnx;
pub mod plan;
pub mod quantize;
pub mod simulate;

pub use compiled::{ClientSpec, CompiledModel};
pub use error::{ModelError, Result};
pub use graph::FloatModel;
pub use plan::compile;
pub use quantize::QuantConfig;
