//! `Client` and `Model`: calls to a veil-server, on a tokio runtime owned by the client, with
//! the GIL released while they run.

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use numpy::{AllowTypeChange, PyArrayLikeDyn};
use prost::Message;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use tokio::runtime::Runtime;
use veil_client::{Code, ConnectOptions, RemoteModel};
use veil_format::tail::{Reveal, Task};
use veil_proto::v1;

use crate::arrays;
use crate::errors::{client_error, local};
use crate::keys::PyKeyPair;

/// How often a call waiting on the runtime checks for Ctrl-C.
const SIGNAL_POLL: Duration = Duration::from_millis(200);

/// The runtime and the connection, shared by a client and the models it returned.
struct Conn {
    rt: Runtime,
    client: veil_client::Client,
    url: String,
}

impl Conn {
    /// Runs `fut` to completion with the GIL released; Ctrl-C (a pending signal the
    /// interpreter raises) abandons it, which cancels its RPC.
    fn run<T: Send>(
        &self,
        py: Python<'_>,
        fut: impl Future<Output = veil_client::Result<T>> + Send,
    ) -> PyResult<T> {
        let out = py.allow_threads(|| {
            self.rt.block_on(async {
                tokio::pin!(fut);
                loop {
                    tokio::select! {
                        r = &mut fut => return Ok::<_, PyErr>(r),
                        _ = tokio::time::sleep(SIGNAL_POLL) => {
                            Python::with_gil(|py| py.check_signals())?;
                        }
                    }
                }
            })
        })?;
        out.map_err(client_error)
    }
}

/// A connection to a veil-server.
///
/// `url` is `http://host:port` or `https://host:port`; `token` is sent as
/// `authorization: Bearer <token>` (refused over plain http beyond loopback); `ca_cert` is a
/// PEM file of the CA that signed the server's certificate (default: the system's roots);
/// `deadline_s` bounds each inference request (None: no deadline). Calls answered
/// UNAVAILABLE (an overloaded or draining server) are retried with backoff before raising.
#[pyclass(module = "veil_client", name = "Client", frozen)]
pub struct PyClient {
    conn: Arc<Conn>,
}

#[pymethods]
impl PyClient {
    #[new]
    #[pyo3(signature = (url, token = None, ca_cert = None, deadline_s = None))]
    fn new(
        py: Python<'_>,
        url: String,
        token: Option<String>,
        ca_cert: Option<PathBuf>,
        deadline_s: Option<f64>,
    ) -> PyResult<Self> {
        let deadline = match deadline_s {
            None => None,
            Some(s) if s.is_finite() && s > 0.0 => Some(Duration::from_secs_f64(s)),
            Some(s) => {
                return Err(local(
                    Code::InvalidArgument,
                    format!("deadline_s must be a positive number of seconds, not {s}"),
                ));
            }
        };
        if token.as_deref().is_some_and(|t| t.trim().is_empty()) {
            return Err(local(Code::InvalidArgument, "the token is empty"));
        }
        let options = ConnectOptions {
            token: token.map(|t| t.trim().to_string()),
            ..ConnectOptions::default()
        }
        .with_pem_files(ca_cert.as_deref(), None, None)
        .map_err(client_error)?;
        // Two workers carry the connection's I/O; encryption runs on the blocking pool.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("veil-client")
            .enable_all()
            .build()
            .map_err(|e| local(Code::Internal, format!("starting the tokio runtime: {e}")))?;
        let client = py
            .allow_threads(|| rt.block_on(veil_client::Client::connect_with(&url, &options)))
            .map_err(client_error)?
            .with_deadline(deadline);
        Ok(PyClient {
            conn: Arc::new(Conn { rt, client, url }),
        })
    }

    /// The models the server serves (for this caller's token).
    fn models(&self, py: Python<'_>) -> PyResult<Vec<PyModel>> {
        let conn = &self.conn;
        let models = conn.run(py, conn.client.list_models())?;
        Ok(models.into_iter().map(|m| self.wrap(m)).collect())
    }

    /// The served model called `name` (NotFound when there is none).
    fn model(&self, py: Python<'_>, name: &str) -> PyResult<PyModel> {
        let conn = &self.conn;
        Ok(self.wrap(conn.run(py, conn.client.model(name))?))
    }

    /// Makes sure the server holds the evaluation key of `keys`, uploading it (~30 MB) only
    /// when it does not. `progress(sent_bytes, total_bytes)` is called as the upload goes;
    /// an exception it raises is re-raised once the upload is over.
    #[pyo3(signature = (keys, progress = None))]
    fn ensure_key(
        &self,
        py: Python<'_>,
        keys: &PyKeyPair,
        progress: Option<PyObject>,
    ) -> PyResult<KeyStatus> {
        let failed: Arc<Mutex<Option<PyErr>>> = Arc::default();
        let report = {
            let failed = Arc::clone(&failed);
            move |sent: u64, total: u64| {
                let Some(f) = &progress else { return };
                Python::with_gil(|py| {
                    if let Err(e) = f.call1(py, (sent, total)) {
                        failed.lock().unwrap().get_or_insert(e);
                    }
                });
            }
        };
        let conn = &self.conn;
        let status = conn.run(py, conn.client.ensure_key(&keys.inner, report))?;
        if let Some(e) = failed.lock().unwrap().take() {
            return Err(e);
        }
        Ok(KeyStatus {
            key_id: status.key_id,
            uploaded: status.uploaded,
            bytes_sent: status.bytes_sent,
        })
    }

    /// Removes the key with id `key_id` from the server; the bytes it freed. NotFound when
    /// the server holds no such key of this caller.
    fn delete_key(&self, py: Python<'_>, key_id: &str) -> PyResult<u64> {
        let conn = &self.conn;
        conn.run(py, conn.client.delete_key(key_id))
    }

    /// The server's gRPC health for `service` ("" for the whole server): "SERVING",
    /// "NOT_SERVING" (draining) or another status name.
    #[pyo3(signature = (service = ""))]
    fn health(&self, py: Python<'_>, service: &str) -> PyResult<String> {
        let conn = &self.conn;
        conn.run(py, conn.client.health(service))
    }

    #[getter]
    fn url(&self) -> &str {
        &self.conn.url
    }

    fn __repr__(&self) -> String {
        format!("Client('{}')", self.conn.url)
    }
}

impl PyClient {
    fn wrap(&self, model: RemoteModel) -> PyModel {
        PyModel {
            conn: Arc::clone(&self.conn),
            model: Arc::new(model),
        }
    }
}

/// Whether `Client.ensure_key` uploaded the key.
#[pyclass(module = "veil_client", frozen, get_all)]
pub struct KeyStatus {
    /// The evaluation key's id.
    key_id: String,
    /// True when this call uploaded the key; False when the server already had it.
    uploaded: bool,
    /// Key bytes sent by this call (0 when nothing was uploaded).
    bytes_sent: u64,
}

#[pymethods]
impl KeyStatus {
    fn __repr__(&self) -> String {
        format!(
            "KeyStatus(key_id='{}', uploaded={}, bytes_sent={})",
            self.key_id,
            if self.uploaded { "True" } else { "False" },
            self.bytes_sent
        )
    }
}

/// A model served by the server: its public metadata (no weights), and encrypted inference.
/// Requests name the model's digest: if the server has since been given another build of
/// the model, they fail with FailedPrecondition instead of being decoded wrongly; get the
/// model again with `Client.model`.
#[pyclass(module = "veil_client", name = "Model", frozen)]
pub struct PyModel {
    conn: Arc<Conn>,
    model: Arc<RemoteModel>,
}

impl PyModel {
    fn regression(&self) -> bool {
        self.model.spec.task == Task::Regression
    }

    /// Encrypts, infers (in batches of at most `max_batch`) and decrypts the rows of `x`.
    fn infer(
        &self,
        py: Python<'_>,
        keys: &PyKeyPair,
        x: &PyArrayLikeDyn<'_, f64, AllowTypeChange>,
    ) -> PyResult<Vec<veil_format::Prediction>> {
        let xs = arrays::rows(x)?;
        let (conn, model, keys) = (&self.conn, &self.model, &keys.inner);
        conn.run(py, conn.client.predict(model, keys, &xs))
    }

    fn scores_revealed(&self) -> PyResult<()> {
        if self.model.spec.reveal == Reveal::Label {
            return Err(local(
                Code::FailedPrecondition,
                format!(
                    "model '{}' reveals only the predicted label (compiled with reveal=\"label\"); \
                     use predict",
                    self.model.name()
                ),
            ));
        }
        Ok(())
    }
}

#[pymethods]
impl PyModel {
    #[getter]
    fn name(&self) -> &str {
        self.model.name()
    }

    /// "classifier" or "regressor".
    #[getter]
    fn task(&self) -> &'static str {
        self.model.spec.task.name()
    }

    /// Shape of one sample, without the batch dimension, e.g. (64,) or (1, 8, 8).
    #[getter]
    fn input_shape(&self) -> Vec<usize> {
        self.model.spec.input_shape.clone()
    }

    /// Features per sample (the product of `input_shape`).
    #[getter]
    fn n_features(&self) -> usize {
        self.model.n_features()
    }

    /// The class labels the model records, in score order; None when it records none (the
    /// predicted label is then the class index).
    #[getter]
    fn classes(&self) -> Option<Vec<i64>> {
        self.model.spec.class_labels.clone()
    }

    /// "scores" (the client decrypts the scores) or "label" (only the predicted class).
    #[getter]
    fn reveal(&self) -> &'static str {
        self.model.spec.reveal.name()
    }

    /// Hex SHA-256 of the compiled model the server serves.
    #[getter]
    fn digest(&self) -> &str {
        self.model.digest()
    }

    /// The TFHE parameter set; keys must be generated for it.
    #[getter]
    fn params(&self) -> &'static str {
        self.model.spec.params.name()
    }

    /// Bootstraps the server runs per sample (the cost of one sample).
    #[getter]
    fn pbs_per_sample(&self) -> u64 {
        self.model.info.pbs_per_sample
    }

    /// Most samples in one inference request (`predict` splits bigger inputs).
    #[getter]
    fn max_batch(&self) -> usize {
        self.model.max_batch()
    }

    /// Encrypted inference on the rows of X (n_samples, n_features): the predicted labels
    /// (classifiers, int64) or values (regressors, float64; 2-D for several targets). The
    /// key must be on the server (`Client.ensure_key`). A NaN, infinite or huge feature, or
    /// the wrong number of features, raises InvalidArgument before anything is sent.
    #[pyo3(signature = (keys, X))]
    #[allow(non_snake_case)]
    fn predict<'py>(
        &self,
        py: Python<'py>,
        keys: &PyKeyPair,
        X: PyArrayLikeDyn<'py, f64, AllowTypeChange>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let p = self.infer(py, keys, &X)?;
        arrays::predictions(py, self.regression(), self.model.n_outputs(), p)
    }

    /// Like `predict`, but the model's outputs (n_samples, n_outputs) float64 after its
    /// clear-text tail: probabilities where the model has them, else scores. A label-only
    /// model raises FailedPrecondition.
    #[pyo3(signature = (keys, X))]
    #[allow(non_snake_case)]
    fn predict_scores<'py>(
        &self,
        py: Python<'py>,
        keys: &PyKeyPair,
        X: PyArrayLikeDyn<'py, f64, AllowTypeChange>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.scores_revealed()?;
        let p = self.infer(py, keys, &X)?;
        arrays::outputs(py, self.model.n_outputs(), p)
    }

    /// Encrypts the rows of X into one serialized `veil.v1.InferRequest` (protobuf bytes:
    /// model, key id, digest, one encrypted sample per row), for callers that send requests
    /// themselves. At most `max_batch` rows. Send it with the `veil-key-id` header set to
    /// the key id; decode the `InferResponse` with `decrypt`.
    #[pyo3(signature = (keys, X))]
    #[allow(non_snake_case)]
    fn encrypt<'py>(
        &self,
        py: Python<'py>,
        keys: &PyKeyPair,
        X: PyArrayLikeDyn<'py, f64, AllowTypeChange>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let xs = arrays::rows(&X)?;
        if xs.len() > self.model.max_batch() {
            return Err(local(
                Code::InvalidArgument,
                format!(
                    "{} rows: one request of model '{}' carries at most {}; split X",
                    xs.len(),
                    self.model.name(),
                    self.model.max_batch()
                ),
            ));
        }
        let (model, keys) = (&self.model, &keys.inner);
        let samples = py
            .allow_threads(|| {
                model.check_rows(&xs)?;
                xs.iter()
                    .map(|x| model.encrypt(keys, x))
                    .collect::<veil_client::Result<Vec<_>>>()
            })
            .map_err(client_error)?;
        let req = v1::InferRequest {
            model: model.name().to_string(),
            key_id: keys.key_id.clone(),
            samples,
            model_digest: model.digest().to_string(),
        };
        Ok(PyBytes::new(py, &req.encode_to_vec()))
    }

    /// Decrypts a serialized `veil.v1.InferResponse` (protobuf bytes) into predictions, as
    /// `predict` returns them, or with `scores=True` as `predict_scores` does.
    #[pyo3(signature = (keys, response, scores = false))]
    fn decrypt<'py>(
        &self,
        py: Python<'py>,
        keys: &PyKeyPair,
        response: &[u8],
        scores: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        if scores {
            self.scores_revealed()?;
        }
        let reply = v1::InferResponse::decode(response).map_err(|e| {
            local(
                Code::InvalidArgument,
                format!("not a serialized InferResponse: {e}"),
            )
        })?;
        let (model, keys) = (&self.model, &keys.inner);
        let p = py
            .allow_threads(|| {
                reply
                    .outputs
                    .iter()
                    .map(|o| model.decrypt(keys, o))
                    .collect::<veil_client::Result<Vec<_>>>()
            })
            .map_err(client_error)?;
        if scores {
            arrays::outputs(py, self.model.n_outputs(), p)
        } else {
            arrays::predictions(py, self.regression(), self.model.n_outputs(), p)
        }
    }

    fn __repr__(&self) -> String {
        format!(
            "Model(name='{}', task='{}', input_shape={:?}, reveal='{}', digest='{}')",
            self.model.name(),
            self.task(),
            self.model.spec.input_shape,
            self.reveal(),
            &self.model.digest()[..self.model.digest().len().min(12)]
        )
    }
}
