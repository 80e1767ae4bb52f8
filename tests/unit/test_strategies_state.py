"""Every strategy's state survives a checkpoint as plain data: restored, it continues as if never stopped."""

from __future__ import annotations

import io
import random

import pytest
import torch

from fedtune.strategies import STRATEGY_NAMES, StrategyConfig, make_strategy
from fedtune.strategies.specs import REGISTRY
from fedtune.types import ClientReply, LowRankUpdate

LAYERS = {"m.q": (6, 5), "m.v": (4, 5)}
CLIENTS = [f"c{i}" for i in range(4)]


def lora_state(gen: torch.Generator, rank: int = 3) -> dict[str, torch.Tensor]:
    out = {}
    for prefix, (d_out, d_in) in LAYERS.items():
        out[prefix + ".lora_A.weight"] = torch.randn(rank, d_in, generator=gen)
        out[prefix + ".lora_B.weight"] = torch.randn(d_out, rank, generator=gen)
    return out


def one_round(strategy, rnd: int, state: dict[str, torch.Tensor]):  # type: ignore[no-untyped-def]
    """Configure, answer with seeded "trained" values of what was sent, aggregate."""
    instructions = strategy.configure(rnd, CLIENTS, state, random.Random(rnd))
    gen = torch.Generator().manual_seed(rnd)
    replies = [ClientReply(c, rnd, {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in ins.state.items()},
                           num_examples=i + 1) for i, (c, ins) in enumerate(instructions.items())]
    return instructions, strategy.aggregate(rnd, state, replies)


def plain(x: object) -> bool:
    """Tensors, numbers, strings, None, and lists / tuples / dicts of those only."""
    if isinstance(x, dict):
        return all(isinstance(k, str | int) and plain(v) for k, v in x.items())
    if isinstance(x, list | tuple):
        return all(plain(v) for v in x)
    return x is None or isinstance(x, torch.Tensor | int | float | str | bool)


def same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, LowRankUpdate):
        return isinstance(b, LowRankUpdate) and torch.equal(a.A, b.A) and torch.equal(a.B, b.B)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_state_dict_round_trip_continues_the_run(name: str) -> None:
    cfg = StrategyConfig(r=3, lora_alpha=6.0, error_feedback=REGISTRY[name].truncates, svd_rank=2)
    gen = torch.Generator().manual_seed(0)
    state = lora_state(gen)
    straight, stopped = make_strategy(name, cfg), make_strategy(name, cfg)
    s1 = s2 = state
    for rnd in (1, 2):
        _, r1 = one_round(straight, rnd, s1)
        _, r2 = one_round(stopped, rnd, s2)
        s1, s2 = r1.state, r2.state
    saved = stopped.state_dict()
    assert plain(saved), saved
    buf = io.BytesIO()
    torch.save(saved, buf)
    buf.seek(0)
    restored = make_strategy(name, cfg)
    restored.load_state_dict(torch.load(buf, weights_only=True))
    ins1, r1 = one_round(straight, 3, s1)
    ins2, r2 = one_round(restored, 3, s2)
    assert same({c: (i.state, i.base_update, i.extra) for c, i in ins1.items()},
                {c: (i.state, i.base_update, i.extra) for c, i in ins2.items()})
    assert r1.applied and same(r1.state, r2.state) and same(r1.base_update, r2.base_update)
    assert same(straight.state_dict(), restored.state_dict())


@pytest.mark.parametrize("name", ["fedadam", "svd", "flora", "fedex"])
def test_a_stateful_strategy_forgets_without_its_state(name: str) -> None:
    """The round trip above is not vacuous: a fresh strategy in round 3 gives another result."""
    cfg = StrategyConfig(r=3, lora_alpha=6.0, error_feedback=REGISTRY[name].truncates, svd_rank=2)
    gen = torch.Generator().manual_seed(0)
    state = lora_state(gen)
    strategy = make_strategy(name, cfg)
    for rnd in (1, 2):
        _, res = one_round(strategy, rnd, state)
        state = res.state
    ins, kept = one_round(strategy, 3, state)
    fresh_ins, fresh = one_round(make_strategy(name, cfg), 3, state)
    differs = not same(kept.state, fresh.state) or not same(
        {c: i.base_update for c, i in ins.items()}, {c: i.base_update for c, i in fresh_ins.items()})
    assert differs


def test_a_state_for_another_strategy_is_refused() -> None:
    with pytest.raises(ValueError, match="keeps no state"):
        make_strategy("fedavg").load_state_dict({"m": {}})


def test_strategies_declare_what_the_loops_need() -> None:
    """Linear (secure-aggregation compatible), holds every reply, keeps a base-update log: declared, not named."""
    declared = {name: (s.linear, s.needs_all_replies, s.base_log is not None, tuple(s.phases(1)))
                for name in STRATEGY_NAMES for s in [make_strategy(name)]}
    assert declared["fedavg"] == declared["ffa"] == declared["fedprox"] == (True, False, False, ("train",))
    assert declared["fedadam"] == (True, False, False, ("train",))
    assert declared["median"] == declared["krum"] == (False, True, False, ("train",))
    assert declared["flora"] == declared["fedex"] == (False, False, True, ("train",))
    assert declared["svd"] == (False, False, False, ("train",))
    robust_mean = make_strategy("fedavg", StrategyConfig(robust="trimmed_mean"))
    assert not robust_mean.linear and robust_mean.needs_all_replies
    assert REGISTRY["ffa"].frozen_in_state and not REGISTRY["fedavg"].frozen_in_state
    state = lora_state(torch.Generator().manual_seed(0))
    assert make_strategy("ffa").sent_keys(state) == [k for k in state if ".lora_B." in k]
    assert make_strategy("svd").sent_keys(state) == make_strategy("fedavg").sent_keys(state) == list(state)
