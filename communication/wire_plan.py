"""The partition plan as the wire sees it: which units an epoch has and how many values each rank's shard
of each unit holds (float32), in the backend's one codec and block size.

The engine declares it after partitioning (`CollectiveBackend.set_plan`). The receiving side checks every
peer's message against it before it allocates or encodes anything: a gradient push must name a planned
unit with exactly the planned numel, dtype, codec and block; a fetch must name a planned unit, the
backend's codec and block, and a byte range inside the planned payload. The plan also bounds what one
sender may hold reserved at a time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch

from communication.compression import MAX_INT8_BLOCK, get_codec
from communication.errors import InvalidMessage
from protos import zerowire_pb2 as pb

MAX_UNIT = (1 << 32) - 1  # units travel as uint32


def wire_block(codec: int, block: int) -> int:
    """The block size a header or request carries for `codec` (0 unless int8)."""
    return block if codec == pb.CODEC_INT8 else 0


@dataclass(frozen=True)
class WirePlan:
    epoch: int
    shard_numels: Mapping[int, int]  # unit -> values in each rank's shard
    codec: int
    block: int  # as on the wire: the int8 block size, 0 for raw values
    step_bytes: int  # bytes one sender's pushes of one step reserve on this rank (all units)

    @classmethod
    def build(cls, epoch: int, shard_numels: Mapping[int, int], codec: int, block: int) -> WirePlan:
        """Validate a declared plan (ValueError on anything malformed)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if not shard_numels:
            raise ValueError("a partition plan needs at least one unit")
        numels: dict[int, int] = {}
        for unit, numel in shard_numels.items():
            if not isinstance(unit, int) or not 0 <= unit <= MAX_UNIT:
                raise ValueError(f"unit ids are integers in 0..{MAX_UNIT}, got {unit!r}")
            if not isinstance(numel, int) or numel < 1:
                raise ValueError(f"unit {unit}: shard numel must be a positive integer, got {numel!r}")
            numels[unit] = numel
        try:
            impl = get_codec(codec)
        except InvalidMessage as exc:
            raise ValueError(str(exc)) from None
        if codec == pb.CODEC_INT8 and not 1 <= block <= MAX_INT8_BLOCK:
            raise ValueError(f"int8 block size {block} outside 1..{MAX_INT8_BLOCK}")
        block = wire_block(codec, block)
        decoded = 0 if codec == pb.CODEC_NONE else 4
        step_bytes = sum(
            impl.payload_bytes(n, torch.float32, block or 1) + decoded * n for n in numels.values()
        )
        return cls(epoch, MappingProxyType(numels), codec, block, step_bytes)

    def __len__(self) -> int:
        return len(self.shard_numels)

    def shard_numel(self, unit: int) -> int:
        numel = self.shard_numels.get(unit)
        if numel is None:
            raise InvalidMessage(f"unit {unit} is not in the partition plan of epoch {self.epoch}")
        return numel

    def payload_bytes(self, unit: int) -> int:
        return get_codec(self.codec).payload_bytes(self.shard_numel(unit), torch.float32, self.block or 1)

    def check_format(self, codec: int, block: int) -> None:
        if (codec, block) != (self.codec, self.block):
            raise InvalidMessage(
                f"codec {pb.Codec.Name(codec) if codec in pb.Codec.values() else codec} with block {block}: "
                f"this rank sends and receives only {pb.Codec.Name(self.codec)} with block {self.block}"
            )

    def check_push(self, h: pb.TensorHeader) -> None:
        """A gradient push: a planned unit, its numel, float32, this backend's codec and block."""
        numel = self.shard_numel(h.unit)
        if h.numel != numel:
            raise InvalidMessage(f"unit {h.unit}: {h.numel} values, the plan says {numel}")
        if h.dtype != pb.DTYPE_FLOAT32:
            raise InvalidMessage(f"gradients must be float32, got dtype {h.dtype}")
        self.check_format(h.codec, h.block_size)

    def check_fetch(self, req: pb.FetchRequest) -> tuple[int, int]:
        """A fetch: a planned unit, this backend's codec and block, a range inside the payload.
        Returns (offset, length) with length 0 resolved to the rest of the payload."""
        total = self.payload_bytes(req.unit)
        self.check_format(req.codec, req.block_size)
        offset, length = req.offset, (req.length or total - req.offset)
        if length <= 0 or offset + length > total:
            raise InvalidMessage(f"range [{offset}, +{length}) outside the planned payload of {total} bytes")
        return offset, length

    def check_local(self, unit: int, numel: int, what: str) -> None:
        """This rank's own call must follow the plan it declared."""
        planned = self.shard_numel(unit)
        if numel != planned:
            raise InvalidMessage(f"{what} of unit {unit} has {numel} values, the plan says {planned}")
