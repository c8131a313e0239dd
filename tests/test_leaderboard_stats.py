"""The leaderboard's bootstrap interval (conceptflow.metrics.bootstrap) on hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from conceptflow.metrics.bootstrap import bootstrap_mean


def test_constant_values_have_a_point_interval():
    interval = bootstrap_mean([0.25] * 7)
    assert (interval.mean, interval.low, interval.high, interval.n) == (0.25, 0.25, 0.25, 7)


def test_two_values_interval_spans_both():
    # resample means of [0, 1] are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4:
    # the 2.5% quantile is 0 and the 97.5% quantile is 1
    interval = bootstrap_mean([0.0, 1.0])
    assert (interval.mean, interval.low, interval.high) == (0.5, 0.0, 1.0)


def test_one_in_four_matches_the_binomial_quantiles():
    # a resample mean of [0, 0, 0, 1] is k/4 with k ~ Binomial(4, 1/4):
    # P(k <= 0) = 0.316 > 0.025, P(k <= 2) = 0.949 < 0.975 <= P(k <= 3) = 0.996
    interval = bootstrap_mean([0.0, 0.0, 0.0, 1.0])
    assert (interval.mean, interval.low, interval.high) == (0.25, 0.0, 0.75)
    # a 50% interval: P(k <= 0) = 0.316 >= 0.25 and P(k <= 1) = 0.738 < 0.75 <= P(k <= 2)
    half = bootstrap_mean([0.0, 0.0, 0.0, 1.0], confidence=0.5)
    assert (half.low, half.high) == (0.0, 0.5)


def test_wide_sample_matches_the_normal_interval():
    values = np.random.default_rng(3).normal(size=400)
    interval = bootstrap_mean(values, resamples=4000)
    half_width = 1.96 * values.std(ddof=1) / math.sqrt(len(values))
    assert interval.low < interval.mean < interval.high
    assert (interval.high - interval.low) / 2 == pytest.approx(half_width, rel=0.1)
    assert (interval.low + interval.high) / 2 == pytest.approx(interval.mean, abs=0.2 * half_width)


def test_seeded_and_independent_of_the_global_random_state():
    values = [0.1, 0.4, 0.35, 0.8, 0.05]
    np.random.seed(1)
    first = bootstrap_mean(values, seed=5)
    np.random.seed(2)
    assert bootstrap_mean(values, seed=5) == first
    assert bootstrap_mean(values, seed=6) != first


@pytest.mark.parametrize("values, kwargs", [([], {}), ([1.0, float("nan")], {}), ([1.0], {"confidence": 1.0}),
                                            ([1.0], {"resamples": 0})])
def test_bad_input_raises(values, kwargs):
    with pytest.raises(ValueError):
        bootstrap_mean(values, **kwargs)
