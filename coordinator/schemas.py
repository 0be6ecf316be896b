"""Pydantic models of the REST API (request bodies are validated here; bad input answers 422).

In request bodies a number must be a JSON number: a number as a string or a boolean is refused, not
converted (an integral number such as 3.0 is an integer, as JSON Schema says). Every bound the models
enforce is part of the schema they publish."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints

WORKER_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$"
HOST_PATTERN = r"^[A-Za-z0-9.:\-\[\]%_]+$"


def _json_number(value: Any) -> Any:
    if isinstance(value, (str, bytes, bool)):
        raise ValueError("must be a JSON number")
    return value


# The bounds come first, so that they stay keywords of the published schema; then the JSON-number check.
_NUMBER = BeforeValidator(_json_number)
# Steps, epochs and byte counts: integers of at most 2**62 (exact in every JSON reader that keeps integers).
Count = Annotated[int, Field(ge=0, le=1 << 62), _NUMBER]
Port = Annotated[int, Field(ge=1, le=65535), _NUMBER]
MemoryBytes = Annotated[int, Field(ge=0, le=1 << 60), _NUMBER]
StepOrNone = Annotated[int, Field(ge=-1, le=1 << 62), _NUMBER]  # -1: no step yet
MAX_RANKS = 1 << 20
Rank = Annotated[int, Field(ge=0, lt=MAX_RANKS), _NUMBER]
Finite = Annotated[float, Field(allow_inf_nan=False), _NUMBER]
NonNegative = Annotated[float, Field(ge=0.0, allow_inf_nan=False), _NUMBER]
Fraction = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False), _NUMBER]
WorkerStateLit = Literal["starting", "waiting", "training", "stalled", "finished", "failed"]


class RegisterRequest(BaseModel):
    worker_id: str | None = Field(None, pattern=WORKER_ID_PATTERN, description="omit to get a generated id")
    host: str = Field(min_length=1, max_length=253, pattern=HOST_PATTERN, description="advertised gRPC host")
    port: Port = Field(description="advertised gRPC port")
    host_id: str = Field(min_length=1, max_length=128, description="identifies the machine (co-location)")
    device: str = Field(min_length=1, max_length=64)
    device_name: str | None = Field(None, max_length=256)
    memory_bytes: MemoryBytes | None = None
    version: str | None = Field(None, max_length=64)
    store_port: Port | None = Field(
        None,
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

    epoch: Count
    mode: Literal["fresh", "handover", "join", "checkpoint"]
    resumed_at: Count = Field(description="the first step the epoch runs")
    steps_lost: Count = Field(description="committed steps redone (checkpoint fallback)")
    seconds: NonNegative | None = Field(None, description="how long this worker took to form the epoch")


# "lane/op" of the bus bandwidth a worker reports (its lanes, communication.recorder.lane_label, by data op):
# any short name, so that a lane the coordinator does not know never costs a worker its heartbeat
BusKey = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class WaitingReport(BaseModel):
    """The head of a worker's flight recorder: its oldest call through the collective contract still in
    flight (communication/recorder.py), reported once it has waited half a second."""

    op: Literal["all_gather", "reduce_scatter", "send", "recv", "exchange"]
    lane: str = Field(max_length=64)
    epoch: Count
    step: Count | None = None
    unit: Count | None = None
    key: Count | None = None
    peers: list[Rank] = Field(max_length=4096, description="the ranks the call waits on")
    since_s: NonNegative


class HeartbeatRequest(BaseModel):
    epoch: Count
    step: Count = 0
    loss: Finite | None = None
    samples_per_s: NonNegative | None = None
    bytes_sent: Count | None = None
    bytes_received: Count | None = None
    state: WorkerStateLit | None = Field(
        None, description='"stalled": this worker\'s training made no progress in time; it is evicted'
    )
    committed_step: StepOrNone | None = Field(
        None, description="the last step this worker committed (-1: none yet)"
    )
    compute_s: NonNegative | None = Field(None, description="last step: seconds computing")
    comm_s: NonNegative | None = Field(None, description="last step: seconds with collectives in flight")
    wait_s: NonNegative | None = Field(None, description="last step: seconds blocked on the network")
    data_wait_s: NonNegative | None = Field(None, description="last step: seconds waiting for its data")
    test_loss: NonNegative | None = Field(None, description="latest evaluation loss")
    test_accuracy: Fraction | None = Field(None, description="latest evaluation accuracy")
    loss_step: Count | None = Field(None, description="the step whose loss `loss` is")
    test_step: StepOrNone | None = Field(
        None, description="the committed step after which the latest evaluation ran (-1: before any)"
    )
    bytes_by_lane: dict[Literal["grpc", "local"], Count] | None = Field(
        None,
        description="bytes this worker has sent, by data-plane lane (gRPC across hosts, local on its host)",
    )
    bus_bandwidth: dict[BusKey, NonNegative] | None = Field(
        None,
        max_length=16,
        description='bus bandwidth in bytes/s of the data collectives of its last step, by "lane/op"',
    )
    staging_overflows: Count | None = Field(
        None,
        description="host staging buffers its engine handed out beyond its pinned pools (synchronous "
        "copies), since it started",
    )
    recovery: RecoveryReport | None = Field(None, description="how this worker's epoch was formed")
    waiting: WaitingReport | None = Field(None, description="the collective this worker waits in, if any")
    stack: str | None = Field(
        None, max_length=8000, description="while its training makes no progress: its training thread's stack"
    )


TELEMETRY_FIELDS = (
    "compute_s",
    "comm_s",
    "wait_s",
    "data_wait_s",
    "test_loss",
    "test_accuracy",
    "loss_step",
    "test_step",
    "bytes_by_lane",
    "bus_bandwidth",
    "staging_overflows",
    "waiting",
    "stack",
)


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
    last_heartbeat_age_s: float = Field(
        description="seconds since its last heartbeat, by the expiry clock (which a restarted coordinator "
        "starts anew for its live workers)"
    )
    values_age_s: float = Field(
        description="how old the heartbeat this view's values came from is: after a coordinator restart, "
        "the age of the last one stored before it, until the worker's next heartbeat"
    )
    restored: bool = Field(
        description="the values were read back from the database after a coordinator restart; no heartbeat "
        "has refreshed them yet"
    )
    straggler_ratio: float | None = Field(
        None, description="its last step time over the fastest live member's (1: the fastest)"
    )
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
    data_wait_s: float | None = None
    test_loss: float | None = None
    test_accuracy: float | None = None
    loss_step: int | None = None
    test_step: int | None = None
    bytes_by_lane: dict[str, int] | None = None
    bus_bandwidth: dict[str, float] | None = None
    staging_overflows: int | None = None
    waiting: dict[str, Any] | None = None
    stack: str | None = None
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
    epoch: Count = Field(description="the epoch the report is about: the current one")
    suspect: Rank | Annotated[str, StringConstraints(pattern=WORKER_ID_PATTERN)] = Field(
        description="the peer found unreachable or stalled: its rank in the epoch, or its worker id"
    )
    reason: str = Field(min_length=1, max_length=200, pattern=r"^[\x20-\x7e]+$")


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
    now: float = Field(description="unix seconds of this answer (events' times are on the same clock)")
    heartbeat_interval_s: float = Field(description="how often workers send a heartbeat")


class Suspect(BaseModel):
    worker_id: str
    rank: int
    host: str | None
    reason: str


class Waiting(BaseModel):
    worker_id: str
    rank: int
    op: str | None
    lane: str | None
    epoch: int | None
    step: int | None
    unit: int | None
    waiting_on_ranks: list[int]
    since_s: float


class Diagnosis(BaseModel):
    """Who holds the job up and why (coordinator/diagnosis.py)."""

    epoch: int
    suspects: list[Suspect]
    waiting: list[Waiting]
    summary: str


class LossPoint(BaseModel):
    step: int
    time: float = Field(description="unix seconds when the coordinator first heard of it")
    loss: float | None


class EvalPoint(BaseModel):
    step: int = Field(description="the committed step after which the evaluation ran")
    time: float
    test_loss: float | None
    test_accuracy: float | None


class FormationView(BaseModel):
    epoch: int
    mode: str = Field(
        description="the most telling of the members' modes (checkpoint, join, handover, fresh)"
    )
    modes: list[str]
    resumed_at: int = Field(description="the first step the epoch ran")
    steps_lost: int = Field(description="committed steps redone (a checkpoint fallback)")
    seconds: float | None = Field(description="the slowest member's formation (None: no member said)")
    workers: int = Field(description="members that reported how they formed it")
    time: float = Field(description="unix seconds of the latest member's report")


class History(BaseModel):
    """What the training has done so far (coordinator/history.py), as the workers' heartbeats told it."""

    loss: list[LossPoint] = Field(
        description="the loss of the committed steps the heartbeats reported (each heartbeat reports its "
        "worker's latest: when steps are faster than heartbeats, a sample of them), thinned past `max_points`"
    )
    eval: list[EvalPoint] = Field(description="test loss and accuracy per evaluation")
    formations: list[FormationView] = Field(description="how each epoch was formed, oldest first")
    max_points: int = Field(description="the most points a curve keeps: past it, every other one is dropped")


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
