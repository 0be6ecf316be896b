"""The in-flight calls of the gRPC lane, registered under their epoch: a newer epoch (or closing the
backend) cancels every older call at once, and its handle fails with EpochChanged (CommError when the
backend is closing); the caller's `Handle.cancel()` cancels one call, which then fails with Cancelled.
A cancelled call's task unwinds its streams and reservations (the coroutines free them on the way out).
Runs on the backend's event loop, except `count`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from communication.errors import CommError, EpochChanged
from communication.group import PeerGroup
from communication.handle import Handle

log = logging.getLogger(__name__)


class EpochTasks:
    def __init__(self, current_epoch: Callable[[], int]) -> None:
        self._epoch = current_epoch  # the highest epoch the backend knows
        self._tasks: dict[int, set[asyncio.Task[Any]]] = {}

    def launch(
        self,
        group: PeerGroup,
        make: Callable[[], Coroutine[Any, Any, Any]],
        result: Handle,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        """Run `make()` as a task of `group`'s epoch; settle `result` with its outcome."""
        if group.epoch < self._epoch():
            result.set_exception(EpochChanged(f"{group.describe()}: epoch is now {self._epoch()}"))
            return
        task = asyncio.ensure_future(make())
        result.mark_started()  # on the loop: its streams open from here on
        tasks = self._tasks.setdefault(group.epoch, set())
        tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            tasks.discard(t)
            if t.cancelled() and result.cancel_requested:
                result.fail_cancelled(group.describe())
            elif t.cancelled():
                now = self._epoch()
                result.set_exception(
                    EpochChanged(f"{group.describe()}: cancelled, epoch is now {now}")
                    if now > group.epoch
                    else CommError(f"{group.describe()}: cancelled (backend closing)")
                )
            elif (exc := t.exception()) is not None:
                result.set_exception(exc)
            else:
                result.set_result(t.result())

        task.add_done_callback(done)

        def cancel() -> bool:
            if task.done():
                return False
            loop.call_soon_threadsafe(task.cancel)
            return True

        result.bind(cancel)

    def cancel_older(self, epoch: int) -> None:
        for old in [e for e in self._tasks if e < epoch]:
            tasks = self._tasks.pop(old)
            if tasks:
                log.info("epoch %d: cancelling %d in-flight collectives of epoch %d", epoch, len(tasks), old)
            for task in tasks:
                task.cancel()

    async def cancel_all(self) -> None:
        tasks = [t for ts in self._tasks.values() for t in ts]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def count(self) -> int:
        return sum(len(tasks) for tasks in list(self._tasks.values()))
