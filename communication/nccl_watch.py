"""The deadline watcher of the NCCL lane: every collective in flight, observed until it completes on the
device, fails, or runs past its deadline.

ProcessGroupNCCL completes a work's future as soon as the collective is enqueued, so nothing the library
hands back says when the device is done. The lane therefore records an event after each collective, on the
stream that waits for it, and hands the watcher that event (a `Completion`) with the call's deadline. One
thread polls every call in flight:

- the event passed and the library reports no error: the call succeeded (`settle(None)`);
- the library reports an error for the call (a peer closed its connection): the group fails with
  PeerLost;
- the deadline passed first: the group fails with CollectiveTimeout.

Failing a group (`fail`, also called by the lane on an epoch change, with EpochChanged) marks it errored
first, then settles every call of it in flight with that error, and only then aborts its communicator, once,
on a thread of its own: so code woken by the abort (a kernel that stops spinning, a stream that moves on)
finds the error already set, the caller hears within the deadline whatever the abort costs, and a
communicator whose abort is slow holds up neither the watcher nor the next epoch's group. A group fails
once: the first error stands, later ones only settle calls that arrived meanwhile.

Both the event and the abort are plugged in (`Completion`, `Watched`), so the logic runs without CUDA
against stand-ins (tests/unit/communication/test_nccl_watch.py). The watcher never destroys an event:
settled calls hand their events back to their owner (`settle` is the lane's), which destroys them on the
thread that made them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from communication.errors import CollectiveTimeout, CommError, PeerLost

log = logging.getLogger(__name__)

POLL_S = 0.0005  # between two looks at the calls in flight
ABORT_JOIN_S = 5.0  # how long close() waits for aborts still running


class Completion(Protocol):
    """A call in flight as the device sees it (an event recorded after the collective, and its work)."""

    def passed(self) -> bool:
        """The device has passed the end of the call (true also once an abort ended it)."""
        ...

    def error(self) -> BaseException | None:
        """What the library reports against the call (a peer that closed its connection), if anything."""
        ...


class Watched(Protocol):
    """One epoch's group as the watcher sees it: an error that sticks, and a communicator to abort."""

    def describe(self) -> str: ...

    @property
    def failed(self) -> CommError | None: ...

    def mark_failed(self, error: CommError) -> bool:
        """Set the group's error unless it has one; True when this call set it."""
        ...

    def abort(self) -> None:
        """Abort the group's communicator (called once, after `mark_failed`)."""
        ...


Settle = Callable[[CommError | None], None]


@dataclass(eq=False)
class _InFlight:
    group: Watched
    completion: Completion
    deadline: float
    settle: Settle
    what: str


class NcclWatch:
    """Watches the calls in flight of a lane's groups against their deadlines; one thread, started on the
    first call."""

    def __init__(self, *, poll_s: float = POLL_S, name: str = "nccl-watch") -> None:
        self._poll_s = poll_s
        self._name = name
        self._cond = threading.Condition()
        self._calls: list[_InFlight] = []
        self._thread: threading.Thread | None = None
        self._aborts: list[threading.Thread] = []
        self._closed = False

    @property
    def in_flight(self) -> int:
        with self._cond:
            return len(self._calls)

    def watch(
        self, group: Watched, completion: Completion, deadline: float, settle: Settle, what: str
    ) -> None:
        """Observe one call of `group` until `completion` passed (`settle(None)`), the group failed
        (`settle(error)`), or `deadline` (time.monotonic()) passed (the group fails with
        CollectiveTimeout). `settle` is called exactly once, on the watcher's thread or the one that
        failed the group."""
        call = _InFlight(group, completion, deadline, settle, what)
        with self._cond:
            if self._closed:
                raise RuntimeError("the watcher is closed")
            failed = group.failed
            if failed is None:
                self._calls.append(call)
                if self._thread is None:
                    self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                    self._thread.start()
                self._cond.notify()
        if failed is not None:
            _call(settle, failed)

    def fail(self, group: Watched, error: CommError) -> bool:
        """`group` cannot be used again: mark it errored with `error` (unless it failed already: its first
        error stands), settle its calls in flight with its error, and abort its communicator once (on a
        thread of its own). True when this call failed the group."""
        first = group.mark_failed(error)
        error = group.failed or error
        with self._cond:
            mine = [c for c in self._calls if c.group is group]
            self._calls = [c for c in self._calls if c.group is not group]
        for call in mine:
            _call(call.settle, error)
        if first:
            log.warning("%s", error)
            aborter = threading.Thread(target=_abort, args=(group,), name=f"{self._name}-abort", daemon=True)
            with self._cond:
                self._aborts = [t for t in self._aborts if t.is_alive()]
                self._aborts.append(aborter)
            aborter.start()
        return first

    def close(self) -> None:
        """Stop the thread (the calls still in flight are left to their groups' owners, which fail them
        first) and wait a little for aborts still running."""
        with self._cond:
            self._closed = True
            thread, aborts = self._thread, list(self._aborts)
            self._cond.notify()
        if thread is not None:
            thread.join(5.0)
        deadline = time.monotonic() + ABORT_JOIN_S
        for t in aborts:
            t.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in aborts):
            log.warning("closing while an abort of a communicator still runs; left to the process exit")

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._calls and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                calls = list(self._calls)
            self._look(calls, time.monotonic())
            time.sleep(self._poll_s)

    def _look(self, calls: list[_InFlight], now: float) -> None:
        for call in calls:
            group = call.group
            if group.failed is not None:
                self._drop(call, group.failed)
                continue
            error = call.completion.error()
            if error is not None:
                self.fail(group, PeerLost(f"{group.describe()}: {call.what}: {error}"))
            elif call.completion.passed():
                error = call.completion.error()  # an abort by the library also lets the event pass
                if error is not None:
                    self.fail(group, PeerLost(f"{group.describe()}: {call.what}: {error}"))
                else:
                    self._drop(call, group.failed)
            elif now > call.deadline:
                self.fail(group, CollectiveTimeout(f"{group.describe()}: {call.what} timed out"))

    def _drop(self, call: _InFlight, error: CommError | None) -> None:
        with self._cond:
            if call not in self._calls:
                return  # settled by a concurrent fail()
            self._calls.remove(call)
        _call(call.settle, error)


def _call(settle: Settle, error: CommError | None) -> None:
    try:
        settle(error)
    except Exception:  # a settle callback must not stop the watcher
        log.exception("settling a call failed")


def _abort(group: Watched) -> None:
    try:
        group.abort()
    except Exception as exc:  # the library's own failure to abort: the group is failed already
        log.warning("%s: abort: %s", group.describe(), exc)
