"""`zerowire bench step` end to end at a tiny size: zerowire, FSDP2 and DDP worker processes and the floor
run in turns and report medians and ratios as JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_bench_step_json(reaper: object) -> None:
    cmd = [sys.executable, "-m", "zerowire.cli", "--log-level", "WARNING", "bench", "step", "--json"]
    cmd += ["--model", "resnet8", "--steps", "2", "--rounds", "2", "--warmup", "0", "--batch", "2"]
    proc = reaper.spawn(  # type: ignore[attr-defined]
        cmd,
        cwd=str(REPO),
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = proc.communicate(timeout=140)
    assert proc.returncode == 0, err.decode()[-3000:]
    report = json.loads(out)
    assert set(report["median_step_s"]) == {"zerowire", "fsdp2", "ddp", "floor"}
    assert all(v > 0 for v in report["median_step_s"].values())
    assert report["ratios"]["zerowire/ddp"] == pytest.approx(
        report["median_step_s"]["zerowire"] / report["median_step_s"]["ddp"]
    )
    assert report["zerowire_wire_bytes_sent"] > 0


def test_bench_step_rejects_unknown_contender() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "zerowire.cli", "bench", "step", "--vs", "horovod"],
        cwd=str(REPO), capture_output=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert b"horovod" in proc.stderr
