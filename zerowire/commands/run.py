"""`zerowire run --workers N --output DIR`: train on a local cluster of real processes (coordinator + N
workers on loopback, a fresh random token), with a progress line; writes summary.json,
model.safetensors and training.png into DIR. With --external-workers it starts only the coordinator, for
workers a scheduler starts (deploy/slurm/zerowire.sbatch), and writes the same files when the job ends."""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import sys
from pathlib import Path
from typing import Any

from zerowire.commands import CommandError

# Job flags, the same as `zerowire coordinator` takes: (flag, type, help). None means the job default.
JOB_FLAGS: tuple[tuple[str, type, str], ...] = (
    ("job-id", str, "job name"),
    ("model", str, "resnet8 | resnet18 | resnet20 | resnet34 | resnet56 | resnet50"),
    ("dataset", str, "digits | synthetic:CxHxW:N | ... (see docs/datasets-and-models.md)"),
    ("steps", int, "optimizer steps"),
    ("global-batch", int, "samples per step, split over the workers"),
    ("optimizer", str, "sgd | adamw"),
    ("lr", float, "peak learning rate"),
    ("momentum", float, "SGD momentum"),
    ("nesterov", str, "true | false: Nesterov momentum"),
    ("betas", str, "AdamW betas as B1,B2"),
    ("step-size", int, "schedule=step: decay every N steps"),
    ("gamma", float, "schedule=step: decay factor"),
    ("weight-decay", float, "weight decay"),
    ("schedule", str, "constant | cosine | step"),
    ("warmup-steps", int, "linear warm-up steps"),
    ("grad-clip", float, "clip by global norm (0 disables)"),
    ("seed", int, "seed of data order and initialisation"),
    ("compression", str, "none | int8 (wire compression)"),
    ("int8-block", int, "int8 block size"),
    ("param-dtype", str, "float32 | bfloat16 | float16 (compute precision; master weights stay fp32)"),
    (
        "nccl-reduce",
        str,
        "ordered (default: rank-order fp32 sums, deterministic) | native (NCCL's reduce-scatter) among "
        "workers that share a host over NCCL",
    ),
    ("eval-every", int, "evaluate every N steps (0: only at the end)"),
    (
        "checkpoint-every",
        int,
        "checkpoint every N steps (0: never; losing a shard and its replica stops the job)",
    ),
    (
        "replicas",
        int,
        "buddy replicas of every shard: 1 (default) or 0 (a death costs a checkpoint)",
    ),
    ("min-workers", int, "workers the first formation waits for (default: --workers)"),
    ("image-size", int, "imagefolder: images are S x S (default 224)"),
    ("channels", int, "imagefolder: 1 | 3 (default: from the first image)"),
    ("augment", str, "imagefolder: none | flip | crop-flip | rrc-flip (default)"),
    ("val-fraction", float, "imagefolder without val/: the held-out share of train/ (default 0.1)"),
    ("bad-images", str, "imagefolder: fail (default) | skip a file that cannot be decoded"),
)

MANAGED = (
    "checkpoints",
    "telemetry",
    "logs",
    "coordinator.db",
    "coordinator.db-wal",
    "coordinator.db-shm",
    "model.safetensors",
    "summary.json",
    "training.png",
    "job.toml",
    "tls",
)


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "run",
        help="train on a local cluster (coordinator + N worker processes on this machine)",
        description="Start a coordinator and N workers on loopback, train the job, and write summary.json, "
        "model.safetensors and training.png into --output.",
    )
    p.add_argument("--workers", type=int, default=None, help="worker processes (default 2; 1 with --replay)")
    p.add_argument(
        "--hosts",
        type=int,
        default=1,
        help="simulated machines the workers are spread over (default 1: all share this host and talk over "
        "torch.distributed; --hosts H puts N/H workers on each of H host ids, which talk over gRPC across "
        "hosts; --hosts N is the flat gRPC path)",
    )
    p.add_argument("--output", required=True, help="folder for the results, logs and checkpoints")
    p.epilog = (
        "The cluster token is $ZEROWIRE_TOKEN when set, else a fresh random one; likewise the read-only "
        "token ($ZEROWIRE_READ_TOKEN: set it so `zerowire status` can watch) and the admin token "
        "($ZEROWIRE_ADMIN_TOKEN)."
    )
    p.add_argument("--job", help="job TOML file (flags override its values)")
    for flag, kind, text in JOB_FLAGS:
        p.add_argument(f"--{flag}", type=kind, default=None, help=text)
    p.add_argument(
        "--device",
        default="cpu",
        help="cpu (default) | cuda (workers spread round-robin over the visible GPUs) | cuda:i",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads per worker (default: cores / workers)"
    )
    p.add_argument("--data-dir", default=os.environ.get("ZEROWIRE_DATA_DIR"), help="dataset cache folder")
    p.add_argument(
        "--data-workers",
        type=int,
        default=None,
        help="loader processes per worker decoding a streamed dataset (default: cores / workers / 2, 1 to 8)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="give up after this many seconds (default 3600; with --external-workers, no limit)",
    )
    p.add_argument(
        "--external-workers",
        action="store_true",
        help="start only the coordinator, for --workers workers that another program starts (a "
        "scheduler's tasks: deploy/slurm/zerowire.sbatch) with the cluster token of $ZEROWIRE_TOKEN, "
        "OUTPUT/telemetry, OUTPUT/checkpoints and OUTPUT/model.safetensors on a folder they share (and, "
        "if it likes, each one's exit code in OUTPUT/logs/WORKER_ID.exit); the run ends when the job has "
        "finished and every worker has left, or on SIGTERM, and writes the summary of what was done "
        "either way (the read-only token is not printed)",
    )
    p.add_argument(
        "--coordinator-host",
        default="127.0.0.1",
        help="the coordinator's address, bound and given to the workers (default 127.0.0.1)",
    )
    p.add_argument(
        "--coordinator-port", type=int, default=0, help="the coordinator's port (default: a free one)"
    )
    p.add_argument(
        "--tls",
        action="store_true",
        help="run the whole cluster over TLS: HTTPS for REST, mutual TLS on gRPC, with a fresh CA and "
        "certificate written to OUTPUT/tls",
    )
    p.add_argument(
        "--kill-worker-at-step",
        type=int,
        default=None,
        help="fault drill: SIGKILL the last worker once the cluster reaches this step (see --kill-workers)",
    )
    p.add_argument(
        "--kill-workers",
        type=int,
        default=1,
        help="fault drill: how many workers the kill takes at once (default 1): the last worker, then the "
        "buddy of each victim in turn, so 2 lose a shard together with its replica",
    )
    p.add_argument(
        "--restart-killed-after",
        type=float,
        default=None,
        metavar="SECONDS",
        help="fault drill: start the killed workers again, with the same worker ids, after this delay; "
        "they join the running job",
    )
    p.add_argument(
        "--replay",
        metavar="SUMMARY",
        default=None,
        help="re-run the world-size schedule of the run that wrote SUMMARY (its summary.json) in one "
        "process, one micro-batch per rank of each step, and write its model into --output (needs "
        "--workers 1; the job, thread count and schedule come from SUMMARY)",
    )
    p.set_defaults(handler=handle)


def _job_values(args: argparse.Namespace) -> dict[str, Any]:
    from jobspec import JobSpec, load_job_file

    values: dict[str, Any] = load_job_file(args.job) if args.job else {}
    for flag, _kind, _text in JOB_FLAGS:
        value = getattr(args, flag.replace("-", "_"))
        if value is None:
            continue
        if flag == "betas":
            parts = str(value).split(",")
            if len(parts) != 2:
                raise ValueError(f"--betas takes two numbers B1,B2, got {value!r}")
            value = (float(parts[0]), float(parts[1]))
        values[flag.replace("-", "_")] = value
    values.setdefault("min_workers", args.workers)
    # A local run evaluates (for the plot) and checkpoints (to survive a lost worker) every tenth of the
    # run by default, and at most every 10 steps.
    steps = int(values.get("steps", JobSpec.model_fields["steps"].default))
    values.setdefault("eval_every", max(10, steps // 10))
    values.setdefault("checkpoint_every", max(10, steps // 10))
    return values


def _check_drill(args: argparse.Namespace) -> None:
    if args.kill_worker_at_step is None:
        if args.kill_workers != 1 or args.restart_killed_after is not None:
            raise CommandError("--kill-workers and --restart-killed-after need --kill-worker-at-step")
        return
    if args.kill_worker_at_step < 0:
        raise CommandError("--kill-worker-at-step must be >= 0")
    if not 1 <= args.kill_workers < args.workers:
        raise CommandError(f"--kill-workers must be between 1 and --workers - 1 ({args.workers - 1})")
    if args.restart_killed_after is not None and not 0 <= args.restart_killed_after <= args.timeout:
        raise CommandError("--restart-killed-after must be between 0 and --timeout seconds")


def _check_external(args: argparse.Namespace) -> None:
    """--external-workers: the workers are someone else's, so nothing of theirs is chosen here."""
    if not args.external_workers:
        return
    given = [
        flag
        for flag, value in (
            ("--tls", args.tls),
            ("--kill-worker-at-step", args.kill_worker_at_step is not None),
            ("--restart-killed-after", args.restart_killed_after is not None),
        )
        if value
    ]
    if given:
        raise CommandError(f"{', '.join(given)} cannot be used with --external-workers")
    if not os.environ.get("ZEROWIRE_TOKEN"):
        raise CommandError("--external-workers needs the cluster token in ZEROWIRE_TOKEN (the workers' too)")


def _devices(device: str) -> list[str]:
    if device == "cpu" or device.startswith("cuda:"):
        return [device]
    if device != "cuda":
        raise ValueError(f"--device must be cpu, cuda or cuda:i, not {device!r}")
    import torch

    count = torch.cuda.device_count()
    if count == 0:
        raise ValueError("--device cuda: no CUDA device is visible")
    return [f"cuda:{i}" for i in range(count)]


def _clean(output: Path) -> None:
    import shutil

    for name in MANAGED:
        path = output / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def handle(args: argparse.Namespace) -> int:
    import logging

    from jobspec import InvalidJob, make_job
    from worker.coordinator_client import CoordinatorError
    from zerowire.external_workers import ExternalWorkers
    from zerowire.localcluster import LocalCluster, write_job_toml

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per status poll is noise
    if args.replay is not None:
        from zerowire.commands.replay import replay_run

        return replay_run(args, JOB_FLAGS)
    args.workers = 2 if args.workers is None else args.workers
    if not 1 <= args.workers <= 64:
        raise CommandError("--workers must be between 1 and 64")
    if args.data_workers is not None and not 0 <= args.data_workers <= 64:
        raise CommandError("--data-workers must be between 0 and 64 (0: decode on the training thread)")
    if not 1 <= args.hosts <= args.workers:
        raise CommandError(f"--hosts must be between 1 and --workers ({args.workers})")
    if not 0 <= args.coordinator_port <= 65535:
        raise CommandError("--coordinator-port must be between 0 and 65535")
    _check_external(args)
    if args.timeout is None and not args.external_workers:
        args.timeout = 3600.0
    try:
        job = make_job(_job_values(args))
    except InvalidJob as exc:
        raise CommandError(str(exc)) from None
    except (ValueError, OSError) as exc:
        raise CommandError(f"invalid job: {exc}") from None
    if job.min_workers > args.workers:
        raise CommandError(f"min_workers {job.min_workers} > --workers {args.workers}")
    _check_drill(args)
    try:  # external workers choose their own devices
        devices = [args.device] if args.external_workers else _devices(args.device)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    _clean(output)
    job_file = output / "job.toml"
    write_job_toml(job_file, job.model_dump(mode="json"))
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)
    tls_dir = None
    if args.tls:
        from zerowire.certs import make_loopback_certs

        tls_dir = (output / "tls").resolve()
        make_loopback_certs(tls_dir)

    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, on_signal)
    token = os.environ.get("ZEROWIRE_TOKEN") or secrets.token_urlsafe(32)
    read_token = os.environ.get("ZEROWIRE_READ_TOKEN") or secrets.token_urlsafe(32)
    admin_token = os.environ.get("ZEROWIRE_ADMIN_TOKEN") or secrets.token_urlsafe(32)
    cluster = (ExternalWorkers if args.external_workers else LocalCluster)(
        host=args.coordinator_host,
        port=args.coordinator_port,
        token=token,
        read_token=read_token,
        admin_token=admin_token,
        output=output.resolve(),
        workers=args.workers,
        job_file=job_file.resolve(),
        threads=threads,
        devices=devices,
        data_dir=Path(args.data_dir).resolve() if args.data_dir else None,
        data_workers=args.data_workers
        if args.data_workers is not None
        else max(1, min(8, (os.cpu_count() or 2) // (2 * args.workers))),
        tls_dir=tls_dir,
        hosts=args.hosts,
    )
    from zerowire.commands.run_driver import drive

    try:
        with cluster:
            return drive(cluster, job, args)
    except KeyboardInterrupt:
        print("\nzerowire run: interrupted; every process was stopped", file=sys.stderr)
        return 130
    except (RuntimeError, CoordinatorError) as exc:
        raise CommandError(str(exc), 1) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
