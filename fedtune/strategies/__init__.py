"""Server-side aggregation: pure functions over tensors and thin strategy objects.

``make_strategy(name, cfg)`` is the one entry point the simulator and the gRPC server use; the returned
object follows ``base.Strategy`` (``configure`` then ``aggregate``, returning a ``RoundResult``).
"""

from __future__ import annotations

import dataclasses

from fedtune.strategies.base import RoundResult, Strategy, lora_scale
from fedtune.strategies.config import ROBUST_NAMES, STRATEGY_NAMES, StrategyConfig
from fedtune.strategies.exact import ExactStrategy
from fedtune.strategies.fedavg import AveragingStrategy
from fedtune.strategies.lowrank import dense_delta

__all__ = [
    "ROBUST_NAMES",
    "STRATEGY_NAMES",
    "AveragingStrategy",
    "ExactStrategy",
    "RoundResult",
    "Strategy",
    "StrategyConfig",
    "dense_delta",
    "lora_scale",
    "make_strategy",
]


def make_strategy(name: str, cfg: StrategyConfig | None = None) -> Strategy:
    """The strategy called ``name`` configured by ``cfg`` (``cfg.name`` is ignored in favour of ``name``).

    ``median``, ``trimmed_mean``, ``krum`` and ``multikrum`` are fedavg with that ``robust`` aggregation;
    the same aggregators work under any averaging strategy through ``cfg.robust``.

    Raises:
        ValueError: an unknown ``name``, listing the valid ones, or an invalid ``cfg`` (every problem).
    """
    if name not in STRATEGY_NAMES:
        raise ValueError(f"unknown strategy {name!r}; valid: {', '.join(STRATEGY_NAMES)}")
    cfg = dataclasses.replace(cfg or StrategyConfig(), name=name)
    if name in ROBUST_NAMES:
        cfg = dataclasses.replace(cfg, robust=name)
    problems = cfg.validate()
    if problems:
        raise ValueError("invalid strategy config: " + "; ".join(problems))
    if name in ("flora", "svd", "fedex"):
        return ExactStrategy(name, cfg)
    return AveragingStrategy("fedavg" if name in ROBUST_NAMES else name, cfg)
