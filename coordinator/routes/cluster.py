"""Cluster routes: status, the diagnosis of a job held up, and the membership event history."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse

from coordinator.auth import OPERATOR
from coordinator.deps import ClockDep, ServiceDep
from coordinator.diagnosis import diagnose
from coordinator.openapi import errors
from coordinator.schemas import ClusterStatus, Diagnosis, EventsResponse, EventView
from coordinator.views import listing_order, worker_dict

router = APIRouter(tags=["cluster"], dependencies=[Depends(OPERATOR)])


@router.get(
    "/cluster/status",
    response_model=ClusterStatus,
    openapi_extra=OPERATOR.openapi,
    responses=errors(401, 403),
)
async def cluster_status(service: ServiceDep, clock: ClockDep) -> JSONResponse:
    now = clock.monotonic()
    state = service.state
    workers = sorted(state.workers.values(), key=listing_order)
    alive_steps = [w.step for w in workers if w.status == "alive"]
    body = {
        "state": service.phase(),
        "epoch": state.epoch,
        "world_size": service.world_size,
        "step": max(alive_steps, default=0),
        "workers": [worker_dict(w, now) for w in workers],
        "job": service.job.model_dump(mode="json"),
        "job_hash": service.job_hash,
        "started_at": service.started_wall,
        "uptime_s": round(now - service.started_mono, 3),
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
    now = clock.monotonic()
    views = [worker_dict(w, now) for w in sorted(service.state.workers.values(), key=listing_order)]
    found = diagnose(views, service.settings.heartbeat_interval, service.state.epoch)
    return JSONResponse({"epoch": service.state.epoch, **found})


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
