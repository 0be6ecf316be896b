"""Cluster routes: status, the diagnosis of a job held up, the training's history (curves, formations), and
the membership event history."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse

from coordinator.auth import OPERATOR
from coordinator.deps import ClockDep, ServiceDep
from coordinator.diagnosis import diagnose
from coordinator.openapi import errors
from coordinator.schemas import ClusterStatus, Diagnosis, EventsResponse, EventView, History
from coordinator.views import worker_views

router = APIRouter(tags=["cluster"], dependencies=[Depends(OPERATOR)])


@router.get(
    "/cluster/status",
    response_model=ClusterStatus,
    openapi_extra=OPERATOR.openapi,
    responses=errors(401, 403),
)
async def cluster_status(service: ServiceDep, clock: ClockDep) -> JSONResponse:
    now, wall = clock.monotonic(), clock.wall()
    state = service.state
    workers = worker_views(state.workers.values(), now, wall)
    alive_steps = [w["step"] for w in workers if w["state"] == "alive"]
    body = {
        "state": service.phase(),
        "epoch": state.epoch,
        "world_size": service.world_size,
        "step": max(alive_steps, default=0),
        "workers": workers,
        "job": service.job.model_dump(mode="json"),
        "job_hash": service.job_hash,
        "started_at": service.started_wall,
        "uptime_s": round(now - service.started_mono, 3),
        "now": wall,
        "heartbeat_interval_s": service.settings.heartbeat_interval,
    }
    return JSONResponse(body)


@router.get(
    "/cluster/diagnosis",
    response_model=Diagnosis,
    openapi_extra=OPERATOR.openapi,
    responses=errors(401, 403),
)
async def cluster_diagnosis(service: ServiceDep, clock: ClockDep) -> JSONResponse:
    """Who holds the job up and why, from every member's heartbeat (the head of its flight recorder, its
    heartbeat's age, and its training stack while it makes no progress)."""
    views = worker_views(service.state.workers.values(), clock.monotonic(), clock.wall())
    found = diagnose(views, service.settings.heartbeat_interval, service.state.epoch)
    return JSONResponse({"epoch": service.state.epoch, **found})


@router.get(
    "/cluster/history",
    response_model=History,
    openapi_extra=OPERATOR.openapi,
    responses=errors(401, 403),
)
async def cluster_history(service: ServiceDep) -> JSONResponse:
    """The loss per committed step, the evaluations, and how each epoch was formed, as the workers'
    heartbeats told them (bounded: a long run's curve is thinned, not cut)."""
    return JSONResponse(service.history.view())


@router.get(
    "/events", response_model=EventsResponse, openapi_extra=OPERATOR.openapi, responses=errors(401, 403, 422)
)
async def events(
    service: ServiceDep,
    after: Annotated[int, Query(ge=0, le=1 << 62)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 500,
) -> EventsResponse:
    rows = service.store.events(after, limit)
    return EventsResponse(
        events=[EventView.model_validate(r) for r in rows], last_id=rows[-1].id if rows else after
    )
