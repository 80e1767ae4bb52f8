"""Rank pruning: the energy budget against hand-computed ranks and a property test, factors re-split at the
pruned rank (the best approximation, LoRA scale folded), heterogeneous client ranks aggregated by svd, the
server's svd_energy with its trimmed downlink, and shapes the server refuses."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtune.compression.rank import RankPruneTransform, factor_fits, pad, prune_pair, trim, used_rank
from fedtune.config import ConfigError, load_config
from fedtune.strategies import StrategyConfig, lora_scale, make_strategy
from fedtune.strategies.lowrank import energy_rank
from fedtune.types import ClientReply, Instructions

A, B = "m.q.lora_A.weight", "m.q.lora_B.weight"


@pytest.mark.parametrize(("energy", "want"), [(0.5, 1), (9 / 14, 1), (0.65, 2), (0.9, 2), (13 / 14, 2),
                                              (0.95, 3), (1.0, 3)])
def test_energy_rank_by_hand(energy: float, want: int) -> None:
    # s = 3, 2, 1: energies 9, 4, 1 of 14; prefixes 9/14 = 0.643, 13/14 = 0.929, 1
    assert energy_rank(torch.tensor([3.0, 2.0, 1.0]), energy, max_rank=8) == want


def test_energy_rank_bounds() -> None:
    s = torch.tensor([3.0, 2.0, 1.0])
    assert energy_rank(s, 1.0, max_rank=2) == 2  # never above the rank asked for
    assert energy_rank(s, 0.1, max_rank=8, min_rank=2) == 2  # never below min_rank
    assert energy_rank(torch.zeros(4), 0.9, max_rank=4) == 1  # a zero layer keeps one (zero) component
    assert energy_rank(torch.tensor([1.0, 0.0, 0.0]), 1.0, max_rank=3) == 1  # zero components are not energy


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0, 100, allow_nan=False), min_size=1, max_size=24),
       st.floats(0.01, 1.0), st.integers(1, 24))
def test_energy_rank_is_the_fewest_components_that_reach_the_budget(values: list[float], energy: float,
                                                                      max_rank: int) -> None:
    s = torch.tensor(sorted(values, reverse=True), dtype=torch.float64)
    r = energy_rank(s, energy, max_rank)
    total = float((s**2).sum())
    assert 1 <= r <= min(max_rank, len(values))
    if total > 0 and r < min(max_rank, len(values)):
        assert float((s[:r] ** 2).sum()) >= energy * total * (1 - 1e-9)
    if total > 0 and r > 1:
        assert float((s[: r - 1] ** 2).sum()) < energy * total * (1 + 1e-9)


def _factors(singular: list[float], d_out: int = 12, d_in: int = 10, seed: int = 0):  # type: ignore[no-untyped-def]
    """B (d_out x r), A (r x d_in) whose product has exactly these singular values."""
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(d_out, len(singular), generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d_in, len(singular), generator=gen, dtype=torch.float64))
    return (u * torch.tensor(singular, dtype=torch.float64)).float(), v.T.contiguous().float()


def test_pruned_factors_are_the_best_approximation_at_the_energy_rank() -> None:
    scale = functools.partial(lora_scale, StrategyConfig(lora_alpha=16.0))
    b, a = _factors([4.0, 2.0, 0.1, 0.05, 0.01, 0.0])  # rank 6, LoRA scale 16/6
    nb, na = prune_pair(b, a, 0.99, scale)
    assert nb.shape == (12, 2) and na.shape == (2, 10)  # (16 + 4) / 20.0126 = 0.9994 >= 0.99 at r=2
    full = scale(6) * (b.double() @ a.double())
    u, s, vh = torch.linalg.svd(full)
    best = (u[:, :2] * s[:2]) @ vh[:2]
    assert torch.allclose(scale(2) * (nb.double() @ na.double()), best, atol=1e-5)
    assert torch.allclose(nb.norm(), na.norm(), rtol=1e-4)  # singular values split evenly between B and A


def test_heterogeneous_ranks_prune_and_svd_aggregates_them() -> None:
    cfg = load_config(None, ["strategy.name=svd", "client.pipeline=[rank_prune]", "compress.energy=0.9",
                             "adapter.r=4", "adapter.alpha=8"])
    transform = RankPruneTransform(cfg)
    scfg = StrategyConfig(r=4, lora_alpha=8.0, client_ranks=[4, 3])
    scale = functools.partial(lora_scale, scfg)
    glob = {A: torch.zeros(4, 10), B: torch.zeros(12, 4)}
    replies, products = [], []
    for k, spectrum in enumerate(([3.0, 1.0, 0.1, 0.1], [2.0, 0.2, 0.1])):  # ranks 4 and 3
        b, a = _factors(spectrum, seed=k)
        ins = Instructions(1, f"c{k}", glob, rank=len(spectrum))
        reply, kept = transform.apply(ClientReply(f"c{k}", 1, {A: a, B: b}, num_examples=1), ins, {})
        assert kept == {}
        assert reply.state is not None
        ra = reply.state[A].shape[0]
        assert ra == (2 if k == 0 else 1) and reply.state[B].shape == (12, ra)  # 10/10.02 >= 0.9; 4/4.05 >= 0.9
        replies.append(reply)
        products.append(scale(ra) * reply.state[B].double() @ reply.state[A].double())
    strategy = make_strategy("svd", scfg)
    result = strategy.aggregate(1, glob, replies)
    assert result.clients_ok == ["c0", "c1"] and not result.failures
    got = scale(4) * result.state[B].double() @ result.state[A].double()
    mean = (products[0] + products[1]) / 2  # rank <= 3 <= 4: the svd strategy keeps it exactly
    assert torch.allclose(got, mean, atol=1e-5)


def test_server_svd_energy_zeroes_the_tail_and_the_downlink_is_trimmed_and_padded_back() -> None:
    scfg = StrategyConfig(r=4, lora_alpha=4.0, svd_energy=0.9)
    glob = {A: torch.zeros(4, 10), B: torch.zeros(12, 4)}
    b, a = _factors([3.0, 1.0, 0.1, 0.1])
    result = make_strategy("svd", scfg).aggregate(1, glob, [ClientReply("c0", 1, {A: a, B: b}, 1)])
    assert result.metrics["svd_rank_mean"] == 2
    assert used_rank(result.state[B], result.state[A]) == 2
    assert float(result.state[A][2:].abs().sum()) == 0 and float(result.state[B][:, 2:].abs().sum()) == 0
    sent = trim(result.state)
    assert sent[A].shape == (2, 10) and sent[B].shape == (12, 2)
    back = pad(sent, 4)
    assert all(torch.equal(back[k], result.state[k]) for k in (A, B))
    with pytest.raises(ValueError, match="rank 4"):
        pad(result.state, 3)


def test_the_server_accepts_factors_only_at_a_rank_up_to_max_rank() -> None:
    assert factor_fits(A, (2, 10), (4, 10), 4) and factor_fits(B, (12, 3), (12, 4), 4)
    assert not factor_fits(A, (5, 10), (4, 10), 4)  # above max_rank
    assert not factor_fits(A, (0, 10), (4, 10), 4)  # rank 0
    assert not factor_fits(A, (2, 11), (4, 10), 4)  # another d_in
    assert not factor_fits(B, (13, 2), (12, 4), 4)
    assert not factor_fits("m.bias", (2, 10), (4, 10), 4)  # not a LoRA factor


@pytest.mark.parametrize(("overrides", "why"), [
    (["client.pipeline=[rank_prune]"], "aggregates factors of any rank"),
    (["client.pipeline=[rank_prune, compress]", "strategy.name=svd", "compress.error_feedback=false"], "choose one"),
    (["client.pipeline=[rank_prune]", "strategy.name=svd", "compress.energy=0"], "compress.energy"),
    (["strategy.name=fedavg", "strategy.svd_energy=0.9"], "truncating"),
    (["strategy.name=svd", "strategy.svd_energy=0.9", "compress.downlink=true"], "trimmed"),
])
def test_config_refuses_rank_pruning_where_it_cannot_work(overrides: list[str], why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        load_config(None, overrides)
