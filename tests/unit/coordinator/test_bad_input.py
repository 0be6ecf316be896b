"""Bad input gets a clear 4xx and leaves the state exactly as it was."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.unit.coordinator.conftest import TOKEN, Api, bearer

GOOD = {"host": "127.0.0.1", "port": 50051, "host_id": "h1", "device": "cpu"}


async def snapshot(api: Api) -> Any:
    workers = (await api.client.get("/workers")).json()
    events = (await api.client.get("/events")).json()
    for w in workers["workers"]:
        w.pop("last_heartbeat_age_s")
    return workers, events


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({**GOOD, "worker_id": "x" * 65}, 422),
        ({**GOOD, "worker_id": "bad id with spaces"}, 422),
        ({**GOOD, "worker_id": "../etc"}, 422),
        ({**GOOD, "host": "h" * 254}, 422),
        ({**GOOD, "host": "evil host"}, 422),
        ({**GOOD, "port": 0}, 422),
        ({**GOOD, "port": 65536}, 422),
        ({**GOOD, "port": -1}, 422),
        ({**GOOD, "port": "http"}, 422),
        ({**GOOD, "host_id": ""}, 422),
        ({**GOOD, "host_id": "m" * 129}, 422),
        ({**GOOD, "device": "d" * 65}, 422),
        ({**GOOD, "memory_bytes": -5}, 422),
        ({k: v for k, v in GOOD.items() if k != "host"}, 422),
        ([], 422),
    ],
)
async def test_bad_registrations_change_nothing(api: Api, body: Any, status: int) -> None:
    await api.register("a")
    before = await snapshot(api)
    r = await api.client.post("/workers/register", json=body, headers=bearer(TOKEN))
    assert r.status_code == status
    assert r.json()["detail"]  # a clear message
    assert await snapshot(api) == before


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"epoch": -1},
        {"epoch": "one"},
        {"epoch": 1, "state": "dancing"},
        {"epoch": 1, "step": -3},
        {"epoch": 1, "samples_per_s": -1.0},
        {"epoch": 1, "bytes_sent": -1},
    ],
)
async def test_bad_heartbeats_change_nothing(api: Api, body: Any) -> None:
    await api.register("a")
    before = await snapshot(api)
    r = await api.client.post("/workers/a/heartbeat", json=body, headers=api.as_worker("a"))
    assert r.status_code == 422 and r.json()["detail"]
    assert await snapshot(api) == before


async def test_malformed_json_and_bad_paths(api: Api) -> None:
    await api.register("a")
    before = await snapshot(api)
    json_type = {"Content-Type": "application/json"}
    r = await api.client.post("/workers/register", content=b"{not json", headers=json_type | bearer(TOKEN))
    assert r.status_code == 422
    r = await api.client.post(
        "/workers/a/heartbeat",
        content=b'{"epoch": 1, "loss": NaN}',
        headers=json_type | api.as_worker("a"),
    )
    assert r.status_code == 422
    long_id = "/workers/" + "x" * 200 + "/heartbeat"
    assert (await api.client.post(long_id, json={"epoch": 1}, headers=api.as_worker("a"))).status_code == 422
    assert (await api.heartbeat("a", 99)).status_code == 409
    assert (await api.ready("a", min_workers=0)).status_code == 422
    assert (await api.ready("a", wait_s=-1)).status_code == 422
    huge_secret = bearer(TOKEN) | {"X-Worker-Secret": "s" * 300}
    r = await api.client.post("/workers/register", json={**GOOD, "worker_id": "a"}, headers=huge_secret)
    assert r.status_code == 422
    assert (await api.client.get("/events", params={"after": -1})).status_code == 422
    assert await snapshot(api) == before


async def test_oversized_bodies_get_413(api: Api) -> None:
    await api.register("a")
    before = await snapshot(api)
    big = {**GOOD, "worker_id": "b", "device_name": "x" * (api.service.settings.max_body_bytes + 10)}
    r = await api.client.post("/workers/register", json=big, headers=bearer(TOKEN))
    assert r.status_code == 413 and "exceeds" in r.json()["detail"]

    async def chunks() -> Any:  # no Content-Length: the limit applies while streaming
        for _ in range(100):
            yield b"x" * 1024

    r = await api.client.post(
        "/workers/register", content=chunks(), headers={"Content-Type": "application/json"} | bearer(TOKEN)
    )
    assert r.status_code == 413
    assert await snapshot(api) == before


async def test_more_than_max_workers_is_refused(api: Api) -> None:
    limit = api.service.settings.max_workers
    results = await asyncio.gather(*(api.register(f"w{i}") for i in range(limit + 3)))
    codes = sorted(r.status_code for r in results)
    assert codes == [201] * limit + [409] * 3
    assert all("max_workers" in r.json()["detail"] for r in results if r.status_code == 409)
    before = await snapshot(api)
    assert (await api.register("late")).status_code == 409
    assert await snapshot(api) == before
    member = next(r.json()["worker_id"] for r in results if r.status_code == 201)
    assert (await api.register(member)).status_code == 201  # a rejoin is still accepted when full
