"""The worker lifecycle against a fake coordinator, a fake backend and scripted trainers."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from communication.backend import WireStats
from communication.errors import EpochChanged
from communication.group import PeerGroup
from jobspec import JobSpec
from tests.unit.worker.fake_coordinator import FakeCoordinator, eventually
from worker.daemon import EXIT_OK, EXIT_TRAINING_FAILED, ConfigError, JobMismatch, WorkerDaemon, run_worker
from worker.forming import Formed
from worker.identity import WorkerConfig
from worker.outage import CoordinatorLost
from worker.state import WorkerState

pytestmark = pytest.mark.timeout(30)


class FakeBackend:
    """The parts of a worker lane the daemon itself uses (the scripted trainer makes no calls)."""

    store_port = None  # hosts no rendezvous store

    def __init__(self) -> None:
        self.groups: list[PeerGroup] = []
        self.epochs: list[int] = []
        self.epoch_moved = threading.Condition()
        self.closed = False

    def start(self, bind: str) -> int:
        return 50051

    def bytes_by_lane(self) -> dict[str, int]:
        return {"grpc": 10, "local": 0}

    def set_group(self, group: PeerGroup) -> None:
        self.groups.append(group)

    def set_epoch(self, epoch: int) -> None:
        with self.epoch_moved:
            self.epochs.append(epoch)
            self.epoch_moved.notify_all()

    def stats(self) -> WireStats:
        return WireStats(10, 20)

    def close(self) -> None:
        self.closed = True


@dataclass(frozen=True)
class Report:
    step: int
    loss: float = 1.0
    samples: int = 8
    world_size: int = 1
    step_time_s: float = 0.01
    compute_s: float = 0.006
    comm_s: float = 0.003
    wait_s: float = 0.001


@dataclass(frozen=True)
class Outcome:
    steps_done: int
    final_loss: float
    test_accuracy: float | None


class ScriptedTrainer:
    """Steps `job.steps` times; `script(trainer, step)` may raise or block to play a failure."""

    built: list[ScriptedTrainer] = []
    script: Any = None

    def __init__(self, job: JobSpec, group: PeerGroup, backend: FakeBackend, **kwargs: Any) -> None:
        self.job, self.group, self.backend, self.kwargs = job, group, backend, kwargs
        backend.set_group(group)  # as the real trainer does
        self.built_at = time.monotonic()
        self.saved: Path | None = None
        ScriptedTrainer.built.append(self)

    @staticmethod
    def prepare(job: JobSpec, cfg: WorkerConfig) -> None:
        return None  # no dataset

    def form(self, state: WorkerState, ids: tuple[str, ...], job_committed: int) -> Formed:
        return Formed("fresh", 0, 0, 0.0, holding=None, keep=None)  # it holds no state

    def run(self, *, on_step: Any, on_eval: Any, should_stop: Any) -> Outcome:
        for step in range(self.job.steps):
            if should_stop():
                return Outcome(step, 1.0, None)
            if ScriptedTrainer.script is not None:
                ScriptedTrainer.script(self, step)
            time.sleep(0.02)
            on_step(Report(step=step, world_size=self.group.world_size))
        on_eval(type("Eval", (), {"step": self.job.steps, "test_loss": 0.1, "test_accuracy": 0.97})())
        return Outcome(self.job.steps, 0.5, 0.97)

    def save_model(self, path: Path) -> None:
        self.saved = path


@pytest.fixture(autouse=True)
def _reset() -> None:
    ScriptedTrainer.built = []
    ScriptedTrainer.script = None


def make_daemon(fake: FakeCoordinator, tmp_path: Path, **cfg: Any) -> tuple[WorkerDaemon, FakeBackend]:
    backend = FakeBackend()
    config = WorkerConfig(
        coordinator="http://coordinator",
        token=fake.token,
        worker_id="w0",
        bind="127.0.0.1:0",
        host_id="host-a",
        device="cpu",
        save_model=tmp_path / "model.safetensors",
        telemetry_dir=tmp_path,
        barrier_poll_s=0.2,
        **{"coordinator_grace_s": 5.0, **cfg},
    )
    daemon = WorkerDaemon(
        config,
        trainers=ScriptedTrainer,
        backend_factory=lambda job, token: backend,
        transport=fake.transport(),
    )
    return daemon, backend


async def test_a_clean_run_registers_trains_saves_reports_and_leaves(tmp_path: Path) -> None:
    fake = FakeCoordinator()
    daemon, backend = make_daemon(fake, tmp_path)
    assert await daemon.run() == EXIT_OK
    (trainer,) = ScriptedTrainer.built
    assert trainer.group.rank == 0 and trainer.group.addresses == ("127.0.0.1:50051",)
    assert trainer.saved == tmp_path / "model.safetensors"
    assert backend.groups == [trainer.group] and backend.closed
    assert fake.calls("DELETE", "/workers/w0")
    last = fake.calls("POST", "/heartbeat")[-1][3]
    assert last["state"] == "finished"
    # each value says which step it is of: the last loss of step 4, the evaluation after step 4
    assert (last["loss"], last["loss_step"], last["test_accuracy"], last["test_step"]) == (1.0, 4, 0.97, 4)
    assert last["recovery"] == {"epoch": 1, "mode": "fresh", "resumed_at": 0, "steps_lost": 0, "seconds": 0.0}
    records = [json.loads(line) for line in (tmp_path / "w0.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records] == ["recovery"] + ["step"] * 5 + ["eval", "result"]
    assert records[-1]["test_accuracy"] == 0.97 and records[1]["bytes_sent"] == 10
    # the cluster token admits the worker; everything after registration speaks with its own secret
    used = {(method, path, bearer) for method, path, bearer in fake.credentials}
    assert {(m, p) for m, p, b in used if b == fake.token} == {("GET", "/job"), ("POST", "/workers/register")}
    assert {b for m, p, b in used if (m, p) != ("GET", "/job") and p != "/workers/register"} == {
        fake.secrets["w0"]
    }


async def test_a_trainer_that_raises_reports_failed_and_leaves_within_a_heartbeat_timeout(
    tmp_path: Path,
) -> None:
    fake = FakeCoordinator(job=JobSpec(steps=50, warmup_steps=0))
    raised: list[float] = []

    def script(trainer: ScriptedTrainer, step: int) -> None:
        if step == 3:
            raised.append(time.monotonic())
            raise RuntimeError("a bug in the step loop")

    ScriptedTrainer.script = script
    daemon, _ = make_daemon(fake, tmp_path)
    with pytest.raises(RuntimeError, match="a bug"):
        await daemon.run()
    last_beat = fake.calls("POST", "/heartbeat")[-1]
    (leave,) = fake.calls("DELETE", "/workers/w0")
    assert last_beat[3]["state"] == "failed"
    assert leave[0] - raised[0] < 0.3  # the fake's heartbeat timeout
    await asyncio.sleep(0.2)  # four heartbeat intervals: nothing beats any more
    assert fake.calls("POST", "/heartbeat")[-1] == last_beat


async def test_no_trainer_is_built_before_the_barrier_opens(tmp_path: Path) -> None:
    fake = FakeCoordinator()
    daemon, _ = make_daemon(fake, tmp_path, min_workers=2)
    task = asyncio.create_task(daemon.run())
    await eventually(lambda: fake.calls("GET", "/training/ready"))
    await asyncio.sleep(0.5)
    assert ScriptedTrainer.built == [], "trained before the second worker joined"
    fake.add_worker("w1", port=7)
    joined = time.monotonic()
    assert await asyncio.wait_for(task, 10) == EXIT_OK
    (trainer,) = ScriptedTrainer.built
    assert trainer.built_at >= joined
    assert trainer.group.world_size == 2 and trainer.group.epoch == 2
    assert trainer.group.addresses == ("127.0.0.1:50051", "127.0.0.1:7")
    # the barrier's data-plane key with w1 rides in the PeerGroup, by rank, and never in its repr
    assert trainer.group.peer_keys == {1: bytes.fromhex(fake.pair_key("w0", "w1", epoch=2))}
    assert str(trainer.group.peer_keys[1]) not in repr(trainer.group)


async def test_an_epoch_change_reforms_with_a_new_trainer(tmp_path: Path) -> None:
    fake = FakeCoordinator(job=JobSpec(steps=6, warmup_steps=0))
    daemon, backend = make_daemon(fake, tmp_path)

    def script(trainer: ScriptedTrainer, step: int) -> None:
        if len(ScriptedTrainer.built) == 1 and step == 2:
            fake.add_worker("w1", port=7)  # a join: the heartbeat announces the new epoch
            with backend.epoch_moved:
                assert backend.epoch_moved.wait_for(lambda: 2 in backend.epochs, 5)
            raise EpochChanged("cancelled in flight")

    ScriptedTrainer.script = script
    assert await daemon.run() == EXIT_OK
    first, second = ScriptedTrainer.built
    assert (first.group.epoch, first.group.world_size) == (1, 1)
    assert (second.group.epoch, second.group.world_size) == (2, 2)
    assert backend.epochs == [1, 2] and [g.epoch for g in backend.groups] == [1, 2]  # registered; joined


async def test_a_stop_request_drops_training_leaves_and_exits_zero(tmp_path: Path) -> None:
    fake = FakeCoordinator(job=JobSpec(steps=10_000, warmup_steps=0))
    daemon, _ = make_daemon(fake, tmp_path)
    task = asyncio.create_task(daemon.run())
    await eventually(lambda: ScriptedTrainer.built)
    daemon.request_stop("SIGTERM")
    assert await asyncio.wait_for(task, 10) == EXIT_OK
    assert fake.calls("DELETE", "/workers/w0")
    assert ScriptedTrainer.built[0].saved is None


async def test_a_job_hash_mismatch_refuses_to_start(tmp_path: Path) -> None:
    fake = FakeCoordinator(served_hash="0" * 64)
    daemon, _ = make_daemon(fake, tmp_path)
    with pytest.raises(JobMismatch):
        await daemon.run()
    assert not fake.calls("POST", "/workers/register")


async def test_an_unexpected_job_is_refused(tmp_path: Path) -> None:
    fake = FakeCoordinator()
    daemon, _ = make_daemon(fake, tmp_path, expect_job_hash="deadbeef")
    with pytest.raises(JobMismatch, match="not the expected deadbeef"):
        await daemon.run()


async def test_a_finished_worker_keeps_serving_until_its_peers_finish(tmp_path: Path) -> None:
    fake = FakeCoordinator()
    fake.add_worker("w1", port=7)
    fake.workers["w1"]["worker_state"] = "training"  # its last collective may still need our shards
    daemon, backend = make_daemon(fake, tmp_path, min_workers=2)
    task = asyncio.create_task(daemon.run())
    await eventually(lambda: daemon.t.state == "finished")
    await asyncio.sleep(0.5)
    assert not fake.calls("DELETE", "/workers/w0") and not backend.closed
    fake.workers["w1"]["worker_state"] = "finished"
    released = time.monotonic()
    assert await asyncio.wait_for(task, 10) == EXIT_OK
    (leave,) = fake.calls("DELETE", "/workers/w0")
    assert leave[0] >= released and backend.closed


async def test_timeouts_that_do_not_nest_are_refused_and_the_worker_leaves(tmp_path: Path) -> None:
    fake = FakeCoordinator()  # its heartbeat timeout is 0.3 s
    fake.timeouts["collective_timeout_s"] = 0.2
    daemon, _ = make_daemon(fake, tmp_path)
    with pytest.raises(ConfigError, match=r"heartbeat timeout \(0.3 s\) < collective timeout \(0.2 s\)"):
        await daemon.run()
    assert fake.calls("DELETE", "/workers/w0")
    assert ScriptedTrainer.built == []


async def test_a_coordinator_away_for_longer_than_the_grace_fences_and_the_worker_carries_on(
    tmp_path: Path,
) -> None:
    fake = FakeCoordinator(job=JobSpec(steps=150, warmup_steps=0))
    daemon, _ = make_daemon(fake, tmp_path, coordinator_grace_s=0.5)
    task = asyncio.create_task(daemon.run())
    await eventually(lambda: len(step_times(tmp_path)) >= 10)
    fake.heartbeat_status = 503
    await eventually(lambda: not daemon.t.lease_ok.is_set())
    fenced = time.time()  # wall clock, as the telemetry lines
    await asyncio.sleep(1.5)  # three times the grace
    assert not task.done(), "the worker gave up within the barrier timeout"
    fake.heartbeat_status = 200
    await eventually(lambda: daemon.t.lease_ok.is_set())
    restored = time.time()
    assert await asyncio.wait_for(task, 20) == EXIT_OK
    times = step_times(tmp_path)
    # At most the step in flight when the lease ran out ends while fenced; then none until it is back.
    assert sum(1 for t in times if fenced + 0.05 < t < restored) == 0, (fenced, restored)
    assert len(times) == 150 and len(fake.calls("POST", "/workers/register")) == 1


async def test_a_coordinator_lost_for_longer_than_the_barrier_timeout_ends_the_worker(tmp_path: Path) -> None:
    fake = FakeCoordinator(job=JobSpec(steps=10_000, warmup_steps=0))
    fake.timeouts.update(collective_timeout_s=1.0, startup_timeout_s=1.0, barrier_timeout_s=2.0)
    daemon, backend = make_daemon(fake, tmp_path, coordinator_grace_s=0.5)
    task = asyncio.create_task(daemon.run())
    await eventually(lambda: ScriptedTrainer.built)
    fake.heartbeat_status = 503
    lost = time.monotonic()
    with pytest.raises(CoordinatorLost, match="longer than the barrier timeout"):
        await asyncio.wait_for(task, 10)
    # The limit runs from the last heartbeat that succeeded, which may precede `lost` by up to one
    # heartbeat interval (0.05 s) plus that beat's round trip; retries back off to the heartbeat timeout.
    assert 2.0 - 0.1 <= time.monotonic() - lost < 2.0 + 0.3 + 1.0
    assert daemon.t.stop_requested.is_set() and backend.epochs, "training was aborted at once"
    assert not daemon.t.lease_ok.is_set(), "fenced before giving up"


def test_a_lost_coordinator_exits_with_the_training_failed_code(monkeypatch: pytest.MonkeyPatch) -> None:
    async def lost(self: WorkerDaemon) -> int:
        raise CoordinatorLost("the coordinator stayed unreachable")

    monkeypatch.setattr(WorkerDaemon, "run", lost)
    assert run_worker(WorkerConfig(coordinator="http://127.0.0.1:1", token="t")) == EXIT_TRAINING_FAILED


def step_times(folder: Path) -> list[float]:
    path = folder / "w0.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["time"] for r in rows if r["kind"] == "step"]


async def test_a_live_id_held_by_another_process_is_refused_clearly(tmp_path: Path) -> None:
    from worker.coordinator_client import Forbidden

    fake = FakeCoordinator()
    fake.add_worker("w0")  # a live w0 whose secret this process does not have
    daemon, _ = make_daemon(fake, tmp_path)
    with pytest.raises(Forbidden, match="w0 is live"):
        await daemon.run()
    assert ScriptedTrainer.built == [] and not fake.calls("POST", "/heartbeat")


def test_formation_checks_the_peer_keys() -> None:
    from worker.formation import group_from_ready

    job = JobSpec(steps=5, warmup_steps=0)
    members = [
        {"worker_id": wid, "ip_address": "127.0.0.1", "port": 7000 + r, "rank": r, "host_id": "h"}
        for r, wid in enumerate(("w0", "w1", "w2"))
    ]
    ready = {"epoch": 4, "workers": members, "peer_keys": {"w0": "aa" * 32, "w2": "bb" * 32}}
    group, ids = group_from_ready(ready, job, "w1")
    assert ids == ("w0", "w1", "w2") and group.rank == 1
    assert group.peer_keys == {0: b"\xaa" * 32, 2: b"\xbb" * 32}
    assert group_from_ready({**ready, "peer_keys": {}}, job, "w1")[0].peer_keys == {}
    for bad in ({"w1": "aa" * 32}, {"w9": "aa" * 32}, {"w0": "aa" * 31}, {"w0": "zz" * 32}):
        with pytest.raises(RuntimeError, match="peer key"):
            group_from_ready({**ready, "peer_keys": bad}, job, "w1")


def test_formation_hands_each_member_its_rendezvous_store() -> None:
    from worker.formation import group_from_ready

    job = JobSpec(steps=5, warmup_steps=0)
    members = [
        {
            "worker_id": "w0",
            "ip_address": "10.0.0.1",
            "port": 7000,
            "rank": 0,
            "host_id": "h0",
            "store_port": 41,
        },
        {"worker_id": "w1", "ip_address": "10.0.0.1", "port": 7001, "rank": 1, "host_id": "h0"},
        {"worker_id": "w2", "ip_address": "::1", "port": 7002, "rank": 2, "host_id": "h1", "store_port": 43},
    ]
    group, _ = group_from_ready({"epoch": 1, "workers": members}, job, "w1")
    assert group.store_addresses == ("127.0.0.1:41", "", "127.0.0.1:43")  # on the members' own machine
    assert group.host_ids == ("h0", "h0", "h1")
    bare = [{k: v for k, v in m.items() if k != "store_port"} for m in members]
    assert group_from_ready({"epoch": 1, "workers": bare}, job, "w1")[0].store_addresses == ()
