//! The compiler (`veil compile`, `veil estimate`) from Python: ONNX plus calibration rows in,
//! `.veil` bytes out. veil-models holds no FHE code; it adds little to the wheel.

use std::path::PathBuf;

use numpy::{AllowTypeChange, PyArrayLikeDyn};
use pyo3::exceptions::PyUserWarning;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use veil_client::Code;
use veil_models::graph::{Reveal, Task};
use veil_models::{CompiledModel, QuantConfig, onnx};

use crate::arrays;
use crate::errors::{local, model_error};

/// Compiles an ONNX model (a torch.onnx or skl2onnx export) for encrypted inference and
/// returns the compiled model (.veil bytes; write them into the server's models folder as
/// NAME.veil). `calibration` holds representative input rows (n_samples, n_features), e.g.
/// the training set. `reveal` is "scores" (the client decrypts the scores) or "label" (only
/// the predicted class; the argmax runs under encryption, costing more bootstraps). `task`
/// "regressor" marks a network's outputs as predicted values (default: as the model says,
/// else "classifier"). The bit widths default to `veil compile`'s; `fixed_widths` uses them
/// exactly instead of searching per model. Rounding warnings are issued as UserWarning.
#[pyfunction]
#[pyo3(signature = (
    onnx_path, calibration, reveal = "scores", task = None, input_bits = None,
    first_weight_bits = None, weight_bits = None, act_bits = None, fixed_widths = false
))]
#[allow(clippy::too_many_arguments)]
pub fn compile<'py>(
    py: Python<'py>,
    onnx_path: PathBuf,
    calibration: PyArrayLikeDyn<'py, f64, AllowTypeChange>,
    reveal: &str,
    task: Option<&str>,
    input_bits: Option<u32>,
    first_weight_bits: Option<u32>,
    weight_bits: Option<u32>,
    act_bits: Option<u32>,
    fixed_widths: bool,
) -> PyResult<Bound<'py, PyBytes>> {
    let reveal = match reveal {
        "scores" => Reveal::Scores,
        "label" => Reveal::Label,
        other => {
            return Err(local(
                Code::InvalidArgument,
                format!("reveal must be \"scores\" or \"label\", not {other:?}"),
            ));
        }
    };
    let task = match task {
        None => None,
        Some("classifier") => Some(Task::Classification),
        Some("regressor") => Some(Task::Regression),
        Some(other) => {
            return Err(local(
                Code::InvalidArgument,
                format!("task must be \"classifier\" or \"regressor\", not {other:?}"),
            ));
        }
    };
    let rows = arrays::rows(&calibration)?;
    let d = QuantConfig::default();
    let cfg = QuantConfig {
        input_bits: input_bits.unwrap_or(d.input_bits),
        first_weight_bits: first_weight_bits.unwrap_or(d.first_weight_bits),
        weight_bits: weight_bits.unwrap_or(d.weight_bits),
        act_bits: act_bits.unwrap_or(d.act_bits),
        search: !fixed_widths,
        ..d
    };
    let compiled = py.allow_threads(|| -> veil_models::Result<CompiledModel> {
        let mut float = onnx::import_file(&onnx_path)?;
        if let Some(t) = task {
            float.task = t;
        }
        if reveal == Reveal::Label && float.task == Task::Regression {
            return Err(veil_models::ModelError::Plan(
                "reveal=\"label\" needs a classifier; this model predicts values".into(),
            ));
        }
        let float = float.with_reveal(reveal)?;
        for (i, r) in rows.iter().enumerate() {
            if r.len() != float.n_features() {
                return Err(veil_models::ModelError::Shape(format!(
                    "calibration row {i}: {} features given, the model takes {}",
                    r.len(),
                    float.n_features()
                )));
            }
            veil_format::input::check_row(i, r)?;
        }
        veil_models::compile(&float, &rows, &cfg)
    });
    let compiled = compiled.map_err(model_error)?;
    for w in compiled.rounding.iter().filter_map(|r| r.warning()) {
        let msg = std::ffi::CString::new(w).unwrap_or_default();
        PyErr::warn(py, py.get_type::<PyUserWarning>().as_any(), &msg, 1)?;
    }
    Ok(PyBytes::new(py, &compiled.to_bytes()))
}

/// What a compiled model costs per sample, before running it: a dict with "parameter_set",
/// "cost" (bootstraps, bytes per request and response, server memory; with `measure`, the
/// predicted latency on this machine) and "summary" (stages, accumulator widths). `model`
/// is compiled bytes (from `compile`), or a path to a .veil file, or to an .onnx file with
/// `calibration` rows. `measure` times bootstraps on this machine first (a few seconds).
#[pyfunction]
#[pyo3(signature = (model, calibration = None, measure = false))]
pub fn estimate<'py>(
    py: Python<'py>,
    model: &Bound<'py, PyAny>,
    calibration: Option<PyArrayLikeDyn<'py, f64, AllowTypeChange>>,
    measure: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let compiled = if let Ok(bytes) = model.downcast::<PyBytes>() {
        let bytes = bytes.as_bytes().to_vec();
        py.allow_threads(|| CompiledModel::from_bytes(&bytes))
            .map_err(|e| model_error(e.into()))?
    } else {
        let path: PathBuf = model.extract()?;
        if path.extension().is_some_and(|e| e == "onnx") {
            let Some(calibration) = calibration else {
                return Err(local(
                    Code::InvalidArgument,
                    "an ONNX model needs calibration rows; or pass compile()'s bytes",
                ));
            };
            let bytes = compile(
                py,
                path,
                calibration,
                "scores",
                None,
                None,
                None,
                None,
                None,
                false,
            )?;
            let bytes = bytes.as_bytes().to_vec();
            py.allow_threads(|| CompiledModel::from_bytes(&bytes))
                .map_err(|e| model_error(e.into()))?
        } else {
            py.allow_threads(|| CompiledModel::load(&path))
                .map_err(|e| model_error(e.into()))?
        }
    };
    let machine =
        measure.then(|| py.allow_threads(|| veil_runtime::calibrate::calibrate(compiled.params)));
    let out = serde_json::json!({
        "parameter_set": compiled.params.name(),
        "cost": compiled.cost(machine.as_ref()),
        "summary": compiled.summary(),
        "machine": machine,
    });
    let text =
        serde_json::to_string(&out).map_err(|e| local(Code::Internal, format!("estimate: {e}")))?;
    py.import("json")?.call_method1("loads", (text,))
}
