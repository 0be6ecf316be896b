"""Learning-rate schedules: a pure function of the job spec and the (0-based) step.

Every schedule starts with the same linear warm-up: for ``step < warmup_steps`` the rate is
``lr * (step + 1) / warmup_steps`` (so the last warm-up step runs at the full ``lr``). After the warm-up:

- ``constant``: ``lr``.
- ``cosine``: ``lr * 0.5 * (1 + cos(pi * (step - warmup_steps) / (steps - warmup_steps)))``; it equals ``lr``
  at the first step after the warm-up and reaches 0 at ``step == steps`` (one past the last trained step).
- ``step``: ``lr * gamma ** (step // step_size)`` (the step counts from 0, warm-up included).

The arithmetic is plain Python floats, so every worker (and a reference loop that calls this function)
gets the same rate bit for bit.
"""

from __future__ import annotations

import math

from jobspec import JobSpec


def lr_at(job: JobSpec, step: int) -> float:
    """The learning rate of 0-based ``step`` for ``job``. Steps past ``job.steps`` are allowed (cosine: 0)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    base = float(job.lr)
    warm = job.warmup_steps
    if step < warm:
        return base * (step + 1) / warm
    if job.schedule == "constant":
        return base
    if job.schedule == "cosine":
        span = job.steps - warm
        if span <= 0:
            return 0.0
        progress = min(1.0, (step - warm) / span)
        return base * 0.5 * (1.0 + math.cos(math.pi * progress))
    if job.schedule == "step":
        return base * float(job.gamma) ** (step // job.step_size)
    raise ValueError(f"unknown schedule {job.schedule!r}")
