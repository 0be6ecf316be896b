"""The functions of `deploy/slurm/zerowire.sbatch`, sourced by bash without Slurm: the device of each task,
and the per-task wrapper that starts a worker again when it dies (a bounded number of times) and stops it
with the task. The worker is a stand-in script that records its arguments and environment and exits as
told; the whole script runs against a real Slurm in tests/integration/test_slurm.py."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "deploy" / "slurm" / "zerowire.sbatch"

# A stand-in for the worker's Python: each call records its arguments and ZEROWIRE_* environment, then does
# what line N of `codes` says (an exit code, or "wait": run until SIGTERM, then exit 0 as a worker does).
STUB = """#!/bin/bash
n=$(( $(cat "$STUB_DIR/count" 2>/dev/null || echo 0) + 1 ))
echo "$n" > "$STUB_DIR/count"
printf '%s\\n' "$*" >> "$STUB_DIR/calls"
env | grep '^ZEROWIRE_' | sort > "$STUB_DIR/env-$n"
code=$(sed -n "${n}p" "$STUB_DIR/codes")
if [ "$code" = wait ]; then
    trap 'kill $!; exit 0' TERM
    sleep 30 &
    wait $!
fi
exit "$code"
"""


def bash(snippet: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        ["bash", "-c", f". {SBATCH}; {snippet}"],
        env={"PATH": os.environ["PATH"], **(env or {})},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return done.stdout.strip()


def test_the_job_uses_cuda_when_it_has_gpus_unless_a_device_is_given() -> None:
    assert bash('job_device ""') == "cpu"
    assert bash('job_device ""', {"SLURM_GPUS_ON_NODE": "4"}) == "cuda"
    assert bash('job_device ""', {"SLURM_GPUS_PER_NODE": "4"}) == "cuda"
    assert bash('job_device ""', {"SLURM_GPUS_ON_NODE": "0"}) == "cpu"
    assert bash("job_device cpu", {"SLURM_GPUS_ON_NODE": "4"}) == "cpu"


def test_each_task_gets_the_gpu_of_its_local_id() -> None:
    every_gpu = {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    assert [bash("task_device cuda", {**every_gpu, "SLURM_LOCALID": str(i)}) for i in range(4)] == [
        f"cuda:{i}" for i in range(4)
    ]
    # a task that sees only its own GPU (--gpus-per-task 1)
    assert bash("task_device cuda", {"CUDA_VISIBLE_DEVICES": "2", "SLURM_LOCALID": "3"}) == "cuda:0"
    assert bash("task_device cpu", {**every_gpu, "SLURM_LOCALID": "1"}) == "cpu"
    assert bash("task_device cuda:1", {**every_gpu, "SLURM_LOCALID": "3"}) == "cuda:1"


def task_env(tmp: Path, codes: list[str], **extra: str) -> dict[str, str]:
    stub = tmp / "python"
    stub.write_text(STUB)
    stub.chmod(0o755)
    (tmp / "codes").write_text("\n".join(codes) + "\n")
    (tmp / "out" / "logs").mkdir(parents=True)
    return {
        "PATH": os.environ["PATH"],
        "STUB_DIR": str(tmp),
        "ZW_PYTHON": str(stub),
        "ZW_URL": "http://node7:8765",
        "ZW_OUTPUT": str(tmp / "out"),
        "ZW_DEVICE": "cpu",
        "ZW_THREADS": "4",
        "ZW_DATA_DIR": "",
        "ZW_DATA_WORKERS": "",
        "ZW_MAX_RESTARTS": "2",
        "ZW_RESTART_DELAY": "0",
        "SLURMD_NODENAME": "node7",
        "SLURM_LOCALID": "1",
        "SLURM_PROCID": "5",
        "ZEROWIRE_TOKEN": "cluster-token",
        "ZEROWIRE_READ_TOKEN": "read-token",
        "ZEROWIRE_ADMIN_TOKEN": "admin-token",
        **extra,
    }


def run_task(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", f". {SBATCH}; zerowire_task"], env=env, capture_output=True, text=True, timeout=30
    )


def test_a_killed_worker_is_started_again_with_the_same_id_and_the_cluster_token_only(tmp_path: Path) -> None:
    env = task_env(tmp_path, ["137", "0"], ZW_DEVICE="cuda", CUDA_VISIBLE_DEVICES="0,1")
    done = run_task(env)
    assert done.returncode == 0, done.stdout + done.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert len(calls) == 2 and calls[0] == calls[1]
    args = calls[0].split()
    for flag, value in (
        ("--coordinator", "http://node7:8765"),
        ("--worker-id", "node7-1"),
        ("--host-id", "node7"),
        ("--device", "cuda:1"),
        ("--threads", "4"),
        ("--telemetry-dir", f"{tmp_path}/out/telemetry"),
        ("--save-model", f"{tmp_path}/out/model.safetensors"),
    ):
        assert args[args.index(flag) + 1] == value, flag
    assert "--data-dir" not in args and "cluster-token" not in calls[0]
    assert (tmp_path / "env-1").read_text().split() == ["ZEROWIRE_TOKEN=cluster-token"]
    assert "worker node7-1 was killed by signal 9" in done.stdout
    assert "worker node7-1: restart 1 of 2" in done.stdout
    assert (tmp_path / "out" / "logs" / "node7-1.exit").read_text() == "0\n"


def test_a_task_gives_up_after_its_restarts(tmp_path: Path) -> None:
    done = run_task(task_env(tmp_path, ["1", "1", "1", "0"]))
    assert done.returncode == 1
    assert len((tmp_path / "calls").read_text().splitlines()) == 3  # the first start and 2 restarts
    assert "worker node7-1: 2 restarts used up; this task gives up" in done.stdout
    assert (tmp_path / "out" / "logs" / "node7-1.exit").read_text() == "1\n"


@pytest.mark.timeout(30)
def test_sigterm_stops_the_worker_and_the_task_without_a_restart(tmp_path: Path) -> None:
    env = task_env(tmp_path, ["wait", "0"])
    task = subprocess.Popen(
        ["bash", "-c", f". {SBATCH}; zerowire_task"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 10
        while not (tmp_path / "env-1").exists():
            assert time.monotonic() < deadline, "the worker did not start"
            time.sleep(0.05)
        task.send_signal(signal.SIGTERM)
        out, _ = task.communicate(timeout=10)
    finally:
        if task.poll() is None:
            os.killpg(task.pid, signal.SIGKILL)
            task.wait(5)
    assert task.returncode == 0, out
    assert "worker node7-1: done (exit code 0, stopped)" in out
    assert len((tmp_path / "calls").read_text().splitlines()) == 1
    assert group_gone(task.pid, 5.0), "a process of the task outlived it"


def group_gone(pgid: int, timeout_s: float) -> bool:
    """No process is left in group `pgid` (an orphan's exit is reaped by init, a moment later)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False
