"""Token buckets for registrations: one per client address and one for the whole coordinator.

Every registration bumps the membership epoch (every worker re-forms), so a flood of them, even with the
cluster token, stalls training. A bucket holds at most `burst` tokens and refills at `rate` per second; a
request takes one token from its address's bucket and one from the global bucket, or is refused with the
seconds until both could serve it (the answer's Retry-After). Time comes from the caller (monotonic
seconds), so tests drive it with a fake clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MAX_ADDRESSES = 4096  # buckets remembered; full ones are forgotten first (a full bucket is a fresh one)


@dataclass(slots=True)
class Bucket:
    tokens: float
    updated: float

    def refill(self, now: float, rate: float, burst: int) -> None:
        self.tokens = min(float(burst), self.tokens + max(0.0, now - self.updated) * rate)
        self.updated = now

    def wait_s(self, rate: float) -> float:
        """Seconds until one token is available (0 when there is one now)."""
        return 0.0 if self.tokens >= 1.0 else (1.0 - self.tokens) / rate


class RegistrationLimiter:
    """`rate` <= 0 disables a level (per address or global)."""

    def __init__(self, rate: float, burst: int, global_rate: float, global_burst: int) -> None:
        self.rate, self.burst = rate, burst
        self.global_rate, self.global_burst = global_rate, global_burst
        self._global = Bucket(float(global_burst), float("-inf"))
        self._addresses: dict[str, Bucket] = {}

    def admit(self, address: str, now: float) -> float:
        """Take a token for `address` and return 0, or take nothing and return the seconds to wait."""
        waits = []
        bucket: Bucket | None = None
        if self.rate > 0:
            bucket = self._addresses.get(address)
            if bucket is None:
                self._forget_full(now)
                bucket = self._addresses[address] = Bucket(float(self.burst), now)
            bucket.refill(now, self.rate, self.burst)
            waits.append(bucket.wait_s(self.rate))
        if self.global_rate > 0:
            self._global.refill(now, self.global_rate, self.global_burst)
            waits.append(self._global.wait_s(self.global_rate))
        wait = max(waits, default=0.0)
        if wait > 0:
            return wait
        if bucket is not None:
            bucket.tokens -= 1.0
        if self.global_rate > 0:
            self._global.tokens -= 1.0
        return 0.0

    def _forget_full(self, now: float) -> None:
        if len(self._addresses) < MAX_ADDRESSES:
            return
        for address, b in list(self._addresses.items()):
            b.refill(now, self.rate, self.burst)
            if b.tokens >= self.burst:
                del self._addresses[address]
        while len(self._addresses) >= MAX_ADDRESSES:  # all busy: forget the oldest (insertion order)
            del self._addresses[next(iter(self._addresses))]


def retry_after(wait_s: float) -> str:
    """A Retry-After header value: whole seconds, at least 1."""
    return str(max(1, math.ceil(wait_s)))
