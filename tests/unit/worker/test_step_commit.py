"""Step commit over the fake backend: a non-finite loss on one rank skips the step on every rank (counted,
never a crash, nothing sent), and the run then equals a replay that skips that step; the vote's decision
is the same function of the same values everywhere."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from communication.group import PeerGroup
from communication.testing import FakeHub
from jobspec import JobSpec
from tests.unit.zero3.fixtures import assert_bit_identical, run_ranks
from worker.commit import decide, vote_values
from worker.replay import Replay
from worker.trainer import StepReport, Trainer
from worker.zero3.state import full_parameters

pytestmark = pytest.mark.timeout(90)

JOB = JobSpec.model_validate(
    dict(job_id="job", steps=5, global_batch=24, optimizer="adamw", lr=0.01, grad_clip=1.0, warmup_steps=0)
)
POISONED_STEP = 2


def test_a_nan_on_one_rank_skips_the_step_on_every_rank() -> None:
    def body(rank: int, hub: FakeHub, group: PeerGroup) -> tuple[list[StepReport], int, dict[str, Any]]:
        trainer = Trainer(JOB, group, hub.backend(rank), device=torch.device("cpu"))
        honest = trainer._micro_batch

        def poisoned(step: int) -> tuple[torch.Tensor, torch.Tensor]:
            x, y = honest(step)
            if rank == 1 and step == POISONED_STEP:
                x = x.clone()
                x[0] = float("nan")
            return x, y

        trainer._micro_batch = poisoned  # type: ignore[method-assign]
        reports = [trainer.train_step(s) for s in range(JOB.steps)]
        params = full_parameters(trainer.engine, JOB.steps)
        return reports, trainer.skipped, params

    results = run_ranks(3, body)
    for reports, skipped, params in results:
        assert [r.skipped for r in reports] == [s == POISONED_STEP for s in range(JOB.steps)]
        assert skipped == 1 and math.isnan(reports[POISONED_STEP].loss)
        assert all(bool(torch.isfinite(p).all()) for p in params.values())
    assert_bit_identical(results[0][2], results[2][2])
    replay = Replay(JOB)
    replay.run([3] * JOB.steps, [POISONED_STEP])
    assert_bit_identical(results[0][2], {k: v.detach() for k, v in replay.parameters().items()})


def test_the_decision_is_the_same_function_of_the_votes_everywhere() -> None:
    ok = [vote_values(torch.tensor(3.0), torch.tensor(0.5), True) for _ in range(3)]
    d = decide(7, ok, global_batch=3)
    assert not d.skip and d.total_sq_norm == pytest.approx(1.5) and d.loss == pytest.approx(3.0)
    bad = vote_values(torch.tensor(float("inf")), torch.tensor(0.5), True)
    assert bad.tolist() == [0.0, 0.0, 0.0]  # a non-finite value never leaves its rank
    assert decide(7, [ok[0], bad, ok[2]], 3).skip
    assert decide(7, [ok[0], vote_values(torch.tensor(1.0), torch.tensor(1.0), False), ok[2]], 3).skip
    with pytest.raises(ValueError):
        decide(7, [torch.zeros(2)] * 3, 3)
