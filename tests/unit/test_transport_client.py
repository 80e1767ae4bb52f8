"""FederationClient: reconnect with backoff, session renewal after a server restart, heartbeats."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import torch

from fedtune.transport import Backoff, FederationClient, TransportError, start_server
from fedtune.transport.testing import StaticCoordinator
from fedtune.types import ClientReply, Instructions

pytestmark = pytest.mark.integration  # sockets on loopback

FAST = Backoff(initial_s=0.05, max_s=0.2, max_attempts=40)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_connect_waits_for_a_late_server():
    port = _free_port()
    coord = StaticCoordinator(Instructions(1, "", {"w": torch.ones(2)}))
    started: list = []
    timer = threading.Timer(0.5, lambda: started.append(start_server(coord, f"127.0.0.1:{port}")))
    timer.start()
    try:
        with FederationClient(f"127.0.0.1:{port}", "n1", backoff=FAST, heartbeat=False) as fc:
            assert fc.poll(wait_s=1) is not None
        assert coord.registered == ["n1"]
    finally:
        timer.join()
        for s in started:
            s.stop(0)


def test_gives_up_after_max_attempts():
    fc = FederationClient(f"127.0.0.1:{_free_port()}", "n1", heartbeat=False,
                          backoff=Backoff(initial_s=0.01, max_s=0.02, max_attempts=3))
    with pytest.raises(TransportError, match="UNAVAILABLE"):
        fc.connect()
    fc.close()


def test_session_is_renewed_after_server_restart():
    port = _free_port()
    coord = StaticCoordinator(Instructions(1, "", {"w": torch.ones(2)}))
    server = start_server(coord, f"127.0.0.1:{port}")
    fc = FederationClient(f"127.0.0.1:{port}", "n1", backoff=FAST, heartbeat=False).connect()
    server.stop(0)
    server = start_server(coord, f"127.0.0.1:{port}")  # new process state: old session token unknown
    try:
        assert fc.submit(ClientReply("n1", 1, {"w": torch.zeros(2)}, 1)).accepted
        assert coord.registered == ["n1", "n1"]
    finally:
        fc.close()
        server.stop(0)


def test_heartbeat_thread_keeps_node_seen():
    coord = StaticCoordinator()
    server = start_server(coord, "127.0.0.1:0", heartbeat_interval_s=0.1)
    try:
        with FederationClient(f"127.0.0.1:{server.port}", "n1", backoff=FAST) as fc:
            t0 = server.servicer.last_seen()["n1"]
            time.sleep(0.5)
            assert server.servicer.last_seen()["n1"] > t0
            assert fc.heartbeat_interval_s == pytest.approx(0.1)
    finally:
        server.stop(0)
