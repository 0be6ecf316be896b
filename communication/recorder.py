"""The flight recorder: every call through the collective contract, on every lane, in one ring per worker.

``RecordedLane`` wraps a lane (any ``CollectiveBackend``) and records each data-plane and control call as it
is issued and as its handle settles: a sequence id per epoch, the op, the lane, epoch, step, unit or key, the
peers it waits on, its bytes, its state (``queued`` until its lane starts it, ``started``, then ``completed``,
``failed`` or ``cancelled``) and its timestamps (issued, started, ended). ``FlightRecorder`` keeps the
last ``capacity`` calls (default 2,000) and dumps them as JSON with the Python stack of every thread
(``dump``): on request, on a collective timeout (once per epoch), and on SIGUSR1 (the worker daemon
installs the handler). ``head`` is the oldest call still in flight: what this worker is waiting on, and
since when. ``bus_totals`` counts the bytes the completed data collectives moved and their time, from which
the worker reports each step's bus bandwidth.

The wrapper sits at the contract layer, so a call is traced once whatever lane carries it, and recording
is a few attribute writes and a deque append per call (its cost: ``zerowire bench step``).
"""

from __future__ import annotations

import itertools
import json
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from communication.backend import Codec, CollectiveBackend
from communication.errors import Cancelled, CollectiveTimeout
from communication.group import PeerGroup
from communication.handle import Handle
from communication.lane_wrapper import LaneWrapper

DEFAULT_CAPACITY = 2000


@dataclass
class CallRecord:
    seq: int  # per epoch, in issue order
    op: str  # all_gather, reduce_scatter, send, recv, exchange
    lane: str
    job: str
    epoch: int
    rank: int
    step: int | None  # collectives: the step (exchanges and point-to-point calls carry a key instead)
    unit: int | None
    key: int | None
    peers: tuple[int, ...]  # the ranks this call waits on
    bytes: int
    state: str  # queued, started, completed, failed, cancelled
    issued: float  # time.time() of the call
    started: float | None = None  # when its lane started it (None: still queued, or it never started)
    ended: float | None = None
    error: str | None = None


class FlightRecorder:
    """A ring of the last ``capacity`` calls (thread-safe), and its dumps."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY, name: str = "worker") -> None:
        if capacity < 1:
            raise ValueError(f"a flight recorder keeps at least one call, not {capacity}")
        self.name = name
        self._ring: deque[CallRecord] = deque(maxlen=capacity)
        self._lock = threading.Lock()
        self._seq: dict[tuple[str, int], itertools.count[int]] = {}
        self._timeout_dumped: set[int] = set()
        self._bus: dict[tuple[str, str], list[float]] = {}  # (lane, op): [bus bytes, seconds, calls]
        self.dump_dir: Path | None = None  # where dumps on a timeout or SIGUSR1 go (None: not written)
        self.dumped: list[Path] = []

    def begin(self, op: str, lane: str, group: PeerGroup, *, step: int | None, unit: int | None,
              key: int | None, peers: tuple[int, ...], nbytes: int) -> CallRecord:  # fmt: skip
        with self._lock:
            counter = self._seq.setdefault((group.job_id, group.epoch), itertools.count())
            rec = CallRecord(
                next(counter), op, lane, group.job_id, group.epoch, group.rank, step, unit, key, peers,
                nbytes, "queued", time.time(),
            )  # fmt: skip
            self._ring.append(rec)
        return rec

    def start(self, rec: CallRecord) -> None:
        """``rec``'s lane started it (a call that settled first keeps its final state)."""
        with self._lock:
            rec.started = time.time()
            if rec.state == "queued":
                rec.state = "started"

    def end(self, rec: CallRecord, handle: Future[torch.Tensor]) -> None:
        """``rec``'s handle settled: its state, and a dump when it timed out (the first time in its epoch)."""
        error = None if handle.cancelled() else handle.exception()
        cancelled = handle.cancelled() or isinstance(error, Cancelled)
        with self._lock:
            rec.ended = time.time()
            rec.state = "cancelled" if cancelled else "failed" if error is not None else "completed"
            rec.error = None if error is None else f"{type(error).__name__}: {error}"[:500]
        if rec.state == "completed" and rec.op in BUS_FACTORS:
            self._count_bus(rec)
        if isinstance(error, CollectiveTimeout):
            with self._lock:
                first = rec.epoch not in self._timeout_dumped
                self._timeout_dumped.add(rec.epoch)
            if first:
                self.dump_to_dir(f"collective timeout: {rec.op} seq {rec.seq} of epoch {rec.epoch}")

    def _count_bus(self, rec: CallRecord) -> None:
        assert rec.ended is not None
        seconds = rec.ended - (rec.started if rec.started is not None else rec.issued)
        world = len(rec.peers) + 1
        with self._lock:
            totals = self._bus.setdefault((rec.lane, rec.op), [0.0, 0.0, 0.0])
            totals[0] += BUS_FACTORS[rec.op](world) * rec.bytes
            totals[1] += max(seconds, 0.0)
            totals[2] += 1

    def bus_totals(self) -> dict[tuple[str, str], tuple[float, float, int]]:
        """Per (lane, op) of the completed data collectives: the bytes each rank moved on the bus (the
        ring-algorithm count: an all-gather of an S-byte shard over n ranks moves S·(n−1), a reduce-scatter
        of F bytes moves F·(n−1)/n), the seconds the calls took from start to end, and their number. Two
        snapshots give the bus bandwidth between them (``bus_bandwidth``)."""
        with self._lock:
            return {key: (v[0], v[1], int(v[2])) for key, v in self._bus.items()}

    def records(self) -> list[dict[str, Any]]:
        with self._lock:
            return [asdict(r) for r in self._ring]

    def head(self) -> dict[str, Any] | None:
        """The oldest call of the newest epoch still in flight, with how long it has waited (None when
        nothing is; a call of an older epoch that its lane never settled is not what the worker waits on)."""
        with self._lock:
            newest = max((r.epoch for r in self._ring), default=0)
            waiting = next((r for r in self._ring if r.ended is None and r.epoch == newest), None)
            if waiting is None:
                return None
            out = asdict(waiting)
        out["since_s"] = round(time.time() - out["issued"], 3)
        return out

    def dump(self, reason: str) -> dict[str, Any]:
        """The calls and the stack of every thread, as one JSON-able object."""
        frames = sys._current_frames()
        names = {t.ident: t.name for t in threading.enumerate()}
        stacks = {
            f"{names.get(ident, 'thread')} ({ident})": "".join(traceback.format_stack(frame))
            for ident, frame in frames.items()
        }
        return {"recorder": self.name, "reason": reason, "time": time.time(), "head": self.head(),
                "calls": self.records(), "stacks": stacks}  # fmt: skip

    def dump_to_dir(self, reason: str) -> Path | None:
        """Write a dump to ``dump_dir`` (flight-NAME-TIME.json); its path, or None without a folder."""
        if self.dump_dir is None:
            return None
        path = self.dump_dir / f"flight-{self.name}-{time.strftime('%Y%m%dT%H%M%S')}-{len(self.dumped)}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.dump(reason), indent=1))
        tmp.replace(path)
        self.dumped.append(path)
        return path


# Bus bytes per byte recorded (the shard of an all-gather, the full input of a reduce-scatter), by world size.
BUS_FACTORS: dict[str, Callable[[int], float]] = {
    "all_gather": lambda n: float(n - 1),
    "reduce_scatter": lambda n: (n - 1) / n,
}


def bus_bandwidth(
    before: dict[tuple[str, str], tuple[float, float, int]],
    after: dict[tuple[str, str], tuple[float, float, int]],
) -> dict[str, float]:
    """Bus bandwidth (bytes per second) of the collectives completed between two ``bus_totals``, keyed
    ``"lane/op"``: bus bytes over the seconds the calls took (time-weighted, so overlapping calls each
    count their own time)."""
    out: dict[str, float] = {}
    for (lane, op), (nbytes, seconds, calls) in after.items():
        b0, s0, c0 = before.get((lane, op), (0.0, 0.0, 0))
        if calls > c0 and seconds - s0 > 0:
            out[f"{lane}/{op}"] = (nbytes - b0) / (seconds - s0)
    return out


def lane_label(lane: object) -> str:
    """A lane's name in records and metrics: its class name, lower case, less "Backend" (``grpc``,
    ``torchdist``, ``hierarchical``)."""
    name = type(lane).__name__
    return (name[: -len("Backend")] if name.endswith("Backend") and name != "Backend" else name).lower()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class RecordedLane(LaneWrapper):
    """A lane whose every call goes through ``recorder`` (see the module docstring); the rest is its own."""

    def __init__(self, lane: CollectiveBackend, recorder: FlightRecorder, name: str = "") -> None:
        super().__init__(lane)
        self.recorder = recorder
        self._name = name or lane_label(lane)

    def _record(self, call: Callable[[], Handle], rec: CallRecord) -> Handle:
        try:
            handle = call()
        except BaseException as exc:
            rec.ended, rec.state, rec.error = time.time(), "failed", f"{type(exc).__name__}: {exc}"[:500]
            raise
        handle.on_start(lambda: self.recorder.start(rec))
        handle.add_done_callback(lambda h: self.recorder.end(rec, h))
        return handle

    def _others(self, group: PeerGroup) -> tuple[int, ...]:
        return tuple(r for r in range(group.world_size) if r != group.rank)

    def all_gather(self, group: PeerGroup, step: int, unit: int, shard: torch.Tensor, out: torch.Tensor,
                   timeout: float, *, codec: Codec = "none") -> Handle:  # fmt: skip
        rec = self.recorder.begin("all_gather", self._name, group, step=step, unit=unit, key=None,
                                  peers=self._others(group), nbytes=_nbytes(shard))  # fmt: skip
        return self._record(
            lambda: self._lane.all_gather(group, step, unit, shard, out, timeout, codec=codec), rec
        )

    def reduce_scatter(self, group: PeerGroup, step: int, unit: int, full: torch.Tensor, out: torch.Tensor,
                       timeout: float, *, codec: Codec = "none") -> Handle:  # fmt: skip
        rec = self.recorder.begin("reduce_scatter", self._name, group, step=step, unit=unit, key=None,
                                  peers=self._others(group), nbytes=_nbytes(full))  # fmt: skip
        return self._record(
            lambda: self._lane.reduce_scatter(group, step, unit, full, out, timeout, codec=codec), rec
        )

    def send(self, tensor: torch.Tensor, *, group: PeerGroup, dest: int, key: int, timeout: float) -> Handle:
        rec = self.recorder.begin("send", self._name, group, step=None, unit=None, key=key, peers=(dest,),
                                  nbytes=_nbytes(tensor))  # fmt: skip
        return self._record(
            lambda: self._lane.send(tensor, group=group, dest=dest, key=key, timeout=timeout), rec
        )

    def recv(self, out: torch.Tensor, *, group: PeerGroup, src: int, key: int, timeout: float) -> Handle:
        rec = self.recorder.begin("recv", self._name, group, step=None, unit=None, key=key, peers=(src,),
                                  nbytes=_nbytes(out))  # fmt: skip
        return self._record(lambda: self._lane.recv(out, group=group, src=src, key=key, timeout=timeout), rec)

    def exchange(self, values: torch.Tensor, *, group: PeerGroup, key: int, timeout: float) -> Handle:
        rec = self.recorder.begin("exchange", self._name, group, step=None, unit=None, key=key,
                                  peers=self._others(group), nbytes=_nbytes(values))  # fmt: skip
        return self._record(lambda: self._lane.exchange(values, group=group, key=key, timeout=timeout), rec)


# mypy checks the wrapper against the contract it stands in for.
_CONTRACT: type[CollectiveBackend] = RecordedLane
