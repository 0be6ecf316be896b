"""Prometheus text exposition of this app's registry."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from coordinator.auth import OPERATOR
from coordinator.deps import ServiceDep
from coordinator.openapi import errors

router = APIRouter(tags=["metrics"], dependencies=[Depends(OPERATOR)])


@router.get(
    "/metrics",
    response_class=Response,
    openapi_extra=OPERATOR.openapi,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}, **errors(401, 403)},
)
async def metrics(service: ServiceDep) -> Response:
    totals = {"grpc": 0, "local": 0}
    for w in service.state.workers.values():
        lanes = w.telemetry.get("bytes_by_lane") if w.status == "alive" else None
        if isinstance(lanes, dict):
            for lane, n in lanes.items():
                totals[lane] = totals.get(lane, 0) + int(n)
    for lane, n in totals.items():
        service.metrics.lane_bytes.labels(lane).set(n)
    steps = service.metrics.committed_step
    steps.clear()  # live workers only: the dead and the left drop out of the series
    for w in service.state.workers.values():
        if w.status == "alive":
            steps.labels(w.worker_id).set(w.committed_step)
    return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)
