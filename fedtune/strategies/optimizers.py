"""Server optimizers on the averaged update (Reddi et al., "Adaptive Federated Optimization", ICLR 2021).

The pseudo-gradient of a round is ``delta = mean_k(x_k) - x`` (a descent direction, so it is *added*):

* fedavgm:    ``m = momentum * m + delta``;                 ``x += server_lr * m``
* fedadagrad: ``m = b1 m + (1-b1) delta``; ``v = v + delta^2``
* fedadam:    ``m = b1 m + (1-b1) delta``; ``v = b2 v + (1-b2) delta^2``
* fedyogi:    ``m = b1 m + (1-b1) delta``; ``v = v - (1-b2) delta^2 sign(v - delta^2)``
* adaptive:   ``x += server_lr * m / (sqrt(v) + tau)``

As in the paper's Algorithm 2: no bias correction, ``m`` starts at 0 and ``v`` at ``tau**2``.
``server_step`` is pure: it returns new tensors and a new ``ServerOptState``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fedtune.strategies.config import StrategyConfig
from fedtune.types import State

OPTIMIZERS: tuple[str, ...] = ("fedavgm", "fedadam", "fedyogi", "fedadagrad")


@dataclass(frozen=True)
class ServerOptState:
    """Moments kept by the server between rounds (empty before the first step)."""

    m: State = field(default_factory=dict)
    v: State = field(default_factory=dict)
    steps: int = 0


def server_step(
    kind: str, x: State, mean: State, opt: ServerOptState, cfg: StrategyConfig
) -> tuple[State, ServerOptState]:
    """One server optimizer step from global ``x`` towards the clients' ``mean`` (keys of ``mean`` only).

    Raises:
        ValueError: ``kind`` is not one of ``OPTIMIZERS``.
    """
    if kind not in OPTIMIZERS:
        raise ValueError(f"unknown server optimizer {kind!r}; valid: {', '.join(OPTIMIZERS)}")
    new_x: State = dict(x)
    new_m: State = {}
    new_v: State = {}
    for k, avg in mean.items():
        x_k = x[k].float()
        delta = avg.float() - x_k
        m_prev = opt.m.get(k, torch.zeros_like(delta))
        if kind == "fedavgm":
            m = cfg.momentum * m_prev + delta
            new_x[k] = (x_k + cfg.server_lr * m).to(x[k].dtype)
            new_m[k] = m
            continue
        m = cfg.beta1 * m_prev + (1 - cfg.beta1) * delta
        v_prev = opt.v.get(k, torch.full_like(delta, cfg.tau**2))
        d2 = delta * delta
        if kind == "fedadagrad":
            v = v_prev + d2
        elif kind == "fedadam":
            v = cfg.beta2 * v_prev + (1 - cfg.beta2) * d2
        else:  # fedyogi
            v = v_prev - (1 - cfg.beta2) * d2 * torch.sign(v_prev - d2)
        new_x[k] = (x_k + cfg.server_lr * m / (v.sqrt() + cfg.tau)).to(x[k].dtype)
        new_m[k], new_v[k] = m, v
    return new_x, ServerOptState(m=new_m, v=new_v, steps=opt.steps + 1)
