"""Many lightweight nodes on a few processes: asyncio (``grpc.aio``) nodes to load a real server.

``FederationClient`` gives each node threads of its own (its loop, its heartbeat, gRPC's polling), which is
right for a site but not for a thousand nodes on one machine: 1,000 of them in one process were ~2,600
threads fighting for one GIL. Here a node is two coroutines (its loop and its heartbeat) on an event loop,
a few hundred nodes to a process, speaking the protocol with the same messages (``messages``): it
registers (no key: a server without an allow-list), long-polls its instructions, answers every round with
small random tensors shaped like the state it received, and heartbeats at the interval the server gave
it. Each node has a connection of its own, as a real one would. Calls the server refuses or drops
(UNAVAILABLE, RESOURCE_EXHAUSTED) are retried with backoff; an expired session registers again.

    python -m fedtune.transport.swarm PORT FIRST COUNT FINGERPRINT STATUS_FILE [PREFIX]

runs nodes ``PREFIX-FIRST`` .. ``PREFIX-(FIRST+COUNT-1)`` until the server says stop, writing what they
did to STATUS_FILE (JSON) every second. ``Swarm`` starts and follows such processes.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import torch

from fedtune.transport._proto import federation_pb2 as fpb
from fedtune.transport.messages import frames_to_instructions, reply_to_frames
from fedtune.transport.security import SESSION_METADATA_KEY
from fedtune.transport.server import GRPC_OPTIONS, SERVICE, _raw
from fedtune.types import ClientReply

_T = TypeVar("_T")
RETRY = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED,
         grpc.StatusCode.CANCELLED}
"""Codes after which a node calls again (counted in ``Tally.retried``). CANCELLED is how a node sees a call
that gRPC core refused before the server picked it up (its backlog of arrived calls was full: see
``server.server_options``), and an upload the server's watchdog cut."""
POLL_S = 20.0
MAX_ERRORS = 50
"""Node errors a process reports (all are counted)."""

SWARM_MODULE = "fedtune.transport.swarm"
"""What each swarm process runs (``python -m``)."""


@dataclass
class Tally:
    """What the nodes of one process did: updates the server acknowledged per round, and errors."""

    acked: dict[int, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    error_count: int = 0
    finished: int = 0
    retried: dict[str, int] = field(default_factory=dict)
    """Calls made again, by what the node was doing and the status code that ended the previous try."""

    def error(self, text: str) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(text)


class Node:
    """One lightweight node; see the module docstring."""

    def __init__(self, target: str, name: str, fingerprint: str, tally: Tally) -> None:
        self.name, self.fingerprint, self.tally = name, fingerprint, tally
        # a connection of its own (gRPC shares one between a process's channels otherwise)
        self.channel = grpc.aio.insecure_channel(target, options=[*GRPC_OPTIONS, ("grpc.use_local_subchannel_pool", 1)])
        call = self.channel.unary_unary
        self._challenge = call(f"/{SERVICE}/Challenge", request_serializer=fpb.ChallengeRequest.SerializeToString,
                               response_deserializer=fpb.ChallengeReply.FromString)
        self._register = call(f"/{SERVICE}/Register", request_serializer=fpb.RegisterRequest.SerializeToString,
                              response_deserializer=fpb.RegisterReply.FromString)
        self._heartbeat = call(f"/{SERVICE}/Heartbeat", request_serializer=fpb.HeartbeatRequest.SerializeToString,
                               response_deserializer=fpb.HeartbeatReply.FromString)
        self._poll = self.channel.unary_stream(
            f"/{SERVICE}/GetInstructions", request_serializer=fpb.InstructionsRequest.SerializeToString,
            response_deserializer=_raw)
        self._submit = self.channel.stream_unary(
            f"/{SERVICE}/SubmitUpdate", request_serializer=_raw, response_deserializer=fpb.SubmitAck.FromString)
        self.md: tuple[tuple[str, str], ...] = ()
        self.heartbeat_s = 5.0
        self.doing = "registering"

    async def run(self) -> None:
        try:
            await self._retry(self.register, renew=False)
            beat = asyncio.create_task(self._beat())
            try:
                await self._loop()
            finally:
                beat.cancel()
        except grpc.aio.AioRpcError as e:
            self.tally.error(f"{self.name}: {self.doing}: {e.code().name}: {e.details()}"[:300])
        except Exception as e:  # noqa: BLE001 - counted and reported by the caller
            self.tally.error(f"{self.name}: {self.doing}: {type(e).__name__}: {e}"[:300])
        finally:
            self.tally.finished += 1
            await self.channel.close()

    async def register(self) -> None:
        nonce = (await self._challenge(fpb.ChallengeRequest(node=self.name), timeout=60)).nonce
        rep = await self._register(fpb.RegisterRequest(node=self.name, nonce=nonce,
                                                       config_fingerprint=self.fingerprint), timeout=60)
        self.md = ((SESSION_METADATA_KEY, rep.session_token),)
        self.heartbeat_s = rep.heartbeat_interval_s or self.heartbeat_s

    async def _loop(self) -> None:
        while True:
            self.doing = "polling"
            frames = await self._retry(self._instructions)
            ins = frames_to_instructions(frames)
            if ins is None:
                continue
            if ins.phase == "stop":
                return
            state = {k: torch.randn_like(v) * 0.01 for k, v in ins.state.items()}
            self.doing = f"uploading round {ins.round}"
            ack = await self._retry(self._uploader(ClientReply(self.name, ins.round, state, num_examples=10), ins.phase))
            if ack.accepted:
                self.tally.acked[ins.round] = self.tally.acked.get(ins.round, 0) + 1

    def _uploader(self, reply: ClientReply, phase: str) -> Callable[[], Awaitable[fpb.SubmitAck]]:
        frames = list(reply_to_frames(reply, phase))
        return lambda: self._submit(iter(frames), metadata=self.md, timeout=600)

    async def _instructions(self) -> list[bytes]:
        call = self._poll(fpb.InstructionsRequest(wait_s=POLL_S), metadata=self.md, timeout=POLL_S + 600)
        return [frame async for frame in call]

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            try:
                await self._heartbeat(fpb.HeartbeatRequest(), metadata=self.md, timeout=30)
            except grpc.RpcError:
                pass  # the loop's calls say whether the server is gone

    async def _retry(self, call: Callable[[], Awaitable[_T]], renew: bool = True, attempts: int = 60) -> _T:
        for attempt in range(attempts):
            try:
                return await call()
            except grpc.aio.AioRpcError as e:
                code = e.code()
                if renew and code == grpc.StatusCode.UNAUTHENTICATED:
                    await self._retry(self.register, renew=False)
                    continue
                if code not in RETRY or attempt + 1 == attempts:
                    raise
                what = f"{self.doing.split(' round')[0]}: {code.name}"
                self.tally.retried[what] = self.tally.retried.get(what, 0) + 1
                await asyncio.sleep(min(10.0, 0.5 * 2 ** min(attempt, 5)) * random.uniform(0.8, 1.2))
        raise AssertionError("unreachable")


async def _run_nodes(port: int, first: int, count: int, fingerprint: str, status: Path, prefix: str) -> None:
    tally = Tally()

    def write() -> None:
        tmp = status.with_suffix(".tmp")
        tmp.write_text(json.dumps({"acked": tally.acked, "errors": tally.errors, "error_count": tally.error_count,
                                   "finished": tally.finished, "retried": tally.retried}))
        tmp.replace(status)

    nodes = [Node(f"127.0.0.1:{port}", f"{prefix}-{i:04d}", fingerprint, tally) for i in range(first, first + count)]
    tasks = [asyncio.create_task(n.run()) for n in nodes]
    while tally.finished < count:
        write()
        await asyncio.wait(tasks, timeout=1.0)
    write()


@dataclass
class Swarm:
    """``n`` lightweight nodes spread over ``processes`` processes; ``acked`` and ``errors`` merge theirs."""

    port: int
    n: int
    fingerprint: str
    folder: Path
    processes: int = 4
    prefix: str = "node"

    def __post_init__(self) -> None:
        self.procs: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(self) -> Swarm:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        share = -(-self.n // self.processes)
        for p, first in enumerate(range(0, self.n, share)):
            status = self.folder / f"swarm-{p}.json"
            log = open(self.folder / f"swarm-{p}.log", "w")  # noqa: SIM115 - the child writes it
            self.procs.append((subprocess.Popen(
                [sys.executable, "-m", SWARM_MODULE, str(self.port), str(first),
                 str(min(share, self.n - first)), self.fingerprint, str(status), self.prefix],
                env=env, stdout=log, stderr=subprocess.STDOUT), status))
        return self

    def join(self, timeout: float) -> None:
        """Wait up to ``timeout`` s for the processes; those still running are stopped."""
        end = time.monotonic() + timeout
        for proc, _ in self.procs:
            try:
                proc.wait(max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _statuses(self) -> list[dict[str, Any]]:
        out = []
        for _, status in self.procs:
            try:
                out.append(json.loads(status.read_text()))
            except (OSError, ValueError):
                continue
        return out

    @property
    def acked(self) -> dict[int, int]:
        total: dict[int, int] = {}
        for s in self._statuses():
            for r, k in s["acked"].items():
                total[int(r)] = total.get(int(r), 0) + k
        return total

    @property
    def errors(self) -> list[str]:
        return [e for s in self._statuses() for e in s["errors"]]

    @property
    def retried(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for s in self._statuses():
            for code, k in s["retried"].items():
                total[code] = total.get(code, 0) + k
        return total

    @property
    def error_count(self) -> int:
        return sum(s["error_count"] for s in self._statuses())


if __name__ == "__main__":
    torch.set_num_threads(1)
    port, first, count, fp, status = sys.argv[1:6]
    asyncio.run(_run_nodes(int(port), int(first), int(count), fp, Path(status),
                           sys.argv[6] if len(sys.argv) > 6 else "node"))
