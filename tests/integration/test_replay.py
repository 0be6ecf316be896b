"""`zerowire run --replay`: two real workers on two simulated hosts (the flat gRPC path) train a few steps of
digits with clipping; one process replays the schedule their summary.json records and gets every parameter
bit for bit, and the same final loss."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ProcessReaper
from tests.integration.cluster_support import env, processes_mentioning, start_run, zw
from worker.models import build_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def test_replay_of_a_two_worker_run_is_bit_identical(reaper: ProcessReaper, tmp_path: Path) -> None:
    run, _url, log_path = start_run(
        reaper, tmp_path, "--workers", "2", "--hosts", "2", "--steps", "6", "--warmup-steps", "2",
        "--grad-clip", "1.0",
    )  # fmt: skip
    assert run.wait(90) == 0, log_path.read_text()[-4000:]
    run_dir = tmp_path / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["completed"] and summary["world_sizes"] == [2] * 6 and summary["skipped_steps"] == []
    assert summary["workers"] == 2 and summary["hosts"] == 2 and summary["threads"] >= 1

    replay_log = tmp_path / "replay.log"
    with open(replay_log, "wb") as log:
        replay = reaper.spawn(
            zw(
                "run",
                "--replay",
                str(run_dir / "summary.json"),
                "--workers",
                "1",
                "--output",
                str(tmp_path / "rp"),
            ),
            env=env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    assert replay.wait(60) == 0, replay_log.read_text()[-4000:]
    assert "replayed: 6 steps" in replay_log.read_text()
    report = json.loads((tmp_path / "rp" / "replay.json").read_text())
    assert report["bit_identical_expected"] and report["notes"] == []
    assert report["threads"] == summary["threads"] and len(report["losses"]) == 6
    assert report["final_loss"] == summary["final_loss"]  # the same float, not merely close

    ran = load_file(str(run_dir / "model.safetensors"))
    replayed = load_file(str(tmp_path / "rp" / "model.safetensors"))
    assert sorted(ran) == sorted(replayed)
    names = [n for n, _ in build_model(summary["job"]["model"], 10, 1).named_parameters()]
    assert names and set(names) <= set(ran)
    differ = [n for n in names if not torch.equal(ran[n], replayed[n])]
    assert differ == [], f"{len(differ)} of {len(names)} parameters differ: {differ[:5]}"
    assert processes_mentioning(str(tmp_path)) == []
