"""Failure injection for simulated rounds: dropouts, stragglers and corrupted updates.

Draws come from a generator of their own per (seed, round, phase), in client order, so a given seed fails the
same clients in the same rounds every time (and after a resume), whatever the strategy's sampling consumed.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Literal

import torch

from fedtune.sections import SimConfig
from fedtune.types import ClientReply, State

Fault = Literal["dropout", "straggler", "nan", "scale", "flip", "huge", "weight"] | None
ATTACKS: tuple[Fault, ...] = ("scale", "flip", "nan", "weight")
"""What ``sim.corrupt_kind = "mixed"`` draws from, one per corrupted reply."""
HUGE = 1.7e19
"""The values of a ``huge`` update: finite in fp32, but B @ A of two such factors is not."""


def fault_rng(seed: int, round: int, phase: str) -> random.Random:
    """The generator of one phase's fault draws."""
    return random.Random(f"fedtune-faults/{seed}/{round}/{phase}")


def inject(sim: SimConfig, rng: random.Random, *, byzantine: bool = False) -> Fault:
    """The fault (if any) that hits the next client: three draws per client whatever the settings (a fourth
    for the kind of a ``mixed`` corruption). A ``byzantine`` client (one of the last ``sim.byzantine``)
    corrupts every update it sends."""
    drop, slow, corrupt = rng.random(), rng.random(), rng.random()
    if drop < sim.dropout:
        return "dropout"
    if byzantine or corrupt < sim.corrupt_prob:
        return rng.choice(ATTACKS) if sim.corrupt_kind == "mixed" else sim.corrupt_kind
    if slow < sim.straggler_prob:
        return "straggler"
    return None


def corrupt(reply: ClientReply, kind: Fault, scale: float, sent: State | None = None) -> ClientReply:
    """``reply`` as an attacker would send it (``sent``: the state the client was sent):

    - ``nan``: the first float tensor all NaN;
    - ``scale``: every float tensor times ``scale``;
    - ``flip``: the update sign-flipped and scaled, ``sent - scale * (x - sent)``;
    - ``huge``: every float tensor filled with ``HUGE``;
    - ``weight``: the ``flip`` update, declaring 2^63 - 1 examples (to take the weighted mean over).
    """
    assert reply.state is not None
    floats = [k for k, v in reply.state.items() if v.is_floating_point()]
    num_examples = reply.num_examples
    if kind == "nan":
        state = {k: v.clone().fill_(float("nan")) if floats and k == floats[0] else v for k, v in reply.state.items()}
    elif kind == "huge":
        state = {k: torch.full_like(v, HUGE) if k in floats else v for k, v in reply.state.items()}
    elif kind in ("flip", "weight"):
        base = sent or {}
        state = {k: base[k] - scale * (v - base[k]) if k in floats and k in base and base[k].shape == v.shape else v
                 for k, v in reply.state.items()}
        num_examples = 2**63 - 1 if kind == "weight" else num_examples
    else:
        state = {k: v * scale if k in floats else v for k, v in reply.state.items()}
    return dataclasses.replace(reply, state=state, num_examples=num_examples,
                               metrics={**reply.metrics, "corrupted": 1.0})
