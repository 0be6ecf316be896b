"""The plain PyTorch reference of the engine's bar: no zerowire code in its step.

It builds the model and reads the batch indices through ``worker.models`` / ``worker.data`` (the same
construction the workers use), then trains each global batch as ``world_size`` micro-batches: loss = sum of
per-sample cross-entropies, backward per micro-batch (gradients accumulate in rank order in fp32), divide
by the global batch size, ``torch.optim`` step.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from jobspec import JobSpec
from worker.data import GlobalBatchSampler, job_dataset, rank_slice
from worker.models import build_model
from worker.zero3.schedule import lr_at


def plain_reference(
    job: JobSpec,
    world_at: Callable[[int], int],
    data_dir: Path | None = None,
    device: torch.device = torch.device("cpu"),
) -> dict[str, torch.Tensor]:
    """Final parameters (on the CPU) after ``job.steps`` steps; ``world_at(step)`` micro-batches in step
    ``step``; computed on ``device``."""
    assert job.grad_clip == 0, "the reference does not clip"
    data = job_dataset(job, data_dir)
    torch.manual_seed(job.seed)
    model = build_model(job.model, data.num_classes, data.in_channels).to(device)
    opt: torch.optim.Optimizer
    if job.optimizer == "sgd":
        opt = torch.optim.SGD(
            model.parameters(), lr=job.lr, momentum=job.momentum, dampening=0.0,
            weight_decay=job.weight_decay, nesterov=job.nesterov, foreach=False,
        )  # fmt: skip
    else:
        opt = torch.optim.AdamW(
            model.parameters(), lr=job.lr, betas=job.betas, eps=1e-8, weight_decay=job.weight_decay,
            amsgrad=False, foreach=False,
        )  # fmt: skip
    sampler = GlobalBatchSampler(data.train_size, job.global_batch, job.seed)
    for step in range(job.steps):
        indices = sampler.indices(step)
        world = world_at(step)
        opt.zero_grad(set_to_none=True)
        for rank in range(world):
            start, stop = rank_slice(job.global_batch, world, rank)
            x, y = data.train_batch(indices[start:stop], step, start)
            y = y.to(device)
            F.cross_entropy(model(x.to(device)), y, reduction="sum").backward()
        for p in model.parameters():
            assert p.grad is not None
            p.grad.div_(job.global_batch)
        for group in opt.param_groups:
            group["lr"] = lr_at(job, step)
        opt.step()
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()}
