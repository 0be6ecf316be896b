"""The Python API: build a job from your model and your data, run it on local workers, or hand it to a
coordinator.

    from zerowire.api import ImageFolder, make_job, run_local, write_job

    def small_cnn(num_classes, in_channels):           # in an importable module, or the script you run
        return torch.nn.Sequential(...)

    job = make_job(model=small_cnn, data=ImageFolder("/data/flowers"), steps=500, image_size=64)
    summary = run_local(job, workers=2, output="runs/flowers")   # summary.json, as `zerowire run` writes it
    write_job(job, "job.toml")                          # for `zerowire coordinator --job job.toml`

Workers are separate processes, possibly on other machines: they receive the job, never Python objects. A
model factory is therefore named by where it lives (``module:function``, or ``path/to/file.py:function``
when it is defined in the script being run), and every worker must reach the same file or module. An
invalid job is refused with ``jobspec.InvalidJob``, in one line that names the option at fault.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobspec import InvalidJob, JobSpec
from jobspec import make_job as _make_job


@dataclass(frozen=True)
class ImageFolder:
    """A tree of image files: ``root/train/<class>/*`` and optionally ``root/val/<class>/*``."""

    root: str | Path

    def spec(self) -> str:
        return f"imagefolder:{Path(self.root).resolve()}"


def model_name(model: str | Callable[..., Any]) -> str:
    """The job's ``model`` for a registry name, a ``where:function`` name, or a factory function (named by
    its module, or by its file when it is defined in the script being run)."""
    if isinstance(model, str):
        return model
    name = getattr(model, "__qualname__", "")
    if not callable(model) or not name.isidentifier():  # a lambda, a method, a nested function
        raise InvalidJob(f"invalid job: --model must be a module-level function, got {model!r}")
    module = getattr(model, "__module__", None)
    if module in (None, "__main__"):
        source = inspect.getsourcefile(model)
        if source is None:
            raise InvalidJob(f"invalid job: --model {name} is defined where workers cannot find it")
        return f"{Path(source).resolve()}:{name}"
    return f"{module}:{name}"


def make_job(
    *, model: str | Callable[..., Any] = "resnet8", data: str | ImageFolder = "digits", **options: Any
) -> JobSpec:
    """A job (options as the flags of ``zerowire run``, with ``_`` for ``-``); InvalidJob otherwise."""
    dataset = data.spec() if isinstance(data, ImageFolder) else data
    return _make_job({**options, "model": model_name(model), "dataset": dataset})


def write_job(job: JobSpec, path: str | Path) -> Path:
    """The job as a TOML file, for ``zerowire coordinator --job FILE`` (or ``zerowire run --job FILE``)."""
    from zerowire.localcluster import write_job_toml

    out = Path(path)
    write_job_toml(out, job.model_dump(mode="json"))
    return out


def run_local(
    job: JobSpec,
    *,
    workers: int = 2,
    output: str | Path,
    data_workers: int | None = None,
    threads: int | None = None,
    timeout_s: float = 3600.0,
    extra_args: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Run ``job`` on a local cluster of ``workers`` processes (``zerowire run``) and return its summary; a
    RuntimeError with the end of the run's output if it fails."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    job_file = write_job(job, out / "job.toml")
    cmd = [sys.executable, "-m", "zerowire.cli", "run", "--job", str(job_file), "--workers", str(workers)]
    cmd += ["--output", str(out), "--timeout", str(timeout_s)]
    if data_workers is not None:
        cmd += ["--data-workers", str(data_workers)]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    cmd += list(extra_args)
    # the workers import a factory's module as this process does: from the script's folder and the cwd too
    paths = [p for p in (sys.path[0], os.getcwd(), os.environ.get("PYTHONPATH", "")) if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s + 120)
    if done.returncode != 0:
        raise RuntimeError(f"zerowire run failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    summary: dict[str, Any] = json.loads((out / "summary.json").read_text())
    return summary
