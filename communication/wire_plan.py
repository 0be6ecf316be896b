"""The partition plan as the wire sees it: which units an epoch has, how many values each rank's shard
of each unit holds (float32) and in which codec each unit travels; int8 units use the backend's block.

The engine declares it after partitioning (`CollectiveBackend.set_plan`). The receiving side checks every
peer's message against it before it allocates or encodes anything: a gradient push must name a planned
unit with exactly the planned numel, dtype, codec and block; a fetch must name a planned unit, that
unit's codec and block, and a byte range inside the planned payload. This rank's own calls must name
the planned numel and codec too. The plan also bounds what one sender may hold reserved at a time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch

from communication.backend import CONTROL_BASE, UnitSpec
from communication.compression import CODEC_NAMES, MAX_INT8_BLOCK, get_codec
from communication.errors import InvalidMessage
from protos import zerowire_pb2 as pb

MAX_UNIT = (1 << 32) - 1  # units travel as uint32


def wire_block(codec: int, block: int) -> int:
    """The block size a header or request carries for `codec` (0 unless int8)."""
    return block if codec == pb.CODEC_INT8 else 0


def codec_name(codec: int) -> str:
    return pb.Codec.Name(codec) if codec in pb.Codec.values() else str(codec)


@dataclass(frozen=True)
class WirePlan:
    epoch: int
    units: Mapping[int, tuple[int, int]]  # unit -> (values in each rank's shard, codec id)
    block: int  # the int8 block size (raw units carry block 0 on the wire)
    step_bytes: int  # bytes one sender's pushes of one step reserve on this rank (all units)

    @classmethod
    def build(cls, epoch: int, specs: Mapping[int, UnitSpec], block: int) -> WirePlan:
        """Validate a declared plan (ValueError on anything malformed)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if not specs:
            raise ValueError("a partition plan needs at least one unit")
        if not isinstance(block, int) or not 1 <= block <= MAX_INT8_BLOCK:
            raise ValueError(f"int8 block size {block!r} outside 1..{MAX_INT8_BLOCK}")
        units: dict[int, tuple[int, int]] = {}
        step_bytes = 0
        for unit, spec in specs.items():
            if not isinstance(unit, int) or not 0 <= unit <= MAX_UNIT:
                raise ValueError(f"unit ids are integers in 0..{MAX_UNIT}, got {unit!r}")
            if not isinstance(spec, UnitSpec):
                raise ValueError(f"unit {unit}: a plan maps unit ids to UnitSpec, got {spec!r}")
            if not isinstance(spec.numel, int) or spec.numel < 1:
                raise ValueError(f"unit {unit}: shard numel must be a positive integer, got {spec.numel!r}")
            codec = CODEC_NAMES.get(spec.codec)
            if codec is None:
                raise ValueError(f"unit {unit}: codec is one of {sorted(CODEC_NAMES)}, got {spec.codec!r}")
            if unit >= CONTROL_BASE and codec != pb.CODEC_NONE:
                raise ValueError(f"unit {unit} is a control channel: it travels raw, not {spec.codec}")
            units[unit] = (spec.numel, codec)
            decoded = 0 if codec == pb.CODEC_NONE else 4 * spec.numel  # the fp32 a decoded push needs
            step_bytes += get_codec(codec).payload_bytes(spec.numel, torch.float32, block) + decoded
        return cls(epoch, MappingProxyType(units), block, step_bytes)

    def __len__(self) -> int:
        return len(self.units)

    def _spec(self, unit: int) -> tuple[int, int]:
        spec = self.units.get(unit)
        if spec is None:
            raise InvalidMessage(f"unit {unit} is not in the partition plan of epoch {self.epoch}")
        return spec

    def shard_numel(self, unit: int) -> int:
        return self._spec(unit)[0]

    def codec(self, unit: int) -> int:
        """The codec id `unit` travels in."""
        return self._spec(unit)[1]

    def payload_bytes(self, unit: int) -> int:
        numel, codec = self._spec(unit)
        return get_codec(codec).payload_bytes(numel, torch.float32, self.block)

    def check_format(self, unit: int, codec: int, block: int) -> None:
        planned = self.codec(unit)
        if (codec, block) != (planned, wire_block(planned, self.block)):
            raise InvalidMessage(
                f"unit {unit}: codec {codec_name(codec)} with block {block}; the plan says "
                f"{codec_name(planned)} with block {wire_block(planned, self.block)}"
            )

    def check_push(self, h: pb.TensorHeader) -> None:
        """A gradient push: a planned unit, its numel, float32, the unit's codec and block."""
        numel = self.shard_numel(h.unit)
        if h.numel != numel:
            raise InvalidMessage(f"unit {h.unit}: {h.numel} values, the plan says {numel}")
        if h.dtype != pb.DTYPE_FLOAT32:
            raise InvalidMessage(f"gradients must be float32, got dtype {h.dtype}")
        self.check_format(h.unit, h.codec, h.block_size)

    def check_fetch(self, req: pb.FetchRequest) -> tuple[int, int]:
        """A fetch: a planned unit, the unit's codec and block, a range inside the payload.
        Returns (offset, length) with length 0 resolved to the rest of the payload."""
        total = self.payload_bytes(req.unit)
        self.check_format(req.unit, req.codec, req.block_size)
        offset, length = req.offset, (req.length or total - req.offset)
        if length <= 0 or offset + length > total:
            raise InvalidMessage(f"range [{offset}, +{length}) outside the planned payload of {total} bytes")
        return offset, length

    def check_local(self, unit: int, numel: int, codec: int, what: str) -> None:
        """This rank's own call must follow the plan it declared (numel and codec)."""
        planned, planned_codec = self._spec(unit)
        if numel != planned:
            raise InvalidMessage(f"{what} of unit {unit} has {numel} values, the plan says {planned}")
        if codec != planned_codec:
            raise InvalidMessage(
                f"{what} of unit {unit} in {codec_name(codec)}, the plan says {codec_name(planned_codec)}"
            )
