"""Convergence with INT8 on the wire: 2 real worker processes over gRPC train resnet8 on digits for 100 steps
with and without compression; int8 reaches a test accuracy within 0.5 points of fp32 (or better), and every
rank reports the same evaluation (control values cross the quantizing wire exactly)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.test_zero3_grpc import run_cluster

JOB = dict(
    job_id="int8", model="resnet8", dataset="digits", steps=100, global_batch=64, lr=0.1, momentum=0.9,
    weight_decay=5e-4, schedule="cosine", warmup_steps=10, seed=0, eval_every=50, int8_block=256,
)  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_int8_accuracy_within_half_a_point_of_fp32(reaper: object, tmp_path: Path) -> None:
    fp32 = run_cluster(reaper, 2, tmp_path / "fp32", {**JOB, "compression": "none"})
    int8 = run_cluster(reaper, 2, tmp_path / "int8", {**JOB, "compression": "int8"})
    for runs in (fp32, int8):
        assert runs[0] == runs[1], "ranks report different results"
        assert runs[0]["steps_done"] == 100
    acc32, acc8 = float(fp32[0]["test_accuracy"]), float(int8[0]["test_accuracy"])  # type: ignore[arg-type]
    print(f"digits resnet8 100 steps, 2 workers: fp32 {acc32:.4f}, int8 {acc8:.4f}")  # shown with pytest -s
    assert acc32 > 0.95
    assert acc8 >= acc32 - 0.005, f"int8 {acc8:.4f} vs fp32 {acc32:.4f}"
    assert fp32[0]["final_loss"] != int8[0]["final_loss"]  # the codec really was in use
