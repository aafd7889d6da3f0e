"""The Python client's overhead against `veil infer`: the same rows, key and server,
interleaved rounds, per-sample latency (encrypt + request + decrypt) of both.

    python python/bench/overhead.py [--rows 20] [--rounds 3]

`veil infer --json` reports its own per-sample latency (measured in-process around
encrypt, Infer and decrypt, excluding its start-up); the Python side is timed around
`Model.predict` with time.perf_counter. Batch 1: one request per row; batch N: all rows in
requests of max_batch. Binaries from $VEIL_BIN_DIR (default target/release).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import veil_client as veil

REPO = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("VEIL_BIN_DIR", REPO / "target" / "release"))
CSV = REPO / "models" / "zoo" / "digits_mlp" / "test.csv"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    X = np.loadtxt(CSV, delimiter=",", skiprows=1, max_rows=a.rows)[:, :-1]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "models").mkdir()
        subprocess.run([str(BIN / "veil"), "compile", str(CSV.parent / "model.onnx"),
                        "--calibration", str(CSV.parent / "train.csv"),
                        "-o", str(tmp / "models" / "digits_mlp.veil")],
                       check=True, capture_output=True)
        out = tmp / "server.out"
        with open(out, "wb") as o, open(tmp / "server.log", "wb") as log:
            server = subprocess.Popen(
                [str(BIN / "veil-server"), "--models", str(tmp / "models"), "--data-dir",
                 str(tmp / "data"), "--listen", "127.0.0.1:0"], stdout=o, stderr=log)
        try:
            url = None
            for _ in range(600):
                lines = [l for l in out.read_text().splitlines() if "listening on" in l]
                if lines:
                    url = "http://" + lines[0].split()[-1]
                    break
                time.sleep(0.1)
            if url is None:
                sys.exit("veil-server did not start")
            keys = veil.KeyPair.generate()
            keys.save(tmp / "keys")
            client = veil.Client(url)
            client.ensure_key(keys)
            model = client.model("digits_mlp")

            def cli(batch: int) -> list[float]:
                r = subprocess.run(
                    [str(BIN / "veil"), "infer", "--server", url, "--model", "digits_mlp",
                     "--keys", str(tmp / "keys"), "--data", str(CSV), "--limit", str(a.rows),
                     "--batch", str(batch), "--json"], check=True, capture_output=True, text=True)
                j = json.loads(r.stdout)
                if batch == 1:
                    res["cli_enc"].append(j["encrypt_ms_median"])
                return j["latency_ms_per_sample"]

            def py(batch: int) -> list[float]:
                ms = []
                for i in range(0, a.rows, batch):
                    rows = X[i:i + batch]
                    t = time.perf_counter()
                    model.predict(keys, rows)
                    ms += [(time.perf_counter() - t) * 1e3 / len(rows)] * len(rows)
                return ms

            def py_encrypt() -> None:
                ms = []
                for i in range(a.rows):
                    t = time.perf_counter()
                    model.encrypt(keys, X[i:i + 1])
                    ms.append((time.perf_counter() - t) * 1e3)
                res["py_enc"].append(statistics.median(ms))

            res = {k: [] for k in ["cli1", "py1", "cliN", "pyN", "cli_enc", "py_enc"]}
            for r in range(a.rounds):
                order = [("cli1", cli, 1), ("py1", py, 1), ("pyN", py, a.rows), ("cliN", cli, a.rows)]
                if r % 2:
                    order = order[::-1]
                for name, f, b in order:
                    res[name].append(statistics.mean(f(b)))
                py_encrypt()
        finally:
            server.terminate()
            server.wait()
    print(f"digits_mlp, {a.rows} rows, {a.rounds} interleaved rounds; mean ms per sample per round")
    for b, (c, p) in [("1", ("cli1", "py1")), (f"{a.rows} (max_batch {model.max_batch})", ("cliN", "pyN"))]:
        ratios = [pv / cv for pv, cv in zip(res[p], res[c])]
        print(f"batch {b}: veil infer {[round(v, 1) for v in res[c]]}, "
              f"python {[round(v, 1) for v in res[p]]}, python/cli ratio per round "
              f"{[round(x, 3) for x in ratios]}, median {statistics.median(ratios):.3f}")
    # Client-side work alone (no server noise): encrypting one sample, median per round;
    # Python's includes building the serialized InferRequest.
    ratios = [p / c for p, c in zip(res["py_enc"], res["cli_enc"])]
    print(f"encrypt one sample: veil infer {[round(v, 2) for v in res['cli_enc']]} ms, "
          f"python Model.encrypt {[round(v, 2) for v in res['py_enc']]} ms, "
          f"ratio median {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
