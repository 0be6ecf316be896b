"""The narrow contract between the ZeRO-3 engine and any transport (gRPC, fake, torch.distributed).

Calls are made from the compute thread and return futures, so the engine can prefetch the next unit
while the current one computes. Every call names its PeerGroup (job, epoch, members) explicitly.

The codec is chosen per call (``codec="none"`` or ``"int8"``), never per backend: parameter gathers and
gradient reductions use the job's codec, control values (losses, norms, statistics, barriers) always
travel uncompressed and arrive bit for bit. The plan declares each unit's codec (`UnitSpec`), and a call
or a peer's message in another codec than its unit's is rejected. The int8 block size is a setting of
the backend (the job's), not of the call. Unit ids from `CONTROL_BASE` up are control channels: they
are always raw (`UnitSpec.codec` "none"). The gRPC lane encodes int8 calls; the torch.distributed lane
and the in-process fake serve them exactly (raw fp32), still holding each call to its unit's codec.

Control values (losses, norms, flags, recovery reports, BatchNorm statistics, commit votes) travel on their
own exact channel, never on a data unit: `exchange` gathers every rank's small int64 or float64 vector,
bit for bit, and `barrier` is an exchange of one value. Point-to-point `send` / `recv` move raw float32
tensors between two members (communication/p2p.py).
Every call returns a `Handle` (communication/handle.py): it can be waited on, and its `cancel()` withdraws
the call where its lane can, releasing what it reserved.

What a lane says of itself is part of the contract too: which device's tensors its collectives take as
they are (`accepts_device`) and the bytes it sent by lane (`bytes_by_lane`). A lane a worker process
trains over (`WorkerLane`) also serves: `start` binds its server, `store_port` names the rendezvous store
it hosts for the torch.distributed groups of its host (None where it hosts none). mypy checks every lane
against these Protocols.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from communication.group import PeerGroup
from communication.handle import Handle


@dataclass(frozen=True, slots=True)
class WireStats:
    bytes_sent: int = 0
    bytes_received: int = 0


Codec = Literal["none", "int8"]
CODECS: tuple[Codec, ...] = ("none", "int8")
CONTROL_BASE = 1 << 31  # unit ids CONTROL_BASE..2^32-1: control channels (raw only); parameter units below


def control_unit(channel: int) -> int:
    """The unit id of control channel `channel` (0 .. 2^31-1)."""
    if not isinstance(channel, int) or not 0 <= channel < CONTROL_BASE:
        raise ValueError(f"control channels are integers in 0..{CONTROL_BASE - 1}, got {channel!r}")
    return CONTROL_BASE + channel


@dataclass(frozen=True, slots=True)
class UnitSpec:
    """One unit of a partition plan: the float32 values of every rank's shard and the unit's codec."""

    numel: int
    codec: Codec = "none"


class CollectiveBackend(Protocol):
    def all_gather(
        self,
        group: PeerGroup,
        step: int,
        unit: int,
        shard: torch.Tensor,
        out: torch.Tensor,
        timeout: float,
        *,
        codec: Codec = "none",
    ) -> Handle:
        """Gather every rank's shard of `unit` at `step` into `out` (flat, world_size * shard.numel()).

        `shard` is this rank's own shard (served to peers until the step is released). With codec
        "int8" on a lane that encodes it, every rank's shard (its own included) arrives as the codec
        decodes it, the same on every rank; with "none" bit for bit. The future resolves to `out`, or
        fails with EpochChanged / PeerLost / CollectiveTimeout / InvalidMessage (also: `codec` is not
        the planned codec of `unit`). After a failure `out` holds unspecified values (a lane may
        still write it until its library lets go of the call).
        """
        ...

    def reduce_scatter(
        self,
        group: PeerGroup,
        step: int,
        unit: int,
        full: torch.Tensor,
        out: torch.Tensor,
        timeout: float,
        *,
        codec: Codec = "none",
    ) -> Handle:
        """Send slice r of `full` (flat, world_size * out.numel()) to rank r; receive into `out` (fp32)
        the sum of this rank's slice from every rank, added in rank order 0..N-1 (not divided). With
        codec "int8" the slices sent to peers are quantized (with error feedback where the backend keeps
        it); with "none" the sum is exact fp32 arithmetic on the values sent. `full` may be read until
        the future settles: keep it unchanged until then. After a failure `out` holds unspecified
        values."""
        ...

    def send(self, tensor: torch.Tensor, *, group: PeerGroup, dest: int, key: int, timeout: float) -> Handle:
        """Send float32 `tensor` (raw, never compressed) to rank `dest` under `key` (communication.p2p).
        The handle resolves to `tensor` once `dest` holds the message (it then waits there for its
        `recv`); keep `tensor` unchanged until then. ValueError on bad arguments."""
        ...

    def recv(self, out: torch.Tensor, *, group: PeerGroup, src: int, key: int, timeout: float) -> Handle:
        """Receive into `out` (float32, contiguous) what rank `src` sent under `key`; the handle resolves
        to `out`. A message of another numel fails the call with InvalidMessage."""
        ...

    def exchange(self, values: torch.Tensor, *, group: PeerGroup, key: int, timeout: float) -> Handle:
        """The exact small collective: every rank's `values` (1-D, int64 or float64, the same numel on
        every rank, at most MAX_CONTROL_VALUES), gathered in rank order. The handle resolves to a host
        tensor of shape (world_size, numel) and the same dtype, row r bit for bit what rank r passed.
        Never compressed and off the partition plan. `key` (0..MAX_CONTROL_KEY) names the exchange among
        those of the epoch: every rank passes the same key, and a key is not used twice in an epoch.
        ValueError on a bad call (`check_exchange`); InvalidMessage when a peer's values differ in numel
        or dtype."""
        ...

    def release(self, group: PeerGroup, step: int) -> None:
        """Step `step` is done here (committed or dropped by the step vote): let go of what the lane kept
        for it and for every earlier step (served shards, accumulators)."""
        ...

    def set_group(self, group: PeerGroup) -> None:
        """Install the membership of an epoch before its first step, so messages from its members are
        accepted (and those of any other epoch rejected). A newer epoch cancels older in-flight calls."""
        ...

    def set_plan(self, group: PeerGroup, units: Mapping[int, UnitSpec]) -> None:
        """Declare the partition plan of `group`'s epoch: for each unit id that travels (parameter units
        and control channels alike), the numel of every rank's shard (float32) and its codec. Called
        after partitioning, before the epoch's first collective, and again for every new epoch.

        A call of this rank that does not follow the plan (unit, numel, codec) fails with
        InvalidMessage; a peer's message that does not (unit, numel, dtype, codec, block, byte range) is
        rejected before anything is allocated for it. ValueError on a malformed plan (a value that is
        not a UnitSpec, an unknown codec, a control channel that is not raw)."""
        ...

    def set_epoch(self, epoch: int) -> None:
        """A new membership epoch is known (its group may not be yet): fail every in-flight call of older
        epochs at once with EpochChanged."""
        ...

    def accepts_device(self, group: PeerGroup, device: torch.device) -> bool:
        """Whether this lane's collectives of `group` take tensors on `device` as they are (a lane that
        moves them itself, such as torch.distributed: NCCL keeps them on the GPU). Host memory is always
        accepted; otherwise the engine stages device tensors through host memory."""
        ...

    def bytes_by_lane(self) -> dict[str, int]:
        """Bytes this rank sent, by lane (`LANES`): "grpc" across hosts, "local" over torch.distributed."""
        ...

    def stats(self) -> WireStats: ...

    def close(self) -> None: ...


class WorkerLane(CollectiveBackend, Protocol):
    """The data plane of a worker process: the contract, plus the server it runs for its peers."""

    def start(self, bind: str = "127.0.0.1:0", timeout: float = 30.0) -> int:
        """Bind the lane's server on `bind` ("host:port"); the bound port."""
        ...

    @property
    def store_port(self) -> int | None:
        """The port of the rendezvous store this lane hosts for its host's members (None: none)."""
        ...


LANES = ("grpc", "local")
CONTROL_DTYPES = (torch.int64, torch.float64)
MAX_CONTROL_VALUES = 1 << 20
MAX_CONTROL_KEY = (1 << 31) - 1


def check_exchange(group: PeerGroup, key: int, values: torch.Tensor) -> torch.Tensor:
    """ValueError unless `values` is a non-empty int64 or float64 vector of at most MAX_CONTROL_VALUES and
    `key` an integer in 0..MAX_CONTROL_KEY; the values flat and contiguous, on the host."""
    if not isinstance(key, int) or isinstance(key, bool) or not 0 <= key <= MAX_CONTROL_KEY:
        raise ValueError(f"exchange: key must be an integer in 0..{MAX_CONTROL_KEY}, got {key!r}")
    if values.dtype not in CONTROL_DTYPES:
        raise ValueError(f"exchange: control values are int64 or float64, got {values.dtype}")
    if values.dim() != 1 or not 1 <= values.numel() <= MAX_CONTROL_VALUES:
        raise ValueError(
            f"exchange: needs a vector of 1..{MAX_CONTROL_VALUES} values, got shape {tuple(values.shape)}"
        )
    return values.detach().to("cpu").contiguous()


def barrier(lane: CollectiveBackend, *, group: PeerGroup, key: int, timeout: float) -> Handle:
    """Resolves once every member of `group` has reached the barrier `key` (an exchange of one value): then
    every call a member made before it has completed on that member."""
    return lane.exchange(torch.zeros(1, dtype=torch.int64), group=group, key=key, timeout=timeout)
