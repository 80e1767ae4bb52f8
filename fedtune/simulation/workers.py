"""``sim.workers`` > 1: virtual clients train in parallel in worker processes that share ONE base model.

The workers are forked from the engine's process after it loaded the model, so their base weights are the
parent's pages, copy-on-write: frozen weights are never written, so they stay shared and each worker adds
only what training allocates (activations, gradients, the adapter it is training). Flower's simulation
instead pays one model per Ray actor, and FlowerTune rebuilds it in every client call.

Each task carries a batch of ``sim.batch_clients`` clients (any phase: ``batched.answer``), with each one's
per-client state (kept optimizer state, update-pipeline state) and the base-weight updates (``flora``,
``fedex``) that worker has not folded in yet, applied in log order as the global model applied them; the
client's new state comes back with the reply. Replies come back in the order asked, so the streaming
strategies see exactly what the one-process pool gives them. Workers compute with one thread each (OpenMP is not
fork-safe beyond that; one thread per process also scales better than threads on small models). A worker
that dies (killed, out of memory) costs its client's reply for that round, recorded as a failure, and is
replaced by a fresh fork.
"""

from __future__ import annotations

import ctypes
import gc
import io
import logging
import multiprocessing as mp
import signal
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Any

import torch

from fedtune.client.phases import ClientContext
from fedtune.client.pipeline import make_pipeline
from fedtune.config import Config
from fedtune.models import LoadedModel, apply_base_update
from fedtune.simulation.batched import answer, batch_clients, chunks
from fedtune.simulation.store import ClientStore
from fedtune.types import ClientReply, Instructions, LowRankUpdate, failed_reply

if TYPE_CHECKING:
    from fedtune.simulation.pools import VirtualClient

log = logging.getLogger(__name__)


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _dumps(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _loads(data: bytes) -> Any:
    # Our own forked child's messages over a private pipe (replies and instructions are dataclasses).
    return torch.load(io.BytesIO(data), weights_only=False)


def _serve(conn: Connection, cfg: Config, lm: LoadedModel, clients: dict[str, VirtualClient],
           inherited: list[Connection]) -> None:
    """A worker's loop: fit the tasks that arrive until an empty message, or until the engine is gone."""
    for c in inherited:  # the engine's ends of every pipe: else this worker would never see the engine exit
        c.close()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the engine's to handle; it ends the workers
    torch.set_num_threads(1)
    pipeline = make_pipeline(cfg)
    while True:
        try:
            msg = conn.recv_bytes()
        except EOFError:
            return
        if not msg:
            return
        batch, updates = _loads(msg)
        for upd in updates:
            apply_base_update(lm.model, upd, lm.quantized)
        ctxs = [ClientContext(cfg, lm, clients[cid].examples, state,
                              keep_optimizer_state=cfg.sim.keep_optimizer_state, pipeline=pipeline)
                for cid, _, state in batch]
        replies = answer(ctxs, [ins for _, ins, _ in batch])
        conn.send_bytes(_dumps([(reply, ctx.state) for reply, ctx in zip(replies, ctxs, strict=True)]))


@dataclass
class _Worker:
    proc: Any
    conn: Connection
    held: int
    """Base updates this worker's model holds (the engine's log up to here)."""
    task: list[int] | None = None
    """Indices (in the round's items) of the batch of clients it is training."""
    cids: tuple[str, ...] = ()


class WorkerPool:
    """``sim.workers`` forked workers; ``run`` yields replies in the order asked (see the module docstring).

    ``base_updates`` is the global model's log of applied base updates (the list ``apply_round_result``
    appends to); ``store`` holds the clients' state.
    """

    def __init__(self, cfg: Config, lm: LoadedModel, clients: list[VirtualClient], store: ClientStore,
                 base_updates: list[dict[str, LowRankUpdate]], workers: int):
        self.cfg, self.lm, self.store, self.base_updates = cfg, lm, store, base_updates
        self.clients = {c.cid: c for c in clients}
        self._ctx = mp.get_context("fork")
        # What the workers inherit stays shared only while nobody writes it: collect now and keep the cyclic
        # GC off the objects that exist (its bookkeeping writes into every object it visits), and hand
        # freed heap back to the system rather than to the workers' allocators.
        gc.collect()
        gc.freeze()
        _malloc_trim()
        self.workers: list[_Worker] = []
        for _ in range(workers):
            self.workers.append(self._spawn())

    def _spawn(self) -> _Worker:
        parent, child = self._ctx.Pipe()
        inherited = [parent, *(w.conn for w in self.workers)]
        proc = self._ctx.Process(target=_serve, args=(child, self.cfg, self.lm, self.clients, inherited),
                                 daemon=True, name="fedtune-sim-worker")
        proc.start()
        child.close()
        return _Worker(proc, parent, held=len(self.base_updates))

    def run(self, rnd: int, items: list[tuple[str, Instructions]]) -> Iterator[ClientReply]:
        while any(w.task is not None for w in self.workers):  # a round abandoned half-way: drop its replies
            self._collect(rnd, {})
        todo = deque(chunks(list(enumerate(items)), batch_clients(self.cfg)))
        done: dict[int, tuple[ClientReply, dict[str, Any] | None]] = {}
        for i in range(len(items)):
            while i not in done:
                for w in self.workers:
                    if w.task is None and todo:
                        self._dispatch(w, todo.popleft())
                self._collect(rnd, done)
            reply, state = done.pop(i)
            if state is not None:  # None: the worker died, the client's state stays as it was
                self.store.put(items[i][0], rnd, state)
            yield reply

    def _dispatch(self, w: _Worker, batch: list[tuple[int, tuple[str, Instructions]]]) -> None:
        work = [(cid, ins, self.store.get(cid)) for _, (cid, ins) in batch]
        for _attempt in range(2):
            try:
                w.conn.send_bytes(_dumps((work, self.base_updates[w.held:])))
                break
            except OSError:  # it died idle: replace it and hand the task to the new one
                w = self._replace(w, f"simulation worker died (exit code {w.proc.exitcode}) while idle")
        w.held, w.task, w.cids = len(self.base_updates), [i for i, _ in batch], tuple(c for c, _, _ in work)

    def _replace(self, w: _Worker, reason: str) -> _Worker:
        w.proc.join(timeout=5)
        log.warning("%s; starting a new one", reason)
        new = self._spawn()
        self.workers[self.workers.index(w)] = new
        return new

    def _collect(self, rnd: int, done: dict[int, tuple[ClientReply, dict[str, Any] | None]]) -> None:
        """Wait for at least one busy worker to answer (or die)."""
        busy = {w.conn: w for w in self.workers if w.task is not None}
        for conn in wait(list(busy)):
            w = busy[conn]  # type: ignore[index]
            assert w.task is not None
            try:
                done.update(zip(w.task, _loads(w.conn.recv_bytes()), strict=True))
            except (EOFError, OSError):
                w.proc.join(timeout=5)
                reason = f"simulation worker died (exit code {w.proc.exitcode}) while training {', '.join(w.cids)}"
                done.update((i, (failed_reply(cid, rnd, reason), None)) for i, cid in zip(w.task, w.cids, strict=True))
                self._replace(w, reason)
                continue
            w.task = None

    def close(self) -> None:
        for w in self.workers:
            try:
                w.conn.send_bytes(b"")
            except OSError:
                pass  # already gone
            w.conn.close()
        for w in self.workers:
            w.proc.join(timeout=10)
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join()
        self.workers = []
        gc.unfreeze()
