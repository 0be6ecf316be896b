"""Step commit: an update is applied only once an exact vote shows that every member of the epoch staged it.

Each rank, after its gradient shards of step ``s`` are reduced, averaged and mirrored to its buddy (and its
ward's received), *stages* the update and all-gathers three fp32 values on the VOTE channel: its loss sum,
the squared norm of its gradient shards, and 1 (0 when its loss or a gradient was not finite). When every
value arrived, every rank takes the same :class:`CommitDecision` from the same values: skip the step (some
rank saw a non-finite value; nothing is applied anywhere, the batch is consumed), or apply it with the clip
coefficient of the rank-order sum of the norms. A rank that did not receive every vote applies nothing; if
some other rank did apply, every member had staged ``s``, so the recovery that follows applies the staged
update on the ranks that lag (``worker.recovery``). A step is therefore applied on every surviving rank
or on none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from jobspec import JobSpec
from worker.zero3.optim import clip_coefficient
from worker.zero3.state import rank_order_sum


@dataclass(frozen=True)
class CommitDecision:
    step: int
    skip: bool  # a non-finite loss or gradient somewhere: no rank applies anything
    total_sq_norm: float  # rank-order fp32 sum of the ranks' squared gradient norms (0 when skipped)
    loss: float  # global mean loss (NaN when skipped)

    def clip_coef(self, job: JobSpec) -> float:
        return 1.0 if self.skip else clip_coefficient(self.total_sq_norm, job.grad_clip)


@dataclass
class Staged:
    """One step's update, ready to apply: this rank's averaged gradient shards and its ward's."""

    step: int
    grads: list[torch.Tensor]
    ward_grads: list[torch.Tensor] | None


def vote_values(loss_sum: torch.Tensor, sq_norm: torch.Tensor, finite: bool | torch.Tensor) -> torch.Tensor:
    """This rank's vote: [loss sum, squared gradient norm, staged]; non-finite values never leave the rank.
    ``finite`` (every gradient was finite) may be a flag still on the loss's device: it is read with the
    loss and the norm, in the step's one read of the device."""
    device = loss_sum.device
    values = [loss_sum.detach().float().reshape(()), sq_norm.detach().float().reshape(()).to(device)]
    on_device = isinstance(finite, torch.Tensor) and finite.device == device
    if on_device:
        assert isinstance(finite, torch.Tensor)
        values.append(finite.detach().reshape(()).float())
    read = [float(v) for v in torch.stack(values).cpu()]  # one read of the device per step
    loss, sq = read[0], read[1]
    ok = (read[2] == 1.0 if on_device else bool(finite)) and math.isfinite(loss) and math.isfinite(sq)
    return torch.tensor([loss if ok else 0.0, sq if ok else 0.0, 1.0 if ok else 0.0], dtype=torch.float32)


def decide(step: int, votes: list[torch.Tensor], global_batch: int) -> CommitDecision:
    """The decision every rank takes from the same votes (in rank order)."""
    stacked = torch.stack([v.reshape(-1) for v in votes])
    if stacked.shape[1] != 3:
        raise ValueError(f"a vote has 3 values, got {stacked.shape[1]}")
    skip = bool((stacked[:, 2] != 1.0).any())
    if skip:
        return CommitDecision(step, True, 0.0, float("nan"))
    total_sq = float(rank_order_sum([v[1:2] for v in stacked.unbind(0)]))
    loss = float(rank_order_sum([v[0:1] for v in stacked.unbind(0)])) / global_batch
    return CommitDecision(step, False, total_sq, loss)


def settled(step: int, skip: bool, total_sq_norm: float) -> CommitDecision:
    """A decision handed over by a rank that applied it (recovery: the loss is not needed)."""
    return CommitDecision(step, skip, total_sq_norm, float("nan"))
