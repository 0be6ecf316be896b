"""Forming an epoch: the collective that starts every epoch's training, before its first step.

The members agree on the state to continue from (``worker.recovery``: apply a staged step some rank already
committed, pick the newest confirmed layout), hand the shards over to the new partition with the buddies'
replicas standing in for dead ranks (``worker.handover``), or fall back to the newest complete checkpoint
only when a shard and its replica are both gone; then mirror every shard to its buddy. The result is a
:class:`Formed`: the manager adopts its holding into the worker's state and reports it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from worker import handover, recovery
from worker.commit import settled
from worker.recovery import Holding, RecoveryError
from worker.state import WorkerState
from worker.zero3 import state as zstate
from worker.zero3.channels import Channel

if TYPE_CHECKING:
    from worker.trainer import Trainer

log = logging.getLogger(__name__)

# A formation's first collective runs under step key 0, the others under the step it resumes at (a push
# is accepted at most one step ahead of what the receiver published); their channels are their own.
REPORT_KEY = 0


@dataclass(frozen=True)
class Formed:
    """How an epoch was formed."""

    mode: str  # "fresh", "checkpoint", "handover" or "join"
    resumed_at: int  # the first step it trains
    steps_lost: int  # committed steps redone (only a checkpoint fallback loses any)
    seconds: float
    holding: Holding | None  # the state it trains (None: a stand-in trainer that holds none)
    keep: Holding | None  # the last confirmed holding, kept until a step commits in the new layout


def form(trainer: Trainer, state: WorkerState, ids: tuple[str, ...], job_committed: int) -> Formed:
    """Collective over ``trainer``'s epoch (``ids``: its members' worker ids by rank; ``job_committed``: the
    highest step the coordinator knows committed): agree on the state, hand it over (or restore), mirror
    it. Raises RecoveryError when the job cannot continue."""
    t0 = time.monotonic()
    job, group, engine = trainer.job, trainer.group, trainer.engine
    current, previous = state.holdings()
    handover.declare(engine, job)
    mine = recovery.report(current, previous)
    parts = zstate.exchange_values(engine, REPORT_KEY, Channel.REPORT, mine.values())
    choice = recovery.choose([recovery.StateReport.parse(p) for p in parts])
    key = choice.step  # every later collective of the formation: under the step it resumes at
    which = choice.which[group.rank]
    held = current if which in ("cur", "catchup") else previous if which == "prev" else None
    if which == "catchup" and held is not None and choice.settle is not None:
        step, skip, total_sq = choice.settle
        held.trainer.apply(settled(step, skip, total_sq))
        log.info("%s: applied step %d, which another rank had committed", group.describe(), step)
    lost = recovery.lost_ranks(held, choice, ids) if held is not None else []
    flags = zstate.exchange_values(
        engine, key, Channel.SETTLE, recovery.settle_values(bool(lost), held is not None)
    )
    any_lost = any(int(f[1]) == 1 for f in flags)
    known = max(state.committed_step + 1, choice.step)
    if choice.layout >= 0 and not any_lost:
        assert held is not None or not choice.which[group.rank]
        sources = recovery.sources(held, choice, ids) if held is not None else {}
        old_world = len(held.ids) if held is not None else 1  # a joiner supplies nothing
        handover.repartition(engine, trainer.optimizer, job, sources, old_world, choice.opt_steps, key)
        trainer.resume_at(choice.step)
        handover.adopt_buffers(engine, key, held is not None)
        mode, resumed = ("join" if held is None else "handover"), choice.step
    else:
        resumed_from = trainer.restore_checkpoint()
        if choice.layout >= 0 and resumed_from is None:
            raise RecoveryError(
                f"{group.describe()}: the shards of old ranks {lost or '(of another member)'} are lost "
                "with their replicas and there is no complete checkpoint; the job stops"
            )
        if choice.layout < 0 and job_committed >= 0 and resumed_from is None:
            raise RecoveryError(
                f"{group.describe()}: the job committed step {job_committed}, no member holds its state "
                "and there is no complete checkpoint; the job stops rather than start again from step 0"
            )
        known = max(known, job_committed + 1)
        mode = "fresh" if choice.layout < 0 else "checkpoint"
        resumed = resumed_from or 0
    if job.replicas:
        trainer.mirror(handover.replicate(engine, trainer.optimizer, job, trainer.optimizer.steps_done))
    return Formed(
        mode=mode,
        resumed_at=resumed,
        steps_lost=max(0, known - resumed) if mode == "checkpoint" else 0,
        seconds=time.monotonic() - t0,
        holding=Holding(group.epoch, ids, tuple(group.host_ids), group.rank, trainer),
        keep=held if mode == "handover" else None,  # confirmed: kept until a step commits in the new layout
    )
