"""Fault drills on a local cluster: SIGKILL workers (a worker and its buddies), start them again with the same
worker id after a delay, and measure from the coordinator's events and the workers' telemetry what each fault
cost. `zerowire run --kill-worker-at-step S [--kill-workers N] [--restart-killed-after SECONDS]` runs one
(reported as summary.json's ``fault_drill``); `zerowire bench faults` runs one every period.

Victims: the first is the last worker (``worker-{N-1}``) unless named; each further one is the buddy of the
one before (``worker.buddy.buddy_ranks`` over the epoch's host ids, as the coordinator ranks them), so two
victims lose a shard together with its replica.

Measures of a kill at wall time t (one clock: every process runs on this machine):

- ``detect_s``: t to the coordinator's first event after t that removes the victim (``died``, ``evicted``),
  the latest over the victims;
- ``next_commit_s``: t to the first step committed in a newer epoch than the one the kill hit (a step
  needs every member's vote, so none commits in the old epoch after its member died);
- ``steps_lost``: the most steps lost by a formation after t (0 unless recovery fell back to a checkpoint);
- ``breakdown``: next_commit_s split into detection, the wait until the new epoch starts forming
  (``reform_wait_s``: barrier and cancelled collectives), the formation itself (``formation_s``, the
  slowest rank's) and the first step after it (``first_step_s``);
- for a restart at time r: ``join_s``, r to the restarted worker's first step record (it contributes), and
  ``join_pause_s``, the gap between the last commit before the join's epoch and its first commit (the
  survivors wait in the formation while the joiner builds its part).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

from zerowire.localcluster import LocalCluster
from zerowire.summary import RunTelemetry, recoveries, recovery_after

log = logging.getLogger(__name__)

JOIN_EVENTS = ("joined", "rejoined")


class DrillError(RuntimeError):
    """The drill cannot do what it was asked (no such worker, too many victims)."""


@dataclass
class Kill:
    time: float  # wall clock, just before the first SIGKILL
    at_step: int  # the cluster's step (coordinator status) when it was killed
    epoch: int  # the coordinator's epoch then
    victims: list[dict[str, Any]]  # worker (= worker id), rank, host_id
    restart_due: float | None = None  # monotonic
    restarted: dict[str, float] = field(default_factory=dict)  # worker -> wall clock of its restart


def all_events(client: Any) -> list[dict[str, Any]]:
    """Every membership event the coordinator kept (``/events``, page by page)."""
    events: list[dict[str, Any]] = []
    while True:
        page = client.events(int(events[-1]["id"]) if events else 0)
        if not page:
            return events
        events.extend(page)


def choose_victims(status: dict[str, Any], count: int, first: str) -> list[dict[str, Any]]:
    """``count`` live members of the status's epoch: ``first``, then each one's buddy in turn (the rank
    that mirrors the one before), or the next rank not chosen yet when the buddies close a cycle."""
    members = {
        int(w["rank"]): w
        for w in status.get("workers", [])
        if w.get("state") == "alive" and w.get("rank") is not None
    }
    world = len(members)
    if sorted(members) != list(range(world)):
        raise DrillError(
            f"the members' ranks {sorted(members)} are not 0..{world - 1}: the cluster is re-forming"
        )
    if not 1 <= count < world:
        raise DrillError(f"cannot kill {count} of {world} members (at least one must survive)")
    by_id = {str(w["worker_id"]): rank for rank, w in members.items()}
    if first not in by_id:
        raise DrillError(f"{first} is not a live member of epoch {status.get('epoch')}")
    chain = [by_id[first]]
    if count > 1:
        from worker.buddy import buddy_ranks

        buddies = buddy_ranks([str(members[r]["host_id"]) for r in range(world)], world)
        while len(chain) < count:
            nxt = buddies[chain[-1]]
            if nxt in chain:
                nxt = next(r for r in range(world) if r not in chain)
            chain.append(nxt)
    return [
        {"worker": str(members[r]["worker_id"]), "rank": r, "host_id": members[r].get("host_id")}
        for r in chain
    ]


class Drill:
    """Kills and restarts on one LocalCluster; `poll` between status reads, `report` after the run."""

    def __init__(
        self,
        cluster: LocalCluster,
        *,
        count: int = 1,
        restart_after_s: float | None = None,
        at_step: int | None = None,
    ) -> None:
        if count < 1:
            raise DrillError(f"kill at least one worker, not {count}")
        if restart_after_s is not None and restart_after_s < 0:
            raise DrillError(f"the restart delay must be >= 0 s, not {restart_after_s}")
        self.cluster = cluster
        self.count = count
        self.restart_after_s = restart_after_s
        self.at_step = at_step
        self.kills: list[Kill] = []
        if count > 1:
            import worker.buddy  # noqa: F401  (torch loads now rather than between the trigger and the kill)

    def ready(self, status: dict[str, Any]) -> bool:
        """Whether a kill may happen now: every worker process alive and training in the current epoch, no
        restart pending, and every restarted worker has committed a step since."""
        members = {str(w["worker_id"]): w for w in status.get("workers", []) if w.get("state") == "alive"}
        rejoined = all(
            name in members and int(members[name].get("step", -1)) > k.at_step
            for k in self.kills
            for name in k.restarted
        )
        return (
            status.get("state") == "training"
            and len(members) == self.cluster.workers
            and all(
                w.get("worker_state") == "training" and w.get("epoch_seen") == status.get("epoch")
                for w in members.values()
            )
            and all(c.alive() for c in self.cluster.current_workers().values())
            and not self.restart_pending()
            and rejoined
        )

    def restart_pending(self) -> bool:
        return any(k.restart_due is not None and len(k.restarted) < len(k.victims) for k in self.kills)

    def kill(self, status: dict[str, Any], first: str | None = None) -> Kill:
        """SIGKILL `count` members at once (see `choose_victims`; default first: the last worker)."""
        first = first or f"worker-{self.cluster.workers - 1}"
        victims = choose_victims(status, self.count, first)
        children = self.cluster.current_workers()
        now = time.time()
        for v in victims:
            os.killpg(children[v["worker"]].proc.pid, signal.SIGKILL)
        due = None if self.restart_after_s is None else time.monotonic() + self.restart_after_s
        k = Kill(now, int(status.get("step", 0)), int(status.get("epoch", 0)), victims, due)
        self.kills.append(k)
        log.info("SIGKILLed %s at step %d", ", ".join(v["worker"] for v in victims), k.at_step)
        return k

    def poll(self, status: dict[str, Any] | None) -> list[str]:
        """The step-triggered kill when due, and restarts whose delay is over; a line for each action."""
        said = []
        if (
            status is not None
            and self.at_step is not None
            and not self.kills
            and int(status.get("step", 0)) >= self.at_step
            and self.ready(status)
        ):
            try:
                k = self.kill(status)
            except DrillError as exc:  # e.g. the epoch changed under the status just read: try again
                log.info("fault drill: not now: %s", exc)
            else:
                names = ", ".join(f"{v['worker']} (rank {v['rank']})" for v in k.victims)
                said.append(f"fault drill: SIGKILLed {names} at step {k.at_step}")
        for k in self.kills:
            if k.restart_due is None or time.monotonic() < k.restart_due:
                continue
            children = self.cluster.current_workers()
            for v in k.victims:
                name = v["worker"]
                if name not in k.restarted and not children[name].alive():
                    k.restarted[name] = time.time()
                    self.cluster.restart_worker(name)
                    said.append(f"fault drill: restarted {name}")
        return said

    def report(self, tel: RunTelemetry, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The measures of every kill (see the module docstring), in order."""
        forms = recoveries(tel)
        out = []
        for i, k in enumerate(self.kills):
            until = self.kills[i + 1].time if i + 1 < len(self.kills) else float("inf")
            out.append(measure(k, tel, events, forms, until))
        return out


def measure(
    k: Kill, tel: RunTelemetry, events: list[dict[str, Any]], forms: list[dict[str, Any]], until: float
) -> dict[str, Any]:
    """The measures of kill `k` from the records before `until` (the next kill)."""
    names = [v["worker"] for v in k.victims]
    removed = [
        min(
            (float(e["time"]) for e in events if e.get("worker_id") == n and float(e["time"]) >= k.time
             and e.get("kind") not in JOIN_EVENTS),
            default=None,
        )
        for n in names
    ]  # fmt: skip
    detected = None if None in removed else max(t for t in removed if t is not None)
    old_epoch = max([k.epoch] + [e for (_s, e), t in tel.commits.items() if t <= k.time])
    later = sorted((t, e) for (_s, e), t in tel.commits.items() if k.time < t < until and e > old_epoch)
    first_commit = later[0] if later else None
    after = [f for f in forms if k.time < f["time"] < until]
    out: dict[str, Any] = {
        "worker": names[0],
        "at_step": k.at_step,
        "time": k.time,
        "epoch": k.epoch,
        "killed": k.victims,
        "detect_s": None if detected is None else round(detected - k.time, 3),
        "next_commit_s": None if first_commit is None else round(first_commit[0] - k.time, 3),
        "recovery_s": recovery_after(tel, k.time),
        "steps_lost": max((int(f["steps_lost"]) for f in after), default=0),
        "recoveries": [f["mode"] for f in after],
    }
    formed = next((f for f in after if first_commit is not None and f["epoch"] == first_commit[1]), None)
    if detected is not None and first_commit is not None and formed is not None:
        start = min(
            float(r["time"]) - float(r["seconds"])
            for r in tel.recovery_records
            if int(r["epoch"]) == formed["epoch"]
        )
        out["breakdown"] = {
            "detect_s": round(detected - k.time, 3),
            "reform_wait_s": round(start - detected, 3),
            "formation_s": round(formed["time"] - start, 3),
            "first_step_s": round(first_commit[0] - formed["time"], 3),
        }
    if k.restarted:
        out["restarted"] = {n: round(t, 3) for n, t in k.restarted.items()}
        out.update(_join(k, tel, events, until))
    return out


def _join(k: Kill, tel: RunTelemetry, events: list[dict[str, Any]], until: float) -> dict[str, Any]:
    """How the restarted workers came back: their registration, their formation's mode on each rank, the
    time to their first step, and the survivors' pause."""
    joins: dict[str, Any] = {}
    contributed = []
    for name, restarted in k.restarted.items():
        registered = min(
            (float(e["time"]) for e in events if e.get("worker_id") == name and e.get("kind") in JOIN_EVENTS
             and restarted <= float(e["time"]) < until),
            default=None,
        )  # fmt: skip
        first = min((t for t, _s, _e in tel.by_worker.get(name, []) if restarted < t < until), default=None)
        mine = [
            r
            for r in tel.recovery_records
            if r.get("worker_id") == name and restarted < float(r["time"]) < until
        ]
        epoch = int(mine[0]["epoch"]) if mine else None
        joins[name] = {
            "register_s": None if registered is None else round(registered - restarted, 3),
            "join_s": None if first is None else round(first - restarted, 3),
            "epoch": epoch,
            "modes": {
                str(r.get("worker_id")): r["mode"]
                for r in tel.recovery_records
                if epoch is not None and int(r["epoch"]) == epoch
            },
        }
        contributed.append(joins[name]["join_s"])
    epochs = {j["epoch"] for j in joins.values()}
    pause = None
    if None not in epochs:  # every restarted worker formed: the pause before the last one's epoch
        joined = max(e for e in epochs if e is not None)
        first = min((t for (_s, e), t in tel.commits.items() if e == joined), default=None)
        before = max(
            (t for (_s, e), t in tel.commits.items() if e < joined and first and t < first), default=None
        )
        pause = None if first is None or before is None else round(first - before, 3)
    return {
        "joins": joins,
        "join_s": None if None in contributed else max(c for c in contributed if c is not None),
        "join_pause_s": pause,
    }
