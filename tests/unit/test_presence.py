"""A node whose connection closes is lost at once, not after ``federation.silence_s`` (issue 17, item 9).

Each node holds a ``Presence`` stream for as long as it runs; its end (the connection closed) makes the node
lost ``disconnect_grace_s`` later unless it calls again. A real gRPC server and clients on loopback, with a
silence limit of five minutes that no test here waits for.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch

from fedtune.config import ConfigError, fingerprint, load_config
from fedtune.server import open_transport
from fedtune.server.coordinator import RoundCoordinator
from fedtune.transport import Backoff, FederationClient, start_server
from fedtune.transport._proto import federation_pb2 as fpb
from fedtune.transport.errors import TransportError
from fedtune.transport.guards import PRESENCE, CallGate
from fedtune.types import Instructions

FP = json.dumps({"model": "tiny-llama", "adapter": {"r": 4}}, sort_keys=True)
STATE = {"l.lora_A.weight": torch.zeros(4, 8)}
SILENCE_S = 300.0


@pytest.fixture
def federation():
    coord = RoundCoordinator(FP, 3, silence_s=SILENCE_S, disconnect_grace_s=0.5)
    server = start_server(coord, "127.0.0.1:0", bulk_port=None, heartbeat_interval_s=0.2)
    coord.last_seen, coord.disconnected = server.servicer.last_seen, server.servicer.disconnected
    clients: list[FederationClient] = []

    def join(name: str) -> FederationClient:
        fc = FederationClient(f"127.0.0.1:{server.port}", name, fingerprint=FP, backoff=Backoff(max_attempts=2))
        clients.append(fc.connect())
        return fc

    yield coord, server, join
    for fc in clients:
        fc.close()
    server.stop(grace=None)


def wait_until(pred, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


def open_round(coord: RoundCoordinator, nodes: list[str], deadline_s: float) -> None:
    coord.open_round(1, {n: Instructions(round=1, client_id=n, state=STATE) for n in nodes}, deadline_s, buffer=4)


def test_a_node_whose_connection_closes_fails_its_round_at_once(federation) -> None:
    coord, server, join = federation
    a, _ = join("a"), join("b")
    wait_until(lambda: server.servicer.gate.nodes_in_calls() == set() and len(server.servicer._present) == 2)
    open_round(coord, ["a", "b"], deadline_s=60)
    assert a.poll(1.0) is not None  # a has its instructions and "trains"
    start = time.monotonic()
    a.close()  # its process ends: the connection closes
    replies = coord.replies()
    first = next(replies)
    took = time.monotonic() - start
    assert first.client_id == "a" and first.error is not None, first
    assert first.error.startswith("lost: its connection closed") and "federation.disconnect_grace_s" in first.error
    assert 0.4 < took < 5, f"noticed after {took:.1f} s (grace 0.5 s, silence {SILENCE_S:g} s)"
    assert coord.live_clients() == ["b"]


def test_a_connected_node_that_stops_polling_is_not_lost(federation) -> None:
    """Between rounds (or while it trains) a node sends no poll: its open connection keeps it live, and the
    round ends by its deadline with the node a straggler, not lost."""
    coord, server, join = federation
    join("a")
    wait_until(lambda: "a" in server.servicer._present)
    time.sleep(1.0)  # twice the grace, without a single poll
    assert coord.live_clients() == ["a"]
    open_round(coord, ["a"], deadline_s=1.5)
    (reply,) = list(coord.replies())
    assert reply.error == "straggler: no update before the round deadline"


def test_a_restarted_node_keeps_its_place(federation) -> None:
    """A node whose process restarts (a new connection, a new registration) within the grace is not lost;
    one that registered again since its old connection closed is live even before its new stream opens."""
    coord, server, join = federation
    join("a").close()
    join("a")
    time.sleep(1.0)
    assert coord.live_clients() == ["a"]
    assert server.servicer.disconnected() == {}


def test_presence_needs_a_session_and_is_bounded_per_node(federation) -> None:
    _, server, _ = federation
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    call = channel.unary_stream("/fedtune.v1.Federation/Presence", request_serializer=fpb.PresenceRequest.SerializeToString,
                                response_deserializer=fpb.PresenceReply.FromString)
    with pytest.raises(grpc.RpcError) as e:
        list(call(fpb.PresenceRequest(), timeout=5))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    channel.close()
    gate = CallGate(64)
    with gate.call("a", PRESENCE), gate.call("a", PRESENCE):
        assert gate.nodes_in_calls() == set()  # an open presence stream is no sign of life by itself
        with pytest.raises(TransportError, match="already has 2 presence call"), gate.call("a", PRESENCE):
            pass


class StallingProxy:
    """A TCP relay to ``target`` that can stop relaying without closing anything: what a network cut or a
    machine switched off looks like to the server (no FIN, no RST; the bytes it sends go nowhere)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target, self.stalled, self.closed = target, threading.Event(), threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            up = socket.create_connection(self.target)
            self.sockets += [down, up]
            for a, b in ((down, up), (up, down)):
                threading.Thread(target=self._relay, args=(a, b), daemon=True).start()

    def _relay(self, a: socket.socket, b: socket.socket) -> None:
        a.settimeout(0.05)
        while not self.closed.is_set():
            if self.stalled.is_set():
                time.sleep(0.05)  # nothing is read or forwarded, and both connections stay open
                continue
            try:
                data = a.recv(1 << 16)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            b.sendall(data)

    def close(self) -> None:
        self.closed.set()
        for s in [self.listener, *self.sockets]:
            s.close()


@pytest.fixture
def pinging_server(tmp_path: Path):
    """``fedtune server``'s transport with ``federation.keepalive_s=0.5``; nodes heartbeat every 30 s (never,
    within a test), so nothing but the pings and their answers crosses a connection while the node waits."""
    cfg = load_config(None, ["server.address=127.0.0.1:0", "server.bulk_port=null", f"out={tmp_path}",
                             "federation.keepalive_s=0.5", "federation.heartbeat_s=30", f"federation.silence_s={SILENCE_S}",
                             "federation.disconnect_grace_s=0.5"])
    coord, server = open_transport(cfg, {})
    proxy = StallingProxy(("127.0.0.1", server.port))
    fc = FederationClient(f"127.0.0.1:{proxy.port}", "a", fingerprint=fingerprint(cfg),
                          backoff=Backoff(max_attempts=2)).connect()
    wait_until(lambda: "a" in server.servicer._present)
    yield coord, server, proxy
    proxy.close()
    fc.close()
    server.stop(grace=None)


def test_a_node_cut_off_without_its_connection_closing_is_lost_after_the_keepalive(pinging_server) -> None:
    """Network cut: the server's ping goes unanswered, gRPC closes the connection after the keepalive
    timeout, and the node is lost ``disconnect_grace_s`` later, not after ``silence_s`` (300 s)."""
    coord, _, proxy = pinging_server
    open_round(coord, ["a"], deadline_s=60)
    start = time.monotonic()
    proxy.stalled.set()
    (reply,) = list(coord.replies())
    took = time.monotonic() - start
    assert reply.client_id == "a" and reply.error is not None
    assert reply.error.startswith("lost: its connection closed"), reply.error
    assert 1.0 <= took < 6, f"noticed after {took:.1f} s (keepalive 0.5 s + 0.5 s, grace 0.5 s)"


def test_a_quiet_node_that_answers_the_pings_stays(pinging_server) -> None:
    """The pings do not end a live connection on which nothing else is sent."""
    coord, server, _ = pinging_server
    time.sleep(2.5)  # five keepalive periods without a call
    assert coord.live_clients() == ["a"] and "a" in server.servicer._present
    assert server.servicer.disconnected() == {}


def test_keepalive_is_validated() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["federation.keepalive_s=0"])
    assert err.value.problems == ["federation.keepalive_s: got 0.0, must be > 0 (or null: no pings)"]
    assert load_config(None, ["federation.keepalive_s=null"]).federation.keepalive_s is None
