"""`zerowire bench coordinator` end to end on a tiny cluster: it runs, and its figures are sane."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.integration.coordinator_proc import REPO, coordinator_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]


def test_bench_coordinator_small_run() -> None:
    args = [
        sys.executable, "-m", "zerowire.cli", "--log-level", "WARNING", "bench", "coordinator",
        "--workers", "6", "--rate", "2", "--duration", "3", "--warmup", "0.5", "--json",
    ]  # fmt: skip
    out = subprocess.run(
        args, env=coordinator_env(None), cwd=str(REPO), capture_output=True, text=True, timeout=80
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert result["workers"] == 6 and result["heartbeat_errors"] == 0
    assert result["heartbeats"] >= 20  # 5 live workers at 2 Hz for 3 s, minus the stopped one
    assert 0 < result["latency_p50_ms"] <= result["latency_p99_ms"] <= result["latency_max_ms"]
    assert result["false_evictions"] == 0
    assert result["victim_detected_dead"] is True
    # the heartbeat timeout plus one reaper tick, with slack for a busy machine
    assert 1.9 <= result["detection_latency_s"] < 2.0 + 0.25 + 3.0
