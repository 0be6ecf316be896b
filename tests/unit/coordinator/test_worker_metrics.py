"""The workers' telemetry on /metrics, to Prometheus's conventions (base units, _total counters, bounded
labels), and the shipped Grafana dashboard: every metric it queries is one the coordinator exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.unit.coordinator.conftest import Api

DASHBOARD = Path(__file__).resolve().parents[3] / "deploy" / "grafana" / "zerowire.json"


async def scrape(api: Api) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = await api.client.get("/metrics")
    assert r.status_code == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(r.text)
        for s in fam.samples
    }


async def test_live_workers_telemetry_is_exported_per_worker(api: Api) -> None:
    for wid in ("a", "b"):
        await api.register(wid)
    await api.heartbeat("a", 2, state="training", samples_per_s=120.0, compute_s=0.3, comm_s=0.2, wait_s=0.1,
                        data_wait_s=0.05, bytes_by_lane={"grpc": 4000, "local": 10}, staging_overflows=7,
                        bus_bandwidth={"hierarchical/all_gather": 2.5e8, "hierarchical/reduce_scatter": 1e8},
                        recovery={"epoch": 2, "mode": "fresh", "resumed_at": 0, "steps_lost": 0})  # fmt: skip
    await api.heartbeat("b", 2, state="training", compute_s=0.6, wait_s=0.2, data_wait_s=0.0)
    api.clock.advance(0.5)
    m = await scrape(api)

    def at(name: str, **labels: str) -> float:
        return m[(name, tuple(sorted({"host": "h1", **labels}.items())))]

    assert at("zerowire_worker_step_seconds", worker="a", part="compute") == 0.3
    assert at("zerowire_worker_step_seconds", worker="a", part="data_wait") == 0.05
    assert at("zerowire_worker_samples_per_second", worker="a") == 120.0
    assert at("zerowire_worker_sent_bytes_total", worker="a", lane="grpc") == 4000
    bus = "zerowire_worker_bus_bandwidth_bytes_per_second"
    assert at(bus, worker="a", lane="hierarchical", op="all_gather") == 2.5e8
    assert at(bus, worker="a", lane="hierarchical", op="reduce_scatter") == 1e8
    assert at("zerowire_worker_staging_overflows_total", worker="a") == 7  # synchronous copies so far
    assert ("zerowire_worker_staging_overflows_total", (("host", "h1"), ("worker", "b"))) not in m  # not told
    # step time without the overlapped communication: a 0.45 s, b 0.8 s
    assert at("zerowire_worker_straggler_ratio", worker="a") == 1.0
    assert abs(at("zerowire_worker_straggler_ratio", worker="b") - 0.8 / 0.45) < 1e-9
    assert at("zerowire_worker_heartbeat_age_seconds", worker="a") == 0.5
    assert m[("zerowire_recoveries_total", (("mode", "fresh"),))] == 1
    await api.client.delete("/workers/b", headers=api.as_worker("b"))
    m = await scrape(api)
    assert not [k for k in m if ("worker", "b") in k[1]], "a worker that left drops out of the series"


async def test_every_metric_the_dashboard_queries_is_exported(api: Api) -> None:
    await api.register("a")
    await api.heartbeat("a", 1, state="training", samples_per_s=1.0, compute_s=0.1, comm_s=0.1, wait_s=0.0,
                        data_wait_s=0.0, bytes_by_lane={"grpc": 1, "local": 0}, staging_overflows=0,
                        bus_bandwidth={"grpc/all_gather": 1.0},
                        recovery={"epoch": 1, "mode": "fresh", "resumed_at": 0, "steps_lost": 0})  # fmt: skip
    await api.ready("a", min_workers=1)
    exported = {name for name, _ in await scrape(api)}
    r = await api.client.get("/metrics")
    families = {fam.name for fam in text_string_to_metric_families(r.text)}
    dash = json.loads(DASHBOARD.read_text())
    queried = {
        name
        for panel in dash["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\bzerowire_[a-z_]+\b", target["expr"])
    }
    assert len(queried) >= 10
    # a labelled family with no series yet (no eviction so far) is still declared on /metrics
    declared = families | {f + "_total" for f in families} | {f + "_bucket" for f in families}
    missing = sorted(n for n in queried if n not in exported and n not in declared)
    assert not missing, f"the dashboard queries metrics the coordinator does not export: {missing}"
    for name in exported:  # conventions: base units and _total on counters
        assert not re.search(r"_(ms|milliseconds|kb|mb|percent)\b", name), name
