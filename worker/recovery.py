"""What a new epoch starts from: the members agree, from exact int64 exchanges, on the state to continue.

A *holding* is a rank's training state in one *layout* (the partition of the members of the epoch that
formed it): its own shards, the replica of its ward, the step it has committed and the update it has
staged. A holding is *confirmed* once a step committed in it: every member of its epoch then had it. A rank
keeps its previous holding until the current one is confirmed, so a formation that broke half way never
leaves the members without a common layout.

Round one (REPORT, :meth:`StateReport.values`, int64): every member tells what it holds.
Every member then takes the same :class:`Choice` (:func:`choose`):

- the layout: the newest confirmed one reported (none: a *fresh* start, from a checkpoint if there is one);
- the step: the highest committed in that layout. A holder one step behind that staged that very step
  applies it first (every member had staged it, or no rank could have applied it); the decision it needs
  (skip, gradient norm) comes from a rank that applied it. Any other holder is treated as a joiner.

Round two (SETTLE, :func:`settle_values`): each holder of the chosen layout says whether some old rank's
shard has neither its owner nor its buddy among the holders. If so the job falls back to its newest
complete checkpoint (and says how many steps that loses); without one it stops with a clear error, and
never silently restarts from step 0. Otherwise the shards are handed over (``worker.handover``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from worker.buddy import buddy_ranks
from worker.handover import own_state

if TYPE_CHECKING:
    from worker.trainer import Trainer

NONE = -1


class RecoveryError(RuntimeError):
    """The job cannot continue: a shard and its replica are both lost and no checkpoint exists."""


@dataclass
class Holding:
    layout: int  # the epoch whose members this state is partitioned for
    ids: tuple[str, ...]  # those members' worker ids, by rank
    host_ids: tuple[str, ...]
    rank: int  # this rank in that layout
    trainer: Trainer  # engine, optimizer, replica, staged update, steps done
    confirmed: bool = False

    def holds(self) -> list[int]:
        """Old ranks whose state this holding carries: its own, and its ward's replica."""
        replica = self.trainer.replica
        return [self.rank] + ([replica.ward] if replica is not None else [])


@dataclass(frozen=True)
class StateReport:
    """What a member holds, as exact integers (the REPORT exchange is int64): layouts, steps and flags, and
    the squared gradient norm of its newest decision as the bits of its float64 value."""

    cur_layout: int = NONE
    cur_confirmed: int = 0
    cur_done: int = NONE
    cur_staged: int = NONE
    prev_layout: int = NONE
    prev_done: int = NONE
    last_step: int = NONE  # the newest decision applied in the current holding
    last_skip: int = 0
    last_total_sq: float = 0.0
    opt_steps: int = 0

    def values(self) -> torch.Tensor:
        fields = dict(self.__dict__)
        fields["last_total_sq"] = _float_bits(self.last_total_sq)
        return torch.tensor([int(v) for v in fields.values()], dtype=torch.int64)

    @classmethod
    def parse(cls, t: torch.Tensor) -> StateReport:
        values = [int(v) for v in t.tolist()]
        names = list(cls.__dataclass_fields__)
        fields: dict[str, Any] = dict(zip(names, values, strict=True))
        fields["last_total_sq"] = _bits_float(fields["last_total_sq"])
        return cls(**fields)


def _float_bits(x: float) -> int:
    return int(struct.unpack("<q", struct.pack("<d", float(x)))[0])


def _bits_float(bits: int) -> float:
    return float(struct.unpack("<d", struct.pack("<q", bits))[0])


def report(current: Holding | None, previous: Holding | None) -> StateReport:
    if current is None:
        return StateReport()
    tr = current.trainer
    last = tr.last_decision
    staged = tr.staged.step if tr.staged is not None else NONE
    return StateReport(
        cur_layout=current.layout,
        cur_confirmed=1 if current.confirmed else 0,
        cur_done=tr.steps_done,
        cur_staged=staged,
        prev_layout=NONE if previous is None else previous.layout,
        prev_done=NONE if previous is None else previous.trainer.steps_done,
        last_step=NONE if last is None else last.step,
        last_skip=1 if (last is not None and last.skip) else 0,
        last_total_sq=0.0 if last is None else last.total_sq_norm,
        opt_steps=tr.optimizer.steps_done,
    )


@dataclass(frozen=True)
class Choice:
    layout: int  # -1: none (fresh start)
    step: int  # the first step to run (committed steps in the layout)
    which: tuple[str, ...]  # per new rank: "cur", "prev", "catchup" (cur, after applying) or "" (none)
    settle: tuple[int, bool, float] | None  # (step, skip, total squared norm) for the catch-ups
    opt_steps: int

    @property
    def holders(self) -> list[int]:
        return [r for r, w in enumerate(self.which) if w]


def choose(reports: list[StateReport]) -> Choice:
    """The same choice on every member, from every member's report (in rank order)."""
    confirmed = [r.cur_layout for r in reports if r.cur_confirmed == 1] + [r.prev_layout for r in reports]
    layout = max(confirmed, default=NONE)
    if layout < 0:
        return Choice(-1, 0, ("",) * len(reports), None, 0)
    have: list[tuple[str, int]] = []
    for r in reports:
        if r.cur_layout == layout:
            have.append(("cur", int(r.cur_done)))
        elif r.prev_layout == layout:
            have.append(("prev", int(r.prev_done)))
        else:
            have.append(("", -1))
    step = max(done for w, done in have if w)
    settle = None
    for r, (w, done) in zip(reports, have, strict=True):
        if w == "cur" and done == step and r.last_step == step - 1:
            settle = (step - 1, r.last_skip == 1, r.last_total_sq)
    which: list[str] = []
    opt_steps = 0
    for r, (w, done) in zip(reports, have, strict=True):
        if w and done == step:
            which.append(w)
            opt_steps = max(opt_steps, int(r.opt_steps))
        elif w == "cur" and done == step - 1 and r.cur_staged == step - 1 and settle is not None:
            which.append("catchup")
        else:
            which.append("")
    return Choice(layout, step, tuple(which), settle, opt_steps)


def lost_ranks(holding: Holding, choice: Choice, new_ids: tuple[str, ...]) -> list[int]:
    """Old ranks of the chosen layout whose shard has neither its owner nor its buddy among the holders."""
    holders = {new_ids[r] for r in choice.holders}
    buddies = buddy_ranks(holding.host_ids, len(holding.ids)) if holding.trainer.replica is not None else []
    lost = []
    for old, wid in enumerate(holding.ids):
        buddy = holding.ids[buddies[old]] if buddies else None
        if wid not in holders and (buddy is None or buddy not in holders):
            lost.append(old)
    return lost


def sources(holding: Holding, choice: Choice, new_ids: tuple[str, ...]) -> dict[int, dict[str, torch.Tensor]]:
    """Old rank -> state tensors, for the old ranks this holder supplies: its own, and its ward's when the
    ward is not among the holders (the buddy promotes its replica)."""
    holders = {new_ids[r] for r in choice.holders}
    tr = holding.trainer
    out = {holding.rank: own_state(tr.engine, tr.optimizer)}
    replica = tr.replica
    if replica is not None and holding.ids[replica.ward] not in holders:
        out[replica.ward] = replica.state_tensors()
    return out


def settle_values(lost: bool, holder: bool) -> torch.Tensor:
    """Round two's values (SETTLE, int64): whether this rank holds state, whether it found a shard lost."""
    return torch.tensor([1 if holder else 0, 1 if lost else 0], dtype=torch.int64)
