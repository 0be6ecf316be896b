"""What the live page reads: every worker value with the age of the heartbeat it came from (and whether it
predates a coordinator restart), the straggler ratio, the training's history (curves, formations) kept
across a restart, and the page's own files, served without a token and holding no data."""

from __future__ import annotations

import tomllib
from fnmatch import fnmatch
from pathlib import Path

import httpx
import pytest

from coordinator.app import create_app
from coordinator.clock import FakeClock
from coordinator.history import FormationReport, Series, TrainingHistory
from jobspec import JobSpec
from tests.unit.coordinator.conftest import READ_TOKEN, Api, bearer, make_settings

REPO = Path(__file__).resolve().parents[3]


async def test_restored_values_carry_their_age_until_the_next_heartbeat(tmp_path: Path) -> None:
    """A coordinator killed 20 s after its last flush: the committed steps it reads back are 9 steps older
    than the workers' last reports, and its API says so (restored, 20 s old) instead of showing them as
    fresh; the next heartbeat makes them current."""
    settings = make_settings(tmp_path)
    job = JobSpec.model_validate({"job_id": "ages", "min_workers": 1})
    clock = FakeClock(start=50.0, wall_start=1.7e9)
    app = create_app(settings, job, clock=clock, background=False)
    service = app.state.service
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://c", headers=bearer(READ_TOKEN)
        ) as c:
            api = Api(app, c, clock, service)
            await api.register("a")
            await api.heartbeat("a", 1, step=10, committed_step=10, state="training")
            assert service.flush_heartbeats() == 1
            clock.advance(1.0)
            await api.heartbeat("a", 1, step=19, committed_step=19, state="training")
            (fresh,) = (await c.get("/cluster/status")).json()["workers"]
            assert (fresh["committed_step"], fresh["restored"], fresh["values_age_s"]) == (19, False, 0.0)
            service.close = service.store.close  # a SIGKILL: the last heartbeat is never written
    clock2 = FakeClock(start=7.0, wall_start=1.7e9 + 21.0)  # a new process, 20 s after the last beat
    app2 = create_app(settings, None, clock=clock2, background=False)
    async with app2.router.lifespan_context(app2):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app2), base_url="http://c", headers=bearer(READ_TOKEN)
        ) as c:
            api2 = Api(app2, c, clock2, app2.state.service, secrets=api.secrets)
            (old,) = (await c.get("/cluster/status")).json()["workers"]
            assert old["committed_step"] == 10  # what the database holds, 9 steps behind the worker
            assert old["restored"] is True
            assert old["values_age_s"] == pytest.approx(21.0)  # the flushed beat's age, not the restart's
            assert old["last_heartbeat_age_s"] == 0.0  # the expiry clock restarted (the grace)
            clock2.advance(0.5)
            await api2.heartbeat("a", 1, step=20, committed_step=20, state="training")
            (now,) = (await c.get("/workers")).json()["workers"]
            assert (now["committed_step"], now["restored"], now["values_age_s"]) == (20, False, 0.0)
            clock2.advance(4.0)
            (later,) = (await c.get("/workers")).json()["workers"]
            assert later["values_age_s"] == pytest.approx(4.0) == later["last_heartbeat_age_s"]


async def test_the_status_gives_the_straggler_ratio_the_clock_and_the_heartbeat_interval(api: Api) -> None:
    for wid in ("a", "b", "c"):
        await api.register(wid)
    parts = {"a": (0.2, 0.1, 0.1), "b": (0.2, 0.4, 0.2)}  # compute, network wait, data wait: 0.4 s, 0.8 s
    for wid, (compute, wait, data) in parts.items():
        body = {"compute_s": compute, "comm_s": 0.5, "wait_s": wait, "data_wait_s": data}
        assert (await api.heartbeat(wid, 3, state="training", **body)).status_code == 200
    status = (await api.client.get("/cluster/status")).json()
    ratios = {w["worker_id"]: w["straggler_ratio"] for w in status["workers"]}
    assert ratios == {"a": 1.0, "b": 2.0, "c": None}  # c reported no step time
    assert status["heartbeat_interval_s"] == api.service.settings.heartbeat_interval
    assert status["now"] == api.clock.wall()
    listed = {
        w["worker_id"]: w["straggler_ratio"] for w in (await api.client.get("/workers")).json()["workers"]
    }
    assert listed == ratios


async def test_the_history_has_one_point_per_step_and_a_formation_per_epoch(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    clock = FakeClock()
    job = JobSpec.model_validate({"job_id": "h", "min_workers": 2})
    app = create_app(settings, job, clock=clock, background=False)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://c", headers=bearer(READ_TOKEN)
        ) as c:
            api = Api(app, c, clock, app.state.service)
            await api.register("a")
            await api.register("b")
            formed = {"epoch": 2, "resumed_at": 0, "steps_lost": 0}
            for step in range(4):
                for wid, mode, took in (("a", "fresh", 0.25), ("b", "join", 0.75)):
                    body = {
                        "step": step,
                        "committed_step": step,
                        "loss": 2.0 - 0.25 * step,
                        "loss_step": step,
                        "recovery": {**formed, "mode": mode, "seconds": took},
                    }
                    if step == 3:
                        body.update(test_loss=1.1, test_accuracy=0.625, test_step=2)
                    assert (await api.heartbeat(wid, 2, **body)).status_code == 200
            # a loss with no step it belongs to is no point; neither is an older epoch's formation
            await api.heartbeat("a", 2, loss=9.0, recovery={**formed, "epoch": 1, "mode": "checkpoint"})
            history = (await c.get("/cluster/history")).json()
            assert [(p["step"], p["loss"]) for p in history["loss"]] == [
                (0, 2.0),
                (1, 1.75),
                (2, 1.5),
                (3, 1.25),
            ]
            assert [(p["step"], p["test_loss"], p["test_accuracy"]) for p in history["eval"]] == [
                (2, 1.1, 0.625)
            ]
            (formation,) = history["formations"]
            assert formation["epoch"] == 2 and formation["mode"] == "join"
            assert formation["modes"] == ["join", "fresh"]
            assert (formation["seconds"], formation["steps_lost"], formation["workers"]) == (0.75, 0, 2)
            events = (await c.get("/events")).json()["events"]
            assert [e["reason"] for e in events if e["kind"] == "recovered"] == [
                "fresh at step 0, 0 committed steps lost in 0.25 s",
                "join at step 0, 0 committed steps lost in 0.75 s",
            ]
    # kept in the database: a restarted coordinator serves the same history
    app2 = create_app(settings, None, clock=FakeClock(), background=False)
    async with app2.router.lifespan_context(app2):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app2), base_url="http://c", headers=bearer(READ_TOKEN)
        ) as c:
            assert (await c.get("/cluster/history")).json() == history


def test_a_long_curve_is_thinned_not_cut() -> None:
    series = Series("loss", max_points=8)
    for step in range(100):
        series.put(step, (float(step), None), wall=float(step))
        series.put(step, (float(step), None), wall=float(step) + 0.5)  # another member: the same point
    steps = [s for s, _t, _v in series.rows()]
    assert len(steps) <= 8 and steps[0] == 0 and steps[-1] == 99  # the whole run, at a coarser grain
    assert steps == sorted(steps) and all(series.points[s][0] == float(s) for s in steps)  # first report
    upserts, deletes = series.drain()
    assert {row[1] for row in upserts} == set(steps) and not {s for _n, s in deletes} & set(steps)
    assert series.drain() == ([], [])


def test_formations_keep_the_newest_epochs() -> None:
    history = TrainingHistory(max_epochs=3)
    dropped = [
        history.note_formation(e, FormationReport("a", "handover", e, 0, None, float(e))) for e in range(5)
    ]
    assert dropped == [None, None, None, 1, 2] and sorted(history.formations) == [2, 3, 4]
    assert history.view()["formations"][0]["seconds"] is None  # no member said: not invented


async def test_the_page_and_its_files_need_no_token_and_hold_no_data(api: Api) -> None:
    await api.register("secret-worker-name")
    anon = {"Authorization": ""}
    page = await api.client.get("/", headers=anon)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "connect-src 'self'" in csp and "script-src 'self'" in csp  # nothing from another origin
    assert page.headers["referrer-policy"] == "no-referrer"
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        r = await api.client.get(f"/static/{name}", headers=anon)
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind), name
        assert "secret-worker-name" not in r.text
    assert "secret-worker-name" not in page.text and READ_TOKEN not in page.text
    assert 'src="static/app.js"' in page.text and "http" not in page.text  # its own files only: no CDN
    assert (await api.client.get("/static/other.js", headers=anon)).status_code == 404
    assert (await api.client.get("/static/../app.py", headers=anon)).status_code == 404
    # the data behind it still asks for the read token
    assert (await api.client.get("/cluster/history", headers=anon)).status_code == 401


def test_the_page_files_ship_in_the_package() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = config["tool"]["setuptools"]["package-data"]["coordinator"]
    shipped = sorted(p.name for p in (REPO / "coordinator" / "static").iterdir())
    assert shipped == ["app.js", "index.html", "style.css"]
    for name in shipped:
        assert any(fnmatch(f"static/{name}", pattern) for pattern in patterns), name
