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
    """Running weighted mean of a fixed set of tensors, summed in fp32.

    The sums live in one flat fp32 buffer (each key a view of it): one allocation, zeroed once. A reply
    without a mask is added by one fused ``_foreach_add_`` over all its tensors (fp32 tensors are read in
    place, other dtypes are widened inside the add, no copy).
    """

    def __init__(self, global_state: State, keys: Sequence[str]) -> None:
        self.keys = list(keys)
        self._global = global_state
        shapes = [global_state[k].shape for k in self.keys]
        self._flat = torch.zeros(sum(s.numel() for s in shapes), dtype=torch.float32,
                                 device=global_state[self.keys[0]].device if self.keys else None)
        self._sums = [part.view(s) for part, s in zip(self._flat.split([s.numel() for s in shapes]), shapes,
                                                      strict=True)]
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
        if not mask and not self._weights:
            if self.keys:
                torch._foreach_add_(self._sums, [state[k] for k in self.keys], alpha=weight)
            self._total += weight
            self.count += 1
            return
        masked = {k for k in self.keys if mask is not None and k in mask}
        plain = [i for i, k in enumerate(self.keys) if k not in masked]
        if plain:
            sums = [self._sums[i] for i in plain]
            xs = [state[self.keys[i]] for i in plain]
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
        means = list(torch._foreach_div(self._sums, self._total)) if self.keys else []  # fused; own storage
        out: State = {}
        for i, k in enumerate(self.keys):
            g = self._global[k]
            w = self._weights.get(k)
            if w is not None:
                means[i] = torch.where(w > 0, self._sums[i] / w.clamp_min(1e-30), g.float())
            out[k] = means[i].to(g.dtype)
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
