"""Conversions from membership records to API views.

Large listings (/workers, /cluster/status with hundreds of workers) are built as plain dicts and sent
as JSONResponse: validating hundreds of pydantic models per request would block the event loop, and so
delay heartbeats. The schemas in schemas.py still document them."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from coordinator.cluster_state import WorkerRecord
from coordinator.schemas import TELEMETRY_FIELDS
from coordinator.stragglers import straggler_ratios


def values_age_s(w: WorkerRecord, now: float, wall: float) -> float:
    """How old the heartbeat that the record's values came from is: by the monotonic clock when this
    coordinator received it, by the wall clock when the values were read back from the database after a
    restart (the expiry clock then restarted, but the values did not get younger)."""
    age = wall - w.last_heartbeat_wall if w.restored else now - w.last_heartbeat
    return round(max(0.0, age), 3)


def worker_dict(
    w: WorkerRecord, now: float, wall: float, straggler_ratio: float | None = None
) -> dict[str, Any]:
    """`now`: monotonic seconds, `wall`: unix seconds, both of this moment."""
    i = w.info
    return {
        "worker_id": w.worker_id,
        "rank": w.rank,
        "state": w.status,
        "worker_state": w.state,
        "last_heartbeat_age_s": round(max(0.0, now - w.last_heartbeat), 3),
        "values_age_s": values_age_s(w, now, wall),
        "restored": w.restored,
        "straggler_ratio": None if straggler_ratio is None else round(straggler_ratio, 3),
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


def worker_views(workers: Iterable[WorkerRecord], now: float, wall: float) -> list[dict[str, Any]]:
    """The listing of /workers, /cluster/status and the diagnosis: in `listing_order`, each live member with
    its straggler ratio."""
    records = sorted(workers, key=listing_order)
    ratios = straggler_ratios(records)
    return [worker_dict(w, now, wall, ratios.get(w.worker_id)) for w in records]
