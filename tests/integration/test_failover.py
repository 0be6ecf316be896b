"""Failover without rollback, on real processes: `zerowire run` fault drills on 3 workers.

One run (module fixture) SIGKILLs a worker at a step that is no checkpoint step (checkpointing off) and
starts it again a second later: the coordinator declares it dead within 2.5 s (heartbeat timeout 2 s + a
reaper tick), the survivors commit the next step within 5 s with the dead rank's shards taken from its
buddy, the restarted worker joins (mode join; the others hand over) and commits within 15 s of its
restart, no step is committed twice, and one process replaying the recorded world-size schedule
(3 -> 2 -> 3 workers, one host) gets every parameter bit for bit. Another run kills a worker together with
its buddy: a shard and its replica are gone, so recovery falls back to the newest checkpoint and says so.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ProcessReaper
from tests.integration.cluster_support import env, processes_mentioning, read_jsonl, start_run, zw
from worker.models import build_model

pytestmark = [pytest.mark.slow]

STEPS = 200  # the restarted worker joins about 60-80 steps after the kill
KILL_AT = 10


@dataclass
class Drilled:
    tmp: Path
    summary: dict[str, Any]
    log: str
    replay_dir: Path
    replay_log: str
    leftovers: list[tuple[int, str]]


@pytest.fixture(scope="module")
def kill_and_restart(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Drilled]:
    tmp = tmp_path_factory.mktemp("failover")
    reaper = ProcessReaper()
    try:
        run, _url, log_path = start_run(
            reaper, tmp, "--workers", "3", "--hosts", "1", "--steps", str(STEPS), "--checkpoint-every", "0",
            "--eval-every", "0", "--kill-worker-at-step", str(KILL_AT), "--restart-killed-after", "1",
        )  # fmt: skip
        assert run.wait(120) == 0, log_path.read_text()[-4000:]
        replay_log = tmp / "replay.log"
        with open(replay_log, "wb") as log:
            summary = str(tmp / "run" / "summary.json")
            replay = reaper.spawn(
                zw("run", "--replay", summary, "--workers", "1", "--output", str(tmp / "rp")),
                env=env(),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        assert replay.wait(60) == 0, replay_log.read_text()[-4000:]
        yield Drilled(
            tmp,
            json.loads((tmp / "run" / "summary.json").read_text()),
            log_path.read_text(),
            tmp / "rp",
            replay_log.read_text(),
            processes_mentioning(str(tmp)),
        )
    finally:
        reaper.kill_all()


@pytest.mark.timeout(240)  # the fixture's two runs (about 45 s) count here
def test_a_sigkilled_worker_is_dead_within_2_5s_and_the_survivors_commit_within_5s(
    kill_and_restart: Drilled,
) -> None:
    s = kill_and_restart.summary
    assert s["completed"] and s["steps_done"] == STEPS and s["job"]["checkpoint_every"] == 0
    drill = s["fault_drill"]
    assert drill["at_step"] >= KILL_AT and [v["worker"] for v in drill["killed"]] == ["worker-2"], drill
    assert "fault drill: SIGKILLed worker-2" in kill_and_restart.log
    died = [f for f in s["failures"] if f["kind"] == "died" and f["worker_id"] == "worker-2"]
    assert len(died) == 1 and 0 < died[0]["time"] - drill["time"] <= 2.5, (died, drill["time"])
    assert drill["detect_s"] == pytest.approx(died[0]["time"] - drill["time"], abs=1e-3)
    assert drill["next_commit_s"] is not None and drill["next_commit_s"] <= 5.0, drill
    assert s["steps_redone"] == 0 and drill["steps_lost"] == 0
    # the schedule: 3 workers, then 2 from the first uncommitted step, then 3 again after the join
    sizes = s["world_sizes"]
    assert len(sizes) == STEPS and None not in sizes
    runs = s["world_size_per_step"]
    assert [w for _, w in runs] == [3, 2, 3], runs
    assert runs[1][0] >= KILL_AT
    handover = next(r for r in s["recoveries"] if r["world_size"] == 2)
    assert handover["mode"] == "handover" and handover["resumed_at"] == runs[1][0]
    assert handover["steps_lost"] == 0
    assert kill_and_restart.leftovers == []


@pytest.mark.timeout(60)
def test_the_drilled_run_replays_bit_for_bit(kill_and_restart: Drilled) -> None:
    s = kill_and_restart.summary
    assert f"replayed: {STEPS} steps" in kill_and_restart.replay_log
    report = json.loads((kill_and_restart.replay_dir / "replay.json").read_text())
    assert report["bit_identical_expected"] and report["notes"] == []
    ran = load_file(str(kill_and_restart.tmp / "run" / "model.safetensors"))
    replayed = load_file(str(kill_and_restart.replay_dir / "model.safetensors"))
    names = [n for n, _ in build_model(s["job"]["model"], 10, 1).named_parameters()]
    assert names and set(names) <= set(ran) and set(names) <= set(replayed)
    differ = [n for n in names if not torch.equal(ran[n], replayed[n])]
    assert differ == [], f"{len(differ)} of {len(names)} parameters differ: {differ[:5]}"
    assert report["final_loss"] == s["final_loss"]


@pytest.mark.timeout(60)
def test_a_restarted_worker_joins_and_contributes_within_15s(kill_and_restart: Drilled) -> None:
    s = kill_and_restart.summary
    drill = s["fault_drill"]
    restarted = drill["restarted"]["worker-2"]
    assert "fault drill: restarted worker-2" in kill_and_restart.log
    join = drill["joins"]["worker-2"]
    assert join["modes"] == {"worker-0": "handover", "worker-1": "handover", "worker-2": "join"}, join
    assert drill["join_s"] is not None and drill["join_s"] <= 15.0, drill
    records = read_jsonl(kill_and_restart.tmp / "run" / "telemetry" / "worker-2.jsonl")
    after = [r for r in records if r["time"] > restarted]
    mine = [r for r in after if r["kind"] == "recovery"]
    assert [r["mode"] for r in mine] == ["join"] and mine[0]["epoch"] == join["epoch"]
    steps = [r for r in after if r["kind"] == "step"]
    assert steps and steps[0]["epoch"] == join["epoch"] and steps[0]["time"] - restarted <= 15.0
    assert steps[0]["step"] == mine[0]["resumed_at"]  # it contributes from the step the join resumed at
    joined = next(r for r in s["recoveries"] if r["epoch"] == join["epoch"])
    assert joined["mode"] == "join" and joined["modes"] == ["join", "handover"] and joined["world_size"] == 3
    assert s["steps_redone"] == 0
    assert s["worker_exit_codes"] == {"worker-0": 0, "worker-1": 0, "worker-2": 0}


@pytest.mark.timeout(120)
def test_a_worker_killed_with_its_buddy_recovers_from_the_checkpoint(
    reaper: ProcessReaper, tmp_path: Path
) -> None:
    every = 10
    run, _url, log_path = start_run(
        reaper, tmp_path, "--workers", "3", "--hosts", "1", "--steps", "40", "--checkpoint-every", str(every),
        "--eval-every", "0", "--kill-worker-at-step", "15", "--kill-workers", "2",
    )  # fmt: skip
    assert run.wait(100) == 0, log_path.read_text()[-4000:]
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["completed"] and s["steps_done"] == 40
    drill = s["fault_drill"]
    killed = drill["killed"]
    assert len(killed) == 2 and killed[0]["worker"] == "worker-2"
    assert killed[1]["rank"] == (killed[0]["rank"] + 1) % 3, "the second victim is the first's buddy"
    assert {f["worker_id"] for f in s["failures"] if f["kind"] == "died"} == {v["worker"] for v in killed}
    after = [r for r in s["recoveries"] if r["time"] > drill["time"]]
    assert [r["mode"] for r in after] == ["checkpoint"], s["recoveries"]
    assert after[0]["world_size"] == 1 and after[0]["resumed_at"] % every == 0
    assert 0 <= drill["steps_lost"] == after[0]["steps_lost"] <= every
    # the steps after the checkpoint ran again: the lost ones, and at most one more a victim had committed
    assert drill["steps_lost"] <= s["steps_redone"] <= drill["steps_lost"] + 1
    assert s["world_size_per_step"][-1] == [after[0]["resumed_at"], 1]
    assert processes_mentioning(str(tmp_path)) == []
