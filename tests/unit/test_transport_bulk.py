"""The bulk upload lane on a real server on 127.0.0.1: uploads, TLS, fallback to gRPC, hostile input."""

from __future__ import annotations

import hashlib
import socket
import struct

import grpc
import pytest
import torch

from fedtune.transport import FederationClient, create_keys, start_server
from fedtune.transport._proto import federation_pb2 as fpb
from fedtune.transport._proto import tensor_pb2 as tpb
from fedtune.transport.bulk import DATA, END, ERROR, HEADER, MAGIC, META, OK, lane_error, read_record_head
from fedtune.transport.codec import Limits, encode_pieces
from fedtune.transport.testing import StaticCoordinator
from fedtune.types import ClientReply

pytestmark = pytest.mark.integration  # sockets on loopback

MiB = 1 << 20


@pytest.fixture
def served():
    coord = StaticCoordinator()
    server = start_server(coord, "127.0.0.1:0", limits=Limits(max_tensor_bytes=64 * MiB))
    yield coord, server
    server.stop(0)


def _big_reply() -> ClientReply:
    return ClientReply("n1", 1, {"a.lora_A.weight": torch.randn(1 << 20), "a.lora_B.weight": torch.randn(3, 5)},
                       num_examples=3, metrics={"loss": 1.5})


def test_large_update_goes_over_the_lane(served):
    coord, server = served
    reply = _big_reply()
    with FederationClient(f"127.0.0.1:{server.port}", "n1", heartbeat=False) as fc:
        assert fc._bulk_port == server.bulk.port > 0
        res = fc.submit(reply)
        small = torch.randn(8)
        assert fc.submit(ClientReply("n1", 1, {"s": small}, num_examples=1)).accepted  # below the threshold: gRPC
    assert res.accepted and res.message == "thanks" and server.bulk.uploads == 1
    got = coord.replies[0]
    assert got.num_examples == 3 and got.metrics == {"loss": 1.5}
    assert all(torch.equal(got.state[k], v) for k, v in reply.state.items())
    assert torch.equal(coord.replies[1].state["s"], small)


def test_lane_over_tls(tmp_path):
    create_keys(tmp_path, ["n1"], ["localhost", "127.0.0.1"])
    coord = StaticCoordinator()
    server = start_server(coord, "127.0.0.1:0", cert_file=tmp_path / "server.pem", key_file=tmp_path / "server.key",
                          allowlist_file=tmp_path / "allowlist.txt")
    try:
        reply = _big_reply()
        with FederationClient(f"127.0.0.1:{server.port}", "n1", key=tmp_path / "nodes" / "n1.key",
                              ca_file=tmp_path / "ca.pem", heartbeat=False) as fc:
            assert fc.submit(reply).accepted
        assert server.bulk.uploads == 1
        assert torch.equal(coord.replies[0].state["a.lora_A.weight"], reply.state["a.lora_A.weight"])
        # the lane speaks TLS only: a plaintext preamble is not an upload
        with socket.create_connection(("127.0.0.1", server.bulk.port), timeout=5) as s:
            s.sendall(MAGIC + b"\x00\x00")
            try:
                answer = s.recv(64)
            except ConnectionResetError:
                answer = b""
        assert answer[:1] != bytes([OK]) and server.bulk.uploads == 1
    finally:
        server.stop(0)


def test_unreachable_lane_falls_back_to_grpc(served, caplog):
    coord, server = served
    reply = _big_reply()
    with FederationClient(f"127.0.0.1:{server.port}", "n1", heartbeat=False) as fc:
        server.bulk.close()
        assert fc.submit(reply).accepted
        assert fc._bulk_port == 0
    assert "uploading over gRPC" in caplog.text and server.bulk.uploads == 0
    assert torch.equal(coord.replies[0].state["a.lora_A.weight"], reply.state["a.lora_A.weight"])


def test_no_lane_when_disabled():
    coord = StaticCoordinator()
    server = start_server(coord, "127.0.0.1:0", bulk_port=None)
    try:
        with FederationClient(f"127.0.0.1:{server.port}", "n1", heartbeat=False) as fc:
            assert fc._bulk_port == 0 and fc.submit(_big_reply()).accepted
        assert server.bulk is None and len(coord.replies) == 1
    finally:
        server.stop(0)


# ------------------------------------------------------------------ hostile input on the lane


def _token(server) -> str:
    with FederationClient(f"127.0.0.1:{server.port}", "n1", heartbeat=False) as fc:
        return fc._token


def _record(kind: int, body: bytes = b"") -> bytes:
    return struct.pack("<BI", kind, len(body)) + body


def _send(server, token: str, records: list[bytes], close_early: bool = False) -> grpc.RpcError | None:
    """Open the lane, send ``records`` after the OK; the server's ERROR (or None after an ACK / a drop)."""
    with socket.create_connection(("127.0.0.1", server.bulk.port), timeout=10) as s:
        tok = token.encode()
        s.sendall(MAGIC + struct.pack("<H", len(tok)) + tok)
        kind, n = read_record_head(s)
        if kind == ERROR:
            return lane_error(s.recv(n))
        assert kind == OK
        try:
            s.sendall(b"".join(records))
        except OSError:
            pass
        if close_early:
            s.shutdown(socket.SHUT_WR)
        try:
            kind, n = read_record_head(s)
        except ConnectionError:
            return None
        body = b""
        while len(body) < n:
            body += s.recv(n - len(body))
        return lane_error(body) if kind == ERROR else None


def _update(tensors: dict, corrupt=None) -> list[bytes]:
    header = fpb.UpdateHeader(round=1, phase="train", node="n1", num_examples=1).SerializeToString()
    pieces = [(tpb.TensorMeta.FromString(m) if m else None, bytes(d))
              for m, d in encode_pieces(tensors, chunk_size=256)]
    if corrupt:
        pieces = corrupt(pieces)
    out = [_record(HEADER, header)]
    for meta, data in pieces:
        if meta is not None:
            out.append(_record(META, meta.SerializeToString()))
        if data:
            out.append(_record(DATA, data))
    return [*out, _record(END)]


def _flip(pieces):
    meta, data = pieces[-1]
    pieces[-1] = (meta, bytes([data[0] ^ 1]) + data[1:])
    return pieces


def _nan(pieces):
    payload = bytearray(b"".join(d for _, d in pieces))
    payload[0:4] = b"\x00\x00\xc0\x7f"
    meta = pieces[0][0]
    meta.digest, meta.digest_alg = hashlib.sha256(payload).digest(), "sha256"
    return [(meta, bytes(payload[:256])), *[(None, bytes(payload[i:i + 256])) for i in range(256, len(payload), 256)]]


def _huge(pieces):
    meta = pieces[0][0]
    meta.shape[:] = [1 << 20, 1 << 20]
    meta.num_bytes = 4 << 40
    return pieces


HOSTILE = {
    "wrong hash": (lambda recs: _update({"w": torch.randn(4, 160)}, _flip), "digest mismatch"),
    "NaN": (lambda recs: _update({"w": torch.randn(4, 160)}, _nan), "NaN"),
    "oversize declaration": (lambda recs: _update({"w": torch.randn(4, 160)}, _huge), "exceeds the limit"),
    "data past the declared size": (lambda recs: [*recs[:2], _record(DATA, b"x" * 4096), *recs[3:]], "more data"),
    "data after the last tensor": (lambda recs: [*recs[:-1], _record(DATA, b"x" * 8), recs[-1]], "without a preceding"),
    "empty data record": (lambda recs: [*recs[:2], _record(DATA), *recs[2:]], "empty data record"),
    "data before metadata": (lambda recs: [recs[0], *recs[2:]], "without a preceding"),
    "no header": (lambda recs: recs[1:], "start with an UpdateHeader"),
    "unknown record": (lambda recs: [recs[0], _record(42, b"?"), *recs[1:]], "record kind 42"),
    "huge metadata record": (lambda recs: [recs[0], struct.pack("<BI", META, 1 << 30)], "exceeds the limit"),
    "garbage metadata": (lambda recs: [recs[0], _record(META, b"\xff" * 9), *recs[2:]], "malformed tensor metadata"),
    "truncated tensor": (lambda recs: recs[:-2] + [recs[-1]], "truncated"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_uploads_are_refused_and_the_lane_goes_on(served, case):
    coord, server = served
    make, words = HOSTILE[case]
    token = _token(server)
    err = _send(server, token, make(_update({"w": torch.randn(4, 160)})))
    assert err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT and words in err.details(), err
    assert coord.replies == []
    assert _send(server, token, _update({"w": torch.randn(4, 16)})) is None  # a good one is still accepted
    assert len(coord.replies) == 1


def test_lane_refuses_strangers_and_garbage(served):
    coord, server = served
    err = _send(server, "forged", [])
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "register again" in err.details()
    for junk in (b"\x00" * 64, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", MAGIC + b"\xff\xff"):
        with socket.create_connection(("127.0.0.1", server.bulk.port), timeout=5) as s:
            s.sendall(junk)
            s.shutdown(socket.SHUT_WR)
            kind, n = read_record_head(s)
            assert kind == ERROR and lane_error(s.recv(n)).code() == grpc.StatusCode.INVALID_ARGUMENT
    # a node that hangs up mid-tensor: nothing is recorded
    assert _send(server, _token(server), _update({"w": torch.randn(4, 160)})[:3], close_early=True) is not None
    with FederationClient(f"127.0.0.1:{server.port}", "n1", heartbeat=False) as fc:
        assert fc.submit(_big_reply()).accepted
    assert len(coord.replies) == 1 and server.bulk.uploads == 1


def test_bad_bulk_port_is_refused_clearly():
    coord = StaticCoordinator()
    with pytest.raises(ValueError, match="bulk_port must be a TCP port"):
        start_server(coord, "127.0.0.1:0", bulk_port=70000)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(RuntimeError, match="cannot open the bulk lane on 127.0.0.1:"):
            start_server(coord, "127.0.0.1:0", bulk_port=taken.getsockname()[1])
