"""Identity hygiene of the server, each a deliberate policy (issue 16, item 7; README "Security")."""

from __future__ import annotations

import os
import time

import grpc
import pytest
import torch

from fedtune.transport import (
    OBSERVER,
    AuthenticationError,
    ConfigMismatch,
    FederationClient,
    PermissionDeniedError,
    create_keys,
    revoke_node,
    start_server,
)
from fedtune.transport._proto import federation_pb2 as fpb
from fedtune.transport._proto import federation_pb2_grpc as fpb_grpc
from fedtune.transport.keys import read_allowlist
from fedtune.transport.security import NodeAuth
from fedtune.transport.testing import StaticCoordinator
from fedtune.types import Instructions

pytestmark = pytest.mark.integration  # sockets on loopback


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    out = create_keys(tmp_path_factory.mktemp("keys"), ["alice", "bob", "carol"], observers=["operator"])
    revoke_node(out / "allowlist.txt", "carol")
    os.utime(out / "allowlist.txt", (1, 1))
    return out


@pytest.fixture
def server(keys):
    coord = StaticCoordinator(Instructions(1, "", {"w": torch.ones(3)}), fingerprint="fp-1")
    srv = start_server(coord, "127.0.0.1:0", cert_file=keys / "server.pem", key_file=keys / "server.key",
                       allowlist_file=keys / "allowlist.txt", max_workers=8, bulk_port=None, session_idle_s=1.0)
    yield srv
    srv.stop(0)


def _client(keys, srv, node: str, fingerprint: str = "fp-1") -> FederationClient:
    return FederationClient(f"127.0.0.1:{srv.port}", node, key=keys / "nodes" / f"{node}.key",
                            ca_file=keys / "ca.pem", fingerprint=fingerprint, heartbeat=False)


def _heartbeat(fc: FederationClient) -> fpb.HeartbeatReply:
    """A heartbeat on the client's current token, without the client's own re-registration."""
    assert fc._stub is not None
    return fc._stub.Heartbeat(fpb.HeartbeatRequest(), metadata=fc._md(), timeout=10)


def test_the_operator_key_is_marked_observer_in_the_allowlist(keys) -> None:
    allow = read_allowlist(keys / "allowlist.txt")
    assert allow["operator"].observer and not allow["alice"].observer and allow["carol"].revoked


def test_a_refused_registration_leaves_the_live_session_alone(keys, server) -> None:
    with _client(keys, server, "alice") as fc:
        token = fc._token
        with pytest.raises(ConfigMismatch):
            _client(keys, server, "alice", fingerprint="fp-other").connect()
        assert _heartbeat(fc).round == 1 and fc._token == token  # the same session still works


def test_sessions_expire_when_idle_and_the_client_registers_again(keys, server) -> None:
    with _client(keys, server, "alice") as fc:
        token = fc._token
        time.sleep(1.5)
        with pytest.raises(grpc.RpcError) as e:
            _heartbeat(fc)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and "expired" in e.value.details()
        assert fc.heartbeat().round == 1 and fc._token != token  # FederationClient renews by itself


def test_sessions_expire_at_their_maximum_age_even_when_busy() -> None:
    auth = NodeAuth(None, session_idle_s=60, session_max_s=0.6)
    s = auth.open_session("site-a")
    for _ in range(3):
        time.sleep(0.15)
        auth.session(s.token)
    time.sleep(0.3)
    with pytest.raises(AuthenticationError, match="expired"):
        auth.session(s.token)
    assert auth.sessions() == []


def test_the_operator_key_observes_but_cannot_train(keys, server) -> None:
    with pytest.raises(PermissionDeniedError, match="observer key"):
        _client(keys, server, "operator").connect()
    with _client(keys, server, "alice"), _client(keys, server, "bob"), \
            _client(keys, server, "operator", fingerprint=OBSERVER) as op:
        _, seen = op.status()
        assert sorted(seen) == ["alice", "bob", "operator"]


def test_only_the_operator_lists_every_node(keys, server) -> None:
    with _client(keys, server, "alice") as alice, _client(keys, server, "bob"), \
            _client(keys, server, "bob", fingerprint=OBSERVER) as bob_watching:
        for fc in (alice, bob_watching):  # an enrolled node key, training or watching, sees only itself
            st, seen = fc.status()
            assert list(seen) == [fc.node] and "clients" not in st.detail and st.round == 1


def test_challenge_answers_listed_unknown_and_revoked_names_alike(keys, server) -> None:
    creds = grpc.ssl_channel_credentials((keys / "ca.pem").read_bytes())
    with grpc.secure_channel(f"127.0.0.1:{server.port}", creds) as ch:
        stub = fpb_grpc.FederationStub(ch)
        replies = {n: stub.Challenge(fpb.ChallengeRequest(node=n), timeout=10) for n in ("alice", "nobody", "carol")}
        assert {(len(r.nonce), r.expires_in_s) for r in replies.values()} == {(32, 60.0)}
        details = {}
        for n in ("alice", "nobody", "carol"):  # no valid signature: one refusal for all three
            with pytest.raises(grpc.RpcError) as e:
                stub.Register(fpb.RegisterRequest(node=n, nonce=replies[n].nonce, signature=b"\0" * 64), timeout=10)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            details[n] = e.value.details().replace(repr(n), "NAME")
        assert len(set(details.values())) == 1, details
    with pytest.raises(PermissionDeniedError, match="revoked"):  # only carol's own key learns it was revoked
        _client(keys, server, "carol").connect()


def test_rerunning_keys_marks_an_older_operator_key_observer(tmp_path) -> None:
    out = create_keys(tmp_path / "k", ["site-a", "operator"])  # how `fedtune keys` listed it before
    key = (out / "nodes" / "operator.key").read_bytes()
    assert not read_allowlist(out / "allowlist.txt")["operator"].observer
    create_keys(out, [], observers=["operator"])
    assert read_allowlist(out / "allowlist.txt")["operator"].observer
    assert (out / "nodes" / "operator.key").read_bytes() == key


def test_refused_registrations_are_logged_at_a_bounded_rate(keys, server, caplog) -> None:
    import logging

    creds = grpc.ssl_channel_credentials((keys / "ca.pem").read_bytes())
    with caplog.at_level(logging.WARNING, logger="fedtune.transport.server"), \
            grpc.secure_channel(f"127.0.0.1:{server.port}", creds) as ch:
        stub = fpb_grpc.FederationStub(ch)
        for i in range(60):
            nonce = stub.Challenge(fpb.ChallengeRequest(node=f"intruder-{i}"), timeout=10).nonce
            with pytest.raises(grpc.RpcError):
                stub.Register(fpb.RegisterRequest(node=f"intruder-{i}", nonce=nonce, signature=b"\0" * 64), timeout=10)
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(lines) == server.servicer.refusals.per_minute == 20
    assert lines[0].startswith("registration from ipv4:127.0.0.1:") and "'intruder-0' could not authenticate" in lines[0]
