//! `KeyPair`: the client's keys, as `veil keygen` writes them.

use std::path::PathBuf;
use std::sync::Arc;

use pyo3::prelude::*;
use veil_client::keys::PARAM_SETS;
use veil_client::{Code, param_set_by_name};

use crate::errors::{client_error, local};

/// A client key pair: the secret key (never leaves this process) and the evaluation key
/// that is uploaded to the server.
#[pyclass(module = "veil_client", name = "KeyPair", frozen)]
pub struct PyKeyPair {
    pub inner: Arc<veil_client::KeyPair>,
}

#[pymethods]
impl PyKeyPair {
    /// Generates a fresh key pair (a few seconds) for the parameter set named `params`
    /// (default: the one Veil's models use).
    #[staticmethod]
    #[pyo3(signature = (params = None))]
    fn generate(py: Python<'_>, params: Option<&str>) -> PyResult<Self> {
        let params = match params {
            None => PARAM_SETS[0],
            Some(name) => param_set_by_name(name).ok_or_else(|| {
                let known: Vec<_> = PARAM_SETS.iter().map(|p| p.name()).collect();
                local(
                    Code::InvalidArgument,
                    format!("unknown parameter set {name}; known: {}", known.join(", ")),
                )
            })?,
        };
        let inner = py.allow_threads(|| veil_client::KeyPair::generate(params));
        Ok(PyKeyPair {
            inner: Arc::new(inner),
        })
    }

    /// Reads a key directory written by `save` or `veil keygen`.
    #[staticmethod]
    fn load(py: Python<'_>, dir: PathBuf) -> PyResult<Self> {
        let inner = py
            .allow_threads(|| veil_client::KeyPair::load(&dir))
            .map_err(|e| client_error(e.into()))?;
        Ok(PyKeyPair {
            inner: Arc::new(inner),
        })
    }

    /// Writes client.key (secret, mode 0600), eval.key and keys.json into `dir`; keys
    /// already there are kept (an error) unless `overwrite`.
    #[pyo3(signature = (dir, overwrite = false))]
    fn save(&self, py: Python<'_>, dir: PathBuf, overwrite: bool) -> PyResult<()> {
        py.allow_threads(|| self.inner.save(&dir, overwrite))
            .map_err(|e| client_error(e.into()))
    }

    /// The evaluation key's id (hex SHA-256), as the server knows it.
    #[getter]
    fn key_id(&self) -> &str {
        &self.inner.key_id
    }

    /// The TFHE parameter set, e.g. PARAM_MESSAGE_2_CARRY_2_KS_PBS_TUNIFORM_2M128.
    #[getter]
    fn params(&self) -> &'static str {
        self.inner.params.name()
    }

    /// Size of the serialized evaluation key, in bytes.
    #[getter]
    fn eval_key_bytes(&self) -> usize {
        self.inner.eval_key.len()
    }

    fn __repr__(&self) -> String {
        format!(
            "KeyPair(key_id='{}', params='{}')",
            self.inner.key_id,
            self.inner.params.name()
        )
    }
}
