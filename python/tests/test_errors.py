"""Typed errors: each carries its gRPC code, from the server or found on this side."""

import shutil

import numpy as np
import pytest

import veil_client as veil
from conftest import TOKEN, ZOO, Server, load_csv


def test_error_classes_carry_codes():
    assert issubclass(veil.Unauthenticated, veil.VeilError)
    assert issubclass(veil.VeilError, Exception)


def test_wrong_or_missing_token_is_unauthenticated(tenant_server):
    for token in ["wrong-token", None]:
        c = veil.Client(tenant_server.url, token=token)
        with pytest.raises(veil.Unauthenticated) as e:
            c.models()
        assert e.value.code == 16 and e.value.code_name == "UNAUTHENTICATED"
        assert e.value.message and e.value.message in str(e.value)
    ok = veil.Client(tenant_server.url, token=TOKEN)
    assert [m.name for m in ok.models()] == ["digits_mlp"]  # the tenant's only model
    with pytest.raises(veil.NotFound):
        ok.model("breast_cancer_logreg")


def test_unknown_model_is_not_found(client):
    with pytest.raises(veil.NotFound, match="no_such_model") as e:
        client.model("no_such_model")
    assert e.value.code == 5


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_is_invalid_argument(client, keys, bad):
    X, _ = load_csv(ZOO / "digits_mlp" / "test.csv", 3)
    X[2, 7] = bad
    model = client.model("digits_mlp")
    with pytest.raises(veil.InvalidArgument, match="row 2, column 7") as e:
        model.predict(keys, X)
    assert e.value.code == 3
    with pytest.raises(veil.InvalidArgument):
        model.encrypt(keys, X)


def test_bad_shapes_are_invalid_argument(client, keys):
    model = client.model("digits_mlp")
    with pytest.raises(veil.InvalidArgument, match="63 features"):
        model.predict(keys, np.zeros((2, 63)))
    with pytest.raises(veil.InvalidArgument, match="2-D"):
        model.predict(keys, np.zeros(64))
    with pytest.raises(veil.InvalidArgument):
        model.encrypt(keys, np.zeros((model.max_batch + 1, 64)))
    with pytest.raises(veil.InvalidArgument):
        model.decrypt(keys, b"\xff\xff not protobuf")


def test_no_server_is_unavailable():
    with pytest.raises(veil.Unavailable) as e:
        veil.Client("http://127.0.0.1:1")
    assert e.value.code == 14
    with pytest.raises(veil.InvalidArgument):
        veil.Client("http://192.0.2.7:50051", token="secret")  # a token over plain http


def test_stale_digest_is_failed_precondition(work, models_dir, keys):
    """The server restarts with another build under the model's name: a request encrypted
    for the old one is refused, not decoded wrongly."""
    served = work / "stale-models"
    served.mkdir()
    shutil.copyfile(models_dir / "digits_mlp.veil", served / "m.veil")
    server = Server(served, work / "stale-data")
    try:
        c = veil.Client(server.url)
        c.ensure_key(keys)
        model = c.model("m")
        server.stop()
        shutil.copyfile(models_dir / "breast_cancer_logreg.veil", served / "m.veil")
        server = Server(served, work / "stale-data", listen=server.addr)
        X, _ = load_csv(ZOO / "digits_mlp" / "test.csv", 1)
        with pytest.raises(veil.FailedPrecondition, match="fetch its metadata again") as e:
            model.predict(keys, X)
        assert e.value.code == 9
        assert c.model("m").digest != model.digest
    finally:
        server.stop()
