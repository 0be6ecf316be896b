"""The worker's evidence for its self-report "stalled": the progress clock, the watched data-plane calls, the
telemetry that reports it, and the heartbeat that stays out of the cluster while its training is stalled."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

from communication.group import PeerGroup
from communication.testing import FakeHub
from tests.unit.worker.fake_coordinator import FakeCoordinator, eventually
from tests.unit.worker.test_heartbeat import setup
from worker.heartbeat import run_tied
from worker.liveness import ProgressClock, WatchedCalls
from worker.state import WorkerState
from worker.telemetry import Telemetry

pytestmark = pytest.mark.timeout(20)


class Now:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def training(now: Now, progress_s: float | None = 10.0, startup_s: float = 120.0) -> Telemetry:
    tel = Telemetry("w0", clock=ProgressClock(now))
    tel.update(state="training", progress_timeout_s=progress_s, startup_timeout_s=startup_s)
    tel.lease_ok.set()
    return tel


def test_the_start_up_timeout_holds_until_the_first_committed_step_then_the_progress_timeout() -> None:
    now = Now()
    tel = training(now)
    state = WorkerState(FakeHub(1).backend(0))
    now.t += 119.0
    assert tel.reported_state() == "training"  # building the model, loading data: within start-up
    now.t += 2.0
    assert tel.reported_state() == "stalled" and tel.body(state.view())["state"] == "stalled"
    state.commit(0)
    tel.progress()
    body = tel.body(state.view())
    assert (body["committed_step"], body["step"], tel.reported_state()) == (0, 0, "training")
    now.t += 10.0
    assert tel.reported_state() == "training"
    now.t += 0.5
    assert tel.reported_state() == "stalled"
    tel.progress()
    assert tel.last_progress == now.t and tel.reported_state() == "training"
    tel.update(state="waiting")  # at the barrier, then a new epoch: start-up again
    tel.update(state="training")
    now.t += 60.0
    assert tel.reported_state() == "training"


def test_only_training_with_a_progress_timeout_and_a_lease_can_be_stalled() -> None:
    now = Now()
    tel = training(now, startup_s=1.0)
    now.t += 5.0
    assert tel.reported_state() == "stalled"
    tel.lease_ok.clear()  # fenced for want of the coordinator: waiting, not stalled
    assert tel.reported_state() == "training"
    tel.lease_ok.set()
    tel.update(state="waiting")
    now.t += 5.0
    assert tel.reported_state() == "waiting"
    never = training(now, progress_s=None, startup_s=1.0)  # a coordinator without a progress timeout
    now.t += 1000.0
    assert never.reported_state() == "training"


def _until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def test_a_call_in_flight_is_waiting_on_peers_and_its_end_is_progress() -> None:
    now = Now()
    tel = training(now, progress_s=2.0, startup_s=2.0)
    hub = FakeHub(2)
    watched, peer = WatchedCalls(hub.backend(0), tel.clock), hub.backend(1)
    groups = [PeerGroup("job", 1, r, ("a:1", "b:1")) for r in range(2)]
    pending = watched.all_gather(groups[0], 0, 1, torch.ones(2), torch.empty(4), 10.0)
    assert tel.clock.in_flight == 1
    now.t += 30.0  # a peer is slow: the collective timeout and peer reports judge that, not this
    assert tel.reported_state() == "training"
    peer.all_gather(groups[1], 0, 1, torch.zeros(2), torch.empty(4), 10.0).wait(10.0)
    assert pending.wait(10.0).tolist() == [1, 1, 0, 0]
    assert _until(lambda: tel.clock.in_flight == 0)
    now.t += 1.5
    assert tel.reported_state() == "training"  # the call's end was progress
    now.t += 1.0
    assert tel.reported_state() == "stalled"
    for call in (
        lambda: watched.reduce_scatter(groups[0], 1, 1, torch.ones(4), torch.empty(2), 10.0),
        lambda: watched.recv(torch.empty(2), group=groups[0], src=1, key=5, timeout=10.0),
    ):
        handle = call()
        assert tel.clock.in_flight == 1
        assert handle.cancel()  # a call withdrawn ends too
        assert _until(lambda: tel.clock.in_flight == 0)
    with pytest.raises(ValueError):
        watched.all_gather(groups[0], 2, 1, torch.ones(2), torch.empty(3), 10.0)  # a bad call
    assert tel.clock.in_flight == 0
    watched.set_epoch(3)  # everything else is the backend's own
    assert hub.epoch == 3 and watched.bytes_by_lane() == {"grpc": 8, "local": 0}  # the gather's 2 values


def test_the_registration_answer_sets_the_timeouts() -> None:
    tel = Telemetry("w0")
    tel.liveness_from({"progress_timeout_s": 7.5}, 90.0)
    assert (tel.progress_timeout_s, tel.startup_timeout_s) == (7.5, 90.0)
    tel.liveness_from({"progress_timeout_s": 7.5, "startup_timeout_s": 30}, 90.0)
    assert tel.startup_timeout_s == 30.0
    tel.liveness_from({}, 90.0)  # a coordinator that judges no progress
    assert tel.progress_timeout_s is None


async def test_evicted_while_stalled_the_worker_fences_and_registers_again_only_once_it_moves() -> None:
    fake = FakeCoordinator()
    hb, tel, backend = setup(fake)  # `setup`'s registration adds w0 to the fake again: a new epoch
    epoch = fake.epoch
    tel.update(state="training", progress_timeout_s=0.2, startup_timeout_s=0.2)

    async def main() -> None:
        await eventually(lambda: any(b["state"] == "stalled" for b in beats(fake)))
        fake.heartbeat_status = 410  # the coordinator evicted it: dead
        await eventually(lambda: backend.epochs)
        await asyncio.sleep(0.3)  # six intervals of 410 answers
        assert fake.epoch == epoch, "no registration while the training is stalled"
        tel.progress()  # the training moves again
        await eventually(lambda: fake.epoch > epoch)
        fake.heartbeat_status = 200

    await asyncio.wait_for(run_tied(main(), hb, abort=lambda: None, final_state=lambda exc: None), 10)
    assert backend.epochs[0][1] == epoch + 1, "fenced: its epoch is retired, its collectives fail at once"
    assert hb.state.announced_epoch == fake.epoch


def beats(fake: FakeCoordinator) -> list[dict[str, Any]]:
    return [r[3] for r in fake.calls("POST", "/heartbeat")]
