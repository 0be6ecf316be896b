"""The one-process replay of a world-size schedule against in-process multi-rank runs of the Trainer over the
fake backend (rank-order fp32 reduction on the owner, as the flat gRPC lane): the same parameters bit for
bit and the same reported losses, for constant schedules, a schedule that changes size mid-run, and a
skipped step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from communication.group import PeerGroup
from communication.testing import FakeHub
from jobspec import JobSpec
from tests.unit.zero3.fixtures import assert_bit_identical, bits, run_ranks
from worker.models import build_model
from worker.replay import Replay, check_schedule
from worker.trainer import StepReport, Trainer

pytestmark = pytest.mark.timeout(120)

# Clipping binds at every step of these jobs (gradient norms of resnet8 on digits start near 3), so the
# per-rank norm layout is exercised (test_clipping_binds checks that clipping changes the result).
BASE = dict(job_id="job", steps=5, global_batch=32, lr=0.1, momentum=0.9, schedule="cosine", warmup_steps=2)
SGD = JobSpec.model_validate({**BASE, "grad_clip": 0.5})
ADAMW = JobSpec.model_validate({**BASE, "optimizer": "adamw", "lr": 0.01, "grad_clip": 0.5})


def saved_params(path: Path, job: JobSpec) -> dict[str, torch.Tensor]:
    saved = load_file(str(path))
    model = build_model(job.model, 10, 1)
    model.load_state_dict(saved)  # strict: every parameter and buffer under the plain names
    return {n: saved[n] for n, _ in model.named_parameters()}


def run_phase(
    job: JobSpec, world: int, until: int, ckpt: Path | None, model_path: Path | None = None
) -> list[float]:
    """The Trainer on ``world`` in-process ranks from the newest checkpoint in ``ckpt`` (if any) up to step
    ``until``; saves the model when it reaches the end. Returns rank 0's losses of the steps it ran."""

    def body(rank: int, hub: FakeHub, group: PeerGroup) -> list[float]:
        trainer = Trainer(job, group, hub.backend(rank), device=torch.device("cpu"), checkpoint_dir=ckpt)
        losses: list[float] = []

        def on_step(report: StepReport) -> None:
            losses.append(report.loss)

        trainer.run(on_step=on_step, should_stop=lambda: trainer.steps_done >= until)
        if model_path is not None:
            trainer.save_model(model_path)
        return losses

    results = run_ranks(world, body)
    assert all(r == results[0] for r in results), "ranks reported different losses"
    return list(results[0])


@pytest.mark.parametrize(("world", "job"), [(2, SGD), (3, ADAMW)], ids=["2-sgd", "3-adamw"])
def test_replay_of_a_constant_schedule_equals_the_multi_rank_run(
    world: int, job: JobSpec, tmp_path: Path
) -> None:
    losses = run_phase(job, world, job.steps, None, tmp_path / "run.safetensors")
    replay = Replay(job)
    outcome = replay.run([world] * job.steps)
    assert outcome.steps_done == job.steps and outcome.skipped_steps == []
    assert outcome.losses == losses and outcome.final_loss == losses[-1]
    assert_bit_identical(replay.parameters(), saved_params(tmp_path / "run.safetensors", job))
    replay.save_model(tmp_path / "replay.safetensors")
    assert_bit_identical(saved_params(tmp_path / "replay.safetensors", job), replay.parameters())


def test_a_changing_schedule_equals_runs_composed_at_those_sizes(tmp_path: Path) -> None:
    """[3, 3, 2, 2, 3]: 3 ranks train steps 0-1, 2 ranks resume from the checkpoint of step 2 (re-sharded)
    and train steps 2-3, 3 ranks resume from that of step 4 and finish."""
    job = SGD.model_copy(update={"checkpoint_every": 2})
    ckpt, model = tmp_path / "ckpt", tmp_path / "run.safetensors"
    losses = run_phase(job, 3, 2, ckpt) + run_phase(job, 2, 4, ckpt) + run_phase(job, 3, 5, ckpt, model)
    schedule = [3, 3, 2, 2, 3]
    replay = Replay(job)
    outcome = replay.run(schedule)
    assert outcome.losses == losses
    assert_bit_identical(replay.parameters(), saved_params(model, job))
    # The schedule matters: replaying it at one constant size gives other parameters.
    constant = Replay(job)
    constant.run([3] * job.steps)
    assert not all(torch.equal(bits(a), bits(b)) for a, b in zip_params(constant, replay))


def test_clipping_binds() -> None:
    unclipped = Replay(SGD.model_copy(update={"grad_clip": 0.0}))
    unclipped.run([3] * SGD.steps)
    clipped = Replay(SGD)
    clipped.run([3] * SGD.steps)
    assert not all(torch.equal(a, b) for a, b in zip_params(unclipped, clipped))


def test_a_skipped_step_consumes_its_batch_and_leaves_the_optimizer_alone(tmp_path: Path) -> None:
    """Step 2 skipped on every rank: steps 3 and 4 train on their own batches with their own learning
    rates, and AdamW's step count (its bias correction) counts only the steps applied."""
    job, skip = ADAMW, 2

    def body(rank: int, hub: FakeHub, group: PeerGroup) -> list[float]:
        trainer = Trainer(job, group, hub.backend(rank), device=torch.device("cpu"))
        losses = []
        for step in range(job.steps):
            if step == skip:
                trainer.steps_done = step + 1  # what a skipped step leaves: nothing but the step index
                continue
            losses.append(trainer.train_step(step).loss)
        assert trainer.optimizer.steps_done == job.steps - 1
        trainer.save_model(tmp_path / "run.safetensors")
        return losses

    results: list[Any] = run_ranks(2, body)
    replay = Replay(job)
    outcome = replay.run([2] * job.steps, [skip])
    assert outcome.skipped_steps == [skip] and outcome.losses[skip] is None
    assert [x for x in outcome.losses if x is not None] == results[0]
    assert replay.optimizer.steps_done == job.steps - 1
    assert_bit_identical(replay.parameters(), saved_params(tmp_path / "run.safetensors", job))


def test_bad_schedules_are_refused_before_any_step() -> None:
    job = SGD
    with pytest.raises(ValueError, match="the job only 5"):
        check_schedule(job, [2] * 6, [])
    with pytest.raises(ValueError, match="world size of step 1"):
        check_schedule(job, [2, 0, 2], [])
    with pytest.raises(ValueError, match="world size of step 0"):
        check_schedule(job, [job.global_batch + 1], [])
    with pytest.raises(ValueError, match="world size of step 0"):
        check_schedule(job, [True], [])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="skipped steps"):
        check_schedule(job, [2, 2], [2])
    replay = Replay(job)
    before = [m.clone() for m in replay.masters]
    with pytest.raises(ValueError, match="world size of step 1"):
        replay.run([2, 40])
    with pytest.raises(ValueError, match="next step is 0"):
        replay.train_step(1, 2)
    assert replay.steps_done == 0
    assert all(torch.equal(a, b) for a, b in zip(before, replay.masters, strict=True))


def zip_params(a: Replay, b: Replay) -> list[tuple[torch.Tensor, torch.Tensor]]:
    pa, pb = a.parameters(), b.parameters()
    return [(pa[n], pb[n]) for n in pa]
