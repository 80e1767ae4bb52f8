"""A TLS federation with Ed25519 node authentication under attack, against the real server process.

Two honest `fedtune client` processes train while, in the same federation: a node whose key is not on the
allow-list and a node with another adapter config are refused at registration with a clear message; garbage
bytes hit the port; and an allow-listed but hostile node ("mallory") answers each round with a different
malformed update (wrong hash, truncated stream, oversize declaration, wrong shape, NaN). Every one is refused
with its reason, recorded in metrics.jsonl, and the honest clients' rounds go on.
"""

from __future__ import annotations

import hashlib
import shutil
import socket
from pathlib import Path

import grpc
import pytest
import torch

from fedtune.config import fingerprint, load_config
from fedtune.transport import Backoff, FederationClient, create_keys
from fedtune.transport._proto import federation_pb2 as fpb
from fedtune.transport._proto import federation_pb2_grpc as fpb_grpc
from fedtune.transport.codec import encode_state
from fedtune.transport.security import channel_credentials
from tests.integration.test_federation import BASE, SCENARIO, fedtune, finish, free_port, metrics

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # about a minute of real processes


def _flip_byte(chunks):
    data = bytearray(chunks[-1].data)
    data[0] ^= 1
    chunks[-1].data = bytes(data)
    return chunks


def _huge(chunks):
    chunks[0].meta.shape[:] = [1 << 20, 1 << 20]
    chunks[0].meta.num_bytes = 4 << 40
    return chunks


def _nan(chunks):
    payload = bytearray(b"".join(c.data for c in chunks))
    payload[0:4] = b"\x00\x00\xc0\x7f"
    chunks[0].meta.digest = hashlib.sha256(payload).digest()
    chunks[0].meta.digest_alg = "sha256"
    chunks[0].data = bytes(payload)
    return chunks[:1]


# case -> (how the state is corrupted, words the refusal must contain)
HOSTILE = [
    ("wrong hash", lambda s: s, _flip_byte, "digest mismatch"),
    ("truncated", lambda s: s, lambda c: c[:-1], "truncated"),
    ("oversize declaration", lambda s: s, _huge, "exceeds the limit"),
    ("wrong shape", lambda s: {k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) for k, v in s.items()}, None, "shape"),
    ("NaN", lambda s: s, _nan, "NaN"),
]


def _hostile_update(ins, node: str, corrupt_state, corrupt_chunks) -> list[fpb.UpdateChunk]:
    state = corrupt_state({k: v.clone() for k, v in ins.state.items()})
    # one tensor is enough to be refused; a single-tensor stream keeps the truncation inside a tensor
    name = min(state)
    chunks = list(encode_state({name: state[name]}, chunk_size=256))
    if corrupt_chunks:
        chunks = corrupt_chunks(chunks)
    head = fpb.UpdateChunk(header=fpb.UpdateHeader(round=ins.round, phase="train", node=node, num_examples=5))
    return [head] + [fpb.UpdateChunk(tensor=c) for c in chunks]


def test_tls_federation_refuses_intruders_and_hostile_updates(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    create_keys(keys, ["client-0", "client-1", "mallory", "mismatch"])
    outsider = tmp_path / "outsider"
    create_keys(outsider, ["intruder"])
    shutil.copy(keys / "ca.pem", outsider / "ca.pem")  # it trusts the server, but the server does not know it
    port = free_port()
    addr = f"localhost:{port}"
    common = [str(SCENARIO), *BASE, f"federation.rounds={len(HOSTILE)}", "federation.min_clients=3",
              "federation.max_update_mb=16"]
    procs = {"server": fedtune("server", *common, f"out={tmp_path / 'run'}", f"server.address={addr}",
                               f"server.keys_dir={keys}", log=tmp_path / "server.log")}
    for name in ("client-0", "client-1"):
        procs[name] = fedtune("client", *common, f"client.name={name}", f"client.server={addr}",
                              f"client.keys_dir={keys}", log=tmp_path / f"{name}.log")
    intruder = fedtune("client", *common, "client.name=intruder", f"client.server={addr}",
                       f"client.keys_dir={outsider}", log=tmp_path / "intruder.log")
    mismatch = fedtune("client", *common, "client.name=mismatch", f"client.server={addr}",
                       f"client.keys_dir={keys}", "adapter.r=8", "adapter.alpha=16", log=tmp_path / "mismatch.log")
    refusals: dict[str, str] = {}
    try:
        cfg = load_config(SCENARIO, common[1:])
        with FederationClient(addr, "mallory", key=keys / "nodes" / "mallory.key", ca_file=keys / "ca.pem",
                              fingerprint=fingerprint(cfg), backoff=Backoff(max_s=1.0, max_attempts=300)) as fc:
            ch = grpc.secure_channel(addr, channel_credentials(keys / "ca.pem"))
            stub = fpb_grpc.FederationStub(ch)
            for junk in (b"\x00" * 64, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", bytes(range(256)) * 8):
                with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                    s.sendall(junk)
            cases = iter(HOSTILE)
            while (ins := fc.wait_for_instructions(timeout=180, poll_s=5)) is not None and ins.phase != "stop":
                case, corrupt_state, corrupt_chunks, words = next(cases)
                msgs = _hostile_update(ins, "mallory", corrupt_state, corrupt_chunks)
                with pytest.raises(grpc.RpcError) as ei:
                    stub.SubmitUpdate(iter(msgs), metadata=[("x-fedtune-session", fc._token or "")], timeout=30)
                assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (case, ei.value.details())
                assert words in ei.value.details(), (case, ei.value.details())
                refusals[case] = ei.value.details()
                # a second try in the same round is refused too (the node has had its say)
                with pytest.raises(grpc.RpcError) as ei:
                    stub.SubmitUpdate(iter(msgs[:1]), metadata=[("x-fedtune-session", fc._token or "")], timeout=30)
                assert "already answered" in ei.value.details()
            ch.close()
        assert intruder.wait(timeout=60) == 3
        assert mismatch.wait(timeout=60) == 3
    finally:
        for p in (intruder, mismatch):
            if p.poll() is None:
                p.kill()
    finish(procs, tmp_path)
    assert sorted(refusals) == sorted(c[0] for c in HOSTILE)
    assert "not in the server's allow-list" in (tmp_path / "intruder.log").read_text()
    text = (tmp_path / "mismatch.log").read_text()
    assert "adapter.r: server has 4, node has 8" in text and "adapter.alpha" in text
    rows = [r for r in metrics(tmp_path / "run") if r["round"] >= 1]
    assert len(rows) == len(HOSTILE)
    for r, (case, *_rest) in zip(rows, HOSTILE, strict=True):
        assert r["clients_ok"] == 2 and r["clients_failed"] == 1 and r["applied"], r
        assert r["failures"]["mallory"].startswith("rejected update"), r["failures"]
        assert r["rejected"] >= 2
    final = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["state"]
    assert all(bool(torch.isfinite(v).all()) for v in final.values())
