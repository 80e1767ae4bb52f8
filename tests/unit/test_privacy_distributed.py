"""Distributed DP over secure aggregation (privacy.dp=distributed): the exact discrete Gaussian sampler, the
noise multiplier a round is charged at, the noise in the unmasked sum, dropouts lowering it, and adaptive
clipping's count travelling in the same masked sum."""

from __future__ import annotations

import io
import math
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting import rdp
from fakes import FakeDispatcher, FakeModel
from rich.console import Console

import fedtune.privacy.client as sa_client
from fedtune.client.phases import ClientContext, run_phase
from fedtune.config import ConfigError, TrainConfig, load_config
from fedtune.privacy import secagg
from fedtune.privacy.distributed import discrete_gaussian, noise_multiplier
from fedtune.privacy.dp import adaptive_clip_step, update_noise_multiplier
from fedtune.privacy.wrap import with_privacy
from fedtune.rounds import RoundPlan, run_rounds
from fedtune.runs import RunDir
from fedtune.strategies import StrategyConfig, make_strategy
from fedtune.types import ClientReply, Instructions

KEY = "m.q.lora_A.weight"
QUIET = Console(file=io.StringIO())
DP = ["privacy.secagg=true", "privacy.dp=distributed", "client.pipeline=[dp_clip]", "sim.clients_per_round=0",
      "federation.clients_per_round=0", "privacy.sample_rate=1.0", "privacy.accountant=rdp", "privacy.delta=1e-5"]


def still(ctx: ClientContext, ins: Instructions) -> ClientReply:
    """Training that changes nothing: the unmasked sum is the clients' noise alone."""
    return ClientReply(ins.client_id, ins.round, {k: v.clone() for k, v in ins.state.items()}, 3)


def drive(tmp: Path, n: int, overrides: list[str], size: int = 4000, rounds: int = 1, drop=None,
          server: list[str] | None = None, clients: dict[str, list[str]] | None = None):
    """``n`` clients under distributed DP; ``server`` replaces the server's config overrides, ``clients``
    gives some clients their own (else they share the server's config)."""
    cfg = load_config(None, [*DP, *overrides])
    server_cfg = cfg if server is None else load_config(None, server)
    strategy = with_privacy(make_strategy("fedavg", StrategyConfig(r=2, lora_alpha=2.0)), server_cfg)
    model = FakeModel({KEY: torch.zeros(size)})
    own = {c: load_config(None, [*DP, *o]) for c, o in (clients or {}).items()}
    ctxs = {f"c{i}": ClientContext(own.get(f"c{i}", cfg), None, [], pipeline=[])  # type: ignore[arg-type]
            for i in range(n)}
    clients = {c: (lambda ins, ctx=ctx: run_phase(ctx, ins)) for c, ctx in ctxs.items()}
    run = RunDir(tmp)
    run_rounds(RoundPlan(rounds=rounds, seed=5, train=TrainConfig()), run, model, strategy,
               FakeDispatcher(clients, drop=drop), QUIET)
    return model, [r for r in run.read_metrics() if r["round"] >= 1], strategy


@pytest.mark.parametrize("std", [0.7, 3.0, 40.0])
def test_the_discrete_gaussian_has_the_asked_variance_on_the_integers(std: float) -> None:
    x = discrete_gaussian(std, 40_000)
    assert x.dtype == np.int64
    # the variance of a discrete Gaussian of parameter sigma is sigma^2 (1 - O(e^-2 pi^2 sigma^2)), and below
    # sigma = 1 measurably less; sd of the sample variance is sigma^2 sqrt(2 / 40000) = 0.7%
    if std >= 3:
        assert x.var() == pytest.approx(std**2, rel=0.04)
    else:
        assert 0.7 * std**2 < x.var() < std**2 * 1.04
    assert abs(x.mean()) < 5 * std / 200
    assert not discrete_gaussian(0.0, 5).any()
    with pytest.raises(ValueError, match="noise std"):
        discrete_gaussian(-1.0, 3)


def test_the_charged_noise_multiplier_by_hand() -> None:
    # no rounding (C s = 1e12 over 1 word) and no dropout: exactly the configured z, fixed or adaptive
    assert noise_multiplier(1.3, 0.0, 1.0, 1e12, 1, 10, 10) == pytest.approx(1.3, rel=1e-9)
    z_u = update_noise_multiplier(1.3, 2.0)
    assert noise_multiplier(z_u, 2.0, 1.0, 1e12, 1, 10, 10) == pytest.approx(1.3, rel=1e-9)
    # 4 of 10 dropped: the sum holds 6/10 of the variance
    assert noise_multiplier(1.3, 0.0, 1.0, 1e12, 1, 10, 6) == pytest.approx(1.3 * math.sqrt(0.6), rel=1e-9)
    # rounding: C s = 100, 400 words -> sensitivity 100 + 10 = 110 integer units against std 130
    assert noise_multiplier(1.3, 0.0, 1.0, 100.0, 400, 10, 10) == pytest.approx(130 / 110, rel=1e-9)


def test_the_unmasked_sum_holds_the_target_noise_and_epsilon_is_charged(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sa_client, "train_phase", still)
    model, rows, _ = drive(tmp_path, 5, ["privacy.noise_multiplier=1.5", "privacy.clip_norm=0.2"])
    noise = model.current[KEY].double()
    want = 1.5 * 0.2 / 5  # z C / (q N) on the mean
    assert float(noise.std()) == pytest.approx(want, rel=0.05)  # 4000 values: sd of the std 1.1%
    assert abs(float(noise.mean())) < 5 * want / 4000**0.5
    z = rows[0]["dp_noise_multiplier"]
    assert z == pytest.approx(1.5, rel=1e-3) and z <= 1.5  # rounding costs a hair
    acc = rdp.RdpAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(z))
    assert rows[0]["epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)


def test_the_server_never_holds_the_un_noised_sum(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    unmask = secagg.SecAggServer.unmask

    def spy(self, answers):
        total = unmask(self, answers)
        seen.append(total.copy())
        return total

    monkeypatch.setattr(secagg.SecAggServer, "unmask", spy)
    monkeypatch.setattr(sa_client, "train_phase", still)
    drive(tmp_path, 4, ["privacy.noise_multiplier=1.0", "privacy.clip_norm=1.0"], size=2000)
    words = secagg.dequantize(seen[0], 1.0).astype(np.int64)  # the un-noised sum is all zeros
    assert (words != 0).mean() > 0.99


def test_a_dropout_lowers_the_noise_and_the_charge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sa_client, "train_phase", still)
    model, rows, _ = drive(tmp_path, 6, ["privacy.noise_multiplier=2.0", "privacy.clip_norm=0.3"],
                           drop={(1, "secagg_upload"): {"c2", "c5"}})
    assert rows[0]["applied"] and rows[0]["clients_ok"] == 4
    assert rows[0]["dp_noise_multiplier"] == pytest.approx(2.0 * math.sqrt(4 / 6), rel=1e-3)
    want = 2.0 * math.sqrt(4 / 6) * 0.3 / 6
    assert float(model.current[KEY].double().std()) == pytest.approx(want, rel=0.05)


def test_adaptive_clipping_counts_in_the_masked_sum(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def train(ctx: ClientContext, ins: Instructions) -> ClientReply:  # c0, c1: norm 0.01; the rest: norm 5
        step = 0.01 if ins.client_id in ("c0", "c1") else 5.0
        return ClientReply(ins.client_id, ins.round, {KEY: ins.state[KEY] + step / 20}, 3)  # 400 values

    monkeypatch.setattr(sa_client, "train_phase", train)
    _, rows, _ = drive(tmp_path, 6, ["privacy.noise_multiplier=0.5", "privacy.clip_norm=1.0",
                                            "privacy.clip=adaptive", "privacy.clip_count_noise=0.3"],
                              size=400, rounds=2)
    # 2 of 6 unclipped: fraction 2/6 plus noise of std 0.3 / 6 = 0.05 (4 sd: 0.2)
    first = rows[0]["dp_unclipped_fraction"]
    assert first == pytest.approx(2 / 6, abs=0.2)
    assert rows[1]["dp_clip_norm"] == pytest.approx(adaptive_clip_step(1.0, first, 0.5, 0.2), rel=1e-9)
    assert rows[0]["dp_noise_multiplier"] == pytest.approx(0.5, rel=1e-3)
    assert rows[0]["dp_noise_std"] == pytest.approx(update_noise_multiplier(0.5, 0.3) / 6, rel=1e-6)


def test_distributed_needs_secure_aggregation() -> None:
    with pytest.raises(ConfigError, match="privacy.dp: distributed needs privacy.secagg=true"):
        load_config(None, [d for d in DP if d != "privacy.secagg=true"])


def test_clients_refuse_less_noise_than_their_own_floor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server configured (or tampered) to ask for noise multiplier 0.5 from clients that agreed to 1.0: every
    client refuses with the reason, the round aborts and the model stays."""
    monkeypatch.setattr(sa_client, "train_phase", still)
    model, rows, _ = drive(tmp_path, 5, ["privacy.noise_multiplier=1.0", "privacy.clip_norm=1.0"], size=50,
                           server=[*DP, "privacy.noise_multiplier=0.5", "privacy.clip_norm=1.0"])
    assert not rows[0]["applied"]
    assert not model.current[KEY].any()
    refused = [why for c, why in rows[0]["failures"].items() if c != "secagg"]
    assert len(refused) == 5
    assert all("noise of multiplier 0.5 over its 5 participants, below this client's privacy.noise_multiplier = 1"
               in why for why in refused), refused


def test_a_client_refuses_a_server_that_asks_for_no_noise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sa_client, "train_phase", still)
    _, rows, _ = drive(tmp_path, 4, ["privacy.noise_multiplier=1.0"], size=50,
                       server=["privacy.secagg=true", "sim.clients_per_round=0"])
    assert not rows[0]["applied"]
    assert all("the server asked for no noise, but this client's privacy.dp=distributed" in why
               for c, why in rows[0]["failures"].items() if c != "secagg")


def test_one_client_with_a_higher_floor_leaves_and_the_round_goes_on(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """c2 agreed only to multiplier 3; the server asks for 2: c2 refuses, the others' sum is unmasked as for a
    client that dropped out after sharing keys, and the charge is for the noise of the 5 that added it."""
    monkeypatch.setattr(sa_client, "train_phase", still)
    _, rows, _ = drive(tmp_path, 6, ["privacy.noise_multiplier=2.0", "privacy.clip_norm=0.3"], size=200,
                       clients={"c2": ["privacy.noise_multiplier=3.0", "privacy.clip_norm=0.3"]})
    assert rows[0]["applied"] and rows[0]["clients_ok"] == 5
    assert "below this client's privacy.noise_multiplier = 3" in rows[0]["failures"]["c2"]
    assert rows[0]["dp_noise_multiplier"] == pytest.approx(2.0 * math.sqrt(5 / 6), rel=1e-3)


def test_the_count_word_noise_has_its_own_floor() -> None:
    cfg = load_config(None, [*DP, "privacy.noise_multiplier=0.5", "privacy.clip=adaptive",
                             "privacy.clip_count_noise=0.3"])
    ctx = ClientContext(cfg, None, [], pipeline=[])  # type: ignore[arg-type]
    # 4 participants, bound 2: update std 0.6 -> multiplier 0.6 * 2 / 2 = 0.6 >= 0.5
    assert sa_client._noise_shares(ctx, [0.6, 0.3], True, 2.0, 4) == (0.6, 0.3)  # count: 0.3 * 2 / 2 = 0.3
    why = sa_client._noise_shares(ctx, [0.6, 0.2], True, 2.0, 4)
    assert isinstance(why, str) and "count noise of std 0.2, below this client's floor 0.3" in why
    assert isinstance(sa_client._noise_shares(ctx, [0.4, 0.3], True, 2.0, 4), str)  # update: 0.4 < 0.5
    off = ClientContext(load_config(None, ["privacy.secagg=true"]), None, [], pipeline=[])  # type: ignore[arg-type]
    assert sa_client._noise_shares(off, None, False, 2.0, 4) is None  # no DP of its own: nothing to hold to
