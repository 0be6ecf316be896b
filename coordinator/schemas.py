"""Pydantic models of the REST API (request bodies are validated here; bad input answers 422)."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StringConstraints, field_validator

WORKER_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$"
HOST_PATTERN = r"^[A-Za-z0-9.:\-\[\]%_]+$"
WorkerStateLit = Literal["starting", "waiting", "training", "stalled", "finished", "failed"]


class RegisterRequest(BaseModel):
    worker_id: str | None = Field(None, pattern=WORKER_ID_PATTERN, description="omit to get a generated id")
    host: str = Field(min_length=1, max_length=253, pattern=HOST_PATTERN, description="advertised gRPC host")
    port: int = Field(ge=1, le=65535, description="advertised gRPC port")
    host_id: str = Field(min_length=1, max_length=128, description="identifies the machine (co-location)")
    device: str = Field(min_length=1, max_length=64)
    device_name: str | None = Field(None, max_length=256)
    memory_bytes: int | None = Field(None, ge=0, le=1 << 60)
    version: str | None = Field(None, max_length=64)
    store_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="port of the rendezvous store this worker hosts on `host` for the torch.distributed "
        "groups of its host's workers (omit when it hosts none)",
    )


class RegisterResponse(BaseModel):
    worker_id: str
    epoch: int
    heartbeat_interval_s: float
    heartbeat_timeout_s: float
    progress_timeout_s: float = Field(
        description="seconds this worker's training may go without progress before it says `stalled` "
        "in its heartbeats (and is evicted)"
    )
    rank: int
    world_size: int
    worker_secret: str = Field(
        description="this worker's secret: the bearer credential of its heartbeats, leave and barrier calls, "
        "and the X-Worker-Secret of a re-registration. Shown once; the coordinator keeps only its sha256"
    )


class RecoveryReport(BaseModel):
    """How the worker's current epoch was formed (worker/recovery.py): the state it continued from."""

    epoch: int = Field(ge=0, le=1 << 62)
    mode: Literal["fresh", "handover", "join", "checkpoint"]
    resumed_at: int = Field(ge=0, le=1 << 62, description="the first step the epoch runs")
    steps_lost: int = Field(ge=0, le=1 << 62, description="committed steps redone (checkpoint fallback)")


class HeartbeatRequest(BaseModel):
    epoch: int = Field(ge=0, le=1 << 62)
    step: int = Field(0, ge=0, le=1 << 62)
    loss: float | None = None
    samples_per_s: float | None = Field(None, ge=0.0)
    bytes_sent: int | None = Field(None, ge=0, le=1 << 62)
    bytes_received: int | None = Field(None, ge=0, le=1 << 62)
    state: WorkerStateLit | None = Field(
        None, description='"stalled": this worker\'s training made no progress in time; it is evicted'
    )
    committed_step: int | None = Field(
        None, ge=-1, le=1 << 62, description="the last step this worker committed (-1: none yet)"
    )
    compute_s: float | None = Field(None, ge=0.0, description="last step: seconds computing")
    comm_s: float | None = Field(None, ge=0.0, description="last step: seconds with collectives in flight")
    wait_s: float | None = Field(None, ge=0.0, description="last step: seconds blocked on the network")
    test_loss: float | None = Field(None, ge=0.0, description="latest evaluation loss")
    test_accuracy: float | None = Field(None, ge=0.0, le=1.0, description="latest evaluation accuracy")
    bytes_by_lane: dict[Literal["grpc", "local"], int] | None = Field(
        None,
        description="bytes this worker has sent, by data-plane lane (gRPC across hosts, local on its host)",
    )
    recovery: RecoveryReport | None = Field(None, description="how this worker's epoch was formed")

    @field_validator("bytes_by_lane")
    @classmethod
    def _lane_bytes(cls, v: dict[str, int] | None) -> dict[str, int] | None:
        if v is not None and any(not 0 <= n <= 1 << 62 for n in v.values()):
            raise ValueError("lane byte counts must be between 0 and 2**62")
        return v

    @field_validator("loss", "samples_per_s", "compute_s", "comm_s", "wait_s", "test_loss")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v


TELEMETRY_FIELDS = ("compute_s", "comm_s", "wait_s", "test_loss", "test_accuracy", "bytes_by_lane")


class HeartbeatResponse(BaseModel):
    epoch: int
    action: Literal["continue", "reform", "stop"]
    rank: int | None
    world_size: int
    cluster_state: str


class WorkerView(BaseModel):
    worker_id: str
    rank: int | None
    state: Literal["alive", "dead", "left"]
    worker_state: WorkerStateLit
    last_heartbeat_age_s: float
    step: int
    loss: float | None
    samples_per_s: float | None
    bytes_sent: int
    bytes_received: int
    epoch_seen: int
    committed_step: int = Field(description="the last step the worker committed (-1: none reported)")
    compute_s: float | None = None
    comm_s: float | None = None
    wait_s: float | None = None
    test_loss: float | None = None
    test_accuracy: float | None = None
    bytes_by_lane: dict[str, int] | None = None
    host: str
    port: int
    host_id: str
    device: str
    device_name: str | None
    memory_bytes: int | None
    version: str | None
    joined_at: float


class WorkersResponse(BaseModel):
    epoch: int
    workers: list[WorkerView]


class RankedWorkerView(BaseModel):
    worker_id: str
    ip_address: str
    port: int
    rank: int
    host_id: str
    store_port: int | None = None


class SuspectRequest(BaseModel):
    epoch: int = Field(ge=0, le=1 << 62, description="the epoch the report is about: the current one")
    suspect: StrictInt | Annotated[str, StringConstraints(pattern=WORKER_ID_PATTERN)] = Field(
        description="the peer found unreachable or stalled: its rank in the epoch, or its worker id"
    )
    reason: str = Field(min_length=1, max_length=200, pattern=r"^[\x20-\x7e]+$")

    @field_validator("suspect")
    @classmethod
    def _rank(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 0 <= v < 1 << 20:
            raise ValueError("a rank is between 0 and 2**20")
        return v


class SuspectResponse(BaseModel):
    epoch: int = Field(description="the current epoch, after the report was weighed")
    suspect: str = Field(description="the worker id of the reported peer")
    reporters: int = Field(description="members that have reported this peer in the epoch reported on")
    evicted: str | None = Field(description="the worker this report led the coordinator to evict, if any")


class ReadyResponse(BaseModel):
    ready: bool
    epoch: int
    active_workers: int
    min_workers: int
    job_hash: str
    workers: list[RankedWorkerView]
    committed_step: int = Field(
        -1, description="the highest step any worker of the job reported committed (-1: none yet)"
    )
    peer_keys: dict[str, str] = Field(
        default_factory=dict,
        description="for a caller that is a member of this epoch: every other member's worker_id -> the hex "
        "data-plane key of that pair in this epoch (empty otherwise)",
    )


class JobResponse(BaseModel):
    job: dict[str, Any]
    job_hash: str
    collective_timeout_s: float = Field(description="workers' collective timeout after an epoch's first step")
    startup_timeout_s: float = Field(
        description="workers' collective timeout until an epoch's first step is committed (model build, "
        "resume, first step); >= collective_timeout_s"
    )
    barrier_timeout_s: float = Field(description="how long a worker waits at the barrier for an epoch")


class ClusterStatus(BaseModel):
    state: Literal["waiting", "training", "reforming", "finished", "failed"]
    epoch: int
    world_size: int
    step: int
    workers: list[WorkerView]
    job: dict[str, Any]
    job_hash: str
    started_at: float
    uptime_s: float


class EventView(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    time: float
    kind: str
    worker_id: str | None
    epoch: int
    reason: str


class EventsResponse(BaseModel):
    events: list[EventView]
    last_id: int


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class ErrorBody(BaseModel):
    detail: str


class ValidationIssue(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ValidationErrorBody(BaseModel):
    detail: list[ValidationIssue]
