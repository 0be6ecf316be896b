"""Point-to-point transfers (`CollectiveBackend.send` / `recv`), what every lane checks of a call.

A transfer is named by (group's epoch, source rank, destination rank, key): the destination's `recv`
with the same source and key receives what the source's `send` sent, whatever the order the two calls
are made in. Tensors are float32 and travel raw (never compressed); a received message must have the
receiving buffer's numel. A key is an integer in 0..MAX_KEY; it may be used again once its previous
message was received. Messages not yet received are dropped when the epoch changes.
"""

from __future__ import annotations

import torch

from communication.group import PeerGroup

MAX_KEY = (1 << 31) - 1


def check_call(group: PeerGroup, peer: int, key: int, tensor: torch.Tensor, role: str) -> torch.Tensor:
    """ValueError unless `peer` is another member, `key` in range and `tensor` float32 (`role`: "send" or
    "recv"; a receive buffer must be contiguous). Returns the tensor flat."""
    if not isinstance(key, int) or not 0 <= key <= MAX_KEY:
        raise ValueError(f"{role}: key must be an integer in 0..{MAX_KEY}, got {key!r}")
    if not isinstance(peer, int) or not 0 <= peer < group.world_size or peer == group.rank:
        raise ValueError(f"{role}: rank {peer!r} is not another member of {group.describe()}")
    if tensor.dtype != torch.float32 or tensor.numel() < 1:
        raise ValueError(f"{role}: needs a non-empty float32 tensor, got {tensor.dtype} of {tensor.numel()}")
    if role == "recv" and not tensor.is_contiguous():
        raise ValueError("recv: the receive buffer must be contiguous")
    flat = tensor.detach().reshape(-1)
    return flat if flat.is_contiguous() else flat.contiguous()
