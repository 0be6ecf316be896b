"""A real coordinator process killed with SIGKILL and restarted on the same SQLite file loses nothing (the
workers' secrets and the data-plane keys included) and evicts no live worker (its own downtime is longer
than the heartbeat timeout)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ProcessReaper, free_port
from tests.integration.coordinator_proc import spawn, wait_healthy

TOKEN = "restart-test-token"
READ_TOKEN = "restart-test-read-token"


def as_(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]


def test_sigkill_and_restart_keeps_everything(reaper: ProcessReaper, tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    db = tmp_path / "coordinator.db"
    job_flags = ("--job-id", "restart-job", "--steps", "77", "--lr", "0.05", "--min-workers", "3")
    first = spawn(reaper, port, db, TOKEN, *job_flags, read_token=READ_TOKEN)
    wait_healthy(first, base)
    client = httpx.Client(base_url=base, headers=as_(READ_TOKEN), timeout=5.0)
    secrets: dict[str, str] = {}
    for i, wid in enumerate(("w-a", "w-b", "w-c")):
        body = {"worker_id": wid, "host": "127.0.0.1", "port": 6000 + i, "host_id": f"m{i}", "device": "cpu"}
        r = client.post("/workers/register", json=body, headers=as_(TOKEN))
        assert r.status_code == 201
        secrets[wid] = r.json()["worker_secret"]
    ready_before = client.get("/training/ready", params={"wait_s": 5}, headers=as_(secrets["w-a"])).json()
    assert ready_before["ready"] is True and ready_before["epoch"] == 3
    assert sorted(ready_before["peer_keys"]) == ["w-b", "w-c"]
    job_before = client.get("/job").json()
    assert job_before["job"]["steps"] == 77

    # the workers keep heartbeating through the outage, as real ones would
    stop = threading.Event()
    failures: list[int] = []

    def heartbeats() -> None:
        with httpx.Client(base_url=base, timeout=2.0) as hb:
            while not stop.is_set():
                for wid in ("w-a", "w-b", "w-c"):
                    try:
                        beat = {"epoch": 3, "state": "training"}
                        r = hb.post(f"/workers/{wid}/heartbeat", json=beat, headers=as_(secrets[wid]))
                    except httpx.TransportError:
                        continue  # the coordinator is down
                    if r.status_code != 200:
                        failures.append(r.status_code)
                stop.wait(0.3)

    beat = threading.Thread(target=heartbeats, daemon=True)
    beat.start()
    try:
        time.sleep(1.5)  # several heartbeats (and at least one coalesced flush) before the kill
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=10)
        time.sleep(3.0)  # down for longer than the 2 s heartbeat timeout
        second = spawn(reaper, port, db, TOKEN, *job_flags, read_token=READ_TOKEN)
        wait_healthy(second, base)
        time.sleep(5.0)  # longer than grace + timeout: a worker not accepted at once would be dead now
        status = client.get("/cluster/status").json()
    finally:
        stop.set()
        beat.join(timeout=10)
    assert failures == []  # never 401/404/410: the same secrets accepted at once after the restart
    assert status["epoch"] == 3 and status["world_size"] == 3 and status["state"] == "training"
    assert {w["worker_id"]: (w["state"], w["rank"]) for w in status["workers"]} == {
        "w-a": ("alive", 0),
        "w-b": ("alive", 1),
        "w-c": ("alive", 2),
    }
    assert all(w["last_heartbeat_age_s"] < 2.0 for w in status["workers"])
    assert client.get("/job").json() == job_before
    ready_after = client.get("/training/ready", params={"wait_s": 0}, headers=as_(secrets["w-a"])).json()
    assert ready_after == ready_before  # the same peer keys: the master key survived
    events = client.get("/events").json()["events"]
    assert [e["kind"] for e in events].count("coordinator_restarted") == 1
    assert not [e for e in events if e["kind"] == "died"]
    client.close()


def test_reaper_detects_a_silent_worker_in_the_real_process(reaper: ProcessReaper, tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = spawn(
        reaper,
        port,
        tmp_path / "c.db",
        TOKEN,
        "--heartbeat-interval",
        "0.2",
        "--heartbeat-timeout",
        "1",
        read_token=READ_TOKEN,
    )
    wait_healthy(proc, base)
    with httpx.Client(base_url=base, headers=as_(READ_TOKEN), timeout=5.0) as client:
        secrets = {}
        for i, wid in enumerate(("live", "silent")):
            body = {"worker_id": wid, "host": "127.0.0.1", "port": 7000 + i, "host_id": "m", "device": "cpu"}
            r = client.post("/workers/register", json=body, headers=as_(TOKEN))
            assert r.status_code == 201
            secrets[wid] = r.json()["worker_secret"]
        t_last = time.monotonic()
        dead_after = None
        while time.monotonic() - t_last < 10:
            live = as_(secrets["live"])
            assert client.post("/workers/live/heartbeat", json={"epoch": 2}, headers=live).status_code == 200
            workers = {w["worker_id"]: w for w in client.get("/cluster/status").json()["workers"]}
            if workers["silent"]["state"] == "dead":
                dead_after = time.monotonic() - t_last
                break
            time.sleep(0.05)
        assert dead_after is not None
        # timeout + one reaper tick (0.1 s), with slack for a busy shared machine; the lower bound allows for
        # the registration answer reaching us a moment after the coordinator stamped it
        assert 0.9 <= dead_after < 1.0 + 0.1 + 2.0
        assert workers["live"]["state"] == "alive" and workers["live"]["rank"] == 0
        silent = as_(secrets["silent"])
        assert client.post("/workers/silent/heartbeat", json={"epoch": 2}, headers=silent).status_code == 410
