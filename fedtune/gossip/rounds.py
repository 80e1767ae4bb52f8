"""Gossip rounds on the one round driver: every node trains, then mixes with its neighbours; no server.

``GossipRounds`` is what the round driver (``fedtune.rounds``) runs as its strategy in ``sim.mode =
"gossip"``. It holds every node's own adapter (checkpointed in ``state_dict``), and a round is:

    configure: each node is sent its own adapter (a node trains from where it is, not from a global model)
    -> the dispatcher runs the local steps (the simulator's pools, fault injection included)
    -> aggregate: a node whose reply failed or was refused is missing this round (it keeps its adapter and
       drops out of the mix, ``mixing.drop_missing``); the others take ``gossip.exchanges_per_round``
       exchanges ``x_i <- sum_j Q_ij x_j`` with ``gossip.mix``
    -> the round's result is the nodes' average adapter (what the driver evaluates and saves as ``adapter/``),
       with the consensus distance, the mixing error (also as ``agg_error``: each node's gap to the average
       of the products it mixed, as a server's aggregation error is its gap to the clients' average) and the
       spectral gap as metrics.

With ``gossip.max_staleness = s > 0`` (bounded staleness, ``mixing.with_stale``) each node keeps the latest
adapter it received from each neighbour, and a missing neighbour's kept adapter at most s rounds old is
mixed instead of being left out; ``stale_mixes`` counts those uses in a round, ``stale_age_max`` their
largest age in rounds, and ``last_stale`` says which ({node: {neighbour: round of its adapter}}).

The average adapter is the same mix with every node weighted 1/n: the mean of A and B (``factors``), the
mean of B (``frozen_a``, exactly the mean update), or the best rank-r factors of the mean product
(``product``). Exchange t of round k (t = 0..E-1) uses the graph ``topology((k - 1) E + t)``, so a
time-varying topology moves on every exchange.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from fedtune.gossip.config import GossipConfig
from fedtune.gossip.mixing import (
    Seen,
    consensus_distance,
    drop_missing,
    mix,
    mix_row,
    mixing_error,
    mixing_matrix,
    spectral_gap,
    with_stale,
)
from fedtune.gossip.topology import make_topology
from fedtune.strategies.base import (
    PhaseResult,
    Rng,
    RoundResult,
    finish,
    lora_scale,
    make_instructions,
    valid_replies,
)
from fedtune.strategies.config import StrategyConfig
from fedtune.strategies.specs import StrategySpec
from fedtune.types import ClientReply, Instructions, State


class GossipRounds:
    """Every node's adapter and the mixing of one gossip round (see the module docstring).

    ``scfg`` supplies the adapter's rank, alpha and rsLoRA flag; ``frozen`` holds the tensors every node
    shares outside its state (the frozen A of ``adapter.method = lora_fa``).
    """

    needs_all_replies = True
    base_log: Any = None

    def __init__(self, gcfg: GossipConfig, scfg: StrategyConfig, node_ids: Sequence[str], initial: State, *,
                 seed: int, frozen: State | None = None) -> None:
        self.gcfg, self.cfg = gcfg, scfg
        self.name = f"gossip-{gcfg.mix}"
        self.spec = StrategySpec(f"{__name__}:GossipRounds", "decentralized LoRA (Dec-LoRA / DeCAF mixing)",
                                 lora_only=True)
        self.ids = list(node_ids)
        self.index = {cid: i for i, cid in enumerate(self.ids)}
        self.nodes: list[State] = [dict(initial) for _ in self.ids]
        self.topology = make_topology(gcfg.topology, len(self.ids), seed=seed, degree=gcfg.degree, p=gcfg.p)
        self.rank, self.scale = scfg.r, lora_scale(scfg, scfg.r)
        self.frozen = frozen
        self.seen: list[Seen] = [{} for _ in self.ids]
        """Bounded staleness: each node's latest adapter from each neighbour (``mixing.with_stale``)."""
        self.last_stale: dict[str, dict[str, int]] = {}
        """The last round's stale uses: {node: {neighbour: round of the adapter it mixed}}."""

    @property
    def linear(self) -> bool:
        return False  # nobody sums the replies: secure aggregation has nothing to hide them in

    def phases(self, round: int) -> Sequence[str]:
        return ("train",)

    def sent_keys(self, global_state: State) -> list[str]:
        return list(global_state)

    def matrices(self, round: int, live: Sequence[bool]) -> list[torch.Tensor]:
        """The mixing matrices of ``round``'s exchanges with the nodes that are not ``live`` left out."""
        e = self.gcfg.exchanges_per_round
        return [drop_missing(mixing_matrix(self.topology((round - 1) * e + t), self.gcfg.weights), live)
                for t in range(e)]

    def configure(self, round: int, client_ids: list[str], global_state: State, rng: Rng, *, phase: str = "train",
                  previous: PhaseResult | None = None) -> dict[str, Instructions]:
        """Every node trains from its own adapter."""
        return make_instructions(round, client_ids, {c: self.nodes[self.index[c]] for c in client_ids}, self.cfg)

    def average(self) -> State:
        """The nodes' average adapter under ``gossip.mix`` (see the module docstring)."""
        n = len(self.nodes)
        row = torch.full((1, n), 1.0 / n, dtype=torch.float64)
        return mix(self.nodes, row, self.gcfg.mix, scale=self.scale, rank=self.rank, frozen=self.frozen)[0]

    def aggregate(self, round: int, global_state: State, replies: Iterable[ClientReply], *,
                  phase: str = "train") -> RoundResult:
        """Take the trained adapters in, mix them with the neighbours', and return the average adapter."""
        failures: dict[str, str] = {}
        states = list(self.nodes)
        live = [False] * len(states)
        ok: list[str] = []
        for reply in valid_replies(replies, global_state, failures):
            assert reply.state is not None
            i = self.index[reply.client_id]
            states[i], live[i] = reply.state, True
            ok.append(reply.client_id)
        errors: list[float] = []
        stale_metrics: dict[str, float] = {}
        if self.gcfg.max_staleness > 0:
            states, errors, stale_metrics = self._mix_stale(round, states, live)
        else:
            for q in self.matrices(round, live):
                mixed = mix(states, q, self.gcfg.mix, scale=self.scale, rank=self.rank, frozen=self.frozen)
                errors.append(mixing_error(states, mixed, q, scale=self.scale, frozen=self.frozen))
                states = mixed
        self.nodes = states
        full = mixing_matrix(self.topology((round - 1) * self.gcfg.exchanges_per_round), self.gcfg.weights)
        metrics = {
            "consensus_distance": consensus_distance(states, scale=self.scale, frozen=self.frozen),
            "mixing_error": sum(errors) / len(errors),
            "agg_error": sum(errors) / len(errors),  # the round table's column: the same gap as a server's
            "spectral_gap": spectral_gap(full),
            "nodes_live": float(sum(live)),
            **stale_metrics,
        }
        return finish(RoundResult(state=self.average(), metrics=metrics), ok, failures)

    def _mix_stale(self, round: int, states: list[State], live: list[bool]) -> tuple[list[State], list[float],
                                                                                   dict[str, float]]:
        """The round's exchanges under bounded staleness, node by node (``mixing.with_stale``)."""
        e, n, s = self.gcfg.exchanges_per_round, len(states), self.gcfg.max_staleness
        errors: list[float] = []
        self.last_stale = {}
        for t in range(e):
            q = mixing_matrix(self.topology((round - 1) * e + t), self.gcfg.weights)
            mixed = list(states)
            for i in (i for i in range(n) if live[i]):
                row, view, stale = with_stale(q, i, states, live, self.seen[i], round, t, s)
                mixed[i] = mix_row(view, row, i, self.gcfg.mix, scale=self.scale, rank=self.rank, frozen=self.frozen)
                for j, r in stale.items():
                    self.last_stale.setdefault(self.ids[i], {})[self.ids[j]] = r
                if row[i] != 1.0:
                    only = torch.eye(n, dtype=q.dtype)
                    only[i] = row
                    errors.append(mixing_error(view, mixed, only, scale=self.scale, frozen=self.frozen))
            states = mixed
        ages = [round - r for uses in self.last_stale.values() for r in uses.values()]
        return states, errors or [0.0], {"stale_mixes": float(len(ages)), "stale_age_max": float(max(ages, default=0))}

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"nodes": {cid: dict(s) for cid, s in zip(self.ids, self.nodes, strict=True)}}
        if self.gcfg.max_staleness > 0:
            out["seen"] = {self.ids[i]: {self.ids[j]: {"round": r, "exchange": t, "state": dict(st)}
                                         for j, (r, t, st) in seen.items()} for i, seen in enumerate(self.seen)}
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        nodes = state["nodes"]
        missing = [c for c in self.ids if c not in nodes]
        if missing:
            raise ValueError(f"the checkpoint holds no adapter for gossip node(s) {', '.join(missing)}")
        self.nodes = [dict(nodes[c]) for c in self.ids]
        kept = state.get("seen", {})
        self.seen = [{self.index[j]: (int(v["round"]), int(v["exchange"]), dict(v["state"]))
                      for j, v in kept.get(c, {}).items()} for c in self.ids]
