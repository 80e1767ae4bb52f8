"""Bounds on what one peer can hold on the server: concurrent calls per node, threads, and idle uploads.

The gRPC server runs every call on one of ``max_workers`` threads. Long polls and uploads hold a thread for
seconds to minutes, so without bounds one enrolled node could hold them all (300 open polls) and leave no
thread for the heartbeats of honest nodes, which then look lost. ``CallGate`` bounds the calls of each node
(by kind) and keeps a reserve of threads that long calls never take, so short calls (heartbeats, status,
registration) always find one. A call beyond its node's limit is held for ``hold_s`` before it is refused, and
each connection may have ``STREAMS_PER_CONNECTION`` calls open (HTTP/2's own bound, kept by gRPC's core): a
node that floods the server with calls then waits on its own side, and costs the server a few refusals a
second instead of hundreds. ``Watchdog`` cuts an upload whose node sends nothing for ``idle_s`` while
the server waits for its bytes, or that is still streaming when its round's deadline has passed: an open
stream that sends nothing holds an upload slot, and there are only a few.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc

from fedtune.transport.errors import MessageRejected, TransportError

log = logging.getLogger(__name__)

POLL, UPLOAD, SHORT, PRESENCE = "poll", "upload", "short", "presence"
PER_NODE = {POLL: 2, UPLOAD: 1, SHORT: 4, PRESENCE: 2}
"""Concurrent calls one node may have open, by kind. An honest node has one poll or upload at a time (its
main loop), a heartbeat and its presence stream; the slack covers a call the node gave up on that the server
has not noticed."""
LONG = (POLL, UPLOAD, PRESENCE)
HOLD_S = 2.0
"""How long a call beyond its node's limit is held before it is refused (the node's calls slow to its pace)."""
MAX_HELD = 30
"""Over-limit calls of one node held at a time; more are refused at once."""
STREAMS_PER_CONNECTION = 32
"""Concurrent calls (HTTP/2 streams) on one connection: more wait on the node's side, at no cost to the server.
An honest node has three open (its poll or upload, a heartbeat and its presence stream), ``fedtune status`` one; the slack
covers calls that ended but whose stream gRPC frees only when Python collects the call (an exception in a
reference cycle keeps it until the next garbage collection). At most 2 (a node's poll limit) + ``MAX_HELD``, so that a flood of
polls over one connection is all held, none refused at once."""


def reserve_for(max_workers: int) -> int:
    """Threads that long calls (polls, uploads) never take: what short calls always find."""
    return max(4, max_workers // 8)


class CallGate:
    """Per-node and server-wide bounds on concurrent calls; see the module docstring."""

    def __init__(self, max_workers: int, per_node: dict[str, int] | None = None, hold_s: float = HOLD_S,
                 max_held: int = MAX_HELD) -> None:
        self.long_capacity = max(1, max_workers - reserve_for(max_workers))
        self.per_node = dict(PER_NODE, **(per_node or {}))
        self.hold_s, self.max_held = hold_s, max_held
        self._lock = threading.Lock()
        self._open: dict[tuple[str, str], int] = {}
        self._held: dict[str, int] = {}
        self._long = 0
        self._warned = 0.0

    @contextlib.contextmanager
    def call(self, node: str, kind: str) -> Iterator[None]:
        """Hold one ``kind`` call of ``node`` open for the ``with`` block.

        Raises:
            TransportError: RESOURCE_EXHAUSTED when the node already has its limit of such calls open (after
                ``hold_s``), or the long calls of all nodes hold every thread but the reserve (the node
                retries later).
        """
        key, long = (node, kind), kind in LONG
        with self._lock:
            n = self._open.get(key, 0)
            if n >= self.per_node[kind]:
                self._refuse_over_limit(node, kind, n)
            # a node's extra calls of a kind (beyond its first) may use only half the threads: the other half
            # stays for the first calls of other nodes
            if long and (self._long >= self.long_capacity or (n and self._long >= self.long_capacity // 2)):
                now = time.monotonic()
                if now - self._warned > 60:
                    self._warned = now
                    log.warning("every one of the %d threads for polls and uploads is taken: raise the server's "
                                "worker count for this many nodes", self.long_capacity)
                raise TransportError("server busy: too many open polls and uploads, retry later",
                                     grpc.StatusCode.RESOURCE_EXHAUSTED)
            self._open[key] = n + 1
            self._long += long
        try:
            yield
        finally:
            with self._lock:
                self._long -= long
                left = self._open[key] - 1
                if left:
                    self._open[key] = left
                else:
                    del self._open[key]

    def _refuse_over_limit(self, node: str, kind: str, n: int) -> None:
        """Refuse a call beyond ``node``'s limit, after holding it ``hold_s`` (called, and returns, with the
        lock held). The held calls take threads of the long calls' half that a node's extra calls may use,
        so they never take the reserve or the threads of other nodes' first calls; beyond ``max_held`` (or
        that half) the refusal is immediate."""
        held = self._held.get(node, 0)
        if self.hold_s > 0 and held < self.max_held and self._long < self.long_capacity // 2:
            self._held[node], self._long = held + 1, self._long + 1
            self._lock.release()
            try:
                time.sleep(self.hold_s)
            finally:
                self._lock.acquire()
                self._long -= 1
                if self._held[node] > 1:
                    self._held[node] -= 1
                else:
                    del self._held[node]
        raise TransportError(f"{node!r} already has {n} {kind} call(s) open (at most "
                             f"{self.per_node[kind]} at a time)", grpc.StatusCode.RESOURCE_EXHAUSTED)

    def nodes_in_calls(self) -> set[str]:
        """Nodes with a call open now (a node in a long poll is alive even if its heartbeat is late). A presence
        stream does not count: it stays open on a connection whose peer vanished without closing it."""
        with self._lock:
            return {node for node, kind in self._open if kind != PRESENCE}


@dataclass(eq=False)
class Watched:
    """One upload under the watchdog. ``waiting_since``: when the server started waiting for the node's next
    bytes (None while it is not waiting); ``cut``: why the watchdog cut the stream, once it did."""

    cancel: Callable[[], None]
    deadline: float
    waiting_since: float | None = None
    cut: str | None = None

    def reads(self, it: Iterator[bytes]) -> Iterator[bytes]:
        """``it``'s items, timing each wait for the next one; raises MessageRejected once the stream is cut."""
        while True:
            self.waiting_since = time.monotonic()
            try:
                item = next(it)
            except StopIteration:  # a cancelled gRPC stream may also just end
                if self.cut is not None:
                    raise self.error() or AssertionError from None
                return
            except grpc.RpcError:
                raise self.error() or MessageRejected("update stream cancelled by the node") from None
            finally:
                self.waiting_since = None
            if self.cut is not None:
                raise self.error() or AssertionError
            yield item

    def error(self) -> MessageRejected | None:
        return MessageRejected(f"update stream cut: {self.cut}") if self.cut is not None else None


class Watchdog:
    """Cuts uploads that go idle or outlive their round; see the module docstring. One thread for all."""

    def __init__(self, idle_s: float) -> None:
        self.idle_s = idle_s
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._watched: dict[int, Watched] = {}
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def watch(self, cancel: Callable[[], None], seconds_left: float) -> Iterator[Watched]:
        """Watch one upload for the ``with`` block: ``cancel`` breaks its stream; it must end within
        ``seconds_left`` (its round's deadline)."""
        w = Watched(cancel, time.monotonic() + seconds_left)
        i = next(self._ids)
        with self._lock:
            self._watched[i] = w
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="upload-watchdog", daemon=True)
                self._thread.start()
        try:
            yield w
        finally:
            with self._lock:
                del self._watched[i]

    def _run(self) -> None:
        tick = min(0.5, self.idle_s / 4)
        while True:
            time.sleep(tick)
            now = time.monotonic()
            with self._lock:
                todo = list(self._watched.values())
                if not todo:  # started again by the next upload
                    self._thread = None
                    return
            for w in todo:
                if w.cut is not None:
                    continue
                since = w.waiting_since
                if since is not None and now - since > self.idle_s:
                    w.cut = f"the node sent nothing for {self.idle_s:g} s"
                elif now > w.deadline:
                    w.cut = "the round's deadline passed while it was still streaming"
                else:
                    continue
                try:
                    w.cancel()
                except Exception:  # a stream already gone
                    log.debug("cancelling a watched upload failed", exc_info=True)
