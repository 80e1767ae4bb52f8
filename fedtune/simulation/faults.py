"""Failure injection for simulated rounds: dropouts, stragglers and corrupted updates.

Draws come from the round's seeded generator, in client order, so a given seed fails the same clients in
the same rounds every time (and after a resume).
"""

from __future__ import annotations

import random
from typing import Literal

from fedtune.sections import SimConfig

Fault = Literal["dropout", "straggler", "nan", "scale"] | None


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
