//! numpy arrays in and out.

use numpy::ndarray::Array2;
use numpy::{AllowTypeChange, IntoPyArray, PyArrayLikeDyn};
use pyo3::prelude::*;
use veil_client::Code;
use veil_format::Prediction;

use crate::errors::local;

/// The rows of `x`: (n_samples, n_features), or (n_samples, *input_shape) flattened per row.
/// Values are checked later, by the client library, so that errors name their row.
pub fn rows(x: &PyArrayLikeDyn<'_, f64, AllowTypeChange>) -> PyResult<Vec<Vec<f64>>> {
    let a = x.as_array();
    if a.ndim() < 2 {
        return Err(local(
            Code::InvalidArgument,
            format!(
                "X must be 2-D (n_samples, n_features), not {}-D; for one sample use \
                 X.reshape(1, -1)",
                a.ndim()
            ),
        ));
    }
    Ok(a.outer_iter()
        .map(|row| row.iter().copied().collect())
        .collect())
}

/// Labels (classifiers, int64) or values (regressors, float64: 1-D for one target, else
/// (n_samples, n_targets)), as scikit-learn's `predict` returns them.
pub fn predictions<'py>(
    py: Python<'py>,
    regression: bool,
    n_outputs: usize,
    p: Vec<Prediction>,
) -> PyResult<Bound<'py, PyAny>> {
    if !regression {
        let labels: Vec<i64> = p.iter().map(|p| p.label).collect();
        return Ok(labels.into_pyarray(py).into_any());
    }
    let width = p.first().map_or(n_outputs, |p| p.outputs.len());
    if width == 1 && p.iter().all(|p| p.outputs.len() == 1) {
        let v: Vec<f64> = p.iter().map(|p| p.outputs[0]).collect();
        return Ok(v.into_pyarray(py).into_any());
    }
    outputs(py, n_outputs, p)
}

/// The model's outputs after its clear-text tail, (n_samples, n_outputs) float64; the width
/// is the decoded one (a tail may change it), `n_outputs` when there are no samples.
pub fn outputs<'py>(
    py: Python<'py>,
    n_outputs: usize,
    p: Vec<Prediction>,
) -> PyResult<Bound<'py, PyAny>> {
    let n = p.len();
    let n_outputs = p.first().map_or(n_outputs, |p| p.outputs.len());
    let flat: Vec<f64> = p.into_iter().flat_map(|p| p.outputs).collect();
    let a = Array2::from_shape_vec((n, n_outputs), flat)
        .map_err(|e| local(Code::Internal, format!("decoded outputs: {e}")))?;
    Ok(a.into_pyarray(py).into_any())
}
