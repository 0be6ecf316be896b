"""A worker's step time from its heartbeat's parts, and the straggler ratio: its step time over the fastest
live member's (1: the fastest). Pure; the page's API (coordinator/views.py) and the Prometheus collector
(coordinator/worker_metrics.py) both read it from here."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from coordinator.cluster_state import WorkerRecord

STEP_PARTS = ("compute", "comm", "wait", "data_wait")


def step_parts(telemetry: Mapping[str, object]) -> dict[str, float]:
    """The parts of the worker's last step its heartbeat reported, in seconds (``compute``, ``comm``,
    ``wait`` on the network, ``data_wait`` for its data)."""
    out = {}
    for part in STEP_PARTS:
        value = telemetry.get(f"{part}_s")
        if isinstance(value, (int, float)):
            out[part] = float(value)
    return out


def step_wall_s(telemetry: Mapping[str, object]) -> float | None:
    """The last step's wall time: compute + wait + data wait (communication overlaps them); None when the
    heartbeat reported none of them."""
    known = [v for part, v in step_parts(telemetry).items() if part != "comm"]
    return sum(known) if known else None


def straggler_ratios(workers: Iterable[WorkerRecord]) -> dict[str, float]:
    """worker id -> its step time over the fastest live member's, for the live members that reported one."""
    totals = {}
    for w in workers:
        if w.status == "alive" and (total := step_wall_s(w.telemetry)) is not None:
            totals[w.worker_id] = total
    fastest = min((v for v in totals.values() if v > 0), default=None)
    if not fastest:
        return {}
    return {wid: total / fastest for wid, total in totals.items()}
