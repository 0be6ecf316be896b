"""Worker lifecycle routes: register, heartbeat, leave (or an operator's eviction), list."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, HTTPException, Request, Response, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from coordinator import cluster_state as cs
from coordinator import membership as m
from coordinator.auth import LEAVE_OR_EVICT, LISTING, OWN_WORKER, REGISTER
from coordinator.credentials import Principal
from coordinator.deps import ClockDep, ServiceDep, WorkerIdPath
from coordinator.openapi import NOT_OWN_SECRET, UNKNOWN_WORKER, errors
from coordinator.ratelimit import retry_after
from coordinator.schemas import (
    TELEMETRY_FIELDS,
    HeartbeatRequest,
    HeartbeatResponse,
    RegisterRequest,
    RegisterResponse,
    WorkersResponse,
)
from coordinator.views import worker_views

router = APIRouter(prefix="/workers", tags=["workers"])
WorkerSecretHeader = Annotated[
    str | None,
    Header(
        alias="X-Worker-Secret",
        max_length=256,
        description="the id's current secret: required to register a live id again (its secret stays valid)",
    ),
]


@router.post(
    "/register",
    status_code=status.HTTP_201_CREATED,
    response_model=RegisterResponse,
    openapi_extra=REGISTER.openapi,
    responses=errors(
        400,
        401,
        (403, "not the cluster token, or a live id registered again without its secret (X-Worker-Secret)"),
        (409, "the cluster is full (max_workers live workers)"),
        413,
        422,
        429,
    ),
)
async def register(
    request: Request,
    body: RegisterRequest,
    service: ServiceDep,
    clock: ClockDep,
    _caller: Annotated[Principal, Depends(REGISTER)],
    x_worker_secret: WorkerSecretHeader = None,
) -> RegisterResponse:
    """Join, or join again. Answers the worker's secret: a fresh one, or the presented X-Worker-Secret when
    it is the id's current secret."""
    address = request.client.host if request.client is not None else "?"
    wait = service.limiter.admit(address, clock.monotonic())
    if wait > 0:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            f"too many registrations: retry in {wait:.1f} s",
            headers={"Retry-After": retry_after(wait)},
        )
    info = cs.WorkerInfo(
        body.host,
        body.port,
        body.host_id,
        body.device,
        body.device_name,
        body.memory_bytes,
        body.version,
        body.store_port,
    )
    try:
        record, secret = await service.register(body.worker_id, info, clock, x_worker_secret)
    except m.Rejected as exc:
        raise HTTPException(exc.status, exc.reason) from None
    s = service.settings
    assert record.rank is not None
    return RegisterResponse(
        worker_id=record.worker_id,
        epoch=record.epoch_seen,
        heartbeat_interval_s=s.heartbeat_interval,
        heartbeat_timeout_s=s.heartbeat_timeout,
        progress_timeout_s=s.progress_timeout,
        rank=record.rank,
        world_size=service.world_size,
        worker_secret=secret,
    )


@router.post(
    "/{worker_id}/heartbeat",
    response_model=HeartbeatResponse,
    dependencies=[Depends(OWN_WORKER)],
    openapi_extra=OWN_WORKER.openapi,
    responses=errors(
        400,
        401,
        NOT_OWN_SECRET,
        UNKNOWN_WORKER,
        (409, "the heartbeat's epoch is ahead of the coordinator's"),
        410,
        413,
        422,
    ),
)
async def heartbeat(
    worker_id: WorkerIdPath, body: HeartbeatRequest, service: ServiceDep, clock: ClockDep
) -> JSONResponse:
    """The hot path: memory only, answered without re-validating the response model. A heartbeat saying
    worker_state "stalled" evicts its worker (a membership change, written before the answer)."""
    telemetry = {
        k: v.model_dump() if isinstance(v, BaseModel) else v
        for k in TELEMETRY_FIELDS
        if (v := getattr(body, k)) is not None
    }
    hb = cs.Heartbeat(
        body.epoch,
        body.step,
        body.loss,
        body.samples_per_s,
        body.bytes_sent,
        body.bytes_received,
        body.state,
        telemetry,
        body.committed_step,
    )
    try:
        action, record = service.heartbeat(worker_id, hb, clock)
        if body.recovery is not None:
            service.note_recovery(worker_id, body.recovery.model_dump())
        if record.state == "stalled" and record.status == "alive":  # it speaks for itself: evicted
            action, record = await service.evict_stalled(worker_id, body.epoch)
    except m.Rejected as exc:
        raise HTTPException(exc.status, exc.reason) from None
    reply = {
        "epoch": service.state.epoch,
        "action": action,
        "rank": record.rank if record.status == "alive" else None,
        "world_size": service.world_size,
        "cluster_state": service.phase(),
    }
    return JSONResponse(reply)


@router.delete(
    "/{worker_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    openapi_extra=LEAVE_OR_EVICT.openapi,
    responses=errors(401, (403, "neither this worker's secret nor the admin token"), 404, 422),
)
async def leave(
    worker_id: WorkerIdPath,
    service: ServiceDep,
    clock: ClockDep,
    caller: Annotated[Principal, Depends(LEAVE_OR_EVICT)],
) -> Response:
    """With the worker's own secret: a graceful leave. With the admin token: an eviction (event `evicted`).
    Either way the worker's heartbeats are then answered `stop`; a worker gone already: 204, no change."""
    try:
        await service.leave(worker_id, clock, caller)
    except m.Rejected as exc:
        raise HTTPException(exc.status, exc.reason) from None
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get(
    "",
    response_model=WorkersResponse,
    dependencies=[Depends(LISTING)],
    openapi_extra=LISTING.openapi,
    responses=errors(401, 403),
)
async def list_workers(service: ServiceDep, clock: ClockDep) -> JSONResponse:
    workers = worker_views(service.state.workers.values(), clock.monotonic(), clock.wall())
    return JSONResponse({"epoch": service.state.epoch, "workers": workers})
