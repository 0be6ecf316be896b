"""In-process fake backend for unit tests of the layers above the wire.

`FakeHub(world_size)` is shared by the ranks (threads of one process); `hub.backend(rank)` gives each
rank a CollectiveBackend with the same semantics as the gRPC one: rank-order fp32 reduction on the
owner, epoch fencing, timeouts, and calls checked against the declared partition plan (numel and codec).
Every codec is served exactly: "int8" calls carry raw fp32 here, as on the torch.distributed lane (tests
of quantization use the gRPC backend). Point-to-point messages wait in the hub until received (`send`
resolves at once, `recv` when its message is there). Every call returns a Handle; a call still waiting
for its peers can be cancelled. A deterministic
`FaultInjector` keyed by (rank, step) makes a rank fail as if it had died.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from communication.backend import Codec, CollectiveBackend, UnitSpec, WireStats, check_exchange
from communication.compression import DEFAULT_INT8_BLOCK, codec_id_for
from communication.errors import CollectiveTimeout, EpochChanged, InvalidMessage, PeerLost
from communication.group import PeerGroup
from communication.handle import Handle
from communication.p2p import check_call
from communication.wire_plan import WirePlan


@dataclass
class FaultInjector:
    """`dead[(rank, step)]`: that rank dies (stops answering) when it reaches that step."""

    dead_at: dict[int, int] = field(default_factory=dict)

    def is_dead(self, rank: int, step: int) -> bool:
        at = self.dead_at.get(rank)
        return at is not None and step >= at


class FakeHub:
    def __init__(self, world_size: int, faults: FaultInjector | None = None) -> None:
        self.world_size = world_size
        self.faults = faults or FaultInjector()
        self._cond = threading.Condition()
        self._shards: dict[tuple[int, int, int, int], torch.Tensor] = {}  # (epoch, step, unit, rank)
        self._grads: dict[tuple[int, int, int, int, int], torch.Tensor] = {}  # (+dest, sender)
        self._mail: dict[tuple[int, int, int, int], torch.Tensor] = {}  # (epoch, src, dest, key)
        self._control: dict[tuple[int, int, int], torch.Tensor] = {}  # (epoch, key, rank): exchanges
        self.epoch = 0

    def backend(self, rank: int) -> FakeBackend:
        return FakeBackend(self, rank)

    def set_epoch(self, epoch: int) -> None:
        with self._cond:
            self.epoch = max(self.epoch, epoch)
            for key in [k for k in self._mail if k[0] < self.epoch]:
                del self._mail[key]
            for ck in [k for k in self._control if k[0] < self.epoch]:
                del self._control[ck]
            self._cond.notify_all()

    def _wait(self, group: PeerGroup, step: int, ready: object, deadline: float) -> None:
        """Wait (holding the condition) until ready() is true; fail fast on an epoch change or a dead peer."""
        assert callable(ready)
        while True:
            if self.epoch > group.epoch:  # a call of an older epoch fails, even if its peers made it too
                raise EpochChanged(f"{group.describe()}: epoch moved to {self.epoch}")
            if ready():
                return
            for peer in group.peers():
                if self.faults.is_dead(peer, step):
                    raise PeerLost(f"{group.describe()}: rank {peer} died at step {step}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise CollectiveTimeout(f"{group.describe()}: step {step} timed out")
            self._cond.wait(min(left, 0.05))


class FakeBackend:
    def __init__(self, hub: FakeHub, rank: int) -> None:
        self.hub = hub
        self.rank = rank
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix=f"fake-r{rank}")
        self._sent = 0
        self._received = 0
        self._plan: WirePlan | None = None

    def _check(self, group: PeerGroup, step: int) -> None:
        if group.rank != self.rank or group.world_size != self.hub.world_size:
            raise ValueError(f"group {group.describe()} does not match fake rank {self.rank}")
        if self.hub.faults.is_dead(self.rank, step):
            raise PeerLost(f"rank {self.rank} is dead at step {step} (injected)")

    def _off_plan(self, group: PeerGroup, unit: int, numel: int, codec: Codec, what: str) -> Handle | None:
        """A failed handle if the declared plan of the group's epoch does not have this call."""
        codec_id = codec_id_for(codec)
        plan = self._plan
        if plan is None or plan.epoch != group.epoch:
            return None
        try:
            plan.check_local(unit, numel, codec_id, what)
        except InvalidMessage as exc:
            failed = Handle()
            failed.set_exception(exc)
            return failed
        return None

    def _call(
        self,
        group: PeerGroup,
        step: int,
        ready: Callable[[], bool],
        finish: Callable[[], torch.Tensor],
        timeout: float,
        what: str,
    ) -> Handle:
        """A call that waits in the hub until `ready()`, then settles with `finish()` (both under the hub's
        lock). Cancelling it while it waits withdraws it: it takes nothing from the hub."""
        handle, hub, deadline = Handle(), self.hub, time.monotonic() + timeout
        withdrawn = threading.Event()

        def withdraw() -> bool:
            with hub._cond:
                if handle.done():
                    return False
                withdrawn.set()
                hub._cond.notify_all()
                return True

        def run() -> None:
            handle.mark_started()
            try:
                with hub._cond:
                    hub._wait(group, step, lambda: withdrawn.is_set() or ready(), deadline)
                    if withdrawn.is_set():
                        handle.fail_cancelled(f"{group.describe()}: {what}")
                        return
                    result = finish()
                handle.set_result(result)
            except Exception as exc:
                if not handle.done():
                    handle.set_exception(exc)

        handle.bind(withdraw)
        self._pool.submit(run)
        return handle

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
        self._check(group, step)
        n = shard.numel()
        if out.numel() != n * group.world_size:
            raise ValueError(f"out has {out.numel()} elements, expected {n * group.world_size}")
        if (failed := self._off_plan(group, unit, n, codec, "this rank's shard")) is not None:
            return failed
        hub = self.hub
        with hub._cond:
            hub._shards[(group.epoch, step, unit, self.rank)] = shard.detach().clone()
            hub._cond.notify_all()
        keys = [(group.epoch, step, unit, r) for r in group.peers()]

        def finish() -> torch.Tensor:
            flat = out.view(-1)
            for r, k in enumerate(keys):
                flat[r * n : (r + 1) * n].copy_(hub._shards[k].view(-1))
            self._sent += n * shard.element_size() * (group.world_size - 1)
            self._received += n * shard.element_size() * (group.world_size - 1)
            return out

        ready = lambda: all(k in hub._shards for k in keys)  # noqa: E731
        return self._call(group, step, ready, finish, timeout, f"all_gather of unit {unit}")

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
        self._check(group, step)
        n = out.numel()
        if full.numel() != n * group.world_size:
            raise ValueError(f"full has {full.numel()} elements, expected {n * group.world_size}")
        if (failed := self._off_plan(group, unit, n, codec, "this rank's gradient")) is not None:
            return failed
        hub = self.hub
        flat = full.detach().reshape(-1)
        with hub._cond:
            for dest in group.peers():
                key = (group.epoch, step, unit, dest, self.rank)
                hub._grads[key] = flat[dest * n : (dest + 1) * n].to(torch.float32).clone()
            hub._cond.notify_all()
        keys = [(group.epoch, step, unit, self.rank, s) for s in group.peers()]

        def finish() -> torch.Tensor:
            parts = [hub._grads.pop(k) for k in keys]
            acc = parts[0].clone()
            for part in parts[1:]:
                acc.add_(part)
            out.view(-1).copy_(acc)
            self._sent += n * 4 * (group.world_size - 1)
            self._received += n * 4 * (group.world_size - 1)
            return out

        ready = lambda: all(k in hub._grads for k in keys)  # noqa: E731
        return self._call(group, step, ready, finish, timeout, f"reduce_scatter of unit {unit}")

    def send(self, tensor: torch.Tensor, *, group: PeerGroup, dest: int, key: int, timeout: float) -> Handle:
        """See CollectiveBackend: the message waits in the hub until `dest` receives it."""
        flat = check_call(group, dest, key, tensor, "send")
        self._check(group, 0)
        handle = Handle()
        hub, mail_key = self.hub, (group.epoch, self.rank, dest, key)
        with hub._cond:
            if group.epoch < hub.epoch:
                handle.set_exception(EpochChanged(f"{group.describe()}: epoch moved to {hub.epoch}"))
            elif mail_key in hub._mail:
                handle.set_exception(InvalidMessage(f"key {key} to rank {dest} still waits to be received"))
            else:
                hub._mail[mail_key] = flat.clone()
                hub._cond.notify_all()
                self._sent += 4 * flat.numel()
                handle.set_result(tensor)
        return handle

    def recv(self, out: torch.Tensor, *, group: PeerGroup, src: int, key: int, timeout: float) -> Handle:
        """See CollectiveBackend; cancelling a receive not yet matched withdraws it."""
        flat = check_call(group, src, key, out, "recv")
        self._check(group, 0)
        hub, mail_key = self.hub, (group.epoch, src, self.rank, key)

        def finish() -> torch.Tensor:
            if (got := hub._mail[mail_key].numel()) != flat.numel():
                raise InvalidMessage(f"key {key}: {got} values, out has {flat.numel()}")
            flat.copy_(hub._mail.pop(mail_key))
            self._received += 4 * flat.numel()
            return out

        return self._call(
            group, 0, lambda: mail_key in hub._mail, finish, timeout, f"recv of key {key} from {src}"
        )

    def exchange(self, values: torch.Tensor, *, group: PeerGroup, key: int, timeout: float) -> Handle:
        """See CollectiveBackend: each rank's values stay in the hub until the epoch changes."""
        flat = check_exchange(group, key, values)
        self._check(group, 0)
        hub, world = self.hub, group.world_size
        names = [(group.epoch, key, r) for r in range(world)]
        with hub._cond:
            if names[group.rank] in hub._control:
                raise ValueError(f"exchange: key {key} was used already in {group.describe()}")
            hub._control[names[group.rank]] = flat.clone()
            hub._cond.notify_all()

        def finish() -> torch.Tensor:
            parts = [hub._control[name] for name in names]
            if any(p.dtype != flat.dtype or p.numel() != flat.numel() for p in parts):
                raise InvalidMessage(f"exchange {key}: ranks passed {[(p.dtype, p.numel()) for p in parts]}")
            out = torch.stack(parts)
            self._sent += flat.numel() * flat.element_size() * (world - 1)
            self._received += flat.numel() * flat.element_size() * (world - 1)
            return out

        ready = lambda: all(name in hub._control for name in names)  # noqa: E731
        return self._call(group, 0, ready, finish, timeout, f"exchange {key}")

    def release(self, group: PeerGroup, step: int) -> None:
        with self.hub._cond:
            for key in [k for k in self.hub._shards if k[3] == self.rank and k[1] <= step]:
                del self.hub._shards[key]

    def set_group(self, group: PeerGroup) -> None:
        self.hub.set_epoch(group.epoch)

    def set_plan(self, group: PeerGroup, units: Mapping[int, UnitSpec]) -> None:
        self._plan = WirePlan.build(group.epoch, units, DEFAULT_INT8_BLOCK)

    def set_epoch(self, epoch: int) -> None:
        self.hub.set_epoch(epoch)

    def accepts_device(self, group: PeerGroup, device: torch.device) -> bool:
        return device.type == "cpu"  # the fake lane takes host memory

    def bytes_by_lane(self) -> dict[str, int]:
        return {"grpc": self._sent, "local": 0}  # the fake lane stands for the gRPC lane

    def stats(self) -> WireStats:
        return WireStats(self._sent, self._received)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


# mypy checks this lane against the contract (communication/backend.py).
_CONTRACT: type[CollectiveBackend] = FakeBackend
