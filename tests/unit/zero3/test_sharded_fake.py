"""The sharded module over the in-process fake backend: bit-exact against a plain PyTorch loop."""

from __future__ import annotations

import pytest

from jobspec import JobSpec
from tests.unit.zero3.fixtures import (
    UNITS,
    TinyNet,
    assert_bit_identical,
    make_data,
    reference_run,
    sharded_run,
    small_job,
)
from worker.zero3.sharded import ShardedModule

pytestmark = pytest.mark.timeout(60)


def _job(**kw: object) -> JobSpec:
    return small_job(**{"steps": 6, **kw})


@pytest.mark.parametrize("world", [1, 2, 3])
def test_bit_identical_to_plain_loop(world: int) -> None:
    job = _job()
    data = make_data()
    ref = reference_run(TinyNet, job, world, data)
    ranks = sharded_run(TinyNet, job, world, data, units=UNITS)
    for got in ranks:
        assert_bit_identical(got, ref)


def test_nesterov_and_default_units_bit_identical() -> None:
    job = _job(nesterov=True, steps=4)
    data = make_data()
    ref = reference_run(TinyNet, job, 2, data)
    # default unit selection with a tiny threshold is not reachable through sharded_run; explicit subset:
    # blocks only, so stem, head and scale form the root unit.
    ranks = sharded_run(TinyNet, job, 2, data, units=["blocks.0", "blocks.1"])
    for got in ranks:
        assert_bit_identical(got, ref)


def test_detects_a_real_difference() -> None:
    """The comparison is sharp: a different world size (other micro-batches) gives different bits."""
    job = _job(steps=3)
    data = make_data()
    ref = reference_run(TinyNet, job, 1, data)
    got = sharded_run(TinyNet, job, 2, data, units=UNITS)[0]
    with pytest.raises(AssertionError):
        assert_bit_identical(got, ref)


def test_memory_held_and_prefetch_overlap() -> None:
    job = _job(steps=2)
    data = make_data()
    peaks: dict[int, tuple[int, int, int]] = {}

    def probe(rank: int, engine: ShardedModule) -> None:
        units = sorted((u.full_bytes for u in engine.units), reverse=True)
        bound = units[0] + units[1] + units[0]  # two largest units plus one prefetch
        peaks[rank] = (engine.peak_full_bytes, bound, engine.stats.gathers)
        assert all(u.full is None and all(p.numel() == 0 for p in u.params) for u in engine.units)

    sharded_run(TinyNet, job, 2, data, units=UNITS, probe=probe)
    for peak, bound, gathers in peaks.values():
        assert 0 < peak <= bound
        # forward gathers every unit; backward re-gathers all but the last two forward units
        assert gathers == 5 + 2
