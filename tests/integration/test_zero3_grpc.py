"""The bar, with real processes over gRPC: N workers (GrpcBackend on 127.0.0.1) train 20 steps of resnet8 on
digits, fp32, no compression; rank 0's saved model is bit-identical to the plain PyTorch loop with N
micro-batches per step, and a second identical run (by the same processes, in a new epoch) is
bit-identical to the first.

Run as a module, this file is one worker: ``python -m tests.integration.test_zero3_grpc --rank R ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
JOB = dict(
    job_id="bar", model="resnet8", dataset="digits", steps=20, global_batch=48, lr=0.1, momentum=0.9,
    weight_decay=5e-4, schedule="cosine", warmup_steps=3, seed=3, eval_every=10,
)  # fmt: skip


def worker_main(argv: list[str]) -> int:
    import torch

    from communication.grpc_backend import GrpcBackend
    from jobspec import JobSpec

    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--ports", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--job", help="one run's job (JSON), its results in OUT")
    parser.add_argument(
        "--runs", help='runs one after the other (JSON list of {"job", "degrade_codec"}), run i in OUT/i'
    )
    parser.add_argument("--degrade-codec", type=int, default=0, help="negative control, see degrade_codec")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.runs:
        runs = [
            (r["job"], int(r.get("degrade_codec", 0)), args.out / str(i))
            for i, r in enumerate(json.loads(args.runs))
        ]
    else:
        runs = [(json.loads(args.job), args.degrade_codec, args.out)]
    ports = [int(p) for p in args.ports.split(",")]
    jobs = [JobSpec.model_validate(job) for job, _, _ in runs]
    if len({job.int8_block for job in jobs}) != 1:
        raise ValueError("the runs of one worker share its backend, so one int8 block size")
    backend = GrpcBackend(token="bar-token", int8_block=jobs[0].int8_block)
    backend.start(f"127.0.0.1:{ports[args.rank]}")
    try:
        # Start-up barrier of the harness (the daemon uses the coordinator's ready barrier instead).
        _file_barrier(args.out, "ready", args.rank, len(ports))
        for epoch, (job, (_, levels, out)) in enumerate(zip(jobs, runs, strict=True)):
            out.mkdir(parents=True, exist_ok=True)
            restore = degrade_codec(levels) if levels else None
            try:
                _train(backend, job, epoch, args.rank, ports, out)
            finally:
                if restore is not None:
                    restore()
            # every rank done with this run (its peers served what they needed) before the next epoch's group
            _file_barrier(out, "done", args.rank, len(ports))
    finally:
        backend.close()
    return 0


def _file_barrier(folder: Path, name: str, rank: int, world: int, timeout: float = 60.0) -> None:
    (folder / f"{name}-{rank}").touch()
    deadline = time.monotonic() + timeout
    while not all((folder / f"{name}-{r}").exists() for r in range(world)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"peers did not reach {name}")
        time.sleep(0.05)


def _train(backend: Any, job: Any, epoch: int, rank: int, ports: list[int], out: Path) -> None:
    """One run over ``backend`` as epoch ``epoch`` of the harness's group; results in ``out``."""
    import torch

    from communication.group import PeerGroup
    from worker.trainer import Trainer

    group = PeerGroup(job.job_id, epoch, rank, tuple(f"127.0.0.1:{p}" for p in ports))
    trainer = Trainer(job, group, backend, device=torch.device("cpu"), collective_timeout=20.0)
    evals: list[float] = []
    losses: list[float] = []
    outcome = trainer.run(
        on_step=lambda r: losses.append(r.loss), on_eval=lambda e: evals.append(e.test_accuracy)
    )
    trainer.save_model(out / "model.safetensors")
    summary = {
        "steps_done": outcome.steps_done,
        "final_loss": outcome.final_loss,
        "test_accuracy": outcome.test_accuracy,
        "test_loss": outcome.test_loss,
        "evals": evals,
        "losses": losses,
    }
    (out / f"rank-{rank}.json").write_text(json.dumps(summary))
    (out / f"times-{rank}.json").write_text(json.dumps(outcome.step_times_s))  # differ by rank


def degrade_codec(levels: int) -> Callable[[], None]:
    """A deliberately worse gradient codec, for negative controls: each block of a pushed gradient keeps only
    ``levels`` steps each side of zero (int8 keeps 127), and the sender keeps no error-feedback residual.
    Parameter gathers and control values are left alone. Returns the call that puts the real codec back."""
    import torch

    from communication import compression

    def encode(self: compression.ErrorFeedback, unit: int, dest: int, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1).float()
        pad = -flat.numel() % self.block
        blocks = torch.cat([flat, flat.new_zeros(pad)]).view(-1, self.block)
        scale = blocks.abs().amax(dim=1, keepdim=True) / levels
        coarse = torch.where(scale > 0, (blocks / scale).round() * scale, blocks)
        return compression.encode(coarse.reshape(-1)[: flat.numel()], self.codec_id, self.block)

    original = compression.ErrorFeedback.encode
    compression.ErrorFeedback.encode = encode  # type: ignore[method-assign]

    def restore() -> None:
        compression.ErrorFeedback.encode = original  # type: ignore[method-assign]

    return restore


def run_cluster(
    reaper: object, world: int, out: Path, job: dict[str, object], *, degrade_codec: int = 0, threads: int = 1
) -> list[dict[str, object]]:
    """One run of ``job`` by ``world`` worker processes: each rank's results."""
    return run_clusters(reaper, world, out, [(job, degrade_codec)], threads=threads)[0]


def run_clusters(
    reaper: object, world: int, out: Path, runs: list[tuple[dict[str, object], int]], *, threads: int = 1
) -> list[list[dict[str, object]]]:
    """``runs`` (job, degrade_codec) one after the other by the same ``world`` worker processes (run i as
    epoch i of their group): each run's ranks' results."""
    from tests.conftest import free_port

    out.mkdir(parents=True)
    ports = ",".join(str(free_port()) for _ in range(world))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    spec = json.dumps([{"job": job, "degrade_codec": levels} for job, levels in runs])
    procs = []
    for r in range(world):
        cmd = [sys.executable, "-m", "tests.integration.test_zero3_grpc", "--rank", str(r), "--ports", ports]
        cmd += ["--out", str(out), "--runs", spec, "--threads", str(threads)]
        procs.append(
            reaper.spawn(  # type: ignore[attr-defined]
                cmd, cwd=str(REPO), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
        )
    for r, proc in enumerate(procs):
        stdout, _ = proc.communicate(timeout=90 * len(runs))
        assert proc.returncode == 0, f"rank {r} failed:\n{stdout.decode()[-3000:]}"
    return [
        [json.loads((out / str(i) / f"rank-{r}.json").read_text()) for r in range(world)]
        for i in range(len(runs))
    ]


@pytest.mark.slow
@pytest.mark.timeout(150)
@pytest.mark.parametrize("world", [2, 3])
def test_grpc_workers_bit_identical_to_plain_loop(world: int, reaper: object, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    from jobspec import JobSpec
    from tests.unit.zero3.fixtures import assert_bit_identical
    from tests.unit.zero3.reference import plain_reference

    # at 2 ranks the same processes run the job twice, a fresh trainer in a new epoch each time (run-to-run
    # determinism across processes is test_replay's: a replay in another process is bit for bit)
    runs = run_clusters(reaper, world, tmp_path / "runs", [(JOB, 0)] * (2 if world == 2 else 1))
    summaries = runs[0]
    assert all(s["steps_done"] == 20 for s in summaries)
    assert len({json.dumps(s, sort_keys=True) for s in summaries}) == 1, "ranks report different results"
    torch.set_num_threads(1)
    got = load_file(str(tmp_path / "runs" / "0" / "model.safetensors"))
    ref = plain_reference(JobSpec.model_validate(JOB), lambda step: world)
    assert_bit_identical({n: got[n] for n in ref}, ref)
    if world == 2:  # two identical runs are bit-identical, buffers included
        again = load_file(str(tmp_path / "runs" / "1" / "model.safetensors"))
        assert sorted(again) == sorted(got)
        assert_bit_identical(again, got)


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
