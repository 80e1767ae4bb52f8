"""Rank pruning: LoRA layers sent at the rank their energy needs, on the uplink or the downlink.

- client side, the ``rank_prune`` transform of the update pipeline: per layer, the SVD of the client's own
  ``s(r) B @ A`` (the factored QR + core SVD of ``lowrank.truncated_svd``, the svd strategy's), keeping the
  fewest components that hold ``compress.energy`` of its squared singular values (``lowrank.energy_rank``),
  re-split as factors of that rank r' with the scale ``s(r')`` folded in, so that ``s(r') B' A'`` is the
  best rank-r' approximation of ``s(r) B A``. A strategy that takes factors of any rank (svd, flora) aggregates
  them as it aggregates heterogeneous client ranks; the smaller tensors are what the wire counts.
- server side (``strategy.svd_energy``): the svd strategy zeroes each layer's components past its energy
  rank; ``trim`` drops those zero components from what is sent and ``pad`` restores the client's shapes.

Instructions whose factors may come back (or arrive) at another rank carry ``extra[MAX_RANK]``: the rank of the
client's adapter, which bounds what the server accepts and what the client pads to.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import torch

from fedtune.adapters import A_SUFFIX, B_SUFFIX, lora_pairs
from fedtune.strategies import lowrank
from fedtune.strategies.base import lora_scale
from fedtune.strategies.config import StrategyConfig
from fedtune.types import ClientReply, Instructions, State

MAX_RANK = "max_rank"
"""``Instructions.extra`` key: LoRA factors of this exchange may have any rank from 1 to this one."""


def prune_pair(b: torch.Tensor, a: torch.Tensor, energy: float, scale: Callable[[int], float], *,
               min_rank: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B', A')`` of the energy rank r' with ``s(r') B' A'`` the best rank-r' approximation of ``s(r) B A``
    (``scale``: the LoRA scale s of a rank, ``strategies.base.lora_scale``).

    Raises:
        ValueError: factors that do not chain.
    """
    r = a.shape[0]
    svd = lowrank.truncated_svd(b.double() * scale(r), a.double(), r)
    keep = lowrank.energy_rank(svd.s, energy, r, min_rank)
    nb, na = lowrank.split_factors(lowrank.truncation(svd, keep), scale(keep), keep)
    return nb.to(b.dtype), na.to(a.dtype)


class RankPruneTransform:
    """The ``rank_prune`` pipeline transform: each LoRA layer of the reply at its energy rank (no state)."""

    def __init__(self, cfg: Any) -> None:
        self.energy, self.min_rank = cfg.compress.energy, cfg.compress.min_rank
        scales = StrategyConfig(lora_alpha=cfg.adapter.alpha, use_rslora=cfg.adapter.method == "rslora")
        self.scale = functools.partial(lora_scale, scales)

    def apply(self, reply: ClientReply, ins: Instructions, state: State) -> tuple[ClientReply, State]:
        if reply.state is None:
            return reply, state
        out = dict(reply.state)
        for ka, kb in lora_pairs(reply.state).values():
            out[kb], out[ka] = prune_pair(reply.state[kb], reply.state[ka], self.energy, self.scale,
                                          min_rank=self.min_rank)
        return dataclasses.replace(reply, state=out), state


def used_rank(b: torch.Tensor, a: torch.Tensor) -> int:
    """1 + the last component (column of B, row of A) that is not zero in both factors; at least 1."""
    live = (a != 0).any(dim=1) | (b != 0).any(dim=0)
    idx = torch.nonzero(live, as_tuple=True)[0]
    return int(idx[-1]) + 1 if idx.numel() else 1


def trim(state: State) -> State:
    """``state`` with each LoRA layer cut to ``used_rank`` (trailing all-zero components are not sent)."""
    out = dict(state)
    for ka, kb in lora_pairs(state).values():
        k = used_rank(state[kb], state[ka])
        out[ka], out[kb] = state[ka][:k], state[kb][:, :k]
    return out


def pad(state: State, rank: int) -> State:
    """``state`` with every LoRA factor of a rank below ``rank`` zero-padded to it (what ``trim`` cut).

    Raises:
        ValueError: a factor of a rank above ``rank``.
    """
    out = dict(state)
    for key, t in state.items():
        if not key.endswith((A_SUFFIX, B_SUFFIX)) or t.ndim != 2:
            continue
        have = t.shape[0] if key.endswith(A_SUFFIX) else t.shape[1]
        if have > rank:
            raise ValueError(f"tensor {key!r} has rank {have}, above this exchange's {MAX_RANK} {rank}")
        if have < rank:
            grow = (0, 0, 0, rank - have) if key.endswith(A_SUFFIX) else (0, rank - have)
            out[key] = torch.nn.functional.pad(t, grow)
    return out


def factor_fits(name: str, got: tuple[int, ...], want: tuple[int, ...], max_rank: int) -> bool:
    """A LoRA factor ``name`` of shape ``got`` is the factor of shape ``want`` at a rank in [1, max_rank]."""
    if len(got) != 2 or len(want) != 2:
        return False
    if name.endswith(A_SUFFIX):
        return got[1] == want[1] and 1 <= got[0] <= max_rank
    if name.endswith(B_SUFFIX):
        return got[0] == want[0] and 1 <= got[1] <= max_rank
    return False
