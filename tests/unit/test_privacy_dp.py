"""Client-level DP-FedAvg: clipping, Poisson sampling, noise scale, epsilon from dp-accounting every round,
the privacy budget stopping a run, and a resumed run continuing the count."""

from __future__ import annotations

import io
import json
from pathlib import Path

import dp_accounting
import pytest
import torch
from dp_accounting import pld, rdp
from fakes import FakeDispatcher, FakeModel
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from fedtune.checkpoint import load_checkpoint
from fedtune.config import ConfigError, TrainConfig, load_config
from fedtune.privacy.config import PrivacyConfig
from fedtune.privacy.dp import ClipTransform, DPStrategy, poisson_sample
from fedtune.rounds import RoundPlan, run_rounds
from fedtune.runs import RunDir
from fedtune.strategies import StrategyConfig, make_strategy
from fedtune.types import ClientReply, Instructions

KEYS = ("m.q.lora_A.weight", "m.q.lora_B.weight")
QUIET = Console(file=io.StringIO())


def start() -> dict[str, torch.Tensor]:
    return {KEYS[0]: torch.full((2, 4), 0.5), KEYS[1]: torch.zeros(4, 2)}


def stepper(step: float):
    """A client that moves every coordinate by ``step`` (update norm ``step * sqrt(16)``)."""
    def train(ins: Instructions) -> ClientReply:
        return ClientReply(ins.client_id, ins.round, {k: v + step for k, v in ins.state.items()}, 5)
    return train


def independent_epsilon(q: float, z: float, rounds: int, delta: float, kind: str) -> float:
    """What dp-accounting says, composed here without fedtune's code."""
    acc = rdp.RdpAccountant() if kind == "rdp" else pld.PLDAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds)
    return float(acc.get_epsilon(delta))


def dp(inner: str = "fedavg", **kw: object) -> DPStrategy:
    privacy = PrivacyConfig(**{"dp": "central", "accountant": "rdp", **kw})  # type: ignore[arg-type]
    return DPStrategy(make_strategy(inner, StrategyConfig(r=2, lora_alpha=2.0)), privacy, seed=7)


def drive(tmp: Path, strategy: DPStrategy, clients: dict, rounds: int, resume: bool = False) -> RunDir:
    run = RunDir(tmp)
    plan = RoundPlan(rounds=rounds, seed=7, train=TrainConfig(lr=0.5))
    run_rounds(plan, run, FakeModel(start()), strategy, FakeDispatcher(clients), QUIET,
               resume=load_checkpoint(tmp) if resume else None)
    return run


@settings(max_examples=40, deadline=None)
@given(scale=st.floats(1e-3, 1e3), clip=st.floats(1e-2, 10.0), seed=st.integers(0, 2**16))
def test_clip_transform_bounds_the_update_norm_and_keeps_its_direction(scale: float, clip: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(4, 3, generator=g) for k in KEYS}
    delta = {k: torch.randn(4, 3, generator=g, dtype=torch.float64).float() * scale for k in KEYS}
    reply = ClientReply("c", 1, {k: base[k] + delta[k] for k in KEYS}, 3)
    out, state = ClipTransform(clip).apply(reply, Instructions(1, "c", base), {})
    assert out.state is not None and state == {}
    sent = torch.cat([(out.state[k] - base[k]).flatten() for k in KEYS])
    orig = torch.cat([delta[k].flatten() for k in KEYS])
    assert float(sent.norm()) <= clip * (1 + 1e-4) + 1e-5
    if float(orig.norm()) <= clip:
        assert torch.allclose(sent, orig, atol=1e-5)
    else:  # scaled down, same direction
        assert float(torch.nn.functional.cosine_similarity(sent, orig, dim=0)) > 0.999
    assert out.metrics["update_norm"] == pytest.approx(float(orig.norm()), rel=1e-4)


def test_the_mean_without_noise_is_the_clipped_sum_over_the_expected_sample_size() -> None:
    # 4 clients all sampled (q = 1), noise 0: global + (sum of clipped deltas) / (q N)
    strategy = dp(noise_multiplier=0.0, sample_rate=1.0, clip_norm=2.0)
    ids = ["a", "b", "c", "d"]
    ins = strategy.configure(1, ids, start(), __import__("random").Random(0))
    assert list(ins) == ids
    # deltas of norm 4 * 0.1 = 0.4 (kept) and 4 * 1.0 = 4 (clipped to 2: each coordinate +0.5)
    replies = [stepper(0.1)(ins["a"]), stepper(0.1)(ins["b"]), stepper(1.0)(ins["c"]), stepper(1.0)(ins["d"])]
    result = strategy.aggregate(1, start(), replies)
    want = (0.1 + 0.1 + 0.5 + 0.5) / 4
    for k in KEYS:
        assert torch.allclose(result.state[k], start()[k] + want, atol=1e-6)
    assert result.metrics["dp_clipped"] == 2 and result.clients_ok == ids


def test_noise_on_the_mean_has_std_z_clip_over_expected_clients() -> None:
    shape = (200, 250)  # 50,000 coordinates: the sample std is within 1% of the true one
    strategy = dp(noise_multiplier=1.3, clip_norm=0.7, sample_rate=0.25)
    zero = {"m.q.lora_A.weight": torch.zeros(shape)}
    strategy.inner = make_strategy("fedavg", StrategyConfig(r=2, lora_alpha=2.0))
    ids = [f"c{i}" for i in range(40)]
    ins = strategy.configure(1, ids, zero, __import__("random").Random(3))
    replies = [ClientReply(c, 1, {k: v.clone() for k, v in i.state.items()}, 1) for c, i in ins.items()]
    result = strategy.aggregate(1, zero, replies)
    noise = result.state["m.q.lora_A.weight"]
    want = 1.3 * 0.7 / (0.25 * 40)
    assert float(noise.std()) == pytest.approx(want, rel=0.02)
    assert abs(float(noise.mean())) < 4 * want / 50_000**0.5
    assert result.metrics["dp_noise_std"] == pytest.approx(want)


def test_poisson_sampling_draws_each_client_independently() -> None:
    import random

    ids = [f"c{i}" for i in range(50)]
    sizes = [len(poisson_sample(ids, 0.2, random.Random(r))) for r in range(400)]
    mean = sum(sizes) / len(sizes)
    assert mean == pytest.approx(10, rel=0.05)  # E = qN; sd of the mean 0.14
    var = sum((s - mean) ** 2 for s in sizes) / len(sizes)
    assert var == pytest.approx(50 * 0.2 * 0.8, rel=0.2)  # binomial, not a fixed k
    assert poisson_sample(ids, 0.2, random.Random(5)) == poisson_sample(ids, 0.2, random.Random(5))


def test_pld_and_rdp_epsilon_equal_dp_accounting_and_the_issue_s_reference() -> None:
    from fedtune.privacy.accounting import Accountant, epsilon

    acc = Accountant(1e-5, "pld")
    for _ in range(3):
        acc.spend(0.3, 1.1)
    assert acc.epsilon() == pytest.approx(independent_epsilon(0.3, 1.1, 3, 1e-5, "pld"), rel=1e-9)
    # 1,000 clients, q = 0.1, z = 1, delta 1e-5, 100 rounds: PLD 7.05, RDP 7.90; 96 without amplification
    assert epsilon(0.1, 1.0, 100, 1e-5, "rdp") == pytest.approx(7.90, abs=0.01)
    assert epsilon(1.0, 1.0, 100, 1e-5, "rdp") == pytest.approx(96.1, abs=0.1)


@pytest.mark.parametrize("kind", ["rdp"])
def test_epsilon_in_every_round_equals_dp_accounting(tmp_path: Path, kind: str) -> None:
    clients = {f"c{i}": stepper(0.01 * i) for i in range(10)}
    run = drive(tmp_path, dp(noise_multiplier=1.1, sample_rate=0.3, accountant=kind), clients, rounds=3)
    rows = [r for r in run.read_metrics() if r["round"] >= 1]
    assert len(rows) == 3
    for r in rows:
        assert r["epsilon"] == pytest.approx(independent_epsilon(0.3, 1.1, r["round"], 1e-5, kind), rel=1e-9)
        assert r["delta"] == 1e-5 and r.get("agg_error") is None
    assert rows[0]["epsilon"] < rows[1]["epsilon"] < rows[2]["epsilon"]
    assert json.loads((run.path / "privacy.json").read_text())["epsilon"] == rows[-1]["epsilon"]
    # the sample differs from round to round (Poisson, from the driver's per-round generator)
    assert len({r["dp_sampled"] for r in rows} | {tuple(sorted(r["clients"])) for r in rows}) > 1


def test_target_epsilon_stops_before_the_budget_is_exceeded(tmp_path: Path) -> None:
    budget = independent_epsilon(0.3, 1.1, 3, 1e-5, "rdp") * 1.001  # three rounds fit, a fourth does not
    clients = {f"c{i}": stepper(0.01) for i in range(10)}
    run = drive(tmp_path, dp(noise_multiplier=1.1, sample_rate=0.3, target_epsilon=budget), clients, rounds=10)
    rows = [r for r in run.read_metrics() if r["round"] >= 1]
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert rows[-1]["epsilon"] <= budget
    spent = json.loads((run.path / "privacy.json").read_text())
    assert spent["after_round"] == 3 and "round 4 would take epsilon" in spent["stopped"]


def test_resume_continues_the_count_and_the_noise(tmp_path: Path) -> None:
    clients = {f"c{i}": stepper(0.02 * (i + 1)) for i in range(8)}
    whole = drive(tmp_path / "whole", dp(sample_rate=0.5), clients, rounds=4)
    drive(tmp_path / "split", dp(sample_rate=0.5), clients, rounds=2)
    assert load_checkpoint(tmp_path / "split").strategy["accountant"]["rounds"] == [[0.5, 1.0, 2]]
    split = drive(tmp_path / "split", dp(sample_rate=0.5), clients, rounds=4, resume=True)
    a, b = whole.read_metrics(), split.read_metrics()
    assert [r["epsilon"] for r in a[1:]] == [r["epsilon"] for r in b[1:]]
    assert b[-1]["epsilon"] == pytest.approx(independent_epsilon(0.5, 1.0, 4, 1e-5, "rdp"), rel=1e-9)
    assert [r["eval_loss"] for r in a] == [r["eval_loss"] for r in b]  # same samples, same noise


def test_a_server_optimizer_steps_on_the_noisy_mean(tmp_path: Path) -> None:
    clients = {f"c{i}": stepper(0.05) for i in range(6)}
    run = drive(tmp_path, dp("fedadam", sample_rate=0.5), clients, rounds=2)
    rows = [r for r in run.read_metrics() if r["round"] >= 1]
    assert all("server_update_norm" in r and r["epsilon"] > 0 for r in rows)


def test_refused_combinations_name_the_key() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["privacy.dp=central", "strategy.name=krum", "sim.clients_per_round=2",
                           "privacy.noise_multiplier=0"])
    text = str(err.value)
    for key in ("strategy.name: privacy.dp needs a linear strategy", "client.pipeline: privacy.dp needs the dp_clip",
                "sim.clients_per_round: must be 0", "privacy.noise_multiplier: 0 gives no privacy"):
        assert key in text
    with pytest.raises(ConfigError, match="strategy.robust: must be none"):
        load_config(None, ["privacy.dp=central", "client.pipeline=[dp_clip]", "strategy.robust=median"])
    with pytest.raises(ConfigError, match="privacy.target_epsilon: needs privacy.dp=central"):
        load_config(None, ["privacy.target_epsilon=3"])
    cfg = load_config(None, ["privacy.dp=central", "client.pipeline=[dp_clip]", "strategy.name=ffa"])
    assert cfg.privacy.dp == "central"


def test_privacy_plan_gives_epsilon_or_the_noise_for_a_target(capsys: pytest.CaptureFixture[str]) -> None:
    from fedtune.cli import main
    from fedtune.privacy.accounting import epsilon, noise_for_epsilon

    assert main(["privacy", "plan", "--clients", "1000", "--rate", "0.1", "--rounds", "100", "--noise", "1.0",
                 "--accountant", "rdp"]) == 0
    out = capsys.readouterr().out
    assert "7.904" in out and "96.116" in out  # with and without sampling amplification
    z = noise_for_epsilon(0.1, 100, 1e-5, 4.0, "rdp")
    assert epsilon(0.1, z, 100, 1e-5, "rdp") <= 4.0 < epsilon(0.1, z - 0.01, 100, 1e-5, "rdp")
    assert main(["privacy", "plan", "--clients", "10", "--rate", "2", "--rounds", "5", "--noise", "1"]) == 2
    assert "--rate: got 2.0, must be in (0, 1]" in capsys.readouterr().err


def test_secure_aggregation_refuses_compression_naming_both_keys() -> None:
    for extra in (["client.pipeline=[compress]", "compress.method=sign"], ["compress.downlink=true"]):
        with pytest.raises(ConfigError) as err:
            load_config(None, ["privacy.secagg=true", *extra])
        assert "privacy.secagg: compress cannot apply to the masked upload" in str(err.value) and "compress" in str(err.value)
