"""Rank-bound credentials of the data plane: a MAC per call, keyed by the pair of ranks that talk.

The coordinator hands every member of an epoch one 32-byte key per other member (`PeerGroup.peer_keys`,
the same key on both sides of a pair). A call carries in its metadata HMAC-SHA256(pair key, canonical
bytes of the request), so the receiver knows the call comes from the rank it names: a member holding the
cluster token cannot speak for another rank, and nothing it signed can be reused in another epoch (the
keys change) or in the other direction (sender and owner are in the signed bytes).

- FetchShard: the serialized FetchRequest exactly as sent (the servicer receives the raw bytes).
- PushGradient and SendTensor: a canonical encoding of the header, which arrives with the first chunk;
  the client sends the MAC at call start and the server checks it before anything is reserved (the
  method path is in the MAC, so a push is no message and a message no push).

The MAC covers the payload's CRC-32, not the payload: against an attacker on the path, the payload's
integrity comes from TLS. When the installed group has no keys (no coordinator handed any out), only
the cluster token is checked.
"""

from __future__ import annotations

import hmac
import struct
from collections.abc import Iterable
from hashlib import sha256

from communication.errors import Unauthenticated
from communication.group import PeerGroup
from protos import zerowire_pb2 as pb

MAC_METADATA_KEY = "zerowire-mac"
_DOMAIN = b"zerowire-peer-mac-v1"

Metadata = tuple[tuple[str, str], ...]


def _text(value: str) -> bytes:
    raw = value.encode()
    return struct.pack(">I", len(raw)) + raw


def _uints(values: Iterable[int]) -> bytes:
    return b"".join(struct.pack(">Q", v) for v in values)


def push_message(h: pb.TensorHeader) -> bytes:
    """The canonical bytes of a gradient push: every field of its header, in a fixed order."""
    fixed = (h.epoch, h.step, h.unit, h.shard, h.sender, h.dtype, h.numel)
    rest = (h.codec, h.block_size, h.payload_bytes, h.checksum, h.offset, h.length)
    return b"".join((_text(h.job_id), _uints(fixed), _uints((len(h.shape),)), _uints(h.shape), _uints(rest)))


def mac(key: bytes, method: str, message: bytes) -> str:
    """HMAC-SHA256 of `message` for `method` (the gRPC method path), hex."""
    return hmac.new(key, _DOMAIN + _text(method) + message, sha256).hexdigest()


def mac_metadata(group: PeerGroup, peer: int, method: str, message: bytes) -> Metadata:
    """The metadata entry proving this rank sent `message` to `peer`; none when the group has no keys."""
    if not group.peer_keys:
        return ()
    key = group.peer_keys.get(peer)
    if key is None:
        raise Unauthenticated(f"{group.describe()}: no data-plane key for rank {peer}")
    return ((MAC_METADATA_KEY, mac(key, method, message)),)


def presented_mac(metadata: Iterable[tuple[str, str | bytes]] | None) -> bytes:
    """The MAC a call presents in its metadata (empty when it has none)."""
    for key, value in metadata or ():
        if key == MAC_METADATA_KEY:
            return value.encode() if isinstance(value, str) else value
    return b""


def verify(group: PeerGroup, sender: int, method: str, message: bytes, presented: bytes) -> None:
    """Raise Unauthenticated unless `presented` is the MAC of `message` under the key of `sender`.

    `group` is the receiver's installed group: a group without keys accepts every call (cluster token only).
    """
    if not group.peer_keys:
        return
    key = group.peer_keys.get(sender)
    if key is None:
        raise Unauthenticated(f"no data-plane key for rank {sender} in {group.describe()}")
    if not presented:
        raise Unauthenticated(f"{method} claiming rank {sender} carries no {MAC_METADATA_KEY}")
    if not hmac.compare_digest(presented, mac(key, method, message).encode()):
        raise Unauthenticated(f"{method} claiming rank {sender}: wrong {MAC_METADATA_KEY}")
