"""Byzantine-robust aggregation: coordinate median, trimmed mean, Krum and multi-Krum.

Each needs every reply at once (a median cannot be streamed), so memory is O(K adapters); the strategies that
use them say so with ``needs_all_replies = True``. Work is done one tensor at a time, so the extra workspace is
K x the largest tensor. Client weights (num_examples) are ignored by median and trimmed mean (a weighted
median would let one client claim a huge weight); multi-Krum averages the selected clients by weight.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedtune.types import State


def _stacked(states: Sequence[State], key: str) -> torch.Tensor:
    return torch.stack([s[key].float() for s in states])


def _sorted_last(states: Sequence[State], key: str) -> torch.Tensor:
    """Client values of every coordinate sorted, clients on the last (contiguous) axis: fast short sorts."""
    return torch.stack([s[key].float() for s in states], dim=-1).sort(dim=-1).values


def coordinate_median(states: Sequence[State], keys: Sequence[str]) -> State:
    """Per coordinate median over clients (mean of the two middle values when K is even).

    Raises:
        ValueError: ``states`` is empty.
    """
    if not states:
        raise ValueError("median of zero states")
    k = len(states)
    out: State = {}
    for key in keys:
        x = _sorted_last(states, key)
        mid = k // 2
        med = x[..., mid] if k % 2 else (x[..., mid - 1] + x[..., mid]) / 2
        out[key] = med.to(states[0][key].dtype)
    return out


def trimmed_mean(states: Sequence[State], keys: Sequence[str], trim_fraction: float) -> State:
    """Per coordinate mean after dropping the ``floor(trim_fraction * K)`` lowest and highest values.

    Raises:
        ValueError: ``states`` is empty or ``trim_fraction`` not in [0, 0.5).
    """
    if not states:
        raise ValueError("trimmed mean of zero states")
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    k = len(states)
    cut = int(trim_fraction * k)
    out: State = {}
    for key in keys:
        x = _sorted_last(states, key)
        out[key] = x[..., cut : k - cut].mean(dim=-1).to(states[0][key].dtype)
    return out


def pairwise_sq_distances(states: Sequence[State], keys: Sequence[str]) -> torch.Tensor:
    """K x K squared Euclidean distances between the flattened states (float64, one key at a time)."""
    k = len(states)
    dist = torch.zeros(k, k, dtype=torch.float64, device=states[0][keys[0]].device if keys else "cpu")
    for key in keys:
        x = _stacked(states, key).reshape(k, -1).double()
        sq = (x * x).sum(dim=1)
        dist += sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
    dist.clamp_(min=0.0).fill_diagonal_(0.0)
    return dist


def krum_select(states: Sequence[State], keys: Sequence[str], f: int, m: int = 1) -> list[int]:
    """Indices of the ``m`` clients with the lowest Krum score (Blanchard et al. 2017), best first.

    Clients tied with the m-th lowest score are kept too (more than ``m`` may come back).

    A client's score is the sum of squared distances to its K - f - 2 nearest other clients (at least 1,
    so small rounds still work; the guarantee needs K > 2f + 2).

    Raises:
        ValueError: ``states`` is empty or ``m`` not in [1, K].
    """
    k = len(states)
    if k == 0:
        raise ValueError("Krum over zero states")
    if not 1 <= m <= k:
        raise ValueError(f"multikrum_m must be in [1, {k}], got {m}")
    if k == 1:
        return [0]
    dist = pairwise_sq_distances(states, keys)
    neighbours = min(max(k - f - 2, 1), k - 1)
    others = dist + torch.diag(torch.full((k,), float("inf"), dtype=torch.float64, device=dist.device))
    scores = others.sort(dim=1).values[:, :neighbours].sum(dim=1)
    order = torch.argsort(scores, stable=True)
    # Clients tied with the m-th score are all kept, so the choice does not depend on reply order
    # (two mutual nearest neighbours always tie); "tied" allows float64 rounding.
    cut = float(scores[order[m - 1]])
    return [int(i) for i in order if float(scores[i]) <= cut + 1e-9 * abs(cut)]


def krum(states: Sequence[State], weights: Sequence[float], keys: Sequence[str], f: int, m: int = 1) -> State:
    """Multi-Krum: the weighted mean of the ``m`` clients ``krum_select`` keeps (``m=1`` is Krum).

    Raises:
        ValueError: as ``krum_select``.
    """
    chosen = krum_select(states, keys, f, m)
    total = sum(weights[i] for i in chosen)
    out: State = {}
    for key in keys:
        acc = sum(states[i][key].float() * (weights[i] / total) for i in chosen)
        assert isinstance(acc, torch.Tensor)
        out[key] = acc.to(states[0][key].dtype)
    return out
