"""Keys, TLS and node authentication against a real server on loopback."""

from __future__ import annotations

import os
import stat

import grpc
import pytest
import torch

from fedtune.transport import (
    AuthenticationError,
    Backoff,
    ConfigMismatch,
    FederationClient,
    InsecureTransportError,
    PermissionDeniedError,
    TransportError,
    check_plaintext_allowed,
    create_keys,
    is_loopback,
    load_node_key,
    revoke_node,
    start_server,
)
from fedtune.transport._proto import federation_pb2 as fpb
from fedtune.transport._proto import federation_pb2_grpc as fpb_grpc
from fedtune.transport.keys import read_allowlist
from fedtune.transport.security import sign_challenge
from fedtune.transport.testing import StaticCoordinator
from fedtune.types import ClientReply, Instructions

pytestmark = pytest.mark.integration  # sockets on loopback


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return create_keys(tmp_path_factory.mktemp("keys"), ["alice", "bob", "eve"], ["localhost", "127.0.0.1"])


@pytest.fixture
def tls_server(keys):
    coord = StaticCoordinator(Instructions(1, "", {"w": torch.ones(3)}), fingerprint="fp-1")
    allow = keys / "allowlist.txt"
    allow.write_text("\n".join(line for line in allow.read_text().splitlines() if not line.startswith("eve"))
                     .replace(" revoked", "") + "\n")
    server = start_server(coord, "127.0.0.1:0", cert_file=keys / "server.pem", key_file=keys / "server.key",
                          allowlist_file=allow, max_workers=8)
    yield coord, server, keys
    server.stop(0)


def _client(keys, server, node: str, key_node: str | None = None, **kw) -> FederationClient:
    return FederationClient(f"127.0.0.1:{server.port}", node, key=keys / "nodes" / f"{key_node or node}.key",
                            ca_file=keys / "ca.pem", fingerprint="fp-1", heartbeat=False, **kw)


def test_key_layout(keys):
    names = {str(p.relative_to(keys)) for p in keys.rglob("*") if p.is_file()}
    assert names == {"ca.pem", "ca.key", "server.pem", "server.key", "allowlist.txt", "nodes/alice.key",
                     "nodes/alice.pub", "nodes/bob.key", "nodes/bob.pub", "nodes/eve.key", "nodes/eve.pub",
                     *(f"sites/{n}/{f}" for n in ("alice", "bob", "eve") for f in ("ca.pem", f"nodes/{n}.key"))}
    for private in ("ca.key", "server.key", "nodes/alice.key"):
        assert stat.S_IMODE(os.stat(keys / private).st_mode) == 0o600
    assert set(read_allowlist(keys / "allowlist.txt")) == {"alice", "bob", "eve"}
    load_node_key(keys / "nodes" / "bob.key")
    before = (keys / "ca.pem").read_bytes()
    create_keys(keys, ["carol"])  # adding a node keeps the CA and the other keys
    assert (keys / "ca.pem").read_bytes() == before and (keys / "nodes" / "carol.key").exists()


def test_tls_round_trip_with_signed_challenge(tls_server):
    coord, server, keys = tls_server
    with _client(keys, server, "alice") as fc:
        instr = fc.poll(wait_s=1)
        assert instr is not None and torch.equal(instr.state["w"], torch.ones(3))
        assert fc.submit(ClientReply("alice", 1, {"w": torch.zeros(3)}, 2)).accepted
    assert coord.registered == ["alice"] and coord.replies[0].client_id == "alice"


def test_plaintext_client_cannot_talk_to_tls_server(tls_server):
    _coord, server, keys = tls_server
    fc = FederationClient(f"127.0.0.1:{server.port}", "alice", key=keys / "nodes" / "alice.key",
                          heartbeat=False, backoff=Backoff(initial_s=0.01, max_attempts=2))
    with pytest.raises(TransportError, match="UNAVAILABLE"):
        fc.connect()
    fc.close()


def test_unknown_node_is_unauthenticated_and_logged(tls_server, caplog):
    _coord, server, keys = tls_server
    with pytest.raises(AuthenticationError, match="not in the server's allow-list"):
        _client(keys, server, "eve").connect()
    assert any("refused" in r.getMessage() and "'eve'" in r.getMessage() and "allow-list" in r.getMessage()
               for r in caplog.records)


def test_wrong_key_is_unauthenticated(tls_server):
    _coord, server, keys = tls_server
    with pytest.raises(AuthenticationError, match="does not match"):
        _client(keys, server, "alice", key_node="bob").connect()


def test_forged_signature_and_reused_nonce(tls_server):
    _coord, server, keys = tls_server
    creds = grpc.ssl_channel_credentials((keys / "ca.pem").read_bytes())
    with grpc.secure_channel(f"127.0.0.1:{server.port}", creds) as ch:
        stub = fpb_grpc.FederationStub(ch)
        nonce = stub.Challenge(fpb.ChallengeRequest(node="alice")).nonce
        with pytest.raises(grpc.RpcError) as ei:
            stub.Register(fpb.RegisterRequest(node="alice", nonce=nonce, signature=b"\x00" * 64))
        assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED and "could not authenticate" in ei.value.details()
        with pytest.raises(grpc.RpcError) as ei:  # another node's nonce
            stub.Register(fpb.RegisterRequest(node="bob", nonce=nonce))
        assert "unknown or expired challenge nonce" in ei.value.details()
        signed = fpb.RegisterRequest(node="alice", nonce=nonce, config_fingerprint="fp-1",
                                     signature=sign_challenge(load_node_key(keys / "nodes" / "alice.key"), nonce, "alice"))
        assert stub.Register(signed).session_token
        with pytest.raises(grpc.RpcError) as ei:  # a replay of a registration that opened a session
            stub.Register(signed)
        assert "reused" in ei.value.details()
        with pytest.raises(grpc.RpcError) as ei:
            stub.Status(fpb.StatusRequest())
        assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_revoked_node_is_refused_logged_and_loses_its_session(tls_server, caplog):
    _coord, server, keys = tls_server
    fc = _client(keys, server, "bob").connect()
    revoke_node(keys / "allowlist.txt", "bob")
    os.utime(keys / "allowlist.txt", (1, 1))  # make sure the mtime changes within the same second
    with pytest.raises(PermissionDeniedError, match="revoked"):
        fc.heartbeat()
    with pytest.raises(PermissionDeniedError, match="revoked"):
        _client(keys, server, "bob").connect()
    assert any("refused" in r.getMessage() and "'bob' has been revoked" in r.getMessage() for r in caplog.records)
    fc.close()


def test_config_mismatch_is_failed_precondition(tls_server):
    _coord, server, keys = tls_server
    fc = _client(keys, server, "alice")
    fc.fingerprint = "fp-other"
    with pytest.raises(ConfigMismatch, match="fingerprint"):
        fc.connect()


def test_plaintext_only_on_loopback_or_with_flag():
    assert is_loopback("127.0.0.1:50051") and is_loopback("localhost:1") and is_loopback("[::1]:5")
    assert not is_loopback("10.0.0.2:50051") and not is_loopback("example.org:443")
    check_plaintext_allowed("0.0.0.0:9", insecure=True)
    with pytest.raises(InsecureTransportError, match=r"set client\.keys_dir .* or set client\.insecure = true"):
        check_plaintext_allowed("0.0.0.0:9")
    with pytest.raises(InsecureTransportError, match=r"server\.keys_dir .* server\.insecure"):
        start_server(StaticCoordinator(), "0.0.0.0:0")
    with pytest.raises(InsecureTransportError):
        FederationClient("example.org:443", "n")


def test_server_host_adds_names_and_keeps_loopback(tmp_path):
    from fedtune.transport.keys import certificate_hosts

    keys = create_keys(tmp_path / "k", ["a"], ["coord.example.org"])
    assert set(certificate_hosts(keys / "server.pem")) == {"coord.example.org", "localhost", "127.0.0.1"}
    assert (keys / "sites" / "a" / "ca.pem").read_bytes() == (keys / "ca.pem").read_bytes()
    assert (keys / "sites" / "a" / "nodes" / "a.key").read_bytes() == (keys / "nodes" / "a.key").read_bytes()
    ca, cert = (keys / "ca.pem").read_bytes(), (keys / "server.pem").read_bytes()
    create_keys(keys, ["b"], ["coord.example.org"])  # same names: the certificate stays
    assert (keys / "server.pem").read_bytes() == cert
    create_keys(keys, [], ["coord.example.org", "10.0.0.5"])  # another name: a new certificate, same CA
    assert set(certificate_hosts(keys / "server.pem")) == {"coord.example.org", "10.0.0.5", "localhost",
                                                           "127.0.0.1"}
    assert (keys / "ca.pem").read_bytes() == ca and (keys / "sites" / "b" / "nodes" / "b.key").is_file()
    create_keys(keys, [], ["coord.example.org"], loopback=False)
    assert certificate_hosts(keys / "server.pem") == ["coord.example.org"]
    (keys / "ca.key").unlink()  # kept offline: a new certificate cannot be issued, and it says so
    with pytest.raises(ValueError, match="ca.key is missing"):
        create_keys(keys, [], ["other.example.org"])
