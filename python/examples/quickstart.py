"""Veil from Python, end to end on one machine.

Trains a scikit-learn logistic regression on the breast-cancer data set, exports it with
skl2onnx, compiles it for encrypted inference with veil_client.compile, starts a veil-server
serving it (a subprocess on a free loopback port), and classifies test rows encrypted:
the server never sees the features or the result. Prints the encrypted predictions beside
scikit-learn's plaintext ones.

    pip install veil-client scikit-learn skl2onnx   # the wheel: see README, "From Python"
    python python/examples/quickstart.py

The server binary is $VEIL_SERVER, else veil-server from $VEIL_BIN_DIR, else
target/release/veil-server of this repository.
"""

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from skl2onnx import to_onnx
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import veil_client as veil

N_TEST = int(os.environ.get("VEIL_QUICKSTART_ROWS", "10"))


def server_binary() -> Path:
    if "VEIL_SERVER" in os.environ:
        return Path(os.environ["VEIL_SERVER"])
    repo = Path(__file__).resolve().parents[2]
    return Path(os.environ.get("VEIL_BIN_DIR", repo / "target" / "release")) / "veil-server"


def start_server(models: Path, data: Path) -> tuple[subprocess.Popen, str]:
    """veil-server on 127.0.0.1, free port; its URL once it listens."""
    out = data.parent / "server.out"
    with open(out, "wb") as o, open(data.parent / "server.log", "wb") as log:
        proc = subprocess.Popen(
            [str(server_binary()), "--models", str(models), "--data-dir", str(data),
             "--listen", "127.0.0.1:0"], stdout=o, stderr=log)
    prefix = "veil-server listening on "
    for _ in range(1200):
        for line in out.read_text().splitlines():
            if line.startswith(prefix):
                return proc, "http://" + line[len(prefix):].strip()
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    sys.exit("veil-server did not start:\n" + (data.parent / "server.log").read_text())


def main() -> None:
    # 1. The model owner trains and exports as usual.
    X, y = load_breast_cancer(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.2, random_state=0)
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(X_train, y_train)
    onnx_model = to_onnx(clf, X_train[:1].astype(np.float32), options={"zipmap": False})

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "model.onnx").write_bytes(onnx_model.SerializeToString())

        # 2. ...compiles it for encrypted inference (the training rows calibrate the
        # quantization) and serves the .veil file.
        compiled = veil.compile(tmp / "model.onnx", X_train)
        cost = veil.estimate(compiled)["cost"]
        print(f"compiled: {len(compiled)} bytes, {cost['pbs_per_sample']} bootstraps per sample, "
              f"{cost['request_bytes_per_sample']} request bytes per sample")
        (tmp / "models").mkdir()
        (tmp / "models" / "breast_cancer.veil").write_bytes(compiled)
        server, url = start_server(tmp / "models", tmp / "data")
        try:
            # 3. The client keeps its secret key; only the evaluation key is uploaded.
            keys = veil.KeyPair.generate()
            client = veil.Client(url)
            model = client.model("breast_cancer")
            print(f"serving {model.name} at {url}: {model.task}, input {model.input_shape}, "
                  f"classes {model.classes}, reveal {model.reveal}")
            client.ensure_key(keys)

            rows = X_test[:N_TEST]
            t = time.perf_counter()
            encrypted = model.predict(keys, rows)
            seconds = time.perf_counter() - t
            proba = model.predict_scores(keys, rows[:3])
        finally:
            server.terminate()
            server.wait()

    plain = clf.predict(rows)
    print(f"{'row':>4} {'encrypted':>10} {'sklearn':>8} {'label':>6}")
    for i, (e, p, l) in enumerate(zip(encrypted, plain, y_test[:N_TEST])):
        print(f"{i:>4} {e:>10} {p:>8} {l:>6}")
    agree = np.mean(encrypted == plain)
    print(f"encrypted vs plaintext agreement: {agree:.0%} on {len(rows)} rows "
          f"({seconds / len(rows) * 1e3:.0f} ms per row)")
    print("encrypted probabilities, first rows:\n", np.round(proba, 3))
    print("sklearn probabilities, first rows:\n", np.round(clf.predict_proba(rows[:3]), 3))
    if agree < 0.9:
        sys.exit("encrypted predictions disagree with scikit-learn")


if __name__ == "__main__":
    main()
