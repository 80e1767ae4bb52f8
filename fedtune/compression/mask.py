"""A global pruning mask (AutoFLIP-style): explore, fix a mask, then every client trains and sends only its entries.

``MaskStrategy`` wraps an averaging strategy (fedavg, fedprox, ffa, a server optimizer) and adds one phase to
the rounds where the mask is (re)fixed, on the round driver like secure aggregation's phases, so the
simulator and the gRPC server run it with the same code:

    mask_explore (every sampled client: ``mask.explore_steps`` local steps from the global state, replying
    per entry (theta_k - theta_0)^2 or |grad * theta_k|, ``mask.score``) -> the server averages the scores (weighted by examples) and keeps the
    top ``mask.density`` of each tensor (``fix_mask``) -> train (as the wrapped strategy's, each instruction
    carrying the mask)

then ``train`` alone until ``mask.refresh_every`` rounds have passed. With ``mask.score = "global"`` there is no
exploration phase: the round that (re)fixes the mask trains dense, and the mask is the top ``mask.density`` of
each tensor by the squared change of the global adapter over that round; the next rounds use it. The server
needs only the aggregate, so this is the mask secure aggregation takes (``SecAggStrategy`` wraps a
``MaskStrategy``; each client's masked vector holds only the mask's entries, ``sent_reference``). The wire layer (``link.Link``) sends a
client the mask only when it does not hold this version (a bitmap, counted in ``bytes_down``; ``extra
["mask_round"]`` names the version), and reads the reply's values, one per unmasked entry in order
(``gather``), back to full tensors (``scatter``) with the reply's ``mask`` set, so the wrapped strategy's masked
mean takes them: an entry outside the mask keeps its global value. Clients train every entry locally; what
they changed outside the mask is not sent and is dropped with the next global state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from fedtune.strategies.averaging import WeightedMean
from fedtune.strategies.base import PhaseResult, ReplyCheck, Rng, RoundResult, Strategy
from fedtune.types import ClientReply, Instructions, State

EXPLORE = "mask_explore"
"""The exploration phase's name (its client handler: ``fedtune.compression.explore``)."""
SCORE = "mask_score"
"""``Instructions.extra`` key of the exploration phase: the importance score clients reply (``mask.score``)."""
MASK_ROUND = "mask_round"
"""``Instructions.extra`` key: the round whose exploration fixed the mask these instructions use."""


def fix_mask(scores: State, density: float) -> State:
    """Per tensor, True at the ``max(1, round(density * numel))`` highest scores (ties: the lower index)."""
    out: State = {}
    for name, s in scores.items():
        flat = s.reshape(-1).double()
        k = max(1, min(flat.numel(), round(density * flat.numel())))
        # A stable descending sort makes ties deterministic everywhere (topk's order among ties is not).
        keep = torch.argsort(flat, descending=True, stable=True)[:k]
        m = torch.zeros(flat.numel(), dtype=torch.bool)
        m[keep] = True
        out[name] = m.reshape(s.shape)
    return out


def gather(state: State, mask: State) -> State:
    """The entries of each masked tensor at its mask (1-D, in flat order); unmasked tensors as they are."""
    return {k: v[mask[k]] if k in mask else v for k, v in state.items()}


def scatter(sent: State, like: State, mask: State) -> State:
    """``like`` with each masked tensor's mask entries replaced by ``sent``'s values (``gather``'s inverse).

    Raises:
        ValueError: a masked tensor that is not a 1-D vector of exactly the mask's count of values, or a
            tensor of ``like`` that ``sent`` lacks.
    """
    out: State = {}
    for k, ref in like.items():
        if k not in sent:
            raise ValueError(f"tensor {k!r} is missing from the masked update")
        v = sent[k]
        if k not in mask:
            out[k] = v
            continue
        m = mask[k]
        want = int(m.sum())
        if m.shape != ref.shape:
            raise ValueError(f"mask of {k!r} has shape {tuple(m.shape)}, the tensor {tuple(ref.shape)}")
        if v.ndim != 1 or v.numel() != want:
            raise ValueError(f"tensor {k!r}: {v.numel()} values of shape {tuple(v.shape)} sent, the mask has {want}")
        full = ref.clone()
        full[m] = v.to(ref.dtype)
        out[k] = full
    unexpected = sorted(set(sent) - set(like))
    if unexpected:
        raise ValueError(f"unexpected tensor(s) in the masked update: {', '.join(unexpected[:3])}")
    return out


def mask_problem(mask: State | None, state: State) -> str | None:
    """Why ``mask`` cannot be a mask of ``state`` (not bool, another shape, an unknown tensor), or None."""
    for k, m in (mask or {}).items():
        if k not in state:
            return f"mask for tensor {k!r}, which was not sent"
        if m.dtype != torch.bool or tuple(m.shape) != tuple(state[k].shape):
            return f"mask of {k!r}: must be bool of shape {tuple(state[k].shape)}, got {m.dtype} {tuple(m.shape)}"
    return None


class MaskStrategy:
    """``inner`` (an averaging strategy) with a global pruning mask; see the module docstring."""

    def __init__(self, inner: Strategy, mask: Any) -> None:
        if inner.needs_all_replies or list(inner.phases(1)) != ["train"]:
            raise ValueError(f"mask.density needs a one-phase averaging strategy; {inner.name!r} is not")
        self.inner, self.density = inner, float(mask.density)
        self.explore_steps, self.refresh_every = int(mask.explore_steps), int(mask.refresh_every)
        self.score = str(mask.score)
        self.name, self.cfg, self.spec = inner.name, inner.cfg, inner.spec
        self.needs_all_replies, self.base_log = False, inner.base_log
        self.mask: State | None = None
        self.mask_round = 0
        self._sampled: dict[str, Instructions] = {}
        self._fixing = 0
        """With ``mask.score = "global"``: the round whose dense result fixes the next mask (0: none)."""

    @property
    def linear(self) -> bool:
        return self.inner.linear

    def _explores(self, round: int) -> bool:
        return self.mask is None or (self.refresh_every > 0 and round - self.mask_round >= self.refresh_every)

    def phases(self, round: int) -> Sequence[str]:
        return (EXPLORE, "train") if self._explores(round) and self.score != "global" else ("train",)

    def sent_keys(self, global_state: State) -> list[str]:
        return self.inner.sent_keys(global_state)

    def stop_before(self, round: int) -> str | None:
        stop = getattr(self.inner, "stop_before", None)
        return stop(round) if callable(stop) else None

    def configure(self, round: int, client_ids: list[str], global_state: State, rng: Rng, *, phase: str = "train",
                  previous: PhaseResult | None = None) -> dict[str, Instructions]:
        if phase == EXPLORE:
            self._sampled = self.inner.configure(round, client_ids, global_state, rng, phase="train")
            return {c: dataclasses.replace(ins, phase=EXPLORE, train={**ins.train, "max_steps": self.explore_steps},
                                           extra={**ins.extra, SCORE: self.score})
                    for c, ins in self._sampled.items()}
        sampled = self._sampled or self.inner.configure(round, client_ids, global_state, rng, phase="train")
        self._sampled = {}
        if self.score == "global" and self._explores(round):  # dense: this round's result fixes the mask
            self._fixing = round
            return sampled
        if self.mask is None:  # no explorer answered: this round trains dense
            return sampled
        return {c: dataclasses.replace(ins, mask={k: self.mask[k] for k in ins.state if k in self.mask},
                                       extra={**ins.extra, MASK_ROUND: self.mask_round})
                for c, ins in sampled.items()}

    def aggregate(self, round: int, global_state: State, replies: Iterable[ClientReply], *,
                  phase: str = "train") -> RoundResult | PhaseResult:
        if phase == EXPLORE:
            return self._explored(round, global_state, replies)
        result = self.inner.aggregate(round, global_state, replies, phase=phase)
        if isinstance(result, RoundResult) and self._fixing == round:
            self._fixing = 0
            if result.applied:
                keys = [k for k in self.sent_keys(global_state) if k in result.state]
                moved = {k: (result.state[k].double() - global_state[k].double()).square() for k in keys}
                self.mask, self.mask_round = fix_mask(moved, self.density), round
        if isinstance(result, RoundResult) and self.mask is not None:
            kept = sum(int(m.sum()) for m in self.mask.values())
            result.metrics["mask_density"] = kept / max(1, sum(m.numel() for m in self.mask.values()))
            result.metrics["mask_round"] = float(self.mask_round)
        return result

    def _explored(self, round: int, global_state: State, replies: Iterable[ClientReply]) -> PhaseResult:
        """Average the explorers' scores and fix the mask (kept as it was when nobody answered)."""
        keys = self.sent_keys(global_state)
        check = ReplyCheck(global_state, keys=keys)
        acc = WeightedMean(global_state, keys)
        failures: dict[str, str] = {}
        ok: list[str] = []
        for reply in replies:
            why = check(reply)
            if why is None and reply.state is not None and any(bool((reply.state[k] < 0).any()) for k in keys):
                why = "importance scores must be >= 0"
            if why is not None:
                failures[reply.client_id] = f"{EXPLORE}: {why}"
                continue
            assert reply.state is not None
            acc.add({k: reply.state[k] for k in keys}, float(reply.num_examples))
            ok.append(reply.client_id)
        if ok:
            self.mask, self.mask_round = fix_mask(acc.result(), self.density), round
        return PhaseResult(EXPLORE, ok, failures)

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(), "mask": dict(self.mask or {}), "mask_round": self.mask_round}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.inner.load_state_dict(state["inner"])
        self.mask = {str(k): v.bool() for k, v in state["mask"].items()} or None
        self.mask_round = int(state["mask_round"])


def with_mask(strategy: Strategy, cfg: Any) -> Strategy:
    """``strategy`` inside a ``MaskStrategy`` when ``cfg.mask.density`` < 1, else itself."""
    return MaskStrategy(strategy, cfg.mask) if cfg.mask.density < 1 else strategy


# -- the client's side -------------------------------------------------------------------------------------
HELD_MASK = "mask"
"""The client's state key of the mask it holds: ``{"round": tensor, "mask": {...}}``."""


def take_mask(state: dict[str, Any], ins: Instructions) -> Instructions | str:
    """``ins`` with the mask it uses (sent now and kept in ``state``, or the one held), or why there is none.

    A new mask restarts the compress transform's error-feedback residual: its entries were those of the old
    mask's positions.
    """
    rnd = ins.extra.get(MASK_ROUND)
    if rnd is None:
        if state.pop(HELD_MASK, None) is not None:  # a dense round (a refresh of mask.score=global)
            state.get("pipeline", {}).pop("compress", None)  # the residual held the old mask's entries
        return ins
    if ins.mask:
        problem = mask_problem(ins.mask, ins.state)
        if problem is not None:
            return f"mask: {problem}"
        held = state.get(HELD_MASK)
        if held is None or int(held["round"]) != int(rnd):
            state.get("pipeline", {}).pop("compress", None)
        state[HELD_MASK] = {"round": torch.tensor(int(rnd)), "mask": ins.mask}
        return ins
    held = state.get(HELD_MASK)
    if held is None or int(held["round"]) != int(rnd):
        have = "none" if held is None else f"round {int(held['round'])}'s"
        return f"mask: the server trains with the mask of round {int(rnd)}, this client holds {have}"
    problem = mask_problem(held["mask"], ins.state)
    return f"mask: {problem}" if problem is not None else dataclasses.replace(ins, mask=held["mask"])


def mask_of(state: dict[str, Any], ins: Instructions) -> State | None:
    """The mask ``ins`` trains with: the one it carries, else the one this client holds of its version (None:
    neither)."""
    if ins.mask:
        return ins.mask
    held = state.get(HELD_MASK)
    rnd = ins.extra.get(MASK_ROUND)
    return held["mask"] if held is not None and rnd is not None and int(held["round"]) == int(rnd) else None


def sent_reference(state: dict[str, Any], ins: Instructions) -> State:
    """The global values a client's update to ``ins`` is a delta from, as it sends them: under a mask (the one
    ``take_mask`` left in the client's ``state``) only its entries (``gather``), else ``ins.state``.

    Raises:
        ValueError: the instructions use a mask version this client does not hold.
    """
    rnd = ins.extra.get(MASK_ROUND)
    if rnd is None:
        return ins.state
    held = state.get(HELD_MASK)
    if held is None or int(held["round"]) != int(rnd):
        raise ValueError(f"mask: the server uses the mask of round {int(rnd)}, this client holds another")
    return gather(ins.state, held["mask"])


def masked_reply(reply: ClientReply, ins: Instructions) -> tuple[ClientReply, Instructions]:
    """The reply holding only the entries of ``ins.mask`` (and the instructions it is now relative to)."""
    if not ins.mask or MASK_ROUND not in ins.extra or reply.state is None:
        return reply, ins
    return (dataclasses.replace(reply, state=gather(reply.state, ins.mask)),
            dataclasses.replace(ins, state=gather(ins.state, ins.mask)))
