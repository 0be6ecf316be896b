"""The engine's ordered launcher: calls start on one thread in submission order, each after its fence."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import pytest
import torch

from communication.errors import Cancelled, CollectiveTimeout, PeerLost
from worker.zero3.launcher import OrderedLauncher

pytestmark = pytest.mark.timeout(30)


class _Gate:
    """A fence that passes once opened; ``asked`` is set once the launcher has started waiting for it."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.asked = threading.Event()

    def query(self) -> bool:
        self.asked.set()
        return self.open.is_set()

    def synchronize(self) -> None:
        self.open.wait()


def _done(value: float) -> Future[torch.Tensor]:
    fut: Future[torch.Tensor] = Future()
    fut.set_result(torch.tensor([value]))
    return fut


def test_calls_start_in_submission_order_each_after_its_fence() -> None:
    launcher = OrderedLauncher(timeout=10.0)
    gates = [_Gate() for _ in range(4)]
    started: list[tuple[int, bool]] = []

    def start(i: int) -> Future[torch.Tensor]:
        started.append((i, gates[i].query()))
        return _done(float(i))

    def start_plain() -> Future[torch.Tensor]:
        started.append((4, True))
        return _done(4.0)

    futures = [launcher.call(lambda i=i: start(i), gates[i]) for i in range(4)]
    futures.append(launcher.call(start_plain))  # no fence: still after every earlier call
    for gate in reversed(gates):  # the last copy lands first
        time.sleep(0.02)
        gate.open.set()
    assert [f.result(timeout=5).item() for f in futures] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert started == [(0, True), (1, True), (2, True), (3, True), (4, True)]
    assert launcher.fence_wait_s > 0.05  # it did wait for the copies
    launcher.close()


def test_a_fence_that_never_passes_fails_its_call_within_the_timeout() -> None:
    launcher = OrderedLauncher(timeout=0.3)
    started: list[str] = []
    stuck = launcher.call(lambda: started.append("stuck") or _done(0.0), _Gate())
    after = launcher.call(lambda: started.append("after") or _done(1.0))
    t0 = time.monotonic()
    with pytest.raises(CollectiveTimeout, match="device copy"):
        stuck.result(timeout=5)
    assert time.monotonic() - t0 < 2.0
    assert after.result(timeout=5).item() == 1.0 and started == ["after"]
    launcher.close()


def test_dropped_calls_never_start_and_fail_cancelled() -> None:
    launcher = OrderedLauncher(timeout=10.0)
    gate = _Gate()
    started: list[int] = []
    first = launcher.call(lambda: started.append(0) or _done(0.0), gate)
    assert gate.asked.wait(5)  # the launcher's thread is waiting for the first call's fence
    queued = [launcher.call(lambda i=i: started.append(i) or _done(float(i))) for i in (1, 2)]
    assert launcher.drop_queued("pass abandoned") == 2
    for fut in queued:
        with pytest.raises(Cancelled, match="pass abandoned"):
            fut.result(timeout=5)
    gate.open.set()
    assert first.result(timeout=5).item() == 0.0
    later = launcher.call(lambda: started.append(3) or _done(3.0))
    assert later.result(timeout=5).item() == 3.0
    assert started == [0, 3]
    launcher.close()


def test_errors_of_the_start_and_of_the_call_reach_the_caller() -> None:
    launcher = OrderedLauncher(timeout=10.0)

    def bad_start() -> Future[torch.Tensor]:
        raise ValueError("unit 7 is not in the plan")

    failing: Future[torch.Tensor] = Future()
    a = launcher.call(bad_start)
    b = launcher.call(lambda: failing)
    with pytest.raises(ValueError, match="unit 7"):
        a.result(timeout=5)
    time.sleep(0.05)
    assert not b.done()  # started, its call is still in flight
    failing.set_exception(PeerLost("peer 1 went away"))
    with pytest.raises(PeerLost, match="went away"):
        b.result(timeout=5)
    launcher.close()


def test_close_drops_what_is_queued_joins_the_thread_and_refuses_new_calls() -> None:
    launcher = OrderedLauncher(timeout=0.5)
    gate = _Gate()
    first = launcher.call(lambda: _done(0.0), gate)
    assert gate.asked.wait(5)
    queued = launcher.call(lambda: _done(1.0))
    thread = launcher._thread
    assert thread is not None and thread.is_alive()
    launcher.close()  # the first call's fence never passes: it times out, the thread ends
    with pytest.raises(Cancelled):
        queued.result(timeout=5)
    with pytest.raises(CollectiveTimeout):
        first.result(timeout=5)
    assert not thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        launcher.call(lambda: _done(2.0))
