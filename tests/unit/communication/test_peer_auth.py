"""The data-plane MAC: what it covers, and the server's verdict in every case."""

from __future__ import annotations

import pytest
import torch

from communication import peer_auth
from communication.errors import Unauthenticated
from communication.group import PeerGroup
from communication.servicer import FETCH_METHOD, PUSH_METHOD
from communication.tensor_stream import Key, make_header
from protos import zerowire_pb2 as pb

K01, K02 = b"\x01" * 32, b"\x02" * 32


def group(rank: int, keys: dict[int, bytes]) -> PeerGroup:
    return PeerGroup("job", 3, rank, ("a:1", "b:1", "c:1"), peer_keys=keys)


def header() -> pb.TensorHeader:
    x = torch.arange(8, dtype=torch.float32)
    return make_header(Key("job", 3, 7, 2, 0), 1, torch.float32, 8, pb.CODEC_NONE, 0, x.view(torch.uint8))


# every field of the header and a value it could be changed to
CHANGES: dict[str, object] = {
    "job_id": "jo",
    "epoch": 4,
    "step": 8,
    "unit": 3,
    "shard": 2,
    "sender": 2,
    "dtype": pb.DTYPE_FLOAT16,
    "numel": 9,
    "shape": [2, 4],
    "codec": pb.CODEC_INT8,
    "block_size": 64,
    "payload_bytes": 31,
    "checksum": 12345,
    "offset": 1,
    "length": 31,
}


def test_the_push_message_covers_every_header_field() -> None:
    assert set(CHANGES) == {f.name for f in pb.TensorHeader.DESCRIPTOR.fields}
    base = peer_auth.push_message(header())
    assert peer_auth.push_message(header()) == base  # canonical: the same header, the same bytes
    for name, value in CHANGES.items():
        h = header()
        if name == "shape":
            del h.shape[:]
            h.shape.extend(value)  # type: ignore[arg-type]
        else:
            setattr(h, name, value)
        assert peer_auth.push_message(h) != base, name
    # the job id is length-prefixed: moving bytes between it and the next field changes the message
    a, b = header(), header()
    a.job_id, b.job_id = "job", "jo"
    assert peer_auth.push_message(a) != peer_auth.push_message(b)


def test_macs_bind_key_method_and_message() -> None:
    m = peer_auth.push_message(header())
    mac = peer_auth.mac(K01, PUSH_METHOD, m)
    assert len(bytes.fromhex(mac)) == 32
    assert mac != peer_auth.mac(K02, PUSH_METHOD, m)
    assert mac != peer_auth.mac(K01, FETCH_METHOD, m)
    assert mac != peer_auth.mac(K01, PUSH_METHOD, m + b"\0")


def test_the_receiver_accepts_exactly_the_mac_of_the_named_sender() -> None:
    receiver = group(0, {1: K01, 2: K02})
    sender1 = group(1, {0: K01, 2: b"\x12" * 32})
    raw = pb.FetchRequest(job_id="job", epoch=3, step=1, unit=0, shard=0, sender=1).SerializeToString()
    ((key, value),) = peer_auth.mac_metadata(sender1, 0, FETCH_METHOD, raw)
    presented = peer_auth.presented_mac([("authorization", "Bearer t"), (key, value)])
    peer_auth.verify(receiver, 1, FETCH_METHOD, raw, presented)  # genuine
    bad = {
        "claims rank 2": (2, raw, presented),
        "another request": (1, raw + b"\x08\x01", presented),
        "no MAC": (1, raw, b""),
        "garbage": (1, raw, b"00" * 32),
        "not a member": (5, raw, presented),
        "itself": (0, raw, presented),
    }
    for what, (sender, message, mac) in bad.items():
        with pytest.raises(Unauthenticated):
            peer_auth.verify(receiver, sender, FETCH_METHOD, message, mac)
            pytest.fail(f"accepted: {what}")


def test_without_keys_only_the_cluster_token_counts() -> None:
    keyless = group(0, {})
    peer_auth.verify(keyless, 1, PUSH_METHOD, b"anything", b"")
    assert peer_auth.mac_metadata(keyless, 1, PUSH_METHOD, b"anything") == ()
    with pytest.raises(Unauthenticated, match="no data-plane key for rank 2"):
        peer_auth.mac_metadata(group(0, {1: K01}), 2, PUSH_METHOD, b"anything")
    assert peer_auth.presented_mac(None) == b""
