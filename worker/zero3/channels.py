"""Control channels: the small exact values ranks exchange besides parameters and gradients, each under
its own unit id in the wire's control key space (``communication.backend.control_unit``), and the size
of each rank's shard on each, so that the plan the engine declares to its backend covers everything it
sends.

Every channel travels uncompressed (codec "none", whatever the job's codec), so values arrive bit for
bit. The all-gather channels carry a fixed number of fp32 values per rank: BatchNorm statistics (every
floating buffer of the model), the step's commit vote (loss, squared gradient norm, staged flag), the
evaluation sums (loss, correct, count), the checkpoint step a rank would resume from and the two rounds
of the recovery exchange (``worker.recovery``). A barrier is a reduce-scatter of one value per rank; a
step key has at most ``BARRIER_SLOTS`` of them. A re-partition moves every unit on its own hand-over
channel (``handover_unit``). A caller that sends another size fails with InvalidMessage (off the plan).
"""

from __future__ import annotations

from enum import IntEnum

import torch
from torch import nn

from communication.backend import UnitSpec, control_unit


class Channel(IntEnum):
    BUFFERS = 0
    VOTE = 1
    EVAL = 3
    RESUME = 4
    REPORT = 5
    SETTLE = 6
    BARRIER = 8  # the first of BARRIER_SLOTS barrier channels (see barrier_unit)
    HOLDERS = 16  # 1 if the rank brought state to a formation
    ADOPT = 17  # BatchNorm statistics adopted at a formation (as BUFFERS)
    HANDOVER = 64  # the first of one channel per unit (see handover_unit)


BARRIER_SLOTS = 8
VOTE_VALUES = 3  # loss sum, squared gradient norm, 1 if the update is staged (0: skip the step)
REPORT_VALUES = 10  # see worker.recovery.Holding.report
SETTLE_VALUES = 2  # see worker.recovery.settle_values
_VALUES = {
    Channel.VOTE: VOTE_VALUES,
    Channel.EVAL: 3,
    Channel.RESUME: 1,
    Channel.REPORT: REPORT_VALUES,
    Channel.SETTLE: SETTLE_VALUES,
    Channel.HOLDERS: 1,
}  # fp32 per rank


def channel_unit(channel: Channel) -> int:
    """The unit id `channel` travels under."""
    return control_unit(int(Channel(channel)))


def barrier_unit(slot: int) -> int:
    """The unit id of the `slot`-th barrier of a step key."""
    if not 0 <= slot < BARRIER_SLOTS:
        raise ValueError(f"barrier slot {slot} outside 0..{BARRIER_SLOTS - 1}")
    return control_unit(Channel.BARRIER + slot)


def handover_unit(index: int) -> int:
    """The unit id unit `index` travels under while a re-partition hands it over."""
    if index < 0:
        raise ValueError(f"unit index {index} is negative")
    return control_unit(Channel.HANDOVER + index)


def float_buffers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The model's floating-point buffers (averaged over ranks by the BUFFERS channel), in order."""
    return [(n, b) for n, b in model.named_buffers() if b.is_floating_point()]


def channel_specs(model: nn.Module, handover: dict[int, int] | None = None) -> dict[int, UnitSpec]:
    """unit id -> shard spec (raw fp32) of every control channel of an engine over `model`; `handover`:
    unit index -> values per rank of its hand-over channel."""
    specs = {channel_unit(channel): UnitSpec(n) for channel, n in _VALUES.items()}
    for index, n in (handover or {}).items():
        specs[handover_unit(index)] = UnitSpec(n)
    buffer_values = sum(b.numel() for _, b in float_buffers(model))
    if buffer_values:
        specs[channel_unit(Channel.BUFFERS)] = UnitSpec(buffer_values)
        specs[channel_unit(Channel.ADOPT)] = UnitSpec(buffer_values)
    for slot in range(BARRIER_SLOTS):
        specs[barrier_unit(slot)] = UnitSpec(1)
    return specs
