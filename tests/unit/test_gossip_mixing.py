"""Gossip topologies, mixing weights and mixing modes: hand-computed values and properties."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtune.gossip.mixing import (
    consensus_distance,
    drop_missing,
    mix,
    mixing_error,
    mixing_matrix,
    spectral_gap,
)
from fedtune.gossip.topology import TOPOLOGIES, from_edges, make_topology, one_peer_exp
from fedtune.strategies import StrategyConfig, make_strategy
from fedtune.types import ClientReply

PREFIX = "m.l0.q_proj"
KA, KB = PREFIX + ".lora_A.weight", PREFIX + ".lora_B.weight"
R, ALPHA = 2, 4.0
SCALE = ALPHA / R


def node_states(n: int, seed: int, shared_a: bool = False) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    a0 = torch.randn(R, 6, generator=gen, dtype=torch.float64)
    return [{KA: a0.clone() if shared_a else torch.randn(R, 6, generator=gen, dtype=torch.float64),
             KB: torch.randn(5, R, generator=gen, dtype=torch.float64),
             "m.head.bias": torch.randn(3, generator=gen, dtype=torch.float64)} for _ in range(n)]


def dense(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return SCALE * state[KB] @ state[KA]


def dense_consensus(states) -> float:
    ws = [dense(s) for s in states]
    mean = sum(ws) / len(ws)
    return sum(float((w - mean).pow(2).sum()) for w in ws) / len(ws)


# ------------------------------------------------------------------ topologies


def test_degrees_of_the_fixed_topologies():
    assert {make_topology("ring", 6)(0).degree(i) for i in range(6)} == {2}
    assert {make_topology("torus", 16)(0).degree(i) for i in range(16)} == {4}  # 4 x 4 grid with wrap-around
    assert {make_topology("full", 5)(0).degree(i) for i in range(5)} == {4}
    # 16 nodes: i +- 1, 2, 4 and i + 8 (= i - 8): 7 neighbours
    assert {make_topology("exponential", 16)(0).degree(i) for i in range(16)} == {7}
    assert {make_topology("k_regular", 10, degree=3, seed=1)(0).degree(i) for i in range(10)} == {3}
    assert make_topology("torus", 7)(0) == make_topology("ring", 7)(0)  # a prime n: the 1 x n torus


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from([t for t in TOPOLOGIES if t != "one_peer_exp"]), n=st.integers(3, 24),
       seed=st.integers(0, 50))
def test_static_topologies_are_connected_and_mh_is_symmetric_doubly_stochastic(name, n, seed):
    k = 2 if name != "k_regular" else (3 if n % 2 == 0 else 2)
    graph = make_topology(name, n, seed=seed, degree=k, p=0.5)(0)
    assert graph.is_connected()
    q = mixing_matrix(graph)
    assert torch.equal(q, q.T)
    assert torch.allclose(q.sum(0), torch.ones(n, dtype=q.dtype)) and torch.allclose(q.sum(1), torch.ones(n, dtype=q.dtype))
    assert bool((q >= 0).all())
    assert spectral_gap(q) > 1e-9  # connected + positive diagonal: the mix converges


def test_random_topologies_are_deterministic_per_seed():
    for name in ("k_regular", "erdos_renyi"):
        same = [make_topology(name, 12, seed=3, degree=3, p=0.4)(0) for _ in range(2)]
        assert same[0] == same[1]
        others = {tuple(make_topology(name, 12, seed=s, degree=3, p=0.4)(0).edges()) for s in range(5)}
        assert len(others) > 1, f"{name}: five seeds gave one graph"


def test_impossible_topologies_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="n\\*k even"):
        make_topology("k_regular", 5, degree=3)
    with pytest.raises(ValueError, match="raise p"):
        make_topology("erdos_renyi", 30, p=0.01)
    with pytest.raises(ValueError, match="unknown topology 'star'"):
        make_topology("star", 4)


@pytest.mark.parametrize("n", [2, 5, 8, 13])
def test_one_peer_exp_has_one_peer_a_round_and_its_union_is_connected(n):
    rounds = math.ceil(math.log2(n))
    union = set()
    for t in range(rounds):
        g = one_peer_exp(n, t)
        assert max(g.degree(i) for i in range(n)) == 1
        union |= set(g.edges())
    assert from_edges(n, union).is_connected()
    assert one_peer_exp(n, rounds) == one_peer_exp(n, 0)  # periodic


# ------------------------------------------------------------------ weights


def test_metropolis_hastings_on_a_star_by_hand():
    q = mixing_matrix(from_edges(4, [(0, 1), (0, 2), (0, 3)]))  # centre degree 3, leaves degree 1
    expect = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.25, 0.75, 0, 0], [0.25, 0, 0.75, 0], [0.25, 0, 0, 0.75]],
                          dtype=torch.float64)
    assert torch.allclose(q, expect)
    uniform = mixing_matrix(from_edges(4, [(0, 1), (0, 2), (0, 3)]), "uniform")
    assert torch.allclose(uniform[1], torch.tensor([0.5, 0.5, 0, 0], dtype=torch.float64))
    assert torch.allclose(uniform.sum(1), torch.ones(4, dtype=torch.float64))  # rows stochastic, columns not
    assert not torch.allclose(uniform.sum(0), torch.ones(4, dtype=torch.float64))


def test_spectral_gap_by_hand():
    # ring of 4 with MH: Q = (I + P + P^-1) / 3, eigenvalues 1, 1/3, -1/3, 1/3
    assert spectral_gap(mixing_matrix(make_topology("ring", 4)(0))) == pytest.approx(2 / 3)
    assert spectral_gap(mixing_matrix(make_topology("full", 6)(0))) == pytest.approx(1.0)


def test_missing_neighbours_by_hand():
    q = mixing_matrix(make_topology("ring", 4)(0))  # 1/3 everywhere on the ring and diagonal
    out = drop_missing(q, [True, False, True, True])
    third = 1 / 3
    expect = torch.tensor([[2 * third, 0, 0, third], [0, 1, 0, 0], [0, 0, 2 * third, third],
                           [third, 0, third, third]], dtype=torch.float64)
    assert torch.allclose(out, expect)


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(["ring", "torus", "erdos_renyi", "exponential", "full"]), n=st.integers(3, 16),
       seed=st.integers(0, 1000))
def test_dropping_nodes_keeps_rows_stochastic_and_live_block_doubly_stochastic(name, n, seed):
    gen = torch.Generator().manual_seed(seed)
    live = (torch.rand(n, generator=gen) > 0.3).tolist()
    q = drop_missing(mixing_matrix(make_topology(name, n, seed=seed, p=0.5)(0)), live)
    assert torch.allclose(q.sum(1), torch.ones(n, dtype=q.dtype))
    assert torch.equal(q, q.T)
    assert torch.allclose(q.sum(0), torch.ones(n, dtype=q.dtype))
    for i, alive in enumerate(live):
        if not alive:
            assert q[i, i] == 1.0 and float(q[:, i].sum()) == 1.0  # it neither gives nor takes


# ------------------------------------------------------------------ mixing modes


def test_full_topology_with_frozen_a_equals_one_fedavg_round():
    states = node_states(4, seed=1, shared_a=True)
    q = mixing_matrix(make_topology("full", 4)(0))
    mixed = mix(states, q, "frozen_a", scale=SCALE, rank=R)
    fedavg = make_strategy("fedavg", StrategyConfig(r=R, lora_alpha=ALPHA))
    replies = [ClientReply(f"c{i}", 1, {k: v.float() for k, v in s.items()}, num_examples=10)
               for i, s in enumerate(states)]
    result = fedavg.aggregate(1, {k: v.float() for k, v in states[0].items()}, iter(replies))
    for node in mixed:
        for k in node:
            assert torch.allclose(node[k].float(), result.state[k], atol=1e-6), k
        assert torch.equal(node[KA], states[0][KA])


def test_frozen_a_refuses_nodes_whose_a_differs():
    with pytest.raises(ValueError, match="same .*lora_A"):
        mix(node_states(3, seed=0), mixing_matrix(make_topology("ring", 3)(0)), "frozen_a", scale=SCALE, rank=R)


def test_one_peer_exp_averages_exactly_in_log2_n_rounds():
    states = node_states(8, seed=2, shared_a=True)
    target = sum(s[KB] for s in states) / 8
    for t in range(3):
        states = mix(states, mixing_matrix(one_peer_exp(8, t)), "frozen_a", scale=SCALE, rank=R)
    for s in states:
        assert torch.allclose(s[KB], target, atol=1e-12)


def test_factors_mode_averages_a_and_b_separately_and_measures_the_gap():
    states = node_states(3, seed=3)
    q = mixing_matrix(make_topology("full", 3)(0))
    mixed = mix(states, q, "factors", scale=SCALE, rank=R)
    mean_a, mean_b = sum(s[KA] for s in states) / 3, sum(s[KB] for s in states) / 3
    assert torch.allclose(mixed[0][KA], mean_a) and torch.allclose(mixed[0][KB], mean_b)
    target = sum(dense(s) for s in states) / 3
    by_hand = float((SCALE * mean_b @ mean_a - target).norm() / target.norm())
    assert mixing_error(states, mixed, q, scale=SCALE) == pytest.approx(by_hand, rel=1e-9)
    assert by_hand > 0.1  # random factors: averaging them is far from averaging the products


def test_product_mode_is_exact_when_the_average_fits_the_rank():
    # shared A: sum_j Q_ij B_j A has rank <= r, so the best rank-r factors reproduce it exactly
    states = node_states(5, seed=4, shared_a=True)
    q = mixing_matrix(make_topology("ring", 5)(0))
    mixed = mix(states, q, "product", scale=SCALE, rank=R)
    for i in range(5):
        target = sum(float(q[i, j]) * dense(states[j]) for j in range(5))
        assert torch.allclose(dense(mixed[i]), target, atol=1e-10)
        assert torch.allclose(mixed[i]["m.head.bias"], sum(float(q[i, j]) * states[j]["m.head.bias"] for j in range(5)))
    assert mixing_error(states, mixed, q, scale=SCALE) < 1e-7  # Gram cancellation: ~1e-8 (lowrank.relative_error)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(3, 7))
def test_product_mode_is_never_further_from_the_product_average_than_factors(seed, n):
    states = node_states(n, seed=seed)
    q = mixing_matrix(make_topology("ring", n)(0))
    by_factors = mix(states, q, "factors", scale=SCALE, rank=R)
    by_product = mix(states, q, "product", scale=SCALE, rank=R)
    for i in range(n):
        target = sum(float(q[i, j]) * dense(states[j]) for j in range(n))
        # Eckart-Young: the product mode keeps the best rank-r approximation; factors give some rank-r matrix
        assert float((dense(by_product[i]) - target).norm()) <= float((dense(by_factors[i]) - target).norm()) + 1e-9


def test_a_node_left_alone_keeps_its_adapter_in_every_mode():
    states = node_states(4, seed=5)
    q = drop_missing(mixing_matrix(make_topology("ring", 4)(0)), [True, False, True, True])
    for mode in ("factors", "product"):
        mixed = mix(states, q, mode, scale=SCALE, rank=R)
        assert all(torch.equal(mixed[1][k], states[1][k]) for k in states[1])


# ------------------------------------------------------------------ consensus


def test_consensus_distance_by_hand_and_against_dense():
    states = node_states(2, seed=6)
    by_hand = float((dense(states[0]) - dense(states[1])).pow(2).sum()) / 4  # (|d1-m|^2 + |d2-m|^2)/2
    assert consensus_distance(states, scale=SCALE) == pytest.approx(by_hand, rel=1e-10)
    states = node_states(6, seed=7)
    assert consensus_distance(states, scale=SCALE) == pytest.approx(dense_consensus(states), rel=1e-10)
    assert consensus_distance([states[0]] * 3, scale=SCALE) == pytest.approx(0.0, abs=1e-12)


def test_consensus_distance_reads_a_frozen_a_from_the_shared_tensors():
    states = node_states(3, seed=8, shared_a=True)
    frozen = {KA: states[0][KA]}
    only_b = [{k: v for k, v in s.items() if k != KA} for s in states]
    assert consensus_distance(only_b, scale=SCALE, frozen=frozen) == pytest.approx(dense_consensus(states), rel=1e-10)


@pytest.mark.parametrize("topology", ["ring", "torus", "exponential"])
def test_consensus_distance_falls_geometrically_without_training(topology):
    n = 9
    states = node_states(n, seed=9, shared_a=True)
    q = mixing_matrix(make_topology(topology, n)(0))
    rate = (1 - spectral_gap(q)) ** 2
    assert rate < 1
    cd = [consensus_distance(states, scale=SCALE)]
    for _ in range(12):
        states = mix(states, q, "frozen_a", scale=SCALE, rank=R)
        cd.append(consensus_distance(states, scale=SCALE))
    floor = 1e-12 * cd[0]  # the Gram form cancels sum ||dW_i||^2 - n ||mean||^2: ~1e-16 of the norms
    for before, after in itertools.pairwise(cd):
        assert after <= rate * before * (1 + 1e-9) + floor  # the linear mix contracts by (1 - gap)^2 at least
    assert cd[-1] <= max(rate ** 12 * cd[0], floor)


@pytest.mark.parametrize("mode", ["factors", "product"])
def test_nonlinear_modes_reach_consensus_on_a_ring(mode):
    n = 6
    states = node_states(n, seed=10)
    q = mixing_matrix(make_topology("ring", n)(0))
    start = consensus_distance(states, scale=SCALE)
    for _ in range(40):
        states = mix(states, q, mode, scale=SCALE, rank=R)
    assert consensus_distance(states, scale=SCALE) < 1e-6 * start
