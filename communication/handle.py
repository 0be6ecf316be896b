"""Handle: a call in flight that can be waited on or cancelled.

A Handle is a concurrent Future (the engine keeps using `result`, `done`, `add_done_callback`) with three
additions: `wait(timeout)` raises CollectiveTimeout rather than the executor's TimeoutError;
`cancel()` withdraws the call from its backend, which releases what the call reserved (a receive
buffer, a held message, a stream) and then fails the handle with Cancelled (`cancel()` returns False
when the call is already done or can no longer be withdrawn: its backend says which calls can); and
`mark_started()`, which the backend calls when the call leaves its queue and starts moving data, so that a
watcher (`on_start`) can tell a call queued behind others from one in progress.

A lane that runs a call on a device stream (NCCL) also says how a consumer's stream waits for it there
(`on_device`): `order_after(stream, timeout)` then makes the consumer's stream wait on the device, without
the host waiting for the call (only, briefly, for the lane to have issued it). The handle itself still
settles once the call's completion was observed (its error, if any, is read later, with `wait`). On a
lane without device streams `order_after` waits on the host for the result.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import torch

from communication.errors import Cancelled, CollectiveTimeout


class Handle(Future[torch.Tensor]):
    def __init__(self) -> None:
        super().__init__()
        self.set_running_or_notify_cancel()
        self._guard = threading.Lock()
        self._canceller: Callable[[], bool] | None = None
        self.cancel_requested = False
        self._started = False
        self._on_start: list[Callable[[], None]] = []
        self._device_order: Callable[[Any], None] | None = None
        self._issued = threading.Event()  # issued on a device stream, or settled

    def set_result(self, result: torch.Tensor) -> None:
        super().set_result(result)
        self._issued.set()

    def set_exception(self, exception: BaseException | None) -> None:
        super().set_exception(exception)
        self._issued.set()

    def wait(self, timeout: float | None = None) -> torch.Tensor:
        """The call's result (its output tensor), or its error; CollectiveTimeout after `timeout` s."""
        try:
            return self.result(timeout)
        except FutureTimeout:
            raise CollectiveTimeout(f"the call did not complete within {timeout} s") from None

    def mark_started(self) -> None:
        """The backend started the call (once; later calls do nothing): run the `on_start` callbacks."""
        with self._guard:
            if self._started:
                return
            self._started = True
            callbacks, self._on_start = self._on_start, []
        for fn in callbacks:
            fn()

    def on_start(self, fn: Callable[[], None]) -> None:
        """Call `fn()` once the backend started the call (at once if it has)."""
        with self._guard:
            if not self._started:
                self._on_start.append(fn)
                return
        fn()

    def on_device(self, order: Callable[[Any], None]) -> None:
        """Called by a lane that issued the call on a device stream: ``order(stream)`` makes ``stream``
        wait, on the device, for the call's end."""
        with self._guard:
            self._device_order = order
        self._issued.set()

    def order_after(self, stream: Any, timeout: float) -> bool:
        """Make ``stream`` wait for the call's result: on the device where the lane ran the call on a device
        stream (True; the host waits only until the call was issued), else on the host (False: the result
        is there). Raises the call's error if it has failed already, CollectiveTimeout when the call was
        neither issued nor settled within ``timeout`` s."""
        if not self._issued.wait(timeout):
            raise CollectiveTimeout(f"the call was not issued within {timeout} s")
        with self._guard:
            order = self._device_order
        if order is None:
            self.result()  # settled: its result, or its error
            return False
        if self.done():
            self.result()  # settled: its device work has completed, or it failed
            return True
        order(stream)
        return True

    def bind(self, canceller: Callable[[], bool]) -> None:
        """Called by the backend once the call can be withdrawn: `canceller()` withdraws it (True) or
        says it cannot be any more (False). A cancel asked for before runs now."""
        with self._guard:
            self._canceller = canceller
            asked = self.cancel_requested
        if asked:
            canceller()

    def cancel(self) -> bool:
        if self.done():
            return False
        with self._guard:
            self.cancel_requested = True
            canceller = self._canceller
        if canceller is None or canceller():  # not bound yet: withdrawn as soon as it is
            return True
        with self._guard:
            self.cancel_requested = False
        return False

    def fail_cancelled(self, what: str) -> None:
        """Settle the handle as cancelled (by the backend, after releasing what the call held)."""
        if not self.done():
            self.set_exception(Cancelled(f"{what}: cancelled by the caller"))
