"""Parameter shards this rank publishes for its peers, kept until the step is committed.

`publish` stores the encoded payload of (epoch, step, unit); `wait` blocks a peer's request until the
shard is published, the epoch moves on, or the deadline passes. Runs on the backend's event loop.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from dataclasses import dataclass, field

import torch

from communication.compression import get_codec
from communication.errors import CollectiveTimeout, EpochChanged, StaleMessage
from communication.group import PeerGroup
from communication.tensor_stream import Key, checksum, make_header
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
    encoded: dict[tuple[int, int], Published]  # (codec, block) -> payload


def tensor_version(t: torch.Tensor) -> tuple[int, int]:
    return (t.data_ptr(), t._version)


class ShardStore:
    def __init__(self) -> None:
        self.group: PeerGroup | None = None
        self.epoch = -1  # highest epoch known (its group may not be installed yet)
        self.committed: int | None = None
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
            self.committed = None
        self.set_epoch(group.epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = max(self.epoch, epoch)
        for key in [k for k in self._slots if k[0] < self.epoch]:
            del self._slots[key]
        self._notify()

    def lookup(self, key: StoreKey, source: torch.Tensor) -> Published | None:
        """The already encoded payload of `key` if `source` is the same, unchanged tensor."""
        slot = self._slots.get(key)
        if slot is None or slot.version != tensor_version(source) or not slot.encoded:
            return None
        return next(iter(slot.encoded.values()))

    def publish(self, group: PeerGroup, step: int, unit: int, source: torch.Tensor, pub: Published) -> None:
        if group.epoch < self.epoch:
            raise EpochChanged(f"publishing in epoch {group.epoch}, but epoch {self.epoch} is known")
        key = (group.epoch, step, unit)
        slot = self._slots.get(key)
        codec_key = (pub.header.codec, pub.header.block_size)
        if slot is None or slot.version != tensor_version(source):
            slot = self._slots[key] = _Slot(source, tensor_version(source), {})
        slot.encoded[codec_key] = pub
        self._notify()

    def _encoded(self, slot: _Slot, group: PeerGroup, key: StoreKey, codec: int, block: int) -> Published:
        found = slot.encoded.get((codec, block if codec == pb.CODEC_INT8 else 0))
        if found is not None:
            return found
        # A peer asked for another codec than the one this rank publishes in: encode once more.
        c = get_codec(codec)
        src = slot.source.reshape(-1)
        payload = torch.empty(c.payload_bytes(src.numel(), src.dtype, block), dtype=torch.uint8)
        c.encode_into(src, block, payload)
        header = make_header(
            Key(group.job_id, key[0], key[1], key[2], group.rank),
            group.rank,
            src.dtype,
            src.numel(),
            codec,
            block,
            payload,
            with_checksum=False,
        )
        pub = slot.encoded[(codec, header.block_size)] = Published(header, payload)
        return pub

    async def wait(self, key: StoreKey, codec: int, block: int, time_limit: float) -> Published:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + time_limit
        while True:
            if key[0] < self.epoch:
                raise StaleMessage(f"epoch {key[0]} is over (now {self.epoch})")
            if self.group is not None and key[0] == self.group.epoch:
                if self.committed is not None and key[1] <= self.committed:
                    raise StaleMessage(f"step {key[1]} is already committed (last {self.committed})")
                slot = self._slots.get(key)
                if slot is not None:
                    if slot.version != tensor_version(slot.source):
                        raise StaleMessage(f"the owner changed its shard of {key} before committing the step")
                    return self._encoded(slot, self.group, key, codec, block)
            left = deadline - loop.time()
            if left <= 0:
                raise CollectiveTimeout(f"shard {key} was not published within {time_limit:.1f}s")
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.add(waiter)
            try:
                await asyncio.wait_for(waiter, left)
            except TimeoutError:
                pass
            finally:
                self._waiters.discard(waiter)

    def commit(self, epoch: int, step: int) -> None:
        if self.group is None or epoch != self.group.epoch:
            return
        self.committed = step if self.committed is None else max(self.committed, step)
        for key in [k for k in self._slots if k[0] == epoch and k[1] <= step]:
            del self._slots[key]
        self._notify()

    def __len__(self) -> int:
        return len(self._slots)
