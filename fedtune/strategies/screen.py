"""Server-side bounds on what one reply may contribute: its weight, the size of its update, its values.

One enrolled node must not take over or brick the global model. The round driver passes every phase's replies
through a ``Screen`` before the strategy sees them, whichever dispatcher brought them (the simulator, the gRPC
server), so one policy (``ReplyPolicy``, from the ``federation.*`` keys) holds everywhere:

- weight: ``num_examples`` is only what a node declares. It counts at most ``max_examples`` (a capped
  declaration is recorded), or every reply weighs 1 (``weighting = "equal"``).
- values: every tensor bound for the global state has values within ``max_abs_value``, whatever its dtype
  (``ReplyCheck`` refuses a tensor of another dtype kind than the global one, and NaN or Inf).
- update size: the L2 norm of ``x_k - global`` over those tensors (masked coordinates only; a tensor of another
  rank counts whole) is at most ``max_update_norm``: absolute, or times the round's lower median update norm
  (``norm_bound = "median"``; the screen then holds the round's replies, and needs 3 for a median).

A refused reply becomes a failed reply whose error says why: strategies record it with every other failure.
After aggregation ``result_problem`` says why a round's result must not be applied (values not finite or out of
range); the driver then keeps the previous global model and records the reason.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from fedtune.types import ClientReply, State, failed_reply

MEDIAN_NEEDS = 3
"""Replies a round needs before its median update norm bounds any of them."""


@dataclass(frozen=True)
class ReplyPolicy:
    """The bounds of the module docstring; ``None`` turns a bound off. ``from_config`` reads ``federation.*``."""

    weighting: str = "examples"
    max_examples: int = 1_000_000
    max_update_norm: float | None = 10.0
    norm_bound: str = "median"
    max_abs_value: float | None = 1e4

    @classmethod
    def from_config(cls, fed: Any) -> ReplyPolicy:
        return cls(weighting=fed.weighting, max_examples=fed.max_examples, max_update_norm=fed.max_update_norm,
                   norm_bound=fed.update_norm_bound, max_abs_value=fed.max_abs_value)

    @property
    def holds_round(self) -> bool:
        """The screen needs every reply of a phase before it can admit one (a median bound)."""
        return self.max_update_norm is not None and self.norm_bound == "median"


@dataclass
class Screen:
    """Screens one phase's replies against ``global_state``; ``report`` is what the round's record gets
    (capped weights, the median and the limit of the update norms)."""

    policy: ReplyPolicy
    global_state: State
    report: dict[str, Any] = field(default_factory=dict)

    def __call__(self, replies: Iterable[ClientReply]) -> Iterator[ClientReply]:
        """The replies with refused ones turned into failures and weights bounded, in their order."""
        if not self.policy.holds_round:
            for reply in replies:
                reason, norm = self._check(reply)
                yield self._admit(reply, reason or self._norm_reason(norm, self.policy.max_update_norm, None))
            return
        checked = [(reply, *self._check(reply)) for reply in replies]
        norms = sorted(n for _, reason, n in checked if reason is None and n is not None)
        median = norms[(len(norms) - 1) // 2] if len(norms) >= MEDIAN_NEEDS else None
        limit = None if median is None or self.policy.max_update_norm is None else self.policy.max_update_norm * median
        if median is not None:
            self.report["update_norm_median"], self.report["update_norm_limit"] = median, limit
        for reply, reason, norm in checked:
            yield self._admit(reply, reason or self._norm_reason(norm, limit, median))

    def _admit(self, reply: ClientReply, reason: str | None) -> ClientReply:
        if reason is not None:
            refused = failed_reply(reply.client_id, reply.round, f"refused: {reason}")
            refused.bytes_up, refused.bytes_down = reply.bytes_up, reply.bytes_down
            return refused
        if not reply.ok or reply.num_examples <= 0:
            return reply  # a failure already, or a weight ReplyCheck refuses
        weight = 1 if self.policy.weighting == "equal" else min(reply.num_examples, self.policy.max_examples)
        if reply.num_examples > self.policy.max_examples and self.policy.weighting != "equal":
            self.report.setdefault("weights_capped", {})[reply.client_id] = reply.num_examples
        return reply if weight == reply.num_examples else dataclasses.replace(reply, num_examples=weight)

    def _norm_reason(self, norm: float | None, limit: float | None, median: float | None) -> str | None:
        if norm is None or limit is None or norm <= limit:
            return None
        if median is None:
            return f"update norm {norm:.4g} is above federation.max_update_norm={limit:g}"
        return (f"update norm {norm:.4g} is more than federation.max_update_norm={self.policy.max_update_norm:g} "
                f"times the round's median update norm ({median:.4g})")

    def _check(self, reply: ClientReply) -> tuple[str | None, float | None]:
        """Why the reply's values are out of bounds (or None), and its update norm (None: nothing to measure)."""
        if not reply.ok or reply.state is None:
            return None, None
        names = [k for k in reply.state if k in self.global_state]
        if not names:
            return None, None  # a phase whose answer is the strategy's own data, not adapter tensors
        values = [reply.state[k] for k in names]
        reason = _range_problem(names, values, self.policy.max_abs_value)
        if reason is not None:
            return reason, None
        deltas = []
        mask = reply.mask or {}
        for k, v in zip(names, values, strict=True):
            g = self.global_state[k]
            d = v.float() - g.float() if v.shape == g.shape else v.float()
            m = mask.get(k)
            if m is not None and m.dtype == torch.bool and m.shape == d.shape:
                d = d * m
            deltas.append(d)
        norm = float(torch.stack(torch._foreach_norm(deltas)).double().norm())
        if not math.isfinite(norm):
            return "update norm overflows (values too large)", None
        return None, norm


def _range_problem(names: list[str], values: list[torch.Tensor], bound: float | None) -> str | None:
    """The first tensor whose values are NaN, Inf or beyond ``bound`` in magnitude (any dtype), or None."""
    floats = [(k, v) for k, v in zip(names, values, strict=True) if v.is_floating_point() and v.numel()]
    if floats:
        tops = torch.stack(torch._foreach_norm([v for _, v in floats], ord=float("inf"))).double()
        for (k, _), top in zip(floats, tops.tolist(), strict=True):
            if not math.isfinite(top):
                return f"non-finite values (NaN or Inf) in {k}"
            if bound is not None and top > bound:
                return f"values up to {top:.4g} in {k}, beyond federation.max_abs_value={bound:g}"
    if bound is None:
        return None
    for k, v in zip(names, values, strict=True):
        if v.is_floating_point() or not v.numel() or v.dtype == torch.bool:
            continue
        low, high = int(v.min()), int(v.max())  # python ints: |INT64_MIN| does not overflow
        if max(-low, high) > bound:
            return f"values up to {max(-low, high):.4g} in {k}, beyond federation.max_abs_value={bound:g}"
    return None


def result_problem(state: State, base_update: dict[str, Any] | None, policy: ReplyPolicy) -> str | None:
    """Why an aggregate must not become the global model (non-finite or out-of-range values), or None."""
    names = list(state)
    reason = _range_problem(names, [state[k] for k in names], policy.max_abs_value)
    if reason is None and base_update:
        pairs = [(f"{layer} base update {part}", t) for layer, u in base_update.items()
                 for part, t in (("B", u.B), ("A", u.A))]
        reason = _range_problem([n for n, _ in pairs], [t for _, t in pairs], None)
    return None if reason is None else f"the aggregate has {reason}"
