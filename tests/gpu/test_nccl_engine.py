"""Workers over the torch.distributed lane (NCCL), one GPU each: real processes, the product's Trainer.
With one GPU the lane runs a group of one rank (every path of the lane and the engine on the device:
streams, events, the deadline watcher, gathers awaited on the device); with two GPUs two ranks.

Each rank trains resnet8 on digits for 5 steps (fp32, deterministic algorithms, TF32 off) on its own GPU.
Every rank reports the same losses and accuracy, every unit's gathers and reductions run on the GPU
(device-resident: no host copy), and rank 0's saved model equals the plain PyTorch loop
(one micro-batch per rank and step, on cuda:0) within ``FP32_TOL``: the lane reduces in fp32 in rank
order, as the plain loop accumulates, so only a kernel's rounding can differ (see test_cuda_precision.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

if not torch.cuda.is_available():
    pytest.skip("needs CUDA devices", allow_module_level=True)

from jobspec import JobSpec
from tests.conftest import ProcessReaper, free_port
from tests.unit.zero3.reference import plain_reference

REPO = Path(__file__).resolve().parents[2]
FP32_TOL = 1e-5
JOB = dict(
    job_id="nccl", model="resnet8", dataset="digits", steps=5, global_batch=64, lr=0.1, momentum=0.9,
    weight_decay=5e-4, schedule="cosine", warmup_steps=2, seed=0, eval_every=0,
)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "world",
    [1, pytest.param(2, marks=pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs"))],
)
def test_gpus_over_nccl_match_plain_loop(world: int, reaper: ProcessReaper, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    rendezvous = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    procs = []
    for r in range(world):
        cmd = [sys.executable, "-m", "tests.gpu.nccl_peer", str(tmp_path), str(r), str(world), rendezvous]
        cmd.append(json.dumps(JOB))
        procs.append(
            reaper.spawn(cmd, cwd=str(REPO), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        )
    for r, proc in enumerate(procs):
        out, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, f"rank {r} failed:\n{out.decode()[-3000:]}"
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(world)]
    assert all(r == ranks[0] for r in ranks) and ranks[0]["steps"] == JOB["steps"]
    assert ranks[0]["comm_devices"] == ["cuda"], "the NCCL lane is device-resident"
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        ref = plain_reference(JobSpec.model_validate(JOB), lambda step: world, device=torch.device("cuda:0"))
    finally:
        torch.use_deterministic_algorithms(False)
    got = load_file(str(tmp_path / "model.safetensors"))
    diffs = {n: float((got[n] - ref[n]).abs().max()) for n in ref}
    assert max(diffs.values()) <= FP32_TOL, diffs
    assert ranks[0]["losses"][-1] < ranks[0]["losses"][0]  # it trained
