"""What the training has done so far, as the workers' heartbeats tell it: the loss and evaluation curves (a
bounded series of points per committed step) and the formations of every epoch (how it was formed, what it
cost). The coordinator keeps them in memory, persists them through the store, and serves them at
``GET /cluster/history``.

A series keeps at most ``max_points`` points: when it grows past them, every other point of it is dropped
(the first and the newest stay), so a long run keeps its whole curve at a coarser grain. What changed since
the store last wrote is handed to it by ``drain()``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

MAX_POINTS = 1000  # per series: enough for a curve a page draws, bounded for a run of any length
MAX_EPOCHS = 200  # formations kept: the newest epochs'

# A formation's mode as one word for the whole epoch: the most telling of its members' modes (a joiner says
# "join" while the others hand over; a checkpoint fallback is the same on every rank).
MODE_ORDER = ("checkpoint", "join", "handover", "fresh")

CurveRow = tuple[str, int, float, float | None, float | None]  # series, step, time, first value, second value
FormationRow = tuple[int, str, str, int, int, float | None, float]  # epoch, worker, mode, resumed, lost, s, t


def mode_rank(mode: str) -> tuple[int, str]:
    """Sort key of formation modes: the most telling first."""
    return (MODE_ORDER.index(mode) if mode in MODE_ORDER else len(MODE_ORDER), mode)


@dataclass
class Series:
    """Points keyed by step: ``step -> (time, values)``; a step reported again with other values (a step
    redone after a checkpoint fallback) takes the newer ones."""

    name: str
    max_points: int = MAX_POINTS
    points: dict[int, tuple[float, tuple[float | None, float | None]]] = field(default_factory=dict)
    upserts: set[int] = field(default_factory=set)
    deletes: set[int] = field(default_factory=set)

    def put(self, step: int, values: tuple[float | None, float | None], wall: float) -> None:
        known = self.points.get(step)
        if known is not None and known[1] == values:
            return  # every member reports the same step: the first report is the point
        self.points[step] = (wall, values)
        self.upserts.add(step)
        self.deletes.discard(step)
        if len(self.points) > self.max_points:
            self._thin()

    def _thin(self) -> None:
        steps = sorted(self.points)
        keep = set(steps[::2]) | {steps[-1]}
        for step in steps:
            if step not in keep:
                del self.points[step]
                self.upserts.discard(step)
                self.deletes.add(step)

    def load(self, step: int, wall: float, values: tuple[float | None, float | None]) -> None:
        self.points[step] = (wall, values)

    def rows(self) -> list[tuple[int, float, tuple[float | None, float | None]]]:
        return [(step, *self.points[step]) for step in sorted(self.points)]

    def drain(self) -> tuple[list[CurveRow], list[tuple[str, int]]]:
        upserts = [(self.name, s, self.points[s][0], *self.points[s][1]) for s in sorted(self.upserts)]
        deletes = [(self.name, s) for s in sorted(self.deletes)]
        self.upserts.clear()
        self.deletes.clear()
        return upserts, deletes


@dataclass(frozen=True)
class FormationReport:
    """One member's report of how it formed an epoch (its heartbeat's ``recovery``)."""

    worker_id: str
    mode: str
    resumed_at: int
    steps_lost: int
    seconds: float | None
    time: float


class TrainingHistory:
    """The loss curve (``loss``: the step's loss), the evaluation curve (``eval``: test loss and accuracy,
    at the committed step after which the evaluation ran) and the formations of the newest epochs."""

    def __init__(self, max_points: int = MAX_POINTS, max_epochs: int = MAX_EPOCHS) -> None:
        self.loss = Series("loss", max_points)
        self.eval = Series("eval", max_points)
        self.max_epochs = max_epochs
        self.formations: dict[int, dict[str, FormationReport]] = {}

    # -- what the heartbeats say ---------------------------------------------------------------------
    def observe(self, telemetry: Mapping[str, Any], loss: float | None, wall: float) -> None:
        """One heartbeat's loss (of step ``loss_step``) and evaluation (after step ``test_step``); a value
        without the step it belongs to is no point."""
        step = telemetry.get("loss_step")
        if loss is not None and isinstance(step, int) and step >= 0:
            self.loss.put(step, (loss, None), wall)
        test_step = telemetry.get("test_step")
        test_loss, accuracy = telemetry.get("test_loss"), telemetry.get("test_accuracy")
        if isinstance(test_step, int) and test_step >= 0 and (test_loss is not None or accuracy is not None):
            self.eval.put(test_step, (_float(test_loss), _float(accuracy)), wall)

    def note_formation(self, epoch: int, report: FormationReport) -> int | None:
        """Record a member's formation of ``epoch``. Returns the oldest epoch kept when older ones were
        dropped (the store forgets them too), else None."""
        self.formations.setdefault(epoch, {})[report.worker_id] = report
        if len(self.formations) <= self.max_epochs:
            return None
        for old in sorted(self.formations)[: len(self.formations) - self.max_epochs]:
            del self.formations[old]
        return min(self.formations)

    # -- persistence -----------------------------------------------------------------------------------
    def load(self, curve: Iterable[CurveRow], formations: Iterable[FormationRow]) -> None:
        series = {"loss": self.loss, "eval": self.eval}
        for name, step, wall, first, second in curve:
            if name in series:
                series[name].load(step, wall, (first, second))
        for epoch, wid, mode, resumed_at, steps_lost, seconds, wall in formations:
            self.formations.setdefault(epoch, {})[wid] = FormationReport(
                wid, mode, resumed_at, steps_lost, seconds, wall
            )

    def drain(self) -> tuple[list[CurveRow], list[tuple[str, int]]]:
        """The curve points changed and dropped since the last drain (for the store)."""
        upserts, deletes = self.loss.drain()
        more_upserts, more_deletes = self.eval.drain()
        return upserts + more_upserts, deletes + more_deletes

    # -- the view --------------------------------------------------------------------------------------
    def view(self) -> dict[str, Any]:
        """``GET /cluster/history``'s body."""
        return {
            "loss": [{"step": s, "time": t, "loss": v[0]} for s, t, v in self.loss.rows()],
            "eval": [
                {"step": s, "time": t, "test_loss": v[0], "test_accuracy": v[1]}
                for s, t, v in self.eval.rows()
            ],
            "formations": [formation_view(e, self.formations[e]) for e in sorted(self.formations)],
            "max_points": self.loss.max_points,
        }


def formation_view(epoch: int, reports: Mapping[str, FormationReport]) -> dict[str, Any]:
    """One epoch's formation from its members' reports: the most telling mode (and all of them), where it
    resumed, the committed steps it lost and the slowest member's seconds (None until one says)."""
    rs = list(reports.values())
    modes = sorted({r.mode for r in rs}, key=mode_rank)
    seconds = [r.seconds for r in rs if r.seconds is not None]
    return {
        "epoch": epoch,
        "mode": modes[0],
        "modes": modes,
        "resumed_at": max(r.resumed_at for r in rs),
        "steps_lost": max(r.steps_lost for r in rs),
        "seconds": round(max(seconds), 3) if seconds else None,
        "workers": len(rs),
        "time": max(r.time for r in rs),
    }


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None
