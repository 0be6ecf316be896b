"""The schedule of `zerowire bench step`: interleaved rounds, each contender in fresh processes, alone.

Round r runs every contender once, in the order of the contender list rotated by r (so no contender always
follows the same one, and each takes every position in a round). One run of a contender starts its
processes, which warm up (unmeasured steps), run the round's share of the measured steps and exit; the next
run starts only once every process of the previous one has exited and been reaped. So no contender's
process is ever alive while another contender runs, and slow drifts of the machine's load hit every
contender alike. Every process of every contender gets the same settings (:func:`process_env`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zerowire.localcluster import WORKER_MALLOC_ENV, free_port

TORCH_THREADS = 1  # torch.set_num_threads() in every contender's processes
THREAD_ENV = {"OMP_NUM_THREADS": str(TORCH_THREADS), "MKL_NUM_THREADS": str(TORCH_THREADS)}
POLL_S = 0.05  # how often the harness looks at a run's processes (it sleeps in between)


def process_env() -> dict[str, str]:
    """The environment settings of every contender's processes: one intra-op thread (the processes also
    set torch's thread count to ``TORCH_THREADS``) and the malloc thresholds of the product's workers (a
    value already set in this environment wins, as it does for ``zerowire run``)."""
    env = dict(THREAD_ENV)
    for key, value in WORKER_MALLOC_ENV.items():
        env[key] = os.environ.get(key, value)
    return env


def split_steps(steps: int, rounds: int) -> list[int]:
    """Measured steps of each round: ``steps`` split as evenly as possible, earlier rounds taking the rest."""
    if not 1 <= rounds <= steps:
        raise ValueError(f"need 1 <= rounds <= steps, got rounds={rounds}, steps={steps}")
    return [steps // rounds + (1 if r < steps % rounds else 0) for r in range(rounds)]


def round_order(kinds: list[str], rnd: int) -> list[str]:
    """The contenders of round ``rnd`` in running order: the list rotated left by ``rnd``."""
    k = rnd % len(kinds)
    return kinds[k:] + kinds[:k]


@dataclass
class Run:
    """One contender's processes in one round: wall-clock spawn and reap times and each rank's report."""

    contender: str
    round: int
    steps: int
    spawned_s: float
    reaped_s: float
    reports: list[dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        keys = ("start_s", "exit_s", "torch_threads", "env")
        return {
            "contender": self.contender,
            "round": self.round,
            "steps": self.steps,
            "spawned_s": self.spawned_s,
            "reaped_s": self.reaped_s,
            "processes": [{"rank": r, **{k: rep[k] for k in keys}} for r, rep in enumerate(self.reports)],
        }


def _worker_cmd(kind: str, rank: int, world: int, ports: str, directory: Path, steps: int,
                a: argparse.Namespace) -> list[str]:  # fmt: skip
    return [
        sys.executable, "-m", "zerowire.bench.step", "--worker", kind, "--rank", str(rank), "--world",
        str(world), "--ports", ports, "--dir", str(directory), "--steps", str(steps), "--warmup",
        str(a.warmup), "--batch", str(a.batch), "--model", a.model, "--compression", a.compression,
        "--replicas", str(getattr(a, "replicas", 0)), "--device", getattr(a, "device", "cpu"),
        "--recorder", "off" if getattr(a, "recorder", "on") == "off" else "on",
        "--nccl-reduce", "native" if getattr(a, "nccl_reduce", "ordered") == "native" else "ordered",
        *(["--memory"] if getattr(a, "memory", False) else []),
    ]  # fmt: skip


def _kill(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)


def run_contender(
    kind: str, rnd: int, steps: int, root: Path, a: argparse.Namespace, label: str | None = None
) -> Run:
    """Start ``kind``'s processes, wait (at most ``a.timeout`` s) until every one has exited, read reports
    (the run is called ``label``, default ``kind``)."""
    name = label or kind
    world = 1 if kind == "floor" else a.workers
    directory = root / f"{rnd}-{name}"
    directory.mkdir()
    ports = ",".join(str(free_port()) for _ in range(world))
    env = {**os.environ, **process_env()}
    procs: list[subprocess.Popen[bytes]] = []
    spawned_s = time.time()
    try:
        for rank in range(world):
            with open(directory / f"log-{rank}", "wb") as log:
                cmd = _worker_cmd(kind, rank, world, ports, directory, steps, a)
                procs.append(
                    subprocess.Popen(
                        cmd, env=env, start_new_session=True, stdin=subprocess.DEVNULL, stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )  # fmt: skip
        deadline = time.monotonic() + a.timeout
        while True:
            codes = [proc.poll() for proc in procs]
            for rank, code in enumerate(codes):
                if code not in (None, 0):
                    tail = (directory / f"log-{rank}").read_bytes()[-2000:].decode(errors="replace")
                    raise RuntimeError(f"{name} (round {rnd}): rank {rank} exited with {code}:\n{tail}")
            if all(code == 0 for code in codes):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} (round {rnd}): not finished after {a.timeout:.0f} s")
            time.sleep(POLL_S)
    finally:
        _kill(procs)
    reaped_s = time.time()
    reports = [json.loads((directory / f"report-{r}").read_text()) for r in range(world)]
    threads = {rep["torch_threads"] for rep in reports}
    assert threads == {TORCH_THREADS}, f"{name}: torch thread counts {threads}"
    return Run(name, rnd, steps, spawned_s, reaped_s, reports)


def measure(kinds: list[str], a: argparse.Namespace, root: Path) -> list[Run]:
    """Every contender once per round, ``a.rounds`` rounds, in the order the runs happened."""
    runs: list[Run] = []
    variants = {  # label: (the workers it runs, their options)
        # the zerowire workers with a buddy replica, and without the flight recorder
        "zerowire_replicated": ("zerowire", argparse.Namespace(**{**vars(a), "replicas": 1})),
        "zerowire_unrecorded": ("zerowire", argparse.Namespace(**{**vars(a), "recorder": "off"})),
        # the local lane with NCCL's own reduce-scatter
        "zerowire_local_native": (
            "zerowire_local",
            argparse.Namespace(**{**vars(a), "nccl_reduce": "native"}),
        ),
    }
    for rnd, steps in enumerate(split_steps(a.steps, a.rounds)):
        for kind in round_order(kinds, rnd):
            if kind in variants:
                workers, options = variants[kind]
                runs.append(run_contender(workers, rnd, steps, root, options, label=kind))
            else:
                runs.append(run_contender(kind, rnd, steps, root, a))
    return runs
