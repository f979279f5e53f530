"""Percentiles, spreads and the noise verdict that decides what bench and tune call a gain."""

from __future__ import annotations

import math

import pytest

from mpsd.bench.stats import Spread, better, gain, percentile


def test_percentile_interpolates_like_numpy() -> None:
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([10], 99) == 10
    assert percentile([0, 100], 99) == pytest.approx(99)
    assert math.isnan(percentile([], 50))


def test_spread_is_relative_to_the_median() -> None:
    spread = Spread.of([90, 100, 110, math.nan])
    assert (spread.median, spread.low, spread.high, spread.n) == (100, 90, 110, 3)
    assert spread.relative == pytest.approx(0.2)


def test_a_real_gain_is_outside_both_the_pairs_and_the_spread() -> None:
    found = gain([200, 210, 205], [100, 101, 99])
    assert not found.noise
    assert found.median == pytest.approx(2.07, abs=0.01)
    assert "2.0" in found.text()


def test_paired_ratios_that_straddle_one_are_noise() -> None:
    found = gain([105, 95, 102], [100, 100, 100])
    assert found.noise
    assert "straddle" in found.why


def test_a_gain_smaller_than_the_repeats_own_spread_is_noise() -> None:
    # each repeat is 4 % better, but the repeats themselves disagree by 20 %
    found = gain([104, 114.4, 93.6], [100, 110, 90])
    assert found.noise
    assert "spread" in found.why


def test_one_repeat_judges_by_a_five_percent_margin() -> None:
    assert gain([103], [100]).noise
    assert not gain([130], [100]).noise


def test_better_needs_more_than_the_spread_of_either() -> None:
    two = gain([200, 205, 210], [100, 100, 100])
    three = gain([204, 209, 206], [100, 100, 100])
    four = gain([300, 310, 305], [100, 100, 100])
    assert not better(three, two)
    assert better(four, two)
    assert not better(two, four)
