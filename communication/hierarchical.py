"""HierarchicalBackend: the CollectiveBackend composed of the gRPC lane (across hosts) and the
torch.distributed lane (members that share a host), chosen per epoch from the group's host ids.

`set_group(group)` decides (`communication/host_layout.py`):
- every host has one member, or there are no host ids: the flat gRPC path, the group unchanged
  (everything is delegated to the gRPC lane: bit-exact rank-order sums, the job's codec);
- every host has L > 1 members: reduce-scatter inside the host over the local lane, then across hosts
  between the members of the same local index over gRPC; all-gather the reverse. Only 1/L of the
  bytes a flat reduce-scatter sends to other hosts cross hosts. With one host, the local lane alone;
- hosts of uneven size, or no rendezvous store for some host: the flat path, with a warning (once).

Sums are deterministic: the local lane adds the L members' pieces in local rank order, then the gRPC
lane adds the H hosts' partial sums in host order. That is a fixed order, but not the flat path's
rank order, so the result equals the flat sum within fp32 rounding: per value, |hierarchical - flat|
<= 2 (N-1) 2^-24 sum_r |x_r| (each order's error is at most (N-1) 2^-24 sum_r |x_r|). With one host
the order is rank order: bit-exact.

Ordering: the local lane must run its collectives in the same order on every co-located member. A
reduce-scatter enters it at the call; an all-gather reserves its place at the call and reads its input
once the gRPC stage delivered it (`TorchDistBackend.all_gather(..., ready=)`). The gRPC stage of a
reduce-scatter starts when its local stage completed, with what is left of the call's timeout.

Codec: a call's codec goes to both stages; the gRPC stage encodes with it, the local lane carries raw
fp32 whatever it is. An int8 all-gather therefore gives every member the gRPC stage's decoded values.

Point-to-point: `send` / `recv` take the lane that reaches the peer: the local lane for a member of
this host (in call order, like its collectives), the gRPC lane for the member of another host with
this rank's local index, and the gRPC lane for everyone on the flat path. Other ranks (another host,
another local index) are reachable by no single lane: ValueError.

Failure: an error of either stage fails the call with that error (EpochChanged, PeerLost,
CollectiveTimeout, InvalidMessage); `set_epoch`, `release` and `close` fan out to both lanes. A
co-located member whose input failed leaves the epoch's local group failed, so its peers fail too
rather than wait. This backend starts no thread of its own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, InvalidStateError
from dataclasses import replace

import torch

from communication.backend import Codec, UnitSpec, WireStats, WorkerLane, check_exchange
from communication.errors import Cancelled, CollectiveTimeout, CommError, EpochChanged
from communication.group import PeerGroup
from communication.grpc_backend import GrpcBackend
from communication.handle import Handle
from communication.host_layout import HostLayout, host_layout
from communication.p2p import check_call
from communication.rendezvous_store import RendezvousStore
from communication.torchdist import TorchDistBackend

log = logging.getLogger(__name__)


class HierarchicalBackend:
    def __init__(self, remote: GrpcBackend, local: TorchDistBackend) -> None:
        """`remote` is started here by `start()`, or was started by the caller; both lanes (and the
        rendezvous store `start()` hosts) are closed by `close()`."""
        self.remote = remote
        self.local = local
        self.store: RendezvousStore | None = None
        self._lock = threading.Lock()
        self._epoch = -1
        self._group: PeerGroup | None = None
        self._layout: HostLayout | None = None  # None: the flat gRPC path
        self._warned: set[str] = set()
        self._closed = False

    def start(self, bind: str = "127.0.0.1:0", timeout: float = 30.0) -> int:
        """Start the gRPC lane's server on `bind` ("host:port") and host a rendezvous store on loopback,
        for the torch.distributed groups of this machine's members in later epochs (the store of a
        host's lowest rank is the one they use; its port reaches them through the coordinator).
        Returns the gRPC port."""
        port = self.remote.start(bind, timeout)
        self.store = RendezvousStore("127.0.0.1", timeout)
        return port

    @property
    def store_port(self) -> int | None:
        """The port of the rendezvous store `start()` hosts (None before)."""
        return None if self.store is None else self.store.port

    # -- membership ------------------------------------------------------------------------------

    @property
    def mode(self) -> str:
        """The installed group's path: "flat", "hierarchical" or "local" ("" before the first group)."""
        layout = self._layout
        if self._group is None:
            return ""
        if layout is None:
            return "flat"
        return "local" if layout.remote_group is None else "hierarchical"

    def set_group(self, group: PeerGroup) -> None:
        """Install `group`'s epoch on the lane(s) its host ids call for (module doc). ValueError on a
        malformed store address or a different group for the installed epoch; nothing changes then."""
        found = host_layout(group)
        with self._lock:
            if self._closed:
                raise RuntimeError("backend is closed")
            if group.epoch < self._epoch:
                raise EpochChanged(f"cannot install {group.describe()}: epoch {self._epoch} is known")
            if self._group is not None and group.epoch == self._group.epoch:
                if group == self._group:
                    return
                raise ValueError(f"a different group was installed for epoch {group.epoch}")
            layout = found if isinstance(found, HostLayout) else None
            self._group, self._layout, self._epoch = group, layout, group.epoch
        if layout is None:
            self._note_flat(group, str(found))
            self.local.set_epoch(group.epoch)
            self.remote.set_group(group)
            return
        if layout.remote_group is None:
            self.remote.set_epoch(group.epoch)
        else:
            self.remote.set_group(layout.remote_group)
        self.local.set_group(layout.local_group, layout.rendezvous, host_store=False)
        log.info(
            "%s: %s over %d host(s) of %d", group.describe(), self.mode, layout.num_hosts, layout.per_host
        )

    def _note_flat(self, group: PeerGroup, reason: str) -> None:
        kind = reason.split(" (")[0]
        if kind in ("no host ids", "one member per host"):
            log.debug("%s: flat gRPC path (%s)", group.describe(), reason)
        elif kind not in self._warned:
            self._warned.add(kind)
            log.warning("%s: flat gRPC path: %s", group.describe(), reason)

    def set_plan(self, group: PeerGroup, units: Mapping[int, UnitSpec]) -> None:
        """The gRPC lane's plan has the same units; the local lane's H times as many values per unit
        (a local piece holds one chunk per host), in the same codecs (served raw on that lane).
        ValueError on a malformed plan."""
        layout = self._installed(group)
        if layout is None:
            self.remote.set_plan(group, units)
            return
        if layout.remote_group is not None:
            self.remote.set_plan(layout.remote_group, units)
        if not all(isinstance(spec, UnitSpec) for spec in units.values()):
            raise ValueError("a plan maps unit ids to UnitSpec")
        per_host = {u: replace(spec, numel=layout.num_hosts * spec.numel) for u, spec in units.items()}
        self.local.set_plan(layout.local_group, per_host)

    def set_epoch(self, epoch: int) -> None:
        with self._lock:
            self._epoch = max(self._epoch, epoch)
        self.remote.set_epoch(epoch)
        self.local.set_epoch(epoch)

    def _installed(self, group: PeerGroup) -> HostLayout | None:
        """The layout of `group`, installing it first if it is a newer epoch (EpochChanged if older)."""
        with self._lock:
            current = self._group
        if current is None or group != current:
            self.set_group(group)
        return self._layout

    # -- collectives -----------------------------------------------------------------------------

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
        try:
            layout = self._installed(group)
        except EpochChanged as exc:
            return _failed(exc)
        if layout is None:
            return self.remote.all_gather(group, step, unit, shard, out, timeout, codec=codec)
        n = shard.numel()
        if shard.dtype != torch.float32 or out.dtype != torch.float32 or out.numel() != n * group.world_size:
            raise ValueError(f"need a float32 shard and float32 out of {n * group.world_size} values")
        if layout.remote_group is None:  # one host: local order is rank order
            return self.local.all_gather(layout.local_group, step, unit, shard, out, timeout, codec=codec)
        mid = torch.empty(layout.num_hosts * n)
        across = self.remote.all_gather(layout.remote_group, step, unit, shard, mid, timeout, codec=codec)
        gathered = torch.empty(group.world_size * n)
        inside = self.local.all_gather(
            layout.local_group, step, unit, mid, gathered, timeout, codec=codec, ready=across
        )
        result = Handle()
        _fail_on_error(across, result)

        def done(f: Future[torch.Tensor]) -> None:
            if _fail_on_error(f, result):
                layout.from_local_major(gathered, out, n)
                _settle(result, value=out)

        inside.add_done_callback(done)
        result.bind(lambda: _withdraw([across, inside]))  # inside waits for across: either ends both
        return result

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
        try:
            layout = self._installed(group)
        except EpochChanged as exc:
            return _failed(exc)
        if layout is None:
            return self.remote.reduce_scatter(group, step, unit, full, out, timeout, codec=codec)
        n = out.numel()
        if out.dtype != torch.float32 or full.numel() != n * group.world_size:
            raise ValueError(f"full must have {n * group.world_size} values and out be float32")
        if layout.remote_group is None:  # one host: local order is rank order
            return self.local.reduce_scatter(layout.local_group, step, unit, full, out, timeout, codec=codec)
        remote_group = layout.remote_group
        deadline = time.monotonic() + timeout
        mid = torch.empty(layout.num_hosts * n)
        arranged = layout.to_local_major(full, n)
        local_group = layout.local_group
        inside = self.local.reduce_scatter(local_group, step, unit, arranged, mid, timeout, codec=codec)
        result = Handle()
        res = torch.empty(n)
        stages: list[Future[torch.Tensor]] = [inside]
        withdrawn = threading.Event()

        def across() -> Future[torch.Tensor]:
            if withdrawn.is_set():
                raise Cancelled(f"{group.describe()}: reduce_scatter of unit {unit}: cancelled by the caller")
            left = deadline - time.monotonic()
            if left <= 0:
                raise CollectiveTimeout(f"{group.describe()}: no time left for the gRPC stage")
            second = self.remote.reduce_scatter(remote_group, step, unit, mid, res, left, codec=codec)
            stages.append(second)
            return second

        def withdraw() -> bool:
            withdrawn.set()  # a stage not started yet never starts
            pending = [stage for stage in stages if not stage.done()]
            return _withdraw(pending) if pending else not result.done()

        def finish(f: Future[torch.Tensor]) -> None:
            if _fail_on_error(f, result):
                out.view(-1).copy_(res)
                _settle(result, value=out)

        inside.add_done_callback(lambda f: self._then(f, result, across, finish))
        result.bind(withdraw)
        return result

    def exchange(self, values: torch.Tensor, *, group: PeerGroup, key: int, timeout: float) -> Handle:
        """See CollectiveBackend: inside the host first, then every host's block across hosts (between
        matching local ranks), rows put back in rank order."""
        flat = check_exchange(group, key, values)
        try:
            layout = self._installed(group)
        except EpochChanged as exc:
            return _failed(exc)
        if layout is None:
            return self.remote.exchange(flat, group=group, key=key, timeout=timeout)
        if layout.remote_group is None:  # one host: local order is rank order
            return self.local.exchange(flat, group=layout.local_group, key=key, timeout=timeout)
        remote_group, n = layout.remote_group, flat.numel()
        deadline = time.monotonic() + timeout
        inside = self.local.exchange(flat, group=layout.local_group, key=key, timeout=timeout)
        result = Handle()
        stages: list[Future[torch.Tensor]] = [inside]
        withdrawn = threading.Event()

        def across() -> Future[torch.Tensor]:
            if withdrawn.is_set():
                raise Cancelled(f"{group.describe()}: exchange {key}: cancelled by the caller")
            left = deadline - time.monotonic()
            if left <= 0:
                raise CollectiveTimeout(f"{group.describe()}: no time left for the gRPC stage")
            block = inside.result().reshape(-1)  # this host's rows, by local index
            second = self.remote.exchange(block, group=remote_group, key=key, timeout=left)
            stages.append(second)
            return second

        def finish(f: Future[torch.Tensor]) -> None:
            if _fail_on_error(f, result):
                blocks = f.result().view(layout.num_hosts, layout.per_host, n)
                out = torch.empty((group.world_size, n), dtype=flat.dtype)
                for h, ranks in enumerate(layout.hosts):
                    for local, rank in enumerate(ranks):
                        out[rank] = blocks[h, local]
                _settle(result, value=out)

        def withdraw() -> bool:
            withdrawn.set()
            pending = [stage for stage in stages if not stage.done()]
            return _withdraw(pending) if pending else not result.done()

        inside.add_done_callback(lambda f: self._then(f, result, across, finish))
        result.bind(withdraw)
        return result

    def _then(
        self,
        first: Future[torch.Tensor],
        result: Future[torch.Tensor],
        start: Callable[[], Future[torch.Tensor]],
        finish: Callable[[Future[torch.Tensor]], None],
    ) -> None:
        """Once `first` succeeded, start the second stage and finish `result` with it."""
        if not _fail_on_error(first, result):
            return
        try:
            if self._closed:
                raise CommError("backend closing")
            second = start()
        except CommError as exc:
            _settle(result, error=exc)
        except Exception as exc:  # a lane refusing the call must not leave `result` pending
            _settle(result, error=CommError(f"gRPC stage failed to start: {exc}"))
        else:
            second.add_done_callback(finish)

    def _route(
        self, group: PeerGroup, peer: int, key: int, tensor: torch.Tensor, role: str
    ) -> tuple[GrpcBackend | TorchDistBackend, PeerGroup, int] | Handle:
        """The lane, its group and the peer's rank in it (module doc); a failed handle if `group` is old."""
        check_call(group, peer, key, tensor, role)
        try:
            layout = self._installed(group)
        except EpochChanged as exc:
            failed = Handle()
            failed.set_exception(exc)
            return failed
        if layout is None:
            return self.remote, group, peer
        for h, ranks in enumerate(layout.hosts):
            if peer in ranks and h == layout.host:
                return self.local, layout.local_group, ranks.index(peer)
            if peer in ranks and ranks.index(peer) == layout.local and layout.remote_group is not None:
                return self.remote, layout.remote_group, h
        raise ValueError(f"{role}: no lane reaches rank {peer} from rank {group.rank} ({group.describe()})")

    def send(self, tensor: torch.Tensor, *, group: PeerGroup, dest: int, key: int, timeout: float) -> Handle:
        """See CollectiveBackend, on the lane that reaches `dest` (module doc)."""
        route = self._route(group, dest, key, tensor, "send")
        if isinstance(route, Handle):
            return route
        lane, lane_group, peer = route
        return lane.send(tensor, group=lane_group, dest=peer, key=key, timeout=timeout)

    def recv(self, out: torch.Tensor, *, group: PeerGroup, src: int, key: int, timeout: float) -> Handle:
        """See CollectiveBackend, on the lane that reaches `src` (module doc)."""
        route = self._route(group, src, key, out, "recv")
        if isinstance(route, Handle):
            return route
        lane, lane_group, peer = route
        return lane.recv(out, group=lane_group, src=peer, key=key, timeout=timeout)

    def release(self, group: PeerGroup, step: int) -> None:
        found = host_layout(group) if group != self._group else self._layout
        layout = found if isinstance(found, HostLayout) else None
        if layout is None:
            self.remote.release(group, step)
            return
        if layout.remote_group is not None:
            self.remote.release(layout.remote_group, step)
        self.local.release(layout.local_group, step)

    # -- accounting and lifecycle ------------------------------------------------------------------

    def accepts_device(self, group: PeerGroup, device: torch.device) -> bool:
        """Device tensors only where every member shares this host (the gRPC lane takes host memory)."""
        if device.type == "cpu":
            return True
        layout = host_layout(group)
        return isinstance(layout, HostLayout) and layout.num_hosts == 1

    def bytes_by_lane(self) -> dict[str, int]:
        """Bytes this rank sent on each lane: {"grpc": ..., "local": ...}."""
        return {"grpc": self.remote.bytes_by_lane()["grpc"], "local": self.local.bytes_by_lane()["local"]}

    def stats(self) -> WireStats:
        a, b = self.remote.stats(), self.local.stats()
        return WireStats(a.bytes_sent + b.bytes_sent, a.bytes_received + b.bytes_received)

    def close(self) -> None:
        """Close both lanes: in-flight calls fail, the lanes' threads are joined."""
        with self._lock:
            self._closed = True
        self.remote.close()
        self.local.close()
        if self.store is not None:
            self.store.close()


def _failed(exc: BaseException) -> Handle:
    failed = Handle()
    failed.set_exception(exc)
    return failed


def _withdraw(stages: list[Future[torch.Tensor]]) -> bool:
    """Cancel the stages of a composed call that are still pending; whether any was withdrawn (its
    failure, Cancelled, then settles the composed handle)."""
    return any([stage.cancel() for stage in stages if isinstance(stage, Handle) and not stage.done()])


def _settle(
    fut: Future[torch.Tensor], *, value: torch.Tensor | None = None, error: BaseException | None = None
) -> None:
    try:
        if error is not None:
            fut.set_exception(error)
        else:
            assert value is not None
            fut.set_result(value)
    except InvalidStateError:
        pass  # the other stage failed it first


def _fail_on_error(stage: Future[torch.Tensor], result: Future[torch.Tensor]) -> bool:
    """Chain a stage's failure into `result` as soon as it happens; True when the stage succeeded."""
    if not stage.done():
        stage.add_done_callback(lambda f: _fail_on_error(f, result))
        return True
    exc = stage.exception()
    if exc is not None:
        _settle(result, error=exc)
    return exc is None


# mypy checks this lane against the contract (communication/backend.py).
_CONTRACT: type[WorkerLane] = HierarchicalBackend
