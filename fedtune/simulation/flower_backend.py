"""``sim.backend = "flower"``: the same client code and strategies, run by Flower's simulation engine on Ray.

One long-lived Flower simulation (``flwr.simulation.run_simulation``) runs in a background thread for the
whole federation. Its ServerApp is a relay (``fedtune.flower.server_app``): the engine's round loop hands it
each round's instructions, it sends them as Messages (adapter tensors in ArrayRecords) to the simulated nodes,
and ``run`` yields the replies in the order asked. Each Ray actor runs ``fedtune.flower.client_app``:
one base model per actor, data partitions rebuilt from the config, so ``sim.ray_address`` scales it out.

What inproc clients share through the engine's one model has to travel to the actors' copies:

- Base-weight updates (``flora``, ``fedex``). The engine logs every applied ``RoundResult.base_update``
  (``base_updates``, checkpointed for resume); each message carries this run's nonce and the log from
  ``base_from``, the log length at the previous round's dispatch, which every actor that worked last round
  holds. An actor folds in what it lacks, in log order (bitwise the engine's weights); one that lacks older
  updates (idle last round, or fresh) answers so, and the relay resends that task with the whole log. A
  message costs O(updates since last round), a resend O(rounds x update). The strategies'
  ``Instructions.base_update`` is not used: it tracks what each *client* has been sent, which is right for a
  gRPC node with its own model, but here a virtual client lands on any actor, so what matters is what each
  *actor's model* holds. A new nonce per pool makes a cached model of another or a resumed run reload.
- Per-client state (kept optimizer state with ``sim.keep_optimizer_state``, update-pipeline state). Read
  from the ``ClientStore`` for every sampled client, sent as ``torch.save`` bytes, returned after training and
  put back in the store, so checkpoints and resume work as in inproc. A round holds the sampled clients'
  states in memory at once.
"""

from __future__ import annotations

import os
import queue
import threading
import uuid
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from fedtune.config import Config
from fedtune.flower.records import config_overrides
from fedtune.flower.server_app import STOP, Job, relay_app
from fedtune.types import ClientReply, Instructions, LowRankUpdate

if TYPE_CHECKING:
    from fedtune.simulation.store import ClientStore


def backend_config(cfg: Config, num_cpus: float | None = None) -> dict[str, Any]:
    """Flower's Ray backend settings: one actor per ``num_cpus`` CPUs (env FEDTUNE_RAY_CPUS, default 2).

    With CUDA present (and ``model.device`` not cpu) each actor takes a whole GPU.
    """
    cpus = num_cpus or float(os.environ.get("FEDTUNE_RAY_CPUS", min(2, os.cpu_count() or 1)))
    gpus = 1.0 if torch.cuda.is_available() and cfg.model.device != "cpu" else 0.0
    init_args: dict[str, Any] = {"logging_level": "ERROR", "log_to_driver": True}
    if cfg.sim.ray_address:
        init_args["address"] = cfg.sim.ray_address
    return {"client_resources": {"num_cpus": cpus, "num_gpus": gpus}, "init_args": init_args}


class FlowerPool:
    """Runs each round's clients on Flower's simulation engine; see the module docstring.

    ``base_updates`` is the global model's log of applied base updates (the list it appends to); ``store``
    holds the clients' state (none kept without one).
    """

    def __init__(self, cfg: Config, clients: list[Any], num_cpus: float | None = None, *,
                 store: ClientStore | None = None, base_updates: list[dict[str, LowRankUpdate]] | None = None):
        self.cfg = cfg
        self.index = {c.cid: c.index for c in clients}
        self.cfg_items = config_overrides(cfg)
        self.store = store
        self.base_updates = base_updates if base_updates is not None else []
        self.run_id = uuid.uuid4().hex
        self._synced = 0  # base updates every actor that worked last round holds
        self.backend = backend_config(cfg, num_cpus)
        # Actors compute with this process's thread count (capped by their CPUs): same math as inproc.
        self.threads = max(1, min(torch.get_num_threads(), int(self.backend["client_resources"]["num_cpus"])))
        self._sim = _Simulation(len(clients), self.backend)
        # Closed when the engine drops the pool (end of run_simulation) or at exit, whichever comes first.
        self._finalizer = weakref.finalize(self, self._sim.close)

    def run(self, rnd: int, items: list[tuple[str, Instructions]]) -> Iterator[ClientReply]:
        """Send every item at once; yield reply i as soon as it (and all before it) came back."""
        store = self.store
        work = [(cid, ins, self.index[cid], store.get(cid) if store is not None else {}) for cid, ins in items]
        job = Job(rnd, work, self.cfg_items, self.threads, run=self.run_id, base=list(self.base_updates),
                  base_from=min(self._synced, len(self.base_updates)))
        self._synced = len(self.base_updates)
        self._sim.jobs.put(job)
        for i, (cid, _) in enumerate(items):
            with job.cond:
                while i not in job.replies:
                    self._sim.check()
                    job.cond.wait(timeout=1.0)
                reply, state = job.replies.pop(i), job.states.pop(i)
            if store is not None and state is not None:
                store.put(cid, rnd, state)
            yield reply

    def close(self) -> None:
        """End the simulation (the relay's main returns; Flower stops its actors and Ray)."""
        self._finalizer()


class _Simulation:
    """The background thread running ``flwr.simulation.run_simulation`` with the relay ServerApp."""

    def __init__(self, num_nodes: int, backend: dict[str, Any]):
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(num_nodes, backend), daemon=True,
                                       name="flower-simulation")
        self.thread.start()

    def _run(self, num_nodes: int, backend: dict[str, Any]) -> None:
        from flwr.simulation import run_simulation

        from fedtune.flower.client_app import app

        try:
            run_simulation(server_app=relay_app(self.jobs, num_nodes), client_app=app, num_supernodes=num_nodes,
                           backend_config=backend)
        except BaseException as exc:  # noqa: BLE001 - reported to the waiting fit_round
            self.error = exc

    def check(self) -> None:
        if not self.thread.is_alive():
            raise RuntimeError(f"the Flower simulation stopped: {self.error!r}") from self.error

    def close(self) -> None:
        if self.thread.is_alive():
            self.jobs.put(STOP)
            self.thread.join(timeout=120)
