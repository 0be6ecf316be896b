"""A peer SIGKILLed mid-collective: the survivors fail within 1 s of the epoch change, or at the
collective timeout if no one tells them, or at once when a call to the dead peer breaks; no task is
left behind. Real processes, real gRPC on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ProcessReaper
from tests.integration.wire_harness import spawn_peers

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]


def _wait_files(paths: list[Path], procs: list[subprocess.Popen[bytes]], limit: float) -> None:
    deadline = time.monotonic() + limit
    while not all(p.exists() for p in paths):
        for proc in procs:
            assert proc.poll() is None, f"peer exited early with {proc.returncode}"
        assert time.monotonic() < deadline, f"timed out waiting for {paths}"
        time.sleep(0.01)


def _run(
    reaper: ProcessReaper, tmp_path: Path, world: int, scenario: str, timeout: float, tell_epoch: bool
) -> list[dict[str, Any]]:
    procs = spawn_peers(reaper, tmp_path, world, scenario, str(timeout))
    survivors = list(range(world - 1))
    _wait_files([tmp_path / f"ready.{r}" for r in range(world)], procs, 60)
    _wait_files([tmp_path / f"waiting.{r}" for r in survivors], procs, 30)
    victim = procs[-1]
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait(10)
    if tell_epoch:
        (tmp_path / "epoch").write_text("2")
    results = []
    for r in survivors:
        assert procs[r].wait(timeout=timeout + 30) == 0
        results.append(json.loads((tmp_path / f"result.{r}.json").read_text()))
    return results


def _no_leaks(result: dict[str, Any]) -> None:
    assert result["inflight"] == 0, result
    assert result["tasks_after"] <= result["tasks_before"], result


def test_killed_peer_then_epoch_change_fails_within_a_second(reaper: ProcessReaper, tmp_path: Path) -> None:
    results = _run(reaper, tmp_path, 3, "hang-reduce", timeout=30.0, tell_epoch=True)
    for result in results:
        assert result["error"] == "EpochChanged", result
        assert result["since_epoch"] is not None and result["since_epoch"] < 1.0, result
        assert result["elapsed"] < 30.0, result
        _no_leaks(result)


def test_killed_peer_without_epoch_change_times_out(reaper: ProcessReaper, tmp_path: Path) -> None:
    results = _run(reaper, tmp_path, 3, "hang-reduce", timeout=3.0, tell_epoch=False)
    for result in results:
        assert result["error"] == "CollectiveTimeout", result
        assert 3.0 <= result["elapsed"] < 4.5, result
        _no_leaks(result)


def test_killed_peer_breaks_a_fetch_at_once(reaper: ProcessReaper, tmp_path: Path) -> None:
    results = _run(reaper, tmp_path, 2, "hang-gather", timeout=30.0, tell_epoch=False)
    for result in results:
        assert result["error"] == "PeerLost", result
        assert result["peer"] == result["victim"], result  # evidence a worker reports to the coordinator
        assert result["elapsed"] < 5.0, result
        _no_leaks(result)
