"""What the coordinator carries for the data plane's lanes: each worker's rendezvous store port (kept in
SQLite, handed out with the epoch) and the bytes each worker sent per lane (status and /metrics)."""

from __future__ import annotations

from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from coordinator.app import create_app
from coordinator.clock import FakeClock
from jobspec import JobSpec
from tests.unit.coordinator.conftest import ADMIN_TOKEN, READ_TOKEN, Api, bearer, make_settings


async def test_store_ports_ride_the_barrier_answer_and_bad_ones_are_refused(api: Api) -> None:
    assert (await api.register("a", store_port=41000)).status_code == 201
    assert (await api.register("b")).status_code == 201  # hosts no store
    for bad in (0, 70000, "x", -1):
        r = await api.register("c", store_port=bad)
        assert r.status_code == 422, bad
    body = (await api.ready("a", min_workers=2)).json()
    assert [(w["worker_id"], w["store_port"]) for w in body["workers"]] == [("a", 41000), ("b", None)]


async def test_store_ports_survive_a_coordinator_restart(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    job = JobSpec.model_validate({"job_id": "lanes", "steps": 10})
    secrets: dict[str, str] = {}  # the workers' secrets, kept across the restart as workers keep theirs
    seen: list[list[tuple[str, int | None]]] = []
    for round_ in range(2):
        clock = FakeClock(start=10.0 + 1000 * round_)
        app = create_app(settings, job if round_ == 0 else None, clock=clock, background=False)
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://c", headers=bearer(READ_TOKEN)
            ) as c:
                api = Api(app, c, clock, app.state.service, secrets=secrets)
                if round_ == 0:
                    await api.register("a", store_port=41001)
                    await api.register("b", store_port=41002)
                workers = (await api.ready("a")).json()["workers"]
                seen.append([(w["worker_id"], w["store_port"]) for w in workers])
    assert seen[0] == seen[1] == [("a", 41001), ("b", 41002)]


async def test_bytes_by_lane_reach_status_and_metrics(api: Api) -> None:
    await api.register("a")
    await api.register("b")
    epoch = (await api.ready("a", min_workers=2)).json()["epoch"]
    assert (await api.heartbeat("a", epoch, bytes_by_lane={"grpc": 100, "local": 7})).status_code == 200
    assert (await api.heartbeat("b", epoch, bytes_by_lane={"grpc": 5, "local": 30})).status_code == 200
    for bad in ({"grpc": -1}, {"wire": 3}, {"local": "many"}, [1, 2]):
        assert (await api.heartbeat("a", epoch, bytes_by_lane=bad)).status_code == 422, bad
    views = {w["worker_id"]: w for w in (await api.client.get("/cluster/status")).json()["workers"]}
    assert views["a"]["bytes_by_lane"] == {"grpc": 100, "local": 7}
    assert views["b"]["bytes_by_lane"] == {"grpc": 5, "local": 30}
    text = (await api.client.get("/metrics", headers=bearer(ADMIN_TOKEN))).text
    samples = {
        s.labels["lane"]: s.value
        for family in text_string_to_metric_families(text)
        if family.name == "zerowire_bytes_sent_by_lane"
        for s in family.samples
    }
    assert samples == {"grpc": 105.0, "local": 37.0}
