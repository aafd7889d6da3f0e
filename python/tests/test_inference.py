"""Encrypted inference from Python against a real server, checked row by row against
`veil infer` on the same rows and key."""

import hashlib

import numpy as np
import pytest

import veil_client as veil
from conftest import MODELS, ZOO, load_csv, veil_cli, veil_infer

ROWS = 10


def test_keys_round_trip(tmp_path, keys):
    keys.save(tmp_path / "k")
    loaded = veil.KeyPair.load(tmp_path / "k")
    assert loaded.key_id == keys.key_id
    assert loaded.params == keys.params
    assert len(keys.key_id) == 64 and keys.eval_key_bytes > 1_000_000
    with pytest.raises(veil.FailedPrecondition):
        keys.save(tmp_path / "k")  # kept unless overwrite
    keys.save(tmp_path / "k", overwrite=True)
    with pytest.raises(veil.FailedPrecondition):
        veil.KeyPair.load(tmp_path / "missing")
    with pytest.raises(veil.InvalidArgument):
        veil.KeyPair.generate("NO_SUCH_PARAMS")


def test_ensure_key_uploads_once(server, keys):
    c = veil.Client(server.url)
    seen = []
    fresh = veil.KeyPair.generate()
    st = c.ensure_key(fresh, progress=lambda sent, total: seen.append((sent, total)))
    assert st.uploaded and st.key_id == fresh.key_id and st.bytes_sent == fresh.eval_key_bytes
    assert seen and seen[-1] == (fresh.eval_key_bytes, fresh.eval_key_bytes)
    again = c.ensure_key(fresh)
    assert not again.uploaded and again.bytes_sent == 0
    assert c.delete_key(fresh.key_id) > 0
    with pytest.raises(veil.NotFound) as e:
        c.delete_key(fresh.key_id)
    assert e.value.code == 5 and e.value.code_name == "NOT_FOUND"


def test_models_metadata(client, models_dir):
    names = sorted(m.name for m in client.models())
    assert names == sorted(MODELS)
    digits = client.model("digits_mlp")
    assert digits.task == "classifier"
    assert list(digits.input_shape) == [64] and digits.n_features == 64
    assert digits.reveal == "scores"
    assert digits.max_batch >= 1 and digits.pbs_per_sample > 0
    # The digest is the SHA-256 of the served file.
    served = (models_dir / "digits_mlp.veil").read_bytes()
    assert digits.digest == hashlib.sha256(served).hexdigest()
    bc = client.model("breast_cancer_logreg")
    assert bc.classes in (None, [0, 1])


@pytest.mark.parametrize("name", MODELS)
def test_predict_matches_veil_infer(server, client, keys, keys_dir, name):
    csv = ZOO / name / "test.csv"
    X, y = load_csv(csv, ROWS)
    model = client.model(name)
    got = model.predict(keys, X)
    assert got.dtype == np.int64 and got.shape == (ROWS,)
    cli = veil_infer(server.url, name, keys_dir, csv, ROWS, batch=ROWS)
    assert not cli["key_uploaded"], "the same key, uploaded by Python"
    assert got.tolist() == cli["predictions"]
    assert np.mean(got == y) == pytest.approx(cli["accuracy"])
    print(f"{name}: accuracy {np.mean(got == y):.3f} on {ROWS} rows, same as veil infer")


def test_predict_scores(client, keys):
    X, _ = load_csv(ZOO / "digits_mlp" / "test.csv", 3)
    model = client.model("digits_mlp")
    scores = model.predict_scores(keys, X)
    assert scores.shape == (3, 10) and scores.dtype == np.float64
    assert np.argmax(scores, axis=1).tolist() == model.predict(keys, X).tolist()
    # Lists work too; no rows give no predictions.
    assert model.predict(keys, X[:1].tolist()).shape == (1,)
    assert model.predict(keys, np.zeros((0, 64))).shape == (0,)


@pytest.mark.parametrize("name", MODELS)
def test_compile_matches_veil_compile(models_dir, client, keys, name):
    calib = np.loadtxt(ZOO / name / "train.csv", delimiter=",", skiprows=1)[:, :-1]
    compiled = veil.compile(ZOO / name / "model.onnx", calib)
    assert compiled == (models_dir / f"{name}.veil").read_bytes()
    est = veil.estimate(compiled)
    assert est["cost"]["pbs_per_sample"] == client.model(name).pbs_per_sample
    assert est["parameter_set"] == keys.params
    assert est == veil.estimate(models_dir / f"{name}.veil")


def test_compile_errors(tmp_path):
    calib = np.zeros((4, 30))
    onnx = ZOO / "breast_cancer_logreg" / "model.onnx"
    with pytest.raises(veil.InvalidArgument):
        veil.compile(onnx, calib, reveal="everything")
    with pytest.raises(veil.InvalidArgument):
        veil.compile(onnx, np.zeros((4, 29)))
    calib[1, 2] = np.nan
    with pytest.raises(veil.InvalidArgument, match="row 1, column 2"):
        veil.compile(onnx, calib)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(veil.InvalidArgument):
        veil.compile(bad, np.zeros((4, 30)))
    with pytest.raises(veil.NotFound):
        veil.compile(tmp_path / "missing.onnx", np.zeros((4, 30)))
