"""Fixtures for coordinator API tests: an app on a fake clock, driven in-process through ASGITransport.

`Api.client` speaks with the read-only token; `register` uses the cluster token (proving a known id with its
secret), and `heartbeat`, `leave` and `ready` use the worker's own secret from its registration."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
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
from jobspec import JobSpec

TOKEN = "test-token-123"  # the cluster token
READ_TOKEN = "test-read-token-456"
ADMIN_TOKEN = "test-admin-token-789"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@dataclass
class Api:
    app: FastAPI
    client: httpx.AsyncClient
    clock: FakeClock
    service: CoordinatorService
    secrets: dict[str, str] = field(default_factory=dict)  # worker id -> its secret

    def as_worker(self, worker_id: str) -> dict[str, str]:
        return bearer(self.secrets.get(worker_id, "no-secret-known"))

    async def register(
        self, worker_id: str | None = None, *, prove: bool = True, **over: Any
    ) -> httpx.Response:
        body: dict[str, Any] = {"host": "127.0.0.1", "port": 50051, "host_id": "h1", "device": "cpu"}
        if worker_id is not None:
            body["worker_id"] = worker_id
        body.update(over)
        headers = bearer(TOKEN)
        if prove and worker_id in self.secrets:
            headers["X-Worker-Secret"] = self.secrets[worker_id]
        r = await self.client.post("/workers/register", json=body, headers=headers)
        if r.status_code == 201:
            self.secrets[r.json()["worker_id"]] = r.json()["worker_secret"]
        return r

    async def heartbeat(self, worker_id: str, epoch: int, **over: Any) -> httpx.Response:
        return await self.client.post(
            f"/workers/{worker_id}/heartbeat",
            json={"epoch": epoch, **over},
            headers=self.as_worker(worker_id),
        )

    async def leave(self, worker_id: str) -> httpx.Response:
        return await self.client.delete(f"/workers/{worker_id}", headers=self.as_worker(worker_id))

    async def ready(self, worker_id: str, **params: Any) -> httpx.Response:
        return await self.client.get("/training/ready", params=params, headers=self.as_worker(worker_id))


def make_settings(tmp_path: Path, **over: Any) -> CoordinatorSettings:
    values: dict[str, Any] = {
        "token": TOKEN,
        "read_token": READ_TOKEN,
        "admin_token": ADMIN_TOKEN,
        "db": tmp_path / "coordinator.db",
        "max_workers": 8,
    }
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
        async with httpx.AsyncClient(
            transport=transport, base_url="http://coordinator", headers=bearer(READ_TOKEN)
        ) as c:
            yield Api(app, c, clock, app.state.service)
