"""The dispatcher of the torch.distributed lane (communication/torchdist.py for the lane): one thread per
backend that forms each epoch's group and runs the queued calls in call order, and that abandons a group at
its first failure (every call of it fails with that error) and keeps it aside until the library's own work
on it has ended.

On the host (gloo) the dispatcher waits for each call against its deadline before it starts the next one.
On a GPU (NCCL) it only issues: the call goes out from the lane's stream after the caller's mark, its
device-side finishing is queued behind it, an event is recorded, and the deadline watcher
(communication/nccl_watch.py) takes it from there; the next call is issued at once. A failed NCCL group is
failed through the watcher, which aborts its communicator once.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import torch

from communication.cuda_streams import LaneStreams
from communication.errors import CollectiveTimeout, CommError, EpochChanged, PeerLost
from communication.handle import Handle
from communication.nccl_watch import NcclWatch
from communication.torchdist_calls import CallEnd, QueuedCall
from communication.torchdist_group import POLL_S, EpochGroup, settle

log = logging.getLogger(__name__)


def _spent(eg: EpochGroup, end: CallEnd) -> tuple[Any, Callable[[], torch.Tensor]]:
    raise AssertionError("a call is launched once")


class _OnDevice:
    """A call issued on a GPU as the watcher sees it: the event after it, and the library's work (which
    reports a failure the library found, such as a peer that closed its connection)."""

    def __init__(self, streams: LaneStreams, token: int, work: Any) -> None:
        self._streams = streams
        self._token = token
        self._work = work

    def passed(self) -> bool:
        return self._streams.passed(self._token)

    def error(self) -> BaseException | None:
        try:
            if not self._work.is_completed():
                return None
            found = self._work.exception()
        except RuntimeError as exc:  # the library raising is its report
            return exc
        if found is None or isinstance(found, BaseException):
            return found
        return RuntimeError(str(found))


class TorchDistDispatcher:
    """Mixed into TorchDistBackend, whose queue and state it runs."""

    rendezvous_timeout: float
    collective_timeout: float
    _lock: threading.Lock
    _pending: dict[EpochGroup, set[Handle]]
    _aside: list[EpochGroup]
    _jobs: queue.SimpleQueue[EpochGroup | QueuedCall | None]
    _sent: int
    _received: int
    _cuda: torch.device | None
    _streams: LaneStreams | None
    _watch: NcclWatch
    _buffers: Any

    def _dispatch(self) -> None:
        try:
            while True:
                job = self._jobs.get()
                if job is None:
                    return
                if isinstance(job, EpochGroup):
                    self._form(job)
                else:
                    self._run(job)
                self._reap_aside()
                if self._streams is not None:
                    self._streams.collect()  # the events this thread made whose calls settled
        finally:
            if self._streams is not None:
                self._streams.collect()

    def _form(self, eg: EpochGroup) -> None:
        if self._cuda is not None:
            torch.cuda.set_device(self._cuda)  # this thread issues on the lane's GPU
        try:
            eg.form(self.rendezvous_timeout, self.collective_timeout)
        except CommError as exc:
            self._fail_group(eg, exc)
            return
        except RuntimeError as exc:  # the library's own rendezvous errors
            self._fail_group(eg, PeerLost(f"{eg.group.describe()}: group formation failed: {exc}"))
            return
        if eg.abandoned.is_set() or eg.failed is not None:  # dropped while it formed: end it now
            self._fail_group(eg, eg.failed or EpochChanged(f"{eg.group.describe()}: a newer epoch is known"))

    def _on_device(self, eg: EpochGroup) -> bool:
        return eg.backend_name == "nccl" and self._streams is not None

    def _run(self, call: QueuedCall) -> None:
        try:
            self._run_call(call)
        finally:
            if call.mark is not None and self._streams is not None:
                self._streams.retire(call.mark)  # a call never issued leaves its mark unused
                call.mark = None

    def _run_call(self, call: QueuedCall) -> None:
        eg, fut = call.eg, call.future
        if fut.done() or (call.ready is not None and not self._await_input(call)):
            return
        with self._lock:
            if fut.done():  # withdrawn meanwhile
                return
            call.started = True
        fut.mark_started()  # handed to the library, in call order
        if self._on_device(eg):
            self._issue(call)
            return
        end = CallEnd(self._buffers)
        try:
            eg.check_live()
            work, finish = call.launch(eg, end)
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

    def _issue(self, call: QueuedCall) -> None:
        """Issue `call` on the lane's GPU stream and hand it to the watcher (module doc)."""
        eg, fut, streams = call.eg, call.future, self._streams
        assert streams is not None
        end = CallEnd(self._buffers, streams.host_copy)
        try:
            eg.check_live()
            with streams.issuing(call.kind, call.mark):
                call.mark = None  # waited on and retired
                work, finish = call.launch(eg, end)
                work.wait()  # the lane's stream waits for the library's; the host does not
                result = finish()  # device-side finishing, queued behind the collective
                token = streams.record_done(call.kind)
        except CommError as exc:
            self._finish(eg, fut, error=exc)
            return
        except RuntimeError as exc:  # the library refused the call: the group cannot be trusted
            self._fail_group(eg, PeerLost(f"{eg.group.describe()}: {exc}"))
            return
        call.launch = _spent
        fut.on_device(functools.partial(streams.order, token))
        settle_call = functools.partial(self._settle_issued, call, work, end, result, token)
        self._watch.watch(eg, _OnDevice(streams, token, work), call.deadline, settle_call, "collective")

    def _settle_issued(
        self,
        call: QueuedCall,
        work: Any,
        end: CallEnd,
        result: torch.Tensor,
        token: int,
        error: CommError | None,
    ) -> None:
        """The watcher's verdict on an issued call: run what waited for it and resolve, or fail (the
        group is failed already; its work is kept until the library lets go of it)."""
        eg, streams = call.eg, self._streams
        assert streams is not None
        if error is None:
            try:
                end.run()  # host copies of the results, buffers back to the pool
            except RuntimeError as exc:  # the device failed under the call: so does the group, with it
                self._fail_group(eg, PeerLost(f"{eg.group.describe()}: {exc}"), work)
                streams.retire(token)
                return
        if error is None:
            with self._lock:
                self._sent += call.sent
                self._received += call.received
            self._finish(eg, call.future, result=result)
        else:
            with self._lock:
                eg.kept.append(work)
            self._finish(eg, call.future, error=error)
        streams.retire(token)

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
        """The group cannot be used again: fail its calls, and those queued after them, with `error`; on a
        GPU its communicator is aborted (once, by the watcher)."""
        on_device = self._on_device(eg)
        if on_device:
            # marks it failed (the first error stands), fails its calls in flight, aborts it once
            self._watch.fail(eg, error)
            error = eg.failed or error
        else:
            log.warning("%s", error)
        with self._lock:
            if not on_device:
                eg.failed = error
            pending = self._pending.get(eg, set())
            futures = list(pending)
            pending.clear()
        for fut in futures:
            settle(fut, error=error)
        if on_device:
            with self._lock:
                if work is not None:
                    eg.kept.append(work)
            self._park(eg)
        else:
            self._set_aside(eg, work)

    def _set_aside(self, eg: EpochGroup, work: Any) -> None:
        eg.release()
        with self._lock:
            if work is not None:
                eg.kept.append(work)
        self._park(eg)

    def _park(self, eg: EpochGroup) -> None:
        """Keep an ended group referenced until its library work ends (destroying a group with work in
        flight may abort the process)."""
        with self._lock:
            if eg not in self._aside:
                self._aside.append(eg)

    def _reap_aside(self) -> None:
        with self._lock:
            self._aside = [eg for eg in self._aside if not eg.idle()]
