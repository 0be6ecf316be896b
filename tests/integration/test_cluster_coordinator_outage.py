"""A coordinator away for longer than the workers' grace: SIGKILLed mid-training and restarted later on the
same port and state file, it finds its workers fenced where they were. No worker exits (none with the
configuration-error code, as one that gave up at its grace would), and the job finishes in its epoch."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.integration.cluster_support import read_jsonl, wait_for
from worker.coordinator_client import SyncCoordinatorClient
from zerowire.localcluster import LocalCluster, write_job_toml

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

GRACE_S = 1.0  # the workers' --coordinator-grace
DOWN_S = 4.0  # how long the coordinator stays away: four graces, two heartbeat timeouts
STEPS = 150  # fenced at about step 60 (killed at 20, then 2.8 s of steps): room to spare either side


def step_records(cluster: LocalCluster) -> list[dict[str, object]]:
    return [
        r
        for child in cluster.worker_children()
        for r in read_jsonl(cluster.telemetry_dir / f"{child.name}.jsonl")
        if r["kind"] == "step"
    ]


def last_step(cluster: LocalCluster) -> int:
    return max((int(str(r["step"])) for r in step_records(cluster)), default=-1)


def test_workers_outlast_a_coordinator_outage_longer_than_their_grace(tmp_path: Path) -> None:
    started = time.monotonic()
    job_file = tmp_path / "job.toml"
    write_job_toml(job_file, {"job_id": "outage", "steps": STEPS, "min_workers": 2})
    cluster = LocalCluster(
        output=tmp_path / "run",
        workers=2,
        job_file=job_file,
        extra_worker_args=["--coordinator-grace", str(GRACE_S)],
    )
    with cluster:
        cluster.start_coordinator()
        cluster.start_workers()
        wait_for(lambda: last_step(cluster) >= 20, 60, "step 20")
        cluster.kill_coordinator()
        killed = time.monotonic()
        time.sleep(2.0 + 0.8)  # the lease (a heartbeat timeout, 2 s) runs out, a step in flight ends
        fenced_at = last_step(cluster)
        time.sleep(DOWN_S - 2.8)
        assert last_step(cluster) == fenced_at < STEPS - 1, "a worker stepped without its lease"
        assert all(c.alive() for c in cluster.worker_children()), "a worker gave up within the outage"
        cluster.restart_coordinator()
        down_s = time.monotonic() - killed
        for child in cluster.worker_children():
            assert child.proc.wait(60) == 0, child.log_path.read_text()[-3000:]
        with SyncCoordinatorClient(cluster.url, cluster.read_token) as client:
            status = client.cluster_status()
            events = client.events(0)
    print(
        f"\ncoordinator down {down_s:.1f} s (workers' grace {GRACE_S:g} s), fenced at step {fenced_at}; "
        f"test wall time {time.monotonic() - started:.1f} s"
    )
    assert status["state"] == "finished"
    assert [e for e in events if e["kind"] in ("died", "evicted", "rejoined")] == []
    assert sum(e["kind"] == "coordinator_restarted" for e in events) == 1
    assert {r["epoch"] for r in step_records(cluster)} == {2}, "one epoch: no re-form was needed"
    results = [
        r
        for child in cluster.worker_children()
        for r in read_jsonl(cluster.telemetry_dir / f"{child.name}.jsonl")
        if r["kind"] == "result"
    ]
    assert [r["steps_done"] for r in results] == [STEPS, STEPS]
    for child in cluster.worker_children():
        text = child.log_path.read_text()
        assert "lease lost" in text and "staying fenced and retrying" in text and "lease restored" in text
