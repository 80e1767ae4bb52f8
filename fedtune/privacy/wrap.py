"""The one place the server's strategy gets its privacy wrappers (``fedtune simulate`` and ``fedtune server``)."""

from __future__ import annotations

from typing import Any

from fedtune.privacy.dp import DPStrategy
from fedtune.privacy.secagg_strategy import SecAggStrategy
from fedtune.strategies.base import Strategy


def with_privacy(strategy: Strategy, cfg: Any) -> Strategy:
    """``strategy`` wrapped as ``cfg.privacy`` asks: ``DPStrategy`` for ``privacy.dp`` (central or distributed), inside
    ``SecAggStrategy`` for ``privacy.secagg``; else itself."""
    wrapped: Strategy = strategy
    if cfg.privacy.dp != "off":
        wrapped = DPStrategy(wrapped, cfg.privacy, cfg.seed)
    if cfg.privacy.secagg:
        wrapped = SecAggStrategy(wrapped, cfg.privacy, cfg.seed)
    return wrapped
