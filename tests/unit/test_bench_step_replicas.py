"""`zerowire bench step --replicas both --recorder both`: zerowire with a buddy replica, and zerowire without
its flight recorder, run beside zerowire in the same interleaved rounds (as the zerowire workers, with
--replicas 1 or --recorder off), and the report gives their ratios."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from zerowire.bench import step, step_rounds
from zerowire.bench.step_rounds import Run


def fake_contenders(
    monkeypatch: pytest.MonkeyPatch, times: dict[str, float]
) -> list[tuple[str, str, list[str]]]:
    """Runs of every contender without processes: each run's label, the workers it starts and their command
    line (recorded in the returned list), and a report of ``times[label]`` per step."""
    started: list[tuple[str, str, list[str]]] = []

    def fake_run(
        kind: str, rnd: int, steps: int, root: Path, a: argparse.Namespace, label: str | None = None
    ) -> Run:
        name = label or kind
        started.append((name, kind, step_rounds._worker_cmd(kind, 0, 2, "1,2", root, steps, a)))
        report: dict[str, Any] = {"step_times_s": [times[name]] * steps, "wait_times_s": [0.0] * steps}
        report.update(start_s=0.1, exit_s=0.9, torch_threads=1, env={})
        return Run(name, rnd, steps, 0.0, 1.0, [report])

    monkeypatch.setattr(step_rounds, "run_contender", fake_run)
    return started


def flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_both_runs_the_replicated_contender_as_zerowire_workers_with_a_replica(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    times = {"zerowire": 0.10, "zerowire_replicated": 0.103, "zerowire_unrecorded": 0.099, "ddp": 0.05,
             "floor": 0.02}  # fmt: skip
    started = fake_contenders(monkeypatch, times)
    args = argparse.Namespace(
        steps=4, rounds=2, replicas=0, model="resnet8", device="cpu", workers=2, batch=2, compression="none"
    )
    args.warmup, args.colocated, args.recorder = 0, False, "both"
    kinds = ["zerowire", step.REPLICATED, step.UNRECORDED, "ddp", "floor"]
    runs = step_rounds.measure(kinds, args, tmp_path)
    # what the worker processes of each run are told
    assert {
        (name, kind, flag(cmd, "--replicas"), flag(cmd, "--recorder")) for name, kind, cmd in started
    } == {
        ("zerowire", "zerowire", "0", "on"),
        ("zerowire_replicated", "zerowire", "1", "on"),
        ("zerowire_unrecorded", "zerowire", "0", "off"),
        ("ddp", "ddp", "0", "on"),
        ("floor", "floor", "0", "on"),
    }
    assert [r.contender for r in runs[:5]] == kinds  # the same rounds, the order rotating
    assert [r.contender for r in runs[5:]] == kinds[1:] + kinds[:1]
    report = step._summary(kinds, runs, args)
    assert report["replicas"] == "both"
    assert report["ratios"]["zerowire_replicated/zerowire"] == pytest.approx(1.03)
    assert report["ratios"]["zerowire/zerowire_unrecorded"] == pytest.approx(0.10 / 0.099)
    assert report["ratios"]["zerowire/ddp"] == pytest.approx(2.0)


def test_nccl_reduce_both_runs_the_local_lane_with_natives_reduce_scatter_beside_the_ordered_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`--colocated --nccl-reduce both`: zerowire_local_native is the zerowire_local workers with their
    local lane's reduce-scatter set to native (the flag reaches the worker processes), in the same rounds."""
    times = {"zerowire_local": 0.10, "zerowire_local_native": 0.08, "zerowire_grpc": 0.2, "floor": 0.02}
    started = fake_contenders(monkeypatch, times)
    args = argparse.Namespace(
        steps=2, rounds=1, replicas=0, model="resnet8", device="cuda", workers=2, batch=2, compression="none"
    )
    args.warmup, args.colocated, args.nccl_reduce = 0, True, "both"
    kinds = ["zerowire_local", step.NATIVE, "zerowire_grpc", "floor"]
    runs = step_rounds.measure(kinds, args, tmp_path)
    assert {(name, kind, flag(cmd, "--nccl-reduce")) for name, kind, cmd in started} == {
        ("zerowire_local", "zerowire_local", "ordered"),
        ("zerowire_local_native", "zerowire_local", "native"),
        ("zerowire_grpc", "zerowire_grpc", "ordered"),
        ("floor", "floor", "ordered"),
    }
    report = step._summary(kinds, runs, args)
    assert report["nccl_reduce"] == "both"
    assert report["ratios"]["zerowire_local_native/zerowire_local"] == pytest.approx(0.8)


def test_nccl_reduce_is_the_local_lanes_option() -> None:
    from zerowire.commands import CommandError

    args = argparse.Namespace(
        workers=2, device="cpu", memory=False, vs="ddp", steps=2, rounds=1, batch=2, warmup=0,
        replicas="0", colocated=False, nccl_reduce="both",
    )  # fmt: skip
    with pytest.raises(CommandError, match="needs --colocated"):
        step.handle(args)
