"""Domain errors of the wire. Each maps to one gRPC status code at the service boundary."""

from __future__ import annotations


class CommError(Exception):
    """Base class of every error raised by the communication layer. ``peer``: the address of the peer a
    failed call was talking to, where one is known (evidence for the coordinator, never acted on here)."""

    peer: str | None = None


class EpochChanged(CommError):
    """The membership epoch moved on; in-flight collectives of the old epoch are cancelled."""


class PeerLost(CommError):
    """A peer stopped answering (connection refused, reset, or unavailable)."""


class CollectiveTimeout(CommError):
    """A collective did not complete within its timeout."""


class StaleMessage(CommError):
    """A message of an old epoch or step (FAILED_PRECONDITION)."""


class InvalidMessage(CommError):
    """A malformed message: wrong shape, dtype, length, checksum, codec, sender or non-finite values
    (INVALID_ARGUMENT)."""


class DuplicateContribution(InvalidMessage):
    """A second contribution from the same sender for the same key (never added twice)."""


class ResourceExhausted(CommError):
    """A bound was hit: too many pending steps, oversized chunk, too many chunks (RESOURCE_EXHAUSTED)."""


class Unauthenticated(CommError):
    """A call without the cluster token (UNAUTHENTICATED)."""


class Cancelled(CommError):
    """The caller cancelled the call (Handle.cancel); what it reserved is released."""
