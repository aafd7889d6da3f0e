"""Fixtures: zoo models compiled by `veil compile`, real veil-server processes on loopback
(free ports), one key pair for the session.

The binaries come from $VEIL_BIN_DIR (default: target/release of this repository).
"""

import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

import veil_client as veil

REPO = Path(__file__).resolve().parents[2]
ZOO = REPO / "models" / "zoo"
BIN = Path(os.environ.get("VEIL_BIN_DIR", REPO / "target" / "release"))
MODELS = ["digits_mlp", "breast_cancer_logreg"]
TOKEN = "py-test-token-1"


def veil_cli(*args: str) -> str:
    """Runs the `veil` binary; its stdout."""
    out = subprocess.run(
        [str(BIN / "veil"), *args], check=True, capture_output=True, text=True
    )
    return out.stdout


def load_csv(path: Path, limit: int):
    """Features and labels of the first `limit` rows of a zoo CSV (last column: label)."""
    data = np.loadtxt(path, delimiter=",", skiprows=1, max_rows=limit, ndmin=2)
    return data[:, :-1], data[:, -1].astype(np.int64)


class Server:
    """A veil-server process on loopback; `stop` ends it (SIGTERM)."""

    def __init__(self, models: Path, data: Path, listen: str = "127.0.0.1:0", extra=()):
        data.mkdir(parents=True, exist_ok=True)
        self.out = data.parent / f"{data.name}-server.out"
        self.log = data.parent / f"{data.name}-server.log"
        with open(self.out, "wb") as out, open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [str(BIN / "veil-server"), "--models", str(models), "--data-dir", str(data),
                 "--listen", listen, *extra],
                stdout=out, stderr=log,
            )
        prefix = "veil-server listening on "
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and self.proc.poll() is None:
            lines = [l for l in self.out.read_text().splitlines() if l.startswith(prefix)]
            if lines:
                self.addr = lines[0][len(prefix):].strip()
                self.url = f"http://{self.addr}"
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"veil-server did not start:\n{self.log.read_text()[-4000:]}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="session")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("veil")


@pytest.fixture(scope="session")
def models_dir(work) -> Path:
    """The zoo models compiled with the CLI, as the server serves them."""
    d = work / "models"
    d.mkdir()
    for name in MODELS:
        veil_cli("compile", str(ZOO / name / "model.onnx"), "--calibration",
                 str(ZOO / name / "train.csv"), "-o", str(d / f"{name}.veil"))
    return d


@pytest.fixture(scope="session")
def server(work, models_dir):
    s = Server(models_dir, work / "data")
    yield s
    s.stop()


@pytest.fixture(scope="session")
def keys(work) -> veil.KeyPair:
    k = veil.KeyPair.generate()
    k.save(work / "keys")  # for `veil infer --keys`
    return k


@pytest.fixture(scope="session")
def keys_dir(work, keys) -> Path:
    return work / "keys"


@pytest.fixture(scope="session")
def client(server, keys) -> veil.Client:
    c = veil.Client(server.url)
    c.ensure_key(keys)
    return c


@pytest.fixture(scope="session")
def tenant_server(work, models_dir):
    """A server with a tenants file: one tenant, token TOKEN, digits_mlp only."""
    tenants = work / "tenants.toml"
    tenants.write_text(
        "[[tenant]]\n"
        'name = "py"\n'
        f'token_sha256 = "{hashlib.sha256(TOKEN.encode()).hexdigest()}"\n'
        'models = ["digits_mlp"]\n'
    )
    s = Server(models_dir, work / "tenant-data", extra=["--tenants", str(tenants)])
    yield s
    s.stop()


def veil_infer(url: str, model: str, keys_dir: Path, csv: Path, limit: int, batch: int = 1) -> dict:
    """`veil infer --json` on the first `limit` rows of `csv`."""
    return json.loads(veil_cli(
        "infer", "--server", url, "--model", model, "--keys", str(keys_dir),
        "--data", str(csv), "--limit", str(limit), "--batch", str(batch), "--json"))


def copy_model(src: Path, dst_dir: Path, name: str) -> None:
    dst_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst_dir / f"{name}.veil")

