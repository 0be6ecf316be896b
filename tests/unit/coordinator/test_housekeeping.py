"""Housekeeping: old dead and left records are purged (events stay), registrations are rate-limited, and
only digests of worker secrets reach the SQLite file."""

from __future__ import annotations

import base64
import sqlite3
from pathlib import Path
from typing import Any

import httpx

from coordinator.app import create_app
from coordinator.clock import FakeClock
from coordinator.credentials import digest
from coordinator.deps import get_clock
from coordinator.ratelimit import RegistrationLimiter
from jobspec import JobSpec
from tests.unit.coordinator.conftest import READ_TOKEN, TOKEN, Api, bearer, make_settings

BODY = {"host": "127.0.0.1", "port": 7000, "host_id": "h", "device": "cpu"}


async def test_dead_and_left_records_are_purged_after_the_retention(api: Api) -> None:
    retention = api.service.settings.record_retention_s
    for wid in ("a", "b", "c"):
        await api.register(wid)
    assert (await api.leave("b")).status_code == 204
    api.clock.advance(1.0)
    assert (await api.heartbeat("a", 4)).status_code == 200
    api.clock.advance(1.5)
    assert await api.service.expire()  # c: silent 2.5 s
    events_before = (await api.client.get("/events")).json()["events"]
    epoch = api.service.state.epoch
    api.clock.advance(retention - 5.0)
    assert (await api.heartbeat("a", epoch)).status_code == 200  # a stays alive throughout
    assert api.service.purge() == ()  # b left 2.5 s + retention - 5 s ago: kept
    api.clock.advance(10.0)
    assert (await api.heartbeat("a", epoch)).status_code == 200
    assert api.service.purge() == ("b", "c")
    listing = (await api.client.get("/workers")).json()
    assert [w["worker_id"] for w in listing["workers"]] == ["a"] and listing["epoch"] == epoch
    assert (await api.client.get("/events")).json()["events"] == events_before  # history kept
    rows = sqlite3.connect(api.service.store.path).execute("SELECT worker_id FROM workers").fetchall()
    assert rows == [("a",)]
    # a purged worker is unknown: its heartbeat says register again, and its id is free
    assert (await api.heartbeat("b", epoch)).status_code == 404
    assert (await api.register("b", prove=False)).status_code == 201


async def test_the_purge_survives_a_restart(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, record_retention_s=100.0)
    job = JobSpec.model_validate({"job_id": "purge"})
    for start, expect in ((1000.0, ()), (1000.0 + 150.0, ("x",))):
        clock = FakeClock(start=start, wall_start=1.7e9 + start)
        app = create_app(settings, job, clock=clock, background=False)
        app.dependency_overrides[get_clock] = lambda clock=clock: clock
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://c") as client:
                api = Api(app, client, clock, app.state.service)
                if not expect:
                    await api.register("x")
                    assert (await api.leave("x")).status_code == 204
                assert api.service.purge() == expect


def limited(tmp_path: Path, **rates: Any) -> Any:
    clock = FakeClock()
    app = create_app(make_settings(tmp_path, **rates), clock=clock, background=False)
    app.dependency_overrides[get_clock] = lambda: clock
    return app, clock


def client_at(app: Any, address: str) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(address, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://c", headers=bearer(TOKEN))


async def test_registrations_are_rate_limited_per_address(tmp_path: Path) -> None:
    app, clock = limited(tmp_path, register_rate=1.0, register_burst=2, register_rate_global=0.0)
    async with app.router.lifespan_context(app):
        async with client_at(app, "10.0.0.1") as one, client_at(app, "10.0.0.2") as two:
            codes = [(await one.post("/workers/register", json=BODY)).status_code for _ in range(2)]
            assert codes == [201, 201]
            epoch = app.state.service.state.epoch
            refused = await one.post("/workers/register", json={**BODY, "worker_id": "x"})
            assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
            assert "too many registrations" in refused.json()["detail"]
            assert app.state.service.state.epoch == epoch and "x" not in app.state.service.state.workers
            assert (await two.post("/workers/register", json=BODY)).status_code == 201  # its own bucket
            clock.advance(1.0)  # one token back
            assert (await one.post("/workers/register", json=BODY)).status_code == 201
            assert (await one.post("/workers/register", json=BODY)).status_code == 429


async def test_registrations_are_rate_limited_in_all(tmp_path: Path) -> None:
    app, clock = limited(
        tmp_path, register_rate=0.0, register_rate_global=0.5, register_burst_global=3, max_workers=50
    )
    async with app.router.lifespan_context(app):
        clients = [client_at(app, f"10.0.1.{i}") for i in range(5)]
        codes = [(await c.post("/workers/register", json=BODY)).status_code for c in clients]
        assert codes == [201, 201, 201, 429, 429]
        late = await clients[4].post("/workers/register", json=BODY)
        assert late.headers["retry-after"] == "2"  # one token at 0.5/s
        clock.advance(2.0)
        assert (await clients[4].post("/workers/register", json=BODY)).status_code == 201
        for c in clients:
            await c.aclose()


def test_the_limiter_remembers_a_bounded_number_of_addresses() -> None:
    limiter = RegistrationLimiter(rate=1.0, burst=1, global_rate=0.0, global_burst=1)
    for i in range(10_000):
        assert limiter.admit(f"a{i}", now=float(i)) == 0.0
    assert len(limiter._addresses) <= 4096
    assert limiter.admit("a9999", now=9999.0) == 1.0  # the busy one is still remembered


async def test_only_digests_of_worker_secrets_reach_the_database(api: Api) -> None:
    secrets = []
    for wid in ("a", "b"):
        secrets.append((await api.register(wid)).json()["worker_secret"])
    await api.register("a")  # a rejoin that presents the secret
    api.service.flush_heartbeats()
    db = Path(api.service.store.path)
    files = [p for p in db.parent.iterdir() if p.name.startswith(db.name)]  # the file, its WAL and index
    stored = b"".join(p.read_bytes() for p in files)
    assert digest(secrets[0]) in stored and digest(secrets[1]) in stored  # the right file was read
    for secret in secrets:
        raw = base64.urlsafe_b64decode(secret + "=" * (-len(secret) % 4))
        assert len(raw) == 32
        assert secret.encode() not in stored and raw not in stored
        assert secret not in (await api.client.get("/workers")).text
        assert secret not in (await api.client.get("/cluster/status")).text


async def test_a_body_that_is_not_json_is_refused_before_the_credential(api: Api) -> None:
    r = await api.client.post(
        "/workers/register",
        content=b"{not json",
        headers={"Authorization": "", "Content-Type": "application/json"},
    )
    assert r.status_code == 422
    assert (
        await api.client.post("/workers/register", json=BODY, headers=bearer(READ_TOKEN))
    ).status_code == 403
