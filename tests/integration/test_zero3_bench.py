"""`zerowire bench step` end to end at a tiny size: zerowire, FSDP2 and DDP worker processes and the floor
run in interleaved rounds, each contender alone in fresh processes, and report medians and ratios as JSON;
and the standalone DDP reference script runs with the same settings."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from itertools import combinations
from pathlib import Path

import pytest
import torch

from zerowire.localcluster import WORKER_MALLOC_ENV

REPO = Path(__file__).resolve().parents[2]
# --colocated: zerowire over the local torch.distributed lane and over flat gRPC (the default contender's
# data plane) between the same co-located processes; FSDP2 runs in the same harness: test_bench_memory's
# JSON has it
KINDS = ["zerowire_local", "zerowire_grpc", "ddp", "floor"]
# The settings every contender must get when the caller's environment sets no malloc thresholds.
EXPECTED_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **WORKER_MALLOC_ENV}


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in WORKER_MALLOC_ENV}
    return {**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "4"}  # the bench must override the threads


@pytest.mark.slow
@pytest.mark.timeout(170)
def test_bench_step_json(reaper: object) -> None:
    """Every contender in interleaved rounds of fresh processes with the same settings, and the report's
    figures; with --colocated, zerowire over the local torch.distributed lane and over flat gRPC between the
    same co-located processes, each its own contender, the lane counters showing which lane carried the
    bytes."""
    cmd = [sys.executable, "-m", "zerowire.cli", "--log-level", "WARNING", "bench", "step", "--json"]
    cmd += ["--colocated", "--vs", "ddp", "--model", "resnet8", "--steps", "2", "--rounds", "2"]
    cmd += ["--warmup", "0", "--batch", "2"]
    proc = reaper.spawn(  # type: ignore[attr-defined]
        cmd, cwd=str(REPO), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = proc.communicate(timeout=160)
    assert proc.returncode == 0, err.decode()[-3000:]
    report = json.loads(out)
    keys = {"model", "workers", "batch_per_worker", "compression", "steps", "median_step_s", "ratios"}
    keys |= {"zerowire_wait_s_median", "zerowire_wire_bytes_sent", "round_medians_s", "process_env"}
    assert keys <= set(report)
    assert [report[k] for k in ("model", "workers", "batch_per_worker", "steps")] == ["resnet8", 2, 2, 2]
    assert report["colocated"] is True
    assert set(report["median_step_s"]) == set(KINDS)
    assert all(v > 0 for v in report["median_step_s"].values())
    ours = ("zerowire_local", "zerowire_grpc")
    ratios = {f"{z}/{k}" for z in ours for k in ("ddp", "floor")} | {"ddp/floor"}
    assert set(report["ratios"]) == ratios
    for z in ours:
        assert report["ratios"][f"{z}/ddp"] == pytest.approx(
            report["median_step_s"][z] / report["median_step_s"]["ddp"]
        )
    assert report["zerowire_wire_bytes_sent"] > 0
    lanes = report["bytes_by_lane"]
    assert lanes["zerowire_local"]["local"] > 0 and lanes["zerowire_local"]["grpc"] == 0
    assert lanes["zerowire_grpc"]["grpc"] > 0 and lanes["zerowire_grpc"]["local"] == 0

    # Interleaved rounds, the order rotating by one each round; one measured step per round.
    runs = report["runs"]
    assert [(r["round"], r["contender"]) for r in runs] == [(0, k) for k in KINDS] + [
        (1, k) for k in KINDS[1:] + KINDS[:1]
    ]
    assert all(r["steps"] == 1 for r in runs)
    for kind in KINDS:
        assert len(report["round_medians_s"][kind]) == 2
        # one step per round: the median of all steps is the median of the round medians
        assert report["median_step_s"][kind] == pytest.approx(
            statistics.median(report["round_medians_s"][kind])
        )

    # Fresh processes per run, alive only within it, and no two runs' processes alive at once.
    for r in runs:
        assert len(r["processes"]) == (1 if r["contender"] == "floor" else 2)
        for p in r["processes"]:
            assert r["spawned_s"] <= p["start_s"] < p["exit_s"] <= r["reaped_s"]
    for a, b in combinations(runs, 2):
        assert a["reaped_s"] <= b["spawned_s"], (a["contender"], a["round"], b["contender"], b["round"])
        for p in a["processes"]:
            for q in b["processes"]:
                assert p["exit_s"] < q["start_s"]

    # The same settings in every process of every contender, and recorded.
    assert report["process_env"] == EXPECTED_ENV
    assert report["torch_num_threads"] == 1
    for r in runs:
        for p in r["processes"]:
            assert p["env"] == EXPECTED_ENV and p["torch_threads"] == 1, (r["contender"], p)


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_ddp_standalone_script(reaper: object) -> None:
    cmd = [sys.executable, str(REPO / "scripts" / "ddp_standalone.py"), "--json", "--model", "resnet8"]
    cmd += ["--steps", "2", "--warmup", "0", "--batch", "2"]
    proc = reaper.spawn(  # type: ignore[attr-defined]
        cmd, cwd=str(REPO), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = proc.communicate(timeout=80)
    assert proc.returncode == 0, err.decode()[-3000:]
    report = json.loads(out)
    assert report["median_step_s"] > 0
    assert (report["workers"], report["batch_per_worker"], report["torch_threads"]) == (2, 2, 1)
    assert report["process_env"] == EXPECTED_ENV


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--vs", "horovod"], b"horovod"),
        (["--steps", "2", "--rounds", "3"], b"--rounds (3) must not exceed"),
        pytest.param(
            ["--device", "cuda", "--memory"],
            b"CUDA is not available",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="asks a machine without CUDA"),
        ),
    ],
)
def test_bench_step_rejects_bad_input(args: list[str], needle: bytes) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "zerowire.cli", "bench", "step", *args],
        cwd=str(REPO), capture_output=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert needle in proc.stderr
