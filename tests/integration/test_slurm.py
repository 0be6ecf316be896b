"""`deploy/slurm/zerowire.sbatch` against a real Slurm: a one-node cluster of `slurmctld` and `slurmd` (with
`munged`) started by the test (`tests/integration/slurm_cluster.py`).

One job of 3 tasks trains to its end while one of its workers is SIGKILLed: the task starts it again, it
rejoins the running job, no step is committed twice, and summary.json, the model and the telemetry land in
--output; the tokens stay out of the job's log and off every command line. Another job is cancelled with
`scancel` while its one worker trains: every process of it ends, well before Slurm's own SIGKILL (KillWait,
30 s), and the summary of what it did is written.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.cluster_support import processes_mentioning, read_jsonl, wait_for
from tests.integration.slurm_cluster import PACKAGES, SlurmCluster, missing_binaries

pytestmark = [pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "deploy" / "slurm" / "zerowire.sbatch"
JOB = ("--model", "resnet8", "--dataset", "digits", "--eval-every", "0", "--checkpoint-every", "0")
STEPS = 200  # on 2 loaded cores, the killed worker's restart rejoins about 80 steps after the kill
KILL_AT = 3


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    missing = missing_binaries()
    if missing:
        pytest.skip(
            f"{PACKAGES} are not installed (no {', '.join(missing)}): scripts/system_packages.sh installs "
            "them as root with apt-get"
        )
    if os.geteuid() != 0:
        pytest.skip("the test's Slurm cluster runs its daemons and the job's tasks as root (SlurmUser=root)")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def submit(slurm: SlurmCluster, tmp: Path, *job: str, tasks: int = 3) -> str:
    """sbatch the script for `tasks` tasks on the node, the job's flags after it; the job id."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ZEROWIRE_", "SLURM_"))}
    env.update(
        PYTHONPATH=str(REPO),
        PYTHONUNBUFFERED="1",
        ZEROWIRE_PYTHON=sys.executable,
        # 1 s plus the worker's start-up (over 2 s) outlast the 2 s the coordinator takes to declare the
        # killed worker dead, which frees its id for the restarted one
        ZEROWIRE_RESTART_DELAY="1",
    )
    command = [
        "sbatch",
        "--parsable",
        "--nodes=1",
        f"--ntasks-per-node={tasks}",
        f"--output={tmp / 'job.log'}",
    ]
    done = subprocess.run(
        [*command, str(SBATCH), *job, "--output", str(tmp / "out")],
        env=slurm.env(env),
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0]


def last_step(telemetry: Path) -> int:
    return max((int(r["step"]) for r in read_jsonl(telemetry) if r.get("kind") == "step"), default=-1)


def worker_pid(marker: str, worker_id: str) -> int:
    pids = [
        pid
        for pid, cmd in processes_mentioning(marker)
        if f"--worker-id {worker_id} " in cmd and "zerowire.cli worker" in cmd
    ]
    assert len(pids) == 1, pids
    return pids[0]


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


def command_lines() -> str:
    lines = []
    for entry in Path("/proc").iterdir():
        try:
            lines.append((entry / "cmdline").read_bytes().decode(errors="replace"))
        except OSError:
            continue
    return "\n".join(lines)


@pytest.mark.timeout(150)
def test_a_3_task_job_completes_and_a_sigkilled_worker_rejoins_without_a_step_redone(
    slurm: SlurmCluster, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    job_id = submit(slurm, tmp_path, *JOB, "--steps", str(STEPS), "--job-id", "slurm-drill")
    victim = f"{slurm.node}-2"
    wait_for(
        lambda: last_step(out / "telemetry" / f"{victim}.jsonl") >= KILL_AT, 90, f"{victim} to train", 0.2
    )
    pid = worker_pid(str(out), victim)
    tokens = environ(pid)
    token = tokens["ZEROWIRE_TOKEN"]
    assert len(token) >= 32 and "ZEROWIRE_READ_TOKEN" not in tokens and "ZEROWIRE_ADMIN_TOKEN" not in tokens
    assert token not in command_lines()
    os.kill(pid, signal.SIGKILL)
    killed = time.time()

    state = slurm.wait_ended(job_id, 100)
    log = (tmp_path / "job.log").read_text()
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", log
    s = json.loads((out / "summary.json").read_text())
    assert s["completed"] and s["steps_done"] == STEPS and s["cluster_state"] == "finished"
    assert s["steps_redone"] == 0
    assert (s["workers"], s["hosts"], s["threads"], s["device"]) == (3, 1, 1, "cpu")
    ids = [f"{slurm.node}-{i}" for i in range(3)]
    assert s["worker_exit_codes"] == dict.fromkeys(ids, 0)
    # the kill: the victim died, the survivors handed its shards over, its restart rejoined
    assert [w for _, w in s["world_size_per_step"]] == [3, 2, 3], s["world_size_per_step"]
    assert any(f["kind"] == "died" and f["worker_id"] == victim for f in s["failures"]), s["failures"]
    modes = [r["mode"] for r in s["recoveries"] if r["time"] > killed]
    assert modes == ["handover", "join"], s["recoveries"]
    assert all(r["steps_lost"] == 0 for r in s["recoveries"])
    records = read_jsonl(out / "telemetry" / f"{victim}.jsonl")
    rejoined = [r for r in records if r["time"] > killed and r["kind"] == "recovery"]
    assert [r["mode"] for r in rejoined] == ["join"]
    assert [r["kind"] for r in records if r["time"] > killed][-1] == "result"
    assert f"worker {victim} was killed by signal 9" in log and f"worker {victim}: restart 1 of 3" in log
    # the results of `zerowire run`, in --output
    for name in (
        "model.safetensors",
        "training.png",
        "job.toml",
        "logs/coordinator.log",
        f"logs/{victim}.log",
    ):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "telemetry").iterdir()) == [f"{i}.jsonl" for i in ids]
    # the tokens: in the environment only, and the read-only one in a file of the user's own
    status_env = (out / "status.env").read_text()
    read_token = status_env.split("ZEROWIRE_READ_TOKEN=", 1)[1].split()[0]
    assert (out / "status.env").stat().st_mode & 0o077 == 0
    for secret in (token, read_token):
        assert secret not in log
        assert secret not in (out / "logs" / "coordinator.log").read_text()
    assert processes_mentioning(str(out)) == []


@pytest.mark.timeout(90)
def test_scancel_ends_every_process_of_the_job_and_leaves_its_summary(
    slurm: SlurmCluster, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    job_id = submit(slurm, tmp_path, *JOB, "--steps", "100000", "--job-id", "slurm-cancel", tasks=1)
    ids = [f"{slurm.node}-0"]  # one task: the batch script's and the task's traps are what is tested
    wait_for(
        lambda: min(last_step(out / "telemetry" / f"{i}.jsonl") for i in ids) >= 1, 90, "the workers to train"
    )
    assert len(processes_mentioning(str(out))) >= 3  # the batch script, the run and coordinator, the worker
    cancelled = time.monotonic()
    slurm.run("scancel", job_id)
    state = slurm.wait_ended(job_id, 40)
    wait_for(lambda: processes_mentioning(str(out)) == [], 40, "every process of the job to end", 0.2)
    took = time.monotonic() - cancelled
    log = (tmp_path / "job.log").read_text()
    assert state["JobState"] == "CANCELLED", state
    assert took < 20, f"{took:.1f}s: Slurm's SIGKILL (KillWait 30 s) would have ended it, not the script"
    assert "SIGTERM: stopping the job's processes" in log, log
    assert "zerowire run: stopped by a signal; writing the summary of what was done" in log, log
    assert "\nstopped: " in log, log
    s = json.loads((out / "summary.json").read_text())
    assert not s["completed"] and 1 <= s["steps_done"] < 100000
    assert s["worker_exit_codes"] == dict.fromkeys(ids, 0)  # stopped by SIGTERM, not killed
    for i in ids:
        assert f"{i}: done (exit code 0, stopped)" in log
        assert "SIGTERM received; stopping" in (out / "logs" / f"{i}.log").read_text(), i
