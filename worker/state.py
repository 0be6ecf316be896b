"""Where a worker stands, in one object with one owner: the manager (``worker.manager``).

- the **announced epoch**: the newest membership epoch the coordinator told this worker of (registration,
  barrier and heartbeat answers report it through :meth:`WorkerState.announce`, which fails the lane's calls
  of every older epoch at once);
- the **installed epoch**: the ``PeerGroup`` (and the members' worker ids) this worker trains in, installed by
  the manager when a formation starts; it is current while no newer epoch was announced and it was not
  retired (:meth:`WorkerState.retire`: a stop, or an eviction while the training is stalled);
- the **layout**: the training state held for the current partition, and the last confirmed one until a step
  commits in the current one (``worker.recovery.Holding``);
- the **committed step** (the last step applied on every member) and the **staged step** (the update this
  rank staged and has not applied yet).

The heartbeat, the rendezvous and the daemon read it (:meth:`WorkerState.view`); only the manager changes the
installed epoch, the layout and the steps. Every read and write holds one lock: the training thread and the
event loop share the object.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from communication.errors import EpochChanged
from communication.group import PeerGroup

if TYPE_CHECKING:
    from worker.recovery import Holding


class EpochSink(Protocol):
    """The lane's side of an epoch change (``CollectiveBackend.set_epoch``): calls of older epochs fail."""

    def set_epoch(self, epoch: int) -> None: ...


@dataclass(frozen=True)
class StateView:
    """A consistent reading of the worker's state (what the heartbeat reports)."""

    announced_epoch: int
    epoch: int  # the installed epoch (0 before the first formation)
    rank: int | None
    world_size: int | None
    committed_step: int  # -1: none yet
    staged_step: int | None


class WorkerState:
    """The one record of the worker's epoch, group, layout and steps (see the module docstring)."""

    def __init__(self, lane: EpochSink) -> None:
        self._lane = lane
        self._lock = threading.Lock()
        self._announced = 0
        self._retired = -1  # the installed epochs up to this one are over (stop, eviction while stalled)
        self._group: PeerGroup | None = None
        self._ids: tuple[str, ...] = ()
        self._committed = -1
        self._staged: int | None = None
        self._current: Holding | None = None
        self._previous: Holding | None = None

    # -- what the coordinator said ---------------------------------------------------------------------
    def announce(self, epoch: int) -> bool:
        """The coordinator told of ``epoch``. True when it is newer than any before: then the lane fails
        every call of an older epoch at once (the training thread sees EpochChanged and re-forms)."""
        with self._lock:
            newer = epoch > self._announced
            if newer:
                self._announced = epoch
        if newer:
            self._lane.set_epoch(epoch)
        return newer

    def retire(self) -> None:
        """The installed epoch is over for this worker (a stop, or evicted while its training stalls): its
        calls fail now, and no step of it commits. The lane's floor moves just past it: every epoch up to
        the installed one is over; no epoch number is announced that the coordinator did not announce."""
        with self._lock:
            installed = self._group.epoch if self._group is not None else 0
            self._retired = max(self._retired, installed)
            floor = max(self._announced, installed + 1)
        self._lane.set_epoch(floor)

    # -- the manager's ---------------------------------------------------------------------------------
    def install(self, group: PeerGroup, ids: tuple[str, ...]) -> None:
        """A formation starts in ``group``; EpochChanged if a newer epoch was announced or it was retired."""
        with self._lock:
            if self._announced > group.epoch or group.epoch <= self._retired:
                raise EpochChanged(
                    f"{group.describe()}: epoch {self._announced} was announced, or it was retired"
                )
            self._announced = group.epoch
            self._group, self._ids, self._staged = group, ids, None

    def check_current(self, group: PeerGroup) -> None:
        """EpochChanged unless ``group``'s epoch is still the one to train in."""
        with self._lock:
            announced, retired = self._announced, self._retired
        if announced > group.epoch or group.epoch <= retired:
            raise EpochChanged(f"{group.describe()}: epoch {announced} was announced, or it was retired")

    def stage(self, step: int) -> None:
        with self._lock:
            self._staged = step

    def commit(self, step: int) -> None:
        """Step ``step`` was applied on every member (or skipped on every member)."""
        with self._lock:
            self._committed = max(self._committed, step)
            if self._staged is not None and self._staged <= step:
                self._staged = None

    def adopt(self, current: Holding, keep: Holding | None) -> list[Holding]:
        """The formation's new holding, keeping ``keep`` (the last confirmed one) until a step commits in
        the new layout; returns the holdings let go (the caller closes their engines)."""
        with self._lock:
            dropped = [h for h in (self._current, self._previous) if h is not None and h is not keep]
            self._current, self._previous = current, keep
        return dropped

    def confirm(self) -> Holding | None:
        """A step committed in the current layout: every member adopted it. Returns the previous holding,
        now let go (the caller closes its engine), if there was one."""
        with self._lock:
            current = self._current
            if current is None or current.confirmed:
                return None
            current.confirmed = True
            dropped, self._previous = self._previous, None
        return dropped

    # -- reads -----------------------------------------------------------------------------------------
    @property
    def announced_epoch(self) -> int:
        with self._lock:
            return self._announced

    @property
    def group(self) -> PeerGroup | None:
        with self._lock:
            return self._group

    @property
    def committed_step(self) -> int:
        with self._lock:
            return self._committed

    def holdings(self) -> tuple[Holding | None, Holding | None]:
        """(current, previous)."""
        with self._lock:
            return self._current, self._previous

    def view(self) -> StateView:
        with self._lock:
            g = self._group
            return StateView(
                announced_epoch=self._announced,
                epoch=0 if g is None else g.epoch,
                rank=None if g is None else g.rank,
                world_size=None if g is None else g.world_size,
                committed_step=self._committed,
                staged_step=self._staged,
            )
