"""The flight recorder (communication/recorder.py) over the in-process fake lane: every call recorded with
its sequence id in its epoch, op, step, unit or key, peers, bytes and final state; the oldest call in flight
as the head; a dump on a collective timeout with every thread's stack; a bounded ring."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from communication.errors import CollectiveTimeout
from communication.group import PeerGroup
from communication.handle import Handle
from communication.recorder import FlightRecorder, RecordedLane, bus_bandwidth, lane_label
from communication.testing import FakeHub

pytestmark = pytest.mark.timeout(30)


def eventually(predicate: Callable[[], bool], within_s: float = 5.0) -> None:
    """A handle's callbacks run after its waiters wake: give the recorder's a moment."""
    deadline = time.monotonic() + within_s
    while not predicate():
        assert time.monotonic() < deadline, "the recorder did not see the call settle"
        time.sleep(0.01)


ADDRESSES = ("127.0.0.1:1", "127.0.0.1:2")


def test_calls_are_recorded_in_order_with_their_outcome(tmp_path: Path) -> None:
    hub = FakeHub(2)
    recorders = [FlightRecorder(name=f"w{r}") for r in range(2)]
    lanes = [RecordedLane(hub.backend(r), recorders[r], "fake") for r in range(2)]
    groups = [PeerGroup("j", 3, r, ADDRESSES) for r in range(2)]

    def rank(r: int) -> None:
        lanes[r].set_group(groups[r])
        out = torch.empty(8)
        lanes[r].all_gather(groups[r], 5, 1, torch.full((4,), float(r)), out, 10.0).wait(10)
        lanes[r].exchange(torch.tensor([r], dtype=torch.int64), group=groups[r], key=7, timeout=10.0).wait(10)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    eventually(lambda: all(c["ended"] is not None for c in recorders[1].records()))
    calls = recorders[1].records()
    assert [(c["seq"], c["op"], c["epoch"], c["state"]) for c in calls] == [
        (0, "all_gather", 3, "completed"),
        (1, "exchange", 3, "completed"),
    ]
    gather = calls[0]
    assert (gather["step"], gather["unit"], gather["peers"], gather["bytes"], gather["lane"]) == (
        5,
        1,
        (0,),
        16,
        "fake",
    )
    assert calls[1]["key"] == 7 and calls[1]["ended"] >= calls[1]["started"] >= calls[1]["issued"]
    assert recorders[1].head() is None  # nothing in flight
    # the bus bytes of the gather by the ring count (a 16-byte shard over 2 ranks: 16 moved), over its time
    ((key, (nbytes, seconds, calls)),) = recorders[1].bus_totals().items()
    assert (key, nbytes, calls) == (("fake", "all_gather"), 16.0, 1) and seconds > 0
    assert bus_bandwidth({}, recorders[1].bus_totals()) == {"fake/all_gather": 16.0 / seconds}
    assert bus_bandwidth(recorders[1].bus_totals(), recorders[1].bus_totals()) == {}  # nothing new
    assert lane_label(hub.backend(0)) == "fake"


def test_a_timeout_is_dumped_with_the_stacks_and_the_head_names_the_wait(tmp_path: Path) -> None:
    hub = FakeHub(2)
    recorder = FlightRecorder(name="w0")
    recorder.dump_dir = tmp_path
    lane = RecordedLane(hub.backend(0), recorder, "fake")
    group = PeerGroup("j", 1, 0, ADDRESSES)
    lane.set_group(group)
    handle = lane.recv(torch.empty(3), group=group, src=1, key=9, timeout=0.3)  # nobody sends
    head = recorder.head()
    assert head is not None and (head["op"], head["peers"], head["key"]) == ("recv", (1,), 9)
    assert head["since_s"] >= 0
    with pytest.raises(CollectiveTimeout):
        handle.wait(5)
    eventually(lambda: bool(recorder.dumped))
    (call,) = recorder.records()
    assert call["state"] == "failed" and call["error"].startswith("CollectiveTimeout")
    (dumped,) = recorder.dumped
    dump = json.loads(dumped.read_text())
    assert dump["reason"].startswith("collective timeout: recv seq 0 of epoch 1")
    assert any("test_recorder.py" in s for s in dump["stacks"].values())  # this very thread, waiting
    # a second timeout in the same epoch is recorded but not dumped again
    with pytest.raises(CollectiveTimeout):
        lane.recv(torch.empty(3), group=group, src=1, key=10, timeout=0.1).wait(5)
    eventually(lambda: recorder.records()[-1]["state"] == "failed")
    assert len(recorder.dumped) == 1


def test_a_cancelled_call_and_a_bounded_ring() -> None:
    hub = FakeHub(2)
    recorder = FlightRecorder(capacity=3)
    lane = RecordedLane(hub.backend(0), recorder)
    group = PeerGroup("j", 1, 0, ADDRESSES)
    lane.set_group(group)
    handles = [lane.recv(torch.empty(1), group=group, src=1, key=k, timeout=10.0) for k in range(5)]
    assert [c["key"] for c in recorder.records()] == [2, 3, 4]  # the last 3 calls
    for h in handles:
        assert h.cancel()
    eventually(lambda: {c["state"] for c in recorder.records()} == {"cancelled"})
    with pytest.raises(ValueError):
        FlightRecorder(capacity=0)


class _Queueing:
    """A lane stand-in whose receive is handed back unstarted: the test starts and settles it."""

    def __init__(self) -> None:
        self.handle = Handle()

    def recv(self, out: torch.Tensor, *, group: PeerGroup, src: int, key: int, timeout: float) -> Handle:
        return self.handle


def test_a_call_is_queued_until_its_lane_starts_it() -> None:
    lane = _Queueing()
    recorder = FlightRecorder(name="w0")
    recorded = RecordedLane(lane, recorder, "stand-in")  # type: ignore[arg-type]
    group = PeerGroup("j", 2, 0, ADDRESSES)
    recorded.recv(torch.empty(2), group=group, src=1, key=4, timeout=5.0)
    head = recorder.head()
    assert head is not None and head["state"] == "queued" and head["started"] is None
    lane.handle.mark_started()
    (call,) = recorder.records()
    assert call["state"] == "started" and call["started"] >= call["issued"]
    lane.handle.mark_started()  # once only
    lane.handle.set_result(torch.zeros(2))
    eventually(lambda: recorder.records()[0]["state"] == "completed")
    assert recorder.head() is None
    # a call its lane settles before it is marked started keeps its final state
    late = Handle()
    lane.handle = late
    recorded.recv(torch.empty(2), group=group, src=1, key=5, timeout=5.0)
    late.set_exception(CollectiveTimeout("late"))
    late.mark_started()
    assert recorder.records()[-1]["state"] == "failed"
