"""The coordinator app factory: `create_app(settings)` builds a FastAPI app whose lifespan opens the
SQLite store, restores state (with a restart grace), and runs the reaper and the heartbeat flusher."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse

from coordinator.auth import BEARER_SCHEME, require_token
from coordinator.clock import Clock, SystemClock
from coordinator.middleware import BodyLimitMiddleware, LatencyMiddleware
from coordinator.reaper import start_background, stop_background
from coordinator.routes import cluster, metrics, training, workers
from coordinator.schemas import Health
from coordinator.service import CoordinatorService
from coordinator.settings import CoordinatorSettings
from coordinator.store import Store
from coordinator.telemetry import Metrics
from worker.job import JobSpec

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
            "Membership, ranks, epochs and the job of a zerowire cluster. "
            "Bearer token on every route but /healthz."
        ),
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.service = service
    app.state.clock = clock
    secured = [Depends(require_token)]
    for module in (workers, training, cluster, metrics):
        app.include_router(module.router, dependencies=secured)

    def openapi() -> dict[str, Any]:
        """The schema, with the bearer scheme declared on every operation but /healthz (the check itself is
        one plain dependency, cheaper on the heartbeat path than a security sub-dependency)."""
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            schema.setdefault("components", {})["securitySchemes"] = {"bearerAuth": BEARER_SCHEME}
            for path, operations in schema["paths"].items():
                if path != "/healthz":
                    for operation in operations.values():
                        operation["security"] = [{"bearerAuth": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

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
    return app
