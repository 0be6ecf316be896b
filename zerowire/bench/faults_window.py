"""One run of `zerowire bench faults`: a local cluster (real processes) that trains for a window of wall-clock
time, fault-free or with a worker SIGKILLed and restarted every period, and what its telemetry and the
coordinator's events say about the window (see `zerowire.bench.faults` for how the runs are combined)."""

from __future__ import annotations

import argparse
import logging
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zerowire.localcluster import LocalCluster, tail, write_job_toml
from zerowire.summary import RunTelemetry, read_telemetry, steps_redone

log = logging.getLogger(__name__)

POLL_S = 0.2  # how often the harness reads the coordinator's status
STEPS = 1_000_000  # the job's length: a window ends long before


@dataclass
class Window:
    """One run's measured window [start, end] (wall clock)."""

    kind: str  # "faults" or "fault_free"
    round: int
    workers: int
    start: float
    end: float
    samples: int  # samples of the steps whose surviving commit fell in the window
    time_at_size: dict[int, float]  # seconds of the window at each world size of the membership
    time_by_commits: dict[int, float]  # seconds attributed to each world size by the commits (see committed)
    steps_redone: int = 0
    steady: dict[int, tuple[int, float]] = field(default_factory=dict)  # see steady_rates
    kills: list[dict[str, Any]] = field(default_factory=list)
    recoveries: list[dict[str, Any]] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.samples / (self.end - self.start)

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "round": self.round,
            "workers": self.workers,
            "seconds": round(self.end - self.start, 3),
            "samples": self.samples,
            "samples_per_s": round(self.rate, 2),
            "time_at_size_s": {str(w): round(t, 3) for w, t in sorted(self.time_at_size.items())},
            "time_by_commits_s": {str(w): round(t, 3) for w, t in sorted(self.time_by_commits.items())},
            "steps_redone": self.steps_redone,
            "faults": len(self.kills),
        }


def membership_time(
    events: list[dict[str, Any]], tel: RunTelemetry, start: float, end: float
) -> dict[int, float]:
    """Seconds of [start, end] spent at each world size of the coordinator's membership: its epochs, each
    from its ``epoch`` event on; an epoch's size is the one its steps were committed at, else the one its
    event states (an epoch whose size is known neither way counts at the size before it)."""
    marks = sorted(
        (float(e["time"]), int(e["epoch"]), str(e.get("reason", "")))
        for e in events
        if e.get("kind") == "epoch"
    )
    sizes: dict[int, float] = {}
    current: int | None = None
    cut = start
    for t, epoch, reason in marks:
        stated = re.search(r"world size (\d+)", reason)
        size = tel.epoch_world.get(epoch, int(stated.group(1)) if stated else current)
        if t > start and current is not None:
            piece = min(t, end) - cut
            if piece > 0:
                sizes[current] = sizes.get(current, 0.0) + piece
            cut = max(cut, min(t, end))
        current = size
    if current is not None and end > cut:
        sizes[current] = sizes.get(current, 0.0) + (end - cut)
    return sizes


def committed(tel: RunTelemetry, start: float, end: float, global_batch: int) -> tuple[int, dict[int, float]]:
    """Samples committed in [start, end], and the window's seconds attributed to each world size by commits.

    A step counts once, at its commit in the latest epoch that committed it (a step rolled back and run
    again counts when it commits for good). The window is cut at those commits; each piece goes to the world
    size of the commit that ends it (so the pause after a fault goes to the size that resumes), and the piece
    after the last commit to the size then."""
    final: dict[int, tuple[float, int]] = {}
    for (step, epoch), t in tel.commits.items():
        if step not in final or epoch > final[step][1]:
            final[step] = (t, epoch)
    inside = sorted((t, epoch) for t, epoch in final.values() if start <= t <= end)
    sizes: dict[int, float] = {}
    cut = start
    for t, epoch in inside:
        w = tel.epoch_world[epoch]
        sizes[w] = sizes.get(w, 0.0) + (t - cut)
        cut = t
    if inside:
        w = tel.epoch_world[inside[-1][1]]
        sizes[w] = sizes.get(w, 0.0) + (end - cut)
    return len(inside) * global_batch, sizes


def steady_rates(
    tel: RunTelemetry, start: float, end: float, global_batch: int
) -> dict[int, tuple[int, float]]:
    """(samples, seconds) of each world size between the first and the last commit of each epoch inside
    [start, end]: the run's own pace at that size, without its pauses between epochs."""
    by_epoch: dict[int, list[float]] = {}
    for (_step, epoch), t in tel.commits.items():
        if start <= t <= end:
            by_epoch.setdefault(epoch, []).append(t)
    out: dict[int, tuple[int, float]] = {}
    for epoch, times in by_epoch.items():
        if len(times) >= 2:
            w = tel.epoch_world[epoch]
            samples, seconds = out.get(w, (0, 0.0))
            out[w] = (samples + (len(times) - 1) * global_batch, seconds + max(times) - min(times))
    return out


def run_window(args: argparse.Namespace, kind: str, workers: int, rnd: int, folder: Path) -> Window:
    """Train `workers` processes for ``args.warmup`` + ``args.duration`` (faults) or ``args.ref_duration``
    seconds after the first committed step; measure the part after the warm-up."""
    from jobspec import JobSpec
    from worker.coordinator_client import RetryPolicy, SyncCoordinatorClient
    from zerowire.drill import Drill, all_events

    job = JobSpec(
        model=args.model,
        dataset=args.dataset,
        steps=STEPS,
        global_batch=args.global_batch,
        eval_every=0,
        checkpoint_every=0,
        min_workers=workers,
    )
    folder.mkdir(parents=True, exist_ok=True)
    write_job_toml(folder / "job.toml", job.model_dump(mode="json"))
    hb = [] if args.heartbeat_timeout is None else ["--heartbeat-timeout", str(args.heartbeat_timeout)]
    cluster = LocalCluster(
        output=folder.resolve(),
        workers=workers,
        job_file=(folder / "job.toml").resolve(),
        threads=args.threads,
        hosts=min(args.hosts, workers),
        token=secrets.token_urlsafe(32),
        extra_coordinator_args=hb,
    )
    faults = kind == "faults"
    duration = args.duration if faults else args.ref_duration
    with cluster:
        cluster.start_coordinator()
        client = SyncCoordinatorClient(
            cluster.url, cluster.read_token, timeout_s=5.0, retry=RetryPolicy(attempts=2)
        )
        cluster.start_workers()
        drill = Drill(cluster, restart_after_s=args.restart_after) if faults else None
        first = _wait_first_step(cluster, client, args.startup_timeout)
        start = first + args.warmup
        end = start + duration
        due = start + args.period / 2  # fault i at start + period/2 + i * period: duration/period faults
        while time.time() < end:
            _check(cluster, faults)
            status = client.cluster_status()
            if drill is not None:
                if time.time() >= due and drill.ready(status):
                    drill.kill(status, first=f"worker-{(workers - 1 - len(drill.kills)) % workers}")
                    due += args.period
                drill.poll(status)
            time.sleep(POLL_S)
        events = all_events(client)
        client.close()
    tel = read_telemetry(cluster.telemetry_dir)
    samples, by_commits = committed(tel, start, end, job.global_batch)
    sizes = membership_time(events, tel, start, end)
    window = Window(kind, rnd, workers, start, end, samples, sizes, by_commits, steps_redone(tel))
    window.steady = steady_rates(tel, start, end, job.global_batch)
    if drill is not None:
        window.kills = drill.report(tel, events)
        from zerowire.summary import recoveries

        window.recoveries = recoveries(tel)
    return window


def _wait_first_step(cluster: LocalCluster, client: Any, timeout_s: float) -> float:
    """Wall time of the first committed step (once the status shows it)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _check(cluster, False)
        if int(client.cluster_status().get("step", 0)) >= 1:
            tel = read_telemetry(cluster.telemetry_dir)
            if tel.commits:
                return min(tel.commits.values())
        time.sleep(POLL_S)
    raise RuntimeError(f"no step committed within {timeout_s:.0f}s; see {cluster.output / 'logs'}")


def _check(cluster: LocalCluster, faults: bool) -> None:
    """Every process that should run still runs (in a fault-free run, every worker)."""
    assert cluster.coordinator is not None
    if not cluster.coordinator.alive():
        raise RuntimeError(f"the coordinator died:\n{tail(cluster.coordinator.log_path)}")
    for name, child in cluster.current_workers().items():
        if not child.alive() and (not faults or child.proc.returncode != -9):
            raise RuntimeError(f"{name} exited {child.proc.returncode}:\n{tail(child.log_path)}")
