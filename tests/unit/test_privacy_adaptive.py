"""Adaptive clipping (Andrew et al. 2021): the noise split between the update and the count, the geometric
step, the bound converging to the target quantile of the update norms, the bound travelling to the clients
and into checkpoints, and the accountant charging the configured noise multiplier."""

from __future__ import annotations

import math
import random

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting import rdp

from fedtune.config import ConfigError, load_config
from fedtune.privacy.config import PrivacyConfig
from fedtune.privacy.dp import (
    ClipTransform,
    DPStrategy,
    adaptive_clip_step,
    round_clip_norm,
    update_noise_multiplier,
)
from fedtune.strategies import StrategyConfig, make_strategy
from fedtune.types import ClientReply, Instructions

KEY = "m.q.lora_A.weight"


def adaptive(**kw: object) -> DPStrategy:
    privacy = PrivacyConfig(**{"dp": "central", "clip": "adaptive", "accountant": "rdp", "sample_rate": 1.0,
                               **kw})  # type: ignore[arg-type]
    return DPStrategy(make_strategy("fedavg", StrategyConfig(r=2, lora_alpha=2.0)), privacy, seed=11)


def round_with_norms(strategy: DPStrategy, rnd: int, norms: list[float]) -> dict[str, float]:
    """One round where client i's update has L2 norm ``norms[i]`` (along the first axis)."""
    zero = {KEY: torch.zeros(4)}
    ids = [f"c{i}" for i in range(len(norms))]
    ins = strategy.configure(rnd, ids, zero, random.Random(rnd))
    replies = [ClientReply(c, rnd, {KEY: torch.tensor([norms[int(c[1:])], 0.0, 0.0, 0.0])}, 1) for c in ins]
    return strategy.aggregate(rnd, zero, replies).metrics


def test_the_update_keeps_what_the_count_leaves_of_the_noise_multiplier() -> None:
    # z = 1, sigma_b = 5: z_delta = (1 - 1/100)^-1/2 = 1.00503781525921...
    assert update_noise_multiplier(1.0, 5.0) == pytest.approx(1.0050378152592121, rel=1e-12)
    # z = 2, sigma_b = 1.25: (1/4 - 1/6.25)^-1/2 = (0.09)^-1/2 = 10/3
    assert update_noise_multiplier(2.0, 1.25) == pytest.approx(10 / 3, rel=1e-12)
    with pytest.raises(ValueError, match="privacy.clip_count_noise"):
        update_noise_multiplier(1.0, 0.5)  # 2 sigma_b = z: nothing left for the update


@pytest.mark.parametrize(("z", "sigma_b"), [(1.0, 5.0), (0.8, 0.6), (3.0, 10.0)])
def test_update_and_count_together_are_one_gaussian_of_the_configured_multiplier(z: float, sigma_b: float) -> None:
    # the count query (b - 1/2) has sensitivity 1/2: its noise multiplier is 2 sigma_b
    both = rdp.RdpAccountant()
    both.compose(dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(update_noise_multiplier(z, sigma_b)),
                                                dp_accounting.GaussianDpEvent(2 * sigma_b)]), 10)
    one = rdp.RdpAccountant()
    one.compose(dp_accounting.GaussianDpEvent(z), 10)
    assert both.get_epsilon(1e-5) == pytest.approx(one.get_epsilon(1e-5), rel=1e-9)


def test_the_geometric_step_by_hand() -> None:
    assert adaptive_clip_step(1.0, 0.8, 0.5, 0.2) == pytest.approx(math.exp(-0.06))  # too few clipped: shrink
    assert adaptive_clip_step(2.0, 0.1, 0.5, 0.2) == pytest.approx(2 * math.exp(0.08))  # too many: grow
    assert adaptive_clip_step(3.0, 0.5, 0.5, 0.2) == 3.0


@pytest.mark.parametrize("quantile", [0.5, 0.8])
def test_the_bound_converges_to_the_quantile_of_the_update_norms(quantile: float) -> None:
    norms = np.random.default_rng(0).lognormal(mean=0.0, sigma=0.5, size=100).tolist()
    want = float(np.quantile(norms, quantile))
    strategy = adaptive(clip_norm=0.05, clip_quantile=quantile, clip_lr=0.2, noise_multiplier=0.5)  # 20x too low
    seen = []
    for rnd in range(1, 81):
        metrics = round_with_norms(strategy, rnd, norms)
        seen.append(metrics["dp_clip_norm"])
    late = seen[-30:]
    assert np.mean(late) == pytest.approx(want, rel=0.08)
    unclipped = np.mean([n <= strategy.clip for n in norms])
    assert unclipped == pytest.approx(quantile, abs=0.1)


def test_the_count_noise_is_the_configured_std_and_the_accountant_charges_z() -> None:
    strategy = adaptive(clip_norm=1.0, clip_count_noise=2.0, noise_multiplier=1.0, clip_quantile=0.5, clip_lr=0.3)
    # 10 clients, 3 of norm 0.5 (unclipped) and 7 of norm 4: sum (b - 1/2) = 3 - 5 = -2
    metrics = round_with_norms(strategy, 1, [0.5] * 3 + [4.0] * 7)
    gen = torch.Generator().manual_seed((11 * 1_000_003 + 1) % 2**63)
    torch.randn(4, generator=gen)  # the update's noise comes first
    count_noise = float(torch.randn((), generator=gen)) * 2.0
    fraction = (-2 + count_noise) / 10 + 0.5
    assert metrics["dp_unclipped_fraction"] == pytest.approx(fraction, rel=1e-6)
    assert strategy.clip == pytest.approx(math.exp(-0.3 * (fraction - 0.5)), rel=1e-6)
    assert metrics["dp_noise_multiplier"] == 1.0  # what the accountant charged: z, not z_delta
    assert metrics["dp_noise_std"] == pytest.approx(update_noise_multiplier(1.0, 2.0) * 1.0 / 10)
    assert metrics["dp_clipped"] == 7 and metrics["dp_clip_norm"] == 1.0


def test_the_default_count_noise_is_the_expected_clients_over_20() -> None:
    strategy = adaptive(noise_multiplier=1.0, sample_rate=0.5)
    strategy.configure(1, [f"c{i}" for i in range(400)], {KEY: torch.zeros(4)}, random.Random(0))
    assert strategy.noise_split() == (pytest.approx(update_noise_multiplier(1.0, 10.0)), 10.0)
    few = adaptive(noise_multiplier=1.0)  # 10 expected clients: default count noise 0.5 = z / 2, refused up front
    with pytest.raises(ValueError, match="privacy.clip_count_noise: 0.5 must exceed"):
        few.configure(1, [f"c{i}" for i in range(10)], {KEY: torch.zeros(4)}, random.Random(0))


def test_the_bound_travels_to_the_clients_and_into_the_checkpoint() -> None:
    strategy = adaptive(clip_norm=1.0, noise_multiplier=0.5, clip_count_noise=1.0)
    round_with_norms(strategy, 1, [0.01] * 10)  # nobody clipped: the bound shrinks
    assert strategy.clip < 1.0
    ins = strategy.configure(2, ["a"], {KEY: torch.zeros(4)}, random.Random(0))
    assert all(i.extra["dp_clip_norm"] == strategy.clip for i in ins.values())
    # the client's dp_clip takes the server's bound over its own privacy.clip_norm
    big = ClientReply("a", 2, {KEY: torch.tensor([3.0, 4.0, 0.0, 0.0])}, 1)
    out, _ = ClipTransform(1.0).apply(big, ins["a"], {})
    assert float(out.state[KEY].norm()) == pytest.approx(strategy.clip, rel=1e-5)
    again = adaptive(clip_norm=1.0, noise_multiplier=0.5, clip_count_noise=1.0)
    again.load_state_dict(strategy.state_dict())
    assert again.clip == strategy.clip


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), "1", True])
def test_a_bad_bound_from_the_server_is_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="dp_clip_norm"):
        round_clip_norm(Instructions(1, "a", {}, extra={"dp_clip_norm": bad}), 1.0)


def test_refused_adaptive_settings_name_the_key() -> None:
    with pytest.raises(ConfigError, match="privacy.clip: adaptive needs privacy.dp"):
        load_config(None, ["privacy.clip=adaptive"])
    with pytest.raises(ConfigError, match="privacy.clip_count_noise: got 0.5, must exceed"):
        load_config(None, ["privacy.dp=central", "client.pipeline=[dp_clip]", "sim.clients_per_round=0",
                           "federation.clients_per_round=0", "privacy.clip=adaptive", "privacy.noise_multiplier=1.0",
                           "privacy.clip_count_noise=0.5"])
    with pytest.raises(ConfigError, match="privacy.clip_quantile"):
        load_config(None, ["privacy.clip_quantile=1.0"])


def test_privacy_plan_shows_the_update_s_share_with_adaptive_clipping(capsys: pytest.CaptureFixture[str]) -> None:
    from fedtune.cli import main

    assert main(["privacy", "plan", "--clients", "1000", "--rate", "0.1", "--rounds", "100", "--noise", "1.0",
                 "--accountant", "rdp", "--adaptive"]) == 0
    out = capsys.readouterr().out
    assert "7.904" in out and "count noise 5 " in out and "noise multiplier 1.0050" in out  # 100 expected / 20
    assert main(["privacy", "plan", "--clients", "100", "--rate", "0.1", "--rounds", "10", "--noise", "1.0",
                 "--accountant", "rdp", "--adaptive"]) == 2  # count noise 0.5 = z / 2
    assert "--count-noise: 0.5 must exceed" in capsys.readouterr().err
