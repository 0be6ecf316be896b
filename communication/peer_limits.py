"""Per-peer bounds on the wire server's calls: how many streams one sender may have in flight per method
(excess: ResourceExhausted), and how many calls may wait, not yet authenticated, for an epoch this rank
has not installed (their keys are not known before it is). All used on the backend's event loop.

The sender is the rank a call names, after its MAC was checked when the installed group has keys; so
one peer's streams never count against another's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from communication.errors import ResourceExhausted

STREAMS_PER_PEER = 8
PRE_AUTH_WAITS = 64


class StreamLimits:
    def __init__(self, per_peer: int = STREAMS_PER_PEER, pre_auth: int = PRE_AUTH_WAITS) -> None:
        if per_peer < 1 or pre_auth < 1:
            raise ValueError(f"stream limits must be >= 1, got {per_peer} per peer and {pre_auth} waiting")
        self.per_peer = per_peer
        self.pre_auth = pre_auth
        self._open: dict[tuple[str, int], int] = {}
        self._waiting = 0

    def open(self, method: str, sender: int) -> int:
        """Streams of `method` from `sender` in flight now."""
        return self._open.get((method, sender), 0)

    @contextmanager
    def slot(self, method: str, sender: int, limit: int | None = None) -> Iterator[None]:
        """Hold one of `sender`'s `limit` (default: per_peer) streams of `method` while inside."""
        limit = self.per_peer if limit is None else limit
        key = (method, sender)
        held = self._open.get(key, 0)
        if held >= limit:
            raise ResourceExhausted(
                f"rank {sender} already has {held} {method} streams in flight (limit {limit})"
            )
        self._open[key] = held + 1
        try:
            yield
        finally:
            left = self._open[key] - 1
            if left:
                self._open[key] = left
            else:
                del self._open[key]

    @contextmanager
    def waiting(self) -> Iterator[None]:
        """Hold one of the `pre_auth` places of calls waiting for an epoch to be installed."""
        if self._waiting >= self.pre_auth:
            raise ResourceExhausted(
                f"{self._waiting} calls already wait for a newer epoch (limit {self.pre_auth})"
            )
        self._waiting += 1
        try:
            yield
        finally:
            self._waiting -= 1
