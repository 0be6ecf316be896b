"""`zerowire bench data --json`: both contenders read the same batches through their loader processes, and
the report has the keys other tools read (``images_per_s``, ``ratios["zerowire/dataloader"]``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_bench_data_json(reaper: object) -> None:
    cmd = [sys.executable, "-m", "zerowire.cli", "--log-level", "WARNING", "bench", "data", "--json"]
    cmd += [
        "--images",
        "24",
        "--size",
        "32",
        "--batch",
        "4",
        "--batches",
        "2",
        "--rounds",
        "1",
        "--processes",
        "1",
    ]
    proc = reaper.spawn(cmd, cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # type: ignore[attr-defined]
    out, err = proc.communicate(timeout=110)
    assert proc.returncode == 0, err.decode()[-3000:]
    report = json.loads(out)
    assert set(report["images_per_s"]) == {"zerowire", "dataloader"}
    assert all(v > 0 for v in report["images_per_s"].values())
    assert report["ratios"]["zerowire/dataloader"] == pytest.approx(
        report["images_per_s"]["zerowire"] / report["images_per_s"]["dataloader"]
    )
    assert [r["contender"] for r in report["runs"]] == ["zerowire", "dataloader"]
    assert (report["size"], report["augment"], report["processes"]) == (32, "rrc-flip", 1)
