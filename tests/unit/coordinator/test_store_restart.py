"""SQLite persistence in-process: state survives a new app on the same file; heartbeats are coalesced."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import httpx
import pytest

from coordinator.app import create_app
from coordinator.clock import FakeClock
from jobspec import JobSpec
from tests.unit.coordinator.conftest import READ_TOKEN, Api, bearer, make_settings


async def test_state_survives_a_new_app_on_the_same_db(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    job = JobSpec.model_validate({"job_id": "persist", "steps": 40})
    clock = FakeClock(start=50.0)
    app = create_app(settings, job, clock=clock, background=False)
    headers = bearer(READ_TOKEN)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://c", headers=headers
        ) as c:
            api = Api(app, c, clock, app.state.service)
            for wid in ("a", "b", "c"):
                await api.register(wid)
            await api.leave("b")
            await api.heartbeat("a", 4, step=9, loss=1.5, state="training")
            before = (await c.get("/workers")).json()
            keys_before = (await api.ready("a")).json()["peer_keys"]
    # a new process: a fresh clock far later, no job given (the stored one is kept)
    clock2 = FakeClock(start=9000.0)
    app2 = create_app(settings, None, clock=clock2, background=False)
    async with app2.router.lifespan_context(app2):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app2), base_url="http://c", headers=headers
        ) as c:
            api2 = Api(app2, c, clock2, app2.state.service, secrets=api.secrets)  # the workers' secrets
            after = (await c.get("/workers")).json()
            assert after["epoch"] == before["epoch"] == 4
            ages = ("last_heartbeat_age_s", "values_age_s", "restored")
            strip = lambda ws: [{k: v for k, v in w.items() if k not in ages} for w in ws]  # noqa: E731
            assert strip(after["workers"]) == strip(before["workers"])  # ranks, steps, losses, states
            # read back from the database: marked so until their next heartbeats
            assert [w["restored"] for w in before["workers"]] == [False] * 3
            assert [w["restored"] for w in after["workers"]] == [True] * 3
            assert (await c.get("/job")).json()["job"]["job_id"] == "persist"
            events = (await c.get("/events")).json()["events"]
            assert events[-1]["kind"] == "coordinator_restarted" and events[-1]["epoch"] == 4
            # live workers are accepted at once, with the secrets they had, and not evicted within the grace
            assert (await api2.heartbeat("a", 4)).json()["action"] == "continue"
            assert (
                (await api2.ready("a")).json()["peer_keys"] == keys_before == {"c": keys_before["c"]}
            )  # the master key survived too
            clock2.advance(settings.heartbeat_timeout + settings.grace_s - 0.1)
            assert not await api2.service.expire()
            clock2.advance(0.2)  # c never heartbeated after the restart
            assert await api2.service.expire()
            status = (await c.get("/cluster/status")).json()
            assert {w["worker_id"]: w["state"] for w in status["workers"]} == {
                "a": "dead",
                "b": "left",
                "c": "dead",
            }


async def test_a_different_job_on_an_existing_db_is_refused(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    app = create_app(settings, JobSpec.model_validate({"job_id": "one"}), background=False)
    async with app.router.lifespan_context(app):
        pass
    other = create_app(settings, JobSpec.model_validate({"job_id": "two"}), background=False)
    with pytest.raises(ValueError, match="differs from the configured job"):
        async with other.router.lifespan_context(other):
            pass


async def test_heartbeats_are_coalesced_into_one_write(api: Api, settings: object) -> None:
    await api.register("a")
    for step in range(50):
        await api.heartbeat("a", 1, step=step)
    db = str(api.service.store.path)
    assert sqlite3.connect(db).execute("SELECT step FROM workers").fetchone() == (
        0,
    )  # memory is authoritative
    assert api.service.flush_heartbeats() == 1  # fifty heartbeats, one row
    assert sqlite3.connect(db).execute("SELECT step FROM workers").fetchone() == (49,)
    assert api.service.flush_heartbeats() == 0  # nothing new


async def test_heartbeat_flush_in_chunks(api: Api) -> None:
    for wid in ("a", "b", "c"):
        await api.register(wid)
    for wid in ("a", "b", "c"):
        assert (await api.heartbeat(wid, 3, step=5)).status_code == 200
    assert api.service.pending_heartbeats == 3
    assert api.service.flush_heartbeats(max_rows=2) == 2
    assert api.service.pending_heartbeats == 1
    assert api.service.flush_heartbeats(max_rows=2) == 1
    rows = sqlite3.connect(str(api.service.store.path)).execute("SELECT step FROM workers").fetchall()
    assert rows == [(5,), (5,), (5,)]


def test_a_file_of_an_older_coordinator_gains_the_new_columns(tmp_path: Path) -> None:
    from coordinator.store import Store

    db = tmp_path / "old.db"
    conn = sqlite3.connect(db)
    conn.executescript(
        """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE workers (
            worker_id TEXT PRIMARY KEY, host TEXT NOT NULL, port INTEGER NOT NULL, host_id TEXT NOT NULL,
            device TEXT NOT NULL, device_name TEXT, memory_bytes INTEGER, version TEXT,
            status TEXT NOT NULL, rank INTEGER, joined_wall REAL NOT NULL, last_heartbeat_wall REAL NOT NULL,
            epoch_seen INTEGER NOT NULL, step INTEGER NOT NULL, loss REAL, samples_per_s REAL,
            bytes_sent INTEGER NOT NULL, bytes_received INTEGER NOT NULL, state TEXT NOT NULL
        );
        INSERT INTO meta VALUES ('epoch', '1');
        INSERT INTO workers VALUES ('old', 'h', 1, 'm', 'cpu', NULL, NULL, NULL, 'alive', 0, 1.0, 2.0, 1, 5,
                                    NULL, NULL, 0, 0, 'training');
        """
    )
    conn.commit()
    conn.close()
    store = Store(db)
    loaded = store.open()
    (record,) = loaded.state.workers.values()
    assert record.secret_digest == b"" and record.ended_wall is None and record.step == 5
    assert record.committed_step == -1  # none reported
    assert len(loaded.master_key) == 32
    store.close()
    again = Store(db)
    assert again.open().master_key == loaded.master_key  # generated once, then kept
    again.close()
