"""The ``[privacy]`` section: client-level DP-FedAvg and secure aggregation settings, checked before any model loads.

This module imports no torch. Importing it registers the ``dp_clip`` update transform (``client.pipeline``),
whose tensor code is loaded only when a pipeline is built.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from fedtune.client.pipeline import Transform, register_transform
from fedtune.sections import opt
from fedtune.strategies.specs import REGISTRY

if TYPE_CHECKING:
    from fedtune.config import Config


@dataclass(frozen=True)
class PrivacyConfig:
    dp: Literal["off", "central", "distributed"] = opt(
        "off", "client-level DP-FedAvg: off; central (clients clip with the dp_clip transform, the server "
        "clips again, adds Gaussian noise to the sum and accounts epsilon every round); or distributed (needs "
        "privacy.secagg: each client adds its share of discrete Gaussian noise to its fixed-point update, so "
        "the server never holds an un-noised sum)")
    clip_norm: float = opt(1.0, "L2 bound of each client's update (its delta from the global adapter); with "
                                "privacy.clip=adaptive, the first round's bound")
    clip: Literal["fixed", "adaptive"] = opt(
        "fixed", "fixed: privacy.clip_norm every round; adaptive: the bound follows privacy.clip_quantile of the "
                 "update norms (Andrew et al. 2021), from a noisy count of the clients it did not clip")
    clip_quantile: float = opt(0.5, "with privacy.clip=adaptive: the fraction of updates left unclipped the "
                                    "bound aims at")
    clip_lr: float = opt(0.2, "with privacy.clip=adaptive: the geometric step, bound *= exp(-clip_lr * "
                              "(unclipped fraction - clip_quantile))")
    clip_count_noise: float = opt(0.0, "with privacy.clip=adaptive: std of the Gaussian noise on the count of "
                                       "unclipped clients (0: the expected clients per round / 20, the paper's "
                                       "choice); must exceed privacy.noise_multiplier / 2")
    noise_multiplier: float = opt(1.0, "Gaussian noise std on the sum of updates, in units of privacy.clip_norm")
    sample_rate: float = opt(0.1, "with privacy.dp: each client joins a round independently with this "
                                  "probability (Poisson sampling; the run's clients_per_round must be 0)")
    delta: float = opt(1e-5, "the delta epsilon is reported at")
    accountant: Literal["pld", "rdp"] = opt("pld", "privacy accountant of dp-accounting: pld (tighter) or rdp")
    target_epsilon: float | None = opt(None, "stop training before a round would take epsilon past this "
                                             "(unset: no budget)")
    secagg: bool = opt(False, "secure aggregation: the server learns only the sum of the clipped updates "
                              "(four phases a round; linear strategies only; see the README's Privacy section)")
    secagg_neighbours: int = opt(0, "neighbours each client shares keys with (k-regular graph, rounded up to even); "
                                    "0: 2 ceil(log2 n) + 2")
    secagg_threshold: float = opt(0.5, "a secret is rebuilt from more than this fraction of a client's neighbours "
                                       "(t); fewer survivors abort the round")

    def validate(self) -> list[str]:
        p = []
        if self.clip_norm <= 0 or not math.isfinite(self.clip_norm):
            p.append(f"privacy.clip_norm: got {self.clip_norm}, must be a finite number > 0")
        if self.noise_multiplier < 0:
            p.append(f"privacy.noise_multiplier: got {self.noise_multiplier}, must be >= 0")
        if self.dp != "off" and self.noise_multiplier == 0:
            p.append("privacy.noise_multiplier: 0 gives no privacy (epsilon is infinite); set it > 0 or "
                     "privacy.dp=off")
        if not 0 < self.sample_rate <= 1:
            p.append(f"privacy.sample_rate: got {self.sample_rate}, must be in (0, 1]")
        if not 0 < self.delta < 1:
            p.append(f"privacy.delta: got {self.delta}, must be in (0, 1)")
        if self.secagg_neighbours < 0:
            p.append(f"privacy.secagg_neighbours: got {self.secagg_neighbours}, must be >= 0 (0: the default)")
        if not 0 < self.secagg_threshold < 1:
            p.append(f"privacy.secagg_threshold: got {self.secagg_threshold}, must be in (0, 1)")
        if not 0 < self.clip_quantile < 1:
            p.append(f"privacy.clip_quantile: got {self.clip_quantile}, must be in (0, 1)")
        if not 0 < self.clip_lr <= 10:
            p.append(f"privacy.clip_lr: got {self.clip_lr}, must be in (0, 10]")
        if self.clip_count_noise < 0 or not math.isfinite(self.clip_count_noise):
            p.append(f"privacy.clip_count_noise: got {self.clip_count_noise}, must be >= 0 (0: the default)")
        elif self.clip == "adaptive" and 0 < self.clip_count_noise <= self.noise_multiplier / 2:
            p.append(f"privacy.clip_count_noise: got {self.clip_count_noise}, must exceed privacy.noise_multiplier "
                     f"/ 2 = {self.noise_multiplier / 2:g} (the update's noise is what remains of "
                     "privacy.noise_multiplier after the count's; Andrew et al. 2021, Theorem 1)")
        if self.target_epsilon is not None and self.target_epsilon <= 0:
            p.append(f"privacy.target_epsilon: got {self.target_epsilon}, must be > 0 (or unset)")
        return p


def privacy_problems(cfg: Config) -> list[str]:
    """What ``cfg.privacy`` rules out elsewhere in the config, each naming the key to change."""
    pv = cfg.privacy
    p = pv.validate()
    if pv.dp == "off" and pv.target_epsilon is not None:
        p.append("privacy.target_epsilon: needs privacy.dp=central or distributed (without DP there is no epsilon)")
    if pv.dp == "off" and pv.clip == "adaptive":
        p.append("privacy.clip: adaptive needs privacy.dp=central or distributed (it is DP's clipping bound)")
    if pv.dp == "distributed" and not pv.secagg:
        p.append("privacy.dp: distributed needs privacy.secagg=true (without secure aggregation the server would "
                 "see each update with only its share of the noise); set privacy.secagg=true or privacy.dp=central")
    if pv.secagg and cfg.client.encoding.startswith("sparse"):
        p.append(f"client.encoding: {cfg.client.encoding} cannot carry secure aggregation's masked uint32 words "
                 "(they are dense by design); use dense, bf16, int8 or fixed_u32")
    if pv.secagg and ("compress" in cfg.client.pipeline or cfg.compress.downlink):
        p.append("privacy.secagg: compress cannot apply to the masked upload: per-client top-k, threshold and "
                 "random-k send supports that differ from client to client, which secure aggregation cannot sum "
                 "(and the indices would show where each update is large); sign / int8 / int4 codes would be "
                 "re-encoded as its fixed-point uint32 words anyway. Remove compress from client.pipeline (and "
                 "compress.downlink) or set privacy.secagg=false; a shared mask works: mask.density < 1 with "
                 "mask.score=global")
    if pv.dp == "off" and not pv.secagg:
        return p
    what = "privacy.dp" if pv.dp != "off" else "privacy.secagg"
    spec = REGISTRY.get(cfg.strategy.name)
    linear = "fedavg, fedprox, ffa, fedavgm, fedadam, fedyogi, fedadagrad"
    if spec is not None and (not spec.linear or spec.fixed.get("robust", "none") != "none"):
        p.append(f"strategy.name: {what} needs a linear strategy ({linear}); {cfg.strategy.name!r} is refused: "
                 "its aggregate is not a sum of the updates (secure aggregation reveals only the sum; DP noise on "
                 "the sum would not cover one client's influence)")
    elif cfg.strategy.robust != "none":
        p.append(f"strategy.robust: must be none with {what}, not {cfg.strategy.robust!r} (a robust aggregate "
                 "is not a sum of the updates)")
    if pv.dp == "off":
        return p
    if "dp_clip" not in cfg.client.pipeline:
        p.append("client.pipeline: privacy.dp needs the dp_clip transform (client.pipeline=[\"dp_clip\"], "
                 "before any compression)")
    for section in ("sim", "federation"):
        if getattr(cfg, section).clients_per_round != 0:
            p.append(f"{section}.clients_per_round: must be 0 with privacy.dp (clients are Poisson-sampled with "
                     f"privacy.sample_rate, which is what the accountant assumes)")
    return p


def _dp_clip(cfg: Config) -> Transform:
    transform: Transform = importlib.import_module("fedtune.privacy.dp").ClipTransform(cfg.privacy.clip_norm)
    return transform


register_transform("dp_clip", _dp_clip)
