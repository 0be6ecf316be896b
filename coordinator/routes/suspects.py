"""Peer reports: a member tells the coordinator that a peer of its current epoch is unreachable or stalled.

A report is evidence, never a verdict: a worker speaks only for itself (its own secret), and the coordinator
decides (coordinator/liveness.py) whether the evidence evicts someone."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException

from coordinator import membership as m
from coordinator.auth import OWN_WORKER
from coordinator.deps import ServiceDep, WorkerIdPath
from coordinator.openapi import NOT_OWN_SECRET, UNKNOWN_WORKER, errors
from coordinator.schemas import SuspectRequest, SuspectResponse

router = APIRouter(prefix="/workers", tags=["workers"])


@router.post(
    "/{worker_id}/suspect",
    response_model=SuspectResponse,
    dependencies=[Depends(OWN_WORKER)],
    openapi_extra=OWN_WORKER.openapi,
    responses=errors(
        400,
        401,
        NOT_OWN_SECRET,
        UNKNOWN_WORKER,
        (
            409,
            "the report is not about the current epoch (stale or ahead), or the reporter or the suspect "
            "is not a member of it",
        ),
        410,
        413,
        (422, "invalid input, or a report about the reporter itself"),
    ),
)
async def suspect(
    worker_id: WorkerIdPath,
    body: SuspectRequest,
    service: ServiceDep,
) -> SuspectResponse:
    """Report a peer of the current epoch (by rank or worker id) that this worker found unreachable or
    stalled. A suspect reported by a majority of the other members (at least two) is evicted; of two
    members that report each other, the one that joined last leaves (never both). An evicted suspect's
    heartbeats are answered `stop`."""
    try:
        target, count, evicted = await service.suspect(worker_id, body.epoch, body.suspect, body.reason)
    except m.Rejected as exc:
        raise HTTPException(exc.status, exc.reason) from None
    return SuspectResponse(epoch=service.state.epoch, suspect=target, reporters=count, evicted=evicted)
