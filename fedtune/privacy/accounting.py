"""Epsilon of client-level DP-FedAvg from ``dp-accounting`` (Google's maintained accountants, not our math).

Each round is one Poisson-sampled Gaussian mechanism: every client joins independently with probability
``q`` and the server adds noise of std ``z * clip_norm`` to the sum of clipped updates. A run is the
composition of its rounds; ``epsilon`` asks the RDP or PLD accountant for epsilon at ``delta``.
``Accountant`` keeps the history as plain data (runs of equal ``(q, z)``), so a checkpoint holds it and a
resumed run continues the count.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import dp_accounting

KINDS = ("pld", "rdp")


@functools.cache
def _dp() -> Any:
    """``dp_accounting``, imported when an epsilon is first needed: it is the optional ``privacy`` extra, so a
    run without ``privacy.dp`` does not need it.

    Raises:
        ImportError: dp-accounting is not installed, saying how to install it.
    """
    try:
        import dp_accounting
        import dp_accounting.pld
        import dp_accounting.rdp
    except ImportError:
        raise ImportError("privacy.dp=central needs dp-accounting: pip install 'fedtune[privacy]'") from None
    # RDP orders where the Poisson-subsampled Gaussian's bound does not converge are dropped by dp-accounting
    # with a warning per order; the remaining orders give the epsilon.
    logging.getLogger("absl").setLevel(logging.ERROR)
    return dp_accounting


def _event(rounds: list[tuple[float, float, int]]) -> dp_accounting.DpEvent:
    dp = _dp()
    events: list[dp_accounting.DpEvent] = []
    for q, z, count in rounds:
        gaussian = dp.GaussianDpEvent(z)
        step = gaussian if q >= 1 else dp.PoissonSampledDpEvent(q, gaussian)
        events.append(dp.SelfComposedDpEvent(step, count))
    return dp.ComposedDpEvent(events)


def _accountant(kind: str) -> dp_accounting.PrivacyAccountant:
    if kind == "pld":
        return _dp().pld.PLDAccountant()
    if kind == "rdp":
        return _dp().rdp.RdpAccountant()
    raise ValueError(f"unknown accountant {kind!r}; valid: {', '.join(KINDS)}")


def epsilon_of(rounds: list[tuple[float, float, int]], delta: float, kind: str = "pld") -> float:
    """Epsilon at ``delta`` after ``rounds`` (``(q, z, count)``: count rounds at sample rate q, noise z)."""
    return _epsilon(tuple(r for r in rounds if r[2] > 0), delta, kind)


@functools.lru_cache(maxsize=64)
def _epsilon(rounds: tuple[tuple[float, float, int], ...], delta: float, kind: str) -> float:
    """``epsilon_of``, cached: the driver asks for the next round's epsilon before it and after it."""
    if not rounds:
        return 0.0
    if any(z <= 0 for _, z, _ in rounds):
        return math.inf
    acc = _accountant(kind)
    acc.compose(_event(list(rounds)))
    return float(acc.get_epsilon(delta))


def epsilon(sample_rate: float, noise_multiplier: float, rounds: int, delta: float, kind: str = "pld") -> float:
    """Epsilon at ``delta`` after ``rounds`` rounds of sample rate ``sample_rate`` and noise ``noise_multiplier``."""
    return epsilon_of([(sample_rate, noise_multiplier, rounds)], delta, kind)


def noise_for_epsilon(sample_rate: float, rounds: int, delta: float, target_epsilon: float,
                      kind: str = "pld") -> float:
    """The smallest noise multiplier whose ``rounds`` rounds stay within ``target_epsilon`` at ``delta``
    (dp-accounting's calibration, a bisection to 1e-3).

    Raises:
        ValueError: no noise multiplier up to 1e3 reaches the target.
    """
    def event(z: float) -> dp_accounting.DpEvent:
        return _event([(sample_rate, z, rounds)])

    dp = _dp()
    try:
        z = dp.calibrate_dp_mechanism(
            lambda: _accountant(kind), event, target_epsilon, delta,
            dp.mechanism_calibration.LowerEndpointAndGuess(1e-2, 1.0), tol=1e-3)
    except (dp.mechanism_calibration.NoBracketIntervalFoundError, ValueError) as exc:
        raise ValueError(f"no noise multiplier reaches epsilon {target_epsilon} at delta {delta} in {rounds} "
                         f"rounds at sample rate {sample_rate} ({exc})") from None
    return float(z)


class Accountant:
    """The privacy spent by a run so far: its rounds as ``(q, z, count)`` runs, and epsilon at ``delta``."""

    def __init__(self, delta: float, kind: str = "pld") -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown accountant {kind!r}; valid: {', '.join(KINDS)}")
        self.delta, self.kind = delta, kind
        self.rounds: list[tuple[float, float, int]] = []

    @property
    def count(self) -> int:
        return sum(c for _, _, c in self.rounds)

    def spend(self, sample_rate: float, noise_multiplier: float) -> None:
        """Record one round."""
        if self.rounds and self.rounds[-1][:2] == (sample_rate, noise_multiplier):
            q, z, c = self.rounds[-1]
            self.rounds[-1] = (q, z, c + 1)
        else:
            self.rounds.append((sample_rate, noise_multiplier, 1))

    def epsilon(self, *, extra: tuple[float, float] | None = None) -> float:
        """Epsilon so far, or after one more round of ``extra = (q, z)``."""
        rounds = list(self.rounds) + ([(extra[0], extra[1], 1)] if extra else [])
        return epsilon_of(rounds, self.delta, self.kind)

    def state_dict(self) -> dict[str, Any]:
        return {"delta": self.delta, "kind": self.kind, "rounds": [[q, z, c] for q, z, c in self.rounds]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()``.

        Raises:
            ValueError: the checkpoint accounted at another delta or with another accountant.
        """
        if float(state["delta"]) != self.delta or state["kind"] != self.kind:
            raise ValueError(f"the checkpoint's accountant ({state['kind']}, delta {state['delta']}) is not this "
                             f"run's ({self.kind}, delta {self.delta})")
        self.rounds = [(float(q), float(z), int(c)) for q, z, c in state["rounds"]]
