"""The narrow contract between the ZeRO-3 engine and any transport (gRPC, fake, torch.distributed).

Calls are made from the compute thread and return futures, so the engine can prefetch the next unit
while the current one computes. Every call names its PeerGroup (job, epoch, members) explicitly.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

import torch

from communication.group import PeerGroup


@dataclass(frozen=True, slots=True)
class WireStats:
    bytes_sent: int = 0
    bytes_received: int = 0


class CollectiveBackend(Protocol):
    def all_gather(
        self, group: PeerGroup, step: int, unit: int, shard: torch.Tensor, out: torch.Tensor, timeout: float
    ) -> Future[torch.Tensor]:
        """Gather every rank's shard of `unit` at `step` into `out` (flat, world_size * shard.numel()).

        `shard` is this rank's own shard (served to peers until the step is committed). The future
        resolves to `out`, or fails with EpochChanged / PeerLost / CollectiveTimeout / InvalidMessage.
        """
        ...

    def reduce_scatter(
        self, group: PeerGroup, step: int, unit: int, full: torch.Tensor, out: torch.Tensor, timeout: float
    ) -> Future[torch.Tensor]:
        """Send slice r of `full` (flat, world_size * out.numel()) to rank r; receive into `out` (fp32)
        the sum of this rank's slice from every rank, added in rank order 0..N-1 (not divided)."""
        ...

    def commit(self, group: PeerGroup, step: int) -> None:
        """Step `step` is applied locally: release what was kept for it (served shards, accumulators)."""
        ...

    def set_group(self, group: PeerGroup) -> None:
        """Install the membership of an epoch before its first step, so messages from its members are
        accepted (and those of any other epoch rejected). A newer epoch cancels older in-flight calls."""
        ...

    def set_plan(self, group: PeerGroup, shard_numels: Mapping[int, int]) -> None:
        """Declare the partition plan of `group`'s epoch: for each unit id that travels (parameter units
        and control channels alike), the numel of every rank's shard (float32). Called after
        partitioning, before the epoch's first collective, and again for every new epoch.

        A call of this rank that does not follow the plan fails with InvalidMessage; a peer's message
        that does not (unit, numel, dtype, codec, block, byte range) is rejected before anything is
        allocated for it. ValueError on a malformed plan."""
        ...

    def set_epoch(self, epoch: int) -> None:
        """A new membership epoch is known (its group may not be yet): fail every in-flight call of older
        epochs at once with EpochChanged."""
        ...

    def stats(self) -> WireStats: ...

    def close(self) -> None: ...


LANES = ("grpc", "local")


def lane_bytes(backend: object) -> dict[str, int]:
    """Bytes `backend` has sent, by lane: "grpc" (across hosts) and "local" (torch.distributed on the
    host). A backend without lanes of its own counts everything it sent as gRPC."""
    by_lane = getattr(backend, "bytes_by_lane", None)
    if callable(by_lane):
        counts = by_lane()
        return {lane: int(counts.get(lane, 0)) for lane in LANES}
    stats = getattr(backend, "stats", None)
    sent = int(stats().bytes_sent) if callable(stats) else 0
    return {"grpc": sent, "local": 0}
