"""``LaneWrapper``: a lane that passes every call of the contract to the lane it wraps. Wrappers that watch
the calls (the flight recorder, ``communication/recorder.py``; the worker's progress clock,
``worker/liveness.py``) override the calls they watch and inherit the rest."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from communication.backend import Codec, CollectiveBackend, UnitSpec, WireStats
from communication.group import PeerGroup
from communication.handle import Handle


class LaneWrapper:
    def __init__(self, lane: CollectiveBackend) -> None:
        self._lane = lane

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
        return self._lane.all_gather(group, step, unit, shard, out, timeout, codec=codec)

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
        return self._lane.reduce_scatter(group, step, unit, full, out, timeout, codec=codec)

    def send(self, tensor: torch.Tensor, *, group: PeerGroup, dest: int, key: int, timeout: float) -> Handle:
        return self._lane.send(tensor, group=group, dest=dest, key=key, timeout=timeout)

    def recv(self, out: torch.Tensor, *, group: PeerGroup, src: int, key: int, timeout: float) -> Handle:
        return self._lane.recv(out, group=group, src=src, key=key, timeout=timeout)

    def exchange(self, values: torch.Tensor, *, group: PeerGroup, key: int, timeout: float) -> Handle:
        return self._lane.exchange(values, group=group, key=key, timeout=timeout)

    def release(self, group: PeerGroup, step: int) -> None:
        self._lane.release(group, step)

    def set_group(self, group: PeerGroup) -> None:
        self._lane.set_group(group)

    def set_plan(self, group: PeerGroup, units: Mapping[int, UnitSpec]) -> None:
        self._lane.set_plan(group, units)

    def set_epoch(self, epoch: int) -> None:
        self._lane.set_epoch(epoch)

    def accepts_device(self, group: PeerGroup, device: torch.device) -> bool:
        return self._lane.accepts_device(group, device)

    def bytes_by_lane(self) -> dict[str, int]:
        return self._lane.bytes_by_lane()

    def stats(self) -> WireStats:
        return self._lane.stats()

    def close(self) -> None:
        self._lane.close()


# mypy checks the wrapper against the contract it stands in for.
_CONTRACT: type[CollectiveBackend] = LaneWrapper
