"""What every strategy shares: the ``Strategy`` protocol, ``RoundResult``, client sampling, reply checks.

A strategy is used unchanged by the simulator, the gRPC server and any other dispatcher, through the round
driver (``fedtune.rounds``)::

    previous = None
    for phase in strategy.phases(rnd):                                   # ["train"] for most
        instructions = strategy.configure(rnd, client_ids, global_state, rng, phase=phase, previous=previous)
        outcome = strategy.aggregate(rnd, global_state, replies, phase=phase)   # replies: any iterable
        if isinstance(outcome, RoundResult):                              # the round's last phase (or a
            break                                                         # round given up early)
        previous = outcome                                                # a PhaseResult: who answered
    if outcome.applied:
        global_state = outcome.state
        # outcome.base_update: fold B @ A into the frozen base weights (or keep as a frozen residual);
        # it is also sent to every client next round through Instructions.base_update.

Failed and invalid replies are data: they land in ``RoundResult.failures`` with their reason.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np
import torch

from fedtune.adapters import A_SUFFIX, B_SUFFIX
from fedtune.strategies.config import StrategyConfig
from fedtune.strategies.specs import StrategySpec, spec_of
from fedtune.types import ClientReply, Instructions, LowRankUpdate, State

Rng = random.Random | np.random.Generator


@dataclass
class RoundResult:
    """The outcome of one aggregation.

    ``state`` is the new global trainable adapter state (the old one when ``applied`` is False).
    ``base_update`` maps LoRA layer prefixes (as ``adapters.lora_pairs`` groups them) to factored updates of the frozen base
    weight, LoRA scale folded in, in nn.Linear orientation (see ``lowrank.dense_delta``).
    ``reset_adapter`` says the adapter was folded into ``base_update`` and ``state`` is a fresh adapter
    (B = 0): clients drop their local adapter and optimizer moments and start from ``state``.

    How a caller applies a result: if not ``applied``, keep everything. Otherwise add every
    ``lowrank.dense_delta(base_update[prefix], fan_in_fan_out)`` to the base weight of module ``prefix``
    (non-quantized), or keep the factors as a frozen full-precision residual beside a quantized weight, then
    load ``state`` into the adapter. Clients receive pending base updates through ``Instructions.base_update``.
    """

    state: State
    base_update: dict[str, LowRankUpdate] | None = None
    reset_adapter: bool = False
    applied: bool = True
    metrics: dict[str, float] = field(default_factory=dict)
    agg_error_layers: dict[str, float] = field(default_factory=dict)
    clients_ok: list[str] = field(default_factory=list)
    clients_failed: list[str] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)


@dataclass
class PhaseResult:
    """The outcome of a phase that is not the round's last: who answered, and what the next phase builds on.

    ``data`` is the strategy's own (plain values): for example the public keys that a secure-aggregation
    strategy's clients advertised, which its next phase relays. The driver hands the latest ``PhaseResult``
    back to ``configure`` of the next phase and records ``failures`` in the round's record.
    """

    phase: str
    clients_ok: list[str] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)


class Strategy(Protocol):
    """Chooses clients and combines their replies; the only thing the round driver knows about aggregation.

    What the loops need is declared, never inferred from the name: ``spec`` (the registry's declarations:
    linear, frozen tensors in the global state, ...), ``needs_all_replies``, ``base_log`` and ``phases``.
    ``state_dict`` holds everything that must survive a restart, as plain tensors, numbers, strings, lists and
    dicts (checkpoints load it with ``torch.load(..., weights_only=True)``).
    """

    name: str
    cfg: StrategyConfig
    spec: StrategySpec
    needs_all_replies: bool
    """True when ``aggregate`` must hold every reply of a phase at once (median, trimmed mean, Krum); the
    driver then hands the replies over in the order of the instructions, whatever order they arrived in."""
    base_log: Any
    """A ``BaseUpdateLog`` when the strategy folds updates into the base weights (flora, fedex), else None."""

    @property
    def linear(self) -> bool:
        """The aggregate is a weighted sum of the replies: secure aggregation can compute it."""
        ...

    def phases(self, round: int) -> Sequence[str]:
        """The exchanges of ``round``, in order; the last one's ``aggregate`` returns the ``RoundResult``."""
        ...

    def sent_keys(self, global_state: State) -> list[str]:
        """The tensors of the global state that clients are sent and send back (ffa: only B)."""
        ...

    def configure(
        self, round: int, client_ids: list[str], global_state: State, rng: Rng, *, phase: str = "train",
        previous: PhaseResult | None = None,
    ) -> dict[str, Instructions]:
        """Per-client instructions of ``phase``; ``previous`` is the round's preceding phase's result."""
        ...

    def aggregate(
        self, round: int, global_state: State, replies: Iterable[ClientReply], *, phase: str = "train",
    ) -> RoundResult | PhaseResult:
        """Take in one phase's replies (an iterable consumed once, in arrival order unless
        ``needs_all_replies``): a ``PhaseResult`` for a phase that is not the last, else the ``RoundResult``
        (a round given up early, with too few replies, may return it from any phase)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """What carries over to the next round, as plain data."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` returned (from a checkpoint)."""
        ...


class StrategyBase:
    """Defaults for one-phase, stateless strategies; a strategy class overrides what it needs.

    ``options`` are the registry's ``StrategySpec.options`` for this name (none here).
    """

    needs_all_replies = False
    base_log: Any = None
    default_phases: ClassVar[tuple[str, ...]] = ("train",)

    def __init__(self, cfg: StrategyConfig) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.spec = spec_of(cfg.name)

    @property
    def linear(self) -> bool:
        return self.spec.linear and self.cfg.robust == "none"

    def phases(self, round: int) -> Sequence[str]:
        return self.default_phases

    def sent_keys(self, global_state: State) -> list[str]:
        return list(global_state)

    def stop_before(self, round: int) -> str | None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            raise ValueError(f"strategy {self.name!r} keeps no state, the checkpoint holds {sorted(state)}")


def lora_scale(cfg: StrategyConfig, rank: int) -> float:
    """Scale of a rank-``rank`` adapter: alpha/rank, or alpha/sqrt(rank) with rsLoRA.

    Every adapter uses its own rank (PEFT's rule, HetLoRA's convention): a client of rank r_k contributes
    ``alpha/r_k * B_k @ A_k`` and a global adapter of rank r is applied with ``alpha/r``.
    """
    return cfg.lora_alpha / (math.sqrt(rank) if cfg.use_rslora else rank)


def select_clients(client_ids: list[str], cfg: StrategyConfig, rng: Rng) -> list[str]:
    """Sample this round's clients without replacement (``clients_per_round`` or ``fraction``), in input order."""
    n = len(client_ids)
    k = cfg.clients_per_round or max(1, math.ceil(cfg.fraction * n))
    k = min(k, n)
    if k == n:
        return list(client_ids)
    if isinstance(rng, np.random.Generator):
        picked = set(rng.choice(n, size=k, replace=False).tolist())
    else:
        picked = set(rng.sample(range(n), k))
    return [c for i, c in enumerate(client_ids) if i in picked]


def client_rank(cfg: StrategyConfig, client_ids: list[str], client_id: str) -> int | None:
    """Rank assigned to ``client_id`` by ``client_ranks`` (by its position among all clients), or None."""
    if not cfg.client_ranks:
        return None
    return int(cfg.client_ranks[client_ids.index(client_id) % len(cfg.client_ranks)])


def check_reply(reply: ClientReply, global_state: State, *, lowrank_any_rank: bool = False,
                keys: Iterable[str] | None = None) -> str | None:
    """Why ``reply`` cannot be aggregated against ``global_state``, or None if it can.

    Checks names (every key of ``keys``, default all of ``global_state``, present; nothing unknown), shapes
    (exact, or with ``lowrank_any_rank`` any rank r_k with A (r_k x d_in) and B (d_out x r_k)), dtype kinds
    (floating-point where the global tensor is), finiteness,
    masks (bool, same shape) and a positive ``num_examples``. Checking many replies against one global state,
    ``ReplyCheck`` does the per-round work once.
    """
    return ReplyCheck(global_state, lowrank_any_rank=lowrank_any_rank, keys=keys)(reply)


class ReplyCheck:
    """``check_reply`` against one global state, with what every reply is compared to computed once.

    A reply whose names and shapes equal the expected ones, in the same order (what every client of a round
    sends), has its layout checked by two list comparisons (~50 us for 420 tensors) before the one fused
    finiteness test; any other reply takes the general path, which finds and names what differs.
    """

    def __init__(self, global_state: State, *, lowrank_any_rank: bool = False,
                 keys: Iterable[str] | None = None) -> None:
        self.global_state = global_state
        self.lowrank_any_rank = lowrank_any_rank
        self.required = list(global_state) if keys is None else list(keys)
        self._shapes = [global_state[k].shape for k in self.required]

    def __call__(self, reply: ClientReply) -> str | None:
        if not reply.ok or reply.state is None:
            return reply.error or "no state"
        if reply.num_examples <= 0:
            return f"num_examples={reply.num_examples} must be > 0"
        state = reply.state
        values = list(state.values())
        same_layout = list(state) == self.required and [v.shape for v in values] == self._shapes
        reason = None if same_layout else self._names_and_shapes(state)
        if reason is None:
            reason = self._dtype_kinds(state)
        if reason is None:
            reason = _non_finite(state, values)
        if reason is None and reply.mask is not None:
            reason = _mask_problem(reply.mask, state)
        return reason

    def _dtype_kinds(self, state: State) -> str | None:
        """A tensor that is not floating-point where the global one is (or the reverse): integer values would
        skip the finiteness check and be added as numbers of any size."""
        for k, v in state.items():
            g = self.global_state.get(k)
            if g is not None and v.is_floating_point() != g.is_floating_point():
                return f"{k}: dtype {str(v.dtype).removeprefix('torch.')}, expected " + (
                    "a floating-point tensor" if g.is_floating_point() else str(g.dtype).removeprefix("torch."))
        return None

    def _names_and_shapes(self, state: State) -> str | None:
        """The first problem with the names or shapes of ``state``, or None."""
        global_state = self.global_state
        missing = [k for k in self.required if k not in state]
        if missing:
            return f"missing {len(missing)} tensor(s): {', '.join(missing[:3])}"
        unexpected = [k for k in state if k not in global_state]
        if unexpected:
            return f"unexpected {len(unexpected)} tensor(s): {', '.join(unexpected[:3])}"
        for k, v in state.items():
            g = global_state[k]
            if tuple(v.shape) == tuple(g.shape):
                continue
            if self.lowrank_any_rank and _other_rank_ok(k, v, g, state):
                continue
            return f"{k}: shape {tuple(v.shape)}, expected {tuple(g.shape)}"
        return None


def _non_finite(state: State, values: list[torch.Tensor]) -> str | None:
    """Name the tensors holding NaN or Inf, or None when every floating-point tensor is finite."""
    tensors = [v for v in values if v.is_floating_point()]
    if not tensors:
        return None
    # An L2 norm is NaN or Inf when any element is (or when |x| > ~1e19 overflows, garbage anyway). One
    # fused call over every tensor is ~10x cheaper on CPU than isfinite().all() or an inf-norm per tensor;
    # the offending tensors are looked for only once that check has failed.
    norms = torch.stack(torch._foreach_norm(tensors))
    if bool(torch.isfinite(norms).all()):
        return None
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    return f"non-finite values (NaN or Inf) in {', '.join(bad[:3]) or 'norms (values overflow float32)'}"


def _mask_problem(mask: State, state: State) -> str | None:
    """What is wrong with ``mask`` (unknown name, not bool, not the tensor's shape), or None."""
    for k, m in mask.items():
        if k not in state:
            return f"mask for unknown tensor {k}"
        if m.dtype != torch.bool or tuple(m.shape) != tuple(state[k].shape):
            return f"mask {k}: must be bool of shape {tuple(state[k].shape)}"
    return None


def _other_rank_ok(key: str, v: torch.Tensor, g: torch.Tensor, state: State) -> bool:
    """A factor of another rank r_k: A (r_k x d_in) with B (d_out x r_k), d_in and d_out as in the global."""
    if v.ndim != 2 or g.ndim != 2:
        return False
    if key.endswith(A_SUFFIX):
        b = state.get(key[: -len(A_SUFFIX)] + B_SUFFIX)
        return v.shape[1] == g.shape[1] and b is not None and b.ndim == 2 and b.shape[1] == v.shape[0]
    if key.endswith(B_SUFFIX):
        a = state.get(key[: -len(B_SUFFIX)] + A_SUFFIX)
        return v.shape[0] == g.shape[0] and a is not None and a.ndim == 2 and a.shape[0] == v.shape[1]
    return False


def valid_replies(
    replies: Iterable[ClientReply], global_state: State, failures: dict[str, str], *,
    lowrank_any_rank: bool = False, keys: Iterable[str] | None = None,
) -> Iterator[ClientReply]:
    """Yield the replies that pass ``check_reply``, one at a time; record the others in ``failures``."""
    check = ReplyCheck(global_state, lowrank_any_rank=lowrank_any_rank, keys=keys)
    for reply in replies:
        reason = check(reply)
        if reason is None:
            yield reply
        else:
            failures[reply.client_id] = reason


def not_applied(global_state: State, ok: list[str], failures: dict[str, str], cfg: StrategyConfig) -> RoundResult:
    """The result of a round with fewer than ``min_replies`` valid replies: the global state is kept."""
    return RoundResult(
        state=global_state,
        applied=False,
        metrics={"clients_ok": float(len(ok)), "clients_failed": float(len(failures)),
                 "min_replies": float(cfg.min_replies)},
        clients_ok=ok,
        clients_failed=list(failures),
        failures=dict(failures),
    )


def finish(result: RoundResult, ok: list[str], failures: dict[str, str]) -> RoundResult:
    """Fill the bookkeeping fields shared by every strategy (clients, failures, mean error)."""
    result.clients_ok = ok
    result.clients_failed = list(failures)
    result.failures = dict(failures)
    result.metrics["clients_ok"] = float(len(ok))
    result.metrics["clients_failed"] = float(len(failures))
    if result.agg_error_layers:
        result.metrics["agg_error"] = float(np.mean(list(result.agg_error_layers.values())))
    return result


class ReferenceTerms:
    """The exact weighted average ``sum_k p_k s_k B_k A_k`` of each layer, kept as factored terms.

    What the exact strategies (flora, svd, fedex) combine. It holds a reference to every client's factors (no
    copies): O(K adapters) of memory. ``agg_error`` does not need it: ``agg_error.ErrorMeter`` streams.
    """

    def __init__(self) -> None:
        self._terms: dict[str, list[tuple[float, torch.Tensor, torch.Tensor]]] = {}
        self.total = 0.0

    def add(self, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], weight: float, cfg: StrategyConfig) -> None:
        """Record one client's ``(B_k, A_k)`` per layer with weight ``n_k`` and its own scale ``s(r_k)``."""
        for prefix, (b, a) in pairs.items():
            self._terms.setdefault(prefix, []).append((weight * lora_scale(cfg, a.shape[0]), b, a))
        self.total += weight

    def layers(self) -> list[str]:
        return list(self._terms)

    def terms(self, prefix: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``[(p_k s_k B_k, A_k)]`` of one layer, weights normalised."""
        return [(b.float() * (c / self.total), a.float()) for c, b, a in self._terms[prefix]]


def factor_pairs(state: State, fallback: State | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{prefix: (B, A)}`` of ``state``; an A missing from it (ffa sends only B) is read from ``fallback``."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, b in state.items():
        if not key.endswith(B_SUFFIX):
            continue
        prefix = key[: -len(B_SUFFIX)]
        a = state.get(prefix + A_SUFFIX)
        if a is None and fallback is not None:
            a = fallback.get(prefix + A_SUFFIX)
        if a is not None:
            out[prefix] = (b, a)
    return out


def make_instructions(
    round: int,
    chosen: list[str],
    client_state: dict[str, State],
    cfg: StrategyConfig,
    *,
    train: Mapping[str, object] | None = None,
    ranks: dict[str, int | None] | None = None,
    base_updates: dict[str, dict[str, LowRankUpdate] | None] | None = None,
    extras: dict[str, dict[str, object]] | None = None,
) -> dict[str, Instructions]:
    """``Instructions`` for each chosen client from per-client state, rank, pending base updates and extras."""
    return {
        c: Instructions(
            round=round,
            client_id=c,
            state=client_state[c],
            train=dict(train or {}),
            rank=(ranks or {}).get(c),
            base_update=(base_updates or {}).get(c),
            extra=dict((extras or {}).get(c, {})),
        )
        for c in chosen
    }
