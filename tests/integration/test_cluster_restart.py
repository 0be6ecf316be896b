"""Self-fencing: workers that lose the coordinator stop stepping once their lease runs out, and carry on
in the same epoch when a coordinator restarted on the same SQLite file answers again."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.conftest import ProcessReaper
from tests.integration.cluster_support import (
    get,
    processes_mentioning,
    read_jsonl,
    start_coordinator,
    start_worker,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def last_step(tmp: Path) -> int:
    steps = [
        r["step"]
        for w in ("w0", "w1")
        for r in read_jsonl(tmp / "telemetry" / f"{w}.jsonl")
        if r["kind"] == "step"
    ]
    return max(steps, default=-1)


def test_workers_fence_without_the_coordinator_and_resume_after_its_restart(
    reaper: ProcessReaper, tmp_path: Path
) -> None:
    job = ("--steps", "150", "--min-workers", "2", "--checkpoint-every", "0")
    coordinator, url = start_coordinator(reaper, tmp_path, *job)
    workers = [start_worker(reaper, tmp_path, url, f"w{i}") for i in range(2)]
    wait_for(lambda: last_step(tmp_path) >= 20, 90, "training")

    coordinator.kill()  # SIGKILL
    coordinator.wait(10)
    killed = time.monotonic()
    # Within the lease (2 s) plus a step or two, both workers stop stepping.
    time.sleep(3.5)
    fenced_at = last_step(tmp_path)
    time.sleep(2.0)
    assert last_step(tmp_path) == fenced_at, "a worker kept stepping without its lease"
    assert fenced_at < 150
    assert all("lease lost" in (tmp_path / f"w{i}.log").read_text() for i in range(2))

    restarted, _ = start_coordinator(reaper, tmp_path, *job, port=int(url.rsplit(":", 1)[1]))
    for i, proc in enumerate(workers):
        assert proc.wait(120) == 0, (tmp_path / f"w{i}.log").read_text()[-3000:]
    assert time.monotonic() - killed > 5
    status = get(url, "/cluster/status")
    assert status["state"] == "finished"
    epochs = {
        r["epoch"]
        for w in ("w0", "w1")
        for r in read_jsonl(tmp_path / "telemetry" / f"{w}.jsonl")
        if r["kind"] == "step"
    }
    assert len(epochs) == 1, "the workers carried on in their epoch: no re-form was needed"
    results = [
        r
        for w in ("w0", "w1")
        for r in read_jsonl(tmp_path / "telemetry" / f"{w}.jsonl")
        if r["kind"] == "result"
    ]
    assert [r["steps_done"] for r in results] == [150, 150]
    assert all("lease restored" in (tmp_path / f"w{i}.log").read_text() for i in range(2))
    restarted.terminate()
    restarted.wait(20)
    assert processes_mentioning(str(tmp_path)) == []
