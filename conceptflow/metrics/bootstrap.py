"""Percentile bootstrap intervals of a mean (Efron & Tibshirani 1993, ch. 13).

``bootstrap_mean(values)`` resamples ``values`` with replacement ``resamples`` times, takes the
mean of each resample and returns the sample mean with the (1 - confidence)/2 and
(1 + confidence)/2 quantiles of those means. The unit resampled is whatever ``values`` holds one
number per (an image's score, a training step's seconds, ...); the caller says which. Seeded
and without touching the global random state, so an interval is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

# resample means are computed in blocks of this many resamples, so memory stays ~ block x n
_BLOCK = 1000


@dataclass(frozen=True)
class Interval:
    """A mean and its bootstrap interval over ``n`` values."""

    mean: float
    low: float
    high: float
    n: int

    def format(self, digits: int = 3) -> str:
        return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def bootstrap_mean(values: Sequence[float], confidence: float = 0.95, resamples: int = 2000,
                   seed: int = 0) -> Interval:
    """The mean of ``values`` with its percentile-bootstrap ``confidence`` interval.

    Raises ``ValueError`` for no values, non-finite values or a confidence outside (0, 1).
    """
    data = np.asarray(values, dtype=np.float64).ravel()
    if data.size == 0:
        raise ValueError("bootstrap_mean needs at least one value")
    if not np.all(np.isfinite(data)):
        raise ValueError(f"bootstrap_mean needs finite values; got {int((~np.isfinite(data)).sum())} "
                         "NaN or infinite ones")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1); got {confidence}")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1; got {resamples}")
    rng = np.random.default_rng(seed)
    means = np.concatenate([
        data[rng.integers(0, data.size, size=(min(_BLOCK, resamples - start), data.size))].mean(axis=1)
        for start in range(0, resamples, _BLOCK)
    ])
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return Interval(float(data.mean()), float(low), float(high), int(data.size))
