"""encrypt/decrypt for callers that transport requests themselves: stubs generated from
proto/ with grpcio-tools at test time."""

import importlib
import sys

import grpc
import numpy as np
import pytest
from grpc_tools import protoc

from conftest import REPO, ZOO, load_csv


@pytest.fixture(scope="module")
def stubs(tmp_path_factory):
    out = tmp_path_factory.mktemp("stubs")
    rc = protoc.main([
        "grpc_tools.protoc", f"-I{REPO / 'proto'}", f"--python_out={out}",
        f"--grpc_python_out={out}", str(REPO / "proto" / "veil" / "v1" / "veil.proto"),
    ])
    assert rc == 0
    sys.path.insert(0, str(out))
    try:
        yield importlib.import_module("veil.v1.veil_pb2"), importlib.import_module(
            "veil.v1.veil_pb2_grpc")
    finally:
        sys.path.remove(str(out))


def test_encrypt_infer_decrypt_through_grpcio(server, client, keys, stubs):
    pb2, pb2_grpc = stubs
    X, _ = load_csv(ZOO / "digits_mlp" / "test.csv", 3)
    model = client.model("digits_mlp")
    req = pb2.InferRequest.FromString(model.encrypt(keys, X))
    assert (req.model, req.key_id, req.model_digest) == (model.name, keys.key_id, model.digest)
    assert len(req.samples) == 3
    with grpc.insecure_channel(server.addr) as channel:
        stub = pb2_grpc.VeilStub(channel)
        reply = stub.Infer(req, metadata=[("veil-key-id", keys.key_id)])
        assert len(reply.outputs) == 3
        labels = model.decrypt(keys, reply.SerializeToString())
        scores = model.decrypt(keys, reply.SerializeToString(), scores=True)
        # The library's own path gives the same labels for the same rows.
        assert labels.tolist() == model.predict(keys, X).tolist()
        assert np.argmax(scores, axis=1).tolist() == labels.tolist()
        # A stale digest sent by hand is refused with the code the library maps.
        req.model_digest = "00" * 32
        with pytest.raises(grpc.RpcError) as e:
            stub.Infer(req, metadata=[("veil-key-id", keys.key_id)])
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
