"""The Trainer gives its collectives the start-up timeout until its first step is committed, and the
collective timeout after that."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

from communication.group import PeerGroup
from communication.testing import FakeHub
from jobspec import JobSpec
from tests.unit.zero3.fixtures import run_ranks
from worker.trainer import Trainer

pytestmark = pytest.mark.timeout(90)
JOB = JobSpec.model_validate(dict(job_id="job", steps=3, global_batch=8, warmup_steps=0, eval_every=0))


def timeouts_by_step(startup: float | None) -> dict[int, set[float]]:
    """Train JOB on 2 ranks with a collective timeout of 10 s; the timeouts the engine named, by step."""
    seen: dict[int, set[float]] = {}
    lock = threading.Lock()

    def body(rank: int, hub: FakeHub, group: PeerGroup) -> None:
        backend = hub.backend(rank)
        for name in ("all_gather", "reduce_scatter"):
            real = getattr(backend, name)

            def spy(*args: Any, _real: Any = real, **kwargs: Any) -> Any:
                step, timeout = args[1], args[5]  # (group, step, unit, tensor, out, timeout)
                with lock:
                    seen.setdefault(step, set()).add(timeout)
                return _real(*args, **kwargs)

            setattr(backend, name, spy)
        trainer = Trainer(
            JOB, group, backend, device=torch.device("cpu"), collective_timeout=10.0, startup_timeout=startup
        )
        assert trainer.run().steps_done == JOB.steps

    run_ranks(2, body)
    return seen


def test_the_first_step_has_the_startup_timeout_and_later_ones_the_collective_timeout() -> None:
    seen = timeouts_by_step(startup=25.0)
    assert seen[0] == {25.0}
    assert set(seen) >= {1, 2, JOB.steps}  # every step, and the evaluation and barrier after the last
    assert all(seen[s] == {10.0} for s in seen if s > 0), seen


def test_without_a_startup_timeout_every_collective_has_the_collective_timeout() -> None:
    seen = timeouts_by_step(startup=None)
    assert set(seen) >= {0, 1, 2} and all(t == {10.0} for t in seen.values()), seen
