"""Training routes: the ready barrier (long poll) and the job spec."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Depends, Query

from coordinator.auth import BARRIER, JOB
from coordinator.barrier import RankedWorker
from coordinator.credentials import Principal
from coordinator.deps import ServiceDep
from coordinator.openapi import errors
from coordinator.schemas import JobResponse, RankedWorkerView, ReadyResponse

router = APIRouter(tags=["training"])


@router.get(
    "/training/ready",
    response_model=ReadyResponse,
    openapi_extra=BARRIER.openapi,
    responses=errors(401, (403, "not a worker's secret"), 422),
)
async def ready(
    service: ServiceDep,
    caller: Annotated[Principal, Depends(BARRIER)],
    min_workers: Annotated[int | None, Query(ge=1, le=100_000)] = None,
    wait_s: Annotated[float, Query(ge=0.0, le=3600.0)] = 0.0,
) -> ReadyResponse:
    """Long-polls until at least `min_workers` (default: the job's) are alive, or `wait_s` (capped) passes.
    A caller that is a member of the answered epoch also gets its data-plane key with every other member."""
    need = min_workers if min_workers is not None else service.job.min_workers
    wait = min(wait_s, service.settings.ready_wait_cap)
    t0 = time.monotonic()
    deadline = t0 + wait
    while True:
        version = service.signal.version
        answer = service.ready(need)
        remaining = deadline - time.monotonic()
        if answer.ready or remaining <= 0:
            break
        await service.signal.wait_change(version, remaining)
    service.metrics.barrier_wait.observe(time.monotonic() - t0)
    return ReadyResponse(
        ready=answer.ready,
        epoch=answer.epoch,
        active_workers=answer.active_workers,
        min_workers=answer.min_workers,
        job_hash=answer.job_hash,
        workers=[_ranked(w) for w in answer.workers],
        committed_step=max((w.committed_step for w in service.state.workers.values()), default=-1),
        peer_keys=service.peer_keys(answer, caller.worker_id if caller.kind == "worker" else None),
    )


def _ranked(w: RankedWorker) -> RankedWorkerView:
    return RankedWorkerView.model_validate(w, from_attributes=True)


@router.get(
    "/job",
    response_model=JobResponse,
    dependencies=[Depends(JOB)],
    openapi_extra=JOB.openapi,
    responses=errors(401),
)
async def job(service: ServiceDep) -> JobResponse:
    """The job spec and its hash, and the timeouts every worker adopts (they win over the worker's own)."""
    s = service.settings
    return JobResponse(
        job=service.job.model_dump(mode="json"),
        job_hash=service.job_hash,
        collective_timeout_s=s.collective_timeout,
        startup_timeout_s=s.startup_timeout,
        barrier_timeout_s=s.barrier_timeout,
    )
