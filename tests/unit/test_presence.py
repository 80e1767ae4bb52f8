"""A node whose connection closes is lost at once, not after ``federation.silence_s`` (issue 17, item 9).

Each node holds a ``Presence`` stream for as long as it runs; its end (the connection closed) makes the node
lost ``disconnect_grace_s`` later unless it calls again. A real gRPC server and clients on loopback, with a
silence limit of five minutes that no test here waits for.
"""

from __future__ import annotations

import json
import time

import grpc
import pytest
import torch

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
