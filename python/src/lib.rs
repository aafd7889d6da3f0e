//! `veil_client`, Veil's Python module: keys, encrypted inference against a veil-server and
//! the model compiler, built on the Rust client library (keys and ciphertexts are tfhe-rs
//! bincode, so they are made here, not in Python). Build the wheel with
//! `maturin build --release` in this folder.

mod arrays;
mod client;
mod compile;
mod errors;
mod keys;

use pyo3::prelude::*;

#[pymodule(name = "veil_client")]
fn veil_client_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<keys::PyKeyPair>()?;
    m.add_class::<client::PyClient>()?;
    m.add_class::<client::PyModel>()?;
    m.add_class::<client::KeyStatus>()?;
    m.add_function(wrap_pyfunction!(compile::compile, m)?)?;
    m.add_function(wrap_pyfunction!(compile::estimate, m)?)?;
    errors::register(m)
}
