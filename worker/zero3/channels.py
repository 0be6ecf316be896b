"""Control channels: collective unit ids beyond the partition plan's units (``len(units) + channel``) that
carry small exact values, and the size of each rank's shard on each, so that the plan the engine
declares to its backend covers everything it sends.

Each all-gather channel carries a fixed number of fp32 values per rank, encoded exactly for the wire
(``worker.zero3.exact``): BatchNorm statistics (every floating buffer of the model), the step's loss, the
squared gradient norm, the evaluation sums (loss, correct, count) and the checkpoint step a rank would
resume from. A barrier is a reduce-scatter of one value per rank; a step key has at most
``BARRIER_SLOTS`` of them. A caller that sends another size fails with InvalidMessage (off the plan).
"""

from __future__ import annotations

import torch
from torch import nn

from worker.zero3 import exact

BUFFERS = 0
METRICS = 1
GRAD_NORM = 2
EVAL = 3
RESUME = 4
BARRIER = 8  # BARRIER + k: the k-th barrier of a step key
BARRIER_SLOTS = 8

_VALUES = {METRICS: 1, GRAD_NORM: 1, EVAL: 3, RESUME: 1}  # fp32 values per rank


def float_buffers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The model's floating-point buffers (averaged over ranks by the BUFFERS channel), in order."""
    return [(n, b) for n, b in model.named_buffers() if b.is_floating_point()]


def channel_numels(n_units: int, model: nn.Module, block: int) -> dict[int, int]:
    """unit id -> shard numel of every control channel of an engine with `n_units` plan units."""
    numels = {n_units + channel: exact.encoded_numel(n, block) for channel, n in _VALUES.items()}
    buffer_values = sum(b.numel() for _, b in float_buffers(model))
    if buffer_values:
        numels[n_units + BUFFERS] = exact.encoded_numel(buffer_values, block)
    for k in range(BARRIER_SLOTS):
        numels[n_units + BARRIER + k] = 1
    return numels
