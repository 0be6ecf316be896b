"""SIGTERM makes a worker leave gracefully (exit 0, `left`, not `dead`); Ctrl-C on `zerowire run` stops
every process it started."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import ProcessReaper
from tests.integration.cluster_support import get, processes_mentioning, start_run, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]


def worker_pid(marker: str, worker_id: str) -> int:
    pids = [pid for pid, cmd in processes_mentioning(marker) if f"--worker-id {worker_id} " in cmd]
    assert len(pids) == 1, pids
    return pids[0]


def test_sigterm_leaves_gracefully_and_ctrl_c_stops_everything(reaper: ProcessReaper, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ("--workers", "2", "--steps", "5000", "--warmup-steps", "0")
    run, url, log_path = start_run(reaper, tmp_path, *args)
    wait_for(lambda: get(url, "/cluster/status")["step"] >= 5, 90, "training")

    # SIGTERM one worker: it drops or finishes its step, leaves, exits 0.
    pid = worker_pid(str(tmp_path), "worker-0")
    os.kill(pid, signal.SIGTERM)
    sent = time.monotonic()
    wait_for(
        lambda: not any(p == pid for p, _ in processes_mentioning(str(tmp_path))), 20, "worker-0 to exit"
    )
    assert time.monotonic() - sent < 10
    views = {w["worker_id"]: w for w in get(url, "/workers")["workers"]}
    assert views["worker-0"]["state"] == "left"
    assert "left" in {e["kind"] for e in get(url, "/events")["events"] if e["worker_id"] == "worker-0"}
    assert "dead" not in {w["state"] for w in views.values()}
    assert (out / "logs" / "worker-0.log").read_text().count("left the cluster") == 1

    # The survivor re-forms alone and keeps training.
    step = get(url, "/cluster/status")["step"]
    wait_for(
        lambda: (s := get(url, "/cluster/status"))["world_size"] == 1 and s["step"] > step,
        60,
        "the survivor",
    )

    # Ctrl-C on `zerowire run`: everything stops, nothing is left behind.
    run.send_signal(signal.SIGINT)
    assert run.wait(30) == 130
    assert "interrupted" in log_path.read_text()
    assert processes_mentioning(str(tmp_path)) == []


def test_a_killed_run_takes_its_processes_with_it(reaper: ProcessReaper, tmp_path: Path) -> None:
    run, url, _ = start_run(reaper, tmp_path, "--workers", "2", "--steps", "5000")
    wait_for(lambda: len(get(url, "/workers")["workers"]) == 2, 60, "both workers")
    run.kill()  # SIGKILL: no handler of `zerowire run` runs
    run.wait(10)
    wait_for(lambda: processes_mentioning(str(tmp_path)) == [], 30, "the children to exit", every_s=0.5)
