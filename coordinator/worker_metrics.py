"""The live workers' telemetry as Prometheus metrics, read from their latest heartbeats at each scrape.

Named to Prometheus's conventions: base units (seconds, bytes), ``_total`` on counters, and bounded labels
(``worker``, ``host``, ``lane``, ``part``, ``mode``): one series per live worker, gone with it.

- ``zerowire_worker_step_seconds{worker,host,part}``: its last step's time, by part (``compute``, ``comm``,
  ``wait`` on the network, ``data_wait`` for its data);
- ``zerowire_worker_samples_per_second{worker,host}``: its share of the global batch per second;
- ``zerowire_worker_sent_bytes_total{worker,host,lane}``: bytes it sent over each data-plane lane;
- ``zerowire_worker_bus_bandwidth_bytes_per_second{worker,host,lane,op}``: the bus bandwidth of its last
  step's all-gathers and reduce-scatters (bytes each rank moved by the ring count, over the calls' time);
- ``zerowire_worker_staging_overflows_total{worker,host}``: host staging buffers its engine handed out
  beyond its pinned pools (each a synchronous, pageable copy: the pools are too small for the plan);
- ``zerowire_worker_straggler_ratio{worker,host}``: its last step time over the fastest live member's
  (1: the fastest);
- ``zerowire_worker_heartbeat_age_seconds{worker,host}``: how old its latest heartbeat is;
- ``zerowire_recoveries_total{mode}``: formations the workers reported, by mode (``fresh``, ``handover``,
  ``join``, ``checkpoint``), counted by the coordinator as their reports arrive.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from coordinator.cluster_state import WorkerRecord
from coordinator.stragglers import step_parts, straggler_ratios


class WorkerCollector(Collector):
    """Collects from ``workers()`` (the membership's records) at scrape time; ``now()`` is monotonic."""

    def __init__(self, workers: Callable[[], Mapping[str, WorkerRecord]], now: Callable[[], float]) -> None:
        self._workers = workers
        self._now = now

    def describe(self) -> list[Metric]:
        return []  # the families are made at each scrape; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        live = [w for w in self._workers().values() if w.status == "alive"]
        ratios = straggler_ratios(live)
        labels = ["worker", "host"]
        step = GaugeMetricFamily(
            "zerowire_worker_step_seconds", "The worker's last step time, by part", labels=[*labels, "part"]
        )
        rate = GaugeMetricFamily(
            "zerowire_worker_samples_per_second", "The worker's samples per second", labels=labels
        )
        sent = CounterMetricFamily(
            "zerowire_worker_sent_bytes",
            "Bytes the worker sent, by data-plane lane",
            labels=[*labels, "lane"],
        )
        bus = GaugeMetricFamily(
            "zerowire_worker_bus_bandwidth_bytes_per_second",
            "Bus bandwidth of the worker's last step's data collectives, by lane and op",
            labels=[*labels, "lane", "op"],
        )
        overflows = CounterMetricFamily(
            "zerowire_worker_staging_overflows",
            "Host staging buffers the worker's engine handed out beyond its pinned pools",
            labels=labels,
        )
        ratio = GaugeMetricFamily(
            "zerowire_worker_straggler_ratio",
            "The worker's last step time over the fastest live member's",
            labels=labels,
        )
        age = GaugeMetricFamily(
            "zerowire_worker_heartbeat_age_seconds", "Age of the worker's latest heartbeat", labels=labels
        )
        now = self._now()
        for w in live:
            who = [w.worker_id, w.info.host_id]
            for part, value in step_parts(w.telemetry).items():
                step.add_metric([*who, part], value)
            if w.samples_per_s is not None:
                rate.add_metric(who, float(w.samples_per_s))
            lanes = w.telemetry.get("bytes_by_lane")
            if isinstance(lanes, Mapping):
                for lane, n in lanes.items():
                    sent.add_metric([*who, str(lane)], float(n))
            rates = w.telemetry.get("bus_bandwidth")
            if isinstance(rates, Mapping):
                for key, value in rates.items():
                    lane, _, op = str(key).partition("/")
                    bus.add_metric([*who, lane, op], float(value))
            spilled = w.telemetry.get("staging_overflows")
            if isinstance(spilled, int):
                overflows.add_metric(who, float(spilled))
            age.add_metric(who, max(0.0, now - w.last_heartbeat))
        for w in live:
            if w.worker_id in ratios:
                ratio.add_metric([w.worker_id, w.info.host_id], ratios[w.worker_id])
        yield from (step, rate, sent, bus, overflows, ratio, age)
