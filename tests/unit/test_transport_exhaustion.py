"""One peer must not hold what every node needs: upload slots (issue 16 item 3), RPC threads (item 4) and the
bulk lane's connections (item 8). A real server on loopback with the real round coordinator."""

from __future__ import annotations

import asyncio
import collections
import socket
import struct
import threading
import time

import grpc
import pytest
import torch

from fedtune.server.coordinator import OBSERVER, RoundCoordinator
from fedtune.transport import FederationClient, start_server
from fedtune.transport._proto import federation_pb2 as fpb
from fedtune.transport._proto import federation_pb2_grpc as fpb_grpc
from fedtune.transport.bulk import ERROR, MAGIC, OK, lane_error, read_record_head
from fedtune.transport.client import Backoff
from fedtune.transport.codec import Limits, encode_state
from fedtune.types import ClientReply, Instructions

pytestmark = pytest.mark.integration  # sockets on loopback

FP = "fp"
STATE = {"w": torch.zeros(4, 4)}
BIG = {"w": torch.randn(1 << 18)}  # 1 MiB: over the bulk lane's threshold


def _serve(**kw):
    coord = RoundCoordinator(FP, 3, silence_s=60)
    server = start_server(coord, "127.0.0.1:0", limits=Limits(max_tensor_bytes=8 << 20), **kw)
    coord.last_seen = server.servicer.last_seen
    return coord, server


def _session(server, node: str, fingerprint: str = FP):
    """(channel, stub, metadata) of a registered node, on a connection of its own (as a node in its own
    process: gRPC would otherwise share one connection between the channels of this process)."""
    ch = grpc.insecure_channel(f"127.0.0.1:{server.port}", options=[("grpc.use_local_subchannel_pool", 1)])
    stub = fpb_grpc.FederationStub(ch)
    nonce = stub.Challenge(fpb.ChallengeRequest(node=node)).nonce
    rep = stub.Register(fpb.RegisterRequest(node=node, nonce=nonce, config_fingerprint=fingerprint))
    return ch, stub, [("x-fedtune-session", rep.session_token)], rep.session_token


def _open(coord, nodes, state=STATE, deadline_s=120.0):
    coord.open_round(1, {n: Instructions(round=1, client_id=n, state=state) for n in nodes}, deadline_s, buffer=8)


def _update(node: str, state=STATE) -> list[fpb.UpdateChunk]:
    head = fpb.UpdateChunk(header=fpb.UpdateHeader(round=1, phase="train", node=node, num_examples=1))
    return [head, *(fpb.UpdateChunk(tensor=c) for c in encode_state(state, chunk_size=256))]


def _idle_stream(node: str, release: threading.Event, send_header: bool = True):
    def gen():
        if send_header:
            yield _update(node)[0]
        release.wait(60)
    return gen()


def _replies_until(coord, n: int, timeout: float = 30.0) -> list[ClientReply]:
    out: list[ClientReply] = []
    end = time.monotonic() + timeout
    it = coord.replies()
    while len(out) < n and time.monotonic() < end:
        out.append(next(it))
    return out


# ------------------------------------------------------------------------------------ item 3: upload slots


def test_an_observer_cannot_hold_upload_slots_and_the_sampled_node_uploads():
    coord, server = _serve(max_concurrent_uploads=2, bulk_port=None)
    release = threading.Event()
    try:
        _open(coord, ["h"])
        ch, stub, md, _ = _session(server, "spy", OBSERVER)
        idle = [stub.SubmitUpdate.future(_idle_stream("spy", release, send_header=False), metadata=md)
                for _ in range(8)]
        for f in idle:  # refused before taking a slot, without waiting for any byte
            err = f.exception(timeout=15)
            assert err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
            assert "observer" in err.details()
        ch2, stub2, md2, _ = _session(server, "h")
        ack = stub2.SubmitUpdate(iter(_update("h")), metadata=md2, timeout=15)
        assert ack.accepted
        (reply,) = _replies_until(coord, 1)
        assert reply.client_id == "h" and reply.error is None
        # a registered node that was not sampled is refused the same way
        ch3, stub3, md3, _ = _session(server, "other")
        with pytest.raises(grpc.RpcError) as ei:
            stub3.SubmitUpdate(iter(_update("other")), metadata=md3, timeout=15)
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "did not ask 'other'" in ei.value.details()
        for c in (ch, ch2, ch3):
            c.close()
    finally:
        release.set()
        server.stop(0)


def test_an_idle_upload_is_cut_and_a_node_uploads_one_at_a_time():
    coord, server = _serve(max_concurrent_uploads=1, upload_idle_s=1.0, bulk_port=None)
    release = threading.Event()
    try:
        _open(coord, ["slow", "h"])
        ch, stub, md, _ = _session(server, "slow")
        idle = stub.SubmitUpdate.future(_idle_stream("slow", release), metadata=md)
        end = time.monotonic() + 15  # until the idle stream holds the only slot
        while server.servicer._uploads._value and time.monotonic() < end:
            time.sleep(0.01)
        with pytest.raises(grpc.RpcError) as ei:  # a second stream of the same node is not admitted
            stub.SubmitUpdate(iter(_update("slow")), metadata=md, timeout=15)
        assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "at most 1" in ei.value.details()
        err = idle.exception(timeout=20)  # cut after ~1 s of silence (the reason is in the round's record)
        assert err is not None and err.code() == grpc.StatusCode.CANCELLED, err
        ch2, stub2, md2, _ = _session(server, "h")
        assert stub2.SubmitUpdate(iter(_update("h")), metadata=md2, timeout=15).accepted
        replies = {r.client_id: r for r in _replies_until(coord, 2)}
        assert replies["h"].error is None
        assert "sent nothing" in (replies["slow"].error or "")  # the refusal is recorded with its reason
        ch.close()
        ch2.close()
    finally:
        release.set()
        server.stop(0)


def test_bulk_lane_admits_only_sampled_nodes_and_cuts_idle_ones():
    coord, server = _serve(max_concurrent_uploads=1, upload_idle_s=1.0)
    try:
        _open(coord, ["slow", "h"], state=BIG)
        *_, spy_token = _session(server, "spy", OBSERVER)
        for _ in range(8):
            with socket.create_connection(("127.0.0.1", server.bulk.port), timeout=15) as s:
                tok = spy_token.encode()
                s.sendall(MAGIC + struct.pack("<H", len(tok)) + tok)
                kind, n = read_record_head(s)
                assert kind == ERROR and "observer" in lane_error(s.recv(n)).details()
        *_, slow_token = _session(server, "slow")
        with socket.create_connection(("127.0.0.1", server.bulk.port), timeout=15) as s:
            tok = slow_token.encode()
            s.sendall(MAGIC + struct.pack("<H", len(tok)) + tok)
            assert read_record_head(s) == (OK, 0)  # admitted, then silent: cut, and the slot comes back
            kind, n = read_record_head(s)
            assert kind == ERROR and "sent nothing for 1 s" in lane_error(s.recv(n)).details()
        with FederationClient(f"127.0.0.1:{server.port}", "h", fingerprint=FP, heartbeat=False) as fc:
            assert fc.submit(ClientReply("h", 1, BIG, num_examples=1)).accepted
        assert server.bulk.uploads == 1
        (reply,) = _replies_until(coord, 1)  # "slow" went quiet before its header: it may still send
        assert reply.client_id == "h" and torch.equal(reply.state["w"], BIG["w"])
    finally:
        server.stop(0)


# ------------------------------------------------------------------------------------ item 4: RPC threads


def test_open_long_polls_of_enrolled_nodes_leave_heartbeats_a_thread():
    coord, server = _serve(max_workers=16, bulk_port=None)
    calls, channels = [], []
    try:
        # one enrolled node opens 100 long polls, 4 others 8 each (132 calls, 16 threads); nothing is published,
        # so every poll the server takes waits 30 s
        for i, n in enumerate([100, 8, 8, 8, 8]):
            ch, stub, md, _ = _session(server, f"bad-{i}")
            channels.append(ch)
            calls += [stub.GetInstructions(fpb.InstructionsRequest(wait_s=30), metadata=md) for _ in range(n)]
        time.sleep(1.0)
        with FederationClient(f"127.0.0.1:{server.port}", "h", fingerprint=FP, heartbeat=False,
                              backoff=Backoff(max_attempts=1)) as fc:
            for _ in range(5):
                assert fc.heartbeat().round == 0
            assert fc.poll(wait_s=0.2) is None  # the honest node's own poll is served too
        assert "h" in coord.live_clients()
        open_polls = {node: n for (node, kind), n in server.servicer.gate._open.items() if kind == "poll"}
        assert max(open_polls.values()) <= 2  # 2 polls per node at most; the rest are refused (after a hold)
        end = time.monotonic() + 20
        while time.monotonic() < end and sum(not c.running() for c in calls[100:]) < 4 * 6:
            time.sleep(0.1)
        assert sum(not c.running() for c in calls[100:]) >= 4 * 6
        # refused by the servicer, or (streams beyond a connection's 8) by gRPC's transport, at no cost
        assert {c.code() for c in calls if not c.running()} <= {grpc.StatusCode.RESOURCE_EXHAUSTED,
                                                                 grpc.StatusCode.UNAVAILABLE}
    finally:
        for c in calls:
            c.cancel()
        for ch in channels:
            ch.close()
        server.stop(0)


def test_a_node_flooding_calls_waits_on_its_own_side():
    """300 polls of one node on one connection: the connection carries 32 at a time, and a call beyond the
    node's limit is held 2 s before its refusal, so the server refuses ~15 a second, not hundreds."""
    _, server = _serve(bulk_port=None, max_workers=256)  # the threads of a server for a few nodes
    calls, ch = [], None
    try:
        ch, stub, md, _ = _session(server, "flood")
        calls = [stub.GetInstructions(fpb.InstructionsRequest(wait_s=30), metadata=md) for _ in range(300)]
        time.sleep(2.5)
        with FederationClient(f"127.0.0.1:{server.port}", "h", fingerprint=FP, heartbeat=False,
                              backoff=Backoff(max_attempts=1)) as fc:
            t0 = time.monotonic()
            assert fc.heartbeat().round == 0
            assert time.monotonic() - t0 < 2.0  # another node is not held up
        codes = [c.code() for c in calls if not c.running()]
        refused = codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert 0 < refused <= 80, refused  # 30 held calls every 2 s; without the bounds all 298 at once
        # the rest wait on the node's side, or (the first burst, sent before the connection's settings
        # arrived) are reset by gRPC's transport without reaching the servicer
        assert set(codes) <= {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE}
    finally:
        for c in calls:
            c.cancel()
        if ch is not None:
            ch.close()
        server.stop(0)


# ------------------------------------------------------------------------------------ item 8: bulk slowloris


def test_idle_connections_on_the_bulk_lane_neither_block_nor_break_honest_uploads():
    coord, server = _serve()
    idle = []
    try:
        _open(coord, ["h"], state=BIG)
        for _ in range(300):
            idle.append(socket.create_connection(("127.0.0.1", server.bulk.port), timeout=10))
        with FederationClient(f"127.0.0.1:{server.port}", "h", fingerprint=FP, heartbeat=False,
                              backoff=Backoff(initial_s=0.1, max_attempts=3)) as fc:
            t0 = time.monotonic()
            assert fc.submit(ClientReply("h", 1, BIG, num_examples=1)).accepted
            took = time.monotonic() - t0
        (reply,) = _replies_until(coord, 1)
        assert reply.error is None and torch.equal(reply.state["w"], BIG["w"])
        # over the lane itself: a connection that shows its token at once takes the place of an idle one
        assert server.bulk.uploads == 1 and server.bulk.refused > 0 and took < 30
        # a connection that never says who it is is closed at the handshake deadline
        s = idle[0]
        s.settimeout(30)
        t0 = time.monotonic()
        try:
            assert s.recv(16) == b""
        except ConnectionResetError:
            pass
        assert time.monotonic() - t0 < 29
    finally:
        for s in idle:
            s.close()
        server.stop(0)


def test_a_burst_of_calls_from_a_large_federation_is_served_not_cancelled():
    """When every node of a large federation calls at once (its round opens), the calls the Python server has
    not picked up yet wait in gRPC core; with gRPC's default backlog (1,000) the rest were refused, and the
    nodes saw CANCELLED (1,000 nodes re-sent ~1,000 calls a run). A server sized for 1,000 nodes serves a
    burst of 2,100 calls on 70 connections."""
    coord = RoundCoordinator(FP, 3, silence_s=60)
    server = start_server(coord, "127.0.0.1:0", max_workers=3 * 1000 + 64)

    async def burst() -> collections.Counter[str]:
        chans = [grpc.aio.insecure_channel(f"127.0.0.1:{server.port}",
                                           options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(70)]
        codes: collections.Counter[str] = collections.Counter()

        async def challenge(ch: grpc.aio.Channel, node: str) -> None:
            try:
                await fpb_grpc.FederationStub(ch).Challenge(fpb.ChallengeRequest(node=node), timeout=60)
                codes["OK"] += 1
            except grpc.aio.AioRpcError as e:
                codes[e.code().name] += 1
        try:
            await asyncio.gather(*(ch.channel_ready() for ch in chans))
            await asyncio.gather(*(challenge(ch, f"n{i}-{j}") for i, ch in enumerate(chans) for j in range(30)))
        finally:
            await asyncio.gather(*(ch.close() for ch in chans))
        return codes

    try:
        assert asyncio.run(burst()) == {"OK": 2100}
    finally:
        server.stop(0)
