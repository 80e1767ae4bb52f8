"""The averaging family: fedavg (FedIT), fedprox, ffa, server optimizers and robust aggregation.

All of them average every trainable tensor (A and B separately), so their aggregate is
``(sum p_k B_k)(sum p_k A_k)``, not ``sum p_k B_k A_k``; the gap is reported as ``agg_error``. ``ffa``
averages only B against a frozen shared A, which makes it exact.

With the weighted mean (``robust = "none"``) replies are consumed one at a time and the server keeps one
adapter of running sums; robust aggregators hold every reply (``needs_all_replies``). Each variant is a
small subclass of ``FedAvg`` overriding one hook: which keys are sent (``ffa``), the clients' training
instructions (``fedprox``), or a server step on the mean (``ServerOptimizer``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from fedtune.adapters import B_SUFFIX
from fedtune.strategies import robust
from fedtune.strategies.agg_error import ErrorMeter
from fedtune.strategies.averaging import WeightedMean
from fedtune.strategies.base import (
    PhaseResult,
    Rng,
    RoundResult,
    StrategyBase,
    factor_pairs,
    finish,
    lora_scale,
    make_instructions,
    not_applied,
    select_clients,
    valid_replies,
)
from fedtune.strategies.config import StrategyConfig
from fedtune.strategies.optimizers import OPTIMIZERS, ServerOptState, server_step
from fedtune.types import ClientReply, Instructions, State


class FedAvg(StrategyBase):
    """Weighted (or robust) mean of the clients' tensors: fedavg, and the robust names (``cfg.robust`` picks
    median / trimmed_mean / krum / multikrum instead of the weighted mean). Keeps no state between rounds."""

    def __init__(self, cfg: StrategyConfig) -> None:
        super().__init__(cfg)
        self.needs_all_replies = cfg.robust != "none"

    def _train(self) -> dict[str, object]:
        """Training instructions this strategy adds on top of the run's ``train.*``."""
        return {}

    def _server_step(self, global_state: State, mean: State, result: RoundResult, keys: list[str]) -> None:
        """What happens to the mean before it becomes the global state (nothing: it is the global state)."""

    def configure(self, round: int, client_ids: list[str], global_state: State, rng: Rng, *, phase: str = "train",
                  previous: PhaseResult | None = None) -> dict[str, Instructions]:
        """Sample clients; each gets the global state (ffa: only B, A is rebuilt from the shared seed)."""
        chosen = select_clients(client_ids, self.cfg, rng)
        keys = self.sent_keys(global_state)
        state = {k: global_state[k] for k in keys}
        return make_instructions(round, chosen, {c: state for c in chosen}, self.cfg, train=self._train())

    def aggregate(self, round: int, global_state: State, replies: Iterable[ClientReply], *,
                  phase: str = "train") -> RoundResult:
        """Average the valid replies; below ``min_replies`` the global state is returned unchanged."""
        keys = self.sent_keys(global_state)
        failures: dict[str, str] = {}
        ok: list[str] = []
        meter = ErrorMeter.for_round(self.cfg, round, global_state)
        acc = WeightedMean(global_state, keys)
        kept: list[ClientReply] = []
        for reply in valid_replies(replies, global_state, failures, keys=keys):
            assert reply.state is not None
            if self.needs_all_replies:
                if reply.mask is not None:
                    failures[reply.client_id] = f"robust aggregation ({self.cfg.robust}) cannot use masked replies"
                    continue
                kept.append(reply)
            else:
                acc.add(reply.state, float(reply.num_examples), reply.mask)
            ok.append(reply.client_id)
            if meter is not None:
                # ffa sends only B; the meter reads the shared frozen A from the global state.
                meter.add({k: reply.state[k] for k in keys}, float(reply.num_examples))
        if len(ok) < self.cfg.min_replies:
            return not_applied(global_state, ok, failures, self.cfg)
        mean = self._robust(kept, keys) if self.needs_all_replies else acc.result()
        result = RoundResult(state={**global_state, **mean})
        if meter is not None:
            result.agg_error_layers = self._errors(meter, result.state)
            result.metrics["agg_error_estimated"] = float(meter.estimated)
        self._server_step(global_state, mean, result, keys)
        return finish(result, ok, failures)

    def _robust(self, kept: list[ClientReply], keys: list[str]) -> State:
        states = [r.state for r in kept if r.state is not None]
        if self.cfg.robust == "median":
            return robust.coordinate_median(states, keys)
        if self.cfg.robust == "trimmed_mean":
            return robust.trimmed_mean(states, keys, self.cfg.trim_fraction)
        weights = [float(r.num_examples) for r in kept]
        if self.cfg.robust == "krum":
            return robust.krum(states, weights, keys, self.cfg.krum_f, 1)
        m = self.cfg.multikrum_m or max(len(states) - self.cfg.krum_f, 1)
        return robust.krum(states, weights, keys, self.cfg.krum_f, min(m, len(states)))

    def _errors(self, meter: ErrorMeter, averaged: State) -> dict[str, float]:
        """Per layer ``||s B_bar A_bar - sum_k p_k s_k B_k A_k|| / ||sum_k p_k s_k B_k A_k||`` (before any server step)."""
        agg = {prefix: [(b.float() * lora_scale(self.cfg, a.shape[0]), a.float())]
               for prefix, (b, a) in factor_pairs(averaged).items()}
        return meter.errors(agg)


class FedProx(FedAvg):
    """fedavg whose clients add the proximal term ``strategy.prox_mu / 2 ||w - w_global||^2`` (Li et al. 2020)."""

    def _train(self) -> dict[str, object]:
        return {"prox_mu": self.cfg.prox_mu}


class FFA(FedAvg):
    """FFA-LoRA (Sun et al. 2024): A frozen at a seed every site shares, only B trained, sent and averaged.

    The global state holds the frozen A too (the spec's ``frozen_in_state``): the aggregation error is
    computed against it.
    """

    def sent_keys(self, global_state: State) -> list[str]:
        return [k for k in global_state if k.endswith(B_SUFFIX)]


class ServerOptimizer(FedAvg):
    """A server optimizer step from the global state towards the clients' mean (``optimizers.server_step``):
    ``kind`` is fedavgm, fedadam, fedyogi or fedadagrad. Keeps the optimizer's moments between rounds.

    Raises:
        ValueError: an unknown ``kind``.
    """

    def __init__(self, cfg: StrategyConfig, kind: str) -> None:
        if kind not in OPTIMIZERS:
            raise ValueError(f"unknown server optimizer {kind!r}; valid: {', '.join(OPTIMIZERS)}")
        super().__init__(cfg)
        self.kind = kind
        self.opt = ServerOptState()

    def _server_step(self, global_state: State, mean: State, result: RoundResult, keys: list[str]) -> None:
        new_state, self.opt = server_step(self.kind, global_state, mean, self.opt, self.cfg)
        result.state = new_state
        delta = sum(float((new_state[k].float() - global_state[k].float()).square().sum()) for k in keys)
        result.metrics["server_update_norm"] = delta**0.5

    def state_dict(self) -> dict[str, Any]:
        return {"m": dict(self.opt.m), "v": dict(self.opt.v), "steps": self.opt.steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.opt = ServerOptState(m=dict(state["m"]), v=dict(state["v"]), steps=int(state["steps"]))
