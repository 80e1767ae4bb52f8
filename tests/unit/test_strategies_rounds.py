"""Strategy rounds: failures as data, masks, robust aggregation, server optimizers, config and registry."""

from __future__ import annotations

import gc
import random
import weakref

import numpy as np
import pytest
import torch

from fedtune.strategies import STRATEGY_NAMES, StrategyConfig, make_strategy, robust
from fedtune.types import ClientReply, failed_reply

KEY_A, KEY_B = "m.l0.q_proj.lora_A.weight", "m.l0.q_proj.lora_B.weight"


def vec_state(values: list[float]) -> dict[str, torch.Tensor]:
    """A one-layer adapter whose values are given (A: 1 x n, B: n x 1)."""
    t = torch.tensor(values)
    return {KEY_A: t[None, :].clone(), KEY_B: t[:, None].clone()}


def reply(cid: str, state, n: int = 1, mask=None) -> ClientReply:
    return ClientReply(cid, 1, state, num_examples=n, mask=mask)


def test_failed_and_invalid_replies_are_recorded_and_min_replies_blocks_the_round() -> None:
    g = vec_state([0.0, 0.0])
    cfg = StrategyConfig(r=1, min_replies=2)
    replies = [
        reply("good", vec_state([1.0, 2.0])),
        failed_reply("dead", 1, "timeout after 30 s"),
        reply("nan", vec_state([float("nan"), 1.0])),
        reply("shape", {KEY_A: torch.zeros(1, 3), KEY_B: torch.zeros(2, 1)}),
        reply("extra", {**vec_state([1.0, 1.0]), "other.weight": torch.zeros(1)}),
        reply("missing", {KEY_A: torch.zeros(1, 2)}),
        reply("empty", vec_state([1.0, 1.0]), n=0),
    ]
    res = make_strategy("fedavg", cfg).aggregate(1, g, iter(replies))
    assert not res.applied
    assert res.state is g
    assert res.clients_ok == ["good"]
    assert res.failures["dead"] == "timeout after 30 s"
    assert "NaN" in res.failures["nan"]
    assert "shape" in res.failures["shape"] and "unexpected" in res.failures["extra"]
    assert "missing" in res.failures["missing"] and "num_examples" in res.failures["empty"]
    assert sorted(res.clients_failed) == sorted(["dead", "nan", "shape", "extra", "missing", "empty"])
    ok = make_strategy("fedavg", StrategyConfig(r=1)).aggregate(1, g, iter(replies))
    assert ok.applied and torch.allclose(ok.state[KEY_A], torch.tensor([[1.0, 2.0]]))


def test_replies_in_another_key_order_or_dtype_are_averaged_like_the_others() -> None:
    """The per-round fast check expects the global key order (others take the general path); bf16 is widened."""
    g = vec_state([0.0, 0.0])
    swapped = {KEY_B: torch.tensor([[3.0], [5.0]]), KEY_A: torch.tensor([[3.0, 5.0]])}
    half = {k: v.bfloat16() for k, v in vec_state([2.0, 4.0]).items()}
    res = make_strategy("fedavg", StrategyConfig(r=1)).aggregate(1, g, [reply("a", swapped), reply("b", half, 3)])
    assert res.clients_ok == ["a", "b"]
    assert res.state[KEY_A].dtype == torch.float32
    assert res.state[KEY_A].tolist() == [[2.25, 4.25]] and res.state[KEY_B].tolist() == [[2.25], [4.25]]
    bad = {KEY_B: torch.zeros(2, 1), KEY_A: torch.tensor([[1.0, float("inf")]])}
    res = make_strategy("fedavg", StrategyConfig(r=1)).aggregate(1, g, [reply("bad", bad), reply("a", swapped)])
    assert res.failures == {"bad": f"non-finite values (NaN or Inf) in {KEY_A}"}


def test_fedavg_consumes_replies_one_at_a_time() -> None:
    """Streaming: a reply can be freed once the next is requested (server memory O(one adapter))."""
    g = vec_state([0.0] * 4)
    refs: list[weakref.ref] = []
    alive_when_yielding: list[int] = []

    def gen():
        for i in range(6):
            gc.collect()
            alive_when_yielding.append(sum(r() is not None for r in refs))
            state = vec_state([float(i)] * 4)
            refs.append(weakref.ref(state[KEY_A]))
            yield reply(f"c{i}", state)

    res = make_strategy("fedavg", StrategyConfig(r=1, compute_error=False)).aggregate(1, g, gen())
    assert max(alive_when_yielding) <= 1
    assert torch.allclose(res.state[KEY_A], torch.full((1, 4), 2.5))
    assert not make_strategy("fedavg").needs_all_replies and make_strategy("median").needs_all_replies


def test_masked_aggregation_divides_by_the_weight_of_the_senders() -> None:
    g = {KEY_A: torch.tensor([[9.0, 9.0, 9.0]]), KEY_B: torch.zeros(3, 1)}
    s1 = {KEY_A: torch.tensor([[1.0, 2.0, 3.0]]), KEY_B: torch.ones(3, 1)}
    s2 = {KEY_A: torch.tensor([[5.0, 6.0, 7.0]]), KEY_B: torch.ones(3, 1)}
    m1 = {KEY_A: torch.tensor([[True, True, False]])}
    m2 = {KEY_A: torch.tensor([[True, False, False]])}
    res = make_strategy("fedavg", StrategyConfig(r=1)).aggregate(1, g, [reply("a", s1, 1, m1), reply("b", s2, 3, m2)])
    # coord 0: (1*1 + 3*5)/4 = 4; coord 1: only a sent it -> 2; coord 2: nobody -> global 9.
    assert res.state[KEY_A].tolist() == [[4.0, 2.0, 9.0]]
    assert torch.equal(res.state[KEY_B], torch.ones(3, 1))


def test_masked_key_after_unmasked_replies_counts_their_weight() -> None:
    g = {KEY_A: torch.zeros(1, 2), KEY_B: torch.zeros(2, 1)}
    s1 = {KEY_A: torch.tensor([[2.0, 2.0]]), KEY_B: torch.zeros(2, 1)}
    s2 = {KEY_A: torch.tensor([[4.0, 4.0]]), KEY_B: torch.zeros(2, 1)}
    m2 = {KEY_A: torch.tensor([[True, False]])}
    res = make_strategy("fedavg", StrategyConfig(r=1)).aggregate(1, g, [reply("a", s1, 1), reply("b", s2, 1, m2)])
    assert res.state[KEY_A].tolist() == [[3.0, 2.0]]


def test_robust_helpers_hand_cases() -> None:
    states = [vec_state([v]) for v in (1.0, 2.0, 100.0)]
    assert robust.coordinate_median(states, [KEY_A])[KEY_A].item() == 2.0
    states4 = [vec_state([v]) for v in (1.0, 2.0, 3.0, 100.0)]
    assert robust.coordinate_median(states4, [KEY_A])[KEY_A].item() == 2.5
    states5 = [vec_state([v]) for v in (1.0, 2.0, 3.0, 4.0, 100.0)]
    assert robust.trimmed_mean(states5, [KEY_A], 0.2)[KEY_A].item() == 3.0
    assert robust.krum_select(states5, [KEY_A], f=1, m=1) == [1, 2]  # 2 and 3 tie (score 2): both kept
    assert 4 not in robust.krum_select(states5, [KEY_A], f=1, m=4)


@pytest.mark.parametrize("name", ["median", "trimmed_mean", "krum", "multikrum"])
def test_robust_strategies_resist_a_scaled_update_and_reject_nan(name: str) -> None:
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(16, generator=gen)
    honest = [vec_state((base + 0.01 * torch.randn(16, generator=gen)).tolist()) for _ in range(6)]
    bad = vec_state((100 * base).tolist())
    nan = vec_state([float("nan")] * 16)
    replies = [reply(f"h{i}", s) for i, s in enumerate(honest)] + [reply("bad", bad), reply("nan", nan)]
    honest_mean = torch.stack([s[KEY_A] for s in honest]).mean(0)
    cfg = StrategyConfig(r=1, trim_fraction=0.2, krum_f=1)
    res = make_strategy(name, cfg).aggregate(1, vec_state([0.0] * 16), replies)
    assert "nan" in res.failures and "nan" not in res.clients_ok
    assert torch.isfinite(res.state[KEY_A]).all()
    assert float((res.state[KEY_A] - honest_mean).norm() / honest_mean.norm()) < 0.05
    plain = make_strategy("fedavg", cfg).aggregate(1, vec_state([0.0] * 16), replies)
    assert float((plain.state[KEY_A] - honest_mean).norm() / honest_mean.norm()) > 5  # the attack works on fedavg


def test_robust_option_applies_to_server_optimizers() -> None:
    cfg = StrategyConfig(r=1, robust="median", server_lr=1.0, momentum=0.0)
    s = make_strategy("fedavgm", cfg)
    assert s.needs_all_replies
    res = s.aggregate(1, vec_state([0.0]), [reply(c, vec_state([v])) for c, v in zip("abc", (1.0, 2.0, 50.0))])
    assert res.state[KEY_A].item() == pytest.approx(2.0)


@pytest.mark.parametrize("kind", ["fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_server_optimizers_match_reference_for_three_rounds(kind: str) -> None:
    cfg = StrategyConfig(r=1, server_lr=0.5, beta1=0.8, beta2=0.95, tau=0.1, momentum=0.7)
    strategy = make_strategy(kind, cfg)
    x = np.array([0.5, -1.0, 2.0])
    client_means = [np.array([1.0, -2.0, 2.5]), np.array([0.0, 0.0, 1.0]), np.array([3.0, -1.0, 2.0])]
    m, v = np.zeros(3), np.full(3, cfg.tau**2)
    state = {KEY_A: torch.tensor([x.tolist()]), KEY_B: torch.tensor(x)[:, None].float()}
    for rnd, target in enumerate(client_means, start=1):
        # Two clients straddling the target: their weighted mean is the target.
        lo, hi = target - 1.0, target + 3.0
        res = strategy.aggregate(rnd, state, [reply("a", vec_state(lo.tolist()), 3), reply("b", vec_state(hi.tolist()), 1)])
        d = target - x
        if kind == "fedavgm":
            m = cfg.momentum * m + d
            x = x + cfg.server_lr * m
        else:
            m = cfg.beta1 * m + (1 - cfg.beta1) * d
            if kind == "fedadam":
                v = cfg.beta2 * v + (1 - cfg.beta2) * d**2
            elif kind == "fedyogi":
                v = v - (1 - cfg.beta2) * d**2 * np.sign(v - d**2)
            else:
                v = v + d**2
            x = x + cfg.server_lr * m / (np.sqrt(v) + cfg.tau)
        np.testing.assert_allclose(res.state[KEY_A].numpy()[0], x, rtol=1e-5, atol=1e-6)
        state = res.state


def test_configure_samples_and_sets_instructions() -> None:
    g = vec_state([1.0, 2.0])
    ids = [f"c{i}" for i in range(10)]
    by_count = make_strategy("fedprox", StrategyConfig(clients_per_round=3, prox_mu=0.1))
    ins = by_count.configure(4, ids, g, random.Random(0))
    assert len(ins) == 3 and set(ins) <= set(ids)
    assert all(i.train == {"prox_mu": 0.1} and i.round == 4 and i.state.keys() == g.keys() for i in ins.values())
    by_fraction = make_strategy("fedavg", StrategyConfig(fraction=0.25))
    assert len(by_fraction.configure(1, ids, g, np.random.default_rng(0))) == 3  # ceil(2.5)
    again = by_count.configure(4, ids, g, random.Random(0))
    assert list(again) == list(ins)  # deterministic for a seeded rng
    assert make_strategy("fedavg").configure(1, ids, g, random.Random(0))[ids[0]].train == {}


def test_config_validate_reports_every_problem_with_its_key() -> None:
    bad = StrategyConfig(name="nope", fraction=0.0, min_replies=0, beta1=1.5, trim_fraction=0.7, r=0,
                         client_ranks=[4, 0], error_feedback=True)
    problems = bad.validate()
    for key in ("strategy.name", "strategy.fraction", "strategy.min_replies", "strategy.beta1",
                "strategy.trim_fraction", "adapter.r", "strategy.client_ranks", "strategy.error_feedback"):
        assert any(p.startswith(f"{key}:") for p in problems), key  # r is adapter.r's (the user's key)
    assert "fedavg" in next(p for p in problems if p.startswith("strategy.name"))
    assert StrategyConfig().validate() == []
    assert StrategyConfig(name="svd", r=4, svd_rank=16, client_ranks=[4, 8, 16]).validate() == []


def test_make_strategy_knows_every_name_and_lists_them_on_error() -> None:
    for name in STRATEGY_NAMES:
        assert make_strategy(name, StrategyConfig()).cfg.name == name
    with pytest.raises(ValueError, match="valid: fedavg, ffa, flora"):
        make_strategy("fedsgd", StrategyConfig())
    with pytest.raises(ValueError, match="strategy.client_ranks"):
        make_strategy("fedavg", StrategyConfig(client_ranks=[4, 8]))
