"""Properties every aggregation must have: order does not matter, identical clients change nothing,
only relative weights count."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtune.strategies import StrategyConfig, dense_delta, lora_scale, make_strategy
from fedtune.types import ClientReply

PREFIX = "m.l0.q_proj"
KA, KB = PREFIX + ".lora_A.weight", PREFIX + ".lora_B.weight"
NAMES = ["fedavg", "ffa", "flora", "svd", "fedex", "median", "trimmed_mean", "multikrum", "fedadam"]
CFG = StrategyConfig(r=3, lora_alpha=6.0, trim_fraction=0.2, krum_f=1)


def client_states(seed: int, k: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [{KA: torch.randn(3, 7, generator=gen), KB: torch.randn(5, 3, generator=gen)} for _ in range(k)]


def effective(name: str, res, cfg: StrategyConfig = CFG) -> torch.Tensor:
    """The dense update the round leaves in the model: adapter plus any base update."""
    a, b = res.state[KA].double(), res.state[KB].double()
    total = lora_scale(cfg, a.shape[0]) * b @ a
    if res.base_update:
        total = total + dense_delta(res.base_update[PREFIX]).double()
    return total


def run(name: str, states, weights, global_state):
    strategy = make_strategy(name, CFG)
    replies = [ClientReply(f"c{i}", 1, s, num_examples=n) for i, (s, n) in enumerate(zip(states, weights, strict=True))]
    return strategy.aggregate(1, global_state, iter(replies))


def close(x: torch.Tensor, y: torch.Tensor, tol: float = 1e-4) -> bool:
    return float((x - y).norm()) <= tol * max(1.0, float(y.norm()))


@settings(max_examples=15, deadline=None)
@given(
    name=st.sampled_from(NAMES),
    seed=st.integers(0, 10_000),
    weights=st.lists(st.integers(1, 50), min_size=3, max_size=6),
    perm_seed=st.integers(0, 10_000),
)
def test_permutation_invariance(name: str, seed: int, weights: list[int], perm_seed: int) -> None:
    states = client_states(seed, len(weights))
    g = client_states(seed + 1, 1)[0]
    if name == "ffa":  # a shared frozen A
        states = [{KA: g[KA], KB: s[KB]} for s in states]
    perm = torch.randperm(len(weights), generator=torch.Generator().manual_seed(perm_seed)).tolist()
    r1 = run(name, states, weights, g)
    r2 = run(name, [states[i] for i in perm], [weights[i] for i in perm], g)
    assert close(effective(name, r1), effective(name, r2))
    assert abs(r1.metrics["agg_error"] - r2.metrics["agg_error"]) < 1e-4


@settings(max_examples=15, deadline=None)
@given(name=st.sampled_from(NAMES), seed=st.integers(0, 10_000), k=st.integers(1, 5), n=st.integers(1, 100))
def test_identical_clients_give_back_their_update(name: str, seed: int, k: int, n: int) -> None:
    state = client_states(seed, 1)[0]
    g = client_states(seed + 1, 1)[0]
    if name == "ffa":
        state = {KA: g[KA], KB: state[KB]}
    res = run(name, [state] * k, [n] * k, g)
    target = lora_scale(CFG, 3) * state[KB].double() @ state[KA].double()
    if name == "fedadam":  # a server optimizer moves towards the clients, it does not jump there
        assert float((effective(name, res) - target).norm()) < float((effective(name, run("fedavg", [g], [1], g)) - target).norm()) + 1e-9
        return
    assert close(effective(name, res), target)
    assert res.metrics["agg_error"] < 1e-4
    if name in ("fedavg", "median", "trimmed_mean", "multikrum", "fedex"):
        assert torch.allclose(res.state[KA], state[KA], atol=1e-5) and torch.allclose(res.state[KB], state[KB], atol=1e-5)


@settings(max_examples=15, deadline=None)
@given(
    name=st.sampled_from(["fedavg", "ffa", "flora", "svd", "fedex", "multikrum"]),
    seed=st.integers(0, 10_000),
    weights=st.lists(st.integers(1, 20), min_size=2, max_size=5),
    factor=st.integers(2, 1000),
)
def test_only_relative_weights_matter(name: str, seed: int, weights: list[int], factor: int) -> None:
    states = client_states(seed, len(weights))
    g = client_states(seed + 1, 1)[0]
    if name == "ffa":
        states = [{KA: g[KA], KB: s[KB]} for s in states]
    r1 = run(name, states, weights, g)
    r2 = run(name, states, [w * factor for w in weights], g)
    assert close(effective(name, r1), effective(name, r2))
