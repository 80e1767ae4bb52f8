"""Distributed DP with secure aggregation (Kairouz et al. 2021, "The distributed discrete Gaussian mechanism
for federated learning with secure aggregation"): each client adds its share of the noise to its own
fixed-point update, so the sum the server unmasks already holds all of it.

Each of the ``m`` clients asked to upload adds discrete Gaussian noise of std ``sigma / sqrt(m)`` (in the
integer units of the fixed-point encoding) to every word, drawn by OpenDP's exact sampler (Canonne, Kamath
and Steinke 2020: rational arithmetic, no floating point; randomness from OpenSSL's CSPRNG). The sum of the
``s`` survivors' noise has variance ``s sigma^2 / m``.

Accounting: dp-accounting has no discrete Gaussian event, so a round is charged as a Gaussian mechanism
with the summed variance. That is an approximation: a sum of discrete Gaussians is not exactly a discrete
Gaussian, but Kairouz et al. bound the distance, which vanishes when each client's std is far above 1
(here it is in the millions of integer units); and a discrete Gaussian gives the continuous Gaussian's
concentrated-DP guarantee for integer-valued queries (Canonne et al.). The sensitivity is taken in integer
units with the rounding of the fixed-point encoding included (``C s + sqrt(d) / 2``: each of ``d`` words
moves by at most 1/2), and dropouts lower the noise in the sum: ``noise_multiplier`` gives the multiplier
the round actually had, which is what the accountant charges.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def _sampler(scale: float) -> Any:
    try:
        from opendp import domains, measurements, metrics
        from opendp.mod import enable_features
    except ImportError:
        raise ValueError("privacy.dp=distributed needs the opendp package (pip install 'fedtune[privacy]')") from None
    enable_features("contrib")
    return measurements.make_gaussian(domains.vector_domain(domains.atom_domain(T="i64")),
                                      metrics.l2_distance(T="i64"), scale=scale)


def discrete_gaussian(std: float, size: int) -> np.ndarray:
    """``size`` independent draws of the discrete Gaussian on the integers with parameter ``std`` (int64).

    Raises:
        ValueError: ``std`` is negative or not finite, or opendp is missing.
    """
    if not 0 <= std < math.inf:
        raise ValueError(f"the noise std must be a finite number >= 0, got {std}")
    if std == 0 or size == 0:
        return np.zeros(size, dtype=np.int64)
    return np.asarray(_sampler(float(std))([0] * size), dtype=np.int64)


def client_noise(words: int, scale: float, update_std: float, count_std: float | None) -> np.ndarray:
    """One client's noise for its fixed-point vector: ``words`` update words of std ``update_std`` and, with
    adaptive clipping, one count word of std ``count_std`` (both in value units; times ``scale``), as uint32
    (two's complement, to add modulo 2^32)."""
    noise = discrete_gaussian(update_std * scale, words)
    if count_std is not None:
        noise = np.concatenate([noise, discrete_gaussian(count_std * scale, 1)])
    return noise.astype(np.uint32)


def noise_multiplier(z_update: float, count_noise: float, clip: float, scale: float, words: int, clients: int,
                     survivors: int) -> float:
    """The noise multiplier of one distributed round, in integer units, as the accountant charges it.

    ``clients`` (m) each added std ``z_update C s / sqrt(m)`` to the ``words`` update words and, when
    ``count_noise`` > 0, std ``count_noise C s / sqrt(m)`` to the count word (``(b - 1/2) C s``); ``survivors``
    of them reached the sum. Each part's sensitivity includes rounding: ``C s + sqrt(words) / 2`` and
    ``C s / 2 + 1/2``. The two parts compose as one Gaussian: ``z^-2 = (D_u / sigma_u)^2 + (D_c / sigma_c)^2``.
    With no rounding and no dropout this is ``(z_update^-2 + (2 count_noise)^-2)^-1/2``, the configured ``z``.
    """
    kept = math.sqrt(survivors / clients)
    inverse = ((clip * scale + math.sqrt(words) / 2) / (kept * z_update * clip * scale)) ** 2
    if count_noise > 0:
        inverse += ((clip * scale / 2 + 0.5) / (kept * count_noise * clip * scale)) ** 2
    return 1 / math.sqrt(inverse)


def headroom(z_update: float, count_noise: float) -> float:
    """Extra clients' worth of range the fixed-point scale leaves for the noise (8 standard deviations of
    the sum's noise, so a word wraps around with probability below 1e-15)."""
    return 8 * max(z_update, count_noise)
