"""Failure injection for simulated rounds: dropouts, stragglers and corrupted updates.

Draws come from a generator of their own per (seed, round, phase), in client order, so a given seed fails the
same clients in the same rounds every time (and after a resume), whatever the strategy's sampling consumed.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Literal

from fedtune.sections import SimConfig
from fedtune.types import ClientReply

Fault = Literal["dropout", "straggler", "nan", "scale"] | None


def fault_rng(seed: int, round: int, phase: str) -> random.Random:
    """The generator of one phase's fault draws."""
    return random.Random(f"fedtune-faults/{seed}/{round}/{phase}")


def inject(sim: SimConfig, rng: random.Random) -> Fault:
    """The fault (if any) that hits the next client: three draws per client whatever the settings."""
    drop, slow, corrupt = rng.random(), rng.random(), rng.random()
    if drop < sim.dropout:
        return "dropout"
    if corrupt < sim.corrupt_prob:
        return sim.corrupt_kind
    if slow < sim.straggler_prob:
        return "straggler"
    return None


def corrupt(reply: ClientReply, kind: Fault, scale: float) -> ClientReply:
    """``reply`` with its float tensors broken: the first one all NaN (``nan``), or all scaled (``scale``)."""
    assert reply.state is not None
    floats = [k for k, v in reply.state.items() if v.is_floating_point()]
    if kind == "nan":
        state = {k: v.clone().fill_(float("nan")) if floats and k == floats[0] else v for k, v in reply.state.items()}
    else:
        state = {k: v * scale if k in floats else v for k, v in reply.state.items()}
    return dataclasses.replace(reply, state=state, metrics={**reply.metrics, "corrupted": 1.0})
