"""Fault drills and `zerowire bench faults` without processes: the victims a kill takes, the measures of a
kill from telemetry and events, the summary's recoveries and redone steps, the goodput formula, and bad
input refused before anything starts."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from zerowire.bench.faults import _goal, report
from zerowire.bench.faults_window import Window, committed, membership_time, steady_rates
from zerowire.cli import build_parser, main
from zerowire.drill import DrillError, Kill, choose_victims, measure
from zerowire.localcluster import LocalCluster
from zerowire.summary import read_telemetry, recoveries, steps_redone


def status(hosts: list[str], epoch: int = 4, **extra: Any) -> dict[str, Any]:
    workers = [
        {"worker_id": f"worker-{i}", "rank": r, "state": "alive", "host_id": h}
        for r, (i, h) in enumerate(zip(extra.pop("ids", range(len(hosts))), hosts, strict=True))
    ]
    return {"state": "training", "epoch": epoch, "step": 30, "workers": workers, **extra}


def write(path: Path, records: list[dict[str, Any]]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def step(w: str, s: int, t: float, world: int, epoch: int) -> dict[str, Any]:
    return {"kind": "step", "worker_id": w, "step": s, "time": t, "world_size": world, "epoch": epoch}


def recovery(w: str, mode: str, epoch: int, world: int, at: int, t: float, secs: float, lost: int = 0) -> Any:
    return {
        "kind": "recovery", "worker_id": w, "mode": mode, "epoch": epoch, "rank": 0, "world_size": world,
        "resumed_at": at, "steps_lost": lost, "seconds": secs, "time": t,
    }  # fmt: skip


def test_victims_are_the_first_then_each_ones_buddy() -> None:
    one_host = status(["localhost"] * 3, ids=[2, 0, 1])  # worker-2 has rank 0
    assert [v["worker"] for v in choose_victims(one_host, 1, "worker-2")] == ["worker-2"]
    # one host: the buddy of rank r is rank r + 1
    assert [(v["worker"], v["rank"]) for v in choose_victims(one_host, 2, "worker-1")] == [
        ("worker-1", 2),
        ("worker-2", 0),
    ]
    # two hosts of two: the buddy is the same local index on the next host
    hier = status(["h0", "h0", "h1", "h1"])
    assert [v["rank"] for v in choose_victims(hier, 2, "worker-1")] == [1, 3]
    # the buddies of rank 0 close a cycle of two (0 -> 2 -> 0): a third victim is the next rank not taken
    assert [v["rank"] for v in choose_victims(hier, 3, "worker-0")] == [0, 2, 1]


@pytest.mark.parametrize(
    ("st", "count", "first", "message"),
    [
        (status(["a", "b", "c"]), 3, "worker-2", "cannot kill 3 of 3"),
        (status(["a", "b", "c"]), 1, "worker-7", "not a live member"),
        ({"workers": [{"worker_id": "worker-0", "rank": 1, "state": "alive"}]}, 1, "worker-0", "re-forming"),
    ],
)
def test_impossible_kills_are_refused(st: dict[str, Any], count: int, first: str, message: str) -> None:
    with pytest.raises(DrillError, match=message):
        choose_victims(st, count, first)


def drilled_telemetry(tmp: Path) -> Any:
    """Epoch 3: workers 0-2 commit steps 0..9 at t = 10..19; worker-2 is killed at t = 19.5 and declared
    dead at 21.5; epoch 4 (two workers) forms 21.6..21.8 and commits 10..14 from t = 22; worker-2, restarted
    at 23, registers at 24.5; epoch 5 forms 25..27 (mode join on it) and all three commit 15..19 from 28."""
    for w in ("worker-0", "worker-1", "worker-2"):
        write(tmp / f"{w}.jsonl", [step(w, s, 10.0 + s, 3, 3) for s in range(10)])
    for w in ("worker-0", "worker-1"):
        write(tmp / f"{w}.jsonl", [recovery(w, "handover", 4, 2, 10, 21.8, 0.2)])
        write(tmp / f"{w}.jsonl", [step(w, s, 12.0 + s, 2, 4) for s in range(10, 15)])
        write(tmp / f"{w}.jsonl", [recovery(w, "handover", 5, 3, 15, 27.0, 2.0)])
    write(tmp / "worker-2.jsonl", [recovery("worker-2", "join", 5, 3, 15, 26.9, 0.1)])
    for w in ("worker-0", "worker-1", "worker-2"):
        write(tmp / f"{w}.jsonl", [step(w, s, 13.0 + s, 3, 5) for s in range(15, 20)])
    return read_telemetry(tmp)


EVENTS = [
    {"time": 5.0, "kind": "epoch", "worker_id": None, "epoch": 3, "reason": "epoch 3: world size 3 (x)"},
    {"time": 21.5, "kind": "died", "worker_id": "worker-2", "epoch": 4, "reason": "silent"},
    {"time": 21.5, "kind": "epoch", "worker_id": None, "epoch": 4, "reason": "epoch 4: world size 2 (x)"},
    {"time": 24.5, "kind": "rejoined", "worker_id": "worker-2", "epoch": 5, "reason": "again"},
    {"time": 24.5, "kind": "epoch", "worker_id": None, "epoch": 5, "reason": "epoch 5: world size 3 (x)"},
]


def test_a_kill_is_measured_from_the_events_and_the_commits(tmp_path: Path) -> None:
    tel = drilled_telemetry(tmp_path)
    k = Kill(
        19.5, 9, 3, [{"worker": "worker-2", "rank": 2, "host_id": "localhost"}], restarted={"worker-2": 23.0}
    )
    m = measure(k, tel, EVENTS, recoveries(tel), float("inf"))
    assert m["detect_s"] == 2.0 and m["next_commit_s"] == 2.5 and m["steps_lost"] == 0
    assert m["recoveries"] == ["handover", "join"]
    assert m["breakdown"] == {"detect_s": 2.0, "reform_wait_s": 0.1, "formation_s": 0.2, "first_step_s": 0.2}
    join = m["joins"]["worker-2"]
    assert join["register_s"] == 1.5 and join["join_s"] == 5.0 and join["epoch"] == 5
    assert join["modes"] == {"worker-0": "handover", "worker-1": "handover", "worker-2": "join"}
    assert m["join_s"] == 5.0 and m["join_pause_s"] == 2.0  # step 14 at 26, step 15 at 28
    # nothing of it after the next kill
    cut = measure(k, tel, EVENTS, recoveries(tel), 21.0)
    assert cut["next_commit_s"] is None and "breakdown" not in cut and cut["join_s"] is None


def test_recoveries_are_one_per_epoch_and_no_step_was_redone(tmp_path: Path) -> None:
    tel = drilled_telemetry(tmp_path)
    forms = recoveries(tel)
    assert [(f["epoch"], f["mode"], f["modes"], f["world_size"], f["resumed_at"]) for f in forms] == [
        (4, "handover", ["handover"], 2, 10),
        (5, "join", ["join", "handover"], 3, 15),
    ]
    assert forms[1]["seconds"] == 2.0 and forms[1]["time"] == 27.0 and forms[1]["ranks_recorded"] == 3
    assert steps_redone(tel) == 0
    # a checkpoint fallback in epoch 6 runs steps 15..19 again
    write(tmp_path / "worker-0.jsonl", [recovery("worker-0", "checkpoint", 6, 1, 15, 40.0, 0.1, lost=5)])
    write(tmp_path / "worker-0.jsonl", [step("worker-0", s, 41.0 + s, 1, 6) for s in range(15, 21)])
    tel = read_telemetry(tmp_path)
    assert steps_redone(tel) == 5 and recoveries(tel)[-1]["mode"] == "checkpoint"


def test_window_time_goes_to_world_sizes_by_membership_and_by_commits(tmp_path: Path) -> None:
    tel = drilled_telemetry(tmp_path)
    # steps 1..17 commit in [11, 30]: 9 at size 3, 5 at size 2, 3 at size 3 again
    samples, by_commits = committed(tel, 11.0, 30.0, 8)
    assert samples == 17 * 8
    # 11..19 (last step of epoch 3) at 3, 19..26 (epoch 4's steps) at 2, 26..30 at 3
    assert by_commits == pytest.approx({3: 8.0 + 4.0, 2: 7.0})
    # inside each epoch: epoch 3's steps 1..9 (8 gaps, 8 s), epoch 4's 10..14 (4 s), epoch 5's 15..17 (2 s)
    assert steady_rates(tel, 11.0, 30.0, 8) == {3: (8 * 8 + 2 * 8, 10.0), 2: (4 * 8, 4.0)}
    sizes = membership_time(EVENTS, tel, 11.0, 30.0)
    assert sizes == pytest.approx({3: 10.5 + 5.5, 2: 3.0})  # epoch 4 from 21.5 to 24.5
    assert membership_time(EVENTS, tel, 22.0, 23.0) == pytest.approx({2: 1.0})


def window(kind: str, workers: int, samples: int, sizes: dict[int, float], **kw: Any) -> Window:
    return Window(kind, 0, workers, 0.0, sum(sizes.values()), samples, sizes, kw.pop("by", sizes), **kw)


def test_goodput_weighs_the_fault_free_rates_by_the_time_at_each_size() -> None:
    args = argparse.Namespace(
        workers=3, hosts=1, period=20.0, duration=40.0, ref_duration=10.0, rounds=1, restart_after=3.0,
        warmup=1.0, model="resnet8", dataset="digits", global_batch=64, threads=1, heartbeat_timeout=None,
    )  # fmt: skip
    kill = {"detect_s": 2.0, "next_commit_s": 2.5, "steps_lost": 0, "join_s": 6.0, "join_pause_s": 1.0}
    kills = [kill, {**kill, "detect_s": 1.8}]
    runs = [
        window("faults", 3, 9000, {3: 30.0, 2: 10.0}, by={3: 28.0, 2: 12.0}, kills=kills),
        window("fault_free", 3, 2000, {3: 10.0}),  # 200 samples/s
        window("fault_free", 2, 4000, {2: 10.0}),  # 400 samples/s
    ]
    out = report(args, runs)
    assert out["goodput"] == round(9000 / (30 * 200 + 10 * 400), 4)
    assert out["goodput_by_commits"] == round(9000 / (28 * 200 + 12 * 400), 4)
    assert out["goodput_per_round"] == [out["goodput"]]
    assert out["goodput_in_run"] is None  # no pace measured inside the faulty run's epochs
    runs[0].steady = {3: (5700, 20.0), 2: (3600, 8.0)}  # 285 and 450 samples/s
    assert report(args, runs)["goodput_in_run"] == round(9000 / (30 * 285 + 10 * 450), 4)
    assert out["detect_s"] == 1.9 and out["detect_s_max"] == 2.0 and out["next_commit_s"] == 2.5
    assert out["steps_redone"] == 0 and out["faults"] == 2
    assert out["goals"]["goodput"] == {"value": out["goodput"], "goal": ">= 0.93", "met": False}
    assert out["goals"]["detect_s"]["met"] and out["goals"]["steps_redone"]["met"]
    assert _goal("steps_redone", 1)["met"] is False and _goal("detect_s", None)["met"] is False


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--kill-workers", "2"], "need --kill-worker-at-step"),
        (["--restart-killed-after", "1"], "need --kill-worker-at-step"),
        (["--kill-worker-at-step", "5", "--kill-workers", "3"], "between 1 and --workers - 1"),
        (["--kill-worker-at-step", "5", "--restart-killed-after", "-1"], "--restart-killed-after must be"),
    ],
)
def test_bad_drill_flags_are_refused_and_write_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    out = tmp_path / "run"
    assert main(["run", "--workers", "3", "--output", str(out), *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workers", "1"], "--workers must be >= 2"),
        (["--period", "60", "--duration", "20"], "must exceed half a --period"),
        (["--restart-after", "60"], "shorter than --period"),
        (["--hosts", "4"], "--hosts must be between"),
    ],
)
def test_bad_bench_flags_are_refused(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert main(["bench", "faults", *args]) == 2
    assert message in capsys.readouterr().err


def test_the_bench_is_registered_and_a_restart_names_a_known_worker(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["bench", "faults", "--help"])
    assert exc.value.code == 0
    cluster = LocalCluster(output=tmp_path, workers=2, job_file=tmp_path / "job.toml")
    for name in ("worker-2", "worker-x", "coordinator"):
        with pytest.raises(ValueError, match="no worker named"):
            cluster.restart_worker(name)
    assert cluster.children == []
