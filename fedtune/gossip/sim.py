"""``sim.mode = "gossip"`` in the simulator: the round driver with ``GossipRounds`` as its strategy.

What differs from a federated simulation is wrapped around the simulator's parts, not written again:

- ``GossipModel`` around the ``GlobalModel``: it evaluates the average adapter (``eval_loss``) and every
  node's own adapter, swapped onto the one shared base (``node_eval_loss_mean`` / ``_std`` / ``_min`` /
  ``_max``), and saves the average as ``adapter/`` and each node's adapter as ``nodes/<node>/``.
- ``GossipDispatcher`` around the ``SimDispatcher``: the nodes' local steps run on the simulator's pools with
  its fault injection (``sim.dropout``: a node offline for the round); each reply's bytes become what that
  node sends to (``bytes_up``) and receives from (``bytes_down``) its live neighbours in the round's
  exchanges: per exchange and live neighbour, the frames a real peer's fetch moves
  (``fedtune.transport.gossip.exchange_bytes``: header and dense tensor chunks), so ``fedtune gossip`` peers
  named like the nodes count the same bytes. Nothing goes to or from a server. A node in ``gossip.gone`` is not asked from its
  round of departure on: it answers with a failed reply, as a node that stopped answering would.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from typing import Any

import torch

from fedtune.adapters import A_SUFFIX, get_state, save_adapter, set_state
from fedtune.config import Config
from fedtune.dispatch import Dispatcher
from fedtune.global_model import GlobalModel
from fedtune.gossip.rounds import GossipRounds
from fedtune.runs import RunDir, replace_dir
from fedtune.strategies import strategy_config
from fedtune.strategies.config import StrategyConfig
from fedtune.transport.gossip import exchange_bytes
from fedtune.types import ClientReply, Instructions, State, failed_reply


def gossip_start(cfg: Config, model: GlobalModel) -> tuple[State, State | None, StrategyConfig]:
    """What every node starts from, in the simulator and on a real peer alike: the model's initial adapter,
    the frozen A factors shared outside it (``adapter.method = lora_fa``; None otherwise) and the strategy
    config that supplies rank and scale."""
    initial = model.initial_state()
    everything = get_state(model.lm.model, trainable_only=False)
    frozen = {k: v for k, v in everything.items() if k.endswith(A_SUFFIX) and k not in initial}
    return initial, frozen or None, strategy_config(cfg, model.lm.quantized, 0)


def gossip_setup(cfg: Config, model: GlobalModel, node_ids: list[str]) -> tuple[GossipRounds, GossipModel]:
    """The gossip strategy over ``node_ids`` (all starting from the model's initial adapter) and its model."""
    initial, frozen, scfg = gossip_start(cfg, model)
    rounds = GossipRounds(cfg.gossip, scfg, node_ids, initial, seed=cfg.seed, frozen=frozen)
    return rounds, GossipModel(model, rounds)


def _same(a: State, b: State) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class GossipModel:
    """The round driver's model in gossip mode (see the module docstring)."""

    def __init__(self, inner: GlobalModel, rounds: GossipRounds) -> None:
        self.inner, self.rounds = inner, rounds
        self.base_updates = inner.base_updates

    def initial_state(self) -> State:
        return self.inner.initial_state()

    def restore(self, state: State, base_updates: list[Any]) -> None:
        self.inner.restore(state, base_updates)

    def apply(self, global_state: State, result: Any) -> State:
        return self.inner.apply(global_state, result)

    def full_model_bytes(self) -> int:
        return self.inner.full_model_bytes()

    def evaluate(self) -> dict[str, float]:
        """The average adapter's held-out metrics, and the mean, spread and range of the nodes' eval loss."""
        lm = self.inner.lm
        average = get_state(lm.model)
        metrics = self.inner.evaluate()
        if "eval_loss" not in metrics:
            return metrics
        losses = []
        try:
            for node in self.rounds.nodes:
                if _same(node, average):  # round 0: every node holds the starting adapter
                    losses.append(metrics["eval_loss"])
                    continue
                set_state(lm.model, node)
                losses.append(self.inner.evaluate()["eval_loss"])
        finally:
            set_state(lm.model, average)
        return {**metrics, "node_eval_loss_mean": statistics.fmean(losses),
                "node_eval_loss_std": statistics.pstdev(losses), "node_eval_loss_min": min(losses),
                "node_eval_loss_max": max(losses)}

    def save(self, run: RunDir, global_state: State) -> None:
        """``adapter/`` the average adapter, ``nodes/<node>/`` each node's (PEFT format, each swapped in whole)."""
        model = self.inner.lm.model
        folder = run.path / "nodes"
        folder.mkdir(exist_ok=True)
        try:
            for cid, node in zip(self.rounds.ids, self.rounds.nodes, strict=True):
                set_state(model, node)
                tmp = folder / f"{cid}.tmp"
                save_adapter(model, tmp)
                replace_dir(tmp, folder / cid)
        finally:
            self.inner.save(run, global_state)


class GossipDispatcher:
    """The simulator's dispatcher with each reply's bytes counted as neighbour exchanges (module docstring)."""

    def __init__(self, inner: Dispatcher, rounds: GossipRounds, departures: dict[str, int] | None = None) -> None:
        self.inner, self.rounds = inner, rounds
        self.departures = dict(departures or {})
        """Nodes that leave for good: {node: first round it is gone} (``gossip.gone``)."""
        self._metrics: dict[str, Any] = {}

    def available(self, round: int) -> list[str]:
        return self.inner.available(round)

    def client_index(self, client_id: str) -> int:
        return self.inner.client_index(client_id)

    def dispatch(self, round: int, phase: str, instructions: dict[str, Instructions]) -> Iterator[ClientReply]:
        gone = {c for c, r in self.departures.items() if round >= r}
        asked = {c: ins for c, ins in instructions.items() if c not in gone}
        replies = list(self.inner.dispatch(round, phase, asked))
        replies += [failed_reply(c, round, f"left the gossip in round {self.departures[c]} (gossip.gone)")
                    for c in instructions if c in gone]
        index, n = self.rounds.index, len(self.rounds.ids)
        live = [False] * n
        trained: dict[int, ClientReply] = {}
        for r in replies:
            if r.ok and r.state is not None:
                live[index[r.client_id]] = True
                trained[index[r.client_id]] = r
        up, down = [0] * n, [0] * n
        for t, q in enumerate(self.rounds.matrices(round, live)):
            size = {i: exchange_bytes(r.client_id, round, t, r.state, r.num_examples)  # type: ignore[arg-type]
                    for i, r in trained.items()}  # dense frames: the size does not depend on the values
            for j, i in (q > 0).nonzero().tolist():  # j takes i's adapter
                if i != j:
                    up[i] += size[i]
                    down[j] += size[i]
        for r in replies:
            r.bytes_up, r.bytes_down = up[index[r.client_id]], down[index[r.client_id]]
        self._metrics = {"bytes_per_node": sum(up) / n, "bytes_total": sum(up)}
        yield from replies

    def metrics(self) -> dict[str, Any]:
        return {**self.inner.metrics(), **self._metrics}

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any], round: int) -> None:
        self.inner.load_state_dict(state, round)

    def close(self) -> None:
        self.inner.close()
