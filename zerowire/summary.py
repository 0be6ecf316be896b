"""Turn the workers' telemetry files (JSON lines) and the coordinator's events into summary.json."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator.history import mode_rank

log = logging.getLogger(__name__)

FAILURE_EVENTS = ("died", "rejoined", "evicted", "failed")


@dataclass
class RunTelemetry:
    """Every record of every worker, merged. A step run twice (after a re-form) keeps its latest record."""

    steps: dict[int, dict[str, Any]] = field(default_factory=dict)
    evals: dict[int, dict[str, Any]] = field(default_factory=dict)
    results: list[dict[str, Any]] = field(default_factory=list)
    last_by_worker: dict[str, dict[str, Any]] = field(default_factory=dict)
    # every (step, epoch) committed, with the earliest time a rank recorded it (a step in two epochs: redone)
    commits: dict[tuple[int, int], float] = field(default_factory=dict)
    recovery_records: list[dict[str, Any]] = field(default_factory=list)  # one per rank and formation
    by_worker: dict[str, list[tuple[float, int, int]]] = field(default_factory=dict)  # (time, step, epoch)
    epoch_world: dict[int, int] = field(default_factory=dict)  # the world size each epoch trained at

    @property
    def first_time(self) -> float | None:
        return min((r["time"] for r in self.steps.values()), default=None)

    @property
    def last_time(self) -> float | None:
        return max((r["time"] for r in self.steps.values()), default=None)

    def bytes_on_wire(self) -> tuple[int, int]:
        sent = sum(int(r.get("bytes_sent", 0)) for r in self.last_by_worker.values())
        received = sum(int(r.get("bytes_received", 0)) for r in self.last_by_worker.values())
        return sent, received

    def bytes_by_lane(self) -> dict[str, int]:
        """Bytes sent over each data-plane lane, summed over the workers' latest step records."""
        totals = {"grpc": 0, "local": 0}
        for r in self.last_by_worker.values():
            for lane, n in (r.get("bytes_by_lane") or {"grpc": r.get("bytes_sent", 0)}).items():
                totals[lane] = totals.get(lane, 0) + int(n)
        return totals

    def latest_eval(self) -> dict[str, Any] | None:
        return self.evals[max(self.evals)] if self.evals else None


def read_telemetry(folder: Path) -> RunTelemetry:
    tel = RunTelemetry()
    for path in sorted(folder.glob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line being written right now
                kind = rec.get("kind")
                if kind == "step":
                    step = int(rec["step"])
                    if step not in tel.steps or rec["time"] >= tel.steps[step]["time"]:
                        tel.steps[step] = rec
                    tel.last_by_worker[str(rec.get("worker_id"))] = rec
                    key = (step, int(rec["epoch"]))
                    tel.by_worker.setdefault(str(rec.get("worker_id")), []).append((float(rec["time"]), *key))
                    tel.epoch_world[key[1]] = int(rec["world_size"])
                    tel.commits[key] = min(float(rec["time"]), tel.commits.get(key, float("inf")))
                elif kind == "recovery":
                    tel.recovery_records.append(rec)
                elif kind == "eval":
                    tel.evals[int(rec["step"])] = rec
                elif kind == "result":
                    tel.results.append(rec)
    return tel


def steps_redone(tel: RunTelemetry) -> int:
    """How many step indices were committed in more than one epoch (a rollback runs them again)."""
    epochs: dict[int, int] = {}
    for step, _epoch in tel.commits:
        epochs[step] = epochs.get(step, 0) + 1
    return sum(1 for n in epochs.values() if n > 1)


def recoveries(tel: RunTelemetry) -> list[dict[str, Any]]:
    """The formations, one per epoch: ``mode`` (the most telling of the ranks' modes, ``modes`` all of
    them), ``world_size``, ``resumed_at``, ``steps_lost`` (max over the ranks), ``seconds`` (the slowest
    rank's formation) and ``time`` (when the last rank finished forming)."""
    by_epoch: dict[int, list[dict[str, Any]]] = {}
    for rec in tel.recovery_records:
        by_epoch.setdefault(int(rec["epoch"]), []).append(rec)
    out = []
    for epoch in sorted(by_epoch):
        recs = by_epoch[epoch]
        modes = sorted({str(r["mode"]) for r in recs}, key=mode_rank)
        out.append(
            {
                "mode": modes[0],
                "modes": modes,
                "epoch": epoch,
                "world_size": max(int(r["world_size"]) for r in recs),
                "ranks_recorded": len(recs),
                "resumed_at": max(int(r["resumed_at"]) for r in recs),
                "steps_lost": max(int(r["steps_lost"]) for r in recs),
                "seconds": round(max(float(r["seconds"]) for r in recs), 3),
                "time": max(float(r["time"]) for r in recs),
            }
        )
    return out


def world_size_runs(steps: dict[int, dict[str, Any]]) -> list[list[int]]:
    """[[from_step, world_size], ...]: one entry per run of equal world size."""
    runs: list[list[int]] = []
    for step in sorted(steps):
        size = int(steps[step]["world_size"])
        if not runs or runs[-1][1] != size:
            runs.append([step, size])
    return runs


def world_sizes(steps: dict[int, dict[str, Any]]) -> list[int | None]:
    """The world size of every step as committed (index = step; None for a step nobody recorded)."""
    out: list[int | None] = [None] * (max(steps) + 1 if steps else 0)
    for step, rec in steps.items():
        out[step] = int(rec["world_size"])
    return out


def skipped_steps(steps: dict[int, dict[str, Any]]) -> list[int]:
    """Steps whose record says ``"skipped": true`` (skipped on every rank: batch consumed, nothing
    applied; a record without the field was not skipped)."""
    return sorted(step for step, rec in steps.items() if rec.get("skipped") is True)


def build_summary(
    *,
    job: dict[str, Any],
    job_hash: str,
    tel: RunTelemetry,
    events: list[dict[str, Any]],
    wall_time_s: float,
    worker_exit_codes: dict[str, int | None],
    model_path: Path | None,
    plot_path: Path | None,
) -> dict[str, Any]:
    result = next((r for r in tel.results if r.get("rank") == 0), tel.results[0] if tel.results else None)
    train_time = (tel.last_time - tel.first_time) if tel.first_time is not None and tel.last_time else None
    done = int(result["steps_done"]) if result else (max(tel.steps) + 1 if tel.steps else 0)
    last_step = tel.steps[max(tel.steps)] if tel.steps else None
    sent, received = tel.bytes_on_wire()
    epochs = sorted({int(r["epoch"]) for r in tel.steps.values()})
    failures = [
        {k: e.get(k) for k in ("time", "kind", "worker_id", "epoch", "reason")}
        for e in events
        if e.get("kind") in FAILURE_EVENTS
    ]
    samples = int(job.get("global_batch", 0)) * max(0, len(tel.steps) - 1)
    step_times = sorted(float(r.get("step_time_s", 0.0)) for r in tel.steps.values())
    step_time = sum(step_times)
    return {
        "job": job,
        "job_hash": job_hash,
        "completed": bool(result) and done >= int(job.get("steps", 0)),
        "steps": int(job.get("steps", 0)),
        "steps_done": done,
        "world_size_per_step": world_size_runs(tel.steps),
        # per step (index = step), the latest record of a step run again after a rollback winning
        "world_sizes": world_sizes(tel.steps),
        "skipped_steps": skipped_steps(tel.steps),
        "epochs_trained": epochs,
        "final_loss": result.get("final_loss") if result else (last_step or {}).get("loss"),
        "test_accuracy": result.get("test_accuracy") if result else None,
        # what the workers' dataset says of itself (an imagefolder's classes, normalisation, files skipped)
        "data": _data(tel.results),
        "evals": [
            {"step": s, **{k: tel.evals[s][k] for k in ("test_loss", "test_accuracy")}}
            for s in sorted(tel.evals)
        ],
        "wall_time_s": round(wall_time_s, 3),
        "training_time_s": None if train_time is None else round(train_time, 3),
        # over the whole training (evaluations, checkpoints and re-forms included)
        "samples_per_s": round(samples / train_time, 1) if train_time else None,
        # over the optimizer steps alone (the steps that were kept)
        "step_samples_per_s": round(len(step_times) * int(job.get("global_batch", 0)) / step_time, 1)
        if step_time
        else None,
        "median_step_time_s": round(step_times[len(step_times) // 2], 4) if step_times else None,
        "step_time_split_s": _split(tel),
        "bytes_sent": sent,
        "bytes_received": received,
        "bytes_by_lane": tel.bytes_by_lane(),
        "failures": failures,
        "recoveries": recoveries(tel),
        "steps_redone": steps_redone(tel),
        "worker_exit_codes": worker_exit_codes,
        "model": str(model_path) if model_path else None,
        "plot": str(plot_path) if plot_path else None,
    }


def _data(results: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Rank 0's description of the dataset, with the files every worker skipped added up."""
    described = [r["data"] for r in results if r.get("data")]
    if not described:
        return None
    first = next((r["data"] for r in results if r.get("rank") == 0 and r.get("data")), described[0])
    out = dict(first)
    if any("bad_images_skipped" in d for d in described):
        out["bad_images_skipped"] = sum(int(d.get("bad_images_skipped", 0)) for d in described)
    return out


def recovery_after(tel: RunTelemetry, when: float) -> float | None:
    """Seconds from `when` (a failure) to the first step the re-formed cluster completed after it."""
    before = [r["epoch"] for r in tel.steps.values() if r["time"] <= when]
    old_epoch = max(before, default=-1)
    after = [r["time"] for r in tel.steps.values() if r["time"] > when and r["epoch"] > old_epoch]
    return round(min(after) - when, 3) if after else None


def _split(tel: RunTelemetry) -> dict[str, float] | None:
    """Mean compute / communication / waiting seconds per step (as the workers measured them)."""
    if not tel.steps:
        return None
    n = len(tel.steps)
    return {
        key: round(sum(float(r.get(f"{key}_s", 0.0)) for r in tel.steps.values()) / n, 4)
        for key in ("compute", "comm", "wait", "data_wait")
    }


def write_plot(tel: RunTelemetry, path: Path, title: str) -> bool:
    """Loss per step and test accuracy per evaluation as a PNG (matplotlib, Agg); False if no data."""
    if not tel.steps:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted(tel.steps)
    fig, ax_loss = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax_loss.plot(
        steps, [tel.steps[s]["loss"] for s in steps], color="tab:blue", linewidth=1.0, label="train loss"
    )
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("train loss", color="tab:blue")
    ax_loss.set_yscale("log")
    if tel.evals:
        ax_acc = ax_loss.twinx()
        evals = sorted(tel.evals)
        ax_acc.plot(
            evals,
            [100 * tel.evals[s]["test_accuracy"] for s in evals],
            "o-",
            color="tab:red",
            label="test accuracy",
        )
        ax_acc.set_ylabel("test accuracy (%)", color="tab:red")
        ax_acc.set_ylim(0, 100)
    ax_loss.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
