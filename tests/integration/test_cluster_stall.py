"""Liveness is progress: a worker whose training thread blocks while its heartbeat lives says so ("stalled")
and is evicted within the progress timeout; the others, who waited on it without being stalled themselves,
form a new epoch without it and finish the job. Its flight recorder, dumped on SIGUSR1, shows the stack
that holds its training thread."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ProcessReaper
from tests.integration.cluster_support import (
    env,
    get,
    processes_mentioning,
    read_jsonl,
    start_coordinator,
    start_worker,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]

HEARTBEAT_TIMEOUT = 2.0
PROGRESS_TIMEOUT = 4.0
STEPS = 40
BLOCK_AT = 14


def test_a_worker_whose_training_blocks_is_evicted_within_the_progress_timeout(
    reaper: ProcessReaper, tmp_path: Path
) -> None:
    job = ("--steps", str(STEPS), "--min-workers", "3", "--checkpoint-every", "10")
    timeouts = ("--progress-timeout", str(PROGRESS_TIMEOUT))
    _, url = start_coordinator(reaper, tmp_path, *job, *timeouts, heartbeat_timeout=str(HEARTBEAT_TIMEOUT))
    healthy = [start_worker(reaper, tmp_path, url, f"w{i}") for i in range(2)]
    with open(tmp_path / "w2.log", "ab") as log:
        stalled = reaper.spawn(
            [sys.executable, "-m", "tests.integration.stall_worker", url, "w2", str(tmp_path), str(BLOCK_AT)],
            env=env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    marker = tmp_path / "w2.blocked"
    wait_for(marker.exists, 120, "w2 to block its training thread")
    blocked_at = float(marker.read_text())

    # long before the progress timeout evicts it, the diagnosis names w2: the others wait on it in a
    # collective, its heartbeat is fresh, and its training thread is in none (its stack says where)
    def stuck() -> dict[str, Any] | None:
        found: dict[str, Any] = get(url, "/cluster/diagnosis")
        return found if [s["worker_id"] for s in found["suspects"]] == ["w2"] else None

    def both_wait() -> dict[str, Any] | None:
        found = stuck()
        return found if found and {w["worker_id"] for w in found["waiting"]} == {"w0", "w1"} else None

    found = wait_for(stuck, PROGRESS_TIMEOUT, "the diagnosis to name w2", every_s=0.1)
    named_s = time.time() - blocked_at
    (suspect,) = found["suspects"]
    assert suspect["reason"].startswith("stuck trainer"), suspect
    assert named_s < PROGRESS_TIMEOUT, named_s  # named before any timeout evicts it
    # named once one of them reported its wait; the other's report follows with its next heartbeat
    found = wait_for(both_wait, 2.0, "w0 and w1 both waiting on w2", every_s=0.1)
    assert "w2 on host" in str(found["summary"]) and "in no collective" in str(found["summary"])
    w2 = next(w for w in get(url, "/workers")["workers"] if w["worker_id"] == "w2")
    assert "stall_worker.py" in w2["stack"], w2["stack"]
    print(f"\ndiagnosis named w2 {named_s:.2f} s after its training thread blocked: {found['summary']}")

    evicted = wait_for(
        lambda: [e for e in get(url, "/events")["events"] if e["kind"] in ("evicted", "died")],
        PROGRESS_TIMEOUT + 4 * HEARTBEAT_TIMEOUT,
        "an eviction",
        every_s=0.1,
    )
    (event,) = evicted  # w2 alone: w0 and w1 waited on it, which is no stall
    assert (event["kind"], event["worker_id"]) == ("evicted", "w2"), event
    assert event["reason"].startswith("stalled: worker w2"), event
    eviction_s = event["time"] - blocked_at
    print(
        f"\nw2 evicted {eviction_s:.2f} s after its training thread blocked "
        f"(progress timeout {PROGRESS_TIMEOUT:g} s)"
    )
    assert PROGRESS_TIMEOUT - 0.1 <= eviction_s < PROGRESS_TIMEOUT + 2 * HEARTBEAT_TIMEOUT

    for i, proc in enumerate(healthy):
        assert proc.wait(120) == 0, (tmp_path / f"w{i}.log").read_text()[-3000:]
    steps = [
        r for i in range(2) for r in read_jsonl(tmp_path / "telemetry" / f"w{i}.jsonl") if r["kind"] == "step"
    ]
    after = [r for r in steps if r["epoch"] >= event["epoch"]]
    assert after and {r["world_size"] for r in after} == {2}, "w0 and w1 trained on in a new epoch of two"
    resumed = min(r["time"] for r in after)
    print(f"w0 and w1 stepped again {resumed - blocked_at:.2f} s after w2 blocked")
    results = [
        r
        for i in range(2)
        for r in read_jsonl(tmp_path / "telemetry" / f"w{i}.jsonl")
        if r["kind"] == "result"
    ]
    assert [r["steps_done"] for r in results] == [STEPS, STEPS]
    view = {w["worker_id"]: w for w in get(url, "/workers")["workers"]}
    assert view["w2"]["state"] == "dead" and view["w2"]["worker_state"] == "stalled"
    assert stalled.poll() is None, "its heartbeat lives on; it stays out while its training is stalled"
    assert "registering again once the training moves" in (tmp_path / "w2.log").read_text()
    # kill -USR1: its flight recorder shows the calls it made and where its training thread is stuck
    os.kill(stalled.pid, signal.SIGUSR1)
    dumps = lambda: list((tmp_path / "telemetry").glob("flight-w2-*.json"))  # noqa: E731
    (dump,) = wait_for(dumps, 10, "w2's flight dump")
    flight = json.loads(dump.read_text())
    assert flight["reason"] == "SIGUSR1" and flight["recorder"] == "w2"
    ops = {c["op"] for c in flight["calls"]}
    assert {"all_gather", "reduce_scatter", "exchange"} <= ops, ops
    assert all(
        c["state"] in ("completed", "failed", "cancelled", "started", "queued") for c in flight["calls"]
    )
    assert any("stall_worker.py" in stack and "wait" in stack for stack in flight["stacks"].values())
    assert [e["worker_id"] for e in get(url, "/events")["events"] if e["kind"] in ("evicted", "died")] == [
        "w2"
    ]
    reaper.kill_all()
    time.sleep(0.2)
    assert processes_mentioning(str(tmp_path)) == []


def test_a_worker_in_another_collective_is_named_with_both_ops(reaper: ProcessReaper, tmp_path: Path) -> None:
    """w2 leaves the sequence of calls for an exchange no other member makes, while w0 and w1 go on to the
    next step's gathers: each waits on the other side with every heartbeat fresh. Long before any
    collective timeout, the diagnosis names w2, in its exchange, and the gather the others are in."""
    _, url = start_coordinator(
        reaper,
        tmp_path,
        "--steps",
        str(STEPS),
        "--min-workers",
        "3",
        heartbeat_timeout=str(HEARTBEAT_TIMEOUT),
    )
    for i in range(2):  # a host each: the members meet on the gRPC lane, whose calls are matched by key
        start_worker(reaper, tmp_path, url, f"w{i}", "--host-id", f"host-{i}")
    with open(tmp_path / "w2.log", "ab") as log:
        reaper.spawn(
            [sys.executable, "-m", "tests.integration.stall_worker", url, "w2", str(tmp_path), "3",
             "exchange", "host-2"],
            env=env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    marker = tmp_path / "w2.blocked"
    wait_for(marker.exists, 120, "w2 to leave the sequence of calls")
    strayed_at = float(marker.read_text())

    def named() -> dict[str, Any] | None:
        found: dict[str, Any] = get(url, "/cluster/diagnosis")
        return found if [s["worker_id"] for s in found["suspects"]] == ["w2"] else None

    def all_wait() -> dict[str, Any] | None:  # each member's wait reported (each with its own heartbeat)
        found = named()
        return found if found and len(found["waiting"]) == 3 else None

    wait_for(named, 5.0, "the diagnosis to name w2", every_s=0.1)
    named_s = time.time() - strayed_at
    found = wait_for(all_wait, 2.0, "every member's wait", every_s=0.1)
    (suspect,) = found["suspects"]
    reason = str(suspect["reason"])
    assert reason.startswith("in another collective: exchange key 123456789"), reason
    assert "while the others are in all_gather unit" in reason and "of step 4" in reason, reason
    assert "(w2 on host host-2), which is in exchange key 123456789" in str(found["summary"]), found[
        "summary"
    ]
    ops = {w["worker_id"]: w["op"] for w in found["waiting"]}
    assert ops == {"w0": "all_gather", "w1": "all_gather", "w2": "exchange"}, found["waiting"]
    assert named_s < 5.0, named_s
    print(f"\ndiagnosis named w2 {named_s:.2f} s after it left the sequence: {found['summary']}")
    reaper.kill_all()
    time.sleep(0.2)
    assert processes_mentioning(str(tmp_path)) == []
