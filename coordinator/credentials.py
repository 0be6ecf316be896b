"""Credentials of the control plane, as pure functions and small value types (no I/O, no clock).

- Operator tokens (cluster, read-only, admin) come from the settings; they are kept as sha256 digests and
  compared in constant time.
- Per-worker secrets: 32 random bytes issued at registration. Only their sha256 digest is kept (in memory
  and in SQLite); checking one costs one sha256 and one constant-time comparison.
- Per-epoch pair keys for the data plane: HMAC-SHA256 of the coordinator's master key over the job, the
  epoch and the two worker ids, so only those two workers (and the coordinator) can compute a pair's key.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass, field
from typing import Literal

SECRET_BYTES = 32
MASTER_KEY_BYTES = 32
WORKER_SECRET_HEADER = "X-Worker-Secret"

OperatorKind = Literal["cluster", "read", "admin"]
PrincipalKind = Literal["cluster", "read", "admin", "worker", "anyone"]


def new_secret() -> str:
    """A fresh worker secret: 32 random bytes, URL-safe base64 (43 characters)."""
    return secrets.token_urlsafe(SECRET_BYTES)


def new_master_key() -> bytes:
    return secrets.token_bytes(MASTER_KEY_BYTES)


def digest(secret: str) -> bytes:
    """What is stored of a secret or token: its sha256."""
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest()


def same_digest(a: bytes, b: bytes) -> bool:
    """Constant-time equality of two digests; an empty digest (no secret on record) matches nothing."""
    return bool(a) and bool(b) and hmac.compare_digest(a, b)


def pair_key(master: bytes, job_id: str, epoch: int, a: str, b: str) -> bytes:
    """The data-plane key of workers `a` and `b` in `epoch` of `job_id` (symmetric in a and b)."""
    if a == b:
        raise ValueError(f"a pair key needs two different workers, got {a!r} twice")
    lo, hi = sorted((a, b))
    message = f"zerowire-peer:{job_id}:{epoch}:{lo}:{hi}".encode()
    return hmac.digest(master, message, "sha256")


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request speaks for. `anyone`: authentication is disabled (--insecure-no-auth)."""

    kind: PrincipalKind
    worker_id: str | None = None
    proof: bytes = field(default=b"", repr=False)  # a worker's: the digest of the secret it presented

    def describe(self) -> str:
        return f"worker {self.worker_id}" if self.kind == "worker" else f"the {self.kind} token"


ANYONE = Principal("anyone")


class OperatorTokens:
    """The configured operator tokens, held as digests. An unset token matches nothing."""

    def __init__(self, cluster: str | None, read: str | None, admin: str | None) -> None:
        given: tuple[tuple[OperatorKind, str | None], ...] = (
            ("cluster", cluster),
            ("read", read),
            ("admin", admin),
        )
        self._digests = tuple((kind, digest(value)) for kind, value in given if value)

    def match(self, presented_digest: bytes) -> OperatorKind | None:
        """Which token `presented_digest` is the digest of (every configured token is compared)."""
        found: OperatorKind | None = None
        for kind, expected in self._digests:
            if hmac.compare_digest(presented_digest, expected):
                found = kind
        return found

    def configured(self, kind: OperatorKind) -> bool:
        return any(k == kind for k, _ in self._digests)
