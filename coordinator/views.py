"""Conversions from membership records to API views.

Large listings (/workers, /cluster/status with hundreds of workers) are built as plain dicts and sent
as JSONResponse: validating hundreds of pydantic models per request would block the event loop, and so
delay heartbeats. The schemas in schemas.py still document them."""

from __future__ import annotations

from typing import Any

from coordinator.cluster_state import WorkerRecord
from coordinator.schemas import TELEMETRY_FIELDS


def worker_dict(w: WorkerRecord, now: float) -> dict[str, Any]:
    i = w.info
    return {
        "worker_id": w.worker_id,
        "rank": w.rank,
        "state": w.status,
        "worker_state": w.state,
        "last_heartbeat_age_s": round(max(0.0, now - w.last_heartbeat), 3),
        "step": w.step,
        "loss": w.loss,
        "samples_per_s": w.samples_per_s,
        "bytes_sent": w.bytes_sent,
        "bytes_received": w.bytes_received,
        "epoch_seen": w.epoch_seen,
        "committed_step": w.committed_step,
        **{k: w.telemetry.get(k) for k in TELEMETRY_FIELDS},
        "host": i.host,
        "port": i.port,
        "host_id": i.host_id,
        "device": i.device,
        "device_name": i.device_name,
        "memory_bytes": i.memory_bytes,
        "version": i.version,
        "joined_at": w.joined_wall,
    }


def listing_order(w: WorkerRecord) -> tuple[int, int, str]:
    """Live workers first by rank, then the others by id."""
    return (0 if w.status == "alive" else 1, w.rank if w.rank is not None else 0, w.worker_id)
