"""Random register / heartbeat / leave / expire sequences against the pure membership functions."""

from __future__ import annotations

import dataclasses

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from coordinator import cluster_state as cs
from coordinator import membership as m
from coordinator.barrier import ready_answer
from coordinator.credentials import digest

IDS = st.sampled_from(["w0", "w1", "w2", "w3", "w4", "w5"])
TIMEOUT = 2.0
MAX = 5


def digest_of(worker_id: str) -> bytes:
    """A stand-in for the digest of the worker's secret (one secret per id in these tests)."""
    return digest(f"secret-of-{worker_id}")


class Membership(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.state = cs.ClusterState()
        self.now = 0.0
        self.answers: dict[int, object] = {}
        self.last_epoch = 0
        self.counts = m.PhaseCounts()  # maintained incrementally, as the service does

    def _apply(self, decision: cs.Decision | None, changed_membership: bool) -> None:
        if decision is None:
            assert not changed_membership
            return
        assert decision.state.epoch == self.state.epoch + 1, "every membership change bumps the epoch by one"
        assert decision.reason
        assert any(e.kind == "epoch" for e in decision.events)
        self.state = decision.state
        self.counts = m.phase_counts(self.state)

    @rule(wid=IDS)
    def register(self, wid: str) -> None:
        info = cs.WorkerInfo("127.0.0.1", 1000 + int(wid[1:]), "h", "cpu")
        before = self.state
        try:
            d = m.register(
                self.state,
                wid,
                info,
                self.now,
                self.now,
                MAX,
                fresh_digest=digest_of(wid),
                proof=digest_of(wid),
            )
        except m.Rejected as exc:
            assert exc.status == 409
            assert len(before.alive()) >= MAX
            return
        old_rank = before.workers[wid].rank if wid in before.workers else None
        self._apply(d, True)
        if old_rank is not None:
            assert self.state.workers[wid].rank == old_rank, "a live worker that rejoins keeps its rank"

    @rule(
        wid=IDS,
        dt=st.floats(0.0, 1.5),
        lag=st.integers(0, 2),
        ws=st.sampled_from(["starting", "waiting", "training", "finished", "failed"]),
    )
    def heartbeat(self, wid: str, dt: float, lag: int, ws: cs.WorkerState) -> None:
        self.now += dt
        hb = cs.Heartbeat(epoch=max(0, self.state.epoch - lag), state=ws)
        try:
            out = m.heartbeat(self.state, wid, hb, self.now, self.now)
        except m.Rejected as exc:
            rec = self.state.workers.get(wid)
            assert (rec is None and exc.status == 404) or (rec is not None and rec.status == "dead")
            return
        if out.member:
            self.counts = self.counts.moved(self.state.workers[wid], out.record, self.state.epoch)
            workers = dict(self.state.workers)
            workers[wid] = out.record
            self.state = m.note_progress(dataclasses.replace(self.state, workers=workers), out.record)

    @rule(wid=IDS)
    def leave(self, wid: str) -> None:
        try:
            d = m.leave(self.state, wid, self.now)
        except m.Rejected:
            assert wid not in self.state.workers
            return
        was_alive = self.state.workers[wid].status == "alive"
        self._apply(d, was_alive)

    @rule(dt=st.floats(0.0, 3.0))
    def expire(self, dt: float) -> None:
        self.now += dt
        alive_before = {w.worker_id for w in self.state.alive()}
        d = m.expire(self.state, self.now, self.now, TIMEOUT)
        self._apply(d, False if d is None else True)
        for wid in alive_before:
            rec = self.state.workers[wid]
            if rec.status == "alive":
                assert self.now <= m.expiry_deadline(rec, self.state, TIMEOUT)

    @rule(downtime=st.floats(0.0, 100.0))
    def coordinator_restart(self, downtime: float) -> None:
        self.now += downtime
        before = {w.worker_id: (w.status, w.rank) for w in self.state.workers.values()}
        d = m.restart(self.state, self.now, self.now, grace=TIMEOUT)
        assert d.state.epoch == self.state.epoch and [e.kind for e in d.events] == ["coordinator_restarted"]
        self.state = d.state
        assert {w.worker_id: (w.status, w.rank) for w in self.state.workers.values()} == before
        assert m.expire(self.state, self.now + TIMEOUT, self.now, TIMEOUT) is None  # nobody evicted for it

    @rule(min_workers=st.integers(1, 4))
    def barrier(self, min_workers: int) -> None:
        answer = ready_answer(self.state, min_workers, "h")
        key = (self.state.epoch, min_workers)
        previous = self.answers.setdefault(key, answer)  # type: ignore[call-overload]
        assert previous == answer, "every barrier answer of an epoch is identical"

    @invariant()
    def ranks_dense_and_unique(self) -> None:
        alive = self.state.alive()
        assert sorted(w.rank for w in alive) == list(range(len(alive)))  # type: ignore[type-var]
        assert all(w.rank is None for w in self.state.workers.values() if w.status != "alive")
        assert len(alive) <= MAX

    @invariant()
    def incremental_phase_counts_match_a_recount(self) -> None:
        assert self.counts == m.phase_counts(self.state)

    @invariant()
    def epoch_never_decreases(self) -> None:
        assert self.state.epoch >= self.last_epoch
        self.last_epoch = self.state.epoch


Membership.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestMembership = Membership.TestCase
