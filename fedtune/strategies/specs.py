"""The strategy registry: each name, the class that implements it and what it declares about itself.

A new strategy is one module (its class, following ``fedtune.strategies.base.Strategy``) plus one line here.
This module imports nothing heavy (no torch), so the config system can check a config against a strategy's
declarations before any model or tensor library loads; the class is imported only by ``make_strategy``.

What a spec declares is what the config checks need (``StrategyConfig.validate``, ``fedtune.config``) and
what the loops read instead of comparing names (``Strategy.spec``):

- ``linear``: the aggregate is a weighted sum of the replies (before any server-side step on it), so secure
  aggregation, which reveals only the sum, can compute it.
- ``robust``: accepts ``strategy.robust`` (median, trimmed mean, Krum in place of the weighted mean).
- ``client_ranks``: aggregates clients of different LoRA ranks (``strategy.client_ranks``).
- ``truncates``: keeps the best rank-r approximation of the exact average (``strategy.svd_rank``,
  ``svd_method``, ``error_feedback`` apply).
- ``lora_only``: works on LoRA factors B and A, so ``adapter.method`` must be lora, rslora or lora_fa.
- ``adapter_method``: needs this ``adapter.method`` (selected when the config leaves it at its default).
- ``frozen_in_state``: the global state includes the adapter's frozen tensors (ffa's shared A, needed for the
  aggregation error); clients are sent and send only what they train.
- ``quantized_base``: works on a quantized base (False: it folds updates into base weights exactly).
- ``fixed``: ``StrategyConfig`` fields the name sets (``median`` is fedavg with ``robust = "median"``).
- ``options``: keyword arguments for the class (which server optimizer, for example).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class StrategySpec:
    target: str
    """``module:Class`` implementing the strategy; imported only when a strategy is made."""
    help: str
    linear: bool = False
    robust: bool = False
    client_ranks: bool = False
    truncates: bool = False
    lora_only: bool = False
    adapter_method: str | None = None
    frozen_in_state: bool = False
    quantized_base: bool = True
    fixed: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)


_AVG = "fedtune.strategies.fedavg"
_EXACT = "fedtune.strategies.exact"


def _server_opt(kind: str, what: str) -> StrategySpec:
    return StrategySpec(f"{_AVG}:ServerOptimizer", f"{what} on the averaged delta (Reddi et al. 2021)",
                        linear=True, robust=True, options={"kind": kind})


def _robust(kind: str, what: str) -> StrategySpec:
    return StrategySpec(f"{_AVG}:FedAvg", f"fedavg with {what} in place of the weighted mean", robust=True,
                        fixed={"robust": kind})


REGISTRY: dict[str, StrategySpec] = {
    "fedavg": StrategySpec(f"{_AVG}:FedAvg", "weighted mean of A and B separately (FedIT)", linear=True,
                           robust=True),
    "ffa": StrategySpec(f"{_AVG}:FFA", "FFA-LoRA: A frozen at a shared seed, only B trained and averaged (exact)",
                        linear=True, adapter_method="lora_fa", frozen_in_state=True),
    "flora": StrategySpec(f"{_EXACT}:FLoRA", "FLoRA stacking, folded into the base each round (exact)",
                          client_ranks=True, lora_only=True),
    "svd": StrategySpec(f"{_EXACT}:SVD", "exact average in factored form, best rank-r approximation",
                        client_ranks=True, truncates=True),
    "fedex": StrategySpec(f"{_EXACT}:FedEx", "FedEx-LoRA: averages A and B, folds the residual into the base",
                          lora_only=True, quantized_base=False),
    "fedavgm": _server_opt("fedavgm", "server momentum"),
    "fedadam": _server_opt("fedadam", "server Adam"),
    "fedyogi": _server_opt("fedyogi", "server Yogi"),
    "fedadagrad": _server_opt("fedadagrad", "server Adagrad"),
    "fedprox": StrategySpec(f"{_AVG}:FedProx", "fedavg + the clients' proximal term strategy.prox_mu",
                            linear=True, robust=True),
    "median": _robust("median", "the coordinate median"),
    "trimmed_mean": _robust("trimmed_mean", "the trimmed mean (strategy.trim_fraction)"),
    "krum": _robust("krum", "Krum (strategy.krum_f)"),
    "multikrum": _robust("multikrum", "multi-Krum (strategy.krum_f, strategy.multikrum_m)"),
}


def spec_of(name: str) -> StrategySpec:
    """The spec registered as ``name``.

    Raises:
        ValueError: an unknown name, listing the valid ones.
    """
    if name not in REGISTRY:
        raise ValueError(f"unknown strategy {name!r}; valid: {', '.join(REGISTRY)}")
    return REGISTRY[name]
