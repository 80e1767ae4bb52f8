"""Exact LoRA aggregation: flora (stacking), svd (exact average, best rank-r), fedex (average + residual).

Each keeps every client's factors of the round (they are the exact average in factored form), so memory is
O(sum_k r_k (d_out + d_in)) per layer. Replies are still consumed one at a time. Tensors that are not LoRA
factors (biases, ``modules_to_save``) are weighted means.

``base_update`` (flora, fedex) is the part of the average that moves into the frozen base weights. The
strategy keeps a log of them and hands every client, in ``Instructions.base_update``, all updates it has not
received yet (merged per layer), so a client sampled rarely still catches up. The caller folds each
``RoundResult.base_update`` into its own copy of the base (server-side evaluation).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from fedtune.adapters import A_SUFFIX, B_SUFFIX, lora_pairs
from fedtune.strategies import lowrank
from fedtune.strategies.agg_error import ErrorMeter
from fedtune.strategies.averaging import WeightedMean
from fedtune.strategies.base import (
    ReferenceTerms,
    Rng,
    RoundResult,
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
from fedtune.types import ClientReply, Instructions, LowRankUpdate, State


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

    def rewind(self, client_id: str, held: int) -> None:
        """``client_id`` holds only the first ``held`` updates (a restarted client process holds none)."""
        self._sent[client_id] = max(0, min(held, len(self.log)))


class ExactStrategy:
    """``flora``, ``svd`` or ``fedex``; see the module docstring and each ``_aggregate_*`` method.

    Raises:
        ValueError: unknown ``name``, or ``fedex`` with ``cfg.quantized_base`` (a quantized base cannot
            absorb the residual; use flora or svd).
    """

    def __init__(self, name: str, cfg: StrategyConfig) -> None:
        if name not in ("flora", "svd", "fedex"):
            raise ValueError(f"ExactStrategy does not implement {name!r}")
        if name == "fedex" and cfg.quantized_base:
            raise ValueError(
                "fedex folds a residual into the base weights, which a quantized base cannot hold: "
                "set strategy.quantized_base = false with a non-quantized base, or use strategy.name = 'flora' or 'svd'"
            )
        self.name = name
        self.cfg = cfg
        self.needs_all_replies = False
        self.base_log = BaseUpdateLog()
        self.residual: dict[str, lowrank.Pair] = {}  # svd error feedback, in dW units

    def configure(self, round: int, client_ids: list[str], global_state: State, rng: Rng) -> dict[str, Instructions]:
        """Sample clients; each gets the global adapter sliced to its rank and its pending base updates."""
        chosen = select_clients(client_ids, self.cfg, rng)
        ranks = {c: client_rank(self.cfg, client_ids, c) for c in chosen}
        states = {c: self._client_state(global_state, ranks[c]) for c in chosen}
        pending = {c: self.base_log.pending(c) for c in chosen} if self.name != "svd" else None
        return make_instructions(round, chosen, states, self.cfg, ranks=ranks, base_updates=pending)

    def _client_state(self, global_state: State, rank: int | None) -> State:
        """The first ``rank`` components of every layer (HetLoRA's slice).

        ``svd`` rescales them so that ``s(rank) B A`` is exactly the top-``rank`` part of ``s(r) B_g A_g``;
        ``flora`` hands out a fresh adapter (B = 0) whose A rows are used as they are.
        """
        if rank is None:
            return global_state
        out = dict(global_state)
        for ka, kb in lora_pairs(global_state).values():
            a, b = global_state[ka], global_state[kb]
            c = 1.0
            if self.name == "svd":
                c = (lora_scale(self.cfg, a.shape[0]) / lora_scale(self.cfg, rank)) ** 0.5
            out[ka], out[kb] = a[:rank] * c, b[:, :rank] * c
        return out

    def aggregate(self, round: int, global_state: State, replies: Iterable[ClientReply]) -> RoundResult:
        """Collect the valid replies' factors (one reply at a time), then combine them exactly."""
        failures: dict[str, str] = {}
        ok: list[str] = []
        ref = ReferenceTerms()
        meter = ErrorMeter.for_round(self.cfg, round, global_state)
        fed_meter = meter if self._needs_replies_for_error() else None
        factor_keys = {k for k in global_state if k.endswith((A_SUFFIX, B_SUFFIX))}
        other = [k for k in global_state if k not in factor_keys]
        mean_keys = list(global_state) if self.name == "fedex" else other
        acc = WeightedMean(global_state, mean_keys)
        for reply in valid_replies(replies, global_state, failures, lowrank_any_rank=self.name != "fedex"):
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
        combine = {"flora": self._flora, "svd": self._svd, "fedex": self._fedex}[self.name]
        result = combine(global_state, state, ref, meter)
        if meter is not None:
            result.metrics["agg_error_estimated"] = float(meter.estimated)
        if result.base_update:
            self.base_log.log.append(result.base_update)
        return finish(result, ok, failures)

    def _needs_replies_for_error(self) -> bool:
        """False for exact svd without error feedback: its singular values give the exact error for free."""
        return self.name != "svd" or self.cfg.error_feedback or self.cfg.svd_method == "randomized"

    def _flora(self, global_state: State, state: State, ref: ReferenceTerms, meter: ErrorMeter | None) -> RoundResult:
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

    def _svd(self, global_state: State, state: State, ref: ReferenceTerms, meter: ErrorMeter | None) -> RoundResult:
        """Exact average in factored form, truncated to the global rank with its best (Eckart-Young) approximation.

        With ``error_feedback`` the discarded part is kept (factored) and added to the next round's average.
        ``svd_method = "randomized"`` trades exactness of the truncation for speed at large K (see lowrank).
        """
        rank = self.cfg.global_rank
        scale = lora_scale(self.cfg, rank)
        errors: dict[str, float] = {}
        kept: dict[str, list[lowrank.Pair]] = {}  # what the meter compares with the exact average
        residual: dict[str, lowrank.Pair] = {}
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
        return RoundResult(state=state, agg_error_layers=errors)

    def _fedex(self, global_state: State, state: State, ref: ReferenceTerms, meter: ErrorMeter | None) -> RoundResult:
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
