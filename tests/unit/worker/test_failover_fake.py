"""Membership changes without rollback, in process (ranks are threads over the fake backend): a rank dies
and its buddy's replica stands in, a worker joins, a step applied on one rank only is completed on the
others, a shard lost with its replica falls back to the checkpoint or stops the job. The final parameters
must be bit-identical to a plain loop that ran every step at the world size it had."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from communication.errors import PeerLost
from communication.group import PeerGroup
from communication.testing import FakeHub
from jobspec import JobSpec
from tests.unit.zero3.fixtures import assert_bit_identical
from tests.unit.zero3.reference import plain_reference
from worker.heartbeat import Telemetry
from worker.identity import WorkerConfig
from worker.manager import Manager
from worker.models import build_model
from worker.recovery import RecoveryError
from worker.trainer import Trainer

pytestmark = pytest.mark.timeout(120)

JOB = JobSpec.model_validate(
    dict(job_id="job", steps=8, global_batch=24, lr=0.1, momentum=0.9, schedule="cosine", warmup_steps=2)
)


class Worker:
    """One worker's manager, kept across epochs as in a worker process."""

    def __init__(self, wid: str, checkpoint_dir: Path | None = None) -> None:
        cfg = WorkerConfig(coordinator="http://unused", worker_id=wid, checkpoint_dir=checkpoint_dir)
        self.wid = wid
        self.checkpoint_dir = checkpoint_dir
        self.manager = Manager(cfg, Telemetry(worker_id=wid), FakeHub(1).backend(0))
        self.trainer: Trainer | None = None


def epoch(
    job: JobSpec,
    workers: list[Worker],
    number: int,
    until: int,
    *,
    before_apply: Callable[[Worker, Trainer], None] | None = None,
    save: Path | None = None,
    job_committed: int = -1,
) -> list[Any]:
    """Form epoch `number` of `workers` (rank = list order) and train to step `until` (or the end)."""
    hub = FakeHub(len(workers))
    ids = tuple(w.wid for w in workers)
    addresses = tuple(f"127.0.0.1:{9000 + r}" for r in range(len(workers)))
    results: list[Any] = [None] * len(workers)

    def body(rank: int) -> None:
        w = workers[rank]
        group = PeerGroup("job", number, rank, addresses, host_ids=ids)
        trainer = Trainer(
            job,
            group,
            hub.backend(rank),
            device=torch.device("cpu"),
            checkpoint_dir=w.checkpoint_dir,
            restore=False,
        )
        w.trainer = trainer
        w.manager.state.install(group, ids)
        w.manager.adopt(group, trainer.form(w.manager.state, ids, job_committed))
        while trainer.steps_done < min(until, job.steps):
            if before_apply is not None:
                before_apply(w, trainer)
            report = trainer.train_step(trainer.steps_done)
            w.manager.committed(report.step)
            if job.checkpoint_every and trainer.steps_done % job.checkpoint_every == 0:
                trainer.checkpoint()
            results[rank] = report
        if save is not None:
            trainer.save_model(save)

    def target(rank: int) -> None:
        try:
            body(rank)
        except BaseException as exc:
            results[rank] = exc

    threads = [threading.Thread(target=target, args=(r,), daemon=True) for r in range(len(workers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    return results


def raise_first(results: list[Any]) -> None:
    for r in results:
        if isinstance(r, BaseException):
            raise r


def saved_params(path: Path) -> dict[str, torch.Tensor]:
    saved = load_file(str(path))
    names = [n for n, _ in build_model(JOB.model, 10, 1).named_parameters()]
    return {n: saved[n] for n in names}


def test_a_dead_rank_is_replaced_by_its_buddy_without_losing_a_step(tmp_path: Path) -> None:
    a, b, c = Worker("a"), Worker("b"), Worker("c")
    raise_first(epoch(JOB, [a, b, c], 1, 4))
    # b dies after step 3 committed; its shard lives on in its buddy c's replica
    raise_first(epoch(JOB, [a, c], 2, JOB.steps, save=tmp_path / "m.safetensors"))
    assert a.trainer is not None and a.trainer.steps_done == JOB.steps
    expected = plain_reference(JOB, lambda s: 3 if s < 4 else 2)
    assert_bit_identical(saved_params(tmp_path / "m.safetensors"), expected)


def test_a_joiner_takes_its_shards_without_rollback(tmp_path: Path) -> None:
    a, b, c = Worker("a"), Worker("b"), Worker("c")
    raise_first(epoch(JOB, [a, b], 1, 3))
    raise_first(epoch(JOB, [c, a, b], 2, JOB.steps, save=tmp_path / "m.safetensors"))
    expected = plain_reference(JOB, lambda s: 2 if s < 3 else 3)
    assert_bit_identical(saved_params(tmp_path / "m.safetensors"), expected)


def test_a_step_applied_on_one_rank_only_is_completed_on_the_others(tmp_path: Path) -> None:
    a, b, c = Worker("a"), Worker("b"), Worker("c")
    raise_first(epoch(JOB, [a, b, c], 1, 3))

    def lose_votes(w: Worker, trainer: Trainer) -> None:
        """Step 3: every rank staged it, but only a received every vote (b and c saw a peer die)."""
        if w.wid != "a":
            trainer.apply = _raise_peer_lost  # type: ignore[method-assign]

    results = epoch(JOB, [a, b, c], 2, 4, before_apply=lose_votes)
    assert isinstance(results[1], PeerLost) and isinstance(results[2], PeerLost)
    assert a.trainer is not None and a.trainer.steps_done == 4
    assert b.trainer is not None and b.trainer.steps_done == 3 and b.trainer.staged is not None
    b.trainer.apply = Trainer.apply.__get__(b.trainer)  # type: ignore[method-assign]
    assert c.trainer is not None
    c.trainer.apply = Trainer.apply.__get__(c.trainer)  # type: ignore[method-assign]
    # the next epoch: b and c apply step 3 with the decision a reports, then all go on together
    raise_first(epoch(JOB, [a, b, c], 3, JOB.steps, save=tmp_path / "m.safetensors"))
    assert all(w.trainer is not None and w.trainer.steps_done == JOB.steps for w in (a, b, c))
    expected = plain_reference(JOB, lambda s: 3)
    assert_bit_identical(saved_params(tmp_path / "m.safetensors"), expected)


def _raise_peer_lost(decision: Any) -> float:
    raise PeerLost("a peer died before its vote arrived here")


def test_a_shard_lost_with_its_replica_falls_back_to_the_checkpoint(tmp_path: Path) -> None:
    job = JOB.model_copy(update={"checkpoint_every": 2})
    a, b, c = (Worker(w, tmp_path / "ckpt") for w in "abc")
    raise_first(epoch(job, [a, b, c], 1, 5))
    # b (rank 1) and its buddy c (rank 2) die together: a falls back to the checkpoint of step 4
    raise_first(epoch(job, [a], 2, job.steps, save=tmp_path / "m.safetensors"))
    assert a.trainer is not None and a.trainer.resumed_from == 4
    expected = plain_reference(job, lambda s: 3 if s < 4 else 1)
    assert_bit_identical(saved_params(tmp_path / "m.safetensors"), expected)


def test_without_a_checkpoint_a_lost_shard_stops_the_job() -> None:
    a, b, c = Worker("a"), Worker("b"), Worker("c")
    raise_first(epoch(JOB, [a, b, c], 1, 3))
    (result,) = epoch(JOB, [a], 2, JOB.steps)
    assert isinstance(result, RecoveryError) and "no complete checkpoint" in str(result)


def test_fresh_workers_never_restart_a_job_that_committed_steps_from_step_0(tmp_path: Path) -> None:
    job = JOB.model_copy(update={"checkpoint_every": 2})
    a, b = Worker("a", tmp_path / "ckpt"), Worker("b", tmp_path / "ckpt")
    raise_first(epoch(job, [a, b], 1, 3))
    # every worker that held state is gone; the coordinator knows step 2 was committed
    c, d = Worker("c", tmp_path / "ckpt"), Worker("d", tmp_path / "ckpt")
    raise_first(epoch(job, [c, d], 2, 3, job_committed=2))
    assert c.trainer is not None and c.trainer.resumed_from == 2 and c.trainer.steps_done == 3
    e = Worker("e")  # no checkpoint folder at all
    (result,) = epoch(job, [e], 3, 4, job_committed=2)
    assert isinstance(result, RecoveryError) and "start again from step 0" in str(result)
