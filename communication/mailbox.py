"""Point-to-point messages this rank receives over gRPC (SendTensor), held until a `recv` claims them.

A message is named by (epoch, sender, unit, key); its header carries the key in `step`, this rank as
`shard`, codec none, and the whole payload. Unit 0 is a point-to-point message (float32); unit
`CONTROL_UNIT` carries a rank's values of an exact exchange (int64 or float64, its own namespace of keys).
Before anything is allocated for it, a message is checked: the installed job and epoch (the servicer's
admission), the unit's dtype and a raw payload of exactly itemsize * numel bytes, no other message of the
same name reserved or held, the numel and dtype of a `recv` already waiting for it, and the sender's share
of `max_bytes` (held and in-flight messages of one sender; each of the N - 1 peers gets an equal share). A
message nobody has received yet is dropped when the epoch
changes. All methods run on the backend's event loop.
"""

from __future__ import annotations

import asyncio

import torch

from communication.errors import (
    CollectiveTimeout,
    DuplicateContribution,
    InvalidMessage,
    ResourceExhausted,
    StaleMessage,
)
from communication.group import PeerGroup
from communication.tensor_stream import torch_dtype
from protos import zerowire_pb2 as pb

MailKey = tuple[int, int, int, int]  # (epoch, sender, unit, key)
CONTROL_UNIT = 1  # the unit of exchange messages (communication.backend.exchange)
_UNIT_DTYPES = {0: (pb.DTYPE_FLOAT32,), CONTROL_UNIT: (pb.DTYPE_INT64, pb.DTYPE_FLOAT64)}


class Mailbox:
    def __init__(self, max_bytes: int = 1 << 30) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        self.max_bytes = max_bytes
        self.group: PeerGroup | None = None
        self.epoch = -1
        self._reserved: dict[MailKey, torch.Tensor] = {}  # receiving now
        self._held: dict[MailKey, torch.Tensor] = {}  # received, not claimed yet
        self._dtypes: dict[MailKey, torch.dtype] = {}  # of the messages reserved or held
        self._recvs: dict[MailKey, tuple[int, torch.dtype, asyncio.Future[None]]] = {}  # waiting recvs
        self.sender_bytes: dict[int, int] = {}

    def set_group(self, group: PeerGroup) -> None:
        if self.group is None or group.epoch > self.group.epoch:
            self.group = group
        self.set_epoch(group.epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = max(self.epoch, epoch)
        for key in [k for k in self._held if k[0] < self.epoch]:
            self._free(key, self._held.pop(key))

    @property
    def held_bytes(self) -> int:
        """Bytes reserved or held now (diagnostics and tests)."""
        return sum(self.sender_bytes.values())

    def _free(self, key: MailKey, buf: torch.Tensor) -> None:
        self._dtypes.pop(key, None)
        left = self.sender_bytes.get(key[1], 0) - buf.numel()
        if left > 0:
            self.sender_bytes[key[1]] = left
        else:
            self.sender_bytes.pop(key[1], None)

    def reserve(self, h: pb.TensorHeader) -> torch.Tensor:
        """Check a message's header (module doc) and reserve its receive buffer."""
        group = self.group
        if group is None or h.epoch != group.epoch:
            raise StaleMessage(f"epoch {h.epoch} is not installed")
        if h.shard != group.rank or h.unit not in _UNIT_DTYPES:
            raise InvalidMessage(f"a message for rank {h.shard} (unit {h.unit}) sent to rank {group.rank}")
        if h.dtype not in _UNIT_DTYPES[h.unit] or h.codec != pb.CODEC_NONE or h.block_size != 0:
            raise InvalidMessage(
                "point-to-point messages are raw float32, exchange messages raw int64 or float64"
            )
        dtype = torch_dtype(h.dtype)
        if h.numel < 1 or list(h.shape) != [h.numel] or h.payload_bytes != dtype.itemsize * h.numel:
            raise InvalidMessage(f"{h.payload_bytes} bytes, shape {list(h.shape)} for {h.numel} {dtype}")
        if h.offset != 0 or h.length != h.payload_bytes:
            raise InvalidMessage(f"a message carries its whole payload, not [{h.offset}, +{h.length})")
        key = (h.epoch, h.sender, h.unit, h.step)
        if key in self._reserved or key in self._held:
            raise DuplicateContribution(f"rank {h.sender} already sent key {h.step} (not received yet)")
        waiting = self._recvs.get(key)
        if waiting is not None and waiting[:2] != (h.numel, dtype):
            raise InvalidMessage(
                f"key {h.step}: {h.numel} {dtype} values, the receive buffer has {waiting[0]} {waiting[1]}"
            )
        share = self.max_bytes // max(1, group.world_size - 1)
        held = self.sender_bytes.get(h.sender, 0)
        if held + h.payload_bytes > share:
            raise ResourceExhausted(
                f"rank {h.sender} would hold {held + h.payload_bytes} bytes (share {share})"
            )
        buf = torch.empty(h.payload_bytes, dtype=torch.uint8)
        self._reserved[key] = buf
        self._dtypes[key] = dtype
        self.sender_bytes[h.sender] = held + h.payload_bytes
        return buf

    def deliver(self, h: pb.TensorHeader) -> None:
        """The message's payload is complete: hold it for its recv (woken up if waiting)."""
        key = (h.epoch, h.sender, h.unit, h.step)
        buf = self._reserved.pop(key, None)
        if buf is None:
            raise StaleMessage(f"key {h.step} of rank {h.sender}: epoch {h.epoch} is over")
        if h.epoch < self.epoch:
            self._free(key, buf)
            raise StaleMessage(f"epoch {h.epoch} is over (now {self.epoch})")
        self._held[key] = buf
        waiting = self._recvs.get(key)
        if waiting is not None and not waiting[2].done():
            waiting[2].set_result(None)

    def abandon(self, h: pb.TensorHeader) -> None:
        key = (h.epoch, h.sender, h.unit, h.step)
        buf = self._reserved.pop(key, None)
        if buf is not None:
            self._free(key, buf)

    async def recv(
        self, epoch: int, src: int, key: int, out: torch.Tensor, time_limit: float, unit: int = 0
    ) -> torch.Tensor:
        """Claim the message (epoch, src, unit, key) into `out` (flat, the message's dtype: float32 for
        unit 0), waiting up to `time_limit`."""
        name = (epoch, src, unit, key)
        if name in self._recvs:
            raise InvalidMessage(f"a recv of key {key} from rank {src} is already waiting")
        if name not in self._held:
            woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._recvs[name] = (out.numel(), out.dtype, woken)
            try:
                await asyncio.wait_for(woken, time_limit)
            except TimeoutError:
                raise CollectiveTimeout(
                    f"key {key} from rank {src} did not arrive within {time_limit:.1f}s"
                ) from None
            finally:
                del self._recvs[name]
        buf = self._held.pop(name)
        dtype = self._dtypes.get(name, torch.float32)
        self._free(name, buf)
        if dtype != out.dtype or buf.numel() != dtype.itemsize * out.numel():
            raise InvalidMessage(
                f"key {key}: {buf.numel() // dtype.itemsize} {dtype} values, the receive buffer has "
                f"{out.numel()} {out.dtype}"
            )
        out.copy_(buf.view(dtype))
        return out
