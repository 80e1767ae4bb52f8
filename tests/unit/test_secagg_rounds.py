"""Secure aggregation through the round driver: the strategy wrapper and the client phase handlers, with
fake training (no model), dropouts at each phase, an abort below t, a server that swaps a key, and DP on
the unmasked sum."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from fakes import FakeDispatcher, FakeModel
from rich.console import Console

import fedtune.privacy.client as sa_client
from fedtune.client.phases import ClientContext, run_phase
from fedtune.config import TrainConfig, load_config
from fedtune.privacy import secagg
from fedtune.privacy.config import PrivacyConfig
from fedtune.privacy.secagg_strategy import SecAggStrategy
from fedtune.privacy.wrap import with_privacy
from fedtune.rounds import RoundPlan, run_rounds
from fedtune.runs import RunDir
from fedtune.strategies import StrategyConfig, make_strategy
from fedtune.types import ClientReply, Instructions

KEYS = ("m.q.lora_A.weight", "m.q.lora_B.weight")
QUIET = Console(file=io.StringIO())
PHASES = ("secagg_advertise", "secagg_share", "secagg_upload", "secagg_unmask")


def start() -> dict[str, torch.Tensor]:
    return {KEYS[0]: torch.full((2, 4), 0.5), KEYS[1]: torch.zeros(4, 2)}


def step(cid: str) -> float:
    return 0.01 * (int(cid[1:]) + 1)


@pytest.fixture
def fake_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Client ``cK`` "trains" by adding 0.01 (K + 1) to every value (no model needed)."""
    def train(ctx: ClientContext, ins: Instructions) -> ClientReply:
        return ClientReply(ins.client_id, ins.round, {k: v + step(ins.client_id) for k, v in ins.state.items()}, 7)
    monkeypatch.setattr(sa_client, "train_phase", train)


def clients(n: int, cfg) -> dict:
    ctxs = {f"c{i}": ClientContext(cfg, None, [], pipeline=[]) for i in range(n)}  # type: ignore[arg-type]
    return {cid: (lambda ins, ctx=ctx: run_phase(ctx, ins)) for cid, ctx in ctxs.items()}


def drive(tmp: Path, n: int, *, drop=None, rounds: int = 1, strategy=None, **privacy: object):
    cfg = load_config(None, ["privacy.secagg=true", *[f"privacy.{k}={v}" for k, v in privacy.items()]])
    inner = make_strategy("fedavg", StrategyConfig(r=2, lora_alpha=2.0))
    strategy = strategy(inner, cfg) if strategy else with_privacy(inner, cfg)
    model = FakeModel(start())
    run = RunDir(tmp)
    run_rounds(RoundPlan(rounds=rounds, seed=3, train=TrainConfig()), run, model, strategy,
               FakeDispatcher(clients(n, cfg), drop=drop), QUIET)
    return model, [r for r in run.read_metrics() if r["round"] >= 1]


def test_the_round_gives_the_uniform_mean_of_the_clipped_updates(tmp_path: Path, fake_training: None) -> None:
    model, rows = drive(tmp_path, 6, clip_norm=10.0)
    want = sum(step(f"c{i}") for i in range(6)) / 6
    for k in KEYS:
        assert torch.allclose(model.current[k], start()[k] + want, atol=1e-6)
    assert rows[0]["clients_ok"] == 6 and rows[0]["agg_error"] is None and rows[0]["agg_error_unavailable"] == 1


@pytest.mark.parametrize("phase", PHASES)
def test_a_dropout_at_any_phase_leaves_the_survivors_mean(tmp_path: Path, fake_training: None, phase: str) -> None:
    gone = {"c1", "c4"}
    model, rows = drive(tmp_path, 7, drop={(1, phase): gone}, clip_norm=10.0)
    # at unmask the two still uploaded: their updates are in the sum
    counted = [f"c{i}" for i in range(7) if phase == "secagg_unmask" or f"c{i}" not in gone]
    want = sum(step(c) for c in counted) / len(counted)
    for k in KEYS:
        assert torch.allclose(model.current[k], start()[k] + want, atol=1e-6)
    assert rows[0]["applied"] and set(rows[0]["failures"]) == gone


def test_below_the_threshold_the_round_fails_and_the_model_stays(tmp_path: Path, fake_training: None) -> None:
    model, rows = drive(tmp_path, 5, drop={(1, "secagg_upload"): {"c0", "c1", "c2"}})
    assert not rows[0]["applied"] and "secure aggregation aborted" in rows[0]["failures"]["secagg"]
    assert all(torch.equal(model.current[k], start()[k]) for k in KEYS)


def test_a_server_that_swaps_a_key_is_caught_by_the_clients(tmp_path: Path, fake_training: None) -> None:
    class Swapping(SecAggStrategy):
        def configure(self, round, client_ids, global_state, rng, *, phase="train", previous=None):
            out = super().configure(round, client_ids, global_state, rng, phase=phase, previous=previous)
            if phase == "secagg_share":  # the server puts its own key in for c2 (it cannot sign it as c2)
                fake = X25519PrivateKey.generate().public_key().public_bytes(*secagg._RAW).hex()
                for c, ins in out.items():
                    ads = dict(ins.extra["secagg_adverts"])
                    if "c2" in ads:
                        ads["c2"] = {**ads["c2"], "s_pk": fake}
                        out[c] = dataclasses.replace(ins, extra={**ins.extra, "secagg_adverts": ads})
            return out

    def make(inner, cfg):
        return Swapping(inner, cfg.privacy, cfg.seed)

    model, rows = drive(tmp_path, 5, strategy=make)
    reasons = [why for c, why in rows[0]["failures"].items() if c != "secagg"]
    assert reasons and all("'c2'" in why and "not signed by its identity" in why for why in reasons)
    assert not rows[0]["applied"] and all(torch.equal(model.current[k], start()[k]) for k in KEYS)


def test_dp_noise_is_added_to_the_unmasked_sum(tmp_path: Path, fake_training: None) -> None:
    cfg_dp = {"dp": "central", "sample_rate": 1.0, "noise_multiplier": 0.5, "clip_norm": 1.0, "accountant": "rdp"}
    # dp_clip must be in client.pipeline for the config to load; the fake training skips the pipeline
    cfg = load_config(None, ["privacy.secagg=true", "client.pipeline=[dp_clip]",
                             *[f"privacy.{k}={v}" for k, v in cfg_dp.items()]])
    strategy = with_privacy(make_strategy("fedavg", StrategyConfig(r=2, lora_alpha=2.0)), cfg)
    model = FakeModel(start())
    run = RunDir(tmp_path)
    run_rounds(RoundPlan(rounds=2, seed=3, train=TrainConfig()), run, model, strategy,
               FakeDispatcher(clients(5, cfg)), QUIET)
    rows = [r for r in run.read_metrics() if r["round"] >= 1]
    assert rows[1]["epsilon"] > rows[0]["epsilon"] > 0 and rows[0]["dp_noise_std"] == pytest.approx(0.5 / 5)
    clean = start()[KEYS[0]] + 2 * sum(step(f"c{i}") for i in range(5)) / 5
    assert not torch.allclose(model.current[KEYS[0]], clean, atol=1e-3)  # noise moved it
    assert isinstance(strategy, SecAggStrategy)


def test_only_linear_strategies_accept_secure_aggregation() -> None:
    from fedtune.config import ConfigError

    with pytest.raises(ConfigError, match="strategy.name: privacy.secagg needs a linear strategy"):
        load_config(None, ["privacy.secagg=true", "strategy.name=svd"])
    with pytest.raises(ConfigError, match="client.encoding: sparse_coo cannot carry"):
        load_config(None, ["privacy.secagg=true", "client.encoding=sparse_coo"])
    assert PrivacyConfig().secagg is False


def test_the_tolerated_dropouts_are_said_and_recorded(tmp_path: Path, fake_training: None) -> None:
    """With 3 clients (k = 2, t = 2: a client does not count its own share) one dropout aborts the round, and
    the startup note and the abort both say so; a larger round records how many it tolerates."""
    from fedtune.privacy.secagg_strategy import tolerance, tolerance_note

    pv = PrivacyConfig(secagg=True)
    assert tolerance(3, pv) == (2, 2, 0)
    assert "survives up to 0 dropout(s)" in tolerance_note(3, pv) and "aborts the round" in tolerance_note(3, pv)
    assert tolerance(100, PrivacyConfig(secagg=True, secagg_threshold=1 / 3)) == (16, 6, 10)
    assert "aborts" not in tolerance_note(100, pv)
    _, rows = drive(tmp_path / "three", 3, drop={(1, "secagg_upload"): {"c0"}})
    assert not rows[0]["applied"] and "(k = 2, t = 2: up to 0 dropouts tolerated)" in rows[0]["failures"]["secagg"]
    _, rows = drive(tmp_path / "four", 4)
    assert rows[0]["applied"]
    assert (rows[0]["secagg_k"], rows[0]["secagg_t"], rows[0]["secagg_dropouts_tolerated"]) == (3, 2, 1)


def test_a_client_does_not_upload_a_non_finite_update(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server cannot screen a masked vector, so the client does: c1's NaN update stays home with the
    reason, and the others' mean goes on without it."""
    def train(ctx: ClientContext, ins: Instructions) -> ClientReply:
        bad = ins.client_id == "c1"
        return ClientReply(ins.client_id, ins.round,
                           {k: v + (float("nan") if bad else step(ins.client_id)) for k, v in ins.state.items()}, 7)
    monkeypatch.setattr(sa_client, "train_phase", train)
    model, rows = drive(tmp_path, 5, clip_norm=10.0)
    assert rows[0]["applied"] and rows[0]["clients_ok"] == 4
    assert "the update is not finite" in rows[0]["failures"]["c1"]
    want = sum(step(c) for c in ("c0", "c2", "c3", "c4")) / 4
    assert all(torch.allclose(model.current[k], start()[k] + want, atol=1e-6) for k in KEYS)


def test_the_clipped_update_is_the_exact_float64_difference_scaled_to_the_bound() -> None:
    """``clipped_delta``: every tensor's difference widened to float64 (bf16 and float32 alike), in key order,
    scaled to the bound only when longer; the norm before clipping is returned."""
    g = torch.Generator().manual_seed(0)
    ref = {"a": torch.randn(3, 5, generator=g), "b": torch.randn(7, generator=g).to(torch.bfloat16)}
    values = {k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in ref.items()}
    keys = ["b", "a"]
    exact = torch.cat([(values[k].double() - ref[k].double()).reshape(-1) for k in keys]).numpy()
    norm = float(np.linalg.norm(exact))
    delta, got = sa_client.clipped_delta(values, ref, keys, bound=10.0)
    assert delta.dtype == np.float64 and np.array_equal(delta, exact) and got == pytest.approx(norm, rel=1e-12)
    delta, got = sa_client.clipped_delta(values, ref, keys, bound=norm / 2)
    assert np.allclose(delta, exact / 2, rtol=1e-12) and np.linalg.norm(delta) == pytest.approx(norm / 2)
    assert sa_client.clipped_delta(values, ref, [], bound=1.0)[0].size == 0
