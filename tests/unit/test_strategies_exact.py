"""LoRA aggregation math: fedavg's real error, and the exact strategies (ffa, flora, fedex, svd)."""

from __future__ import annotations

import random

import pytest
import torch

from fedtune.strategies import StrategyConfig, dense_delta, lora_scale, lowrank, make_strategy
from fedtune.types import ClientReply, LowRankUpdate

LAYERS = {"m.l0.q_proj": (24, 20), "m.l0.v_proj": (12, 20)}  # prefix: (d_out, d_in)


def lora_state(rank: int, gen: torch.Generator, zero_b: bool = False) -> dict[str, torch.Tensor]:
    out = {}
    for prefix, (d_out, d_in) in LAYERS.items():
        out[prefix + ".lora_A.weight"] = torch.randn(rank, d_in, generator=gen)
        b = torch.zeros(d_out, rank) if zero_b else torch.randn(d_out, rank, generator=gen)
        out[prefix + ".lora_B.weight"] = b
    return out


def replies(states: list[dict[str, torch.Tensor]], weights: list[int]) -> list[ClientReply]:
    return [ClientReply(f"c{i}", 1, s, num_examples=n) for i, (s, n) in enumerate(zip(states, weights, strict=True))]


def dense(state: dict[str, torch.Tensor], prefix: str, cfg: StrategyConfig) -> torch.Tensor:
    a, b = state[prefix + ".lora_A.weight"].double(), state[prefix + ".lora_B.weight"].double()
    return lora_scale(cfg, a.shape[0]) * b @ a


def exact_average(states, weights, prefix, cfg) -> torch.Tensor:
    total = sum(weights)
    return sum(n / total * dense(s, prefix, cfg) for s, n in zip(states, weights, strict=True))


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x.double() - y.double()).norm() / y.double().norm())


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


def test_fedavg_hand_computed_one_by_one_factors() -> None:
    cfg = StrategyConfig(r=1, lora_alpha=1.0)
    g = {"x.lora_A.weight": torch.zeros(1, 1), "x.lora_B.weight": torch.zeros(1, 1)}
    c1 = {"x.lora_A.weight": torch.tensor([[1.0]]), "x.lora_B.weight": torch.tensor([[2.0]])}
    c2 = {"x.lora_A.weight": torch.tensor([[3.0]]), "x.lora_B.weight": torch.tensor([[4.0]])}
    res = make_strategy("fedavg", cfg).aggregate(1, g, replies([c1, c2], [1, 3]))
    # p = (1/4, 3/4): A_bar = 2.5, B_bar = 3.5; exact sum_k p_k B_k A_k = 0.5 + 9 = 9.5, fedavg gives 8.75.
    assert res.state["x.lora_A.weight"].item() == pytest.approx(2.5)
    assert res.state["x.lora_B.weight"].item() == pytest.approx(3.5)
    assert res.metrics["agg_error"] == pytest.approx(0.75 / 9.5, rel=1e-6)
    assert res.agg_error_layers == {"x": pytest.approx(0.75 / 9.5, rel=1e-6)}


def test_fedavg_agg_error_matches_dense_computation(gen) -> None:
    cfg = StrategyConfig(r=4, lora_alpha=8.0)
    states, weights = [lora_state(4, gen) for _ in range(5)], [3, 1, 4, 1, 5]
    res = make_strategy("fedavg", cfg).aggregate(1, lora_state(4, gen), replies(states, weights))
    for prefix in LAYERS:
        expected = rel(dense(res.state, prefix, cfg), exact_average(states, weights, prefix, cfg))
        assert res.agg_error_layers[prefix] == pytest.approx(expected, rel=1e-5)
        assert expected > 0.1  # fedavg really is inexact here
    assert res.metrics["agg_error"] == pytest.approx(sum(res.agg_error_layers.values()) / len(LAYERS))


def test_ffa_averages_b_against_the_shared_a_exactly(gen) -> None:
    cfg = StrategyConfig(r=4)
    g = lora_state(4, gen, zero_b=True)
    strategy = make_strategy("ffa", cfg)
    ins = strategy.configure(1, ["c0", "c1", "c2"], g, random.Random(0))
    assert all(set(i.state) == {k for k in g if k.endswith("lora_B.weight")} for i in ins.values())
    states = [{**g, **{k: torch.randn(v.shape, generator=gen) for k, v in g.items() if "lora_B" in k}} for _ in range(3)]
    sent = [{k: v for k, v in s.items() if "lora_B" in k} for s in states]  # clients send only B
    res = strategy.aggregate(1, g, replies(sent, [2, 5, 1]))
    for prefix in LAYERS:
        assert torch.equal(res.state[prefix + ".lora_A.weight"], g[prefix + ".lora_A.weight"])
        assert rel(dense(res.state, prefix, cfg), exact_average(states, [2, 5, 1], prefix, cfg)) < 1e-5
    assert res.metrics["agg_error"] < 1e-5


def test_flora_stacks_heterogeneous_ranks_exactly_and_resets(gen) -> None:
    cfg = StrategyConfig(r=16, lora_alpha=32.0, client_ranks=[4, 8, 16])
    g = lora_state(16, gen, zero_b=True)
    strategy = make_strategy("flora", cfg)
    ins = strategy.configure(1, ["c0", "c1", "c2"], g, random.Random(0))
    assert [ins[c].rank for c in ("c0", "c1", "c2")] == [4, 8, 16]
    a0 = ins["c0"].state["m.l0.q_proj.lora_A.weight"]
    assert torch.equal(a0, g["m.l0.q_proj.lora_A.weight"][:4])  # a fresh adapter: A rows as they are
    states, weights = [lora_state(r, gen) for r in (4, 8, 16)], [1, 2, 3]
    res = strategy.aggregate(1, g, replies(states, weights))
    assert res.reset_adapter and res.base_update is not None
    for prefix in LAYERS:
        upd = res.base_update[prefix]
        assert upd.B.shape[1] == 4 + 8 + 16
        assert rel(dense_delta(upd).double(), exact_average(states, weights, prefix, cfg)) < 1e-5
        assert not res.state[prefix + ".lora_B.weight"].any()  # fresh adapter: B = 0 ...
        assert torch.equal(res.state[prefix + ".lora_A.weight"], g[prefix + ".lora_A.weight"])  # ... A kept
    assert res.metrics["agg_error"] < 1e-5


def test_flora_sends_every_pending_base_update_to_a_client_that_missed_rounds(gen) -> None:
    cfg = StrategyConfig(r=2, clients_per_round=1)
    strategy = make_strategy("flora", cfg)
    g = lora_state(2, gen, zero_b=True)
    updates = []
    for rnd in (1, 2):
        res = strategy.aggregate(rnd, g, replies([lora_state(2, gen)], [1]))
        updates.append(res.base_update)
    ins = strategy.configure(3, ["late"], g, random.Random(0))["late"]
    assert ins.base_update is not None
    for prefix in LAYERS:
        expected = sum(dense_delta(u[prefix]) for u in updates)
        assert rel(dense_delta(ins.base_update[prefix]), expected) < 1e-6
    assert strategy.configure(4, ["late"], g, random.Random(0))["late"].base_update is None


def test_fedex_adapter_plus_residual_is_exact(gen) -> None:
    cfg = StrategyConfig(r=4, lora_alpha=8.0)
    states, weights = [lora_state(4, gen) for _ in range(4)], [5, 1, 1, 2]
    res = make_strategy("fedex", cfg).aggregate(1, lora_state(4, gen), replies(states, weights))
    assert not res.reset_adapter and res.base_update is not None
    for prefix in LAYERS:
        a_bar = sum(n * s[prefix + ".lora_A.weight"] for s, n in zip(states, weights, strict=True)) / 9
        assert torch.allclose(res.state[prefix + ".lora_A.weight"], a_bar, atol=1e-6)
        merged = dense(res.state, prefix, cfg) + dense_delta(res.base_update[prefix]).double()
        assert rel(merged, exact_average(states, weights, prefix, cfg)) < 1e-5
    assert res.metrics["agg_error"] < 1e-5


def test_fedex_refuses_a_quantized_base() -> None:
    with pytest.raises(ValueError, match="quantized"):
        make_strategy("fedex", StrategyConfig(quantized_base=True))


def test_svd_at_full_rank_is_exact(gen) -> None:
    cfg = StrategyConfig(r=4, svd_rank=12, lora_alpha=8.0)
    states, weights = [lora_state(4, gen) for _ in range(3)], [1, 1, 2]
    res = make_strategy("svd", cfg).aggregate(1, lora_state(12, gen), replies(states, weights))
    for prefix in LAYERS:
        assert rel(dense(res.state, prefix, cfg), exact_average(states, weights, prefix, cfg)) < 1e-5
    assert res.metrics["agg_error"] < 1e-5


def test_truncated_svd_is_the_eckart_young_best_approximation(gen) -> None:
    cfg = StrategyConfig(r=3, lora_alpha=6.0)
    states, weights = [lora_state(3, gen) for _ in range(4)], [2, 1, 1, 3]
    res = make_strategy("svd", cfg).aggregate(1, lora_state(3, gen), replies(states, weights))
    for prefix in LAYERS:
        avg = exact_average(states, weights, prefix, cfg)
        u, s, vh = torch.linalg.svd(avg, full_matrices=False)
        best = (u[:, :3] * s[:3]) @ vh[:3]
        got = dense(res.state, prefix, cfg)
        assert rel(got, best) < 1e-5
        a, b = res.state[prefix + ".lora_A.weight"], res.state[prefix + ".lora_B.weight"]
        assert torch.allclose(a.norm(dim=1), b.norm(dim=0), rtol=1e-4)  # singular values split symmetrically
        assert res.agg_error_layers[prefix] == pytest.approx(float((s[3:].square().sum() / s.square().sum()).sqrt()), rel=1e-4)


def test_svd_heterogeneous_clients_get_their_top_components(gen) -> None:
    cfg = StrategyConfig(r=16, lora_alpha=16.0, client_ranks=[4, 8, 16])
    strategy = make_strategy("svd", cfg)
    g = lora_state(16, gen)
    res = strategy.aggregate(1, g, replies([lora_state(r, gen) for r in (4, 8, 16)], [1, 1, 1]))
    ins = strategy.configure(2, ["a", "b", "c"], res.state, random.Random(0))
    for prefix in LAYERS:
        u, s, vh = torch.linalg.svd(dense(res.state, prefix, cfg), full_matrices=False)
        for cid, r in zip("abc", (4, 8, 16), strict=True):
            assert ins[cid].rank == r
            got = dense(ins[cid].state, prefix, cfg)  # applied with the client's own scale alpha/r_k
            assert rel(got, (u[:, :r] * s[:r]) @ vh[:r]) < 1e-4


@pytest.mark.parametrize("clients", [3, 8])  # stacked rank 6: QR of the factors; 16: the dense path
def test_svd_error_feedback_keeps_what_truncation_cut(gen, clients: int) -> None:
    cfg = StrategyConfig(r=2, lora_alpha=2.0, error_feedback=True)
    strategy = make_strategy("svd", cfg)
    states, weights = [lora_state(2, gen) for _ in range(clients)], [1] * clients
    res = strategy.aggregate(1, lora_state(2, gen), replies(states, weights))
    for prefix in LAYERS:
        kept = dense(res.state, prefix, cfg) + dense_delta(LowRankUpdate(*strategy.residual[prefix])).double()
        assert rel(kept, exact_average(states, weights, prefix, cfg)) < 1e-5
    # Next round the cut part is added to the new average before truncating again; nothing is lost.
    first = {p: dense_delta(LowRankUpdate(*strategy.residual[p])).double() for p in LAYERS}
    states2 = [lora_state(2, gen) for _ in range(2)]
    res2 = strategy.aggregate(2, res.state, replies(states2, [1, 1]))
    for prefix in LAYERS:
        kept = dense(res2.state, prefix, cfg) + dense_delta(LowRankUpdate(*strategy.residual[prefix])).double()
        assert rel(kept, exact_average(states2, [1, 1], prefix, cfg) + first[prefix]) < 1e-5


@pytest.mark.parametrize(("d_out", "d_in", "k"), [(30, 20, 6), (30, 20, 16), (20, 30, 6), (20, 30, 16), (9, 40, 40)])
def test_truncated_svd_is_exact_on_both_paths(gen, d_out: int, d_in: int, k: int) -> None:
    """QR + core SVD while the factors are smaller than the layer, the dense Gram path after: same answer."""
    b, a = torch.randn(d_out, k, generator=gen), torch.randn(k, d_in, generator=gen)
    dense = (b @ a).double()
    u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    got = lowrank.truncated_svd(b, a, 4, keep_rest=True)
    assert rel((got.left * got.s[:4]) @ got.right, (u[:, :4] * s[:4]) @ vh[:4]) < 1e-5
    assert torch.allclose(got.left.T @ got.left, torch.eye(4), atol=1e-5)
    assert torch.allclose(got.right @ got.right.T, torch.eye(4), atol=1e-5)
    assert got.truncation_error == pytest.approx(float((s[4:].square().sum() / s.square().sum()).sqrt()), rel=1e-5)
    assert got.rest is not None
    assert rel((got.left * got.s[:4]) @ got.right + got.rest[0] @ got.rest[1], dense) < 1e-5


def test_dense_svd_of_a_rank_deficient_matrix_stays_finite(gen) -> None:
    low = torch.randn(12, 2, generator=gen) @ torch.randn(2, 7, generator=gen)  # rank 2, asked for 5
    got = lowrank.dense_svd(low, 5)
    assert torch.isfinite(got.left).all() and torch.isfinite(got.right).all()
    assert rel((got.left * got.s[:5]) @ got.right, low) < 1e-5
    assert got.truncation_error < 1e-5
    zero = lowrank.dense_svd(torch.zeros(6, 4), 3)
    assert torch.equal((zero.left * zero.s[:3]) @ zero.right, torch.zeros(6, 4)) and zero.truncation_error == 0.0


def test_lowrank_norms_match_dense(gen) -> None:
    terms = [(torch.randn(9, r, generator=gen), torch.randn(r, 7, generator=gen)) for r in (1, 3, 5)]
    total = sum(b @ a for b, a in terms)
    assert lowrank.frobenius_sq(terms) == pytest.approx(float(total.double().square().sum()), rel=1e-5)
    agg = [(torch.randn(9, 2, generator=gen), torch.randn(2, 7, generator=gen))]
    expected = rel(agg[0][0] @ agg[0][1], total)
    assert lowrank.relative_error(agg, terms) == pytest.approx(expected, rel=1e-5)
    assert lowrank.relative_error(terms, terms) < 1e-7


def test_dense_delta_orientation() -> None:
    upd = LowRankUpdate(B=torch.ones(5, 2), A=torch.ones(2, 3))
    assert dense_delta(upd).shape == (5, 3)  # nn.Linear: out x in
    assert dense_delta(upd, fan_in_fan_out=True).shape == (3, 5)  # GPT-2 Conv1D: in x out


def test_randomized_svd_matches_exact_on_a_decaying_spectrum(gen) -> None:
    u, _ = torch.linalg.qr(torch.randn(40, 40, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(30, 30, generator=gen))
    s = 0.5 ** torch.arange(30, dtype=torch.float32)
    b, a = u[:, :30] * s, v.T  # b @ a has singular values s
    exact = lowrank.truncated_svd(b, a, 4)
    fast = lowrank.randomized_svd(b, a, 4, oversample=8, power_iters=3)
    assert not fast.complete
    with pytest.raises(ValueError, match="randomized"):
        _ = fast.truncation_error
    dense_exact = (exact.left * exact.s[:4]) @ exact.right
    dense_fast = (fast.left * fast.s[:4]) @ fast.right
    assert rel(dense_fast, dense_exact) < 1e-4


def test_svd_strategy_randomized_reports_its_real_error(gen) -> None:
    cfg = StrategyConfig(r=3, lora_alpha=6.0, svd_method="randomized")
    states, weights = [lora_state(3, gen) for _ in range(4)], [2, 1, 1, 3]
    res = make_strategy("svd", cfg).aggregate(1, lora_state(3, gen), replies(states, weights))
    for prefix in LAYERS:
        avg = exact_average(states, weights, prefix, cfg)
        got = dense(res.state, prefix, cfg)
        assert res.agg_error_layers[prefix] == pytest.approx(rel(got, avg), rel=1e-3)
        _, s, _ = torch.linalg.svd(avg)
        best = float((s[3:].square().sum() / s.square().sum()).sqrt())
        assert best - 1e-6 <= res.agg_error_layers[prefix] < best * 1.05
