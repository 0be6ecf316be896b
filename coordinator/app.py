"""The coordinator app factory: `create_app(settings)` builds a FastAPI app whose lifespan opens the
SQLite store, restores state (with a restart grace), and runs the reaper and the heartbeat flusher."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from coordinator import openapi as api_docs
from coordinator.clock import Clock, SystemClock
from coordinator.middleware import BodyLimitMiddleware, LatencyMiddleware
from coordinator.reaper import start_background, stop_background
from coordinator.routes import cluster, metrics, page, suspects, training, workers
from coordinator.schemas import Health
from coordinator.service import CoordinatorService
from coordinator.settings import CoordinatorSettings
from coordinator.store import Store
from coordinator.telemetry import Metrics
from jobspec import JobSpec

log = logging.getLogger(__name__)


def create_app(
    settings: CoordinatorSettings,
    job: JobSpec | None = None,
    *,
    clock: Clock | None = None,
    background: bool = True,
) -> FastAPI:
    """`job`: the job to serve; None keeps the one stored in the database (or the default job).
    `background=False` leaves out the reaper and flusher (tests drive `service.expire()` themselves)."""
    clock = clock or SystemClock()
    telemetry = Metrics()
    service = CoordinatorService(settings, Store(settings.db), clock, telemetry)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start(job)
        tasks = start_background(service) if background else []
        try:
            yield
        finally:
            await stop_background(tasks)
            service.close()

    app = FastAPI(
        title="zerowire coordinator",
        description=(
            "Membership, ranks, epochs and the job of a zerowire cluster. Every route but /healthz and the "
            "live page (/ and its /static files, which hold no data) needs a "
            "bearer credential: the cluster token admits a worker (registration, the job), a worker's own "
            "secret covers its heartbeats, leave and the barrier, and operators use a read-only or an "
            "admin token. Each operation lists the credentials it admits."
        ),
        version="0.1.0",
        lifespan=lifespan,
        openapi_url=None,  # served by coordinator.openapi, behind the read-only (or admin) token
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.service = service
    app.state.clock = clock
    for module in (workers, suspects, training, cluster, metrics):
        app.include_router(module.router)
    api_docs.install(app)
    page.install(app)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # location and message only: never echo the (possibly huge or non-JSON, e.g. NaN) input back
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.get("/healthz", response_model=Health, tags=["health"])
    async def healthz() -> Health:
        return Health()

    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes)
    app.add_middleware(LatencyMiddleware, metrics=telemetry)
    if settings.insecure_no_auth:
        log.warning(
            "AUTHENTICATION DISABLED (--insecure-no-auth): "
            "anyone who can reach this port controls the cluster"
        )
    else:
        if settings.read_token is None and settings.admin_token is None:
            log.warning(
                "no --read-token or --admin-token: status, events, metrics and /docs answer no one "
                "(the cluster token admits workers only)"
            )
        if settings.admin_token is None:
            log.info("no --admin-token: evicting workers is disabled")
    return app
