"""Control values survive the INT8 block codec bit for bit when encoded by worker.zero3.exact."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from communication.compression import codec_id_for, get_codec
from worker.zero3 import exact

floats = st.floats(width=32, allow_nan=True, allow_infinity=True)


def through_int8(t: torch.Tensor, block: int) -> torch.Tensor:
    codec = get_codec(codec_id_for("int8"))
    payload = torch.empty(codec.payload_bytes(t.numel(), torch.float32, block), dtype=torch.uint8)
    codec.encode_into(t, block, payload)
    out = torch.empty_like(t)
    codec.decode_into(payload, block, out)
    return out


@settings(max_examples=60, deadline=None)
@given(values=st.lists(floats, min_size=1, max_size=400), block=st.sampled_from([16, 17, 64, 1024]))
def test_round_trip_through_int8_is_bit_exact(values: list[float], block: int) -> None:
    v = torch.tensor(values, dtype=torch.float32)
    enc = exact.encode(v, block)
    assert enc.numel() == exact.encoded_numel(v.numel(), block)
    back = exact.decode(through_int8(enc, block), v.numel(), block)
    assert torch.equal(back.view(torch.int32), v.view(torch.int32))


def test_plain_quantization_would_not_be_exact() -> None:
    v = torch.tensor([1234.5, 3.0, 0.1])
    assert not torch.equal(through_int8(v, 16), v)


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        exact.encoded_numel(3, 1)
    with pytest.raises(ValueError):
        exact.decode(torch.zeros(7), 3, 16)
