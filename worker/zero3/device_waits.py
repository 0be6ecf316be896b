"""Gathers the engine waits for on the device, not the host (a lane that runs its collectives on device
streams: NCCL).

Such a gather's handle says how a stream waits for it (``order_after``); the compute stream then goes on
without the host having seen the gather end. Its outcome still matters: a gather that failed leaves its
unit's parameters unspecified, so whatever the pass computed from them must not be used. ``DeviceWaits``
keeps the outcomes of a pass's gathers (how many have not settled, the first error) without keeping their
results alive, since a gathered unit is freed as soon as it has been used, and ``settle`` reads them once,
at the end of the pass.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from typing import Any, Protocol, runtime_checkable

import torch

from communication.errors import Cancelled, CollectiveTimeout


@runtime_checkable
class DeviceOrdered(Protocol):
    """A call's handle that can make a device stream wait for it (``communication.handle.Handle``)."""

    def order_after(self, stream: Any, timeout: float) -> bool: ...


class DeviceWaits:
    """The outcomes of one pass's gathers awaited on the device (make a new one for every pass)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._pending = 0
        self._error: BaseException | None = None

    def watch(self, fut: Future[torch.Tensor]) -> None:
        """Keep `fut`'s outcome (not its result) until `settle`."""
        with self._cond:
            self._pending += 1
        fut.add_done_callback(self._settled)

    def _settled(self, fut: Future[torch.Tensor]) -> None:
        error = Cancelled("a gather was cancelled") if fut.cancelled() else fut.exception()
        with self._cond:
            self._pending -= 1
            if error is not None and self._error is None:
                self._error = error
            self._cond.notify_all()

    def settle(self, timeout: float) -> None:
        """Wait until every watched gather has settled (CollectiveTimeout after `timeout` s) and raise the
        first failure among them."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CollectiveTimeout(f"{self._pending} gather(s) awaited on the device did not settle")
                self._cond.wait(left)
            error, self._error = self._error, None
        if error is not None:
            raise error
