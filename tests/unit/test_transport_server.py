"""The servicer over a real gRPC server on 127.0.0.1:0 with a dummy coordinator: round trips and hostile input."""

from __future__ import annotations

import hashlib
import socket
import threading
import time

import grpc
import pytest
import torch

from fedtune.transport import (
    OBSERVER,
    FederationClient,
    reply_wire_size,
    start_server,
)
from fedtune.transport._proto import federation_pb2 as fpb
from fedtune.transport._proto import federation_pb2_grpc as fpb_grpc
from fedtune.transport._proto import tensor_pb2 as tpb
from fedtune.transport.codec import Limits, encode_state
from fedtune.transport.testing import StaticCoordinator
from fedtune.types import ClientReply, Instructions, LowRankUpdate

pytestmark = pytest.mark.integration  # sockets on loopback


@pytest.fixture
def served():
    state = {"l.lora_A.weight": torch.randn(4, 16), "l.lora_B.weight": torch.randn(16, 4)}
    instr = Instructions(round=1, client_id="", state=state, train={"lr": 0.01, "max_steps": 3}, rank=4,
                         mask={"l.lora_A.weight": torch.rand(4, 16) > 0.5},
                         base_update={"l": LowRankUpdate(B=torch.randn(16, 2), A=torch.randn(2, 16))},
                         phase="train", extra={"seed": 7})
    coord = StaticCoordinator(instr, shapes={k: tuple(v.shape) for k, v in state.items()})
    server = start_server(coord, "127.0.0.1:0", limits=Limits(max_tensor_bytes=64 << 20), max_workers=16)
    yield coord, server
    server.stop(0)


def _stub(server, node="n1") -> tuple[grpc.Channel, fpb_grpc.FederationStub, list[tuple[str, str]]]:
    ch = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    stub = fpb_grpc.FederationStub(ch)
    nonce = stub.Challenge(fpb.ChallengeRequest(node=node)).nonce
    token = stub.Register(fpb.RegisterRequest(node=node, nonce=nonce)).session_token
    return ch, stub, [("x-fedtune-session", token)]


def test_round_trip_instructions_and_reply(served):
    coord, server = served
    with FederationClient(f"127.0.0.1:{server.port}", "n1", heartbeat=False) as fc:
        instr = fc.poll(wait_s=1)
        assert instr is not None and instr.client_id == "n1" and instr.rank == 4
        assert instr.train == {"lr": 0.01, "max_steps": 3} and instr.extra == {"seed": 7}
        for k, v in coord.instr.state.items():
            assert torch.equal(instr.state[k], v)
        assert torch.equal(instr.mask["l.lora_A.weight"], coord.instr.mask["l.lora_A.weight"])
        assert torch.equal(instr.base_update["l"].B, coord.instr.base_update["l"].B)
        assert fc.bytes_down > 0
        reply = ClientReply("n1", 1, {k: v + 1 for k, v in instr.state.items()}, num_examples=12,
                            metrics={"loss": 0.5}, rank=4)
        res = fc.submit(reply)
        assert res.accepted and res.message == "thanks" and res.bytes_sent == reply_wire_size(reply)
    got = coord.replies[0]
    assert got.num_examples == 12 and got.metrics == {"loss": 0.5} and got.rank == 4
    assert torch.equal(got.state["l.lora_B.weight"], reply.state["l.lora_B.weight"])


def test_failed_reply_is_data(served):
    coord, server = served
    with FederationClient(f"127.0.0.1:{server.port}", "n1", heartbeat=False) as fc:
        fc.submit(ClientReply("n1", 1, None, 0, error="out of memory"))
    assert coord.replies[0].error == "out of memory" and coord.replies[0].state is None


def test_nothing_to_do_returns_none(served):
    coord, server = served
    coord.instr = None
    with FederationClient(f"127.0.0.1:{server.port}", "n1", heartbeat=False) as fc:
        assert fc.poll(wait_s=0.1) is None
        assert fc.wait_for_instructions(timeout=0.3, poll_s=0.1) is None


def test_status_lists_connected_clients(served):
    _coord, server = served
    with FederationClient(f"127.0.0.1:{server.port}", "n1", heartbeat=False) as fc, \
            FederationClient(f"127.0.0.1:{server.port}", "watch", fingerprint=OBSERVER, heartbeat=False) as ob:
        st, seen = ob.status()
        assert st.round == 1 and st.phase == "train" and st.detail == {"clients": "2"}
        assert sorted(seen) == ["n1", "watch"] and seen["n1"] < 5
        st, seen = fc.status()  # a training node sees the round and itself only
        assert st.round == 1 and st.phase == "train" and st.detail == {} and list(seen) == ["n1"]


def _submit(stub, md, messages) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as ei:
        stub.SubmitUpdate(iter(messages), metadata=md, timeout=10)
    return ei.value


def _update(tensors: dict, corrupt=None, node="n1") -> list[fpb.UpdateChunk]:
    msgs = [fpb.UpdateChunk(header=fpb.UpdateHeader(round=1, phase="train", node=node, num_examples=1))]
    chunks = list(encode_state(tensors, chunk_size=256))
    if corrupt:
        chunks = corrupt(chunks)
    return msgs + [fpb.UpdateChunk(tensor=c) for c in chunks]


def _flip_byte(chunks):
    data = bytearray(chunks[-1].data)
    data[0] ^= 1
    chunks[-1] = tpb.TensorChunk(meta=chunks[-1].meta if chunks[-1].HasField("meta") else None, data=bytes(data))
    return chunks


def _huge(chunks):
    chunks[0].meta.shape[:] = [1 << 20, 1 << 20]
    chunks[0].meta.num_bytes = 4 << 40
    return chunks


def _nan_with_valid_hash(chunks):
    payload = bytearray(b"".join(c.data for c in chunks))
    payload[0:4] = b"\x00\x00\xc0\x7f"
    chunks[0].meta.digest = hashlib.sha256(payload).digest()
    chunks[0].meta.digest_alg = "sha256"
    chunks[0].data = bytes(payload[:256])
    return chunks


HOSTILE = {
    "wrong hash": (lambda c: _flip_byte(c), grpc.StatusCode.INVALID_ARGUMENT, "digest mismatch"),
    "truncated": (lambda c: c[:-1], grpc.StatusCode.INVALID_ARGUMENT, "truncated"),
    "oversize declaration": (_huge, grpc.StatusCode.INVALID_ARGUMENT, "exceeds the limit"),
    "shape vs bytes": (lambda c: (c[0].meta.shape.append(2), c)[1], grpc.StatusCode.INVALID_ARGUMENT, "takes"),
    "NaN": (_nan_with_valid_hash, grpc.StatusCode.INVALID_ARGUMENT, "NaN"),
    "data before header": (lambda c: c[1:], grpc.StatusCode.INVALID_ARGUMENT, "without a preceding"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_updates_are_rejected_and_server_survives(served, case):
    coord, server = served
    corrupt, code, words = HOSTILE[case]
    ch, stub, md = _stub(server)
    err = _submit(stub, md, _update({"l.lora_A.weight": torch.randn(4, 160)}, corrupt))
    assert err.code() == code and words in err.details()
    assert coord.replies == []
    # the server still serves a good update afterwards
    ack = stub.SubmitUpdate(iter(_update({"l.lora_A.weight": torch.randn(4, 16)})), metadata=md, timeout=10)
    assert ack.accepted
    ch.close()


def test_protocol_violations(served):
    _coord, server = served
    ch, stub, md = _stub(server)
    good = _update({"l.lora_A.weight": torch.randn(4, 16)})
    assert "start with an UpdateHeader" in _submit(stub, md, good[1:]).details()
    assert "second header" in _submit(stub, md, good + good[:1]).details()
    other = [fpb.UpdateChunk(header=fpb.UpdateHeader(round=1, phase="train", node="n2"))]
    assert _submit(stub, md, other).code() == grpc.StatusCode.PERMISSION_DENIED
    wrong_round = [fpb.UpdateChunk(header=fpb.UpdateHeader(round=9, phase="train", node="n1"))]
    assert "round 9" in _submit(stub, md, wrong_round).details()
    assert "shape" in _submit(stub, md, _update({"l.lora_A.weight": torch.randn(5, 16)})).details()
    err = _submit(stub, [("x-fedtune-session", "forged")], good)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "register again" in err.details()
    ch.close()


def test_client_cancelling_mid_stream_is_not_an_update(served):
    coord, server = served
    ch, stub, md = _stub(server)
    gate = threading.Event()

    def slow():
        msgs = _update({"l.lora_A.weight": torch.randn(4, 160)})
        yield from msgs[:2]
        gate.wait(5)
    fut = stub.SubmitUpdate.future(slow(), metadata=md)
    time.sleep(0.2)
    fut.cancel()
    gate.set()
    time.sleep(0.2)
    assert coord.replies == []
    assert stub.Heartbeat(fpb.HeartbeatRequest(), metadata=md).round == 1
    ch.close()


def test_garbage_bytes_on_the_port(served):
    _coord, server = served
    for junk in (b"\x00" * 64, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", bytes(range(256)) * 8):
        with socket.create_connection(("127.0.0.1", server.port), timeout=2) as s:
            s.sendall(junk)
            s.settimeout(2)
            try:
                s.recv(1024)
            except (TimeoutError, ConnectionResetError):
                pass
    ch, stub, md = _stub(server)  # still alive
    # a valid gRPC frame whose body is not a valid protobuf message
    bad = grpc.insecure_channel(f"127.0.0.1:{server.port}").stream_unary(
        "/fedtune.v1.Federation/SubmitUpdate", request_serializer=lambda b: b, response_deserializer=lambda b: b)
    with pytest.raises(grpc.RpcError):
        bad(iter([b"\xff\xff\xff\xff\x0f"]), metadata=md, timeout=5)
    assert stub.Heartbeat(fpb.HeartbeatRequest(), metadata=md).round == 1
    ch.close()


def test_bigger_update_streams_through(served):
    """16 MiB in one tensor (the > 1 GiB case is in the integration tier)."""
    coord, server = served
    coord.shapes = {}
    big = torch.randn(4 << 20)
    with FederationClient(f"127.0.0.1:{server.port}", "n1", heartbeat=False) as fc:
        fc.submit(ClientReply("n1", 1, {"big": big}, num_examples=1))
    assert torch.equal(coord.replies[0].state["big"], big)


def test_uploads_beyond_the_limit_wait_then_get_resource_exhausted():
    coord = StaticCoordinator()
    server = start_server(coord, "127.0.0.1:0", max_concurrent_uploads=1, upload_queue_timeout_s=0.3)
    try:
        ch, stub, md = _stub(server)
        gate = threading.Event()

        def held():
            yield from _update({"w": torch.randn(4)})[:1]
            gate.wait(5)
        first = stub.SubmitUpdate.future(held(), metadata=md)
        end = time.monotonic() + 10  # until the first upload holds the only slot (a busy machine may take a while)
        while server.servicer._uploads._value and time.monotonic() < end:
            time.sleep(0.01)
        ch2, stub2, md2 = _stub(server, "n2")  # another node: one upload per node is another bound
        err = _submit(stub2, md2, _update({"w": torch.randn(4)}, node="n2"))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "busy" in err.details()
        ch2.close()
        gate.set()
        assert first.result(timeout=5).accepted
        ch.close()
    finally:
        server.stop(0)
