"""Split records among simulated clients: IID, Dirichlet label skew, whole categories, size skew.

Every partitioner is a pure function of its arguments and ``seed`` and returns ``list[list[int]]``: the
sorted record indices of each client. Every record goes to exactly one client and no client is empty; when
that is impossible (fewer records than clients, a category shared by more clients than it has records...)
a ``ValueError`` says what to change. ``labels`` are any hashable values, usually the records' ``category``.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Sequence
from typing import Any

import numpy as np

from fedtune.config import Config
from fedtune.data.sources import Record

Parts = list[list[int]]
PARTITIONERS: tuple[str, ...] = ("iid", "dirichlet", "by_category", "size_skew")


def _check(n: int, num_clients: int, min_size: int = 1) -> None:
    if num_clients < 1:
        raise ValueError(f"sim.num_clients must be at least 1, got {num_clients}")
    if n < num_clients * min_size:
        raise ValueError(
            f"cannot give {num_clients} clients at least {min_size} record(s) each from {n} records: "
            "lower sim.num_clients or use more data"
        )


def _finish(parts: Sequence[Iterable[Any]]) -> Parts:
    return [sorted(int(i) for i in p) for p in parts]


def iid(n: int, num_clients: int, seed: int) -> Parts:
    """A uniform random split of ``n`` records into ``num_clients`` parts whose sizes differ by at most one.

    Raises:
        ValueError: if ``n < num_clients``.
    """
    _check(n, num_clients)
    perm = np.random.default_rng(seed).permutation(n)
    return _finish(np.array_split(perm, num_clients))


def dirichlet(
    labels: Sequence[Hashable], num_clients: int, alpha: float, seed: int, min_size: int = 1
) -> Parts:
    """Label-skewed split: each label's records are shared among clients in proportions drawn from
    ``Dirichlet(alpha)`` (Hsu et al., 2019). Small ``alpha`` (0.1) gives each client few labels; large
    ``alpha`` (100) approaches IID.

    As in NIID-Bench, a client that already holds its fair share (``n / num_clients``) gets no more of the
    next label, and draws are repeated (up to 1000 times, same seed stream) until every client has
    ``min_size`` records.

    Raises:
        ValueError: if ``alpha <= 0``, there are too few records, or no draw gives every client ``min_size``.
    """
    if alpha <= 0:
        raise ValueError(f"sim.dirichlet_alpha must be positive, got {alpha}")
    n = len(labels)
    _check(n, num_clients, min_size)
    rng = np.random.default_rng(seed)
    by_label = _group(labels)
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for idx in by_label.values():
            shuffled = rng.permutation(idx)
            p = rng.dirichlet([alpha] * num_clients)
            p = np.array([pj * (len(part) < n / num_clients) for pj, part in zip(p, parts)])
            p = p / p.sum() if p.sum() > 0 else np.full(num_clients, 1.0 / num_clients)
            cuts = (np.cumsum(p) * len(shuffled)).astype(int)[:-1]
            for part, chunk in zip(parts, np.split(shuffled, cuts)):
                part.extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return _finish(parts)
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) draw gave all {num_clients} clients {min_size} record(s): "
        "raise sim.dirichlet_alpha or lower sim.num_clients"
    )


def by_category(labels: Sequence[Hashable], num_clients: int, categories_per_client: int, seed: int) -> Parts:
    """Give each client whole categories (the pathological non-IID split of McMahan et al.).

    The shuffled categories are laid out in ``max(num_categories, num_clients * categories_per_client)``
    slots (cycling through them again when there are more slots than categories) and each client takes a
    contiguous run of slots. So:

    - ``num_clients * categories_per_client == num_categories``: disjoint, each client has exactly ``k``;
    - fewer slots than categories: still disjoint, the extra categories go to some clients (k or k + 1...),
      so that every record is assigned;
    - more slots than categories: categories are shared, and a shared category's records are split evenly
      among the clients that hold it.

    Raises:
        ValueError: if ``categories_per_client`` is not in [1, num_categories], or a client would be empty
            (a category with fewer records than the clients sharing it).
    """
    _check(len(labels), num_clients)
    by_label = _group(labels)
    cats = sorted(by_label, key=str)
    if not 1 <= categories_per_client <= len(cats):
        raise ValueError(
            f"sim.categories_per_client must be in [1, {len(cats)}] (the number of categories), "
            f"got {categories_per_client}"
        )
    rng = np.random.default_rng(seed)
    order = [cats[i] for i in rng.permutation(len(cats))]
    slots = max(len(cats), num_clients * categories_per_client)
    layout = [order[s % len(cats)] for s in range(slots)]
    holders: dict[Hashable, list[int]] = {c: [] for c in cats}
    for client, run in enumerate(np.array_split(np.arange(slots), num_clients)):
        for s in run:
            holders[layout[s]].append(client)
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for c in cats:
        idx = rng.permutation(by_label[c])
        for client, chunk in zip(holders[c], np.array_split(idx, len(holders[c]))):
            parts[client].extend(chunk.tolist())
    empty = [i for i, p in enumerate(parts) if not p]
    if empty:
        raise ValueError(
            f"clients {empty} got no records (categories too small to share among "
            f"{num_clients} clients): lower sim.categories_per_client or sim.num_clients"
        )
    return _finish(parts)


def size_skew(n: int, num_clients: int, sigma: float, seed: int) -> Parts:
    """A random split whose client sizes follow a log-normal law: weights ``exp(N(0, sigma))``.

    ``sigma = 0`` gives equal sizes; ``sigma = 1`` a largest client typically several times the smallest.
    Every client gets at least one record; the rest is apportioned by the weights (largest remainders).

    Raises:
        ValueError: if ``sigma < 0`` or ``n < num_clients``.
    """
    if sigma < 0:
        raise ValueError(f"sim.size_skew must be non-negative, got {sigma}")
    _check(n, num_clients)
    rng = np.random.default_rng(seed)
    weights = np.exp(rng.normal(0.0, sigma, num_clients)) if sigma > 0 else np.ones(num_clients)
    extra = n - num_clients
    share = weights / weights.sum() * extra
    sizes = np.floor(share).astype(int)
    for i in np.argsort(-(share - sizes), kind="stable")[: extra - int(sizes.sum())]:
        sizes[i] += 1
    sizes += 1
    perm = rng.permutation(n)
    return _finish(np.split(perm, np.cumsum(sizes)[:-1]))


def _group(labels: Sequence[Hashable]) -> dict[Hashable, list[int]]:
    if any(lab is None for lab in labels):
        raise ValueError("this partitioner needs a category for every record (some have None)")
    groups: dict[Hashable, list[int]] = {}
    for i, lab in enumerate(labels):
        groups.setdefault(lab, []).append(i)
    return groups


def make_partition(name: str, records: Sequence[Record], num_clients: int, seed: int, **opts: Any) -> Parts:
    """Partition records by the partitioner ``name`` with its options (``alpha``, ``min_size``,
    ``categories_per_client``, ``sigma``); labels are the records' ``label_key`` (default ``category``).

    Raises:
        ValueError: if ``name`` or an option is unknown (both list the valid ones), or the partitioner
            rejects its arguments.
    """
    label_key = opts.pop("label_key", "category")
    allowed = {
        "iid": set(),
        "dirichlet": {"alpha", "min_size"},
        "by_category": {"categories_per_client"},
        "size_skew": {"sigma"},
    }
    if name not in allowed:
        raise ValueError(f"sim.partitioner {name!r} is not one of {list(PARTITIONERS)}")
    unknown = sorted(set(opts) - allowed[name])
    if unknown:
        raise ValueError(f"partition {name!r} takes options {sorted(allowed[name])}, not {unknown}")
    n = len(records)
    if name == "iid":
        return iid(n, num_clients, seed)
    if name == "size_skew":
        return size_skew(n, num_clients, opts.get("sigma", 1.0), seed)
    labels = [r.get(label_key) for r in records]
    if name == "dirichlet":
        return dirichlet(labels, num_clients, opts.get("alpha", 0.5), seed, opts.get("min_size", 1))
    return by_category(labels, num_clients, opts.get("categories_per_client", 1), seed)


def partition_table(
    parts: Sequence[Sequence[int]], labels: Sequence[Hashable], categories: Sequence[Hashable] | None = None
) -> list[list[int]]:
    """Counts of records per client (rows) and category (columns, ``categories`` or sorted labels)."""
    cols = list(categories) if categories is not None else sorted(set(labels), key=str)
    where = {c: j for j, c in enumerate(cols)}
    table = [[0] * len(cols) for _ in parts]
    for row, part in zip(table, parts):
        for i in part:
            row[where[labels[i]]] += 1
    return table


def label_entropy(parts: Sequence[Sequence[int]], labels: Sequence[Hashable]) -> float:
    """Mean over clients of the entropy (bits) of the client's label distribution: low means skewed."""
    total = 0.0
    for row in partition_table(parts, labels):
        size = sum(row) or 1
        total -= sum(c / size * math.log2(c / size) for c in row if c)
    return total / len(parts)


def render_partition_table(
    parts: Sequence[Sequence[int]], labels: Sequence[Hashable], title: str = "records per client"
) -> PartitionTable:
    """The clients x categories counts as a rich renderable, with a total column and row; see
    ``PartitionTable`` for how it fits the console."""
    cols = sorted(set(labels), key=str)
    return PartitionTable(title, [str(c) for c in cols], partition_table(parts, labels, cols))


class PartitionTable:
    """Counts per client (rows of ``counts``) and category, plus totals, that read whole on any console. With
    more categories than clients it is transposed (a row per category), so that it stays about as wide as the
    number of clients rather than of categories. When no orientation fits the console it is printed as several
    tables, each with the row names and as many columns as fit (the totals in the last), in the orientation
    that needs fewer of them, instead of squeezing columns until their values vanish."""

    def __init__(self, title: str, categories: list[str], counts: list[list[int]]) -> None:
        self.title, self.categories, self.counts = title, categories, counts

    def layout(self, transposed: bool) -> tuple[str, str, list[str], list[str], list[list[int]]]:
        """(title, first column, row names, column heads, grid) of one orientation."""
        clients = [str(i) for i in range(len(self.counts))]
        if transposed:
            return (f"{self.title} (a row per category, a column per client)", "category", self.categories, clients,
                    [list(col) for col in zip(*self.counts)])
        return self.title, "client", clients, self.categories, self.counts

    @staticmethod
    def chunks(first: str, names: list[str], heads: list[str], grid: list[list[int]], width: int) -> list[list[int]]:
        """Column indices (of ``heads``, then the total) of each table, each as many as fit ``width``."""
        from rich.cells import cell_len

        sums = [sum(col) for col in zip(*grid)]
        cells = [[h, *(str(v) for v in col), str(s)] for h, col, s in zip(heads, zip(*grid), sums)]
        cells.append(["total", *(str(sum(row)) for row in grid), str(sum(sums))])
        need = [max(cell_len(c) for c in col) + 3 for col in cells]  # padding and a border each
        left = 1 + 3 + max(cell_len(n) for n in [first, *names, "total"])
        out: list[list[int]] = [[]]
        used = left
        for k, w in enumerate(need):
            if out[-1] and used + w > width:
                out.append([])
                used = left
            out[-1].append(k)
            used += w
        return out

    def __rich_console__(self, console: Any, options: Any) -> Any:
        from rich.table import Table

        usual = len(self.categories) > len(self.counts)  # the longer dimension down the page
        ranked = [(len(self.chunks(*self.layout(t)[1:], options.max_width)), t != usual, t) for t in (usual, not usual)]
        transposed = min(ranked)[2]
        title, first, names, heads, grid = self.layout(transposed)
        parts = self.chunks(first, names, heads, grid, options.max_width)
        sums = [sum(col) for col in zip(*grid)]
        rows = [[*(str(v) if v else "." for v in row), str(sum(row))] for row in grid]
        totals = [*(str(v) for v in sums), str(sum(sums))]
        heads = [*heads, "total"]
        for n, cols in enumerate(parts, 1):
            table = Table(title=title + (f", part {n} of {len(parts)}" if len(parts) > 1 else ""))
            table.add_column(first, overflow="fold")
            for k in cols:
                table.add_column(heads[k], justify="right", overflow="fold", style="bold" if k == len(heads) - 1 else "")
            for name, row in zip(names, rows, strict=True):
                table.add_row(name, *(row[k] for k in cols))
            table.add_row("total", *(totals[k] for k in cols), style="bold")
            yield table


def partition_clients(cfg: Config, records: list[Record]) -> Parts:
    """The simulated federation's split of ``records`` among ``cfg.sim.num_clients`` clients, per ``cfg.sim``.

    The simulator, the Flower actors and the tests that build a real federation from a simulated one all
    split with this, so a client index means the same records everywhere.

    Raises:
        ValueError: a partitioner that needs categories on records that have none.
    """
    sim = cfg.sim
    name = {"category": "by_category", "dirichlet": "dirichlet", "iid": "iid", "size_skew": "size_skew"}[sim.partitioner]
    opts: dict[str, Any] = {}
    if name == "by_category":
        opts["categories_per_client"] = sim.categories_per_client
    elif name == "dirichlet":
        opts["alpha"] = sim.dirichlet_alpha
    elif name == "size_skew":
        opts["sigma"] = sim.size_skew
    if name in ("by_category", "dirichlet") and not any(r.get("category") for r in records):
        raise ValueError(f"sim.partitioner={sim.partitioner} needs a category per record (data.category_field)")
    return make_partition(name, records, sim.num_clients, cfg.seed, **opts)
