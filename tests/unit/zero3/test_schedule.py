"""Learning-rate schedules: warm-up, cosine, step and constant pieces, endpoints, purity."""

from __future__ import annotations

import itertools
import math

import pytest

from jobspec import JobSpec
from worker.zero3.schedule import lr_at


def job(**kw: object) -> JobSpec:
    base: dict[str, object] = dict(lr=0.2, steps=100, warmup_steps=10, step_size=30, gamma=0.5)
    base.update(kw)
    return JobSpec(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("schedule", ["constant", "cosine", "step"])
def test_warm_up_is_linear_and_reaches_the_base_rate(schedule: str) -> None:
    j = job(schedule=schedule)
    warm = [lr_at(j, s) for s in range(10)]
    assert warm[0] == pytest.approx(0.02)
    assert warm[-1] == pytest.approx(0.2)
    diffs = [b - a for a, b in itertools.pairwise(warm)]
    assert all(d == pytest.approx(0.02) for d in diffs)
    assert lr_at(j, 10) == pytest.approx(0.2)


def test_constant_after_warm_up_and_without_warm_up() -> None:
    j = job(schedule="constant")
    assert all(lr_at(j, s) == 0.2 for s in range(10, 150))
    j0 = job(schedule="constant", warmup_steps=0)
    assert all(lr_at(j0, s) == 0.2 for s in range(0, 100))


def test_cosine_decays_monotonically_to_zero_at_steps() -> None:
    j = job(schedule="cosine")
    values = [lr_at(j, s) for s in range(10, 101)]
    assert values[0] == 0.2
    assert all(b < a for a, b in itertools.pairwise(values))
    assert lr_at(j, 100) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(j, 55) == pytest.approx(0.1)  # half-way through the decay
    assert lr_at(j, 99) > 0.0  # the last trained step still moves
    assert lr_at(j, 250) == pytest.approx(0.0, abs=1e-12)  # past the end: stays at 0
    midpoint = 10 + 0.25 * 90
    assert lr_at(j, int(midpoint)) == pytest.approx(0.2 * 0.5 * (1 + math.cos(math.pi * 0.25)), rel=1e-2)


def test_cosine_without_warm_up_starts_at_the_base_rate() -> None:
    j = job(schedule="cosine", warmup_steps=0)
    assert lr_at(j, 0) == 0.2
    assert lr_at(j, 50) == pytest.approx(0.1)


def test_cosine_when_warm_up_fills_every_step() -> None:
    j = job(schedule="cosine", steps=5, warmup_steps=5)
    assert [lr_at(j, s) for s in range(5)] == pytest.approx([0.04, 0.08, 0.12, 0.16, 0.2])
    assert lr_at(j, 5) == 0.0


def test_step_schedule_decays_by_gamma_every_step_size() -> None:
    j = job(schedule="step")
    assert lr_at(j, 10) == 0.2 and lr_at(j, 29) == 0.2
    assert lr_at(j, 30) == pytest.approx(0.1) and lr_at(j, 59) == pytest.approx(0.1)
    assert lr_at(j, 60) == pytest.approx(0.05)
    assert lr_at(j, 99) == pytest.approx(0.025)
    values = [lr_at(j, s) for s in range(10, 100)]
    assert all(b <= a for a, b in itertools.pairwise(values))


def test_pure_and_rejects_negative_steps() -> None:
    j = job(schedule="cosine")
    assert [lr_at(j, s) for s in range(100)] == [lr_at(job(schedule="cosine"), s) for s in range(100)]
    with pytest.raises(ValueError):
        lr_at(j, -1)
