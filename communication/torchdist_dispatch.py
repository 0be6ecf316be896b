"""The dispatcher of the torch.distributed lane (communication/torchdist.py for the lane): one thread per
backend that forms each epoch's group and runs the queued calls in call order, each against its deadline,
and that abandons a group at its first failure (every call of it fails with that error) and keeps it
aside until the library's own work on it has ended.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import torch

from communication.errors import CollectiveTimeout, CommError, PeerLost
from communication.handle import Handle
from communication.torchdist_calls import QueuedCall
from communication.torchdist_group import POLL_S, EpochGroup, settle

log = logging.getLogger(__name__)


def _spent(eg: EpochGroup) -> tuple[Any, Callable[[], torch.Tensor]]:
    raise AssertionError("a call is launched once")


class TorchDistDispatcher:
    """Mixed into TorchDistBackend, whose queue and state it runs."""

    rendezvous_timeout: float
    collective_timeout: float
    _lock: threading.Lock
    _pending: dict[EpochGroup, set[Handle]]
    _aside: list[tuple[EpochGroup, list[Any]]]
    _jobs: queue.SimpleQueue[EpochGroup | QueuedCall | None]
    _sent: int
    _received: int

    def _dispatch(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if isinstance(job, EpochGroup):
                self._form(job)
            else:
                self._run(job)
            self._reap_aside()

    def _form(self, eg: EpochGroup) -> None:
        try:
            eg.form(self.rendezvous_timeout, self.collective_timeout)
        except CommError as exc:
            self._fail_group(eg, exc)
        except RuntimeError as exc:  # the library's own rendezvous errors
            self._fail_group(eg, PeerLost(f"{eg.group.describe()}: group formation failed: {exc}"))

    def _run(self, call: QueuedCall) -> None:
        eg, fut = call.eg, call.future
        if fut.done() or (call.ready is not None and not self._await_input(call)):
            return
        with self._lock:
            if fut.done():  # withdrawn meanwhile
                return
            call.started = True
        fut.mark_started()  # handed to the library, in call order
        try:
            eg.check_live()
            work, finish = call.launch(eg)
        except CommError as exc:
            self._finish(eg, fut, error=exc)
            return
        except RuntimeError as exc:
            self._fail_group(eg, PeerLost(f"{eg.group.describe()}: {exc}"))
            return
        done = threading.Event()
        work.get_future().add_done_callback(lambda _: done.set())
        while not done.wait(POLL_S):
            if eg.abandoned.is_set():
                self._set_aside(eg, work)
                return
            if time.monotonic() > call.deadline:
                self._fail_group(eg, CollectiveTimeout(f"{eg.group.describe()}: collective timed out"), work)
                return
        try:
            work.wait()
            result = finish()
        except RuntimeError as exc:  # a peer closed its connection or the library gave up
            self._fail_group(eg, PeerLost(f"{eg.group.describe()}: {exc}"))
            return
        with self._lock:
            self._sent += call.sent
            self._received += call.received
        # Let go of the call's tensors before the caller learns it is done, so that the caller's thread
        # frees them (the tensors it passed in place are its own allocations).
        del work, finish
        call.launch = _spent
        self._finish(eg, fut, result=result)

    def _await_input(self, call: QueuedCall) -> bool:
        """Wait for a deferred input like for a collective (epoch, deadline); False when it failed."""
        eg, ready = call.eg, call.ready
        assert ready is not None
        done = threading.Event()
        ready.add_done_callback(lambda _: done.set())
        while not done.wait(POLL_S):
            if eg.abandoned.is_set():
                return False  # its calls already failed with EpochChanged
            if time.monotonic() > call.deadline:
                self._fail_group(eg, CollectiveTimeout(f"{eg.group.describe()}: input not ready in time"))
                return False
        exc = ready.exception()
        if exc is not None:
            error = exc if isinstance(exc, CommError) else CommError(f"{eg.group.describe()}: {exc}")
            self._fail_group(eg, error)
        return exc is None

    def _finish(
        self,
        eg: EpochGroup,
        fut: Future[torch.Tensor],
        *,
        result: torch.Tensor | None = None,
        error: BaseException | None = None,
    ) -> None:
        with self._lock:
            self._pending.get(eg, set()).discard(fut)
        settle(fut, result=result, error=error)

    def _fail_group(self, eg: EpochGroup, error: CommError, work: Any = None) -> None:
        """The group cannot be used again: fail its calls, and those queued after them, with `error`."""
        log.warning("%s", error)
        with self._lock:
            eg.failed = error
            pending = self._pending.get(eg, set())
            futures = list(pending)
            pending.clear()
        for fut in futures:
            settle(fut, error=error)
        self._set_aside(eg, work)

    def _set_aside(self, eg: EpochGroup, work: Any) -> None:
        eg.release()
        self._aside.append((eg, [work] if work is not None else []))

    def _reap_aside(self) -> None:
        self._aside = [(eg, works) for eg, works in self._aside if not all(w.is_completed() for w in works)]
