"""Veil's Python client: keys, encrypted inference against a veil-server, and the compiler.

Keys and ciphertexts are made by the Rust client library inside this module; the secret key
never leaves the process. Calls release the GIL while they encrypt, wait on the server and
decrypt.

    import veil_client as veil
    keys = veil.KeyPair.generate()
    client = veil.Client("http://127.0.0.1:50051")
    model = client.model("digits_mlp")
    client.ensure_key(keys)
    labels = model.predict(keys, X)
"""

import os
from typing import Any, Callable, Optional, Union

import numpy as np
import numpy.typing as npt

__version__: str

_Path = Union[str, "os.PathLike[str]"]
_Rows = npt.ArrayLike

class KeyPair:
    """A client key pair: the secret key (never leaves this process) and the evaluation key
    uploaded to the server."""

    @staticmethod
    def generate(params: Optional[str] = None) -> "KeyPair":
        """Generates a fresh key pair (a few seconds) for the parameter set named `params`
        (default: the one Veil's models use). Unknown names raise InvalidArgument."""
    @staticmethod
    def load(dir: _Path) -> "KeyPair":
        """Reads a key directory written by `save` or `veil keygen` (FailedPrecondition when
        it is missing or inconsistent)."""
    def save(self, dir: _Path, overwrite: bool = False) -> None:
        """Writes client.key (secret, mode 0600), eval.key and keys.json into `dir`; keys
        already there are kept (FailedPrecondition) unless `overwrite`."""
    @property
    def key_id(self) -> str:
        """The evaluation key's id (hex SHA-256), as the server knows it."""
    @property
    def params(self) -> str:
        """The TFHE parameter set, e.g. PARAM_MESSAGE_2_CARRY_2_KS_PBS_TUNIFORM_2M128."""
    @property
    def eval_key_bytes(self) -> int:
        """Size of the serialized evaluation key, in bytes."""

class KeyStatus:
    """Whether `Client.ensure_key` uploaded the key."""

    key_id: str
    uploaded: bool
    """True when the call uploaded the key; False when the server already had it."""
    bytes_sent: int

class Client:
    """A connection to a veil-server, with its own tokio runtime.

    `url` is `http://host:port` or `https://host:port`; `token` is sent as
    `authorization: Bearer <token>` (refused over plain http beyond loopback); `ca_cert` is
    a PEM file of the CA that signed the server's certificate (default: the system's roots);
    `deadline_s` bounds each inference request. Calls answered UNAVAILABLE are retried with
    backoff before raising. An unreachable server raises Unavailable.
    """

    def __init__(
        self,
        url: str,
        token: Optional[str] = None,
        ca_cert: Optional[_Path] = None,
        deadline_s: Optional[float] = None,
    ) -> None: ...
    @property
    def url(self) -> str: ...
    def models(self) -> list["Model"]:
        """The models the server serves (for this caller's token)."""
    def model(self, name: str) -> "Model":
        """The served model called `name` (NotFound when there is none)."""
    def ensure_key(
        self,
        keys: KeyPair,
        progress: Optional[Callable[[int, int], Any]] = None,
    ) -> KeyStatus:
        """Makes sure the server holds the evaluation key of `keys`, uploading it (~30 MB)
        only when it does not. `progress(sent_bytes, total_bytes)` is called as the upload
        goes; an exception it raises is re-raised once the upload is over."""
    def delete_key(self, key_id: str) -> int:
        """Removes the key from the server; the bytes it freed (NotFound when the server
        holds no such key of this caller)."""
    def health(self, service: str = "") -> str:
        """The server's gRPC health: "SERVING", "NOT_SERVING" (draining), ..."""

class Model:
    """A served model: public metadata (no weights) and encrypted inference.

    Requests name the model's digest: when the server has since been given another build
    of the model they raise FailedPrecondition instead of being decoded wrongly; get the
    model again with `Client.model`.
    """

    @property
    def name(self) -> str: ...
    @property
    def task(self) -> str:
        """"classifier" or "regressor"."""
    @property
    def input_shape(self) -> list[int]:
        """Shape of one sample without the batch dimension, e.g. [64] or [1, 8, 8]."""
    @property
    def n_features(self) -> int:
        """Features per sample (the product of input_shape)."""
    @property
    def classes(self) -> Optional[list[int]]:
        """The class labels the model records, in score order; None when it records none
        (the predicted label is then the class index)."""
    @property
    def reveal(self) -> str:
        """"scores" (the client decrypts the scores) or "label" (only the predicted class)."""
    @property
    def digest(self) -> str:
        """Hex SHA-256 of the compiled model the server serves."""
    @property
    def params(self) -> str:
        """The TFHE parameter set; keys must be generated for it."""
    @property
    def pbs_per_sample(self) -> int:
        """Bootstraps the server runs per sample."""
    @property
    def max_batch(self) -> int:
        """Most samples per inference request (`predict` splits bigger inputs)."""
    def predict(self, keys: KeyPair, X: _Rows) -> np.ndarray:
        """Encrypted inference on the rows of X (n_samples, n_features) or
        (n_samples, *input_shape): predicted labels (classifiers, int64) or values
        (regressors, float64; 2-D for several targets). The key must be on the server
        (`Client.ensure_key`). A NaN, infinite or huge feature, or the wrong number of
        features, raises InvalidArgument before anything is sent."""
    def predict_scores(self, keys: KeyPair, X: _Rows) -> np.ndarray:
        """Like `predict`, but the outputs (n_samples, n_outputs) float64 after the model's
        clear-text tail: probabilities where the model has them, else scores. A label-only
        model raises FailedPrecondition."""
    def encrypt(self, keys: KeyPair, X: _Rows) -> bytes:
        """Encrypts the rows of X (at most max_batch) into one serialized
        `veil.v1.InferRequest` (protobuf), for callers that send requests themselves: send
        it to `veil.v1.Veil/Infer` with the `veil-key-id` header set to `keys.key_id`."""
    def decrypt(self, keys: KeyPair, response: bytes, scores: bool = False) -> np.ndarray:
        """Decrypts a serialized `veil.v1.InferResponse` into predictions as `predict`
        returns them, or with `scores=True` as `predict_scores` does."""

def compile(
    onnx_path: _Path,
    calibration: _Rows,
    reveal: str = "scores",
    task: Optional[str] = None,
    input_bits: Optional[int] = None,
    first_weight_bits: Optional[int] = None,
    weight_bits: Optional[int] = None,
    act_bits: Optional[int] = None,
    fixed_widths: bool = False,
) -> bytes:
    """Compiles an ONNX model (torch.onnx or skl2onnx export) into .veil bytes, as
    `veil compile` does; write them into the server's models folder as NAME.veil.
    `calibration`: representative input rows (n_samples, n_features), e.g. the training
    set. `reveal`: "scores" or "label" (the argmax runs under encryption). `task`:
    "regressor" marks a network's outputs as values. Rounding warnings are UserWarnings.
    A model Veil cannot compile raises Unimplemented (an unsupported op) or InvalidArgument."""

def estimate(
    model: Union[bytes, _Path],
    calibration: Optional[_Rows] = None,
    measure: bool = False,
) -> dict[str, Any]:
    """What a compiled model costs per sample, as `veil estimate` reports it: a dict with
    "parameter_set", "cost" (bootstraps, request/response bytes, server memory; with
    `measure`, predicted latency on this machine, after a few seconds of timing) and
    "summary". `model`: bytes from `compile`, a .veil path, or an .onnx path with
    `calibration`."""

class VeilError(Exception):
    """Base of Veil's errors."""

    code: int
    """The gRPC status code (as grpc.StatusCode.X.value[0]); errors found on this side carry
    the code the server would have answered."""
    code_name: str
    """The code's name, e.g. "NOT_FOUND"."""
    message: str
    """The server's message (or this side's)."""

class Cancelled(VeilError): ...
class Unknown(VeilError): ...
class InvalidArgument(VeilError): ...
class DeadlineExceeded(VeilError): ...
class NotFound(VeilError): ...
class AlreadyExists(VeilError): ...
class PermissionDenied(VeilError): ...
class ResourceExhausted(VeilError): ...
class FailedPrecondition(VeilError): ...
class Aborted(VeilError): ...
class OutOfRange(VeilError): ...
class Unimplemented(VeilError): ...
class Internal(VeilError): ...
class Unavailable(VeilError): ...
class DataLoss(VeilError): ...
class Unauthenticated(VeilError): ...
