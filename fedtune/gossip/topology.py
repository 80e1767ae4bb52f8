"""Who talks to whom in a gossip round: undirected graphs over nodes ``0..n-1``, built deterministically.

Every peer derives the same graph from the same inputs (the sorted peer list, the seed, the round), so no
coordinator is needed to agree on it. Graphs are undirected (the mixing weights are then symmetric):

- ``ring``: i ~ i +- 1.
- ``torus``: a rows x cols grid with wrap-around, rows the largest divisor of n not above sqrt(n) (a prime n
  gives a 1 x n torus, which is the ring).
- ``k_regular``: a random k-regular graph (seeded; n k even, k < n), redrawn until connected.
- ``erdos_renyi``: each edge with probability p (seeded), redrawn until connected.
- ``exponential``: i ~ i +- 2^j for 2^j < n (the undirected static exponential graph: up to 2 log2 n
  neighbours, diameter about log2 n).
- ``one_peer_exp``: time-varying, at most one neighbour a round: in round t node i pairs with
  i XOR 2^(t mod ceil(log2 n)) when that node exists. For n a power of two, log2 n consecutive rounds of
  equal-weight pairing average exactly (a hypercube sweep); otherwise a node whose partner does not exist
  sits the round out. The union over ceil(log2 n) rounds is connected.
- ``full``: everyone with everyone.

Pure Python, no torch: ``Graph`` is a tuple of neighbour sets.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

TOPOLOGIES = ("ring", "torus", "k_regular", "erdos_renyi", "exponential", "one_peer_exp", "full")
TIME_VARYING = ("one_peer_exp",)
_MAX_DRAWS = 1000


@dataclass(frozen=True)
class Graph:
    """An undirected graph: ``neighbours[i]`` is the set of nodes adjacent to ``i`` (never ``i`` itself)."""

    neighbours: tuple[frozenset[int], ...]

    @property
    def n(self) -> int:
        return len(self.neighbours)

    def degree(self, i: int) -> int:
        return len(self.neighbours[i])

    def edges(self) -> list[tuple[int, int]]:
        """Every edge once, as ``(i, j)`` with ``i < j``, sorted."""
        return sorted((i, j) for i, nb in enumerate(self.neighbours) for j in nb if i < j)

    def is_connected(self) -> bool:
        """Whether every node reaches every other (a single node is connected)."""
        if self.n == 0:
            return False
        seen, todo = {0}, [0]
        while todo:
            for j in self.neighbours[todo.pop()]:
                if j not in seen:
                    seen.add(j)
                    todo.append(j)
        return len(seen) == self.n


def from_edges(n: int, edges: list[tuple[int, int]] | set[tuple[int, int]]) -> Graph:
    """The graph on ``n`` nodes with ``edges`` (self-loops and duplicates ignored)."""
    nb: list[set[int]] = [set() for _ in range(n)]
    for i, j in edges:
        if i != j:
            nb[i].add(j)
            nb[j].add(i)
    return Graph(tuple(frozenset(s) for s in nb))


def ring(n: int) -> Graph:
    return from_edges(n, [(i, (i + 1) % n) for i in range(n)])


def torus(n: int) -> Graph:
    rows = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    cols = n // rows
    edges = []
    for r in range(rows):
        for c in range(cols):
            i = r * cols + c
            edges.append((i, r * cols + (c + 1) % cols))
            edges.append((i, ((r + 1) % rows) * cols + c))
    return from_edges(n, edges)


def full(n: int) -> Graph:
    return from_edges(n, [(i, j) for i in range(n) for j in range(i + 1, n)])


def exponential(n: int) -> Graph:
    edges: list[tuple[int, int]] = []
    hop = 1
    while hop < n:
        edges.extend((i, (i + hop) % n) for i in range(n))
        hop *= 2
    return from_edges(n, edges)


def one_peer_exp(n: int, round: int) -> Graph:
    """The one-peer exponential graph of round ``round`` (see the module docstring)."""
    if n < 2:
        return from_edges(n, [])
    hop = 1 << (round % math.ceil(math.log2(n)))
    return from_edges(n, [(i, i ^ hop) for i in range(n) if (i ^ hop) < n])


def k_regular(n: int, k: int, seed: int) -> Graph:
    """A connected random k-regular graph: the pairing model with seeded retries.

    Raises:
        ValueError: k not in [1, n-1], n k odd, or no connected draw in 1000 tries.
    """
    if not 1 <= k < n or (n * k) % 2:
        raise ValueError(f"no {k}-regular graph on {n} nodes (needs 1 <= k < n and n*k even)")
    rng = random.Random(f"fedtune-k_regular/{n}/{k}/{seed}")
    for _ in range(_MAX_DRAWS):
        stubs = [i for i in range(n) for _ in range(k)]
        rng.shuffle(stubs)
        pairs = {(min(a, b), max(a, b)) for a, b in zip(stubs[::2], stubs[1::2], strict=True)}
        if len(pairs) == n * k // 2 and all(a != b for a, b in pairs):
            g = from_edges(n, pairs)
            if g.is_connected():
                return g
    raise ValueError(f"could not draw a connected {k}-regular graph on {n} nodes in {_MAX_DRAWS} tries")


def erdos_renyi(n: int, p: float, seed: int) -> Graph:
    """A connected G(n, p) graph: edges drawn with probability ``p`` (seeded), redrawn until connected.

    Raises:
        ValueError: p not in (0, 1], or no connected draw in 1000 tries (p far below log(n)/n).
    """
    if not 0 < p <= 1:
        raise ValueError(f"erdos_renyi needs 0 < p <= 1, got {p}")
    rng = random.Random(f"fedtune-erdos_renyi/{n}/{p}/{seed}")
    for _ in range(_MAX_DRAWS):
        g = from_edges(n, [(i, j) for i in range(n) for j in range(i + 1, n) if rng.random() < p])
        if g.is_connected():
            return g
    raise ValueError(f"no connected Erdos-Renyi graph on {n} nodes with p={p} in {_MAX_DRAWS} draws; raise p "
                     f"(connectivity needs p above about log(n)/n = {math.log(max(n, 2)) / n:.3f})")


def make_topology(name: str, n: int, *, seed: int = 0, degree: int = 4, p: float = 0.3
                  ) -> Callable[[int], Graph]:
    """The graph of each round: ``make_topology(...)(round)``; static topologies return one graph always.

    Raises:
        ValueError: an unknown name, n < 1, or parameters the topology cannot use (k_regular, erdos_renyi).
    """
    if n < 1:
        raise ValueError(f"a topology needs at least one node, got {n}")
    static: dict[str, Callable[[], Graph]] = {
        "ring": lambda: ring(n), "torus": lambda: torus(n), "full": lambda: full(n),
        "exponential": lambda: exponential(n), "k_regular": lambda: k_regular(n, degree, seed),
        "erdos_renyi": lambda: erdos_renyi(n, p, seed),
    }
    if name == "one_peer_exp":
        return lambda rnd: one_peer_exp(n, rnd)
    if name not in static:
        raise ValueError(f"unknown topology {name!r}; choose one of {', '.join(TOPOLOGIES)}")
    graph = static[name]()
    return lambda rnd: graph
