"""The thin async layer: applies membership decisions to the in-memory state (authoritative), persists
them, wakes barrier waiters, and serves views. Heartbeats touch memory only; their fields reach SQLite
in coalesced batches, while membership changes are written before the request is answered. It also holds
the credentials: operator tokens, an index of worker-secret digests, and the data-plane master key."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import Counter
from typing import Any, cast

from coordinator import cluster_state as cs
from coordinator import liveness
from coordinator import membership as m
from coordinator.barrier import ChangeSignal, ReadyAnswer, ready_answer
from coordinator.clock import Clock
from coordinator.credentials import OperatorTokens, Principal, digest, new_secret, pair_key, same_digest
from coordinator.history import FormationReport, TrainingHistory
from coordinator.ratelimit import RegistrationLimiter
from coordinator.settings import CoordinatorSettings
from coordinator.store import Store, heartbeat_row
from coordinator.telemetry import Metrics
from jobspec import JobSpec

log = logging.getLogger(__name__)


class CoordinatorService:
    def __init__(self, settings: CoordinatorSettings, store: Store, clock: Clock, metrics: Metrics) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        self.metrics = metrics
        self.state = cs.ClusterState()
        self.signal = ChangeSignal()
        self.job = JobSpec.model_validate({})
        self.job_hash = self.job.hash
        self.started_wall = clock.wall()
        self.started_mono = clock.monotonic()
        self._dirty: set[str] = set()
        self._recovered: dict[str, int] = {}  # worker id -> epoch whose formation /events has recorded
        self._flags_dirty = False
        self._world_size = 0
        self._counts = m.PhaseCounts()  # kept current per heartbeat: the phase is O(1) on the hot path
        self.evidence = liveness.Evidence()  # what progress-based evictions rest on (current epoch)
        self.history = TrainingHistory()  # curves and formations, as the heartbeats tell them
        # One membership change at a time, and a yield after each: a flood of registrations queues on this
        # lock instead of in the event loop's ready queue, so a heartbeat waits behind at most one change.
        self._changes = asyncio.Lock()
        self._worker_gauges = {status: metrics.workers.labels(status) for status in ("alive", "dead", "left")}
        metrics.watch_workers(lambda: self.state.workers, clock.monotonic)
        self.tokens = OperatorTokens(
            settings.secret("token"), settings.secret("read_token"), settings.secret("admin_token")
        )
        self.master_key = b""  # loaded (or created) with the store; never served
        self._by_digest: dict[bytes, str] = {}  # worker-secret digest -> worker id
        self.limiter = RegistrationLimiter(
            settings.register_rate,
            settings.register_burst,
            settings.register_rate_global,
            settings.register_burst_global,
        )

    # -- start-up ------------------------------------------------------------------------------------
    async def start(self, configured_job: JobSpec | None) -> None:
        loaded = self.store.open()
        stored_job = JobSpec.model_validate_json(loaded.job_json) if loaded.job_json else None
        if configured_job is not None and stored_job is not None and configured_job.hash != stored_job.hash:
            raise ValueError(
                f"the database {self.store.path} holds job {stored_job.job_id!r} "
                f"(hash {stored_job.hash[:12]}), which differs from the configured job "
                f"{configured_job.job_id!r} (hash {configured_job.hash[:12]}); "
                "start with the same job, without job options, or with a new --db"
            )
        self.job = configured_job or stored_job or JobSpec.model_validate({})
        self.job_hash = self.job.hash
        if stored_job is None:
            self.store.save_job(self.job.canonical_json())
        self.state = loaded.state
        self.master_key = loaded.master_key
        self.history.load(loaded.curve, loaded.formations)
        self._by_digest = {w.secret_digest: wid for wid, w in loaded.state.workers.items() if w.secret_digest}
        if loaded.state.epoch > 0 or loaded.state.workers:
            now = self.clock.monotonic()
            self._apply(m.restart(loaded.state, now, self.clock.wall(), self.settings.grace_s))
        self._refresh_gauges()
        log.info("job %s (hash %s), epoch %d", self.job.job_id, self.job_hash[:12], self.state.epoch)

    # -- membership changes (persisted before answering) ----------------------------------------------
    def _apply(self, decision: cs.Decision) -> None:
        self.store.save(decision.state, decision.changed, decision.events)  # written before it is served
        for wid in decision.changed:
            self._index(self.state.workers.get(wid), decision.state.workers.get(wid))
        self.state = decision.state
        self._counts = m.phase_counts(decision.state)
        self._world_size = decision.world_size
        self._dirty.difference_update(decision.changed)
        for ev in decision.events:
            self.metrics.membership_changes.labels(ev.kind).inc()
        self.signal.notify()
        self._refresh_gauges()
        log.info("epoch %d: %s", decision.state.epoch, decision.reason)

    def _index(self, old: cs.WorkerRecord | None, new: cs.WorkerRecord | None) -> None:
        if old is not None and old.secret_digest and old.secret_digest != getattr(new, "secret_digest", b""):
            self._by_digest.pop(old.secret_digest, None)
        if new is not None and new.secret_digest:
            self._by_digest[new.secret_digest] = new.worker_id

    def worker_by_digest(self, secret_digest: bytes) -> str | None:
        return self._by_digest.get(secret_digest)

    async def register(
        self, worker_id: str | None, info: cs.WorkerInfo, clock: Clock, presented_secret: str | None = None
    ) -> tuple[cs.WorkerRecord, str]:
        """Returns the record and the worker's secret: the presented one when it proved the id (it stays
        valid), else a fresh one (any older secret of the id stops working)."""
        wid = worker_id or f"w-{secrets.token_hex(6)}"
        fresh = new_secret()
        fresh_digest = digest(fresh)
        proof = digest(presented_secret) if presented_secret else None
        async with self._changes:
            decision = m.register(
                self.state,
                wid,
                info,
                clock.monotonic(),
                clock.wall(),
                self.settings.max_workers,
                fresh_digest=fresh_digest,
                proof=proof,
            )
            self._apply(decision)
            await asyncio.sleep(0)
        record = decision.state.workers[wid]
        kept = presented_secret is not None and record.secret_digest != fresh_digest
        return record, presented_secret if kept and presented_secret is not None else fresh

    async def leave(self, worker_id: str, clock: Clock, by: Principal) -> None:
        """The worker's own leave, or an eviction when `by` is the admin. The secret is checked again under
        the lock: the record may have been registered anew since the request's gate."""
        async with self._changes:
            record = self.state.workers.get(worker_id)
            if by.kind == "worker" and record is not None and not same_digest(record.secret_digest, by.proof):
                raise m.Rejected(403, f"not the secret of worker {worker_id!r}")
            decision = m.leave(self.state, worker_id, clock.wall(), evicted=by.kind == "admin")
            if decision is not None:
                self._apply(decision)
                await asyncio.sleep(0)

    def purge(self) -> tuple[str, ...]:
        """Forget dead and left records older than the retention (events stay). Returns the purged ids."""
        state, gone = m.purge(self.state, self.clock.wall(), self.settings.record_retention_s)
        if not gone:
            return ()
        self.store.delete_workers(gone)
        for wid in gone:
            self._index(self.state.workers[wid], None)
        self._dirty.difference_update(gone)
        self.state = state
        self._refresh_gauges()
        log.info(
            "purged %d worker record(s) ended more than %g s ago", len(gone), self.settings.record_retention_s
        )
        return gone

    def absorb_stall(self, stall_s: float) -> None:
        """Called by the reaper when it woke `stall_s` late: the coordinator, not the workers, was slow."""
        before = self.state.grace_until
        now = self.clock.monotonic()
        self.state = m.absorb_stall(self.state, now, stall_s, self.settings.heartbeat_timeout)
        if self.state.grace_until != before:
            self.metrics.stalls.inc()
            log.warning(
                "epoch %d: coordinator stalled for %.2f s; no worker expires during the next %.2f s",
                self.state.epoch,
                stall_s,
                stall_s,
            )

    async def expire(self) -> bool:
        async with self._changes:
            now = self.clock.monotonic()
            decision = m.expire(self.state, now, self.clock.wall(), self.settings.heartbeat_timeout)
            if decision is None:
                return False
            self._apply(decision)
        return True

    # -- progress-based liveness (coordinator/liveness.py) -----------------------------------------------
    def _evict(self, verdict: liveness.Verdict) -> None:
        self._apply(liveness.evict(self.state, verdict, self.clock.wall()))
        self.metrics.liveness_evictions.labels(verdict.kind).inc()
        log.warning("epoch %d: evicted %s: %s", self.state.epoch, verdict.worker_id, verdict.reason)

    async def evict_stalled(self, worker_id: str, worker_epoch: int) -> tuple[cs.Action, cs.WorkerRecord]:
        """A heartbeat said "stalled": the worker is evicted (as dead). Returns that heartbeat's answer:
        `reform` to the new epoch, which fences the worker at once."""
        async with self._changes:
            verdict = liveness.stalled(self.state, worker_id, self.settings.progress_timeout)
            if verdict is not None:
                self._evict(verdict)
                await asyncio.sleep(0)
        record = self.state.workers[worker_id]
        if verdict is not None:
            return "reform", record
        member = record.status == "alive"
        return m.heartbeat_action(self.phase(), member, worker_epoch, self.state.epoch), record

    async def check_liveness(self) -> bool:
        """A reaper tick: evict an overdue straggler, or settle a partition two members reported. True if
        someone was evicted."""
        ev = self.evidence.current(self.state.epoch)
        if not ev.baseline and not ev.reports:  # nothing to judge (no steps reported in this epoch)
            return False
        async with self._changes:
            now = self.clock.monotonic()
            ev = self.evidence.current(self.state.epoch)
            ev.lag_since, verdict = liveness.stragglers(
                self.state, ev.baseline, ev.lag_since, now, self.settings.progress_timeout
            )
            if verdict is None:
                verdict = liveness.judge(self.state, ev.reports, now, self.settings.suspect_settle_s)
            if verdict is None:
                return False
            self._evict(verdict)
        return True

    async def suspect(
        self, reporter: str, epoch: int, suspect: int | str, reason: str
    ) -> tuple[str, int, str | None]:
        """A member's report about a peer of the current epoch. Returns the suspect's id, how many members
        have reported it in that epoch, and whom the coordinator evicted on the evidence (if anyone)."""
        async with self._changes:
            target = liveness.check_report(self.state, reporter, epoch, suspect)
            ev = self.evidence.current(self.state.epoch)
            now = self.clock.monotonic()
            ev.reports.setdefault(target, {}).setdefault(reporter, liveness.Report(now, reason))
            count = len(ev.reports[target])
            log.info("epoch %d: %s reports %s (%s)", epoch, reporter, target, reason)
            verdict = liveness.judge(self.state, ev.reports, now, self.settings.suspect_settle_s)
            if verdict is not None:
                self._evict(verdict)
                await asyncio.sleep(0)
        return target, count, verdict.worker_id if verdict is not None else None

    # -- heartbeats (memory only) ----------------------------------------------------------------------
    def heartbeat(self, worker_id: str, hb: cs.Heartbeat, clock: Clock) -> tuple[cs.Action, cs.WorkerRecord]:
        try:
            out = m.heartbeat(self.state, worker_id, hb, clock.monotonic(), clock.wall())
        except m.Rejected as exc:
            self.metrics.heartbeats.labels(str(exc.status)).inc()
            raise
        if out.member:
            workers = cast(dict[str, cs.WorkerRecord], self.state.workers)
            self._counts = self._counts.moved(workers[worker_id], out.record, self.state.epoch)
            workers[worker_id] = out.record
            self._dirty.add(worker_id)
            progressed = m.note_progress(self.state, out.record)
            if progressed is not self.state:
                self.state = progressed
                self._flags_dirty = True
            self.evidence.observe(worker_id, hb.epoch, hb.committed_step, self.state.epoch)
            self.history.observe(hb.telemetry, hb.loss, out.record.last_heartbeat_wall)
        action = m.heartbeat_action(self.phase(), out.member, hb.epoch, self.state.epoch)
        self.metrics.heartbeats.labels(action).inc()
        return action, out.record

    def note_recovery(self, worker_id: str, report: dict[str, Any]) -> None:
        """Record (once per worker and epoch, in /events and the history) how a worker's current epoch was
        formed."""
        epoch = int(report["epoch"])
        if epoch != self.state.epoch or self._recovered.get(worker_id) == epoch:
            return
        self._recovered[worker_id] = epoch
        self.metrics.recoveries.labels(str(report["mode"])).inc()
        took = "" if report.get("seconds") is None else f" in {float(report['seconds']):.2f} s"
        reason = (
            f"{report['mode']} at step {report['resumed_at']}, {report['steps_lost']} committed steps lost"
            + took
        )
        wall = self.clock.wall()
        event = cs.Event("recovered", worker_id, epoch, reason, wall)
        formed = FormationReport(
            worker_id,
            str(report["mode"]),
            int(report["resumed_at"]),
            int(report["steps_lost"]),
            None if report.get("seconds") is None else float(report["seconds"]),
            wall,
        )
        oldest = self.history.note_formation(epoch, formed)
        row = (epoch, worker_id, formed.mode, formed.resumed_at, formed.steps_lost, formed.seconds, wall)
        self.store.save(self.state, [], [event], formation=row, forget_formations_before=oldest)

    def flush_heartbeats(self, max_rows: int | None = None) -> int:
        """Write one transaction with the heartbeats received since the last flush (at most `max_rows`
        workers; the rest stay pending). Returns the rows written."""
        if not self._dirty and not self._flags_dirty:
            return 0
        if max_rows is None or len(self._dirty) <= max_rows:
            ids, self._dirty = self._dirty, set()
        else:
            ids = {self._dirty.pop() for _ in range(max_rows)}
        workers = self.state.workers
        rows = [heartbeat_row(workers[wid]) for wid in ids if wid in workers]
        meta = {
            "trained": "1" if self.state.trained else "0",
            "finished": "1" if self.state.finished else "0",
        }
        self._flags_dirty = False
        curve, dropped = self.history.drain()
        self.store.write_heartbeats(rows, meta, curve, dropped)
        return len(rows)

    @property
    def pending_heartbeats(self) -> int:
        return len(self._dirty)

    # -- views -------------------------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self._world_size

    def phase(self) -> cs.ClusterPhase:
        return m.phase_from_counts(self._counts, self.state.finished, self.state.trained)

    def ready(self, min_workers: int) -> ReadyAnswer:
        return ready_answer(self.state, min_workers, self.job_hash)

    def peer_keys(self, answer: ReadyAnswer, caller: str | None) -> dict[str, str]:
        """The caller's data-plane key with every other member of the answered epoch (hex), or {} when the
        caller is not a member."""
        ids = [w.worker_id for w in answer.workers]
        if caller is None or caller not in ids:
            return {}
        job_id, epoch, master = self.job.job_id, answer.epoch, self.master_key
        return {wid: pair_key(master, job_id, epoch, caller, wid).hex() for wid in ids if wid != caller}

    def _refresh_gauges(self) -> None:
        counts = Counter(w.status for w in self.state.workers.values())
        for status in ("alive", "dead", "left"):
            self._worker_gauges[status].set(counts[status])
        self.metrics.epoch.set(self.state.epoch)

    def close(self) -> None:
        self.flush_heartbeats()
        self.store.close()
