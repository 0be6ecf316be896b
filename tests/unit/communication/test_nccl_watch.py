"""The deadline watcher of the NCCL lane (communication/nccl_watch.py) against stand-ins for the event and
the communicator: a call that never completes fails with CollectiveTimeout within its deadline and its
group is aborted exactly once, after its error was set; a failure the library reports is PeerLost; a call
that completes settles clean; every call of a failed group fails with the group's first error."""

from __future__ import annotations

import threading
import time

import pytest

from communication.errors import CollectiveTimeout, CommError, EpochChanged, PeerLost
from communication.nccl_watch import NcclWatch
from tests.unit.communication.nccl_standins import Never, StandInGroup, Switch

pytestmark = pytest.mark.timeout(30)
SLACK_S = 0.5  # the watcher polls every half millisecond; a loaded shared CPU may delay it this much


class Outcome:
    """Records a call's settle(error): once, with the time it came."""

    def __init__(self) -> None:
        self.errors: list[CommError | None] = []
        self.at: float | None = None
        self.done = threading.Event()

    def __call__(self, error: CommError | None) -> None:
        self.errors.append(error)
        self.at = time.monotonic()
        self.done.set()


def _wait_aborts(group: StandInGroup, n: int) -> None:
    deadline = time.monotonic() + 5
    while len(group.aborts) < n and time.monotonic() < deadline:
        time.sleep(0.005)


def test_a_call_that_never_completes_times_out_within_its_deadline_and_aborts_once() -> None:
    watch = NcclWatch()
    group = StandInGroup()
    outcomes = [Outcome(), Outcome()]
    try:
        t0 = time.monotonic()
        watch.watch(group, Never(), t0 + 0.3, outcomes[0], "all_gather of unit 0")
        watch.watch(group, Never(), t0 + 5.0, outcomes[1], "reduce_scatter of unit 0")  # behind it
        assert outcomes[0].done.wait(5) and outcomes[1].done.wait(5)
        _wait_aborts(group, 1)
        time.sleep(0.05)  # a second abort would come now
    finally:
        watch.close()
    first = outcomes[0].errors
    assert len(first) == 1 and isinstance(first[0], CollectiveTimeout), first
    assert outcomes[0].at is not None and 0.3 <= outcomes[0].at - t0 < 0.3 + SLACK_S
    # the call queued behind it fails at once with the group's error, not at its own deadline
    assert outcomes[1].errors == first and outcomes[1].at is not None and outcomes[1].at - t0 < 0.3 + SLACK_S
    assert len(group.aborts) == 1, group.aborts
    assert group.aborts[0] is first[0], "the group is marked errored before its communicator is aborted"
    assert watch.in_flight == 0


def test_a_completed_call_settles_clean_and_nothing_is_aborted() -> None:
    watch = NcclWatch()
    group = StandInGroup()
    switch, outcome = Switch(), Outcome()
    try:
        watch.watch(group, switch, time.monotonic() + 10, outcome, "all_gather")
        time.sleep(0.05)
        assert not outcome.done.is_set(), "settled before the device passed the event"
        switch.done.set()
        assert outcome.done.wait(5)
    finally:
        watch.close()
    assert outcome.errors == [None] and group.aborts == [] and group.failed is None


def test_a_failure_the_library_reports_is_peer_lost_and_aborts_once() -> None:
    watch = NcclWatch()
    group = StandInGroup()
    switches, outcomes = [Switch(), Switch()], [Outcome(), Outcome()]
    try:
        for s, o in zip(switches, outcomes, strict=True):
            watch.watch(group, s, time.monotonic() + 10, o, "collective")
        switches[1].failure = RuntimeError("NCCL error: remote process exited or there was a network error")
        assert outcomes[0].done.wait(5) and outcomes[1].done.wait(5)
        _wait_aborts(group, 1)
    finally:
        watch.close()
    assert all(isinstance(o.errors[0], PeerLost) for o in outcomes)
    assert "remote process exited" in str(outcomes[1].errors[0])
    assert len(group.aborts) == 1


def test_an_event_passed_by_an_abort_of_the_library_is_no_success() -> None:
    """The library's watchdog may abort a communicator itself: its kernels end, the event passes. The
    work's error decides."""
    watch = NcclWatch()
    group = StandInGroup()
    switch, outcome = Switch(), Outcome()
    switch.done.set()
    switch.failure = RuntimeError("NCCL communicator was aborted")
    try:
        watch.watch(group, switch, time.monotonic() + 10, outcome, "collective")
        assert outcome.done.wait(5)
    finally:
        watch.close()
    assert isinstance(outcome.errors[0], PeerLost)


def test_failing_a_group_settles_its_calls_with_its_first_error_and_aborts_once() -> None:
    watch = NcclWatch()
    group, other = StandInGroup("old"), StandInGroup("new")
    outcomes = [Outcome() for _ in range(3)]
    try:
        watch.watch(group, Never(), time.monotonic() + 10, outcomes[0], "a")
        watch.watch(group, Never(), time.monotonic() + 10, outcomes[1], "b")
        watch.watch(other, Never(), time.monotonic() + 10, outcomes[2], "c")
        first = EpochChanged("old: epoch is now 3")
        assert watch.fail(group, first) is True
        assert watch.fail(group, PeerLost("later")) is False  # the first error stands
        _wait_aborts(group, 1)
        time.sleep(0.05)
        late = Outcome()
        watch.watch(group, Never(), time.monotonic() + 10, late, "d")  # a call of a failed group
        assert late.errors == [first]
        assert not outcomes[2].done.is_set() and other.aborts == []  # another group is untouched
    finally:
        watch.close()
    assert outcomes[0].errors == [first] and outcomes[1].errors == [first]
    assert group.aborts == [first]


def test_a_slow_abort_holds_up_neither_the_caller_nor_other_groups() -> None:
    class SlowAbort(StandInGroup):
        def abort(self) -> None:
            time.sleep(1.0)
            super().abort()

    watch = NcclWatch()
    slow, fast = SlowAbort("slow"), StandInGroup("fast")
    a, b = Outcome(), Outcome()
    try:
        t0 = time.monotonic()
        watch.watch(slow, Never(), t0 + 0.1, a, "x")
        watch.watch(fast, Never(), t0 + 0.3, b, "y")
        assert a.done.wait(5) and b.done.wait(5)
        assert a.at is not None and a.at - t0 < 0.1 + SLACK_S
        assert b.at is not None and b.at - t0 < 0.3 + SLACK_S  # timed out while the slow abort ran
    finally:
        watch.close()
    assert len(slow.aborts) == 1 and len(fast.aborts) == 1
