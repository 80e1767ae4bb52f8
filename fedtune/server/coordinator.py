"""The coordinator's shared state between the round loop and the gRPC worker threads.

``RoundCoordinator`` implements ``fedtune.transport.Coordinator``: the transport calls ``register``,
``next_instructions``, ``submit`` and ``status`` from its worker threads; the round driver, through
``dispatch.GrpcDispatcher``, calls ``open_round`` for each phase of a round and consumes ``replies()``, which
it hands straight to ``strategy.aggregate``. Phases are names: any phase the strategy declares is published
and collected the same way.

Replies travel from the upload threads to the aggregating thread through a small bounded buffer: a
streaming strategy (fedavg family) holds one reply being averaged plus at most ``buffer`` waiting ones, and
uploads beyond that wait (flow control keeps their bytes on the nodes). Strategies that need every reply
at once get an unbounded buffer. Every round ends by its deadline: sampled nodes that did not answer by
then, or that went silent (no heartbeat for ``silence_s``), are recorded as failures with their reason.

A node that registers again may be a restarted process with a fresh base model: every registration reports
how many base-weight updates (flora, fedex) the node's model holds. The round loop takes these reports in
before it configures a round (``take_registrations``); when the open round's instructions for that node
assumed another count, ``replies`` (on the round loop's thread) has them rebuilt by ``rebase`` and the node
gets only the rebuilt ones.

One lock guards everything here; no call blocks while holding it.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from fedtune.compression.mask import MASK_ROUND
from fedtune.compression.rank import MAX_RANK, factor_fits
from fedtune.transport import (
    OBSERVER,
    ConfigMismatch,
    DecodedTensor,
    MessageRejected,
    RoundStatus,
    UpdateHeader,
    collect_reply,
    reply_wire_size,
)
from fedtune.types import ClientReply, Instructions, failed_reply
from fedtune.untrusted import MAX_NAME, clean

log = logging.getLogger(__name__)

MAX_DIFF_LINES = 20
MAX_REFUSALS_KEPT = 100
"""Refused registrations kept for the run's summary (the newest; the rest are counted)."""



def natural_key(name: str) -> list[Any]:
    """Sort key that puts ``client-2`` before ``client-10`` (the simulator numbers its clients that way)."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def fingerprint_diff(server_fp: str, node_fp: str) -> list[str]:
    """Human-readable ``key: server has X, node has Y`` lines between two config fingerprints: at most
    ``MAX_DIFF_LINES``, each value bounded (the node's fingerprint is whatever it sent)."""
    try:
        a, b = json.loads(server_fp), json.loads(node_fp)
        return _diff_lines(a, b)
    except (ValueError, RecursionError):
        return ["the node sent an unreadable config fingerprint (another fedtune version?)"]


def _diff_lines(a: Any, b: Any) -> list[str]:
    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(d, dict):
            return {prefix.rstrip("."): d}
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}."))
        return out

    fa, fb = flat(a), flat(b)
    keys = [k for k in sorted(set(fa) | set(fb), key=str) if fa.get(k) != fb.get(k)]
    lines = [f"{'model.name' if k == 'model' else clean(k, MAX_NAME)}: server has {clean(repr(fa.get(k)), 200)}, "
             f"node has {clean(repr(fb.get(k)), 200)}" for k in keys[:MAX_DIFF_LINES]]
    return lines + ([f"... and {len(keys) - MAX_DIFF_LINES} more key(s)"] if len(keys) > MAX_DIFF_LINES else [])


class RoundCoordinator:
    """Thread-safe round state; see the module docstring."""

    def __init__(self, fingerprint: str, total_rounds: int, *, silence_s: float = 15.0, buffer: int = 2,
                 encoding: str = "dense", disconnect_grace_s: float = 5.0) -> None:
        self.fingerprint, self.total_rounds = fingerprint, total_rounds
        self.silence_s, self.buffer = silence_s, buffer
        self.disconnect_grace_s = disconnect_grace_s
        """A node whose connection closed is lost after this long unless it calls again (a restart)."""
        self.encoding = encoding
        """The federation's wire encoding (``client.encoding``): updates are counted in it."""
        self.last_seen: Callable[[], dict[str, float]] = dict
        """Unix time of each node's last call; the round loop points this at the servicer's."""
        self.disconnected: Callable[[], dict[str, float]] = dict
        """Unix time the connection of each node closed, for nodes that have not called since; the round loop
        points this at the servicer's."""
        self.rebase: Callable[[str, int, Instructions], Instructions] | None = None
        """(node, base updates it holds, its open-round instructions) -> instructions for that base."""
        self._held: dict[str, int] = {}  # node -> base updates held, as reported at its last registration
        lock = threading.RLock()
        self._cond = threading.Condition(lock)
        # polls wait on their own condition, woken only when a node's instructions may have changed: with
        # every event waking every poll, 1,000 nodes' polls took turns at the lock on each reply and the
        # round loop hardly got it
        self._news = threading.Condition(lock)
        self._clients: dict[str, float] = {}  # participant -> registration time
        self._observers: set[str] = set()
        self.round, self.phase = 0, "waiting"
        self._open = False
        self._deadline = 0.0
        self._instr: dict[str, Instructions] = {}  # sampled nodes of the open round
        self._receiving: set[str] = set()
        self._answered: set[str] = set()  # received, rejected or failed in this round
        self._buf: deque[ClientReply] = deque()
        self._done = False
        self._stopped: set[str] = set()
        self.rejected = 0  # updates refused in the current round (validation, wrong round, late)
        self.refused_registrations: deque[str] = deque(maxlen=MAX_REFUSALS_KEPT)
        """The newest refusals, each bounded; ``refusals`` counts them all."""
        self.refusals = 0

    # -- transport side (gRPC worker threads) -------------------------------------------------------
    def register(self, node: str, fingerprint: str, base_updates: int = 0) -> None:
        """Admit ``node`` when its model/quant/adapter fingerprint equals the server's; ``base_updates`` is how
        many base-weight updates its model holds (0 for a fresh process).

        Raises:
            ConfigMismatch: the fingerprints differ; the message names every differing key.
        """
        if fingerprint == OBSERVER:
            with self._cond:
                self._observers.add(node)
            return
        if fingerprint != self.fingerprint:
            diff = fingerprint_diff(self.fingerprint, fingerprint)
            refused = ConfigMismatch(f"node {node!r} refused: its config differs from the server's in "
                                     f"{'; '.join(diff)} (model, quant and adapter sections must agree)")
            with self._cond:
                self.refused_registrations.append(refused.reason)  # bounded, as every transport reason
                self.refusals += 1
            raise refused  # the servicer logs it (rate-limited)
        with self._cond:
            first = node not in self._clients
            self._clients[node] = time.time()
            self._held[node] = base_updates
            self._observers.discard(node)
            self._publish_locked()
        log.info("node %s %s holding %d base update(s)", node, "registered" if first else "registered again",
                 base_updates)

    def next_instructions(self, node: str, timeout: float) -> Instructions | None:
        """This node's instructions of the open round (the same ones until it submits), a ``stop`` when the
        federation is over, or ``None`` after ``timeout`` s with nothing to do."""
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                if self._done:
                    self._stopped.add(node)
                    self._cond.notify_all()
                    return Instructions(round=self.round, client_id=node, state={}, phase="stop")
                if (node in self._clients and self._open and node in self._instr and node not in self._answered
                        and not self._stale_locked(node)):
                    return self._instr[node]
                left = end - time.monotonic()
                if left <= 0:
                    return None
                self._news.wait(left)

    def _publish_locked(self) -> None:
        """Wake every waiter: polls too (their node's instructions, or the federation's end, may be new)."""
        self._cond.notify_all()
        self._news.notify_all()

    def upload_window(self, node: str) -> float:
        """Seconds left for ``node``'s update of the open phase (to the round's deadline).

        Raises:
            MessageRejected: ``node`` was not asked for an update in the open round, is an observer, or has
                answered already: it may not hold an upload slot.
        """
        with self._cond:
            if node in self._observers:
                reason = f"{node!r} registered as an observer and cannot submit updates"
            elif not self._open or node not in self._instr:
                reason = (f"the server did not ask {node!r} for an update in round {self.round}" if self._open
                          else "the server is not collecting updates now")
            elif node in self._answered:
                reason = f"{node!r} already answered round {self.round}"
            else:
                return max(0.0, self._deadline - time.monotonic())
            self.rejected += 1
        raise MessageRejected(reason)

    def submit(self, node: str, header: UpdateHeader, tensors: Iterator[DecodedTensor]) -> str:
        """Decode, check and queue one update for the aggregating thread.

        Raises:
            MessageRejected: wrong round or phase, not asked, already answered, a tensor that does not match
                what the node was sent, any decoding error, or the round closed before the update got in.
        """
        with self._cond:
            rnd = self.round
            ins = self._instr.get(node) if self._open else None
            reason = None
            if node in self._observers:
                reason = f"{node!r} registered as an observer and cannot submit updates"
            elif ins is None or header.round != rnd:
                reason = (f"update for round {header.round}, but the server "
                          + (f"is in round {rnd} and did not ask {node!r}" if self._open and header.round == rnd
                             else f"is {'in round ' + str(rnd) if self._open else 'not collecting updates'}"))
            elif node in self._answered or node in self._receiving:
                reason = f"{node!r} already answered round {rnd}"
            elif header.phase != ins.phase:
                reason = f"update for phase {header.phase!r}, round {rnd} is in phase {ins.phase!r}"
            if reason is not None:
                self.rejected += 1
                raise MessageRejected(reason)
            self._receiving.add(node)
        assert ins is not None
        try:
            reply = collect_reply(header, self._checked(ins, tensors))
        except MessageRejected as e:
            with self._cond:
                self._receiving.discard(node)
                if "cancelled" in e.reason:  # the node went away mid-upload; it may send again
                    raise
                self.rejected += 1
                self._fail_locked(node, rnd, f"rejected update: {e.reason}")
            raise
        except BaseException:
            with self._cond:
                self._receiving.discard(node)
            raise
        if reply.error is not None:
            reply.error = f"client error: {reply.error}"
        reply.bytes_up = reply_wire_size(reply, header.phase, self.encoding)
        with self._cond:
            while self._open and self.round == rnd and len(self._buf) >= self.buffer:
                self._cond.wait(0.5)
            self._receiving.discard(node)
            if not (self._open and self.round == rnd) or node in self._answered:
                self.rejected += 1
                raise MessageRejected(f"round {rnd} closed before this update was taken in "
                                      "(past the deadline: it is left out)")
            self._answered.add(node)
            self._buf.append(reply)
            self._cond.notify_all()
        return f"update for round {rnd} received"

    @staticmethod
    def _checked(ins: Instructions, tensors: Iterator[DecodedTensor]) -> Iterator[DecodedTensor]:
        """Refuse tensors the node was not sent, or (at the configured rank) of another shape.

        A reply names only tensors its instructions carried, or named in ``extra["reply_tensors"]`` (secure
        aggregation's masked vector), unless they carried none (a phase whose answer is new data, such as a
        public key: the strategy checks it); its size is bounded by ``Limits`` either way.
        """
        declared = ins.extra.get("reply_tensors") or ()
        masked = MASK_ROUND in ins.extra  # a pruning mask: one value per entry of the mask (count checked later)
        max_rank = ins.extra.get(MAX_RANK)
        for d in tensors:
            if d.group not in ("state", "delta", "mask"):
                raise MessageRejected(f"unexpected tensor group {d.group!r} in an update")
            want = ins.state.get(d.name)
            if want is None and d.group in ("state", "delta") and ins.rank is None and ins.state and d.name not in declared:
                raise MessageRejected(f"tensor {d.name!r} was not sent to this node")
            if want is not None and (d.group == "delta" or masked) and d.tensor.dim() == 1 \
                    and d.tensor.numel() <= want.numel():
                pass  # random-k or a mask: the values only; the round driver checks their count
            elif want is not None and isinstance(max_rank, int) and \
                    factor_fits(d.name, tuple(d.tensor.shape), tuple(want.shape), max_rank):
                pass  # a LoRA factor at a pruned (or the untrimmed) rank
            elif want is not None and ins.rank is None and tuple(d.tensor.shape) != tuple(want.shape):
                raise MessageRejected(f"tensor {d.name!r} has shape {tuple(d.tensor.shape)}, "
                                      f"expected {tuple(want.shape)}")
            yield d

    def status(self, detail: bool = True) -> RoundStatus:
        with self._cond:
            if not detail:  # a heartbeat's answer: every node asks every few seconds, so O(1)
                return RoundStatus(self.round, self.phase)
            live = self._live_locked()
            info = {"rounds": str(self.total_rounds), "clients": ",".join(live),
                    "waiting_for": ",".join(n for n in self._instr if n not in self._answered) if self._open
                    else "", "rejected": str(self.rejected)}
            if self._open:
                info["deadline_in_s"] = f"{max(0.0, self._deadline - time.monotonic()):.0f}"
            return RoundStatus(self.round, self.phase, info)

    def _stale_locked(self, node: str) -> bool:
        """The node's process re-registered holding another base than its open-round instructions assume."""
        held = self._held.get(node)
        return held is not None and self._instr[node].extra.get("base_from", held) != held

    # -- round loop side ------------------------------------------------------------------------------
    def take_registrations(self) -> dict[str, int]:
        """Base updates held by each node that registered since the last call (call before configuring)."""
        with self._cond:
            held, self._held = self._held, {}
            return held

    def _rebase_stale(self) -> bool:
        """Rebuild the open round's instructions of re-registered nodes; True when any were rebuilt."""
        rebase = self.rebase
        with self._cond:
            todo = []
            for node in [n for n in self._held if n in self._instr and n not in self._answered]:
                if self._stale_locked(node) and rebase is not None:
                    todo.append((node, self._held[node], self._instr[node]))
                else:  # these instructions bring the node's base up to date: nothing to rewind later
                    del self._held[node]
        for node, held, ins in todo:
            assert rebase is not None
            new = rebase(node, held, ins)  # outside the lock: strategy code
            with self._cond:
                if self._instr.get(node) is ins and self._held.get(node) == held:
                    self._instr[node] = new
                    del self._held[node]
                    log.info("node %s restarted holding %d base update(s): its instructions were rebuilt", node, held)
                self._publish_locked()
        return bool(todo)
    def _lost_locked(self) -> dict[str, str]:
        """Registered nodes that are gone, with why: silent for ``silence_s``, or their connection closed
        ``disconnect_grace_s`` ago with no call since."""
        seen, closed, now = self.last_seen(), self.disconnected(), time.time()
        grace = min(self.disconnect_grace_s, self.silence_s)
        lost: dict[str, str] = {}
        for n in {**self._clients, **self._instr}:
            registered = self._clients.get(n, 0.0)
            t = max(seen.get(n, 0.0), registered)
            if now - t >= self.silence_s:
                lost[n] = f"lost: no call from the node for {now - t:.0f} s"
            elif n in closed and closed[n] >= registered and now - closed[n] >= grace:
                lost[n] = (f"lost: its connection closed {now - closed[n]:.0f} s ago (the process ended or the "
                           "network dropped) and it has not reconnected (federation.disconnect_grace_s)")
        return lost

    def _live_locked(self) -> list[str]:
        lost = self._lost_locked()
        return sorted((n for n in self._clients if n not in lost), key=natural_key)

    def live_clients(self) -> list[str]:
        """Registered nodes heard from within ``silence_s``, in natural name order."""
        with self._cond:
            return self._live_locked()

    def known_clients(self) -> list[str]:
        """Every node that registered since the server started, in natural name order."""
        with self._cond:
            return sorted(self._clients, key=natural_key)

    def set_phase(self, phase: str, round: int | None = None) -> None:
        with self._cond:
            self.phase = phase
            if round is not None:
                self.round = round

    def wait_for_clients(self, n: int, timeout: float) -> bool:
        """Block until ``n`` nodes are live; False after ``timeout`` s."""
        end = time.monotonic() + timeout
        with self._cond:
            while len(self._live_locked()) < n:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 1.0))
            return True

    def open_round(self, rnd: int, instructions: dict[str, Instructions], deadline_s: float, buffer: int,
                   phase: str = "train") -> None:
        """Publish ``instructions`` (client id -> instructions, all of phase ``phase``) and start taking updates
        for that phase of ``rnd``."""
        with self._cond:
            self.round, self.phase = rnd, phase
            self._instr = dict(instructions)
            self._answered, self._receiving = set(), set()
            self._buf.clear()
            self.rejected = 0
            self.buffer = buffer
            self._deadline = time.monotonic() + deadline_s
            self._open = True
            self._publish_locked()

    def _fail_locked(self, node: str, rnd: int, reason: str) -> None:
        if node in self._answered:
            return
        self._answered.add(node)
        self._buf.append(failed_reply(node, rnd, reason))
        self._cond.notify_all()

    def replies(self) -> Iterator[ClientReply]:
        """The open round's replies as they arrive (failures included), until every sampled node answered,
        failed or went silent, or the deadline passed; then the round is closed."""
        deadline_s = None
        while True:
            if self._rebase_stale():
                continue
            with self._cond:
                if deadline_s is None:
                    deadline_s = self._deadline
                if not self._buf:
                    self._mark_silent_locked()
                pending = [n for n in self._instr if n not in self._answered]
                if not self._buf and (not pending or time.monotonic() >= self._deadline):
                    rnd = self.round
                    for n in pending:
                        self._answered.add(n)
                        self._buf.append(failed_reply(n, rnd, "straggler: no update before the round deadline"))
                    self._open = False
                    self.phase = "aggregating"
                    left = list(self._buf)
                    self._buf.clear()
                    self._cond.notify_all()
                    break
                if not self._buf:
                    self._cond.wait(min(0.5, max(0.0, self._deadline - time.monotonic())))
                    continue
                reply = self._buf.popleft()
                self._cond.notify_all()
            yield reply
        yield from left

    def _mark_silent_locked(self) -> None:
        lost = self._lost_locked()
        for n in self._instr:
            if n not in self._answered and n not in self._receiving and n in lost:
                self._fail_locked(n, self.round, lost[n])

    def finish(self) -> None:
        """The federation is over: every poll from now on answers ``stop``."""
        with self._cond:
            self._done, self._open, self.phase = True, False, "done"
            self._publish_locked()

    def wait_stopped(self, timeout: float) -> list[str]:
        """Wait until every live node has been told to stop; returns those that were not."""
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                missing = [n for n in self._live_locked() if n not in self._stopped]
                left = end - time.monotonic()
                if not missing or left <= 0:
                    return missing
                self._cond.wait(min(left, 0.5))
