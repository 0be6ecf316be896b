"""Control channels: the small exact values ranks exchange besides parameters and gradients, and the
hand-over units of a re-partition.

Control values travel on the contract's exact exchange (``CollectiveBackend.exchange``: int64 or
float64, never compressed, off the partition plan), each under its own key, ``control_key(step,
channel)``: BatchNorm statistics (every floating buffer of the model), the step's commit vote (loss,
squared gradient norm, staged flag), the evaluation sums (loss, correct, count), the checkpoint step a rank
would resume from, the two rounds of the recovery exchange (``worker.recovery``) and up to
``BARRIER_SLOTS`` barriers per step key. A re-partition moves every unit's shards, which are data, with
the wire's all-gather on its own hand-over unit (``handover_unit``), declared in the plan.
"""

from __future__ import annotations

from enum import IntEnum

import torch
from torch import nn

from communication.backend import MAX_CONTROL_KEY, UnitSpec, control_unit


class Channel(IntEnum):
    BUFFERS = 0
    VOTE = 1
    EVAL = 3
    RESUME = 4
    REPORT = 5
    SETTLE = 6
    BARRIER = 8  # the first of BARRIER_SLOTS barrier slots (see control_key)
    HOLDERS = 16  # 1 if the rank brought state to a formation
    ADOPT = 17  # BatchNorm statistics adopted at a formation (as BUFFERS)
    HANDOVER = 64  # the first of one channel per unit (see handover_unit)


BARRIER_SLOTS = 8
KEYS_PER_STEP = int(Channel.HANDOVER)  # control channels (and barrier slots) of one step key
MAX_STEP_KEY = (MAX_CONTROL_KEY + 1) // KEYS_PER_STEP - 1


def control_key(step: int, channel: Channel, slot: int = 0) -> int:
    """The exchange key of `channel` (its `slot`-th use, for barriers) at step key `step`."""
    channel = Channel(channel)
    if channel >= Channel.HANDOVER:
        raise ValueError(f"{channel.name} is not a control channel")
    limit = BARRIER_SLOTS if channel == Channel.BARRIER else 1
    if not 0 <= slot < limit:
        raise ValueError(f"{channel.name} slot {slot} outside 0..{limit - 1}")
    if not 0 <= step <= MAX_STEP_KEY:
        raise ValueError(f"step key {step} outside 0..{MAX_STEP_KEY}")
    return step * KEYS_PER_STEP + int(channel) + slot


def handover_unit(index: int) -> int:
    """The unit id unit `index` travels under while a re-partition hands it over."""
    if index < 0:
        raise ValueError(f"unit index {index} is negative")
    return control_unit(Channel.HANDOVER + index)


def float_buffers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The model's floating-point buffers (averaged over ranks by the BUFFERS channel), in order."""
    return [(n, b) for n, b in model.named_buffers() if b.is_floating_point()]


def channel_specs(handover: dict[int, int] | None = None) -> dict[int, UnitSpec]:
    """unit id -> shard spec (raw fp32) of the hand-over units of a re-partition; `handover`: unit index
    -> values per rank of its hand-over unit. Control values are off the plan (the exchange)."""
    return {handover_unit(index): UnitSpec(n) for index, n in (handover or {}).items()}
