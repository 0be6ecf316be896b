"""GET /job announces the coordinator's collective, start-up and barrier timeouts, and a worker adopts
exactly those from the answer."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.settings import CoordinatorSettings
from tests.unit.coordinator.conftest import TOKEN, Api, bearer, make_settings
from worker.identity import WorkerConfig, adopt_timeouts, parse_job_answer


@pytest.fixture
def settings(tmp_path: Path) -> CoordinatorSettings:
    return make_settings(tmp_path, collective_timeout=12.0, startup_timeout=45.0, barrier_timeout=300.0)


async def test_the_job_answer_carries_the_coordinators_timeouts(api: Api) -> None:
    for headers in (bearer(TOKEN), {}):  # the cluster token (a worker) and the read-only token
        r = await api.client.get("/job", headers=headers)
        assert r.status_code == 200
        body = r.json()
        timeouts = {k: body[k] for k in ("collective_timeout_s", "startup_timeout_s", "barrier_timeout_s")}
        assert timeouts == {
            "collective_timeout_s": 12.0,
            "startup_timeout_s": 45.0,
            "barrier_timeout_s": 300.0,
        }
    job, job_hash = parse_job_answer(body)
    assert job_hash == api.service.job_hash == job.hash
    cfg = adopt_timeouts(WorkerConfig(coordinator="http://c"), body)
    assert (cfg.collective_timeout_s, cfg.startup_timeout_s, cfg.barrier_timeout_s) == (12.0, 45.0, 300.0)


async def test_the_openapi_schema_documents_the_timeouts(api: Api) -> None:
    schema = (await api.client.get("/openapi.json")).json()["components"]["schemas"]["JobResponse"]
    assert {"collective_timeout_s", "startup_timeout_s", "barrier_timeout_s"} <= set(schema["required"])
    assert "first step is committed" in schema["properties"]["startup_timeout_s"]["description"]
