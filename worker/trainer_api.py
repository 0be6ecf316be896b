"""What the trainer (`worker.trainer`) reports to whoever drives it, and what it asks of it every step."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class StepReport:
    step: int
    loss: float
    samples: int  # global batch size
    world_size: int
    step_time_s: float
    compute_s: float  # step time not spent blocked on the network
    comm_s: float  # summed in-flight time of the step's collectives (overlaps compute)
    wait_s: float  # compute thread blocked on collectives
    data_wait_s: float = 0.0  # compute thread waiting for its micro-batch (a streamed dataset)
    lr: float = 0.0
    skipped: bool = False  # a non-finite loss or gradient somewhere: nothing was applied
    staging_overflows: int = 0  # host staging buffers handed out beyond the pools during the step


@dataclass(frozen=True)
class EvalReport:
    step: int
    test_loss: float
    test_accuracy: float


@dataclass(frozen=True)
class TrainOutcome:
    steps_done: int
    final_loss: float | None
    test_accuracy: float | None
    test_loss: float | None = None
    resumed_from: int | None = None
    stopped_early: bool = False
    step_times_s: list[float] = field(default_factory=list)


class StepGate(Protocol):
    """What the trainer asks of whoever drives it at every step (the manager: its fence and its state)."""

    def staged(self, step: int) -> None:
        """This rank staged the update of ``step``."""

    def may_commit(self) -> None:
        """Raises when this rank must not vote or apply (a stale epoch, a lost lease)."""


class OpenGate:
    """The gate of a trainer driven alone (tests, benchmarks, replay): every step may commit."""

    def staged(self, step: int) -> None:
        pass

    def may_commit(self) -> None:
        pass
