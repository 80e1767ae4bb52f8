"""agg_error in linear time: the streamed sketch against the exact Gram form, its stated accuracy, thinning."""

from __future__ import annotations

import dataclasses
import gc
import math
import weakref

import pytest
import torch

from fedtune.strategies import StrategyConfig, lora_scale, lowrank, make_strategy
from fedtune.strategies.agg_error import EXACT_MAX_RANK, ErrorMeter, Sketch
from fedtune.types import ClientReply, State

pytestmark = pytest.mark.usefixtures("one_thread")  # hundreds of tiny products: no OpenMP team to wait for
LAYERS = {"m.l0.q_proj": (24, 20), "m.l1.q_proj": (24, 20), "m.l0.down_proj": (12, 36)}  # prefix: (d_out, d_in)
SKETCH = StrategyConfig(r=4, lora_alpha=8.0, agg_error_method="sketch")


def lora_state(rank: int, gen: torch.Generator, scale: float = 1.0, base: State | None = None) -> State:
    out = {}
    for prefix, (d_out, d_in) in LAYERS.items():
        ka, kb = prefix + ".lora_A.weight", prefix + ".lora_B.weight"
        out[ka] = torch.randn(rank, d_in, generator=gen) * scale + (0 if base is None else base[ka])
        out[kb] = torch.randn(d_out, rank, generator=gen) * scale + (0 if base is None else base[kb])
    return out


def replies(states: list[State], weights: list[int]) -> list[ClientReply]:
    return [ClientReply(f"c{i}", 1, s, num_examples=n) for i, (s, n) in enumerate(zip(states, weights, strict=True))]


def exact_average(states: list[State], weights: list[int], prefix: str, cfg: StrategyConfig) -> torch.Tensor:
    total = sum(weights)
    out = torch.zeros(LAYERS[prefix], dtype=torch.float64)
    for s, n in zip(states, weights, strict=True):
        a, b = s[prefix + ".lora_A.weight"].double(), s[prefix + ".lora_B.weight"].double()
        out += n / total * lora_scale(cfg, a.shape[0]) * b @ a
    return out


def bound(rho: float, m: int) -> float:
    """The module's variance bound for b = 4 m buckets: 2 rho (1/m + 1/b) + 4 / (m b)."""
    b = 4 * m
    return 2 * rho * (1 / m + 1 / b) + 4 / (m * b)


def rho(x: torch.Tensor) -> float:
    s2 = torch.linalg.svdvals(x.double()).square()
    return float(s2.square().sum() / s2.sum().square())


def sketched_norms(states: list[State], weights: list[int], cfg: StrategyConfig, rnd: int,
                   agg: dict[str, list[lowrank.Pair]]) -> dict[str, tuple[float, float]]:
    sketch = Sketch(states[0], cfg, rnd)
    for s, n in zip(states, weights, strict=True):
        sketch.add(s, states[0], float(n))
    return sketch.squared_norms(agg)


def test_one_by_one_layers_are_sketched_exactly() -> None:
    """A 1 x 1 layer has one bucket and probes of +-1: the sketch loses nothing (hand-computed as in fedavg's test)."""
    cfg = dataclasses.replace(SKETCH, r=1, lora_alpha=1.0)
    g = {"x.lora_A.weight": torch.zeros(1, 1), "x.lora_B.weight": torch.zeros(1, 1)}
    c1 = {"x.lora_A.weight": torch.tensor([[1.0]]), "x.lora_B.weight": torch.tensor([[2.0]])}
    c2 = {"x.lora_A.weight": torch.tensor([[3.0]]), "x.lora_B.weight": torch.tensor([[4.0]])}
    for rnd in (1, 2, 3):
        res = make_strategy("fedavg", cfg).aggregate(rnd, g, replies([c1, c2], [1, 3]))
        # exact average 0.5 + 9 = 9.5; fedavg's (2.5)(3.5) = 8.75
        assert res.agg_error_layers == {"x": pytest.approx(0.75 / 9.5, rel=1e-6)}
        assert res.metrics["agg_error_estimated"] == 1.0


def test_squared_norms_are_unbiased_within_the_stated_variance() -> None:
    """Over 200 rounds (seeds): mean within 4 standard errors of the exact norm, variance within the bound
    (plus 3 standard errors of the sample variance). Rank one is the bound's worst case (rho = 1); its factors
    are positive, so all rows and all columns are alike and only the random signs keep the estimate unbiased.
    Six clients of rank 4 give a flatter spectrum."""
    gen = torch.Generator().manual_seed(7)
    one = {k: v.abs() + 0.5 for k, v in lora_state(1, gen).items()}
    many = [lora_state(4, gen) for _ in range(6)]
    for states, weights in (([one], [1]), (many, [3, 1, 4, 1, 5, 9])):
        cfg = dataclasses.replace(SKETCH, r=states[0]["m.l0.q_proj.lora_A.weight"].shape[0])
        truth = {p: exact_average(states, weights, p, cfg) for p in LAYERS}
        agg = {p: [] for p in LAYERS}  # sum agg = 0: both estimates are of ||M||^2
        samples = [sketched_norms(states, weights, cfg, rnd, agg) for rnd in range(200)]
        for p, x in truth.items():
            est = torch.tensor([s[p][1] for s in samples], dtype=torch.float64)
            exact = float(x.square().sum())
            n = est.numel()
            assert abs(float(est.mean()) - exact) <= 4 * float(est.std()) / math.sqrt(n), p
            rel = est / exact - 1
            var = float(rel.square().mean())
            se = float((rel.square() - var).square().mean().sqrt()) / math.sqrt(n)  # of the variance estimate
            assert var <= bound(rho(x), cfg.agg_error_probes) + 3 * se, (p, var, rho(x))


def test_fedavg_error_estimate_tracks_the_exact_value(gen: torch.Generator) -> None:
    """Clients near a common adapter (a real but small error). Per layer, over 60 rounds, the estimates spread
    within the bound for the worse of the two norms, and centre on the exact value within the second-order bias
    of a square root of a ratio, (3/8 v_R + 1/8 v_D + 1/4 sqrt(v_D v_R)) <= 3/4 of that bound, + 3 standard errors."""
    base = lora_state(4, gen)
    states, weights = [lora_state(4, gen, 0.3, base) for _ in range(10)], [1, 2, 3, 1, 2, 3, 1, 2, 3, 4]
    exact = make_strategy("fedavg", dataclasses.replace(SKETCH, agg_error_method="exact"))
    want = exact.aggregate(1, base, replies(states, weights))
    assert want.metrics["agg_error_estimated"] == 0.0
    got = [make_strategy("fedavg", SKETCH).aggregate(rnd, base, replies(states, weights)).agg_error_layers
           for rnd in range(1, 61)]
    for p in LAYERS:
        ref = exact_average(states, weights, p, SKETCH)
        a, b = want.state[p + ".lora_A.weight"].double(), want.state[p + ".lora_B.weight"].double()
        worst = bound(max(rho(lora_scale(SKETCH, 4) * b @ a - ref), rho(ref)), SKETCH.agg_error_probes)
        est = torch.tensor([g[p] for g in got], dtype=torch.float64) / want.agg_error_layers[p]
        assert 0.02 < want.agg_error_layers[p] < 0.5
        assert float(est.std()) <= math.sqrt(worst), p
        assert abs(float(est.mean()) - 1) <= 0.75 * worst + 3 * float(est.std()) / math.sqrt(est.numel()), p


@pytest.mark.parametrize("name", ["flora", "fedex", "ffa"])
def test_exact_strategies_still_report_about_zero_when_sketched(gen: torch.Generator, name: str) -> None:
    cfg = dataclasses.replace(SKETCH, client_ranks=[2, 4, 3] if name == "flora" else None)
    g = lora_state(4, gen)
    states = [lora_state(4, gen) for _ in range(12)]
    if name == "ffa":  # clients send B only; A is the shared frozen one
        states = [{k: v for k, v in s.items() if "lora_B" in k} for s in states]
    if name == "flora":
        states = [lora_state([2, 4, 3][i % 3], gen) for i in range(12)]
    res = make_strategy(name, cfg).aggregate(1, g, replies(states, list(range(1, 13))))
    assert res.metrics["agg_error_estimated"] == 1.0
    assert res.metrics["agg_error"] < 1e-5


def test_svd_truncation_error_stays_exact_and_feedback_is_sketched(gen: torch.Generator) -> None:
    states = [lora_state(4, gen) for _ in range(12)]
    plain = make_strategy("svd", SKETCH).aggregate(1, lora_state(4, gen), replies(states, [1] * 12))
    assert plain.metrics["agg_error_estimated"] == 0.0  # from the singular values, whatever the method
    fed = make_strategy("svd", dataclasses.replace(SKETCH, svd_rank=48, error_feedback=True))
    full = fed.aggregate(1, lora_state(48, gen), replies(states, [1] * 12))  # rank 48 keeps all 12 x 4
    assert full.metrics["agg_error_estimated"] == 1.0 and full.metrics["agg_error"] < 1e-5


def test_auto_is_exact_for_small_rounds_and_switches_to_the_same_sketch(gen: torch.Generator) -> None:
    auto = StrategyConfig(r=4, lora_alpha=8.0)
    assert auto.agg_error_method == "auto"
    g = lora_state(4, gen)
    small = [lora_state(4, gen) for _ in range(EXACT_MAX_RANK // 4)]
    res = make_strategy("fedavg", auto).aggregate(1, g, replies(small, [1] * len(small)))
    assert res.metrics["agg_error_estimated"] == 0.0
    big = small + [lora_state(4, gen) for _ in range(5)]
    via_auto = make_strategy("fedavg", auto).aggregate(5, g, replies(big, list(range(1, 14))))
    via_sketch = make_strategy("fedavg", SKETCH).aggregate(5, g, replies(big, list(range(1, 14))))
    assert via_auto.metrics["agg_error_estimated"] == 1.0
    assert via_auto.agg_error_layers == via_sketch.agg_error_layers  # held replies replayed in order: same sums
    again = make_strategy("fedavg", SKETCH).aggregate(5, g, replies(big, list(range(1, 14))))
    assert again.agg_error_layers == via_sketch.agg_error_layers  # seeded by the round: a resume reports the same
    other = make_strategy("fedavg", SKETCH).aggregate(6, g, replies(big, list(range(1, 14))))
    assert other.agg_error_layers != via_sketch.agg_error_layers  # fresh probes every round


def test_agg_error_every_thins_the_rounds_and_reports_nothing_in_between(gen: torch.Generator) -> None:
    g = lora_state(4, gen)
    states = [lora_state(4, gen) for _ in range(3)]
    for name in ("fedavg", "flora", "svd"):
        strategy = make_strategy(name, StrategyConfig(r=4, lora_alpha=8.0, agg_error_every=3))
        for rnd in range(1, 7):
            res = strategy.aggregate(rnd, g, replies(states, [1, 2, 3]))
            if rnd % 3:
                assert "agg_error" not in res.metrics and not res.agg_error_layers, (name, rnd)
                assert "agg_error_estimated" not in res.metrics
            else:
                assert set(res.agg_error_layers) == set(LAYERS) and res.metrics["agg_error"] >= 0.0, (name, rnd)


def test_the_sketch_holds_no_reply_while_the_exact_form_holds_them(gen: torch.Generator) -> None:
    g = lora_state(4, gen)
    for method, kept in (("sketch", False), ("exact", True)):
        meter = ErrorMeter(dataclasses.replace(SKETCH, agg_error_method=method), 1, g)
        state = lora_state(4, gen)
        ref = weakref.ref(state["m.l0.q_proj.lora_B.weight"])
        meter.add(state, 2.0)
        del state
        gc.collect()
        assert (ref() is not None) == kept, method


def test_layers_of_mixed_ranks_and_half_precision_match_the_batched_path(gen: torch.Generator) -> None:
    """A reply whose layers differ in rank takes the per-layer path; zero-padding it to one rank (same B A)
    takes the batched one: the estimates agree. bf16 factors give the estimates of their float32 values."""
    mixed = lora_state(4, gen)
    mixed["m.l1.q_proj.lora_A.weight"] = mixed["m.l1.q_proj.lora_A.weight"][:2]
    mixed["m.l1.q_proj.lora_B.weight"] = mixed["m.l1.q_proj.lora_B.weight"][:, :2]
    padded = dict(mixed)
    padded["m.l1.q_proj.lora_A.weight"] = torch.cat([mixed["m.l1.q_proj.lora_A.weight"], torch.zeros(2, 20)])
    padded["m.l1.q_proj.lora_B.weight"] = torch.cat([mixed["m.l1.q_proj.lora_B.weight"], torch.zeros(24, 2)], 1)
    cfg = dataclasses.replace(SKETCH, lora_alpha=4.0, use_rslora=False)
    # the scale depends on the rank: fold it into the padded B so that both stand for the same update
    padded["m.l1.q_proj.lora_B.weight"] = padded["m.l1.q_proj.lora_B.weight"] * (lora_scale(cfg, 2) / lora_scale(cfg, 4))
    agg = {p: [] for p in LAYERS}
    a = sketched_norms([mixed], [1], cfg, 3, agg)
    b = sketched_norms([padded], [1], cfg, 3, agg)
    for p in LAYERS:
        assert a[p][1] == pytest.approx(b[p][1], rel=1e-5)
    half = {k: v.bfloat16() for k, v in padded.items()}
    c = sketched_norms([half], [1], cfg, 3, agg)
    d = sketched_norms([{k: v.float() for k, v in half.items()}], [1], cfg, 3, agg)
    assert c == d


def test_config_names_bad_agg_error_keys() -> None:
    problems = StrategyConfig(agg_error_every=0, agg_error_method="fast", agg_error_probes=0).validate()
    text = " ".join(problems)
    for key in ("strategy.agg_error_every", "strategy.agg_error_method", "strategy.agg_error_probes"):
        assert key in text
    assert "auto, exact, sketch" in text
    with pytest.raises(ValueError, match="agg_error_every"):
        make_strategy("fedavg", StrategyConfig(agg_error_every=0))


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)

