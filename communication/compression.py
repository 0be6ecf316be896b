"""Codecs for tensors on the wire, keyed by the `Codec` proto enum.

A codec turns a flat float tensor into payload bytes and back. Every value of the enum (but
CODEC_UNSPECIFIED) must have a codec: this is checked when the module is imported.

INT8 is block absmax: the flat tensor is cut into blocks of `block` values; each block stores one
float32 scale (absmax / 127) and `block` int8 values round(x / scale). The payload is the scales
followed by the int8 values (a ragged last block is shorter). Reduction always happens after
decoding, in float32. `ErrorFeedback` keeps, per (unit, destination), what quantization lost and adds
it to the next value sent there.

The kernels are vectorised torch ops over preallocated work buffers (a fresh large allocation costs
several times a pass over existing memory), one pass per op, with no Python loop over blocks.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Protocol

import torch

from communication.errors import InvalidMessage
from protos import zerowire_pb2 as pb

DEFAULT_INT8_BLOCK = 1024
MAX_INT8_BLOCK = 1 << 20


class Codec(Protocol):
    def payload_bytes(self, numel: int, dtype: torch.dtype, block: int) -> int: ...

    def encode_into(self, x: torch.Tensor, block: int, payload: torch.Tensor) -> None:
        """Encode flat `x` into the uint8 tensor `payload` (exactly payload_bytes long)."""
        ...

    def decode_into(self, payload: torch.Tensor, block: int, out: torch.Tensor) -> None:
        """Decode the uint8 tensor `payload` into flat `out` (its dtype and numel)."""
        ...


class _Workspace(threading.local):
    """Per-thread float32 scratch buffer, grown on demand and reused."""

    def __init__(self) -> None:
        self.buf = torch.empty(0, dtype=torch.float32)

    def get(self, numel: int) -> torch.Tensor:
        if self.buf.numel() < numel:
            self.buf = torch.empty(numel, dtype=torch.float32)
        return self.buf[:numel]


_workspace = _Workspace()


class NoneCodec:
    """Raw values: the payload is the tensor's own memory."""

    codec_id = pb.CODEC_NONE

    def payload_bytes(self, numel: int, dtype: torch.dtype, block: int) -> int:
        return numel * dtype.itemsize

    def encode_into(self, x: torch.Tensor, block: int, payload: torch.Tensor) -> None:
        payload.copy_(x.contiguous().view(-1).view(torch.uint8))

    def decode_into(self, payload: torch.Tensor, block: int, out: torch.Tensor) -> None:
        out.view(-1).copy_(payload.view(out.dtype))


def _check_block(block: int) -> None:
    if not 1 <= block <= MAX_INT8_BLOCK:
        raise InvalidMessage(f"int8 block size {block} outside 1..{MAX_INT8_BLOCK}")


def num_blocks(numel: int, block: int) -> int:
    return -(-numel // block)


class Int8Codec:
    """Block absmax int8 with one float32 scale per block."""

    codec_id = pb.CODEC_INT8

    def payload_bytes(self, numel: int, dtype: torch.dtype, block: int) -> int:
        _check_block(block)
        return 4 * num_blocks(numel, block) + numel

    def encode_into(self, x: torch.Tensor, block: int, payload: torch.Tensor) -> None:
        _check_block(block)
        flat = x.reshape(-1)
        if flat.dtype != torch.float32:
            flat = flat.float()
        n = flat.numel()
        nb = num_blocks(n, block)
        scales = payload[: 4 * nb].view(torch.float32)
        q = payload[4 * nb :].view(torch.int8)
        full = n // block * block
        if full:
            xb = flat[:full].view(-1, block)
            self._quantize(xb, scales[: full // block], q[:full].view(-1, block))
        if full < n:
            self._quantize(flat[full:].view(1, -1), scales[nb - 1 :], q[full:].view(1, -1))
        if not bool(torch.isfinite(scales).all()):
            raise InvalidMessage("cannot encode non-finite values (NaN or Inf)")

    @staticmethod
    def _quantize(xb: torch.Tensor, scales: torch.Tensor, q: torch.Tensor) -> None:
        absmax = torch.maximum(xb.amax(dim=1), xb.amin(dim=1).neg_())
        torch.div(absmax, 127.0, out=scales)
        inv = torch.where(scales > 0, 1.0 / scales, torch.zeros_like(scales))
        tmp = _workspace.get(xb.numel()).view(xb.shape)
        torch.mul(xb, inv[:, None], out=tmp)
        tmp.round_()
        q.copy_(tmp)

    def decode_into(self, payload: torch.Tensor, block: int, out: torch.Tensor) -> None:
        _check_block(block)
        flat = out.view(-1)
        n = flat.numel()
        nb = num_blocks(n, block)
        if payload.numel() != 4 * nb + n:
            raise InvalidMessage(f"int8 payload of {payload.numel()} bytes, expected {4 * nb + n}")
        scales = payload[: 4 * nb].view(torch.float32)
        if not bool(torch.isfinite(scales).all()):
            raise InvalidMessage("int8 payload has non-finite scales")
        q = payload[4 * nb :].view(torch.int8)
        target = flat if flat.dtype == torch.float32 else _workspace.get(n)
        target.copy_(q)
        full = n // block * block
        if full:
            target[:full].view(-1, block).mul_(scales[: full // block, None])
        if full < n:
            target[full:].mul_(scales[nb - 1])
        if target is not flat:
            flat.copy_(target)


CODECS: dict[int, Codec] = {pb.CODEC_NONE: NoneCodec(), pb.CODEC_INT8: Int8Codec()}
CODEC_NAMES: dict[str, int] = {"none": pb.CODEC_NONE, "int8": pb.CODEC_INT8}


def _check_exhaustive() -> None:
    values = {v.number for v in pb.Codec.DESCRIPTOR.values if v.number != pb.CODEC_UNSPECIFIED}
    missing = values - set(CODECS)
    if missing:
        names = [pb.Codec.Name(v) for v in sorted(missing)]
        raise RuntimeError(f"no codec for proto Codec values {names}")


_check_exhaustive()


def get_codec(codec_id: int) -> Codec:
    try:
        return CODECS[codec_id]
    except KeyError:
        raise InvalidMessage(f"unknown codec {codec_id}") from None


def codec_id_for(name: str) -> int:
    try:
        return CODEC_NAMES[name]
    except KeyError:
        raise ValueError(f"compression must be one of {sorted(CODEC_NAMES)}, got {name!r}") from None


def encode(x: torch.Tensor, codec_id: int, block: int) -> torch.Tensor:
    """Encode flat `x` into a new uint8 payload tensor."""
    codec = get_codec(codec_id)
    payload = torch.empty(codec.payload_bytes(x.numel(), x.dtype, block), dtype=torch.uint8)
    codec.encode_into(x, block, payload)
    return payload


@dataclass
class ErrorFeedback:
    """Quantization residuals kept by a sender, one per (unit, destination rank)."""

    codec_id: int
    block: int

    def __post_init__(self) -> None:
        self._residual: dict[tuple[int, int], torch.Tensor] = {}
        self._lock = threading.Lock()

    def encode(self, unit: int, dest: int, x: torch.Tensor) -> torch.Tensor:
        """Encode x + residual; keep what the codec lost as the new residual (float32)."""
        codec = get_codec(self.codec_id)
        flat = x.reshape(-1)
        with self._lock:
            res = self._residual.get((unit, dest))
            if res is None or res.numel() != flat.numel():
                res = torch.zeros(flat.numel(), dtype=torch.float32)
                self._residual[(unit, dest)] = res
            res.add_(flat)  # res = x + old residual
            payload = torch.empty(
                codec.payload_bytes(flat.numel(), torch.float32, self.block), dtype=torch.uint8
            )
            try:
                codec.encode_into(res, self.block, payload)
            except InvalidMessage:
                res.zero_()
                raise
            decoded = _workspace.get(flat.numel())  # encode_into is done with the scratch buffer
            codec.decode_into(payload, self.block, decoded)
            res.sub_(decoded)
        return payload

    def reset(self) -> None:
        with self._lock:
            self._residual.clear()
