"""Exact LoRA aggregation: flora (stacking), svd (exact average, best rank-r), fedex (average + residual).

Each keeps every client's factors of the round (they are the exact average in factored form), so memory is
O(sum_k r_k (d_out + d_in)) per layer. Replies are still consumed one at a time. Tensors that are not LoRA
factors (biases, ``modules_to_save``) are weighted means.

``base_update`` (flora, fedex) is the part of the average that moves into the frozen base weights. The
strategy keeps a log of them and hands every client, in ``Instructions.base_update``, all updates it has not
received yet (merged per layer), so a client sampled rarely still catches up. The caller folds each
``RoundResult.base_update`` into its own copy of the base (server-side evaluation).

``ExactStrategy`` collects the factors; ``FLoRA``, ``SVD`` and ``FedEx`` each say how they combine them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from fedtune.adapters import A_SUFFIX, B_SUFFIX, lora_pairs
from fedtune.strategies import lowrank
from fedtune.strategies.agg_error import ErrorMeter
from fedtune.strategies.averaging import WeightedMean
from fedtune.strategies.base import (
    PhaseResult,
    ReferenceTerms,
    Rng,
    RoundResult,
    StrategyBase,
    client_rank,
    factor_pairs,
    finish,
    lora_scale,
    make_instructions,
    not_applied,
    select_clients,
    valid_replies,
)
from fedtune.strategies.config import StrategyConfig
from fedtune.types import (
    ClientReply,
    Instructions,
    LowRankUpdate,
    State,
    updates_from_plain,
    updates_to_plain,
)


class BaseUpdateLog:
    """Every base update so far and, per client, how many it has been sent (O(all factors ever) memory)."""

    def __init__(self) -> None:
        self.log: list[dict[str, LowRankUpdate]] = []
        self._sent: dict[str, int] = {}

    def pending(self, client_id: str) -> dict[str, LowRankUpdate] | None:
        """The merged updates ``client_id`` has not been sent yet (marks them sent), or None."""
        start = self._sent.get(client_id, 0)
        self._sent[client_id] = len(self.log)
        return lowrank.merge_updates(self.log[start:]) if start < len(self.log) else None

    def held_by(self, client_id: str) -> int:
        """How many updates ``client_id`` has been sent."""
        return self._sent.get(client_id, 0)

    def range(self, client_id: str) -> dict[str, int]:
        """``base_from`` / ``base_to`` of instructions about to be made for ``client_id``: the updates it must
        hold before and after them (a node tells a stale bundle from a fresh one by them)."""
        return {"base_from": self.held_by(client_id), "base_to": len(self.log)}

    def rewind(self, client_id: str, held: int) -> None:
        """``client_id`` holds only the first ``held`` updates (a restarted client process holds none)."""
        self._sent[client_id] = max(0, min(held, len(self.log)))

    def state_dict(self) -> dict[str, Any]:
        return {"log": [updates_to_plain(u) for u in self.log], "sent": dict(self._sent)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.log = [updates_from_plain(u) for u in state["log"]]
        self._sent = {str(c): int(n) for c, n in state["sent"].items()}


class ExactStrategy(StrategyBase):
    """The exact strategies' shared part: sampling with per-client ranks, collecting every valid reply's factors
    (one reply at a time), weighted means of the tensors that are not factors. Subclasses combine the factors
    (``_combine``) and say whether they also average the factors (``mean_factors``) or fold updates into the
    base (a ``base_log``)."""

    mean_factors = False
    """Average A and B too (fedex: the adapter is the mean, only the residual goes into the base)."""

    def configure(self, round: int, client_ids: list[str], global_state: State, rng: Rng, *, phase: str = "train",
                  previous: PhaseResult | None = None) -> dict[str, Instructions]:
        """Sample clients; each gets the global adapter sliced to its rank and its pending base updates, with
        ``extra`` ``base_from`` / ``base_to``: how many base updates it must hold before and after them."""
        chosen = select_clients(client_ids, self.cfg, rng)
        ranks = {c: client_rank(self.cfg, client_ids, c) for c in chosen}
        states = {c: self._client_state(global_state, ranks[c]) for c in chosen}
        log, pending, extras = self.base_log, None, None
        if log is not None:
            extras = {c: log.range(c) for c in chosen}
            pending = {c: log.pending(c) for c in chosen}
        return make_instructions(round, chosen, states, self.cfg, ranks=ranks, base_updates=pending, extras=extras)

    def _slice_scale(self, rank_global: int, rank: int) -> float:
        """Factor applied to both sliced factors of a rank-``rank`` client (1: the rows as they are)."""
        return 1.0

    def _client_state(self, global_state: State, rank: int | None) -> State:
        """The first ``rank`` components of every layer (HetLoRA's slice), scaled by ``_slice_scale``."""
        if rank is None:
            return global_state
        out = dict(global_state)
        for ka, kb in lora_pairs(global_state).values():
            a, b = global_state[ka], global_state[kb]
            c = self._slice_scale(a.shape[0], rank)
            out[ka], out[kb] = a[:rank] * c, b[:, :rank] * c
        return out

    def _combine(self, global_state: State, state: State, ref: ReferenceTerms,
                 meter: ErrorMeter | None) -> RoundResult:
        raise NotImplementedError

    def aggregate(self, round: int, global_state: State, replies: Iterable[ClientReply], *,
                  phase: str = "train") -> RoundResult:
        """Collect the valid replies' factors (one reply at a time), then combine them exactly."""
        failures: dict[str, str] = {}
        ok: list[str] = []
        ref = ReferenceTerms()
        meter = ErrorMeter.for_round(self.cfg, round, global_state)
        fed_meter = meter if self._needs_replies_for_error() else None
        factor_keys = {k for k in global_state if k.endswith((A_SUFFIX, B_SUFFIX))}
        other = [k for k in global_state if k not in factor_keys]
        mean_keys = list(global_state) if self.mean_factors else other
        acc = WeightedMean(global_state, mean_keys)
        for reply in valid_replies(replies, global_state, failures, lowrank_any_rank=self.spec.client_ranks):
            assert reply.state is not None
            if reply.mask is not None and any(k in factor_keys for k in reply.mask):
                failures[reply.client_id] = f"{self.name} aggregates whole factors; masked LoRA factors are not supported"
                continue
            ok.append(reply.client_id)
            ref.add(factor_pairs(reply.state), float(reply.num_examples), self.cfg)
            if fed_meter is not None:
                fed_meter.add(reply.state, float(reply.num_examples))
            if mean_keys:
                acc.add(reply.state, float(reply.num_examples), reply.mask)
        if len(ok) < self.cfg.min_replies:
            return not_applied(global_state, ok, failures, self.cfg)
        state = {**global_state, **(acc.result() if mean_keys else {})}
        result = self._combine(global_state, state, ref, meter)
        if meter is not None:
            result.metrics["agg_error_estimated"] = float(meter.estimated)
        if result.base_update and self.base_log is not None:
            self.base_log.log.append(result.base_update)
        return finish(result, ok, failures)

    def _needs_replies_for_error(self) -> bool:
        """Whether the error needs every reply's factors (svd's exact truncation error comes free)."""
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"base_log": self.base_log.state_dict()} if self.base_log is not None else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.base_log is not None:
            self.base_log.load_state_dict(state["base_log"])


class FLoRA(ExactStrategy):
    """FLoRA stacking: every round's exact average moves into the base; a fresh adapter starts each round."""

    def __init__(self, cfg: StrategyConfig) -> None:
        super().__init__(cfg)
        self.base_log = BaseUpdateLog()

    def _combine(self, global_state: State, state: State, ref: ReferenceTerms,
                 meter: ErrorMeter | None) -> RoundResult:
        """FLoRA: ``base_update = [p_1 s_1 B_1 ... p_K s_K B_K] @ [A_1; ...; A_K]`` exactly; adapter reset.

        The next round starts from B = 0 and the previous global A (a valid fresh LoRA init; clients of
        rank r_k take its first r_k rows). A quantized base keeps the factors as a frozen full-precision
        residual: sum_k r_k (d_out + d_in) floats per layer per round, accumulating over rounds.
        """
        update = {prefix: LowRankUpdate(*lowrank.stack(ref.terms(prefix))) for prefix in ref.layers()}
        for ka, kb in lora_pairs(global_state).values():
            state[ka], state[kb] = global_state[ka], torch.zeros_like(global_state[kb])
        result = RoundResult(state=state, base_update=update, reset_adapter=True)
        if meter is not None:
            result.agg_error_layers = meter.errors({p: [(u.B, u.A)] for p, u in update.items()})
        return result



class SVD(ExactStrategy):
    """The exact average in factored form, truncated to the global rank (optionally with error feedback)."""

    def __init__(self, cfg: StrategyConfig) -> None:
        super().__init__(cfg)
        self.residual: dict[str, lowrank.Pair] = {}  # error feedback, in dW units

    def _slice_scale(self, rank_global: int, rank: int) -> float:
        """So that ``s(rank) B A`` of the slice is exactly the top-``rank`` part of ``s(r) B_g A_g``."""
        return float((lora_scale(self.cfg, rank_global) / lora_scale(self.cfg, rank)) ** 0.5)

    def _needs_replies_for_error(self) -> bool:
        """False for exact svd without error feedback: its singular values give the exact error for free."""
        return self.cfg.error_feedback or self.cfg.svd_method == "randomized"

    def state_dict(self) -> dict[str, Any]:
        return {"residual": {p: {"B": b, "A": a} for p, (b, a) in self.residual.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.residual = {p: (f["B"], f["A"]) for p, f in state["residual"].items()}

    def _combine(self, global_state: State, state: State, ref: ReferenceTerms,
                 meter: ErrorMeter | None) -> RoundResult:
        """Exact average in factored form, truncated to the global rank with its best (Eckart-Young) approximation.

        With ``error_feedback`` the discarded part is kept (factored) and added to the next round's average.
        ``svd_method = "randomized"`` trades exactness of the truncation for speed at large K (see lowrank).
        """
        rank = self.cfg.global_rank
        scale = lora_scale(self.cfg, rank)
        errors: dict[str, float] = {}
        kept: dict[str, list[lowrank.Pair]] = {}  # what the meter compares with the exact average
        residual: dict[str, lowrank.Pair] = {}
        kept_ranks: list[int] = []
        pairs = lora_pairs(global_state)
        for prefix in ref.layers():
            terms = ref.terms(prefix)
            if prefix in self.residual:
                terms = [*terms, self.residual[prefix]]
            if self.cfg.svd_method == "randomized":
                svd = lowrank.randomized_svd(
                    *lowrank.stack(terms), rank, oversample=self.cfg.svd_oversample,
                    power_iters=self.cfg.svd_power_iters,
                )
            else:
                svd = lowrank.truncated_svd(*lowrank.stack(terms), rank, keep_rest=self.cfg.error_feedback)
            if self.cfg.svd_energy > 0:  # rank pruning: the components past the energy rank are zero
                svd = self._energy_cut(svd, terms, rank)
                kept_ranks.append(svd.left.shape[1])
            b, a = lowrank.split_factors(svd, scale, rank)
            ka, kb = pairs[prefix]
            state[ka], state[kb] = a.to(global_state[ka].dtype), b.to(global_state[kb].dtype)
            if svd.rest is not None:
                residual[prefix] = svd.rest
            if meter is not None and (self.cfg.error_feedback or not svd.complete):
                kept[prefix] = [(b * scale, a)]
            elif meter is not None:
                errors[prefix] = svd.truncation_error
        self.residual = residual
        if kept:
            assert meter is not None
            errors.update(meter.errors(kept))
        result = RoundResult(state=state, agg_error_layers=errors)
        if kept_ranks:
            result.metrics["svd_rank_mean"] = sum(kept_ranks) / len(kept_ranks)
        return result

    def _energy_cut(self, svd: lowrank.TruncatedSVD, terms: list[lowrank.Pair], rank: int) -> lowrank.TruncatedSVD:
        """``svd`` cut to the layer's energy rank (``strategy.svd_energy``); with error feedback the remainder
        then holds the cut components too."""
        keep = lowrank.energy_rank(svd.s, self.cfg.svd_energy, rank)
        if keep >= svd.left.shape[1]:
            return svd
        if self.cfg.error_feedback:
            return lowrank.truncated_svd(*lowrank.stack(terms), keep, keep_rest=True)
        return lowrank.truncation(svd, keep)



class FedEx(ExactStrategy):
    """FedEx-LoRA: the adapter is the plain mean, the exact remainder goes into the base weights."""

    mean_factors = True

    def __init__(self, cfg: StrategyConfig) -> None:
        super().__init__(cfg)
        self.base_log = BaseUpdateLog()

    def _combine(self, global_state: State, state: State, ref: ReferenceTerms,
                 meter: ErrorMeter | None) -> RoundResult:
        """FedEx-LoRA: adapter = (B_bar, A_bar); ``base_update = sum_k p_k s B_k A_k - s B_bar A_bar`` (factored)."""
        update: dict[str, LowRankUpdate] = {}
        applied: dict[str, list[lowrank.Pair]] = {}  # adapter + folded residual: what clients end up with
        for prefix, (ka, kb) in lora_pairs(global_state).items():
            b_bar, a_bar = state[kb].float(), state[ka].float()
            s = lora_scale(self.cfg, a_bar.shape[0])
            update[prefix] = LowRankUpdate(*lowrank.stack([*ref.terms(prefix), (-s * b_bar, a_bar)]))
            applied[prefix] = [(s * b_bar, a_bar), (update[prefix].B, update[prefix].A)]
        errors = meter.errors(applied) if meter is not None else {}
        return RoundResult(state=state, base_update=update, agg_error_layers=errors)
