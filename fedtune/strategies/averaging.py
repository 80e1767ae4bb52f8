"""Streaming weighted (and masked) averages of adapter states: O(one adapter) memory for any number of clients.

``WeightedMean`` keeps ``sum_k n_k x_k`` and the weight total; replies are added one at a time and dropped.
With masks it keeps a per-coordinate weight instead: ``sum_k n_k m_kj x_kj / sum_k n_k m_kj``, and a coordinate
nobody sent keeps its global value (its delta is 0).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from fedtune.types import State


class WeightedMean:
    """Running weighted mean of a fixed set of tensors (fp32 accumulators, one per key)."""

    def __init__(self, global_state: State, keys: Sequence[str]) -> None:
        self.keys = list(keys)
        self._global = global_state
        self._sums = [torch.zeros_like(global_state[k], dtype=torch.float32) for k in self.keys]
        self._total = 0.0
        self._weights: dict[str, torch.Tensor] = {}  # per-coordinate weights of masked keys
        self.count = 0

    def add(self, state: State, weight: float, mask: State | None = None) -> None:
        """Add ``weight * state[k]`` for every key (masked keys only where the mask is True).

        Raises:
            ValueError: ``weight`` is not positive.
        """
        if weight <= 0:
            raise ValueError(f"weight must be > 0, got {weight}")
        masked = {k for k in self.keys if mask is not None and k in mask}
        plain = [i for i, k in enumerate(self.keys) if k not in masked]
        if plain:
            sums = [self._sums[i] for i in plain]
            xs = [state[self.keys[i]].float() for i in plain]
            torch._foreach_add_(sums, xs, alpha=weight)
        for i, k in enumerate(self.keys):
            if k not in masked:
                continue
            assert mask is not None
            m = mask[k].float()
            self._sums[i].addcmul_(state[k].float(), m, value=weight)
            w = self._weights.get(k)
            if w is None:
                # Every earlier reply sent this key whole: their weight covers every coordinate.
                w = torch.full_like(m, self._total)
            self._weights[k] = w.add_(m, alpha=weight)
        if plain:
            # Unmasked keys are "sent everywhere": count their weight on masked keys' coordinates too.
            for k, w in self._weights.items():
                if k in masked:
                    continue
                w.add_(weight)
        self._total += weight
        self.count += 1

    def result(self) -> State:
        """The mean so far; coordinates with zero weight keep the global value.

        Raises:
            ValueError: nothing was added.
        """
        if self.count == 0:
            raise ValueError("no state was added to the mean")
        out: State = {}
        for k, s in zip(self.keys, self._sums, strict=True):
            g = self._global[k]
            w = self._weights.get(k)
            if w is None:
                out[k] = (s / self._total).to(g.dtype)
            else:
                mean = s / w.clamp_min(1e-30)
                out[k] = torch.where(w > 0, mean, g.float()).to(g.dtype)
        return out


def weighted_mean(
    items: Iterable[tuple[State, float, State | None]], global_state: State, keys: Sequence[str]
) -> State:
    """``sum_k w_k x_k / sum_k w_k`` per key (masked per coordinate), consuming ``items`` one at a time.

    Raises:
        ValueError: ``items`` is empty or a weight is not positive.
    """
    acc = WeightedMean(global_state, keys)
    for state, weight, mask in items:
        acc.add(state, weight, mask)
    return acc.result()
