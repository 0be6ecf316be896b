"""The coordinator's collective, start-up and barrier timeouts (GET /job) reach the worker and win over
its own configuration: lanes, trainer, barrier and linger all see them."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from jobspec import JobSpec
from tests.unit.worker.fake_coordinator import FakeCoordinator
from tests.unit.worker.test_daemon import FakeBackend, ScriptedTrainer, make_daemon
from worker import daemon as daemon_module
from worker.daemon import EXIT_OK, ConfigError, JobMismatch, WorkerDaemon
from worker.identity import WorkerConfig, adopt_timeouts

pytestmark = pytest.mark.timeout(30)
ANNOUNCED = {"collective_timeout_s": 7.0, "startup_timeout_s": 11.0, "barrier_timeout_s": 90.0}


@pytest.fixture(autouse=True)
def _reset() -> None:
    ScriptedTrainer.built = []
    ScriptedTrainer.script = None


async def test_the_coordinators_timeouts_win_and_reach_lanes_and_trainer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeCoordinator(job=JobSpec(steps=3, warmup_steps=0))
    fake.timeouts = dict(ANNOUNCED)
    lanes_built_with: list[WorkerConfig] = []

    def lanes(job: JobSpec, token: str, *, cfg: WorkerConfig) -> FakeBackend:
        lanes_built_with.append(cfg)
        return FakeBackend()

    monkeypatch.setattr(daemon_module, "default_backend_factory", lanes)
    own = WorkerConfig(  # the worker's own values, all different from the coordinator's
        coordinator="http://coordinator",
        token=fake.token,
        worker_id="w0",
        bind="127.0.0.1:0",
        device="cpu",
        save_model=tmp_path / "model.safetensors",
        collective_timeout_s=3.0,
        startup_timeout_s=4.0,
        barrier_timeout_s=50.0,
    )
    daemon = WorkerDaemon(own, trainers=ScriptedTrainer, transport=fake.transport())
    with caplog.at_level(logging.INFO, logger="worker.identity"):
        assert await daemon.run() == EXIT_OK
    adopted = (daemon.cfg.collective_timeout_s, daemon.cfg.startup_timeout_s, daemon.cfg.barrier_timeout_s)
    assert adopted == (7.0, 11.0, 90.0)
    ((cfg,),) = [lanes_built_with]
    assert (cfg.collective_timeout_s, cfg.startup_timeout_s, cfg.barrier_timeout_s) == adopted
    (trainer,) = ScriptedTrainer.built
    assert (trainer.kwargs["collective_timeout"], trainer.kwargs["startup_timeout"]) == (7.0, 11.0)
    logged = [r.getMessage() for r in caplog.records if "timeouts from the coordinator" in r.getMessage()]
    assert logged == [
        "timeouts from the coordinator: collective_timeout_s 7, startup_timeout_s 11, barrier_timeout_s 90"
    ]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("startup_timeout_s", None),
        ("collective_timeout_s", 0),
        ("barrier_timeout_s", -1.0),
        ("startup_timeout_s", "120"),
        ("collective_timeout_s", True),
        ("barrier_timeout_s", [600]),
    ],
)
async def test_a_job_answer_without_valid_timeouts_is_refused_before_registering(
    tmp_path: Path, key: str, value: Any
) -> None:
    fake = FakeCoordinator()
    if value is None:
        del fake.timeouts[key]
    else:
        fake.timeouts[key] = value
    daemon, _ = make_daemon(fake, tmp_path)
    with pytest.raises(JobMismatch, match=f"no valid {key}"):
        await daemon.run()
    assert not fake.calls("POST", "/workers/register") and ScriptedTrainer.built == []


async def test_announced_timeouts_that_do_not_nest_are_refused_and_the_worker_leaves(tmp_path: Path) -> None:
    fake = FakeCoordinator()
    fake.timeouts.update(collective_timeout_s=20.0, startup_timeout_s=10.0)
    daemon, _ = make_daemon(fake, tmp_path)
    with pytest.raises(ConfigError, match=r"collective timeout \(20 s\) must not be longer than startup"):
        await daemon.run()
    assert fake.calls("DELETE", "/workers/w0") and ScriptedTrainer.built == []


def test_adopt_timeouts_replaces_only_the_three_timeouts() -> None:
    own = WorkerConfig(coordinator="http://c", collective_timeout_s=1.0, coordinator_grace_s=9.0)
    got = adopt_timeouts(own, {"job": {}, **ANNOUNCED, "collective_timeout_s": 5})
    assert (got.collective_timeout_s, got.startup_timeout_s, got.barrier_timeout_s) == (5.0, 11.0, 90.0)
    assert got.coordinator_grace_s == 9.0 and got.coordinator == "http://c"
    assert own.collective_timeout_s == 1.0  # the original is left as it was
    for bad in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match="no valid startup_timeout_s"):
            adopt_timeouts(own, {**ANNOUNCED, "startup_timeout_s": bad})
