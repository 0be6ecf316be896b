"""The NCCL lane between two processes on two GPUs (tests/gpu/nccl_lane_peer.py is one rank):

- a peer killed (SIGKILL) while the other waits in a collective: the survivor's call fails with PeerLost
  or CollectiveTimeout within its timeout, the survivor's process lives on (the library's watchdog does
  not end it), and its next epoch's group forms and gathers exactly;
- the ordered reduce-scatter equals the sequential rank-order sum bit for bit; the native one (NCCL's)
  equals it within fp32 rounding.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA devices", allow_module_level=True)

from tests.conftest import ProcessReaper, free_port
from tests.gpu.nccl_lane_peer import CALL_TIMEOUT_S

REPO = Path(__file__).resolve().parents[2]
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(240),
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs"),
]


def _spawn(reaper: ProcessReaper, tmp_path: Path, scenario: str) -> list[subprocess.Popen[bytes]]:
    rendezvous = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return [
        reaper.spawn(
            [sys.executable, "-m", "tests.gpu.nccl_lane_peer", str(tmp_path), str(r), scenario, *rendezvous],
            cwd=str(REPO),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(2)
    ]


def _wait_files(paths: list[Path], limit: float) -> None:
    deadline = time.monotonic() + limit
    while not all(p.exists() for p in paths):
        assert time.monotonic() < deadline, f"not all of {paths} appeared"
        time.sleep(0.02)


def test_a_killed_peer_fails_the_collective_in_time_and_the_survivor_forms_the_next_epoch(
    reaper: ProcessReaper, tmp_path: Path
) -> None:
    procs = _spawn(reaper, tmp_path, "lost")
    _wait_files([tmp_path / "ready.0", tmp_path / "ready.1"], 120)
    os.killpg(procs[1].pid, signal.SIGKILL)
    procs[1].wait(timeout=10)
    (tmp_path / "go").touch()
    out, _ = procs[0].communicate(timeout=150)
    assert procs[0].returncode == 0, f"the survivor failed:\n{out.decode()[-3000:]}"
    result = json.loads((tmp_path / "result.0.json").read_text())
    assert result["first"] == [1.0] * 4 + [2.0] * 4
    assert result["error"] in ("PeerLost", "CollectiveTimeout"), result
    assert result["elapsed"] < CALL_TIMEOUT_S + 1.0, result
    assert result["next_epoch_exact"] is True


def test_ordered_reduce_scatter_is_the_sequential_sum_and_native_is_within_rounding(
    reaper: ProcessReaper, tmp_path: Path
) -> None:
    procs = _spawn(reaper, tmp_path, "reduce")
    for r, proc in enumerate(procs):
        out, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, f"rank {r} failed:\n{out.decode()[-3000:]}"
    for r in range(2):
        result = json.loads((tmp_path / f"result.{r}.json").read_text())
        sequential = torch.tensor(result["sequential"])
        assert torch.equal(torch.tensor(result["ordered"]), sequential)
        assert torch.allclose(torch.tensor(result["native"]), sequential, rtol=1e-6, atol=1e-4)
