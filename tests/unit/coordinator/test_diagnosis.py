"""The diagnosis of a job held up (coordinator/diagnosis.py), from workers' views as /cluster/status shows
them: a frozen member, a stuck trainer, a member in another collective, a partition, and a healthy job."""

from __future__ import annotations

from typing import Any

from coordinator.diagnosis import diagnose

INTERVAL = 0.5


def view(wid: str, rank: int, *, age: float = 0.1, waiting: dict[str, Any] | None = None,
         stack: str | None = None) -> dict[str, Any]:  # fmt: skip
    return {"worker_id": wid, "rank": rank, "state": "alive", "last_heartbeat_age_s": age,
            "host_id": f"h{rank}", "host": "127.0.0.1", "waiting": waiting, "stack": stack}  # fmt: skip


def gather(
    rank: int, world: int, since: float, unit: int = 7, step: int = 1234, op: str = "all_gather"
) -> dict[str, Any]:
    return {"op": op, "lane": "GrpcBackend", "epoch": 3, "step": step, "unit": unit, "key": None,
            "peers": [r for r in range(world) if r != rank], "since_s": since}  # fmt: skip


def test_a_frozen_member_is_named_with_its_heartbeat_age() -> None:
    found = diagnose(
        [
            view("w0", 0, waiting=gather(0, 3, 5.9)),
            view("w1", 1, age=6.3),
            view("w2", 2, waiting=gather(2, 3, 6.0)),
        ],
        INTERVAL,
        3,
    )
    (suspect,) = found["suspects"]
    assert (suspect["worker_id"], suspect["rank"], suspect["host"]) == ("w1", 1, "h1")
    assert suspect["reason"].startswith("frozen: its last heartbeat was 6.3 s ago")
    assert found["summary"] == (
        "w0 and w2 have waited 6.1 s in all_gather unit 7 of step 1234 (epoch 3, GrpcBackend) for rank 1 "
        "(w1 on host h1), whose last heartbeat was 6.3 s ago"
    )
    assert {(w["worker_id"], tuple(w["waiting_on_ranks"])) for w in found["waiting"]} == {
        ("w0", (1, 2)),
        ("w2", (0, 1)),
    }


def test_a_stuck_trainer_is_named_with_its_stack() -> None:
    stack = (
        '  File "train.py", line 10, in run\n    loss.backward()\n'
        '  File "hook.py", line 3, in step\n    lock.acquire()\n'
        '  File "/usr/lib/python3.11/threading.py", line 320, in wait\n    waiter.acquire()\n'
    )
    # a member whose heartbeat shows neither a wait nor a stack yet (it is between reports) is no suspect
    assert diagnose([view("w0", 0, waiting=gather(0, 2, 2.0)), view("w1", 1)], INTERVAL, 3)["suspects"] == []
    found = diagnose([view("w0", 0, waiting=gather(0, 2, 2.0)), view("w1", 1, stack=stack)], INTERVAL, 3)
    (suspect,) = found["suspects"]
    assert suspect["worker_id"] == "w1" and suspect["reason"].startswith("stuck trainer")
    assert suspect["reason"].endswith("its training is at hook.py:3 in step: lock.acquire()"), suspect
    assert "whose heartbeat is fresh" in found["summary"]


def test_a_member_in_another_collective_is_named_with_both_ops() -> None:
    found = diagnose(
        [
            view("w0", 0, waiting=gather(0, 3, 3.0)),
            view("w1", 1, waiting=gather(1, 3, 3.0)),
            view("w2", 2, waiting=gather(2, 3, 2.5, unit=3, step=1233, op="reduce_scatter")),
        ],
        INTERVAL,
        3,
    )
    (suspect,) = found["suspects"]
    assert suspect["worker_id"] == "w2"
    assert (
        "reduce_scatter unit 3 of step 1233" in suspect["reason"] and "all_gather unit 7" in suspect["reason"]
    )


def test_a_member_in_an_exchange_while_the_others_gather_is_in_another_collective() -> None:
    """The sequences diverged on a call that names no step: one member waits in an exchange (a vote, a
    barrier) while most wait in a step's gather; the member the majority waits on is named, with both ops."""
    vote = {"op": "exchange", "lane": "GrpcBackend", "epoch": 3, "step": None, "unit": None, "key": 41,
            "peers": [0, 1], "since_s": 2.0}  # fmt: skip
    found = diagnose(
        [view("w0", 0, waiting=gather(0, 3, 2.2)), view("w1", 1, waiting=gather(1, 3, 2.1)),
         view("w2", 2, waiting=vote)],
        INTERVAL,
        3,
    )  # fmt: skip
    (suspect,) = found["suspects"]
    assert suspect["worker_id"] == "w2", found
    assert "exchange key 41" in suspect["reason"] and "all_gather unit 7 of step 1234" in suspect["reason"]
    assert "w2 on host h2), which is in exchange key 41" in found["summary"]


def test_a_partition_names_both_sides_only_after_a_long_wait() -> None:
    short = diagnose(
        [view("w0", 0, waiting=gather(0, 2, 1.0)), view("w1", 1, waiting=gather(1, 2, 1.0))], INTERVAL, 3
    )
    assert short["suspects"] == [] and short["summary"].startswith("no member holds the job up")
    found = diagnose(
        [view("w0", 0, waiting=gather(0, 2, 4.0)), view("w1", 1, waiting=gather(1, 2, 4.0))], INTERVAL, 3
    )
    assert [s["worker_id"] for s in found["suspects"]] == ["w0", "w1"]
    assert all(s["reason"].startswith("partition") for s in found["suspects"])
    assert "partitioned" in found["summary"]
    # caught on either side of a step's boundary: one in the step's vote, the other still in its gathers
    vote = {"op": "exchange", "lane": "grpc", "epoch": 3, "step": None, "unit": None, "key": 41, "peers": [1],
            "since_s": 4.0}  # fmt: skip
    split = diagnose([view("w0", 0, waiting=vote), view("w1", 1, waiting=gather(1, 2, 4.0))], INTERVAL, 3)
    assert [s["worker_id"] for s in split["suspects"]] == ["w0", "w1"]
    assert all(
        s["reason"].startswith("partition: every member waits on each other") for s in split["suspects"]
    )


def test_ranks_running_ahead_within_a_step_are_no_suspects() -> None:
    """Gathers and reductions of one step run ahead unit by unit: waits on different units or ops of the
    same step are one place; a wait reported in an older epoch (its ranks were other ranks) is left out."""
    found = diagnose(
        [
            view("w0", 0, waiting=gather(0, 3, 2.0, unit=2)),
            view("w1", 1, waiting=gather(1, 3, 2.0, unit=4)),
            view("w2", 2, waiting=gather(2, 3, 2.0, unit=5, op="reduce_scatter")),
        ],
        INTERVAL,
        3,
    )
    assert found["suspects"] == []
    old = diagnose([view("w0", 0, waiting=gather(0, 2, 9.0)), view("w1", 1, age=9.0)], INTERVAL, 4)
    assert old["suspects"] == [] and old["waiting"] == []


def test_a_healthy_job_and_members_outside_the_epoch() -> None:
    dead = {**view("w9", 5, age=30.0), "state": "dead"}
    found = diagnose([view("w0", 0), view("w1", 1), dead], INTERVAL, 3)
    assert found == {"suspects": [], "waiting": [], "summary": "no member is waiting on another"}
