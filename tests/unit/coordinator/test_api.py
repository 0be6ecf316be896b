"""The REST API in-process (ASGITransport), on a fake clock injected through a dependency override."""

from __future__ import annotations

import asyncio

from prometheus_client.parser import text_string_to_metric_families

from tests.unit.coordinator.conftest import Api


async def test_register_heartbeat_leave_flow(api: Api) -> None:
    r = await api.register("a")
    assert r.status_code == 201
    body = r.json()
    secret = body.pop("worker_secret")
    assert len(secret) >= 43 and secret == api.secrets["a"]
    assert body == {
        "worker_id": "a",
        "epoch": 1,
        "heartbeat_interval_s": 0.5,
        "heartbeat_timeout_s": 2.0,
        "progress_timeout_s": 10.0,
        "rank": 0,
        "world_size": 1,
    }
    assert (await api.register("b")).json()["epoch"] == 2
    hb = await api.heartbeat("a", 1, step=3, loss=0.25, state="waiting")
    assert hb.status_code == 200
    assert hb.json()["action"] == "reform" and hb.json()["epoch"] == 2
    hb = await api.heartbeat("a", 2, step=4)
    assert hb.json() == {
        "epoch": 2,
        "action": "continue",
        "rank": 0,
        "world_size": 2,
        "cluster_state": "waiting",
    }
    assert (await api.leave("a")).status_code == 204
    assert (await api.leave("a")).status_code == 204  # idempotent, no new epoch
    hb = await api.heartbeat("a", 3)
    assert hb.status_code == 200 and hb.json()["action"] == "stop"
    workers = (await api.client.get("/workers")).json()
    assert workers["epoch"] == 3
    assert [(w["worker_id"], w["state"], w["rank"]) for w in workers["workers"]] == [
        ("b", "alive", 0),
        ("a", "left", None),
    ]


async def test_generated_id_and_unknown_ids(api: Api) -> None:
    r = await api.register()
    assert r.status_code == 201 and r.json()["worker_id"].startswith("w-")
    assert (await api.heartbeat("ghost", 0)).status_code == 404  # whatever the credential: register
    assert (await api.leave("ghost")).status_code == 404


async def test_dead_worker_gets_410_until_it_registers_again(api: Api) -> None:
    await api.register("a")
    await api.register("b")
    api.clock.advance(1.5)
    assert (await api.heartbeat("b", 2)).status_code == 200
    api.clock.advance(1.0)  # a: silent 2.5 s > 2 s
    assert await api.service.expire()
    r = await api.heartbeat("a", 2)
    assert r.status_code == 410 and "register again" in r.json()["detail"]
    status = (await api.client.get("/cluster/status")).json()
    assert status["epoch"] == 3 and status["world_size"] == 1
    dead = next(w for w in status["workers"] if w["worker_id"] == "a")
    assert dead["state"] == "dead" and dead["last_heartbeat_age_s"] == 2.5
    again = await api.register("a")
    assert again.status_code == 201 and again.json()["epoch"] == 4
    events = (await api.client.get("/events")).json()["events"]
    kinds = [(e["kind"], e["worker_id"]) for e in events if e["kind"] != "epoch"]
    assert kinds == [("joined", "a"), ("joined", "b"), ("died", "a"), ("rejoined", "a")]
    died = next(e for e in events if e["kind"] == "died")
    assert "heartbeat timeout" in died["reason"] and died["epoch"] == 3
    later = (await api.client.get("/events", params={"after": died["id"]})).json()
    assert [e["id"] for e in later["events"]] == [e["id"] for e in events if e["id"] > died["id"]]


async def test_ready_long_poll_wakes_on_membership_change(api: Api) -> None:
    await api.register("a")
    r = await api.ready("a", min_workers=2, wait_s=0)
    assert r.json()["ready"] is False and r.json()["active_workers"] == 1
    waiter = asyncio.create_task(api.ready("a", min_workers=2, wait_s=20))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    await api.register("b")
    r = await asyncio.wait_for(waiter, 5.0)
    body = r.json()
    assert body["ready"] is True and body["epoch"] == 2 and body["min_workers"] == 2
    assert body["job_hash"] == api.service.job.hash
    assert [(w["worker_id"], w["rank"], w["port"], w["host_id"]) for w in body["workers"]] == [
        ("a", 0, 50051, "h1"),
        ("b", 1, 50051, "h1"),
    ]
    # default min_workers comes from the job (2); every caller of this epoch gets the same membership
    answers = await asyncio.gather(*(api.ready(wid) for wid in ("a", "b", "a", "b")))
    assert all(a.json()["workers"] == body["workers"] and a.json()["epoch"] == 2 for a in answers)
    assert answers[0].json() == answers[2].json() and answers[1].json() == answers[3].json()


async def test_ready_wait_is_capped(api: Api) -> None:
    api.service.settings = api.service.settings.model_copy(update={"ready_wait_cap": 0.1})
    await api.register("a")
    r = await asyncio.wait_for(api.ready("a", min_workers=3, wait_s=60), 5.0)
    assert r.status_code == 200 and r.json()["ready"] is False


async def test_job_and_cluster_status(api: Api) -> None:
    job = (await api.client.get("/job")).json()
    assert job["job"]["job_id"] == "unit" and job["job_hash"] == api.service.job.hash
    await api.register("a", host="10.1.2.3", port=4000, host_id="m1", device="cuda:0", device_name="H100")
    await api.heartbeat("a", 1, state="training", step=12, loss=0.5, samples_per_s=100.0)
    api.clock.advance(0.25)
    s = (await api.client.get("/cluster/status")).json()
    assert s["state"] == "training" and s["epoch"] == 1 and s["world_size"] == 1 and s["step"] == 12
    assert s["job"]["job_id"] == "unit" and s["uptime_s"] == 0.25
    w = s["workers"][0]
    assert (w["worker_id"], w["rank"], w["state"], w["host"], w["port"], w["host_id"], w["device"]) == (
        "a", 0, "alive", "10.1.2.3", 4000, "m1", "cuda:0",
    )  # fmt: skip
    assert (w["step"], w["loss"], w["samples_per_s"], w["last_heartbeat_age_s"]) == (12, 0.5, 100.0, 0.25)
    await api.register("b")
    assert (await api.client.get("/cluster/status")).json()["state"] == "reforming"
    hb = await api.heartbeat("a", 1, state="training")
    assert hb.json()["action"] == "reform"


async def test_metrics_are_prometheus_text(api: Api) -> None:
    await api.register("a")
    await api.heartbeat("a", 1)
    await api.ready("a", min_workers=1)
    r = await api.client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(r.text)
        for s in fam.samples
    }
    assert samples[("zerowire_epoch", ())] == 1
    assert samples[("zerowire_workers", (("state", "alive"),))] == 1
    assert samples[("zerowire_heartbeats_total", (("result", "continue"),))] == 1
    assert samples[("zerowire_barrier_wait_seconds_count", ())] == 1
    key = ("zerowire_request_latency_seconds_count", (("method", "POST"), ("route", "/workers/register")))
    assert samples[key] == 1


async def test_healthz_is_open(api: Api) -> None:
    r = await api.client.get("/healthz", headers={"Authorization": ""})
    assert r.status_code == 200 and r.json() == {"status": "ok"}


async def test_heartbeat_telemetry_reaches_status_and_bad_values_change_nothing(api: Api) -> None:
    await api.register("a")
    ok = await api.heartbeat(
        "a", 1, step=7, state="training", compute_s=0.5, comm_s=0.25, wait_s=0.125, test_accuracy=0.96875
    )
    assert ok.status_code == 200
    view = (await api.client.get("/cluster/status")).json()["workers"][0]
    assert (view["compute_s"], view["comm_s"], view["wait_s"]) == (0.5, 0.25, 0.125)
    assert view["test_accuracy"] == 0.96875 and view["test_loss"] is None
    for bad in ({"test_accuracy": 1.5}, {"wait_s": -1.0}, {"compute_s": "fast"}):
        r = await api.heartbeat("a", 1, step=8, **bad)
        assert r.status_code == 422, bad
    view = (await api.client.get("/cluster/status")).json()["workers"][0]
    assert view["step"] == 7 and view["test_accuracy"] == 0.96875
    # A beat without telemetry clears it: the figures always describe the latest step.
    await api.heartbeat("a", 1, step=9)
    view = (await api.client.get("/cluster/status")).json()["workers"][0]
    assert view["step"] == 9 and view["compute_s"] is None
