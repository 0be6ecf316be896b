"""The sharded optimizer: steps only this rank's flat fp32 shard of every unit, in place.

Bit-exactness with a single-process run is the point. Rather than re-deriving the update rules, each shard is
wrapped as an ``nn.Parameter`` that shares its storage and a real ``torch.optim.SGD`` / ``torch.optim.AdamW``
steps them. Both are built with ``foreach=False`` (the per-tensor path; on CUDA the default would otherwise be
the multi-tensor path, whose rounding may differ), so a reference loop is bit-identical when it uses:

- ``torch.optim.SGD(params, lr=job.lr, momentum=job.momentum, dampening=0, weight_decay=job.weight_decay,
  nesterov=job.nesterov, foreach=False)``
- ``torch.optim.AdamW(params, lr=job.lr, betas=job.betas, eps=1e-8, weight_decay=job.weight_decay,
  amsgrad=False, foreach=False)``

and sets ``group["lr"] = lr_at(job, step)`` before each ``step()``. The update rules are elementwise, and the
CPU kernels give the same bits for an element wherever it sits in a tensor (vectorised body or scalar tail);
the unit tests check this across shard layouts. Padding at the tail of the last shard has zero parameters and
zero gradients, and every update keeps it exactly zero.

Gradient clipping by global norm is split so the engine can do the collective part: each rank computes
``local_sq_norm`` of its gradient shards, the engine sums the ranks' values in rank order, and every rank then
uses ``clip_coefficient(total, job.grad_clip)`` as the ``clip_coef`` of ``step``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from jobspec import JobSpec
from worker.zero3.schedule import lr_at

logger = logging.getLogger(__name__)

ADAMW_EPS = 1e-8
CLIP_EPS = 1e-6

_STATE_NAMES = {"sgd": ("momentum_buffer",), "adamw": ("exp_avg", "exp_avg_sq")}


def state_names(job: JobSpec) -> tuple[str, ...]:
    """The per-unit optimizer-state tensors of ``job``'s optimizer, each shaped like a shard."""
    return _STATE_NAMES[job.optimizer]


def device_sq_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """fp32 sum of squares of this rank's gradient shards, as a 0-dim tensor on their device: summed in unit
    order without a host synchronisation (fp32 scalar additions give the same bits on any device)."""
    device = grads[0].device if grads else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float32, device=device)
    for g in grads:
        if g.dtype != torch.float32:
            raise ValueError(f"gradient shards must be float32, got {g.dtype}")
        total = total + g.detach().square().sum(dtype=torch.float32)
    return total


def local_sq_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """``device_sq_norm`` on the host (0-dim). Padding is zero and adds nothing."""
    return device_sq_norm(grads).cpu()


def clip_coefficient(total_sq_norm: float, max_norm: float) -> float:
    """``min(1, max_norm / (sqrt(total_sq_norm) + 1e-6))``; 1.0 when ``max_norm == 0`` (clipping disabled).

    A non-finite norm raises ``ValueError``: stepping on it would poison every parameter.
    """
    if max_norm < 0:
        raise ValueError(f"max_norm must be >= 0, got {max_norm}")
    if max_norm == 0:
        return 1.0
    if not math.isfinite(total_sq_norm) or total_sq_norm < 0:
        raise ValueError(f"gradient norm is not finite (squared norm {total_sq_norm})")
    return min(1.0, max_norm / (math.sqrt(total_sq_norm) + CLIP_EPS))


def _adam_step_dtype() -> torch.dtype:
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class ShardedOptimizer:
    """SGD (momentum, Nesterov, weight decay) or AdamW (decoupled weight decay) over local 1-D fp32 shards.

    ``shards[k]`` is this rank's shard of unit k; it is updated in place by ``step``.
    """

    def __init__(self, shards: list[torch.Tensor], job: JobSpec) -> None:
        for k, s in enumerate(shards):
            if s.dim() != 1 or s.dtype != torch.float32 or not s.is_contiguous():
                raise ValueError(
                    f"shard u{k} must be a contiguous 1-D float32 tensor, got {s.dtype} {tuple(s.shape)}"
                )
        self.job = job
        self.shards = shards
        self._params = [nn.Parameter(s, requires_grad=True) for s in shards]
        for k, (p, s) in enumerate(zip(self._params, shards, strict=True)):
            assert p.data_ptr() == s.data_ptr(), f"parameter u{k} does not share the shard's storage"
        self._steps_done = 0
        self._opt: torch.optim.Optimizer
        if job.optimizer == "sgd":
            if job.nesterov and job.momentum == 0:
                raise ValueError("nesterov needs momentum > 0")
            self._opt = torch.optim.SGD(
                self._params,
                lr=job.lr,
                momentum=job.momentum,
                dampening=0.0,
                weight_decay=job.weight_decay,
                nesterov=job.nesterov,
                foreach=False,
            )
        elif job.optimizer == "adamw":
            self._opt = torch.optim.AdamW(
                self._params,
                lr=job.lr,
                betas=(float(job.betas[0]), float(job.betas[1])),
                eps=ADAMW_EPS,
                weight_decay=job.weight_decay,
                amsgrad=False,
                foreach=False,
            )
        else:
            raise ValueError(f"unknown optimizer {job.optimizer!r}")

    @property
    def steps_done(self) -> int:
        """How many times ``step`` has been applied (restored by ``load_state_tensors``)."""
        return self._steps_done

    def step(self, grads: list[torch.Tensor], step: int, clip_coef: float = 1.0) -> float:
        """Apply one update with the gradient shards ``grads`` (already averaged); returns the lr used.

        ``step`` is the 0-based training step (it picks the learning rate). ``grads`` are not modified; when
        ``clip_coef != 1`` they are multiplied by it (out of place) first. Bad input raises before any change.
        """
        if len(grads) != len(self._params):
            raise ValueError(f"expected {len(self._params)} gradient shards, got {len(grads)}")
        for k, (g, p) in enumerate(zip(grads, self._params, strict=True)):
            if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
                raise ValueError(
                    f"gradient u{k} is {g.dtype} {tuple(g.shape)} on {g.device}, "
                    f"expected {p.dtype} {tuple(p.shape)} on {p.device}"
                )
        if not (math.isfinite(clip_coef) and 0.0 < clip_coef <= 1.0):
            raise ValueError(f"clip_coef must be in (0, 1], got {clip_coef}")
        lr = lr_at(self.job, step)
        for group in self._opt.param_groups:
            group["lr"] = lr
        for g, p in zip(grads, self._params, strict=True):
            p.grad = g.detach() if clip_coef == 1.0 else g.detach().mul(clip_coef)
        try:
            self._opt.step()
        finally:
            for p in self._params:
                p.grad = None
        self._steps_done += 1
        return lr

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Optimizer state as flat names: ``u{k}.momentum_buffer`` (SGD with momentum) or ``u{k}.exp_avg`` and
        ``u{k}.exp_avg_sq`` (AdamW), each shaped like shard k, plus ``step`` (0-dim int64, steps applied).

        Before the first step there is no per-unit state. The per-unit tensors are the live state: copy them
        if they must outlive the next ``step``.
        """
        out: dict[str, torch.Tensor] = {}
        for k, p in enumerate(self._params):
            st = self._opt.state.get(p, {})
            for name in _STATE_NAMES[self.job.optimizer]:
                t = st.get(name)
                if t is not None:
                    out[f"u{k}.{name}"] = t.detach()
        out["step"] = torch.tensor(self._steps_done, dtype=torch.int64)
        return out

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what ``state_tensors`` returned (possibly re-sharded for another world size).

        Everything is checked first (names, shapes, dtypes, completeness); a bad dict raises ``ValueError``
        and leaves the optimizer unchanged.
        """
        if "step" not in state:
            raise ValueError("optimizer state has no 'step'")
        step_t = state["step"]
        if step_t.numel() != 1 or step_t.dtype.is_floating_point or int(step_t.item()) < 0:
            raise ValueError(f"optimizer 'step' must be a non-negative integer scalar, got {step_t!r}")
        steps_done = int(step_t.item())
        names = _STATE_NAMES[self.job.optimizer]
        needs_state = self.job.optimizer == "adamw" or self.job.momentum != 0
        expected = {f"u{k}.{n}" for k in range(len(self._params)) for n in names}
        given = set(state) - {"step"}
        unknown = given - expected
        if unknown:
            raise ValueError(f"unexpected optimizer state entries: {sorted(unknown)[:5]}")
        if given and given != expected:
            raise ValueError(f"incomplete optimizer state: missing {sorted(expected - given)[:5]}")
        if not given and needs_state and steps_done > 0:
            raise ValueError(f"optimizer state after {steps_done} steps has no per-unit tensors")
        if given and not needs_state:
            raise ValueError("optimizer state has per-unit tensors but this optimizer keeps none")
        for k, p in enumerate(self._params):
            for n in names:
                t = state.get(f"u{k}.{n}")
                if t is not None and (t.shape != p.shape or t.dtype != torch.float32):
                    raise ValueError(
                        f"optimizer state u{k}.{n} is {t.dtype} {tuple(t.shape)}, expected float32 "
                        f"{tuple(p.shape)}"
                    )
        self._opt.state.clear()
        if given:
            for k, p in enumerate(self._params):
                st: dict[str, Any] = {}
                for n in names:
                    st[n] = state[f"u{k}.{n}"].detach().to(p.device).clone()
                if self.job.optimizer == "adamw":
                    # As torch.optim.Adam keeps it (not capturable, not fused): a 0-dim CPU step counter.
                    st["step"] = torch.tensor(float(steps_done), dtype=_adam_step_dtype())
                self._opt.state[p] = st
        self._steps_done = steps_done
        logger.debug("optimizer state restored at %d steps done (%d units)", steps_done, len(self._params))
