"""Codecs: exhaustiveness over the proto enum, int8 error bounds, edge sizes, non-finite input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from communication import compression
from communication.compression import ErrorFeedback, Int8Codec, NoneCodec, encode, get_codec, num_blocks
from communication.errors import InvalidMessage
from protos import zerowire_pb2 as pb

INT8 = Int8Codec()


def roundtrip(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    payload = encode(x, pb.CODEC_INT8, block)
    out = torch.empty_like(x)
    INT8.decode_into(payload, block, out)
    return payload, out


def block_bound(x: torch.Tensor, block: int) -> torch.Tensor:
    """Per element: half a quantization step of its block, plus float rounding slack."""
    n = x.numel()
    pad = torch.zeros(num_blocks(n, block) * block)
    pad[:n] = x.abs()
    absmax = pad.view(-1, block).amax(dim=1)
    return (absmax / 127 * 0.5 * (1 + 1e-5) + 1e-12).repeat_interleave(block)[:n]


def test_every_codec_enum_value_has_a_codec() -> None:
    values = [v.number for v in pb.Codec.DESCRIPTOR.values if v.number != pb.CODEC_UNSPECIFIED]
    assert sorted(compression.CODECS) == sorted(values)


def test_exhaustiveness_check_fails_on_a_missing_codec(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compression, "CODECS", {pb.CODEC_NONE: NoneCodec()})
    with pytest.raises(RuntimeError, match="CODEC_INT8"):
        compression._check_exhaustive()


def test_unknown_codec_and_name_rejected() -> None:
    with pytest.raises(InvalidMessage):
        get_codec(pb.CODEC_UNSPECIFIED)
    with pytest.raises(ValueError):
        compression.codec_id_for("fp8")


@pytest.mark.parametrize("block", [256, 1024])
@pytest.mark.parametrize("numel", [1, 5, 1023, 1024, 1025, 3 * 1024 + 7, 100_003])
def test_int8_gaussian_error_bound(numel: int, block: int) -> None:
    x = torch.randn(numel, generator=torch.Generator().manual_seed(numel))
    payload, out = roundtrip(x, block)
    assert payload.numel() == 4 * num_blocks(numel, block) + numel
    assert bool(((out - x).abs() <= block_bound(x, block)).all())
    if numel >= block:
        assert float((out - x).norm() / x.norm()) < 0.01


def test_int8_on_real_convnet_gradients() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))
    nn.functional.cross_entropy(net(x), y, reduction="sum").backward()
    grad = torch.cat([p.grad.reshape(-1) for p in net.parameters() if p.grad is not None])
    payload, out = roundtrip(grad, 256)
    assert bool(((out - grad).abs() <= block_bound(grad, 256)).all())
    assert float((out - grad).norm() / grad.norm()) < 0.02
    assert payload.numel() <= 0.26 * grad.numel() * 4


def test_zero_tensor_roundtrips_exactly() -> None:
    x = torch.zeros(5000)
    payload, out = roundtrip(x, 1024)
    assert torch.equal(out, x)
    assert torch.equal(payload[: 4 * 5].view(torch.float32), torch.zeros(5))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_rejected(bad: float) -> None:
    x = torch.randn(3000)
    x[2999] = bad  # in the ragged tail block
    with pytest.raises(InvalidMessage, match="non-finite"):
        encode(x, pb.CODEC_INT8, 1024)
    y = torch.randn(3000)
    y[5] = bad
    with pytest.raises(InvalidMessage, match="non-finite"):
        encode(y, pb.CODEC_INT8, 1024)


def test_decode_rejects_bad_scales_and_lengths() -> None:
    payload = encode(torch.randn(100), pb.CODEC_INT8, 64)
    payload[:4].view(torch.float32)[0] = float("nan")
    with pytest.raises(InvalidMessage, match="non-finite"):
        INT8.decode_into(payload, 64, torch.empty(100))
    with pytest.raises(InvalidMessage, match="payload"):
        INT8.decode_into(payload[:-1], 64, torch.empty(100))
    with pytest.raises(InvalidMessage, match="block size"):
        INT8.decode_into(payload, 0, torch.empty(100))


def test_none_codec_roundtrips_every_dtype() -> None:
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.randn(77).to(dtype)
        payload = encode(x, pb.CODEC_NONE, 0)
        out = torch.empty_like(x)
        NoneCodec().decode_into(payload, 0, out)
        assert torch.equal(out, x)


def test_error_feedback_keeps_the_running_sum_close() -> None:
    ef = ErrorFeedback(pb.CODEC_INT8, 128)
    gen = torch.Generator().manual_seed(1)
    sent = torch.zeros(1000)
    got = torch.zeros(1000)
    for _ in range(50):
        x = torch.randn(1000, generator=gen) * 1e-3 + 0.01
        out = torch.empty(1000)
        INT8.decode_into(ef.encode(3, 1, x), 128, out)
        sent += x
        got += out
    # what was delivered differs from what was sent by the last residual only (half a step)
    assert float((got - sent).abs().max()) < 0.02 / 127
    ef.reset()
