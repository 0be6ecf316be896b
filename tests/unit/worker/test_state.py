"""The worker's state (worker/state.py): epochs announced, installed and retired; steps staged and committed;
and the trainer's gate, asked before the vote and again before the update is applied."""

from __future__ import annotations

import threading

import pytest
import torch

from communication.errors import EpochChanged
from communication.group import PeerGroup
from communication.testing import FakeHub
from jobspec import JobSpec
from worker.state import WorkerState
from worker.trainer import Trainer

pytestmark = pytest.mark.timeout(60)


class Sink:
    def __init__(self) -> None:
        self.epochs: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)


def group(epoch: int) -> PeerGroup:
    return PeerGroup("job", epoch, 0, ("127.0.0.1:1",))


def test_an_announced_epoch_fails_older_calls_once_and_fences_the_installed_one() -> None:
    sink = Sink()
    state = WorkerState(sink)
    state.install(group(3), ("w0",))
    assert sink.epochs == [] and state.view().epoch == 3  # installing names no epoch to the lane
    assert state.announce(4) and not state.announce(4) and not state.announce(2)
    assert sink.epochs == [4] and state.announced_epoch == 4
    with pytest.raises(EpochChanged):
        state.check_current(group(3))
    with pytest.raises(EpochChanged):
        state.install(group(3), ("w0",))
    state.install(group(4), ("w0", "w1"))
    state.check_current(group(4))
    assert state.view() == state.view() and state.view().epoch == 4


def test_retiring_ends_the_installed_epoch_without_announcing_one() -> None:
    sink = Sink()
    state = WorkerState(sink)
    state.install(group(5), ("w0",))
    state.retire()
    assert sink.epochs == [6]  # the lane's floor: every epoch up to 5 is over
    assert state.announced_epoch == 5  # nothing the coordinator did not say
    with pytest.raises(EpochChanged):
        state.check_current(group(5))
    with pytest.raises(EpochChanged):
        state.install(group(5), ("w0",))
    state.install(group(6), ("w0",))  # the coordinator's next epoch is installed as usual
    state.check_current(group(6))


def test_steps_staged_then_committed() -> None:
    state = WorkerState(Sink())
    assert (state.view().committed_step, state.view().staged_step) == (-1, None)
    state.stage(0)
    assert state.view().staged_step == 0
    state.commit(0)
    assert (state.committed_step, state.view().staged_step) == (0, None)
    state.stage(1)
    state.commit(0)  # a report of an older step moves nothing back
    assert (state.committed_step, state.view().staged_step) == (0, 1)


JOB = JobSpec.model_validate(
    dict(job_id="job", steps=3, global_batch=8, lr=0.1, momentum=0.9, schedule="constant", warmup_steps=0)
)


class FencedAfterVote:
    """A gate whose fence falls between the vote and the update of step `at` (a lease lost meanwhile)."""

    def __init__(self, at: int) -> None:
        self.at, self.asked = at, 0
        self.staged_steps: list[int] = []

    def staged(self, step: int) -> None:
        self.staged_steps.append(step)

    def may_commit(self) -> None:
        self.asked += 1  # twice a step: before the vote, and before the update
        if self.staged_steps[-1] == self.at and self.asked % 2 == 0:
            raise EpochChanged("lease lost after the vote")


def test_a_rank_fenced_after_the_vote_applies_nothing() -> None:
    hub = FakeHub(2)
    addresses = ("127.0.0.1:1", "127.0.0.1:2")
    outcomes: list[object] = [None, None]
    gates = [FencedAfterVote(at=1), FencedAfterVote(at=99)]

    def rank(r: int) -> None:
        trainer = Trainer(
            JOB, PeerGroup("job", 1, r, addresses), hub.backend(r), device=torch.device("cpu"), gate=gates[r]
        )
        try:
            for step in range(2):
                trainer.train_step(step)
            outcomes[r] = trainer.steps_done
        except EpochChanged:
            outcomes[r] = ("fenced", trainer.steps_done, trainer.staged is not None)

    threads = [threading.Thread(target=rank, args=(r,), daemon=True) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    # rank 0 voted on step 1 and was fenced before applying it: step 0 applied, step 1 staged, not applied;
    # rank 1 applied both (a vote can complete on one rank and not another; recovery settles such a step)
    assert outcomes == [("fenced", 1, True), 2]
    assert gates[0].staged_steps == [0, 1] and gates[0].asked == 4
