"""Codecs for tensors on the wire, keyed by the `Codec` proto enum.

A codec turns a flat float tensor into payload bytes and back. Every value of the enum (but
CODEC_UNSPECIFIED) must have a codec: this is checked when the module is imported.

INT8 is block absmax: the flat tensor is cut into blocks of `block` values; each block stores one
float32 scale (absmax / 127) and `block` int8 values round(x / scale). The payload is the scales
followed by the int8 values (a ragged last block is shorter). Reduction always happens after
decoding, in float32. `ErrorFeedback` keeps, per (unit, destination), what quantization lost and adds
it to the next value sent there; it stores that residual as INT8 block absmax too, about one byte per
value (see its docstring for the bytes per rank and the optional hard budget).

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
_residual_workspace = _Workspace()  # error feedback's x + residual, alive across one encode/decode


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


_INT8 = Int8Codec()
CODECS: dict[int, Codec] = {pb.CODEC_NONE: NoneCodec(), pb.CODEC_INT8: _INT8}
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


def _store_residual(r: torch.Tensor, payload: torch.Tensor, block: int, out: torch.Tensor) -> None:
    """Store residual ``r`` of the INT8 ``payload`` just encoded into ``out``, itself an INT8 payload whose
    block step is the sent block's step ``s`` / 254: ``|r| <= s / 2``, so 127 levels each side cover it
    (clamped against rounding) and no pass over ``r`` for its absmax is needed."""
    n = r.numel()
    nb = num_blocks(n, block)
    scales = out[: 4 * nb].view(torch.float32)
    torch.div(payload[: 4 * nb].view(torch.float32), 254.0, out=scales)
    inv = torch.where(scales > 0, 1.0 / scales, torch.zeros_like(scales))
    tmp = _workspace.get(n)
    full = n // block * block
    if full:
        torch.mul(r[:full].view(-1, block), inv[: full // block, None], out=tmp[:full].view(-1, block))
    if full < n:
        torch.mul(r[full:], inv[nb - 1], out=tmp[full:])
    tmp.round_().clamp_(-127.0, 127.0)
    out[4 * nb :].view(torch.int8).copy_(tmp)


def residual_bytes(numel: int, block: int) -> int:
    """Bytes of one error-feedback residual of ``numel`` values: an INT8 payload (values + fp32 scales)."""
    return numel + 4 * num_blocks(numel, block)


@dataclass
class ErrorFeedback:
    """Quantization residuals kept by a sender, one per (unit, destination rank), each stored compactly.

    Sending ``x`` to ``dest`` encodes ``v = x + r`` (``r`` the pair's residual, zero at first) and keeps
    ``v - decode(encode(v))``, what the codec lost, as the next ``r``. That residual is at most half the
    block's quantization step ``s`` per value, and it is itself stored in the INT8 payload layout (one
    fp32 scale per ``block`` values, then int8 values) with step ``s / 254``, not in fp32: storing it
    loses at most ``s / 508`` per value and send, 1/64516 of the sent block's absmax.

    Bytes held, per rank (each residual is ``residual_bytes(n, block)`` for a shard of ``n`` values)::

        sum over kept (unit, dest) of  n + 4 * ceil(n / block)

    With a ZeRO-3 plan every unit ``u`` sends one shard of ``n_u = padded_u / N`` values to each of the
    ``N - 1`` other ranks, so at most ``(N - 1) * sum_u (n_u + 4 * ceil(n_u / block))``, about
    ``(N - 1) / N * P * (1 + 4 / block)`` bytes for ``P`` padded parameters (fp32 residuals: ``4 * (N - 1)
    / N * P``). ``max_bytes``, when set, is a hard cap: a pair whose residual would not fit is sent
    without feedback (its residual is dropped) until another residual is released. Residuals of one send
    are transient (one fp32 shard in a per-thread scratch buffer).
    """

    codec_id: int
    block: int
    max_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.max_bytes is not None and self.max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {self.max_bytes}")
        if not 1 <= self.block <= MAX_INT8_BLOCK:
            raise ValueError(f"block must be in 1..{MAX_INT8_BLOCK}, got {self.block}")
        self._residual: dict[tuple[int, int], torch.Tensor] = {}  # INT8 payloads
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def residual_bytes(self) -> int:
        """Bytes of residual held now."""
        with self._lock:
            return self._bytes

    def encode(self, unit: int, dest: int, x: torch.Tensor) -> torch.Tensor:
        """Encode x + residual; keep what the codec lost as the new residual (INT8 block absmax)."""
        codec = get_codec(self.codec_id)
        flat = x.reshape(-1)
        n = flat.numel()
        payload = torch.empty(codec.payload_bytes(n, torch.float32, self.block), dtype=torch.uint8)
        key = (unit, dest)
        with self._lock:
            stored = self._residual.get(key)
            if stored is not None and stored.numel() != residual_bytes(n, self.block):
                self._release(key)
                stored = None
            value = _residual_workspace.get(n)
            if stored is None:
                value.copy_(flat)
            else:
                _INT8.decode_into(stored, self.block, value)
                value.add_(flat)  # v = old residual + x
            try:
                codec.encode_into(value, self.block, payload)
            except InvalidMessage:
                self._release(key)
                raise
            decoded = _workspace.get(n)  # encode_into is done with the scratch buffer
            codec.decode_into(payload, self.block, decoded)
            value.sub_(decoded)  # what the codec lost
            if stored is None:
                need = residual_bytes(n, self.block)
                if self.max_bytes is not None and self._bytes + need > self.max_bytes:
                    return payload  # over the budget: this pair goes without feedback
                stored = torch.empty(need, dtype=torch.uint8)
                self._residual[key] = stored
                self._bytes += need
            _store_residual(value, payload, self.block, stored)
        return payload

    def _release(self, key: tuple[int, int]) -> None:
        stored = self._residual.pop(key, None)
        if stored is not None:
            self._bytes -= stored.numel()

    def reset(self) -> None:
        with self._lock:
            self._residual.clear()
            self._bytes = 0
