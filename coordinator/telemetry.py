"""Prometheus metrics of one coordinator app, in its own registry (never the process-global one)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from coordinator.cluster_state import WorkerRecord
from coordinator.worker_metrics import WorkerCollector

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def watch_workers(
        self, workers: Callable[[], Mapping[str, WorkerRecord]], now: Callable[[], float]
    ) -> None:
        """Export the live workers' telemetry at each scrape (``coordinator.worker_metrics``)."""
        self.registry.register(WorkerCollector(workers, now))

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.workers = Gauge("zerowire_workers", "Worker records by state", ["state"], registry=r)
        self.epoch = Gauge("zerowire_epoch", "Current membership epoch", registry=r)
        self.lane_bytes = Gauge(
            "zerowire_bytes_sent_by_lane",
            "Bytes sent by the live workers over each data-plane lane, as of their latest heartbeats",
            ["lane"],
            registry=r,
        )
        self.heartbeats = Counter(
            "zerowire_heartbeats", "Heartbeats received, by result", ["result"], registry=r
        )
        self.membership_changes = Counter(
            "zerowire_membership_changes", "Membership changes, by kind", ["kind"], registry=r
        )
        self.committed_step = Gauge(
            "zerowire_worker_committed_step",
            "The last step each live worker committed, as of its latest heartbeat (-1: none yet)",
            ["worker_id"],
            registry=r,
        )
        self.recoveries = Counter(
            "zerowire_recoveries", "Formations the workers reported, by mode", ["mode"], registry=r
        )
        self.liveness_evictions = Counter(
            "zerowire_liveness_evictions",
            "Members evicted for lack of progress, by evidence: stalled (self-report), straggler, suspect",
            ["reason"],
            registry=r,
        )
        self.stalls = Counter(
            "zerowire_coordinator_stalls",
            "Reaper wake-ups late by more than a tick (expiry paused)",
            registry=r,
        )
        self.barrier_wait = Histogram(
            "zerowire_barrier_wait_seconds",
            "Time /training/ready callers waited",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.request_latency = Histogram(
            "zerowire_request_latency_seconds",
            "HTTP request latency by route template",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
