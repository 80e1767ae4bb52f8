"""Server-side aggregation: pure functions over tensors and thin strategy objects.

``make_strategy(name, cfg)`` is the one entry point the round driver's callers use; the returned object
follows ``base.Strategy`` (``phases``, then ``configure`` and ``aggregate`` per phase, ending in a
``RoundResult``; ``state_dict`` for checkpoints). Names map to classes in ``specs.REGISTRY``.

Importing this package loads no torch: the config system reads ``StrategyConfig`` and the registry from it.
The tensor side (``RoundResult``, ``lora_scale``, ``dense_delta``, the classes) is imported on first use.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import TYPE_CHECKING, Any

from fedtune.strategies.config import ROBUST_NAMES, STRATEGY_NAMES, StrategyConfig
from fedtune.strategies.specs import REGISTRY, StrategySpec, spec_of

if TYPE_CHECKING:
    from fedtune.config import Config
    from fedtune.strategies.base import PhaseResult, RoundResult, Strategy, lora_scale
    from fedtune.strategies.lowrank import dense_delta

__all__ = [
    "REGISTRY",
    "ROBUST_NAMES",
    "STRATEGY_NAMES",
    "PhaseResult",
    "RoundResult",
    "Strategy",
    "StrategyConfig",
    "StrategySpec",
    "dense_delta",
    "lora_scale",
    "make_strategy",
    "spec_of",
    "strategy_config",
]

# Tensor-side names this package re-exports, imported when first asked for (PEP 562).
_LAZY = {"RoundResult": "fedtune.strategies.base", "PhaseResult": "fedtune.strategies.base",
         "Strategy": "fedtune.strategies.base", "lora_scale": "fedtune.strategies.base",
         "dense_delta": "fedtune.strategies.lowrank"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_strategy(name: str, cfg: StrategyConfig | None = None) -> Strategy:
    """The strategy called ``name`` configured by ``cfg`` (``cfg.name`` is ignored in favour of ``name``).

    ``median``, ``trimmed_mean``, ``krum`` and ``multikrum`` are fedavg with that ``robust`` aggregation;
    the same aggregators work under any averaging strategy through ``cfg.robust``.

    Raises:
        ValueError: an unknown ``name``, listing the valid ones, or an invalid ``cfg`` (every problem).
    """
    spec = spec_of(name)
    cfg = dataclasses.replace(cfg or StrategyConfig(), name=name, **spec.fixed)
    problems = cfg.validate()
    if problems:
        raise ValueError("invalid strategy config: " + "; ".join(problems))
    module, cls = spec.target.split(":")
    strategy: Strategy = getattr(importlib.import_module(module), cls)(cfg, **spec.options)
    return strategy


def strategy_config(cfg: Config, quantized: bool, clients_per_round: float) -> StrategyConfig:
    """The ``[strategy]`` section of run config ``cfg`` completed with what the rest of it already says.

    ``clients_per_round`` is the run's sampling (``sim.clients_per_round`` or
    ``federation.clients_per_round``): 0 for all, a fraction below 1, or a count. ``quantized``: the
    coordinator's base model is quantized.
    """
    s = cfg.strategy
    return dataclasses.replace(
        s, lora_alpha=cfg.adapter.alpha, r=cfg.adapter.r, use_rslora=cfg.adapter.method == "rslora",
        quantized_base=quantized,
        clients_per_round=int(clients_per_round) if clients_per_round >= 1 else 0,
        fraction=clients_per_round if 0 < clients_per_round < 1 else 1.0 if clients_per_round == 0 else s.fraction)
