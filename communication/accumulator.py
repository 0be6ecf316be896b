"""The owner's gradient accumulator: contributions of every rank to one shard, summed in rank order.

Keyed by (epoch, step, unit, shard). Each member contributes once per key (a second contribution is
rejected, never added twice). Anything of another job or epoch, an already released step, a step
outside the window, a non-member sender, the wrong dtype, numel, codec or payload length is rejected
before its payload is read; checksum mismatches are rejected after; non-finite values are reported to
the waiting owner and never applied. Pending memory is bounded, in all and per sender.

The step window: a peer can push its gradient of (step s, unit u) only after it gathered unit u at
step s, so only after this rank published its own shard of it. A push is accepted for steps
released+1 .. base+window, where base is the highest step this rank has published, started reducing
or released in the current epoch; before any of that, every push is rejected. With a declared
partition plan (`set_plan`) a push must also name a planned unit with its planned numel, in the
unit's planned codec (and the backend's block for int8), and one sender's reservations stay within
`window + 1` steps of the plan.

Contributions are kept (decoded, float32) until all arrived; then they are added in rank order
0..N-1 into the owner's output, so the sum does not depend on arrival order. Receive buffers are
pooled per (unit, sender) and reused across steps. All methods run on the backend's event loop.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import torch

from communication.compression import get_codec
from communication.errors import (
    CollectiveTimeout,
    DuplicateContribution,
    EpochChanged,
    InvalidMessage,
    ResourceExhausted,
    StaleMessage,
)
from communication.group import PeerGroup
from communication.tensor_stream import add_into, all_finite
from communication.wire_plan import WirePlan
from protos import zerowire_pb2 as pb

log = logging.getLogger(__name__)

AccKey = tuple[int, int, int]  # (epoch, step, unit); the shard is always this rank
PoolKey = tuple[int, int, int, int]  # (unit, sender, kind: 0 payload / 1 decoded, bytes)


@dataclass
class _Entry:
    numel: int | None = None
    parts: dict[int, torch.Tensor] = field(default_factory=dict)
    buffers: dict[int, list[tuple[PoolKey, torch.Tensor]]] = field(default_factory=dict)
    seen: set[int] = field(default_factory=set)  # senders that contributed or are contributing
    reserved: dict[int, int] = field(default_factory=dict)  # sender -> bytes
    error: Exception | None = None
    done: bool = False
    waiters: int = 0
    event: asyncio.Event = field(default_factory=asyncio.Event)


class GradientAccumulator:
    def __init__(
        self, *, window: int = 1, max_pending_bytes: int = 4 << 30, max_pending_keys: int = 4096
    ) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window
        self.max_pending_bytes = max_pending_bytes
        self.max_pending_keys = max_pending_keys
        self.group: PeerGroup | None = None
        self.released: int | None = None  # highest released step of the current epoch
        self.latest_local: int | None = None  # highest step this rank has reduced in the current epoch
        self.pending_bytes = 0
        self.plan: WirePlan | None = None  # the declared plan of the installed epoch
        self.sender_bytes: dict[int, int] = {}  # bytes reserved per sender rank
        self._entries: dict[AccKey, _Entry] = {}
        self._pool: dict[PoolKey, list[torch.Tensor]] = {}

    # -- membership ---------------------------------------------------------------------------
    def set_group(self, group: PeerGroup) -> None:
        if self.group is not None and group.epoch < self.group.epoch:
            raise StaleMessage(f"group epoch {group.epoch} is older than installed {self.group.epoch}")
        if self.group is not None and group.epoch == self.group.epoch:
            if group != self.group:
                raise ValueError(f"a different group for the installed epoch {group.epoch}")
            return
        if self.group is None or group.world_size != self.group.world_size:
            self._pool.clear()
        self.group = group
        self.released = None
        self.latest_local = None
        if self.plan is not None and self.plan.epoch != group.epoch:
            self.plan = None
        self._fail_older(group.epoch)

    def set_plan(self, plan: WirePlan) -> None:
        """The partition plan of the installed epoch (a plan of another epoch is ignored)."""
        if self.group is not None and plan.epoch == self.group.epoch:
            self.plan = plan

    def _plan(self, epoch: int) -> WirePlan | None:
        return self.plan if self.plan is not None and self.plan.epoch == epoch else None

    def set_epoch(self, epoch: int) -> None:
        self._fail_older(epoch)

    def _fail_older(self, epoch: int) -> None:
        for key in [k for k in self._entries if k[0] < epoch]:
            entry = self._entries.pop(key)
            entry.error = EpochChanged(f"epoch moved to {epoch} while reducing {key}")
            self._release(entry)
            entry.event.set()

    # -- validation ---------------------------------------------------------------------------
    def _group(self) -> PeerGroup:
        if self.group is None:
            raise StaleMessage("no membership epoch installed yet")
        return self.group

    def _check_step(self, epoch: int, step: int, published: int | None, *, remote: bool) -> None:
        group = self._group()
        if epoch != group.epoch:
            raise StaleMessage(f"epoch {epoch} is not the installed epoch {group.epoch} ({group.describe()})")
        if self.released is not None and step <= self.released:
            raise StaleMessage(f"step {step} is already released (last {self.released})")
        known = (self.released, self.latest_local, published)
        base = max((s for s in known if s is not None), default=None)
        if base is None and remote:
            raise StaleMessage(
                f"step {step}: this rank has published nothing in epoch {epoch} yet, so no peer can push"
            )
        if base is not None and step > base + self.window:
            raise StaleMessage(f"step {step} is more than {self.window} steps ahead of {base}")

    def reserve(self, h: pb.TensorHeader, published: int | None = None) -> torch.Tensor:
        """Validate a contribution's header and reserve a receive buffer for its payload.

        `published`: the highest step this rank has published a shard for in the header's epoch.
        """
        group = self._group()
        if h.job_id != group.job_id:
            raise InvalidMessage(f"job {h.job_id!r} is not {group.job_id!r}")
        self._check_step(h.epoch, h.step, published, remote=True)
        plan = self._plan(h.epoch)
        if plan is not None:
            plan.check_push(h)
        if h.shard != group.rank:
            raise InvalidMessage(f"shard {h.shard} sent to rank {group.rank}")
        if not 0 <= h.sender < group.world_size or h.sender == group.rank:
            raise InvalidMessage(f"sender {h.sender} is not a peer in {group.describe()}")
        if h.dtype != pb.DTYPE_FLOAT32:
            raise InvalidMessage(f"gradients must be float32, got dtype {pb.DType.Name(h.dtype)}")
        if list(h.shape) != [h.numel]:
            raise InvalidMessage(f"shape {list(h.shape)} does not match numel {h.numel}")
        codec = get_codec(h.codec)
        expected = codec.payload_bytes(h.numel, torch.float32, h.block_size or 1)
        if h.payload_bytes != expected:
            raise InvalidMessage(f"payload of {h.payload_bytes} bytes, expected {expected}")
        if h.offset != 0 or h.length != h.payload_bytes:
            raise InvalidMessage(f"a gradient push carries the whole payload, not [{h.offset}, +{h.length})")
        key = (h.epoch, h.step, h.unit)
        entry = self._entries.get(key)
        if entry is not None:
            if entry.numel is not None and entry.numel != h.numel:
                raise InvalidMessage(f"numel {h.numel} does not match {entry.numel} for {key}")
            if h.sender in entry.seen:
                raise DuplicateContribution(f"rank {h.sender} already contributed to {key}")
        need = h.payload_bytes + (0 if h.codec == pb.CODEC_NONE else 4 * h.numel)
        if self.pending_bytes + need > self.max_pending_bytes:
            raise ResourceExhausted(f"pending gradients would exceed {self.max_pending_bytes} bytes")
        held = self.sender_bytes.get(h.sender, 0)
        if plan is not None and held + need > (self.window + 1) * plan.step_bytes:
            raise ResourceExhausted(
                f"rank {h.sender} would hold {held + need} bytes reserved, more than {self.window + 1} "
                f"steps of the plan ({plan.step_bytes} bytes each)"
            )
        if entry is None:
            if len(self._entries) >= self.max_pending_keys:
                raise ResourceExhausted(f"more than {self.max_pending_keys} pending reductions")
            entry = self._entries[key] = _Entry()
        entry.numel = h.numel
        entry.seen.add(h.sender)
        entry.reserved[h.sender] = need
        self.pending_bytes += need
        self.sender_bytes[h.sender] = held + need
        return self._take(entry, h.sender, (h.unit, h.sender, 0, h.payload_bytes), torch.uint8)

    def _take(self, entry: _Entry, sender: int, pool_key: PoolKey, dtype: torch.dtype) -> torch.Tensor:
        free = self._pool.get(pool_key)
        buf = free.pop() if free else torch.empty(pool_key[3], dtype=torch.uint8)
        entry.buffers.setdefault(sender, []).append((pool_key, buf))
        return buf if dtype == torch.uint8 else buf.view(dtype)

    def decode_buffer(self, h: pb.TensorHeader) -> torch.Tensor:
        """A pooled float32 buffer to decode a compressed contribution into."""
        entry = self._entries[(h.epoch, h.step, h.unit)]
        return self._take(entry, h.sender, (h.unit, h.sender, 1, 4 * h.numel), torch.float32)

    def abandon(self, h: pb.TensorHeader) -> None:
        """A reserved contribution failed before completing: free its slot (nothing was applied)."""
        entry = self._entries.get((h.epoch, h.step, h.unit))
        if entry is None or h.sender in entry.parts:
            return
        entry.seen.discard(h.sender)
        self._unreserve(h.sender, entry.reserved.pop(h.sender, 0))
        for pool_key, buf in entry.buffers.pop(h.sender, []):
            self._give_back(pool_key, buf)
        if not entry.seen and entry.error is None:  # nothing left of it: as if it never came
            entry.numel = None
            if not entry.waiters:
                del self._entries[(h.epoch, h.step, h.unit)]

    # -- contributions ------------------------------------------------------------------------
    def contribute(self, h: pb.TensorHeader, part: torch.Tensor) -> None:
        """A received and decoded contribution (float32, numel values)."""
        key = (h.epoch, h.step, h.unit)
        entry = self._entries.get(key)
        if entry is None or h.sender not in entry.seen:
            raise StaleMessage(f"no reservation for rank {h.sender} at {key}")
        if not all_finite(part):
            err = InvalidMessage(f"rank {h.sender} sent non-finite gradient values for {key}; not applied")
            log.warning("%s", err)
            entry.error = entry.error or err
            self.abandon(h)
            entry.seen.add(h.sender)  # the sender had its one chance
            entry.event.set()
            raise err
        entry.parts[h.sender] = part
        self._maybe_ready(entry)

    def contribute_local(
        self, epoch: int, step: int, unit: int, part: torch.Tensor, codec: int = pb.CODEC_NONE
    ) -> None:
        """This rank's own slice (kept by reference until the sum is done) of a reduction in `codec`."""
        group = self._group()
        self._check_step(epoch, step, None, remote=False)
        plan = self._plan(epoch)
        if plan is not None:
            plan.check_local(unit, part.numel(), codec, "this rank's gradient")
        self.latest_local = step if self.latest_local is None else max(self.latest_local, step)
        key = (epoch, step, unit)
        entry = self._entries.setdefault(key, _Entry())
        if entry.numel is not None and entry.numel != part.numel():
            entry.error = entry.error or InvalidMessage(
                f"peers sent {entry.numel} values for {key}, this rank reduces {part.numel()}"
            )
        if group.rank in entry.seen:
            raise DuplicateContribution(f"rank {group.rank} already reduced {key}")
        entry.numel = part.numel()
        entry.seen.add(group.rank)
        entry.parts[group.rank] = part
        self._maybe_ready(entry)

    def _maybe_ready(self, entry: _Entry) -> None:
        if len(entry.parts) == self._group().world_size:
            entry.event.set()

    async def wait_ready(
        self, epoch: int, step: int, unit: int, out: torch.Tensor, time_limit: float
    ) -> torch.Tensor:
        """Wait until every rank contributed to (epoch, step, unit); write their rank-order sum to `out`."""
        key = (epoch, step, unit)
        entry = self._entries.setdefault(key, _Entry())
        entry.waiters += 1
        try:
            await asyncio.wait_for(entry.event.wait(), time_limit)
        except TimeoutError:
            missing = sorted(set(range(self._group().world_size)) - set(entry.parts))
            raise CollectiveTimeout(
                f"reduction of {key} timed out after {time_limit:.1f}s; missing ranks {missing}"
            ) from None
        finally:
            entry.waiters -= 1
        if entry.error is not None:
            raise entry.error
        if entry.done:
            raise DuplicateContribution(f"{key} was already reduced")
        flat = out.view(-1)
        world = self._group().world_size
        if world == 1:
            flat.copy_(entry.parts[0])
        else:  # ((p0 + p1) + p2) + ... : rank order, float32, one pass per part
            add_into(flat, entry.parts[0], entry.parts[1])
            for r in range(2, world):
                add_into(flat, flat, entry.parts[r])
        entry.done = True
        self._release(entry)
        return out

    # -- lifecycle ----------------------------------------------------------------------------
    def release(self, epoch: int, step: int) -> None:
        if self.group is None or epoch != self.group.epoch:
            return
        self.released = step if self.released is None else max(self.released, step)
        for key in [k for k in self._entries if k[1] <= step]:
            entry = self._entries.pop(key)
            self._release(entry)

    def _unreserve(self, sender: int, nbytes: int) -> None:
        self.pending_bytes -= nbytes
        left = self.sender_bytes.get(sender, 0) - nbytes
        if left > 0:
            self.sender_bytes[sender] = left
        else:
            self.sender_bytes.pop(sender, None)

    def _release(self, entry: _Entry) -> None:
        for sender, nbytes in entry.reserved.items():
            self._unreserve(sender, nbytes)
        entry.reserved.clear()
        for sender, bufs in entry.buffers.items():
            # a buffer whose stream is still arriving may yet be written to: never reuse it
            if sender in entry.parts:
                for pool_key, buf in bufs:
                    self._give_back(pool_key, buf)
        entry.parts.clear()
        entry.buffers.clear()

    def _give_back(self, pool_key: PoolKey, buf: torch.Tensor) -> None:
        free = self._pool.setdefault(pool_key, [])
        if len(free) < 2:
            free.append(buf)

    def pending(self) -> int:
        return len(self._entries)
