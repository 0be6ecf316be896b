"""Bit-exact small vectors through any wire codec.

Control values (losses, counts, norms, BatchNorm statistics, checkpoint steps) must reach every rank
exactly even when the wire quantizes tensors (INT8 block absmax: per block of ``block`` values one scale
``absmax / 127`` and ``round(x / scale)``). Each fp32 value is sent as its 32 bits in five 7-bit digits
(0..127, as floats), and every codec block starts with the anchor 127, so each block's scale is exactly 1
and every digit survives quantization unchanged. Without compression the encoding is exact trivially.
"""

from __future__ import annotations

import torch

DIGITS = 5
ANCHOR = 127.0


def encoded_numel(n: int, block: int) -> int:
    """Elements needed for ``n`` fp32 values with codec blocks of ``block`` (one anchor per block)."""
    if block < 2:
        raise ValueError(f"block must be >= 2, got {block}")
    digits = n * DIGITS
    per_block = block - 1
    blocks = max(1, -(-digits // per_block))
    return digits + blocks


def encode(values: torch.Tensor, block: int) -> torch.Tensor:
    flat = values.detach().to(torch.float32).reshape(-1).contiguous()
    bits = flat.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    digits = (
        torch.stack([(bits >> (7 * i)) & 127 for i in range(DIGITS)], dim=1).reshape(-1).to(torch.float32)
    )
    out = torch.empty(encoded_numel(flat.numel(), block), dtype=torch.float32)
    anchors = torch.arange(0, out.numel(), block)
    mask = torch.ones(out.numel(), dtype=torch.bool)
    mask[anchors] = False
    out[anchors] = ANCHOR
    out[mask] = digits
    return out


def decode(encoded: torch.Tensor, n: int, block: int) -> torch.Tensor:
    flat = encoded.reshape(-1)
    if flat.numel() != encoded_numel(n, block):
        raise ValueError(f"{flat.numel()} encoded elements do not hold {n} values")
    mask = torch.ones(flat.numel(), dtype=torch.bool)
    mask[torch.arange(0, flat.numel(), block)] = False
    digits = flat[mask].round().to(torch.int64).view(n, DIGITS)
    if bool(((digits < 0) | (digits > 127)).any()):
        raise ValueError("encoded digits outside 0..127")
    bits = torch.zeros(n, dtype=torch.int64)
    for i in range(DIGITS):
        bits |= digits[:, i] << (7 * i)
    bits = torch.where(bits >= 2**31, bits - 2**32, bits)
    return bits.to(torch.int32).view(torch.float32)
