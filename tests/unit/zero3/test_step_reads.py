"""What a step reads of the device, and what its host staging costs, on the CPU:

- the finite checks of a pass stay on the device: the vote reads them with the loss and the norm, in one
  read of the device per step;
- the pool of gradient staging buffers is sized to the plan (a buffer for every unit that can be in
  flight, within a byte budget);
- buffers handed out beyond the pools are counted, per step in the Trainer's report, in the worker's
  telemetry and its heartbeat."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

from communication.group import PeerGroup
from communication.testing import FakeHub
from jobspec import JobSpec
from tests.unit.zero3.fixtures import UNITS, TinyNet, make_data, sharded_run
from worker.commit import vote_values
from worker.state import StateView
from worker.telemetry import Telemetry
from worker.trainer import StepReport, Trainer
from worker.zero3.reductions import GRAD_STAGING_BYTES, HostStaging, Reductions, grad_staging_count
from worker.zero3.sharded import ShardedModule
from worker.zero3.staging import StagingPool

pytestmark = pytest.mark.timeout(90)


def test_the_vote_reads_the_finite_flag_with_the_loss_and_the_norm_in_one_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reads: list[torch.Size] = []
    real_cpu = torch.Tensor.cpu

    def counted(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        reads.append(self.shape)
        return real_cpu(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", counted)
    ok = vote_values(torch.tensor(6.0), torch.tensor(0.25), torch.tensor(True))
    bad = vote_values(torch.tensor(6.0), torch.tensor(0.25), torch.tensor(False))
    assert reads == [torch.Size([3]), torch.Size([3])], "one read of [loss, norm, finite] per vote"
    assert ok.tolist() == [6.0, 0.25, 1.0]
    assert bad.tolist() == [0.0, 0.0, 0.0]  # a rank whose gradient was not finite votes to skip
    assert vote_values(torch.tensor(6.0), torch.tensor(0.25), False).tolist() == [0.0, 0.0, 0.0]


def test_the_pass_hands_over_its_device_flags_without_reading_them(monkeypatch: pytest.MonkeyPatch) -> None:
    reductions = Reductions(FakeHub(1).backend(0), "none")
    assert reductions.finite() is True  # no gradient checked yet: on the host, nothing to read
    flags = torch.tensor(True) & torch.tensor(False)  # the AND a pass keeps on its device
    reductions._finite_flags = flags

    def no_read(self: torch.Tensor) -> bool:
        raise AssertionError("the flag was read outside the vote")

    monkeypatch.setattr(torch.Tensor, "__bool__", no_read)
    assert reductions.finite() is flags
    monkeypatch.undo()
    reductions.reset()
    assert reductions.finite() is True


def test_gradient_staging_is_sized_to_the_plan() -> None:
    mib = 1 << 20
    assert grad_staging_count(12, 4 * mib) == 12  # every unit can be in flight: a buffer each
    assert grad_staging_count(1000, 16 * mib) == GRAD_STAGING_BYTES // (16 * mib)  # within the budget
    assert grad_staging_count(30, 2 * GRAD_STAGING_BYTES) == 2  # huge units: still one sent, one filled
    assert grad_staging_count(1, 2 * GRAD_STAGING_BYTES) == 1  # never more than the units
    with pytest.raises(ValueError):
        grad_staging_count(0, mib)


def test_buffers_beyond_the_pool_are_counted_by_the_engine() -> None:
    """One pooled buffer and copies that land late: the next unit's gradient finds it busy."""
    job = JobSpec.model_validate(dict(steps=2, global_batch=8, warmup_steps=0))
    seen: list[int] = []

    class Late:
        def __init__(self) -> None:
            self.at = threading.Event()
            threading.Timer(0.02, self.at.set).start()

        def query(self) -> bool:
            return self.at.is_set()

        def synchronize(self) -> None:
            self.at.wait(5)

    def staging() -> HostStaging:
        return HostStaging(StagingPool(64 * 64, 1, pin=False), lambda device: Late())

    def probe(rank: int, engine: ShardedModule) -> None:
        assert engine.reductions.staging is not None
        assert engine.staging_overflows == engine.reductions.staging.pool.overflows
        seen.append(engine.staging_overflows)

    sharded_run(TinyNet, job, 1, make_data(), units=UNITS, host_staging=staging, probe=probe)
    assert len(seen) == job.steps and seen[-1] > 0 and seen == sorted(seen)


def test_the_trainer_reports_each_steps_overflows_and_the_telemetry_sums_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    job = JobSpec.model_validate(dict(job_id="job", steps=3, global_batch=8, warmup_steps=0, eval_every=0))
    reports: list[StepReport] = []
    monkeypatch.setattr(ShardedModule, "staging_overflows", property(lambda self: 3 * len(reports)))
    group = PeerGroup("job", 0, 0, ("127.0.0.1:9000",))
    trainer = Trainer(job, group, FakeHub(1).backend(0), device=torch.device("cpu"))
    trainer.run(on_step=reports.append)
    assert [r.staging_overflows for r in reports] == [0, 3, 3]
    t = Telemetry(worker_id="w")
    for r in reports:
        t.count_staging_overflows(r.staging_overflows)
    view = StateView(announced_epoch=1, epoch=1, rank=0, world_size=1, committed_step=2, staged_step=None)
    body = t.body(view)
    assert body["staging_overflows"] == 6
