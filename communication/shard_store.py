"""Parameter shards this rank publishes for its peers, kept until the step is released.

`publish` stores the encoded payload of (epoch, step, unit), in the codec of the call that published it;
`wait` blocks a peer's request until the shard is published, the epoch moves on, or the deadline
passes. A request for another codec or block is refused: nothing is encoded on a peer's request. With
a declared partition plan, a request is checked against it before it waits. Runs on the backend's
event loop.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from dataclasses import dataclass, field

import torch

from communication.compression import get_codec
from communication.errors import CollectiveTimeout, EpochChanged, InvalidMessage, StaleMessage
from communication.group import PeerGroup
from communication.tensor_stream import Key, checksum, make_header
from communication.wire_plan import WirePlan, wire_block
from protos import zerowire_pb2 as pb

StoreKey = tuple[int, int, int]  # (epoch, step, unit)


@dataclass
class Published:
    """An encoded shard. Its header's checksum is left 0: every served range gets its own."""

    header: pb.TensorHeader
    payload: torch.Tensor  # uint8, read by every stream that serves it
    checksums: dict[tuple[int, int], asyncio.Future[int]] = field(default_factory=dict)

    def range_checksum(self, offset: int, length: int, executor: Executor | None) -> asyncio.Future[int]:
        """CRC-32 of payload[offset:offset+length], computed once (off the loop) and shared."""
        key = (offset, length)
        found = self.checksums.get(key)
        if found is None:
            view = self.payload[offset : offset + length]
            found = asyncio.get_running_loop().run_in_executor(executor, checksum, view)
            self.checksums[key] = found
        return found


@dataclass
class _Slot:
    source: torch.Tensor
    version: tuple[int, int]
    pub: Published


def tensor_version(t: torch.Tensor) -> tuple[int, int]:
    return (t.data_ptr(), t._version)


class ShardStore:
    def __init__(self) -> None:
        self.group: PeerGroup | None = None
        self.epoch = -1  # highest epoch known (its group may not be installed yet)
        self.released: int | None = None
        self.plan: WirePlan | None = None  # the declared plan of the installed epoch
        self._published: dict[int, int] = {}  # epoch -> highest step published in it
        self._slots: dict[StoreKey, _Slot] = {}
        self._waiters: set[asyncio.Future[None]] = set()

    def _notify(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    def set_group(self, group: PeerGroup) -> None:
        if self.group is None or group.epoch > self.group.epoch:
            self.group = group
            self.released = None
            if self.plan is not None and self.plan.epoch != group.epoch:
                self.plan = None
        self.set_epoch(group.epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = max(self.epoch, epoch)
        for key in [k for k in self._slots if k[0] < self.epoch]:
            del self._slots[key]
        for old in [e for e in self._published if e < self.epoch]:
            del self._published[old]
        self._notify()

    def set_plan(self, plan: WirePlan) -> None:
        """The partition plan of the installed epoch (a plan of another epoch is ignored)."""
        if self.group is not None and plan.epoch == self.group.epoch:
            self.plan = plan

    def published(self, epoch: int) -> int | None:
        """The highest step this rank has published a shard for in `epoch` (None: nothing yet)."""
        return self._published.get(epoch)

    def check_fetch(self, req: pb.FetchRequest) -> None:
        """Check a request against the declared plan of its epoch, before it waits (InvalidMessage)."""
        if self.plan is not None and self.plan.epoch == req.epoch:
            self.plan.check_fetch(req)

    def lookup(self, key: StoreKey, source: torch.Tensor, codec: int) -> Published | None:
        """The already encoded payload of `key` if `source` is the same, unchanged tensor in `codec`."""
        slot = self._slots.get(key)
        if slot is None or slot.version != tensor_version(source) or slot.pub.header.codec != codec:
            return None
        return slot.pub

    def publish(self, group: PeerGroup, step: int, unit: int, source: torch.Tensor, pub: Published) -> None:
        if group.epoch < self.epoch:
            raise EpochChanged(f"publishing in epoch {group.epoch}, but epoch {self.epoch} is known")
        if self.plan is not None and self.plan.epoch == group.epoch:
            self.plan.check_local(unit, pub.header.numel, pub.header.codec, "this rank's shard")
        key = (group.epoch, step, unit)
        self._slots[key] = _Slot(source, tensor_version(source), pub)
        self._published[group.epoch] = max(step, self._published.get(group.epoch, step))
        self._notify()

    @staticmethod
    def _served(slot: _Slot, codec: int, block: int) -> Published:
        h = slot.pub.header
        if (codec, wire_block(codec, block)) != (h.codec, h.block_size):
            raise InvalidMessage(
                f"asked for codec {codec} with block {block}; this rank serves only codec {h.codec} "
                f"with block {h.block_size}"
            )
        return slot.pub

    async def wait(self, key: StoreKey, codec: int, block: int, time_limit: float) -> Published:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + time_limit
        while True:
            if key[0] < self.epoch:
                raise StaleMessage(f"epoch {key[0]} is over (now {self.epoch})")
            if self.group is not None and key[0] == self.group.epoch:
                if self.released is not None and key[1] <= self.released:
                    raise StaleMessage(f"step {key[1]} is already released (last {self.released})")
                slot = self._slots.get(key)
                if slot is not None:
                    if slot.version != tensor_version(slot.source):
                        raise StaleMessage(f"the owner changed its shard of {key} before releasing the step")
                    return self._served(slot, codec, block)
            left = deadline - loop.time()
            if left <= 0:
                raise CollectiveTimeout(f"shard {key} was not published within {time_limit:.1f}s")
            await self._changed(left)

    async def wait_group(self, epoch: int, time_limit: float) -> PeerGroup:
        """The installed group of `epoch`, waiting for it to be installed if it is newer than this rank's."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + time_limit
        while True:
            if epoch < self.epoch:
                raise StaleMessage(f"epoch {epoch} is over (now {self.epoch})")
            if self.group is not None and self.group.epoch == epoch:
                return self.group
            left = deadline - loop.time()
            if left <= 0:
                raise CollectiveTimeout(f"epoch {epoch} was not installed within {time_limit:.1f}s")
            await self._changed(left)

    async def _changed(self, time_limit: float) -> None:
        """Wait until something is published, installed or released, or `time_limit` passes."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        try:
            await asyncio.wait_for(waiter, time_limit)
        except TimeoutError:
            pass
        finally:
            self._waiters.discard(waiter)

    def release(self, epoch: int, step: int) -> None:
        if self.group is None or epoch != self.group.epoch:
            return
        self.released = step if self.released is None else max(self.released, step)
        for key in [k for k in self._slots if k[0] == epoch and k[1] <= step]:
            del self._slots[key]
        self._notify()

    def __len__(self) -> int:
        return len(self._slots)

    @property
    def waiting(self) -> int:
        """Requests waiting now for a publication, a release or an epoch (diagnostics and tests)."""
        return len(self._waiters)


def encode_shard(
    group: PeerGroup, step: int, unit: int, flat: torch.Tensor, codec_id: int, block: int
) -> Published:
    """What this rank serves of its shard `flat` of (step, unit): the raw bytes of the shard's own memory,
    or a fresh encoding under a compressing codec; the header's checksum is computed per served range."""
    codec = get_codec(codec_id)
    if codec_id == pb.CODEC_NONE:
        payload = flat.view(torch.uint8)
    else:
        payload = torch.empty(codec.payload_bytes(flat.numel(), flat.dtype, block), dtype=torch.uint8)
        codec.encode_into(flat, block, payload)
    key = Key(group.job_id, group.epoch, step, unit, group.rank)
    header = make_header(
        key, group.rank, flat.dtype, flat.numel(), codec_id, block, payload, with_checksum=False
    )
    return Published(header, payload)
