"""Membership decisions as pure functions of (state, now, settings) -> decision with a reason.

No I/O, no clock: the service passes `now` (monotonic s) and `wall` (unix s), applies, persists, serves.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from coordinator.cluster_state import (
    Action,
    ClusterPhase,
    ClusterState,
    Decision,
    Event,
    EventKind,
    Heartbeat,
    HeartbeatOutcome,
    WorkerInfo,
    WorkerRecord,
)
from coordinator.credentials import same_digest


class Rejected(Exception):
    """A request the state machine refuses; `status` is the HTTP status the API answers with."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def assign_ranks(previous: Mapping[str, int | None], alive_ids: list[str]) -> dict[str, int]:
    """Dense ranks 0..n-1. A survivor keeps its rank when it is < n; holes are filled first by
    survivors whose rank no longer fits (in old-rank order), then by newcomers (in id order)."""
    n = len(alive_ids)
    ranks: dict[str, int] = {}
    taken: set[int] = set()
    movers: list[tuple[int, str]] = []
    newcomers: list[str] = []
    for wid in alive_ids:
        r = previous.get(wid)
        if r is None:
            newcomers.append(wid)
        elif r < n and r not in taken:
            ranks[wid] = r
            taken.add(r)
        else:
            movers.append((r, wid))
    holes = iter(r for r in range(n) if r not in taken)
    for _, wid in sorted(movers):
        ranks[wid] = next(holes)
    for wid in sorted(newcomers):
        ranks[wid] = next(holes)
    return ranks


def _rerank(workers: dict[str, WorkerRecord]) -> tuple[set[str], int]:
    """Re-assign ranks in place over the alive workers (the others already hold rank None).
    Returns the ids whose record changed and the world size."""
    previous = {wid: w.rank for wid, w in workers.items() if w.status == "alive"}
    ranks = assign_ranks(previous, list(previous))
    changed = set()
    for wid, rank in ranks.items():
        if previous[wid] != rank:
            workers[wid] = dataclasses.replace(workers[wid], rank=rank)
            changed.add(wid)
    return changed, len(ranks)


def bump(
    state: ClusterState,
    workers: dict[str, WorkerRecord],
    events: list[Event],
    changed: set[str],
    reason: str,
    wall: float,
) -> Decision:
    """A new epoch over `workers`: dense ranks, `events` stamped with the epoch, then the epoch's event."""
    reranked, n = _rerank(workers)
    epoch = state.epoch + 1
    events = [dataclasses.replace(e, epoch=epoch) for e in events]
    events.append(Event("epoch", None, epoch, f"epoch {epoch}: world size {n} ({reason})", wall))
    new_state = dataclasses.replace(state, epoch=epoch, workers=workers)
    return Decision(new_state, tuple(events), reason, tuple(sorted(changed | reranked)), n)


def proves(record: WorkerRecord | None, proof: bytes | None) -> bool:
    """Whether `proof` (the sha256 of a presented secret) is the digest of `record`'s secret."""
    return record is not None and proof is not None and same_digest(record.secret_digest, proof)


def register(
    state: ClusterState,
    worker_id: str,
    info: WorkerInfo,
    now: float,
    wall: float,
    max_workers: int,
    *,
    fresh_digest: bytes,
    proof: bytes | None = None,
) -> Decision:
    """A join, or a rejoin when the id is known (whatever its status): always a new epoch.

    A live id may be registered again only with its secret (`proof`, the digest of the presented secret):
    a live worker's address never changes without it (403 otherwise). The record keeps its secret when the
    proof matches; otherwise (a new id, or a dead or left one whose secret was not presented) it takes
    `fresh_digest`, the digest of a newly issued secret."""
    old = state.workers.get(worker_id)
    proven = proves(old, proof)
    if old is not None and old.status == "alive" and not proven:
        raise Rejected(
            403,
            f"worker id {worker_id!r} is held by a live worker; registering it again needs that worker's "
            "secret (X-Worker-Secret). A worker that lost its secret registers under another id, or "
            "after this one is declared dead",
        )
    n_alive = sum(1 for w in state.workers.values() if w.status == "alive")
    if (old is None or old.status != "alive") and n_alive >= max_workers:
        raise Rejected(409, f"cluster is full: {n_alive} live workers, max_workers={max_workers}")
    if old is None:
        kind: EventKind = "joined"
        reason = f"worker {worker_id} joined from {info.host}:{info.port} (host {info.host_id})"
    else:
        kind = "rejoined"
        reason = f"worker {worker_id} registered again (was {old.status}) from {info.host}:{info.port}"
    record = WorkerRecord(
        worker_id=worker_id,
        info=info,
        status="alive",
        rank=old.rank if old is not None and old.status == "alive" else None,
        joined_wall=wall,
        last_heartbeat=now,
        last_heartbeat_wall=wall,
        epoch_seen=state.epoch + 1,
        secret_digest=old.secret_digest if old is not None and proven else fresh_digest,
    )
    workers = dict(state.workers)
    workers[worker_id] = record
    return bump(state, workers, [Event(kind, worker_id, 0, reason, wall)], {worker_id}, reason, wall)


def leave(state: ClusterState, worker_id: str, wall: float, *, evicted: bool = False) -> Decision | None:
    """A graceful leave, or an operator's eviction (`evicted`). Unknown id: Rejected(404). Already gone:
    None (nothing changes). Either way the record is `left`: its heartbeats are answered `stop`."""
    old = state.workers.get(worker_id)
    if old is None:
        raise Rejected(404, f"unknown worker {worker_id!r}")
    if old.status != "alive":
        return None
    kind: EventKind = "evicted" if evicted else "left"
    how = "was evicted by an operator" if evicted else "left gracefully"
    reason = f"worker {worker_id} {how} (rank {old.rank})"
    workers = dict(state.workers)
    workers[worker_id] = dataclasses.replace(old, status="left", rank=None, ended_wall=wall)
    return bump(state, workers, [Event(kind, worker_id, 0, reason, wall)], {worker_id}, reason, wall)


def expiry_deadline(record: WorkerRecord, state: ClusterState, timeout: float) -> float:
    return max(record.last_heartbeat, state.grace_until) + timeout


def expire(state: ClusterState, now: float, wall: float, timeout: float) -> Decision | None:
    """Every live worker silent for longer than `timeout` dies, all in one new epoch. None: nobody expired."""
    dead = [
        w for w in state.workers.values() if w.status == "alive" and now > expiry_deadline(w, state, timeout)
    ]
    if not dead:
        return None
    workers = dict(state.workers)
    events = []
    for w in sorted(dead, key=lambda r: r.worker_id):
        silent = now - max(w.last_heartbeat, state.grace_until)
        why = f"worker {w.worker_id} (rank {w.rank}) silent for {silent:.2f} s"
        why += f" > heartbeat timeout {timeout:g} s"
        events.append(Event("died", w.worker_id, 0, why, wall))
        workers[w.worker_id] = dataclasses.replace(w, status="dead", rank=None, ended_wall=wall)
    reason = f"{len(dead)} worker(s) missed the heartbeat timeout: " + ", ".join(
        sorted(w.worker_id for w in dead)
    )
    return bump(state, workers, events, {w.worker_id for w in dead}, reason, wall)


def restart(state: ClusterState, now: float, wall: float, grace: float) -> Decision:
    """After a coordinator restart, expiry clocks restart at `now` plus `grace` seconds. Epoch unchanged.
    Every record's values are marked `restored`: from before the restart, until its next heartbeat."""
    workers = {
        wid: dataclasses.replace(
            w, last_heartbeat=now if w.status == "alive" else w.last_heartbeat, restored=True
        )
        for wid, w in state.workers.items()
    }
    n = sum(1 for w in workers.values() if w.status == "alive")
    reason = f"coordinator restarted at epoch {state.epoch} with {n} live worker(s); grace {grace:g} s"
    new_state = dataclasses.replace(state, workers=workers, grace_until=now + grace)
    event = Event("coordinator_restarted", None, state.epoch, reason, wall)
    return Decision(new_state, (event,), reason, (), n)


def purge(state: ClusterState, wall: float, retention: float) -> tuple[ClusterState, tuple[str, ...]]:
    """Forget the records of workers dead or left for longer than `retention` seconds (events stay).
    Members are never purged, so the epoch does not move. Returns the new state and the purged ids."""
    gone = tuple(
        sorted(
            wid for wid, w in state.workers.items() if w.status != "alive" and wall - _ended(w) > retention
        )
    )
    if not gone:
        return state, ()
    dropped = set(gone)
    workers = {wid: w for wid, w in state.workers.items() if wid not in dropped}
    return dataclasses.replace(state, workers=workers), gone


def _ended(w: WorkerRecord) -> float:
    return w.last_heartbeat_wall if w.ended_wall is None else w.ended_wall


def absorb_stall(state: ClusterState, now: float, stall: float, timeout: float) -> ClusterState:
    """The coordinator itself was stalled for `stall` seconds (an overloaded machine, a long pause): the
    heartbeats that arrived meanwhile may still be waiting to be read, so nobody expires before
    `now + stall`. Like the restart grace, this keeps workers from being evicted for the coordinator's
    own downtime. Epoch and membership are unchanged."""
    grace_until = max(state.grace_until, now + stall - timeout)
    if grace_until == state.grace_until:
        return state
    return dataclasses.replace(state, grace_until=grace_until)


def heartbeat(
    state: ClusterState, worker_id: str, hb: Heartbeat, now: float, wall: float
) -> HeartbeatOutcome:
    """Unknown id: Rejected(404). Dead: Rejected(410). Future epoch: Rejected(409). Left: not a member."""
    old = state.workers.get(worker_id)
    if old is None:
        raise Rejected(404, f"unknown worker {worker_id!r}; register first")
    if old.status == "dead":
        raise Rejected(410, f"worker {worker_id!r} was declared dead; it must register again")
    if old.status == "left":
        return HeartbeatOutcome(old, False, f"worker {worker_id!r} has left the job")
    if hb.epoch > state.epoch:
        raise Rejected(409, f"heartbeat epoch {hb.epoch} is ahead of the coordinator's epoch {state.epoch}")
    new_state = old.state if hb.state is None else hb.state
    record = dataclasses.replace(
        old,
        last_heartbeat=now,
        last_heartbeat_wall=wall,
        epoch_seen=hb.epoch,
        step=hb.step,
        loss=hb.loss,
        samples_per_s=hb.samples_per_s,
        bytes_sent=old.bytes_sent if hb.bytes_sent is None else hb.bytes_sent,
        bytes_received=old.bytes_received if hb.bytes_received is None else hb.bytes_received,
        state=new_state,
        telemetry=hb.telemetry,
        committed_step=old.committed_step if hb.committed_step is None else hb.committed_step,
        restored=False,
    )
    return HeartbeatOutcome(record, True, "ok")


@dataclass(frozen=True, slots=True)
class PhaseCounts:
    """What the cluster phase depends on, countable incrementally (a heartbeat changes one record)."""

    training: int = 0  # live workers reporting "training"
    failed: int = 0  # live workers reporting "failed"
    behind: int = 0  # live workers whose last heartbeat carried an older epoch

    def moved(self, old: WorkerRecord | None, new: WorkerRecord, epoch: int) -> PhaseCounts:
        a, b = _counted(old, epoch), _counted(new, epoch)
        if a == b:
            return self
        return PhaseCounts(self.training - a[0] + b[0], self.failed - a[1] + b[1], self.behind - a[2] + b[2])


def _counted(w: WorkerRecord | None, epoch: int) -> tuple[int, int, int]:
    if w is None or w.status != "alive":
        return (0, 0, 0)
    return (int(w.state == "training"), int(w.state == "failed"), int(w.epoch_seen < epoch))


def phase_counts(state: ClusterState) -> PhaseCounts:
    counts = PhaseCounts()
    for w in state.workers.values():
        counts = counts.moved(None, w, state.epoch)
    return counts


def phase_from_counts(counts: PhaseCounts, finished: bool, trained: bool) -> ClusterPhase:
    if counts.training:
        return "reforming" if counts.behind else "training"
    if finished:
        return "finished"
    if counts.failed:
        return "failed"
    return "reforming" if trained else "waiting"


def cluster_phase(state: ClusterState) -> ClusterPhase:
    return phase_from_counts(phase_counts(state), state.finished, state.trained)


def heartbeat_action(phase: ClusterPhase, member: bool, worker_epoch: int, epoch: int) -> Action:
    if not member or phase in ("finished", "failed"):
        return "stop"
    return "reform" if worker_epoch < epoch else "continue"


def note_progress(state: ClusterState, record: WorkerRecord) -> ClusterState:
    """Sticky job flags after a heartbeat: someone has trained; someone has finished the job."""
    trained = state.trained or record.state == "training"
    finished = state.finished or record.state == "finished"
    if trained == state.trained and finished == state.finished:
        return state
    return dataclasses.replace(state, trained=trained, finished=finished)
