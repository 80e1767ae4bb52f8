"""Partitioners for the federated simulation: coverage, determinism, skew, errors."""

from __future__ import annotations

from typing import Any

import pytest
from rich.console import Console

from fedtune.data import (
    PARTITIONERS,
    by_category,
    dirichlet,
    iid,
    label_entropy,
    make_partition,
    partition_table,
    render_partition_table,
    size_skew,
)

# 10 categories of unequal sizes (20..65 records), 425 records in all.
LABELS = [f"c{c}" for c in range(10) for _ in range(20 + 5 * c)]
RECORDS = [{"prompt": str(i), "response": str(i), "category": lab} for i, lab in enumerate(LABELS)]
OPTS: dict[str, dict[str, Any]] = {
    "iid": {},
    "dirichlet": {"alpha": 0.3},
    "by_category": {"categories_per_client": 2},
    "size_skew": {"sigma": 1.0},
}


@pytest.mark.parametrize("name", PARTITIONERS)
@pytest.mark.parametrize("num_clients", [1, 5, 8])
def test_every_record_goes_to_exactly_one_nonempty_client(name: str, num_clients: int) -> None:
    parts = make_partition(name, RECORDS, num_clients, seed=0, **OPTS[name])
    assert len(parts) == num_clients
    assert all(parts) and all(p == sorted(p) for p in parts)
    assert sorted(i for p in parts for i in p) == list(range(len(RECORDS)))


@pytest.mark.parametrize("name", PARTITIONERS)
def test_same_seed_same_split_other_seed_other_split(name: str) -> None:
    a = make_partition(name, RECORDS, 5, seed=1, **OPTS[name])
    assert make_partition(name, RECORDS, 5, seed=1, **OPTS[name]) == a
    assert make_partition(name, RECORDS, 5, seed=2, **OPTS[name]) != a


def test_iid_sizes_differ_by_at_most_one() -> None:
    sizes = [len(p) for p in iid(len(LABELS), 6, seed=0)]
    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_skew_grows_as_alpha_falls() -> None:
    # Mean entropy (bits) of each client's labels: log2(10) = 3.32 is perfectly mixed.
    entropy = {
        a: sum(label_entropy(dirichlet(LABELS, 5, a, seed=s), LABELS) for s in range(3)) / 3
        for a in (0.05, 0.5, 100.0)
    }
    assert entropy[0.05] < entropy[0.5] < entropy[100.0]
    assert entropy[0.05] < 1.5 and entropy[100.0] > 3.0
    assert label_entropy(iid(len(LABELS), 5, seed=0), LABELS) > 3.0


def test_dirichlet_min_size_and_errors() -> None:
    parts = dirichlet(LABELS, 8, alpha=0.1, seed=0, min_size=10)
    assert min(len(p) for p in parts) >= 10
    with pytest.raises(ValueError, match="sim.dirichlet_alpha must be positive"):
        dirichlet(LABELS, 4, alpha=0.0, seed=0)
    with pytest.raises(ValueError, match="no Dirichlet"):
        dirichlet(LABELS, 40, alpha=0.001, seed=0, min_size=10)
    with pytest.raises(ValueError, match="needs a category for every record"):
        dirichlet([None, "a", "b"], 2, alpha=1.0, seed=0)


def test_by_category_gives_disjoint_whole_categories() -> None:
    parts = by_category(LABELS, 5, categories_per_client=2, seed=0)
    cats = [{LABELS[i] for i in p} for p in parts]
    assert all(len(c) == 2 for c in cats)
    assert all(not (cats[i] & cats[j]) for i in range(5) for j in range(i + 1, 5))
    # Fewer slots than categories: still disjoint, extra categories go to some clients.
    cats3 = [{LABELS[i] for i in p} for p in by_category(LABELS, 3, categories_per_client=1, seed=0)]
    assert sorted(len(c) for c in cats3) == [3, 3, 4] and len(set().union(*cats3)) == 10


def test_by_category_shares_categories_when_clients_need_more() -> None:
    parts = by_category(LABELS, 8, categories_per_client=3, seed=0)  # 24 slots over 10 categories
    cats = [{LABELS[i] for i in p} for p in parts]
    assert all(len(c) == 3 for c in cats)
    with pytest.raises(ValueError, match=r"categories_per_client must be in \[1, 10\]"):
        by_category(LABELS, 2, categories_per_client=11, seed=0)
    with pytest.raises(ValueError, match="got no records"):
        by_category(["a", "a", "b", "b", "b", "b"], 5, categories_per_client=1, seed=0)


def test_size_skew() -> None:
    equal = [len(p) for p in size_skew(100, 4, sigma=0.0, seed=0)]
    assert equal == [25, 25, 25, 25]
    skewed = [len(p) for p in size_skew(1000, 10, sigma=1.5, seed=0)]
    assert sum(skewed) == 1000 and min(skewed) >= 1
    assert max(skewed) > 4 * min(skewed)
    with pytest.raises(ValueError, match="sim.size_skew must be non-negative"):
        size_skew(10, 2, sigma=-1.0, seed=0)


def test_too_few_records_for_the_clients() -> None:
    with pytest.raises(ValueError, match="cannot give 5 clients .* from 3 records"):
        iid(3, 5, seed=0)


def test_make_partition_lists_valid_names_and_options() -> None:
    with pytest.raises(
        ValueError, match=r"'shards' is not one of \['iid', 'dirichlet', 'by_category', 'size_skew'\]"
    ):
        make_partition("shards", RECORDS, 4, seed=0)
    with pytest.raises(
        ValueError, match=r"'dirichlet' takes options \['alpha', 'min_size'\], not \['beta'\]"
    ):
        make_partition("dirichlet", RECORDS, 4, seed=0, beta=1.0)


def test_partition_table_counts_and_renders() -> None:
    parts = by_category(LABELS, 5, categories_per_client=2, seed=0)
    table = partition_table(parts, LABELS)
    assert len(table) == 5 and len(table[0]) == 10
    assert [sum(row) for row in table] == [len(p) for p in parts]
    assert [sum(col) for col in zip(*table)] == [20 + 5 * c for c in range(10)]
    console = Console(width=200, record=True)
    console.print(render_partition_table(parts, LABELS))
    text = console.export_text()
    assert "c9" in text and "425" in text
