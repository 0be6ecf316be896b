"""One rank of the two-GPU test: ``python -m tests.gpu.nccl_peer DIR RANK WORLD RENDEZVOUS JOB_JSON``.

Trains the job with the product's Trainer on ``cuda:RANK`` over the torch.distributed lane (NCCL), with
deterministic algorithms and TF32 off, and writes DIR/rank-RANK.json (the reported losses and test
accuracy) and, on rank 0, DIR/model.safetensors.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch

from communication.group import PeerGroup
from communication.torchdist import TorchDistBackend
from jobspec import JobSpec
from worker.trainer import Trainer


class _Lane(TorchDistBackend):
    """The lane with this epoch's rendezvous address bound (the Trainer installs the group itself)."""

    def __init__(self, rendezvous: str, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._rendezvous = rendezvous

    def set_group(self, group: PeerGroup, rendezvous: str = "") -> None:
        super().set_group(group, rendezvous or self._rendezvous)


def main(argv: list[str]) -> int:
    directory, rank, world, rendezvous, job_json = Path(argv[0]), int(argv[1]), int(argv[2]), argv[3], argv[4]
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    job = JobSpec.model_validate(json.loads(job_json))
    device = torch.device(f"cuda:{rank}")
    lane = _Lane(rendezvous, device=device, collective_timeout=60.0, rendezvous_timeout=60.0)
    try:
        group = PeerGroup(job.job_id, 1, rank, tuple(f"127.0.0.1:{9000 + r}" for r in range(world)))
        trainer = Trainer(job, group, lane, device=device, collective_timeout=60.0)
        losses: list[float] = []
        outcome = trainer.run(on_step=lambda r: losses.append(r.loss))
        trainer.save_model(directory / "model.safetensors")
        summary = {
            "losses": losses,
            "test_accuracy": outcome.test_accuracy,
            "steps": outcome.steps_done,
            # where the lane's gathers and reductions worked: the GPU itself, never a host copy
            "comm_devices": sorted({u.comm_device.type for u in trainer.engine.units}),
        }
        (directory / f"rank-{rank}.json").write_text(json.dumps(summary))
    finally:
        lane.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
