"""Liveness is progress: members whose training makes no progress while their heartbeats live are evicted.

Decisions are pure functions of (state, evidence, now, settings); `Evidence` is what they rest on, for
the current epoch only (memory; dropped when the epoch moves, empty after a restart). Three kinds:

- Self-report: a member's heartbeat says worker_state "stalled" (its training made no progress within its
  progress timeout, or its start-up timeout before its first step of the epoch). A worker speaks only for
  itself, so this is taken as a death: the record is dead (its heartbeats answer 410) and the worker
  registers again once its training moves.
- Straggler: a member whose committed step lags the epoch's maximum by `LAG_STEPS` or more, and does not
  move, for longer than the progress timeout (a wedged process whose heartbeat thread still lives; a
  member that keeps committing but whose reports trail the freshest by a heartbeat's worth of fast steps
  is healthy). Only steps committed
  in this epoch make the maximum, and only members that reported a committed step in this epoch are
  judged, so stale values from before a re-form and workers that do not report steps count for nothing.
  Also a death.
- Peer reports (`POST /workers/{id}/suspect`): evidence, never a verdict by itself. A suspect reported by
  a majority of the other members (at least two of them) is evicted. Two members that report each other
  (a partition) lose the one that joined last (the higher rank on a tie), never both: at once in an epoch
  of two, else once the pair has stood for `settle_s` without a majority forming. An evicted suspect is
  `left` (its heartbeats are answered `stop`), so a partition does not loop through re-forms.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from coordinator.cluster_state import ClusterState, Decision, Event, WorkerRecord
from coordinator.membership import Rejected, bump

LAG_STEPS = 2  # a member this many committed steps behind the epoch's maximum is a straggler
EvictionKind = Literal["stalled", "straggler", "suspect"]
EVICTION_KINDS: tuple[EvictionKind, ...] = ("stalled", "straggler", "suspect")


@dataclass(frozen=True, slots=True)
class Report:
    time: float  # monotonic, when the coordinator received it
    reason: str


@dataclass(frozen=True, slots=True)
class Verdict:
    worker_id: str
    kind: EvictionKind
    reason: str


class Evidence:
    """What liveness decisions rest on, about one epoch (memory only)."""

    def __init__(self) -> None:
        self.epoch = -1
        self.baseline: dict[str, int] = {}  # member -> committed step of its first heartbeat of the epoch
        self.lag_since: dict[str, tuple[float, int]] = {}  # member -> when its lag began, at which step
        self.reports: dict[str, dict[str, Report]] = {}  # suspect -> reporter -> report

    def current(self, epoch: int) -> Evidence:
        """The evidence about `epoch` (all of it is dropped when the epoch has moved)."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.baseline, self.lag_since, self.reports = {}, {}, {}
        return self

    def observe(self, worker_id: str, hb_epoch: int, committed_step: int | None, epoch: int) -> None:
        """A heartbeat: the committed step of a member's first heartbeat in the epoch is its baseline."""
        if hb_epoch == epoch and committed_step is not None:
            self.current(epoch).baseline.setdefault(worker_id, committed_step)


def members(state: ClusterState) -> dict[str, WorkerRecord]:
    return {wid: w for wid, w in state.workers.items() if w.status == "alive" and w.rank is not None}


def evict(state: ClusterState, verdict: Verdict, wall: float) -> Decision:
    """The verdict applied: a new epoch without the worker (dead, or left for a suspect)."""
    old = state.workers[verdict.worker_id]
    status: Literal["dead", "left"] = "left" if verdict.kind == "suspect" else "dead"
    workers = dict(state.workers)
    workers[verdict.worker_id] = dataclasses.replace(old, status=status, rank=None, ended_wall=wall)
    event = Event("evicted", verdict.worker_id, 0, verdict.reason, wall)
    return bump(state, workers, [event], {verdict.worker_id}, verdict.reason, wall)


def stalled(state: ClusterState, worker_id: str, progress_timeout: float) -> Verdict | None:
    """A live worker whose heartbeat said "stalled" is evicted; anyone else (already gone): None."""
    w = state.workers.get(worker_id)
    if w is None or w.status != "alive" or w.state != "stalled":
        return None
    return Verdict(
        worker_id,
        "stalled",
        f"stalled: worker {worker_id} (rank {w.rank}) reported that its training made no progress within "
        f"its timeout (progress timeout {progress_timeout:g} s; last committed step {w.committed_step})",
    )


def stragglers(
    state: ClusterState,
    baseline: Mapping[str, int],
    lag_since: Mapping[str, tuple[float, int]],
    now: float,
    timeout: float,
) -> tuple[dict[str, tuple[float, int]], Verdict | None]:
    """The members lagging now (each with when its lag began and the committed step it has been stuck at
    since) and the straggler to evict, if any: the one lagging longest, once past `timeout`. A member whose
    committed step moves is not stuck: its lag starts again. Heartbeats sample each member at its own phase,
    so with steps shorter than the heartbeat interval a healthy member's report trails the freshest one by
    several steps, at every reaper tick; only a member that also stops committing is a straggler. Nobody is
    evicted during a restart or stall grace."""
    judged = {wid: w for wid, w in members(state).items() if wid in baseline}
    moved = [w.committed_step for wid, w in judged.items() if w.committed_step != baseline[wid]]
    if not moved:
        return {}, None
    top = max(moved)
    lagging: dict[str, tuple[float, int]] = {}
    for wid, w in judged.items():
        if top - w.committed_step >= LAG_STEPS:
            before = lag_since.get(wid)
            stuck = before is not None and before[1] == w.committed_step
            lagging[wid] = before if stuck and before is not None else (now, w.committed_step)
    overdue = sorted((since, wid) for wid, (since, _) in lagging.items() if now - since > timeout)
    if not overdue or now < state.grace_until:
        return lagging, None
    since, wid = overdue[0]
    w = judged[wid]
    return lagging, Verdict(
        wid,
        "straggler",
        f"straggler: worker {wid} (rank {w.rank}) at committed step {w.committed_step}, "
        f"{top - w.committed_step} behind the epoch's {top} for {now - since:.1f} s "
        f"> progress timeout {timeout:g} s",
    )


def check_report(state: ClusterState, reporter: str, epoch: int, suspect: int | str) -> str:
    """A peer report, checked: returns the suspect's worker id. Rejected: 404 an unknown reporter, 410 a
    dead one, 409 an epoch that is not the current one or a reporter or suspect that is not a member of
    it, 422 a report about oneself."""
    w = state.workers.get(reporter)
    if w is None:
        raise Rejected(404, f"unknown worker {reporter!r}; register first")
    if w.status == "dead":
        raise Rejected(410, f"worker {reporter!r} was declared dead; it must register again")
    if epoch < state.epoch:
        raise Rejected(
            409,
            f"stale report: epoch {epoch} is over, the current epoch is {state.epoch}; "
            "form the current epoch and report again if the peer is still unreachable",
        )
    if epoch > state.epoch:
        raise Rejected(409, f"report epoch {epoch} is ahead of the coordinator's epoch {state.epoch}")
    if w.status != "alive" or w.rank is None:
        raise Rejected(409, f"worker {reporter!r} is not a member of epoch {state.epoch}")
    group = members(state)
    if isinstance(suspect, int):
        target = next((wid for wid, m in group.items() if m.rank == suspect), None)
        if target is None:
            n = len(group)
            raise Rejected(409, f"no member of epoch {state.epoch} has rank {suspect} (world size {n})")
    elif suspect in group:
        target = suspect
    else:
        raise Rejected(409, f"worker {suspect!r} is not a member of epoch {state.epoch}")
    if target == reporter:
        raise Rejected(
            422, "a worker cannot report itself: a worker whose training stalls says so in its heartbeat"
        )
    return target


def _lateness(w: WorkerRecord) -> tuple[float, int]:
    """Orders members by when they joined (the later, the larger); the higher rank on a tie."""
    return (w.joined_wall, w.rank if w.rank is not None else -1)


def _quoted(by: Mapping[str, Report], voters: list[str]) -> str:
    shown = "; ".join(f"{r}: {by[r].reason}" for r in voters[:3])
    return shown + ("; ..." if len(voters) > 3 else "")


def judge(
    state: ClusterState, reports: Mapping[str, Mapping[str, Report]], now: float, settle_s: float
) -> Verdict | None:
    """The suspect to evict on the peer reports about the current epoch, if any (see the module doc)."""
    group = members(state)
    others = len(group) - 1
    need = max(2, others // 2 + 1)
    majority: list[tuple[int, tuple[float, int], str, list[str]]] = []
    for suspect, by in reports.items():
        voters = sorted(r for r in by if r in group and r != suspect)
        if suspect in group and len(voters) >= need:
            majority.append((len(voters), _lateness(group[suspect]), suspect, voters))
    if majority:
        count, _, suspect, voters = max(majority)
        w = group[suspect]
        return Verdict(
            suspect,
            "suspect",
            f"suspect: worker {suspect} (rank {w.rank}) reported unreachable or stalled by {count} of the "
            f"{others} other members of epoch {state.epoch} ({_quoted(reports[suspect], voters)})",
        )
    pairs = []
    for a, by in reports.items():
        for b in by:
            back = reports.get(b, {})
            if a < b and a in group and b in group and a in back:
                since = max(by[b].time, back[a].time)
                if len(group) == 2 or now - since >= settle_s:
                    pairs.append((since, a, b))
    if not pairs:
        return None
    _, a, b = min(pairs)
    victim = max((a, b), key=lambda wid: _lateness(group[wid]))
    stays = b if victim == a else a
    w = group[victim]
    why = "has the higher rank" if w.joined_wall == group[stays].joined_wall else "joined last"
    return Verdict(
        victim,
        "suspect",
        f"suspect: workers {a} and {b} report each other unreachable in epoch {state.epoch} (a partition); "
        f"{victim} (rank {w.rank}), which {why}, leaves ({_quoted(reports[victim], [stays])})",
    )
