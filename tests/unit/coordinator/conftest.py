"""Fixtures for coordinator API tests: an app on a fake clock, driven in-process through ASGITransport."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from coordinator.app import create_app
from coordinator.clock import FakeClock
from coordinator.deps import get_clock
from coordinator.service import CoordinatorService
from coordinator.settings import CoordinatorSettings
from worker.job import JobSpec

TOKEN = "test-token-123"


@dataclass
class Api:
    app: FastAPI
    client: httpx.AsyncClient
    clock: FakeClock
    service: CoordinatorService

    async def register(self, worker_id: str | None = None, **over: Any) -> httpx.Response:
        body: dict[str, Any] = {"host": "127.0.0.1", "port": 50051, "host_id": "h1", "device": "cpu"}
        if worker_id is not None:
            body["worker_id"] = worker_id
        body.update(over)
        return await self.client.post("/workers/register", json=body)

    async def heartbeat(self, worker_id: str, epoch: int, **over: Any) -> httpx.Response:
        return await self.client.post(f"/workers/{worker_id}/heartbeat", json={"epoch": epoch, **over})


def make_settings(tmp_path: Path, **over: Any) -> CoordinatorSettings:
    values: dict[str, Any] = {"token": TOKEN, "db": tmp_path / "coordinator.db", "max_workers": 8}
    values.update(over)
    return CoordinatorSettings(**values)


@pytest.fixture
def settings(tmp_path: Path) -> CoordinatorSettings:
    return make_settings(tmp_path)


@pytest.fixture
async def api(settings: CoordinatorSettings) -> AsyncIterator[Api]:
    clock = FakeClock()
    job = JobSpec.model_validate({"job_id": "unit", "min_workers": 2})
    app = create_app(settings, job, clock=clock, background=False)
    app.dependency_overrides[get_clock] = lambda: (
        clock
    )  # request handlers read the clock through a dependency
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with httpx.AsyncClient(
            transport=transport, base_url="http://coordinator", headers=headers
        ) as c:
            yield Api(app, c, clock, app.state.service)
