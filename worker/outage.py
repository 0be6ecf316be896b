"""Riding out a coordinator outage. A worker that cannot reach the coordinator is fenced (it commits
nothing) but does not give up: its heartbeat and its barrier calls are retried, with backoff, until the
coordinator answers again (a coordinator restarted on the same state file finds its workers where they
were; a worker it no longer knows registers again) or until the barrier timeout passes. Only then does the
worker end, with the training-failed exit code (CoordinatorLost).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from worker.coordinator_client import CoordinatorUnreachable

log = logging.getLogger(__name__)
T = TypeVar("T")


class CoordinatorLost(Exception):
    """The coordinator stayed unreachable for longer than the barrier timeout."""


def backoff_s(misses: int, base_s: float, cap_s: float) -> float:
    """The wait before the next try after `misses` failed ones in a row: doubling from `base_s` up to
    `cap_s`, with jitter (so a fleet of workers does not return as one herd)."""
    return min(cap_s, base_s * 2.0 ** min(misses, 30)) * random.uniform(0.5, 1.0)


async def through_outage(
    call: Callable[[], Awaitable[T]], *, deadline: float, what: str, cap_s: float = 2.0
) -> T:
    """`await call()`, tried again with backoff while the coordinator is unreachable; CoordinatorLost once
    `deadline` (monotonic) has passed without an answer."""
    misses = 0
    since = time.monotonic()
    while True:
        try:
            return await call()
        except CoordinatorUnreachable as exc:
            now = time.monotonic()
            if now >= deadline:
                raise CoordinatorLost(
                    f"{what}: the coordinator stayed unreachable for {now - since:.0f} s, until the barrier "
                    f"timeout: {exc}"
                ) from exc
            if misses == 0:
                log.warning("%s: coordinator unreachable (%s); retrying until it answers", what, exc)
            misses += 1
            await asyncio.sleep(min(backoff_s(misses, 0.25, cap_s), max(0.0, deadline - now)))
