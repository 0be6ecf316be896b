"""`zerowire run --replay SUMMARY --workers 1 --output DIR`: re-run the world-size schedule a run recorded in
its summary.json in one process (``worker.replay``), write the model to DIR/model.safetensors and a short
report to DIR/replay.json.

Everything comes from SUMMARY: the job (checked against its hash), the world size of every step and the
skipped steps, and the workers' torch thread count. Every input is checked before anything is written.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from zerowire.commands import CommandError

REPORT = "replay.json"
MODEL = "model.safetensors"


def load_summary(path: Path) -> dict[str, Any]:
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CommandError(f"cannot read the summary {path}: {exc}") from None
    if not isinstance(summary, dict):
        raise CommandError(f"{path} is not a run summary (a JSON object)")
    return summary


def schedule(summary: dict[str, Any], path: Path) -> tuple[list[int], list[int]]:
    """``world_sizes`` (index = step) and ``skipped_steps`` of the summary."""
    sizes = summary.get("world_sizes")
    if not isinstance(sizes, list):
        raise CommandError(
            f"{path} records no world_sizes (a summary of an older zerowire cannot be replayed)"
        )
    missing = [s for s, w in enumerate(sizes) if w is None]
    if missing:
        raise CommandError(f"{path} has no record of steps {missing[:10]}: their world size is unknown")
    if not sizes:
        raise CommandError(f"{path} records no step: nothing to replay")
    skipped = summary.get("skipped_steps", [])
    if not isinstance(skipped, list):
        raise CommandError(f"{path}: skipped_steps must be a list of step numbers")
    return sizes, skipped


def _job(summary: dict[str, Any], path: Path, args: argparse.Namespace, job_flags: Any) -> Any:
    from jobspec import InvalidJob, make_job

    given = [f"--{flag}" for flag, _, _ in job_flags if getattr(args, flag.replace("-", "_")) is not None]
    given += ["--job"] if args.job else []
    try:
        if "job" in summary:
            if given:
                raise CommandError(f"--replay takes the job from {path}; drop {', '.join(given)}")
            job = make_job(summary["job"])
        else:
            if not given:
                raise CommandError(f"{path} records no job: pass it with --job or the job flags")
            from zerowire.commands.run import _job_values

            job = make_job(_job_values(args))
    except InvalidJob as exc:
        raise CommandError(f"{exc} ({path})") from None
    except (ValueError, OSError) as exc:
        raise CommandError(f"invalid job: {exc}") from None
    recorded = summary.get("job_hash")
    if recorded is not None and recorded != job.hash:
        raise CommandError(f"the job's hash {job.hash} differs from the hash {recorded} that {path} records")
    return job


def _check_options(args: argparse.Namespace) -> None:
    if args.workers not in (None, 1):
        raise CommandError(f"--replay runs in one process: --workers must be 1, not {args.workers}")
    for flag, value, default in (
        ("--hosts", args.hosts, 1),
        ("--tls", args.tls, False),
        ("--kill-worker-at-step", args.kill_worker_at_step, None),
    ):
        if value != default:
            raise CommandError(f"{flag} has no meaning with --replay")
    if args.threads is not None and args.threads < 1:
        raise CommandError("--threads must be >= 1")


def exactness_notes(summary: dict[str, Any], job: Any, threads: int, device: str) -> list[str]:
    """Why the replay's parameters may differ from the run's (empty: bit-identical expected)."""
    notes = []
    if job.compression != "none":
        notes.append(
            f"the run compressed its wire with {job.compression}: the replay sums exact fp32 gradients, so "
            "parameters differ by the quantization error"
        )
    workers, hosts = summary.get("workers"), summary.get("hosts")
    # Hosts of equal size > 1 reduce hierarchically; one host, one worker per host or hosts of uneven
    # size reduce in rank order.
    if isinstance(workers, int) and isinstance(hosts, int) and 1 < hosts < workers and workers % hosts == 0:
        notes.append(
            f"the run spread {workers} workers over {hosts} hosts: its hierarchical lane adds inside a host "
            "first, then across hosts, which equals the replay's rank-order sums within fp32 rounding only"
        )
    recorded = summary.get("threads")
    if recorded is not None and recorded != threads:
        notes.append(
            f"the workers ran {recorded} torch threads, the replay {threads}: CPU kernels may round "
            "differently"
        )
    run_device = str(summary.get("device") or "cpu")
    if run_device.split(":")[0] != device.split(":")[0]:
        notes.append(f"the run computed on {run_device}, the replay on {device}: kernels differ")
    return notes


def replay_run(args: argparse.Namespace, job_flags: Any) -> int:
    """The `zerowire run --replay` handler."""
    _check_options(args)
    args.workers = 1
    path = Path(args.replay)
    summary = load_summary(path)
    sizes, skipped = schedule(summary, path)
    job = _job(summary, path, args, job_flags)
    recorded_threads = summary.get("threads")
    threads = args.threads or recorded_threads
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise CommandError(f"{path} does not record the workers' torch thread count: pass --threads")
    from zerowire.commands.run import _devices

    try:
        device = _devices(args.device)[0]
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    from worker.replay import check_schedule

    try:
        check_schedule(job, sizes, skipped)
    except ValueError as exc:
        raise CommandError(f"{path}: {exc}") from None
    output = Path(args.output)
    model_path = output / MODEL
    run_models = [path.parent / MODEL] + ([Path(summary["model"])] if summary.get("model") else [])
    if any(model_path.resolve() == p.resolve() for p in run_models):
        raise CommandError(f"--output {output} holds the run's own model: give the replay another folder")
    notes = exactness_notes(summary, job, threads, device)
    return _replay(args, job, sizes, skipped, threads, device, model_path, summary, notes)


def _replay(
    args: argparse.Namespace,
    job: Any,
    sizes: list[int],
    skipped: list[int],
    threads: int,
    device: str,
    model_path: Path,
    summary: dict[str, Any],
    notes: list[str],
) -> int:
    import torch

    from worker.replay import Replay

    started = time.monotonic()
    torch.set_num_threads(threads)
    print(
        f"zerowire run --replay: {len(sizes)} steps of job {job.job_id} ({job.model} on {job.dataset}) "
        f"at world sizes {_runs(sizes)}, {len(skipped)} skipped, {threads} threads on {device}",
        flush=True,
    )
    for note in notes:
        print(f"zerowire run --replay: note: {note}", flush=True)
    try:
        replay = Replay(
            job, device=torch.device(device), data_dir=Path(args.data_dir) if args.data_dir else None
        )
        outcome = replay.run(sizes, skipped)
    except (ValueError, OSError) as exc:
        raise CommandError(f"replay failed: {exc}", 1) from None
    model_path.parent.mkdir(parents=True, exist_ok=True)
    replay.save_model(model_path)
    report = {
        "replay_of": str(Path(args.replay).resolve()),
        "job": job.model_dump(mode="json"),
        "job_hash": job.hash,
        "steps_done": outcome.steps_done,
        "world_sizes": sizes,
        "skipped_steps": outcome.skipped_steps,
        "losses": outcome.losses,
        "final_loss": outcome.final_loss,
        "run_final_loss": summary.get("final_loss"),
        "threads": threads,
        "device": device,
        "bit_identical_expected": not notes,
        "notes": notes,
        "model": str(model_path.resolve()),
        "wall_time_s": round(time.monotonic() - started, 3),
    }
    (model_path.parent / REPORT).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    loss = outcome.final_loss
    print(
        f"replayed: {outcome.steps_done} steps, final loss {'-' if loss is None else f'{loss:.4f}'}, "
        f"model {model_path}, report {model_path.parent / REPORT}"
    )
    return 0


def _runs(sizes: list[int]) -> str:
    """``[3,3,2,2]`` as ``3 (steps 0-1), 2 (steps 2-3)``."""
    parts: list[str] = []
    start = 0
    for i in range(1, len(sizes) + 1):
        if i == len(sizes) or sizes[i] != sizes[start]:
            span = f"step {start}" if i - 1 == start else f"steps {start}-{i - 1}"
            parts.append(f"{sizes[start]} ({span})")
            start = i
    return ", ".join(parts)
