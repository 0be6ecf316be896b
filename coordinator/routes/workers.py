"""Worker lifecycle routes: register, heartbeat, leave, list."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Response, status
from fastapi.responses import JSONResponse

from coordinator import membership as m
from coordinator.deps import ClockDep, ServiceDep
from coordinator.schemas import (
    TELEMETRY_FIELDS,
    WORKER_ID_PATTERN,
    HeartbeatRequest,
    HeartbeatResponse,
    RegisterRequest,
    RegisterResponse,
    WorkersResponse,
)
from coordinator.views import listing_order, worker_dict

router = APIRouter(prefix="/workers", tags=["workers"])
WorkerIdPath = Annotated[str, Path(max_length=64, pattern=WORKER_ID_PATTERN)]


@router.post("/register", status_code=status.HTTP_201_CREATED, response_model=RegisterResponse)
async def register(body: RegisterRequest, service: ServiceDep, clock: ClockDep) -> RegisterResponse:
    info = m.WorkerInfo(
        body.host, body.port, body.host_id, body.device, body.device_name, body.memory_bytes, body.version
    )
    try:
        record = await service.register(body.worker_id, info, clock)
    except m.Rejected as exc:
        raise HTTPException(exc.status, exc.reason) from None
    s = service.settings
    assert record.rank is not None
    return RegisterResponse(
        worker_id=record.worker_id,
        epoch=record.epoch_seen,
        heartbeat_interval_s=s.heartbeat_interval,
        heartbeat_timeout_s=s.heartbeat_timeout,
        rank=record.rank,
        world_size=service.world_size,
    )


@router.post("/{worker_id}/heartbeat", response_model=HeartbeatResponse)
async def heartbeat(
    worker_id: WorkerIdPath, body: HeartbeatRequest, service: ServiceDep, clock: ClockDep
) -> JSONResponse:
    """The hot path: memory only, answered without re-validating the response model."""
    telemetry = {k: v for k in TELEMETRY_FIELDS if (v := getattr(body, k)) is not None}
    hb = m.Heartbeat(
        body.epoch,
        body.step,
        body.loss,
        body.samples_per_s,
        body.bytes_sent,
        body.bytes_received,
        body.state,
        telemetry,
    )
    try:
        action, record = service.heartbeat(worker_id, hb, clock)
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


@router.delete("/{worker_id}", status_code=status.HTTP_204_NO_CONTENT)
async def leave(worker_id: WorkerIdPath, service: ServiceDep, clock: ClockDep) -> Response:
    try:
        await service.leave(worker_id, clock)
    except m.Rejected as exc:
        raise HTTPException(exc.status, exc.reason) from None
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("", response_model=WorkersResponse)
async def list_workers(service: ServiceDep, clock: ClockDep) -> JSONResponse:
    now = clock.monotonic()
    workers = sorted(service.state.workers.values(), key=listing_order)
    return JSONResponse({"epoch": service.state.epoch, "workers": [worker_dict(w, now) for w in workers]})
