"""Gossip mixing: weights on a graph, dropping missing neighbours, and the three ways to mix LoRA adapters.

Dec-LoRA (Ghiasvand et al., 2025): after local steps node i replaces its adapter by ``sum_j Q_ij x_j`` over
itself and its neighbours, with Q symmetric and doubly stochastic, so every node drifts to the average.

Weights (``mixing_matrix``):

- ``metropolis_hastings`` (default): ``Q_ij = 1 / (1 + max(d_i, d_j))`` on an edge, ``Q_ii = 1 - sum_j Q_ij``.
  Symmetric and doubly stochastic on any graph; every node computes its row from its own and its
  neighbours' degrees.
- ``uniform``: ``Q_ij = 1 / (1 + d_i)`` for j in {i} and N(i): rows stochastic; symmetric and doubly
  stochastic only on regular graphs.

Missing neighbours (``drop_missing``): a node that does not answer is skipped for the round; its weight in
each live neighbour's row moves to that neighbour's own diagonal entry, and a node that is not live keeps
its adapter (its row is the unit row). Every row stays stochastic; with symmetric weights the matrix
restricted to the live nodes stays symmetric, hence doubly stochastic, and the rule needs only what each
node knows itself (which neighbours answered), as real peers do.

Bounded staleness (``with_stale``, ``gossip.max_staleness = s > 0``): every node keeps the latest adapter it
received from each neighbour with its (round, exchange) stamp. When neighbour j is missing from an exchange
of round k, node i mixes j's kept adapter with the weight ``Q_ij`` if its round is at least ``k - s``;
otherwise j is left out as above. The simulator and real peers apply this same rule (a peer's kept adapters
are what it fetched, the simulator's what each node would have fetched), and it needs nothing beyond what
node i holds. A stale entry costs no bytes; rows stay stochastic, the matrix is no longer symmetric.

Mixing modes (``mix``), for LoRA ``dW = s B A`` (s = alpha/r):

- ``factors``: average A and B separately (Dec-LoRA). Cheap, but ``(sum Q B)(sum Q A)`` is not
  ``sum Q B A`` (DeCAF's consensus interference); ``mixing_error`` measures the gap.
- ``frozen_a``: A is the same on every node (frozen at the shared seed, ``adapter.method = lora_fa``); B
  alone is averaged, and ``s (sum Q B) A = sum Q s B A`` exactly.
- ``product``: DeCAF-style: node i forms ``sum_j Q_ij s B_j A_j`` in factored form and keeps its best
  rank-r factors (the svd strategy's QR + small-SVD truncation, ``fedtune.strategies.lowrank``).

Tensors that are not LoRA factors (biases, heads) are averaged in every mode. Functions here are pure.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedtune.adapters import A_SUFFIX, B_SUFFIX
from fedtune.gossip.topology import Graph
from fedtune.strategies import lowrank
from fedtune.strategies.base import factor_pairs
from fedtune.types import State

WEIGHTS = ("metropolis_hastings", "uniform")
MIX_MODES = ("factors", "frozen_a", "product")


def mixing_matrix(graph: Graph, weights: str = "metropolis_hastings") -> torch.Tensor:
    """The n x n mixing matrix of ``graph`` (float64).

    Raises:
        ValueError: unknown ``weights``.
    """
    n = graph.n
    q = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in graph.neighbours[i]:
            if weights == "metropolis_hastings":
                q[i, j] = 1.0 / (1 + max(graph.degree(i), graph.degree(j)))
            elif weights == "uniform":
                q[i, j] = 1.0 / (1 + graph.degree(i))
            else:
                raise ValueError(f"unknown mixing weights {weights!r}; choose one of {', '.join(WEIGHTS)}")
        q[i, i] = 1.0 - q[i].sum()
    return q


def drop_missing(q: torch.Tensor, live: Sequence[bool]) -> torch.Tensor:
    """``q`` with the nodes that are not ``live`` left out (see the module docstring); a new matrix."""
    out = q.clone()
    alive = torch.tensor(list(live), dtype=torch.bool)
    if alive.numel() != q.shape[0]:
        raise ValueError(f"live has {alive.numel()} entries for {q.shape[0]} nodes")
    dead = ~alive
    moved = (out * dead[None, :]).sum(dim=1)  # each row's weight on nodes that are gone
    out[:, dead] = 0.0
    out += torch.diag(moved)
    out[dead] = torch.eye(q.shape[0], dtype=q.dtype)[dead]
    return out


Seen = dict[int, tuple[int, int, State]]
"""One node's kept adapters for bounded staleness: {neighbour: (round, exchange, adapter)}."""


def with_stale(q: torch.Tensor, i: int, states: Sequence[State], live: Sequence[bool], seen: Seen, round: int,
               exchange: int, max_staleness: int) -> tuple[torch.Tensor, list[State], dict[int, int]]:
    """Node ``i``'s row and the states it mixes in exchange ``exchange`` of ``round`` under bounded staleness
    (see the module docstring), updating ``seen`` with the live neighbours' adapters; also {neighbour: round
    of the stale adapter used}. ``states[j]`` is read only for live j."""
    view, alive, stale = list(states), list(live), {}
    for j in (j for j in range(q.shape[0]) if j != i and q[i, j] > 0):
        if live[j]:
            seen[j] = (round, exchange, states[j])
        elif j in seen and round - seen[j][0] <= max_staleness:
            view[j], alive[j], stale[j] = seen[j][2], True, seen[j][0]
    return drop_missing(q, alive)[i], view, stale


def spectral_gap(q: torch.Tensor) -> float:
    """``1 - |lambda_2|``: one minus the second largest eigenvalue modulus; the consensus distance of a
    linear mix shrinks by at least ``(1 - gap)^2`` per exchange for symmetric doubly stochastic ``q``."""
    if q.shape[0] < 2:
        return 1.0
    if torch.equal(q, q.T):
        mods = torch.linalg.eigvalsh(q).abs()
    else:
        mods = torch.linalg.eigvals(q).abs()
    return float(1.0 - torch.sort(mods, descending=True).values[1])


def _mean_rows(states: Sequence[State], row: torch.Tensor, keys: Sequence[str]) -> State:
    out: State = {}
    for k in keys:
        acc = torch.zeros_like(states[0][k], dtype=torch.float64)
        for j, w in enumerate(row.tolist()):
            if w != 0.0:
                acc += w * states[j][k].double()
        out[k] = acc.to(states[0][k].dtype)
    return out


def mix(states: Sequence[State], q: torch.Tensor, mode: str, *, scale: float, rank: int,
        frozen: State | None = None) -> list[State]:
    """Every node's adapter after one exchange with weights ``q`` (node i takes row i).

    ``scale`` is the LoRA scale s (alpha/r), ``rank`` the adapter rank r, ``frozen`` the tensors shared by
    every node outside the states (the frozen A of ``frozen_a``). A node whose row is the unit row is left as
    it is (in every mode: ``product`` would re-factor it).

    Raises:
        ValueError: an unknown mode, or ``frozen_a`` with A tensors that differ between two nodes.
    """
    if mode not in MIX_MODES:
        raise ValueError(f"unknown mixing mode {mode!r}; choose one of {', '.join(MIX_MODES)}")
    keys = list(states[0])
    a_keys = [k for k in keys if k.endswith(A_SUFFIX)]
    if mode == "frozen_a":
        for k in a_keys:
            if any(not torch.equal(s[k], states[0][k]) for s in states[1:]):
                raise ValueError(f"mix=frozen_a needs the same {k} on every node (A frozen at adapter.seed)")
    return [mix_row(states, row, i, mode, scale=scale, rank=rank, frozen=frozen) for i, row in enumerate(q)]


def mix_row(states: Sequence[State], row: torch.Tensor, i: int, mode: str, *, scale: float, rank: int,
            frozen: State | None = None) -> State:
    """Node ``i``'s adapter after one exchange with weights ``row`` (row i of the mixing matrix), as ``mix``
    computes it. Only the states with a non-zero weight are read: a real peer, which holds its own and its
    neighbours' adapters, puts any state in the other places (its own) and gets the simulator's result."""
    keys = list(states[0])
    if row[i] == 1.0:
        return dict(states[i])
    if mode == "factors":
        return _mean_rows(states, row, keys)
    if mode == "frozen_a":
        new = _mean_rows(states, row, [k for k in keys if not k.endswith(A_SUFFIX)])
        return {k: new.get(k, states[i][k]) for k in keys}
    return _mix_product(states, row, scale, rank, frozen)


def _mix_product(states: Sequence[State], row: torch.Tensor, scale: float, rank: int, frozen: State | None) -> State:
    """``sum_j row_j s B_j A_j`` per layer, truncated to its best rank-``rank`` factors; other tensors averaged."""
    pairs = [factor_pairs(s, frozen) for s in states]
    factor_keys = {p + suffix for p in pairs[0] for suffix in (A_SUFFIX, B_SUFFIX)}
    keys = list(states[0])
    out = _mean_rows(states, row, [k for k in keys if k not in factor_keys])
    for prefix in pairs[0]:
        terms = [(w * scale * p[prefix][0].double(), p[prefix][1].double())
                 for w, p in zip(row.tolist(), pairs, strict=True) if w != 0.0]
        svd = lowrank.truncated_svd(*lowrank.stack(terms), rank)
        b, a = lowrank.split_factors(svd, scale, rank)
        kb, ka = prefix + B_SUFFIX, prefix + A_SUFFIX
        out[kb] = b.to(states[0][kb].dtype)
        if ka in states[0]:
            out[ka] = a.to(states[0][ka].dtype)
    return {k: out[k] for k in keys}


def _layer_grams(states: Sequence[State], scale: float, frozen: State | None) -> dict[str, torch.Tensor]:
    """Per layer, the n x n matrix of Frobenius inner products ``<dW_i, dW_j>`` (float64, factored form)."""
    pairs = [factor_pairs(s, frozen) for s in states]
    out: dict[str, torch.Tensor] = {}
    for prefix in pairs[0]:
        b, a = lowrank.stack([(scale * p[prefix][0].double(), p[prefix][1].double()) for p in pairs])
        gram = (b.T @ b) * (a @ a.T)  # (n r) x (n r): block (i, j) sums to <B_i A_i, B_j A_j>
        n, r = len(states), pairs[0][prefix][1].shape[0]
        out[prefix] = gram.reshape(n, r, n, r).sum(dim=(1, 3))
    return out


def consensus_distance(states: Sequence[State], *, scale: float, frozen: State | None = None) -> float:
    """``(1/n) sum_i ||dW_i - mean_j dW_j||_F^2`` summed over layers, from the products' inner products
    (``sum_i ||dW_i||^2 - n ||mean||^2`` over n): one (n r) square Gram per layer, no d_out x d_in matrix."""
    n = len(states)
    total = 0.0
    for g in _layer_grams(states, scale, frozen).values():
        total += float(torch.trace(g) - g.sum() / n) / n
    return max(total, 0.0)


def mixing_error(before: Sequence[State], after: Sequence[State], q: torch.Tensor, *, scale: float,
                 frozen: State | None = None) -> float:
    """Mean over mixing nodes and layers of ``||dW_i' - sum_j Q_ij dW_j||_F / ||sum_j Q_ij dW_j||_F``: how far
    each node's mixed adapter is from the average of the products it mixed (0 for ``frozen_a``; the
    truncation error for ``product``; the consensus interference for ``factors``)."""
    errors: list[float] = []
    old = [factor_pairs(s, frozen) for s in before]
    for i, row in enumerate(q):
        if row[i] == 1.0:
            continue
        new = factor_pairs(after[i], frozen)
        for prefix, (b, a) in new.items():
            ref = [(w * scale * old[j][prefix][0].double(), old[j][prefix][1].double())
                   for j, w in enumerate(row.tolist()) if w != 0.0]
            errors.append(lowrank.relative_error([(scale * b.double(), a.double())], ref))
    return sum(errors) / len(errors) if errors else 0.0
