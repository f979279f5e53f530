"""The tune search against an exhaustive sweep, on throughput curves of known shape."""

from __future__ import annotations

import random

import pytest

from mpsd.bench.search import ONE, Score, Setup, recommend, replay, search, sweep_setups
from mpsd.bench.stats import gain

MAX = 4


def curve(cap: float, off_penalty: float = 1.3) -> dict[Setup, float]:
    """Throughput over one engine: linear up to ``cap`` engines' worth, then flat; MPS off
    pays a time-slicing penalty; a thread limit costs a fifth."""
    out = {}
    for setup in sweep_setups(MAX, [True, False], [100, 50]):
        value = min(setup.engines, cap)
        if not setup.mps:
            value /= off_penalty
        if setup.threads != 100:
            value *= 0.8
        out[setup] = value
    return out


def measured(truth: dict[Setup, float], seed: int,
             jitter: float = 0.02) -> dict[Setup, Score | None]:
    """Three repeats per setup, each arm off by up to ``jitter`` at random."""
    rng = random.Random(seed)
    scores: dict[Setup, Score | None] = {}
    for setup, value in truth.items():
        base = [100 * (1 + rng.uniform(-jitter, jitter)) for _ in range(3)]
        arm = [100 * value * (1 + rng.uniform(-jitter, jitter)) for _ in range(3)]
        scores[setup] = Score(gain(arm, base), 100 * value)
    return scores


@pytest.mark.parametrize("cap", [1.0, 1.03, 1.6, 2.0, 2.5, 3.0, 3.4, 4.0])
@pytest.mark.parametrize("seed", range(5))
def test_the_search_gets_within_five_percent_of_the_sweeps_best(cap: float, seed: int) -> None:
    truth = curve(cap)
    sweep = measured(truth, seed)
    best = max([1.0, *truth.values()])
    rec, order = replay(sweep, MAX, [True, False], [100, 50])
    got = 1.0 if rec.setup == ONE else truth[rec.setup]
    assert got >= 0.95 * best, (rec, best)
    assert len(order) <= len(sweep)


def test_the_search_stops_at_the_plateau_and_checks_mps_off_there() -> None:
    truth = curve(2.0, off_penalty=1.0)  # MPS off as good as on: isolation wins
    seen: list[Setup] = []

    def measure(setup: Setup) -> Score | None:
        seen.append(setup)
        return measured(truth, 0)[setup]

    rec = recommend(search(MAX, [True, False], [100], measure))
    assert seen == [Setup(2, True), Setup(3, True), Setup(2, False)]
    assert rec.setup == Setup(2, False)
    assert "MPS off keeps" in rec.reason


def test_no_gain_outside_the_noise_recommends_one_engine() -> None:
    rec = recommend({Setup(2, True): measured({Setup(2, True): 1.01}, 1, jitter=0.03)[
        Setup(2, True)]})
    assert rec.setup == ONE
    assert "no real gain" in rec.reason


def test_an_unmeasurable_setup_ends_the_walk_upwards() -> None:
    seen: list[Setup] = []

    def measure(setup: Setup) -> Score | None:
        seen.append(setup)
        return None if setup.engines == 3 else measured(curve(4.0), 0)[setup]

    rec = recommend(search(MAX, [True], [100], measure))
    assert Setup(4, True) not in seen
    assert rec.setup == Setup(2, True)
