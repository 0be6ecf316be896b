"""What the coordinator learns of a formation: heartbeats carry how the worker's epoch was formed, recorded
once per worker and epoch in /events; the barrier answers the job's highest committed step."""

from __future__ import annotations

from tests.unit.coordinator.conftest import Api


async def test_a_recovery_is_recorded_once_in_events(api: Api) -> None:
    await api.register("a")
    await api.register("b")
    epoch = (await api.ready("a", min_workers=2)).json()["epoch"]
    report = {"epoch": epoch, "mode": "handover", "resumed_at": 41, "steps_lost": 0}
    for _ in range(3):  # every heartbeat of the epoch carries it
        assert (await api.heartbeat("a", epoch, recovery=report)).status_code == 200
    stale = {**report, "epoch": epoch - 1}
    assert (await api.heartbeat("b", epoch, recovery=stale)).status_code == 200  # an older epoch: ignored
    for bad in ({**report, "mode": "rollback"}, {**report, "steps_lost": -1}, {"epoch": epoch}):
        assert (await api.heartbeat("a", epoch, recovery=bad)).status_code == 422, bad
    events = (await api.client.get("/events")).json()["events"]
    recovered = [e for e in events if e["kind"] == "recovered"]
    assert len(recovered) == 1, recovered
    assert recovered[0]["worker_id"] == "a" and recovered[0]["epoch"] == epoch
    assert "handover at step 41, 0 committed steps lost" in recovered[0]["reason"]


async def test_the_barrier_answers_the_highest_committed_step(api: Api) -> None:
    await api.register("a")
    await api.register("b")
    body = (await api.ready("a", min_workers=2)).json()
    assert body["committed_step"] == -1
    epoch = body["epoch"]
    await api.heartbeat("a", epoch, committed_step=12)
    await api.heartbeat("b", epoch, committed_step=11)
    assert (await api.ready("a", min_workers=2)).json()["committed_step"] == 12
