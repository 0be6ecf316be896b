"""The heartbeat is tied to the main task: no dead trainer behind a live heartbeat, and the reverse."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time

import pytest

from communication.group import PeerGroup
from tests.unit.worker.fake_coordinator import FakeCoordinator, eventually
from worker.coordinator_client import CoordinatorClient, RetryPolicy
from worker.daemon import in_thread
from worker.heartbeat import CoordinatorLost, HeartbeatLoop, LeaseLost, Telemetry, run_tied
from worker.state import WorkerState

pytestmark = pytest.mark.timeout(20)


class RecordingBackend:
    def __init__(self) -> None:
        self.epochs: list[tuple[float, int]] = []

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append((time.monotonic(), epoch))


def setup(
    fake: FakeCoordinator, grace_s: float = 5.0, outage_limit_s: float = 10.0
) -> tuple[HeartbeatLoop, Telemetry, RecordingBackend]:
    secret = fake.add_worker("w0")
    client = CoordinatorClient(
        "http://coordinator",
        fake.token,
        worker_secret=secret,
        transport=fake.transport(),
        retry=RetryPolicy(attempts=1),
    )
    tel = Telemetry(worker_id="w0")
    backend = RecordingBackend()
    state = WorkerState(backend)
    state.install(PeerGroup("job", fake.epoch, 0, ("127.0.0.1:1",)), ("w0",))  # training in the current epoch

    async def reregister() -> int:
        fake.add_worker("w0")
        return fake.epoch

    hb = HeartbeatLoop(
        client,
        tel,
        state,
        interval_s=0.05,
        timeout_s=0.3,
        grace_s=grace_s,
        outage_limit_s=outage_limit_s,
        reregister=reregister,
    )
    return hb, tel, backend


def beats(fake: FakeCoordinator) -> list[dict[str, object]]:
    return [r[3] for r in fake.calls("POST", "/heartbeat")]


async def test_a_trainer_that_raises_reports_failed_and_the_heartbeat_stops() -> None:
    fake = FakeCoordinator()
    hb, tel, _ = setup(fake)

    def trainer() -> None:
        time.sleep(0.3)
        raise RuntimeError("boom in the step loop")

    async def main() -> None:
        tel.update(state="training")
        await in_thread(trainer, "train")

    with pytest.raises(RuntimeError, match="boom"):
        await run_tied(main(), hb, abort=lambda: None, final_state=lambda exc: "failed" if exc else None)
    sent = beats(fake)
    assert len(sent) >= 3, "the heartbeat ran while training"
    assert sent[-1]["state"] == "failed"
    assert all(b["state"] == "training" for b in sent[:-1])
    await asyncio.sleep(0.3)  # six intervals: a zombie heartbeat would beat again
    assert len(beats(fake)) == len(sent)


async def test_reform_sets_the_backend_epoch_at_once_while_training_continues() -> None:
    fake = FakeCoordinator()
    hb, _, backend = setup(fake)
    old = fake.epoch

    async def main() -> str:
        await asyncio.sleep(0.2)
        fake.add_worker("w1")  # a join: the epoch moves on
        bumped = time.monotonic()
        await eventually(lambda: backend.epochs)
        assert backend.epochs[0][0] - bumped < 0.3  # within a few heartbeat intervals
        return "ok"

    assert await run_tied(main(), hb, abort=lambda: None, final_state=lambda exc: None) == "ok"
    assert backend.epochs[0][1] == old + 1
    assert hb.state.announced_epoch == old + 1


async def test_stop_action_sets_the_stop_flag() -> None:
    fake = FakeCoordinator(action="stop")
    hb, tel, _ = setup(fake)

    async def main() -> None:
        await eventually(lambda: tel.stop_requested.is_set())

    await asyncio.wait_for(run_tied(main(), hb, abort=lambda: None, final_state=lambda exc: None), 5)


async def test_a_worker_declared_dead_registers_again_and_cancels_its_epoch() -> None:
    fake = FakeCoordinator()
    hb, _, backend = setup(fake)
    del fake.workers["w0"]  # declared dead: heartbeats answer 404 until it registers again

    async def main() -> None:
        await eventually(lambda: backend.epochs)

    await asyncio.wait_for(run_tied(main(), hb, abort=lambda: None, final_state=lambda exc: None), 5)
    assert "w0" in fake.workers
    assert backend.epochs[0][1] == fake.epoch


async def test_a_lost_coordinator_fences_backs_off_and_gives_up_after_the_outage_limit() -> None:
    fake = FakeCoordinator()
    hb, tel, _ = setup(fake, grace_s=0.3, outage_limit_s=1.5)
    aborted: list[float] = []
    fake.heartbeat_status = 503
    fenced_at: list[float] = []

    def step_loop() -> None:
        while tel.lease_ok.is_set():
            time.sleep(0.01)
        fenced_at.append(time.monotonic())
        tel.wait_lease(0.05)  # the fence: blocks until the lease is back or the worker stops

    async def main() -> None:
        with pytest.raises(LeaseLost, match="stopping while fenced"):
            await in_thread(step_loop, "steps")
        await asyncio.sleep(60)  # cancelled by the tie

    started = time.monotonic()
    with pytest.raises(CoordinatorLost, match="longer than the barrier timeout"):
        await run_tied(
            main(), hb, abort=lambda: (aborted.append(time.monotonic()), tel.stop_requested.set()),
            final_state=lambda exc: "failed",
        )  # fmt: skip
    assert aborted, "the main task was aborted"
    assert 0.3 <= fenced_at[0] - started < aborted[0] - started, "fenced after the heartbeat timeout"
    assert 1.5 <= aborted[0] - started < 1.5 + 0.3 + 0.5, "given up after the outage limit, not the grace"
    assert not tel.lease_ok.is_set()
    assert tel.state == "failed"
    times = [r[0] for r in fake.calls("POST", "/heartbeat")]
    gaps = [b - a for a, b in itertools.pairwise(times[3:-1])]  # backed off (the last beat is the final one)
    assert gaps and max(gaps) <= 0.3 + 0.1, "retried at least once per heartbeat timeout"
    assert sum(gaps) / len(gaps) > 2 * 0.05, "backed off from the heartbeat interval"


async def test_a_coordinator_back_after_the_grace_restores_the_lease_and_the_steps_resume() -> None:
    fake = FakeCoordinator()
    hb, tel, _ = setup(fake, grace_s=0.2, outage_limit_s=30.0)
    tel.update(state="training", progress_timeout_s=0.6)

    def fenced_step() -> float:
        while tel.lease_ok.is_set():
            time.sleep(0.01)
        tel.wait_lease(0.1)
        return time.monotonic()

    async def main() -> float:
        await asyncio.sleep(0.2)
        hb.state.commit(0)
        tel.progress()  # a step committed: the progress timeout applies from here
        fake.heartbeat_status = 503
        loop = asyncio.get_running_loop()
        loop.call_later(1.2, setattr, fake, "heartbeat_status", 200)  # away six graces
        resumed: float = await in_thread(fenced_step, "steps")
        await asyncio.sleep(0.2)
        return resumed

    started = time.monotonic()
    resumed = await asyncio.wait_for(run_tied(main(), hb, abort=lambda: None, final_state=lambda e: None), 10)
    assert 1.2 + 0.2 <= resumed - started < 1.2 + 0.2 + 0.3 + 0.3
    assert tel.lease_ok.is_set() and not tel.stop_requested.is_set()
    # Fenced for twice the progress timeout, the worker was waiting, not stalled: the clock restarted
    # with the lease.
    assert all(b["state"] == "training" for b in beats(fake)) and beats(fake)[-1]["committed_step"] == 0


def test_heartbeat_rejects_an_interval_not_below_its_timeout() -> None:
    fake = FakeCoordinator()
    client = CoordinatorClient("http://c", "secret", transport=fake.transport())

    async def reregister() -> int:
        return 0

    with pytest.raises(ValueError, match="below its timeout"):
        HeartbeatLoop(
            client,
            Telemetry("w"),
            WorkerState(RecordingBackend()),
            interval_s=2,
            timeout_s=2,
            grace_s=5,
            reregister=reregister,
        )


def test_the_fence_holds_from_the_lease_deadline_not_from_a_failed_beat() -> None:
    """The lease runs out at its deadline even while no beat has failed yet (a beat in flight, a loop
    between retries): the step loop is fenced at once, and a renewal lets it go."""
    tel = Telemetry(worker_id="w0")
    tel.renew_lease(time.monotonic() + 0.2)
    assert tel.lease_held() and tel.lease_ok.is_set()
    time.sleep(0.25)
    assert tel.lease_ok.is_set() and not tel.lease_held()  # nobody cleared it: the deadline passed
    released: list[float] = []

    def renew_later() -> None:
        time.sleep(0.3)
        released.append(time.monotonic())
        tel.renew_lease(time.monotonic() + 10.0)

    thread = threading.Thread(target=renew_later)
    thread.start()
    tel.wait_lease(5.0)  # blocks until the renewal
    resumed = time.monotonic()
    thread.join(5)
    assert released and resumed >= released[0]
    assert tel.lease_held()
