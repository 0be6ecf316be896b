"""Pure membership decisions, driven with explicit times (a fake clock)."""

from __future__ import annotations

import pytest

from coordinator import cluster_state as cs
from coordinator import membership as m
from coordinator.credentials import digest

INFO = cs.WorkerInfo("10.0.0.1", 50051, "host-a", "cpu")
TIMEOUT = 2.0


def digest_of(worker_id: str) -> bytes:
    """A stand-in for the digest of the worker's secret (one secret per id in these tests)."""
    return digest(f"secret-of-{worker_id}")


def reg(state: cs.ClusterState, wid: str, now: float, wall: float, max_workers: int = 16) -> cs.Decision:
    """Register `wid`, proving the id with its secret (a rejoin of a live id needs it)."""
    return m.register(
        state, wid, INFO, now, wall, max_workers, fresh_digest=digest_of(wid), proof=digest_of(wid)
    )


def join(state: cs.ClusterState, *ids: str, now: float = 0.0) -> cs.ClusterState:
    for wid in ids:
        state = reg(state, wid, now, 1e9 + now).state
    return state


def ranks(state: cs.ClusterState) -> dict[str, int | None]:
    return {w.worker_id: w.rank for w in state.alive()}


def test_join_bumps_epoch_and_assigns_dense_ranks() -> None:
    state = join(cs.ClusterState(), "a", "b", "c")
    assert state.epoch == 3
    assert ranks(state) == {"a": 0, "b": 1, "c": 2}
    d = reg(state, "d", 0.0, 0.0)
    assert d.state.epoch == 4
    assert [e.kind for e in d.events] == ["joined", "epoch"]
    assert all(e.epoch == 4 for e in d.events)
    assert "joined" in d.reason and "d" in d.reason


def test_register_same_id_is_a_rejoin_with_new_epoch_and_kept_rank() -> None:
    state = join(cs.ClusterState(), "a", "b", "c")
    d = reg(state, "b", 5.0, 5.0)
    assert d.state.epoch == state.epoch + 1
    assert d.events[0].kind == "rejoined"
    assert len(d.state.alive()) == 3  # never a duplicate
    assert ranks(d.state) == {"a": 0, "b": 1, "c": 2}


def test_max_workers_rejects_and_changes_nothing() -> None:
    state = cs.ClusterState()
    for wid in ("a", "b"):
        state = reg(state, wid, 0.0, 0.0, max_workers=2).state
    with pytest.raises(m.Rejected) as exc:
        reg(state, "c", 0.0, 0.0, max_workers=2)
    assert exc.value.status == 409 and "max_workers=2" in exc.value.reason
    assert state.epoch == 2 and set(state.workers) == {"a", "b"}
    # a rejoin of a live worker is not a new worker: allowed when full
    assert reg(state, "a", 0.0, 0.0, max_workers=2).state.epoch == 3


def test_assign_ranks_keeps_survivors_where_possible() -> None:
    # rank 1 dies among 0..3: 0 and 2 keep their ranks, 3 moves into the hole
    assert m.assign_ranks({"a": 0, "c": 2, "d": 3}, ["a", "c", "d"]) == {"a": 0, "c": 2, "d": 1}
    # a newcomer fills the hole first when nobody has to move
    assert m.assign_ranks({"a": 0, "c": 2, "n": None}, ["a", "c", "n"]) == {"a": 0, "c": 2, "n": 1}
    # newcomers in id order after movers
    got = m.assign_ranks({"x": 5, "y": None, "b": None}, ["x", "y", "b"])
    assert got == {"x": 0, "b": 1, "y": 2}


def test_expire_is_strictly_after_the_timeout_and_bumps_once() -> None:
    state = join(cs.ClusterState(), "a", "b", "c", now=0.0)
    assert m.expire(state, TIMEOUT, 0.0, TIMEOUT) is None  # exactly at the deadline: still alive
    hb = m.heartbeat(state, "b", cs.Heartbeat(epoch=3), 1.5, 0.0)
    state.workers["b"] = hb.record  # type: ignore[index]
    d = m.expire(state, TIMEOUT + 0.01, 0.0, TIMEOUT)
    assert d is not None
    assert d.state.epoch == state.epoch + 1  # two deaths, one epoch
    assert [e.kind for e in d.events] == ["died", "died", "epoch"]
    assert {e.worker_id for e in d.events if e.kind == "died"} == {"a", "c"}
    assert "silent for 2.01 s" in d.events[0].reason
    assert ranks(d.state) == {"b": 0}
    assert d.state.workers["a"].status == "dead" and d.state.workers["a"].rank is None


def test_restart_grace_protects_live_workers_from_the_downtime() -> None:
    state = join(cs.ClusterState(), "a", "b", now=0.0)
    # the coordinator was down for 100 s; its clock restarted too
    d = m.restart(state, now=100.0, wall=2e9, grace=2.0)
    assert d.state.epoch == state.epoch and d.events[0].kind == "coordinator_restarted"
    assert m.expire(d.state, 100.0 + 2.0 + TIMEOUT, 0.0, TIMEOUT) is None
    late = m.expire(d.state, 100.0 + 2.0 + TIMEOUT + 0.01, 0.0, TIMEOUT)
    assert late is not None and len(late.state.alive()) == 0


def test_heartbeat_rejections() -> None:
    state = join(cs.ClusterState(), "a", "b")
    with pytest.raises(m.Rejected) as unknown:
        m.heartbeat(state, "zz", cs.Heartbeat(epoch=1), 0.0, 0.0)
    assert unknown.value.status == 404
    with pytest.raises(m.Rejected) as future:
        m.heartbeat(state, "a", cs.Heartbeat(epoch=99), 0.0, 0.0)
    assert future.value.status == 409
    dead = m.expire(state, 10.0, 0.0, TIMEOUT)
    assert dead is not None
    with pytest.raises(m.Rejected) as gone:
        m.heartbeat(dead.state, "a", cs.Heartbeat(epoch=dead.state.epoch), 10.0, 0.0)
    assert gone.value.status == 410


def test_leave_bumps_epoch_once_and_is_idempotent() -> None:
    state = join(cs.ClusterState(), "a", "b", "c")
    d = m.leave(state, "a", 0.0)
    assert d is not None and d.state.epoch == 4 and d.events[0].kind == "left"
    assert ranks(d.state) == {"b": 1, "c": 0}
    assert m.leave(d.state, "a", 0.0) is None
    with pytest.raises(m.Rejected):
        m.leave(state, "nobody", 0.0)
    out = m.heartbeat(d.state, "a", cs.Heartbeat(epoch=4), 0.0, 0.0)
    assert out.member is False
    assert m.heartbeat_action("training", out.member, 4, 4) == "stop"


def _beat(state: cs.ClusterState, wid: str, ws: cs.WorkerState, epoch: int | None = None) -> cs.ClusterState:
    out = m.heartbeat(
        state, wid, cs.Heartbeat(epoch=state.epoch if epoch is None else epoch, state=ws), 0.0, 0.0
    )
    workers = dict(state.workers)
    workers[wid] = out.record
    import dataclasses

    return m.note_progress(dataclasses.replace(state, workers=workers), out.record)


def test_cluster_phase_state_machine() -> None:
    state = join(cs.ClusterState(), "a", "b")
    assert m.cluster_phase(state) == "waiting"
    state = _beat(_beat(state, "a", "training"), "b", "training")
    assert m.cluster_phase(state) == "training"
    state = join(state, "c")  # epoch bump while training
    assert m.cluster_phase(state) == "reforming"
    assert m.heartbeat_action(m.cluster_phase(state), True, state.epoch - 1, state.epoch) == "reform"
    for wid in ("a", "b"):
        state = _beat(state, wid, "waiting")
    assert m.cluster_phase(state) == "reforming"  # nobody trains yet in the new epoch
    for wid in ("a", "b", "c"):
        state = _beat(state, wid, "training")
    assert m.cluster_phase(state) == "training"
    assert m.heartbeat_action("training", True, state.epoch, state.epoch) == "continue"
    state = _beat(state, "a", "finished")
    assert m.cluster_phase(state) == "training"  # others still training
    state = _beat(_beat(state, "b", "finished"), "c", "finished")
    assert m.cluster_phase(state) == "finished"
    assert m.heartbeat_action("finished", True, state.epoch, state.epoch) == "stop"


def test_cluster_phase_failed() -> None:
    state = join(cs.ClusterState(), "a", "b")
    state = _beat(_beat(state, "a", "training"), "b", "failed")
    assert m.cluster_phase(state) == "training"
    state = _beat(state, "a", "failed")
    assert m.cluster_phase(state) == "failed"
    assert m.heartbeat_action("failed", True, state.epoch, state.epoch) == "stop"


def test_a_coordinator_stall_pauses_expiry() -> None:
    state = join(cs.ClusterState(), "a", "b", now=0.0)
    # both last heard at 0; the coordinator was stalled for 3 s when it wakes at t=10
    paused = m.absorb_stall(state, now=10.0, stall=3.0, timeout=TIMEOUT)
    assert paused.epoch == state.epoch and paused.workers == state.workers
    assert m.expire(paused, 12.99, 0.0, TIMEOUT) is None
    assert m.expire(paused, 13.01, 0.0, TIMEOUT) is not None
    assert m.absorb_stall(paused, now=10.0, stall=0.5, timeout=TIMEOUT) is paused  # nothing new to grant
