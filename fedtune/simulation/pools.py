"""Where virtual clients do their work: in this process, in forked workers, or on Flower's Ray actors.

Every pool answers a phase's instructions with ``fedtune.client.phases.run_phase`` on a ``ClientContext``
built from the virtual client's examples and its state from the ``ClientStore``, and puts the state back
afterwards; replies come back in the order asked. The base model is shared: memory grows by adapter-sized
state per client, never by a model per client.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from fedtune.client.phases import ClientContext
from fedtune.client.pipeline import make_pipeline
from fedtune.config import Config
from fedtune.models import LoadedModel
from fedtune.simulation.batched import answer, batch_clients, chunks
from fedtune.simulation.store import ClientStore
from fedtune.types import ClientReply, Instructions, LowRankUpdate

log = logging.getLogger(__name__)


@dataclass
class VirtualClient:
    cid: str
    index: int
    records: list[dict[str, Any]]
    examples: list[dict[str, Any]]


class ClientPool(Protocol):
    """Runs the given clients' work of one phase; replies come back in the order asked."""

    def run(self, rnd: int, items: list[tuple[str, Instructions]]) -> Iterator[ClientReply]: ...

    def close(self) -> None: ...


class InProcPool:
    """Every virtual client works in this process on the one shared model, one after the other, or
    ``sim.batch_clients`` at a time in one batched pass (``fedtune.simulation.batched``)."""

    def __init__(self, cfg: Config, lm: LoadedModel, clients: list[VirtualClient], store: ClientStore):
        self.cfg, self.lm, self.clients, self.store = cfg, lm, {c.cid: c for c in clients}, store
        self.pipeline = make_pipeline(cfg)

    def run(self, rnd: int, items: list[tuple[str, Instructions]]) -> Iterator[ClientReply]:
        # lazily: the strategy consumes each batch's replies before the next batch trains
        for batch in chunks(items, batch_clients(self.cfg)):
            ctxs = [ClientContext(self.cfg, self.lm, self.clients[cid].examples, self.store.get(cid),
                                  keep_optimizer_state=self.cfg.sim.keep_optimizer_state, pipeline=self.pipeline)
                    for cid, _ in batch]
            for (cid, _), ctx, reply in zip(batch, ctxs, answer(ctxs, [ins for _, ins in batch]), strict=True):
                self.store.put(cid, rnd, ctx.state)
                yield reply

    def close(self) -> None:
        """Nothing to release: the model belongs to the caller."""


def clients_per_round(cfg: Config) -> int:
    """How many clients a federated round of ``cfg`` samples (what the centralized baseline must match)."""
    n, k = cfg.sim.num_clients, cfg.sim.clients_per_round
    if k == 0:
        return n
    return max(1, round(k * n)) if k < 1 else int(k)


def make_pool(cfg: Config, lm: LoadedModel, clients: list[VirtualClient], store: ClientStore,
              base_updates: list[dict[str, LowRankUpdate]]) -> ClientPool:
    """The pool of ``cfg.sim.backend`` (and ``cfg.sim.workers``); ``base_updates`` is the global model's log
    of base updates, which pools with their own model copies replay."""
    if cfg.sim.backend == "flower":
        from fedtune.simulation.flower_backend import FlowerPool

        return FlowerPool(cfg, clients, store=store, base_updates=base_updates)
    batches = -(-min(clients_per_round(cfg), len(clients)) // batch_clients(cfg))
    workers = min(cfg.sim.workers, batches)
    if workers > 1 and "fork" not in multiprocessing.get_all_start_methods():
        log.warning("sim.workers=%d needs fork() (Linux); the clients train in this process", workers)
    elif workers > 1:
        from fedtune.simulation.workers import WorkerPool

        return WorkerPool(cfg, lm, clients, store, base_updates, workers)
    return InProcPool(cfg, lm, clients, store)
