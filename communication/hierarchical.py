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
from collections.abc import Mapping
from dataclasses import replace

import torch

from communication.backend import UnitSpec, WireStats, WorkerLane
from communication.errors import EpochChanged
from communication.group import PeerGroup
from communication.grpc_backend import GrpcBackend
from communication.handle import Handle
from communication.hierarchical_calls import HierarchicalCalls
from communication.host_layout import HostLayout, host_layout
from communication.p2p import check_call
from communication.rendezvous_store import RendezvousStore
from communication.torchdist import TorchDistBackend

log = logging.getLogger(__name__)


class HierarchicalBackend(HierarchicalCalls):
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


# mypy checks this lane against the contract (communication/backend.py).
_CONTRACT: type[WorkerLane] = HierarchicalBackend
