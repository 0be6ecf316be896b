"""The pieces around the daemon: addresses, the job file of a local run, the summary, the progress line
and the status table."""

from __future__ import annotations

import io
import json
import tomllib
from pathlib import Path

import pytest

from jobspec import JobSpec
from worker.identity import (
    WorkerConfig,
    advertised_address,
    format_address,
    parse_job_answer,
    split_host_port,
)
from zerowire.commands.status import render
from zerowire.localcluster import write_job_toml
from zerowire.progress import Progress
from zerowire.summary import (
    build_summary,
    read_telemetry,
    recovery_after,
    skipped_steps,
    world_size_runs,
    world_sizes,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.7", ("10.0.0.7", 50051)),
        ("10.0.0.7:31051", ("10.0.0.7", 31051)),
        ("node-3.example", ("node-3.example", 50051)),
        ("[fd00::7]:9000", ("fd00::7", 9000)),
        ("fd00::7", ("fd00::7", 50051)),
    ],
)
def test_split_host_port(text: str, expected: tuple[str, int]) -> None:
    assert split_host_port(text, 50051) == expected


def test_format_address_brackets_ipv6() -> None:
    assert format_address("10.0.0.7", 1) == "10.0.0.7:1"
    assert format_address("fd00::7", 1) == "[fd00::7]:1"


def test_advertised_address_prefers_advertise_then_bind_then_route() -> None:
    cfg = WorkerConfig(coordinator="http://127.0.0.1:8765", bind="0.0.0.0:0")
    assert advertised_address(cfg, 4000) == ("127.0.0.1", 4000)  # the route to a loopback coordinator
    cfg = WorkerConfig(coordinator="http://127.0.0.1:8765", bind="127.0.0.2:0")
    assert advertised_address(cfg, 4000) == ("127.0.0.2", 4000)
    cfg = WorkerConfig(coordinator="http://127.0.0.1:8765", bind="0.0.0.0:0", advertise="203.0.113.7:31051")
    assert advertised_address(cfg, 4000) == ("203.0.113.7", 31051)
    cfg = WorkerConfig(coordinator="http://127.0.0.1:8765", advertise="node-3")
    assert advertised_address(cfg, 4000) == ("node-3", 4000)


def test_parse_job_answer_rejects_answers_without_spec_or_hash() -> None:
    job = JobSpec(steps=7, warmup_steps=0)
    assert parse_job_answer({"job": job.model_dump(mode="json"), "job_hash": job.hash}) == (job, job.hash)
    with pytest.raises(ValueError, match="no job spec"):
        parse_job_answer({"job_hash": job.hash})
    with pytest.raises(ValueError, match="no job hash"):
        parse_job_answer({"job": job.model_dump(mode="json")})
    with pytest.raises(ValueError):
        parse_job_answer({"job": {"steps": -1}, "job_hash": "x"})


def test_the_job_file_of_a_local_run_round_trips_to_the_same_hash(tmp_path: Path) -> None:
    job = JobSpec(
        job_id="demo",
        model="resnet18",
        dataset="synthetic:3x32x32:64",
        steps=9,
        warmup_steps=0,
        lr=0.05,
        nesterov=True,
        betas=(0.8, 0.95),
        min_workers=3,
    )
    write_job_toml(tmp_path / "job.toml", job.model_dump(mode="json"))
    with open(tmp_path / "job.toml", "rb") as f:
        again = JobSpec(**tomllib.load(f)["job"])
    assert again.hash == job.hash


def write_records(path: Path, records: list[dict[str, object]]) -> None:
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def step(worker: str, s: int, t: float, world: int, epoch: int, **extra: object) -> dict[str, object]:
    return {
        "kind": "step",
        "worker_id": worker,
        "step": s,
        "time": t,
        "world_size": world,
        "epoch": epoch,
        "loss": 1.0 / (s + 1),
        "step_time_s": 0.5,
        "compute_s": 0.3,
        "comm_s": 0.2,
        "wait_s": 0.1,
        "bytes_sent": 100 * (s + 1),
        "bytes_received": 90 * (s + 1),
        **extra,
    }


def test_summary_merges_workers_and_keeps_the_latest_record_of_a_redone_step(tmp_path: Path) -> None:
    # Three workers train steps 0..5; worker c dies at 5; a and b re-form from the checkpoint of step 4.
    for w in "abc":
        write_records(tmp_path / f"{w}.jsonl", [step(w, s, 10.0 + s, 3, 1) for s in range(6)])
    for w in "ab":
        write_records(tmp_path / f"{w}.jsonl", [step(w, s, 20.0 + s, 2, 3) for s in range(4, 8)])
    write_records(
        tmp_path / "a.jsonl",
        [
            {
                "kind": "eval",
                "worker_id": "a",
                "step": 8,
                "time": 30.0,
                "test_loss": 0.2,
                "test_accuracy": 0.96,
            },
            {
                "kind": "result",
                "worker_id": "a",
                "rank": 0,
                "time": 30.0,
                "steps_done": 8,
                "final_loss": 0.125,
                "test_accuracy": 0.96,
            },
        ],
    )
    with open(tmp_path / "b.jsonl", "a") as f:
        f.write('{"kind": "step", "trunc')  # a line being written right now
    tel = read_telemetry(tmp_path)
    assert world_size_runs(tel.steps) == [[0, 3], [4, 2]]
    assert tel.bytes_on_wire() == (800 + 800 + 600, 720 + 720 + 540)
    # records without lanes (an older worker) count as gRPC; a record with them splits its bytes
    assert tel.bytes_by_lane() == {"grpc": 800 + 800 + 600, "local": 0}
    tel.last_by_worker["a"] = {**tel.last_by_worker["a"], "bytes_by_lane": {"grpc": 300, "local": 500}}
    assert tel.bytes_by_lane() == {"grpc": 300 + 800 + 600, "local": 500}
    summary = build_summary(
        job=JobSpec(steps=8, warmup_steps=0, global_batch=16).model_dump(mode="json"),
        job_hash="h",
        tel=tel,
        events=[
            {"kind": "joined", "worker_id": "c"},
            {"kind": "died", "worker_id": "c", "epoch": 2, "reason": "silent", "time": 1.0},
        ],
        wall_time_s=40.0,
        worker_exit_codes={"a": 0, "b": 0, "c": -9},
        model_path=None,
        plot_path=None,
    )
    assert summary["completed"] and summary["steps_done"] == 8
    assert summary["test_accuracy"] == 0.96 and summary["final_loss"] == 0.125
    assert summary["epochs_trained"] == [1, 3]
    assert [f["kind"] for f in summary["failures"]] == ["died"]
    assert summary["training_time_s"] == 17.0  # first step record at 10, last at 27
    assert summary["step_samples_per_s"] == 32.0  # 16 samples per 0.5 s step
    assert summary["step_time_split_s"] == {"compute": 0.3, "comm": 0.2, "wait": 0.1, "data_wait": 0.0}
    assert summary["evals"] == [{"step": 8, "test_loss": 0.2, "test_accuracy": 0.96}]
    # c was killed at t=15.5 (after its step 5); the re-formed epoch 3 stepped first at t=24 (step 4 again)
    assert recovery_after(tel, 15.5) == 8.5
    assert recovery_after(tel, 100.0) is None


def test_summary_records_the_world_size_and_skip_of_every_step_as_committed(tmp_path: Path) -> None:
    # Epoch 1: three workers train steps 0..4; step 3 is skipped everywhere, and so is step 4, which a
    # rollback re-runs. Epoch 2: two workers resume from the checkpoint of step 4 and train steps 4..5.
    for w in "abc":
        write_records(
            tmp_path / f"{w}.jsonl",
            [step(w, s, 10.0 + s, 3, 1, **({"skipped": True} if s in (3, 4) else {})) for s in range(5)],
        )
    for w in "ab":
        write_records(
            tmp_path / f"{w}.jsonl", [step(w, s, 20.0 + s, 2, 2, skipped=False) for s in range(4, 6)]
        )
    tel = read_telemetry(tmp_path)
    summary = build_summary(
        job=JobSpec(steps=6, warmup_steps=0).model_dump(mode="json"),
        job_hash="h",
        tel=tel,
        events=[],
        wall_time_s=1.0,
        worker_exit_codes={},
        model_path=None,
        plot_path=None,
    )
    assert summary["world_sizes"] == [3, 3, 3, 3, 2, 2]
    assert summary["skipped_steps"] == [3]  # records without the field were not skipped
    assert summary["world_size_per_step"] == [[0, 3], [4, 2]]
    assert world_sizes({0: {"world_size": 2}, 2: {"world_size": 1}}) == [2, None, 1]  # a step nobody recorded
    assert skipped_steps({}) == [] and world_sizes({}) == []


def test_summary_of_a_run_that_never_stepped_is_not_completed(tmp_path: Path) -> None:
    summary = build_summary(
        job={"steps": 5, "global_batch": 8},
        job_hash="h",
        tel=read_telemetry(tmp_path),
        events=[],
        wall_time_s=1.0,
        worker_exit_codes={"a": 1},
        model_path=None,
        plot_path=None,
    )
    assert not summary["completed"] and summary["steps_done"] == 0 and summary["world_size_per_step"] == []
    assert summary["world_sizes"] == [] and summary["skipped_steps"] == []


STATUS = {
    "state": "training",
    "epoch": 4,
    "world_size": 2,
    "step": 120,
    "uptime_s": 33.2,
    "job": {"job_id": "demo", "model": "resnet8", "dataset": "digits", "steps": 300},
    "workers": [
        {
            "worker_id": "w1",
            "rank": 1,
            "state": "alive",
            "worker_state": "training",
            "last_heartbeat_age_s": 0.2,
            "step": 120,
            "loss": 0.05,
            "samples_per_s": 800.0,
            "bytes_sent": 2_500_000,
            "host": "10.0.0.2",
            "port": 5001,
            "device": "cpu",
        },
        {
            "worker_id": "w0",
            "rank": 0,
            "state": "alive",
            "worker_state": "training",
            "last_heartbeat_age_s": 0.1,
            "step": 120,
            "loss": 0.05,
            "samples_per_s": 810.0,
            "bytes_sent": 2_400_000,
            "bytes_by_lane": {"grpc": 800_000, "local": 1_600_000},
            "host_id": "m1",
            "host": "10.0.0.1",
            "port": 5000,
            "device": "cpu",
        },
        {
            "worker_id": "w2",
            "rank": None,
            "state": "dead",
            "worker_state": "training",
            "last_heartbeat_age_s": 9.0,
            "step": 80,
            "loss": None,
            "samples_per_s": None,
            "bytes_sent": 0,
            "host": "10.0.0.3",
            "port": 5002,
            "device": "cpu",
        },
    ],
}


def test_status_table_lists_workers_by_rank_with_the_dead_last() -> None:
    lines = render(STATUS).splitlines()
    assert lines[0].startswith(
        "cluster training  epoch 4  world size 2  step 120/300  job demo (resnet8 on digits)"
    )
    assert lines[2].split()[:3] == ["WORKER", "RANK", "STATE"]
    assert [line.split()[0] for line in lines[3:]] == ["w0", "w1", "w2"]
    assert "2.4MB" in lines[3] and "10.0.0.1:5000" in lines[3]
    assert "1.6MB  m1" in lines[3]  # bytes on the local lane, then the host id
    assert lines[4].split()[10:12] == ["-", "-"]  # a worker that reported no lanes and no host id
    assert lines[5].split()[1:3] == ["-", "dead"]


def test_progress_prints_plain_lines_when_not_a_tty() -> None:
    stream = io.StringIO()
    progress = Progress(300, stream=stream, plain_every_s=0.0)
    progress.show(STATUS, 0.93)
    line = stream.getvalue()
    assert line.endswith("\n") and "\r" not in line
    assert "step 120/300" in line and "acc 93.0%" in line and "1610 samples/s" in line and "2 workers" in line
