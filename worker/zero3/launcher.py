"""Collective calls started off the compute thread, in the order the engine made them, each once the device
copy of its input has landed.

A unit on an accelerator whose lane takes host memory (gRPC) sends its gradient from a pinned host buffer.
The copy into that buffer is enqueued on the compute stream without waiting for it, so the compute thread
goes on queueing the next unit's backward while the device finishes this one. Someone still has to wait
for the copy before the lane reads the buffer: the launcher's thread does, by polling the copy's fence,
then makes the call.

Lanes that run collectives in call order on every rank (torch.distributed inside a host of a hierarchy)
must see the engine's calls in the engine's order. So while a launcher is in use the engine routes all of
a pass's calls through it (gathers too, with no fence): one thread, first in first out, never reordered.

Nothing here can hang: a fence that has not passed within the timeout fails its call with
CollectiveTimeout (and every call queued behind it in turn, if their fences hang too); `drop_queued`
fails calls not started yet (an abandoned pass); `close` does that and joins the thread.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import torch

from communication.errors import Cancelled, CollectiveTimeout
from worker.zero3.staging import Fence

logger = logging.getLogger(__name__)

_POLL_S = 0.0002  # between queries of a fence that has not passed
Start = Callable[[], "Future[torch.Tensor]"]


class OrderedLauncher:
    """Starts calls on one thread, in submission order, each once its fence (if any) has passed."""

    def __init__(self, timeout: float, name: str = "zerowire-launcher") -> None:
        self.timeout = timeout
        self._name = name
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[tuple[Start, Fence | None, Future[torch.Tensor]] | None] = (
            queue.SimpleQueue()
        )
        self._queued: set[Future[torch.Tensor]] = set()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.fence_wait_s = 0.0  # time the launcher spent waiting on fences (its thread, not the compute's)

    def call(self, start: Start, fence: Fence | None = None) -> Future[torch.Tensor]:
        """A future of what ``start()`` returns, called on the launcher's thread once ``fence`` has passed
        and every earlier call has been started."""
        outer: Future[torch.Tensor] = Future()
        outer.set_running_or_notify_cancel()
        with self._lock:
            if self._closed:
                raise RuntimeError("the launcher is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()
            self._queued.add(outer)
            self._queue.put((start, fence, outer))
        return outer

    def drop_queued(self, why: str) -> int:
        """Fail every call not started yet with Cancelled (they are never started); how many."""
        with self._lock:
            dropped, self._queued = list(self._queued), set()
        for fut in dropped:
            _settle_error(fut, Cancelled(f"{why}: a call queued for launch was dropped"))
        return len(dropped)

    def close(self) -> None:
        """Drop what is queued and stop the thread (waits for the call being started, if any)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        self.drop_queued("launcher closed")
        self._queue.put(None)
        if thread is not None:
            thread.join(self.timeout + 5.0)

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            start, fence, outer = item
            with self._lock:
                if outer not in self._queued:
                    continue  # dropped before its turn
                self._queued.discard(outer)
            try:
                if fence is not None:
                    self._wait_fence(fence)
                inner = start()
            except BaseException as exc:  # handed to the caller through its future
                _settle_error(outer, exc)
                continue
            inner.add_done_callback(functools.partial(_chain, outer=outer))

    def _wait_fence(self, fence: Fence) -> None:
        t0 = time.perf_counter()
        deadline = t0 + self.timeout
        try:
            while not fence.query():
                if time.perf_counter() > deadline:
                    raise CollectiveTimeout(f"a device copy did not complete within {self.timeout} s")
                time.sleep(_POLL_S)
        finally:
            self.fence_wait_s += time.perf_counter() - t0


def _chain(inner: Future[torch.Tensor], outer: Future[torch.Tensor]) -> None:
    exc = Cancelled("the started call was cancelled") if inner.cancelled() else inner.exception()
    if exc is not None:
        _settle_error(outer, exc)
    elif not outer.done():
        outer.set_result(inner.result())


def _settle_error(fut: Future[torch.Tensor], exc: BaseException) -> None:
    if not fut.done():
        try:
            fut.set_exception(exc)
        except Exception:  # settled concurrently: the first outcome stands
            logger.debug("future already settled")
