"""The coordinator's state, as immutable values: worker records, the cluster state of an epoch, events,
and what a decision or a heartbeat returns. Membership decisions (coordinator/membership.py) are pure
functions over them; the service applies them and the store persists them."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

WorkerStatus = Literal["alive", "dead", "left"]
WorkerState = Literal["starting", "waiting", "training", "stalled", "finished", "failed"]
ClusterPhase = Literal["waiting", "training", "reforming", "finished", "failed"]
Action = Literal["continue", "reform", "stop"]
EventKind = Literal[
    "joined", "rejoined", "left", "evicted", "died", "epoch", "coordinator_restarted", "recovered"
]


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    host: str
    port: int
    host_id: str
    device: str
    device_name: str | None = None
    memory_bytes: int | None = None
    version: str | None = None
    store_port: int | None = None  # its rendezvous store for co-located torch.distributed groups


@dataclass(frozen=True, slots=True)
class WorkerRecord:
    worker_id: str
    info: WorkerInfo
    status: WorkerStatus
    rank: int | None
    joined_wall: float
    last_heartbeat: float  # monotonic seconds of this coordinator process
    last_heartbeat_wall: float
    epoch_seen: int
    step: int = 0
    loss: float | None = None
    samples_per_s: float | None = None
    bytes_sent: int = 0
    bytes_received: int = 0
    state: WorkerState = "starting"
    committed_step: int = -1  # the last step the worker committed (-1: none yet)
    # Optional per-step telemetry (compute/comm/wait seconds, evaluation); memory only, refreshed by
    # every heartbeat, so a restarted coordinator shows it again after one beat.
    telemetry: Mapping[str, object] = dataclasses.field(default_factory=dict)
    # sha256 of the worker's secret (b"": none on record, so no secret matches)
    secret_digest: bytes = dataclasses.field(default=b"", repr=False)
    ended_wall: float | None = None  # unix seconds when it died or left (purged after the retention)
    # Its values were read back from the database by a restarted coordinator and no heartbeat has refreshed
    # them yet: they are as old as last_heartbeat_wall, whatever the expiry clock (last_heartbeat) says.
    restored: bool = False


@dataclass(frozen=True, slots=True)
class Event:
    kind: EventKind
    worker_id: str | None
    epoch: int
    reason: str
    time: float


@dataclass(frozen=True, slots=True)
class ClusterState:
    epoch: int = 0
    workers: Mapping[str, WorkerRecord] = dataclasses.field(default_factory=dict)
    finished: bool = False  # sticky: a member reported the job finished
    trained: bool = False  # sticky: a member has reported training at least once
    grace_until: float = float("-inf")  # monotonic; expiry clocks never run before it

    def alive(self) -> list[WorkerRecord]:
        return [w for w in self.workers.values() if w.status == "alive"]


@dataclass(frozen=True, slots=True)
class Decision:
    state: ClusterState
    events: tuple[Event, ...]
    reason: str
    changed: tuple[str, ...]  # worker ids whose records changed
    world_size: int  # live workers after the decision


@dataclass(frozen=True, slots=True)
class Heartbeat:
    epoch: int
    step: int = 0
    loss: float | None = None
    samples_per_s: float | None = None
    bytes_sent: int | None = None
    bytes_received: int | None = None
    state: WorkerState | None = None
    telemetry: Mapping[str, object] = dataclasses.field(default_factory=dict)
    committed_step: int | None = None  # None: not reported (the record keeps its value)


@dataclass(frozen=True, slots=True)
class HeartbeatOutcome:
    record: WorkerRecord
    member: bool  # False: the worker left; it is told to stop and nothing changes
    reason: str
