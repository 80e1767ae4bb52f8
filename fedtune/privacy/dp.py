"""Client-level DP-FedAvg (McMahan et al. 2018): clip each client's update, Poisson-sample the clients, add
Gaussian noise to the sum, and count epsilon every round.

- ``ClipTransform`` (``client.pipeline = ["dp_clip"]``): a client scales its update ``delta = w - w_global``
  to L2 norm at most ``privacy.clip_norm`` before anything else sees it;
- ``DPStrategy`` wraps any linear strategy on the server (STYLE: server-side DP is a wrapper). Each round
  it samples every available client independently with probability ``q = privacy.sample_rate`` from the
  round driver's generator, clips every reply again (a client that skipped ``dp_clip`` changes nothing),
  and hands the wrapped strategy one averaged update::

      w_global + (sum_k clip(delta_k) + N(0, (z C)^2 I)) / (q N)

  with the fixed denominator ``q N`` of the expected sample size, so the sensitivity of the released sum is
  ``C`` whatever the sample turned out to be. Every client weighs the same (``num_examples`` would let one
  client move the sum by more than ``C``). The wrapped strategy then applies its own server step (momentum,
  Adam) to that mean. The noise comes from a generator seeded per (seed, round), so a resumed run adds the
  noise an uninterrupted one does.

Adaptive clipping (``privacy.clip = "adaptive"``, Andrew et al. 2021): the bound ``C`` follows the
``privacy.clip_quantile`` quantile ``gamma`` of the update norms. Each client contributes ``b_k - 1/2``, with
``b_k = 1`` when its norm was at most ``C`` (sensitivity 1/2); the server releases the noisy fraction
``f = (sum_k (b_k - 1/2) + N(0, sigma_b^2)) / (q N) + 1/2`` and steps ``C *= exp(-eta (f - gamma))``. The count's
noise is paid for out of the configured ``z``: the update's noise multiplier becomes
``z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2`` (the paper's Theorem 1), so the two Gaussian releases together are
one Gaussian mechanism of noise multiplier ``z`` and the accountant charges ``(q, z)`` as before. The bound of
the next round travels in the instructions (``dp_clip_norm``), so clients clip with the server's ``C``.

With ``privacy.dp = "distributed"`` (secure aggregation only) the clients add the noise, and ``release`` gets a
sum that already holds it, with the noise multiplier it amounts to (``distributed.noise_multiplier``).

The accountant (``accounting.Accountant``) is part of ``state_dict``, so a checkpoint carries it and a resumed
run continues the count; ``stop_before`` tells the round driver when the next round would take epsilon past
``privacy.target_epsilon``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from fedtune.privacy.accounting import Accountant
from fedtune.privacy.config import PrivacyConfig
from fedtune.strategies.base import PhaseResult, Rng, RoundResult, Strategy, valid_replies
from fedtune.types import ClientReply, Instructions, State


def clip_delta(values: State, reference: State, clip_norm: float) -> tuple[State, float]:
    """``values`` moved towards ``reference`` so that ``values - reference`` has L2 norm at most ``clip_norm``
    (over all tensors of ``values`` together); returns them and the norm before clipping."""
    deltas = {k: v.float() - reference[k].float() for k, v in values.items()}
    norm = float(torch.stack([d.norm() for d in deltas.values()]).norm()) if deltas else 0.0
    factor = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: (reference[k].float() + d * factor).to(values[k].dtype) for k, d in deltas.items()}, norm


class ClipTransform:
    """The ``dp_clip`` update transform: the update's L2 norm clipped to ``clip_norm``; stateless."""

    def __init__(self, clip_norm: float) -> None:
        self.clip_norm = clip_norm

    def apply(self, reply: ClientReply, ins: Instructions, state: State) -> tuple[ClientReply, State]:
        if reply.state is None:
            return reply, state
        missing = [k for k in reply.state if k not in ins.state]
        if missing:
            raise ValueError(f"cannot clip {missing[0]}: the instructions did not send it")
        clipped, norm = clip_delta(reply.state, ins.state, round_clip_norm(ins, self.clip_norm))
        reply.state = clipped
        reply.metrics["update_norm"] = norm
        return reply, {}


def round_clip_norm(ins: Instructions, default: float) -> float:
    """The bound the server sent for this round (``dp_clip_norm``, adaptive clipping), else ``default``.

    Raises:
        ValueError: a bound that is not a finite number > 0.
    """
    value = ins.extra.get("dp_clip_norm", default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise ValueError(f"dp_clip_norm from the server must be a finite number > 0, got {str(value)[:40]!r}")
    return float(value)


def update_noise_multiplier(noise_multiplier: float, count_noise: float) -> float:
    """The update's share ``z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2`` of the noise multiplier ``z`` when the
    count of unclipped clients takes noise of std ``sigma_b`` (Andrew et al. 2021, Theorem 1).

    Raises:
        ValueError: ``2 sigma_b <= z`` (the count alone would spend the whole budget).
    """
    if 2 * count_noise <= noise_multiplier:
        raise ValueError(f"privacy.clip_count_noise: {count_noise:g} must exceed privacy.noise_multiplier / 2 = "
                         f"{noise_multiplier / 2:g} (raise it, or lower privacy.noise_multiplier)")
    return float((noise_multiplier ** -2 - (2 * count_noise) ** -2) ** -0.5)


def adaptive_clip_step(clip: float, unclipped_fraction: float, quantile: float, lr: float) -> float:
    """The next bound: ``clip * exp(-lr * (unclipped_fraction - quantile))`` (geometric update: the bound
    shrinks while more than ``quantile`` of the updates fit under it)."""
    return clip * math.exp(-lr * (unclipped_fraction - quantile))


def poisson_sample(client_ids: list[str], rate: float, rng: Rng) -> list[str]:
    """Each client independently with probability ``rate``, in input order (possibly none)."""
    draw = rng.random if isinstance(rng, random.Random) else lambda: float(rng.random())
    return [c for c in client_ids if draw() < rate]


class DPStrategy:
    """``inner`` (a linear strategy) with client-level central DP; see the module docstring."""

    def __init__(self, inner: Strategy, privacy: PrivacyConfig, seed: int) -> None:
        if not inner.linear:
            raise ValueError(f"privacy.dp needs a linear strategy; {inner.name!r} is not")
        self.inner, self.privacy, self.seed = inner, privacy, seed
        self.name, self.cfg, self.spec = inner.name, inner.cfg, inner.spec
        self.needs_all_replies, self.base_log = False, inner.base_log
        self.accountant = Accountant(privacy.delta, privacy.accountant)
        self._population = 0
        self.clip = privacy.clip_norm
        """This round's clipping bound (``privacy.clip_norm``, or where adaptive clipping has taken it)."""

    @property
    def linear(self) -> bool:
        return True

    def phases(self, round: int) -> Sequence[str]:
        return self.inner.phases(round)

    def sent_keys(self, global_state: State) -> list[str]:
        return self.inner.sent_keys(global_state)

    def stop_before(self, round: int) -> str | None:
        """Why round ``round`` must not run (it would spend past ``privacy.target_epsilon``), or None."""
        target = self.privacy.target_epsilon
        if target is None:
            return None
        after = self.accountant.epsilon(extra=(self.privacy.sample_rate, self.privacy.noise_multiplier))
        if after <= target:
            return None
        return (f"privacy budget: round {round} would take epsilon to {after:.3f}, past "
                f"privacy.target_epsilon={target:g} (spent {self.accountant.epsilon():.3f} in "
                f"{self.accountant.count} rounds)")

    def configure(self, round: int, client_ids: list[str], global_state: State, rng: Rng, *, phase: str = "train",
                  previous: PhaseResult | None = None) -> dict[str, Instructions]:
        """Poisson-sample ``client_ids`` with ``privacy.sample_rate``; the inner strategy instructs them all."""
        if previous is None:
            self._population = len(client_ids)
            self.noise_split()  # an impossible split of the noise fails here, before anyone trains
            client_ids = poisson_sample(client_ids, self.privacy.sample_rate, rng)
        out = self.inner.configure(round, client_ids, global_state, rng, phase=phase, previous=previous)
        for ins in out.values():
            ins.extra["dp_clip_norm"] = self.clip
        return out

    @property
    def adaptive(self) -> bool:
        return self.privacy.clip == "adaptive"

    def expected_clients(self) -> float:
        """``q N``: the expected sample size, the denominator of the released mean."""
        return max(self.privacy.sample_rate * max(self._population, 1), 1e-12)

    def noise_split(self) -> tuple[float, float]:
        """``(z_delta, sigma_b)``: the update's noise multiplier and the std of the noise on the count of
        unclipped clients; ``(z, 0)`` with a fixed bound."""
        z = self.privacy.noise_multiplier
        if not self.adaptive:
            return z, 0.0
        sigma_b = self.privacy.clip_count_noise or self.expected_clients() / 20
        return update_noise_multiplier(z, sigma_b), sigma_b

    def aggregate(self, round: int, global_state: State, replies: Iterable[ClientReply], *,
                  phase: str = "train") -> RoundResult | PhaseResult:
        if phase != self.phases(round)[-1]:
            return self.inner.aggregate(round, global_state, replies, phase=phase)
        if self.privacy.dp == "distributed":
            raise ValueError("privacy.dp=distributed needs privacy.secagg=true (the clients add the noise)")
        keys = self.sent_keys(global_state)
        failures: dict[str, str] = {}
        total = {k: torch.zeros_like(global_state[k], dtype=torch.float32) for k in keys}
        ok, norms = [], []
        for reply in valid_replies(replies, global_state, failures, keys=keys):
            assert reply.state is not None
            clipped, norm = clip_delta({k: reply.state[k] for k in keys}, global_state, self.clip)
            for k in keys:
                total[k] += clipped[k].float() - global_state[k].float()
            ok.append(reply.client_id)
            norms.append(norm)
        unclipped = sum(n <= self.clip for n in norms)
        return self.release(round, global_state, total, ok, failures, phase=phase, clipped=len(norms) - unclipped,
                            count=unclipped - len(norms) / 2)

    def release(self, round: int, global_state: State, total: State, ok: list[str], failures: dict[str, str], *,
                phase: str, clipped: int | None = None, count: float | None = None,
                noise_multiplier: float | None = None) -> RoundResult:
        """The noisy mean of ``total`` (the sum of the clipped deltas of ``ok``) through the inner strategy,
        with the round spent and epsilon in the metrics; with adaptive clipping, the next bound from ``count``
        (``sum_k (b_k - 1/2)``). Secure aggregation hands its unmasked sum here. ``noise_multiplier`` given:
        ``total`` and ``count`` already hold noise amounting to it (distributed DP), none is added."""
        keys = list(total)
        clip = self.clip
        z_update, sigma_b = self.noise_split()
        if noise_multiplier is None:
            noisy, noisy_count = self._noisy_sum(round, total, count, z_update * clip, sigma_b)
            spent = self.privacy.noise_multiplier
        else:
            noisy, noisy_count, spent = total, count, noise_multiplier
        noisy = {k: v / self.expected_clients() for k, v in noisy.items()}
        self.accountant.spend(self.privacy.sample_rate, spent)
        mean = ClientReply(client_id="dp-mean", round=round, num_examples=1,
                           state={k: (global_state[k].float() + noisy[k]).to(global_state[k].dtype) for k in keys})
        result = self.inner.aggregate(round, global_state, [mean], phase=phase)
        assert isinstance(result, RoundResult)
        applied = len(ok) >= self.cfg.min_replies
        result.applied = result.applied and applied
        if not applied:
            result.state = global_state
        result.clients_ok, result.clients_failed, result.failures = ok, list(failures), failures
        result.agg_error_layers = {}
        result.metrics.pop("agg_error", None)
        result.metrics.pop("agg_error_estimated", None)
        result.metrics.update({
            "clients_ok": float(len(ok)), "clients_failed": float(len(failures)),
            "epsilon": self.accountant.epsilon(), "delta": self.privacy.delta,
            "dp_rounds": float(self.accountant.count), "dp_sampled": float(len(ok) + len(failures)),
            "dp_noise_std": z_update * clip / self.expected_clients(), "dp_clip_norm": clip,
            "dp_noise_multiplier": spent,
        })
        if clipped is not None:
            result.metrics["dp_clipped"] = float(clipped)
        if self.adaptive and noisy_count is not None:
            fraction = noisy_count / self.expected_clients() + 0.5
            self.clip = adaptive_clip_step(clip, fraction, self.privacy.clip_quantile, self.privacy.clip_lr)
            result.metrics["dp_unclipped_fraction"] = fraction
        return result

    def _noisy_sum(self, round: int, total: State, count: float | None, std: float,
                   count_std: float) -> tuple[State, float | None]:
        """``total + N(0, std^2)`` and ``count + N(0, count_std^2)``, drawn from a generator of (seed, round)."""
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + round) % 2**63)
        noisy = {k: t + torch.randn(t.shape, generator=gen) * std for k, t in total.items()}
        if count is None:
            return noisy, None
        return noisy, count + float(torch.randn((), generator=gen)) * count_std

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(), "accountant": self.accountant.state_dict(), "clip": self.clip}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.inner.load_state_dict(state["inner"])
        self.accountant.load_state_dict(state["accountant"])
        self.clip = float(state.get("clip", self.privacy.clip_norm))


__all__ = ["ClipTransform", "DPStrategy", "adaptive_clip_step", "clip_delta", "poisson_sample", "round_clip_norm",
           "update_noise_multiplier"]
