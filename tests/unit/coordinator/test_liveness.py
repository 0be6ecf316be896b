"""Progress-based liveness through the REST API (real SQLite, fake clock): committed steps in heartbeats,
self-reported stalls, stragglers, and peer reports (majority, partitions, stale epochs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from coordinator.app import create_app
from coordinator.clock import FakeClock
from coordinator.deps import get_clock
from jobspec import JobSpec
from tests.unit.coordinator.conftest import READ_TOKEN, TOKEN, Api, bearer, make_settings

pytestmark = pytest.mark.timeout(30)


async def workers(api: Api) -> dict[str, dict[str, Any]]:
    return {w["worker_id"]: w for w in (await api.client.get("/workers")).json()["workers"]}


async def events(api: Api, kind: str = "evicted") -> list[dict[str, Any]]:
    return [e for e in (await api.client.get("/events")).json()["events"] if e["kind"] == kind]


async def suspect(api: Api, reporter: str, epoch: int, target: int | str, reason: str = "unreachable") -> Any:
    return await api.client.post(
        f"/workers/{reporter}/suspect",
        json={"epoch": epoch, "suspect": target, "reason": reason},
        headers=api.as_worker(reporter),
    )


async def beat_all(api: Api, epoch: int, steps: dict[str, int]) -> None:
    for wid, step in steps.items():
        r = await api.heartbeat(wid, epoch, committed_step=step, state="training")
        assert r.status_code == 200, r.text


def metric(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


async def test_committed_step_is_shown_kept_and_survives_a_restart(api: Api, tmp_path: Path) -> None:
    await api.register("a")
    assert (await workers(api))["a"]["committed_step"] == -1  # none yet
    assert (await api.heartbeat("a", 1, committed_step=7)).status_code == 200
    assert (await api.heartbeat("a", 1)).status_code == 200  # a beat without it keeps the value
    assert (await workers(api))["a"]["committed_step"] == 7
    status = (await api.client.get("/cluster/status")).json()
    assert status["workers"][0]["committed_step"] == 7
    text = (await api.client.get("/metrics")).text
    assert metric(text, "zerowire_worker_committed_step", worker_id="a") == 7
    for bad in (-2, "seven", 1.5):
        assert (await api.heartbeat("a", 1, committed_step=bad)).status_code == 422, bad
    assert (await workers(api))["a"]["committed_step"] == 7

    api.service.flush_heartbeats()
    clock = FakeClock()
    again = create_app(make_settings(tmp_path), JobSpec.model_validate({"job_id": "unit", "min_workers": 2}))
    again.dependency_overrides[get_clock] = lambda: clock
    async with again.router.lifespan_context(again):
        transport = httpx.ASGITransport(app=again)
        headers = bearer(READ_TOKEN)
        async with httpx.AsyncClient(transport=transport, base_url="http://c", headers=headers) as c:
            (view,) = (await c.get("/workers")).json()["workers"]
    assert view["committed_step"] == 7


async def test_a_stalled_heartbeat_evicts_its_worker_and_fences_it(api: Api) -> None:
    for wid in ("a", "b", "c"):
        await api.register(wid)
    await beat_all(api, 3, {"a": 4, "b": 4, "c": 4})
    r = await api.heartbeat("c", 3, state="stalled", committed_step=4)
    assert r.status_code == 200
    assert r.json()["action"] == "reform" and r.json()["epoch"] == 4 and r.json()["rank"] is None
    (event,) = await events(api)
    assert event["worker_id"] == "c" and event["epoch"] == 4
    assert event["reason"].startswith("stalled: worker c (rank 2)") and "committed step 4" in event["reason"]
    view = await workers(api)
    assert view["c"]["state"] == "dead" and view["c"]["worker_state"] == "stalled"
    assert [view[w]["rank"] for w in ("a", "b")] == [0, 1]
    assert (await api.heartbeat("c", 3, state="stalled")).status_code == 410  # register again when it moves
    assert (await api.heartbeat("a", 3)).json()["action"] == "reform"  # the survivors re-form
    text = (await api.client.get("/metrics")).text
    assert metric(text, "zerowire_liveness_evictions_total", reason="stalled") == 1
    assert metric(text, "zerowire_worker_committed_step", worker_id="c") is None  # live workers only
    # A member still reporting an older epoch (its training thread is stuck there) is evicted too.
    r = await api.heartbeat("b", 3, state="stalled", committed_step=4)
    assert r.json()["action"] == "reform" and r.json()["epoch"] == 5
    assert [e["worker_id"] for e in await events(api)] == ["c", "b"]


async def test_a_straggler_is_evicted_after_the_progress_timeout(api: Api) -> None:
    for wid in ("a", "b", "c"):
        await api.register(wid)
    await beat_all(api, 3, {"a": 5, "b": 5, "c": 5})  # the epoch's baselines
    await beat_all(api, 3, {"a": 6, "b": 6, "c": 5})  # one behind: not a straggler
    api.clock.advance(1.0)
    assert not await api.service.check_liveness()
    await beat_all(api, 3, {"a": 7, "b": 7, "c": 5})  # two behind: the lag starts now
    for _ in range(10):  # 10 s: not yet longer than the progress timeout
        assert not await api.service.check_liveness()
        api.clock.advance(1.0)
        await beat_all(api, 3, {"a": 7, "b": 7, "c": 5})
    assert not await api.service.check_liveness()
    api.clock.advance(0.5)
    assert await api.service.check_liveness()
    (event,) = await events(api)
    assert event["worker_id"] == "c" and event["reason"].startswith("straggler: worker c (rank 2)")
    assert "2 behind the epoch's 7 for 10.5 s > progress timeout 10 s" in event["reason"]
    view = await workers(api)
    assert view["c"]["state"] == "dead" and (view["a"]["state"], view["b"]["state"]) == ("alive", "alive")


async def test_a_member_whose_reports_trail_but_keep_moving_is_no_straggler(api: Api) -> None:
    # Fast steps, heartbeats at their own phases: at every tick c's latest report is 3 steps older than the
    # freshest, for longer than the progress timeout, but c commits every step. It is healthy.
    for wid in ("a", "b", "c"):
        await api.register(wid)
    await beat_all(api, 3, {"a": 0, "b": 0, "c": 0})  # the epoch's baselines
    for step in range(4, 60):
        api.clock.advance(0.5)
        await beat_all(api, 3, {"a": step, "b": step, "c": step - 3})
        assert not await api.service.check_liveness()
    assert await events(api) == []
    # the same trail with c stuck: evicted once it has not moved for the progress timeout
    for _ in range(21):
        api.clock.advance(0.5)
        step += 1
        await beat_all(api, 3, {"a": step, "b": step, "c": 56})
        evicted = await api.service.check_liveness()
    assert evicted
    (event,) = await events(api)
    assert event["worker_id"] == "c" and event["reason"].startswith(
        "straggler: worker c (rank 2) at committed step 56"
    )


async def test_a_lag_that_closes_in_time_and_stale_steps_evict_nobody(api: Api) -> None:
    for wid in ("a", "b", "c"):
        await api.register(wid)
    # Steps from before the epoch count for nothing: a and b report 45 (committed in an older epoch), the
    # newcomer c nothing yet, and nobody has committed in this epoch.
    await beat_all(api, 3, {"a": 45, "b": 45, "c": -1})
    for _ in range(15):
        api.clock.advance(1.0)
        await beat_all(api, 3, {"a": 45, "b": 45, "c": -1})
        assert not await api.service.check_liveness()
    # A lag that closes before the timeout restarts its clock.
    for step in range(46, 60):
        await beat_all(api, 3, {"a": step, "b": step, "c": step - 2 if step % 3 else step})
        api.clock.advance(4.0)
        for wid in ("a", "b", "c"):
            await api.heartbeat(wid, 3, committed_step=None)  # keep-alives
        assert not await api.service.check_liveness()
    assert await events(api) == []


async def test_a_majority_of_reports_evicts_the_suspect_as_left(api: Api) -> None:
    for wid in ("a", "b", "c", "d"):
        await api.register(wid)
    r = await suspect(api, "a", 4, "d", "fetch of unit 3 timed out after 30 s")
    assert r.status_code == 200
    assert r.json() == {"epoch": 4, "suspect": "d", "reporters": 1, "evicted": None}
    assert (await suspect(api, "a", 4, "d")).json()["reporters"] == 1  # the same reporter counts once
    r = await suspect(api, "b", 4, 3)  # by rank
    assert r.json() == {"epoch": 5, "suspect": "d", "reporters": 2, "evicted": "d"}
    (event,) = await events(api)
    assert event["worker_id"] == "d" and event["epoch"] == 5
    assert event["reason"].startswith("suspect: worker d (rank 3) reported unreachable or stalled by 2 of")
    assert "a: fetch of unit 3 timed out after 30 s" in event["reason"]
    view = await workers(api)
    assert view["d"]["state"] == "left" and view["d"]["rank"] is None
    assert (await api.heartbeat("d", 4)).json()["action"] == "stop"  # kept out: no loop of re-forms
    text = (await api.client.get("/metrics")).text
    assert metric(text, "zerowire_liveness_evictions_total", reason="suspect") == 1


async def test_a_partition_evicts_the_member_that_joined_last_and_never_both(api: Api) -> None:
    for wid in ("a", "b", "c"):
        await api.register(wid)
    api.clock.advance(1.0)
    assert (await api.register("a")).status_code == 201  # a registers again (its secret): joined last
    view = await workers(api)
    assert (view["a"]["rank"], view["b"]["rank"]) == (0, 1)  # ... though its rank is the lower
    epoch = 4
    assert (await suspect(api, "a", epoch, "b")).json()["evicted"] is None
    assert (await suspect(api, "b", epoch, "a")).json()["evicted"] is None  # c may still report
    await beat_all(api, epoch, {"a": 1, "b": 1, "c": 1})
    api.clock.advance(1.5)
    assert not await api.service.check_liveness()  # within the settle time (heartbeat timeout)
    await beat_all(api, epoch, {"a": 1, "b": 1, "c": 1})
    api.clock.advance(0.6)
    assert await api.service.check_liveness()
    (event,) = await events(api)
    assert event["worker_id"] == "a"
    assert "workers a and b report each other unreachable" in event["reason"]
    assert "a (rank 0), which joined last, leaves" in event["reason"]
    # Never both: b's report is about an epoch that is over now.
    r = await suspect(api, "b", epoch, "a")
    assert r.status_code == 409 and "stale report: epoch 4 is over, the current epoch is 5" in r.text
    assert not await api.service.check_liveness()
    view = await workers(api)
    assert view["b"]["state"] == "alive" and view["a"]["state"] == "left"


async def test_a_partition_of_two_is_settled_at_once_on_the_higher_rank_when_they_joined_together(
    api: Api,
) -> None:
    await api.register("a")
    await api.register("b")  # same (fake) wall time as a: the tie goes to the higher rank
    assert (await suspect(api, "b", 2, "a")).json()["evicted"] is None  # one-sided: evidence only
    assert not await api.service.check_liveness()
    r = await suspect(api, "a", 2, 1)
    assert r.json() == {"epoch": 3, "suspect": "b", "reporters": 1, "evicted": "b"}
    (event,) = await events(api)
    assert "b (rank 1), which has the higher rank, leaves" in event["reason"]


async def test_bad_or_stale_reports_change_nothing(api: Api) -> None:
    for wid in ("a", "b", "c"):
        await api.register(wid)
    cases = [
        ("a", 2, "b", 409, "stale report: epoch 2 is over, the current epoch is 3"),
        ("a", 4, "b", 409, "epoch 4 is ahead of the coordinator's epoch 3"),
        ("a", 3, "a", 422, "cannot report itself"),
        ("a", 3, 0, 422, "cannot report itself"),
        ("a", 3, "ghost", 409, "worker 'ghost' is not a member of epoch 3"),
        ("a", 3, 7, 409, "no member of epoch 3 has rank 7"),
        ("a", 3, -1, 422, ""),
        ("a", 3, "bad id!", 422, ""),
        ("ghost", 3, "b", 404, "unknown worker"),
    ]
    for reporter, epoch, target, status, text in cases:
        r = await suspect(api, reporter, epoch, target)
        assert r.status_code == status, (reporter, epoch, target, r.text)
        assert text in r.text
    for body in ({"epoch": 3, "suspect": "b", "reason": "bell\x07"}, {"epoch": 3, "suspect": "b"}):
        r = await api.client.post("/workers/a/suspect", json=body, headers=api.as_worker("a"))
        assert r.status_code == 422, body
    assert api.service.evidence.reports == {}
    await api.leave("c")
    r = await suspect(api, "c", 4, "a")
    assert r.status_code == 409 and "worker 'c' is not a member of epoch 4" in r.text
    assert await events(api) == []


async def test_reports_count_in_their_epoch_only(api: Api) -> None:
    for wid in ("a", "b", "c", "d"):
        await api.register(wid)
    assert (await suspect(api, "a", 4, "d")).json()["reporters"] == 1
    await api.register("e")  # a join: epoch 5, the evidence about epoch 4 is gone
    r = await suspect(api, "b", 5, "d")
    assert r.json() == {"epoch": 5, "suspect": "d", "reporters": 1, "evicted": None}


def test_the_progress_timeout_must_exceed_the_heartbeat_timeout(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"heartbeat timeout .* must be shorter than progress timeout"):
        make_settings(tmp_path, heartbeat_timeout=2.0, progress_timeout=2.0)
    with pytest.raises(ValidationError, match=r"progress timeout .* must be shorter than barrier timeout"):
        make_settings(tmp_path, progress_timeout=700.0)
    assert make_settings(tmp_path, progress_timeout=2.5).progress_timeout == 2.5


async def test_the_worker_client_reports_a_suspect(api: Api) -> None:
    from worker.coordinator_client import CoordinatorClient, RequestRejected

    for wid in ("a", "b"):
        await api.register(wid)
    client = CoordinatorClient(
        "http://coordinator",
        TOKEN,
        worker_secret=api.secrets["a"],
        transport=httpx.ASGITransport(app=api.app),
    )
    try:
        answer = await client.suspect("a", 2, 1, "push of unit 0 timed out after 30 s")
        assert answer == {"epoch": 2, "suspect": "b", "reporters": 1, "evicted": None}
        await api.register("c")  # the epoch moves on
        with pytest.raises(RequestRejected, match="stale report") as stale:
            await client.suspect("a", 2, "b", "unreachable")
        assert stale.value.status == 409
    finally:
        await client.close()
