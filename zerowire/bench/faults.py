"""`zerowire bench faults`: what a worker failure costs a running job, on a local cluster of real processes.

In each of ``--rounds`` interleaved rounds (the order rotating every round, one cluster alive at a time) it
runs, in fresh processes:

- ``faults``: ``--workers`` workers train for ``--duration`` seconds (after ``--warmup`` seconds from the
  first committed step); a worker is SIGKILLed every ``--period`` seconds (the first half a period in, the
  victims taking turns) and started again with the same worker id ``--restart-after`` seconds later, when
  it joins the running job;
- ``fault_free`` at every world size the faulty run passes through (``--workers`` and one less): the same
  job, no fault, ``--ref-duration`` seconds.

Figures:

- ``detect_s``: from a SIGKILL to the coordinator's event marking the worker dead; ``next_commit_s``: to
  the first step committed after it (by the re-formed epoch); ``steps_redone``: step indices committed in
  more than one epoch (rolled back and run again) over all faulty runs. ``detect_s`` and ``next_commit_s``
  are medians over every kill (``*_max``: the worst);
- ``goodput``: committed samples of the faulty runs over what fault-free clusters of the same sizes commit
  in the same time::

      goodput = S / sum_w (T_w * R_w)

  S: samples of the steps committed in the faulty windows (a step counts once, at its last commit); T_w:
  seconds of the faulty windows during which the coordinator's membership had w workers (from its
  ``epoch`` events: a killed worker counts until it is declared dead, a restarted one from its
  registration); R_w: committed samples/s of the fault-free runs at world size w (all their windows
  together). The denominator is what fault-free clusters would have committed at the faulty run's
  time-weighted mix of world sizes: 1.0 means the faults cost nothing beyond the missing worker's
  capacity. ``goodput_by_commits`` is the same ratio with T_w cut at the commits instead (each gap between
  commits counts at the world size of the commit that ends it, so all of a kill's pause counts at the
  smaller size); the two differ only in which size a pause is charged at.

On a shared machine the load drifts between runs, so the fault-free rates of separate runs carry its
noise (``goodput_per_round`` shows the spread). ``goodput_in_run`` takes R_w from the faulty runs
themselves instead, their committed samples/s between the first and last commit of each epoch at size w:
it charges only the pauses and slow first steps around faults, and no drift.

``breakdown`` splits ``next_commit_s`` into detection, the wait until the new epoch starts forming, the
formation and the first step; ``join_s`` is a restart to the restarted worker's first step, and
``join_pause_s`` the survivors' longest gap between commits around a join. The goals are the product's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zerowire.commands import CommandError

if TYPE_CHECKING:
    from zerowire.bench.faults_window import Window

GOALS: dict[str, tuple[str, float]] = {
    "detect_s": ("<=", 2.0),
    "next_commit_s": ("<=", 3.0),
    "steps_redone": ("==", 0),
    "goodput": (">=", 0.93),
}


SETTINGS = (
    *("workers", "hosts", "period", "duration", "ref_duration", "rounds", "restart_after", "warmup"),
    *("model", "dataset", "global_batch", "threads", "heartbeat_timeout"),
)


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("faults", help="failure detection, recovery and goodput under periodic SIGKILLs")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--workers", type=int, default=3, help="workers of the faulty run (default 3)")
    p.add_argument(
        "--hosts", type=int, default=1, help="simulated hosts, as `zerowire run --hosts` (default 1)"
    )
    p.add_argument("--period", type=float, default=60.0, help="seconds between faults (default 60)")
    p.add_argument(
        "--duration", type=float, default=180.0, help="measured seconds of each faulty run (default 180)"
    )
    p.add_argument(
        "--ref-duration",
        type=float,
        default=30.0,
        help="measured seconds of each fault-free run (default 30)",
    )
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    p.add_argument(
        "--restart-after", type=float, default=5.0, help="seconds from a kill to the restart (default 5)"
    )
    p.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds after the first step")
    p.add_argument("--model", default="resnet8", help="model (default resnet8)")
    p.add_argument("--dataset", default="digits", help="dataset (default digits)")
    p.add_argument("--global-batch", type=int, default=64, help="samples per step (default 64)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    p.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=None,
        help="the coordinator's heartbeat timeout (default: the coordinator's own)",
    )
    p.add_argument("--startup-timeout", type=float, default=180.0, help="seconds allowed to the first step")
    p.add_argument("--output", default=None, help="keep every run's folder here (default: a temporary one)")
    p.set_defaults(handler=handle)


def _check(args: argparse.Namespace) -> None:
    if args.workers < 2:
        raise CommandError("--workers must be >= 2 (one is killed)")
    if not 1 <= args.hosts <= args.workers:
        raise CommandError(f"--hosts must be between 1 and --workers ({args.workers})")
    if min(args.period, args.duration, args.ref_duration) <= 0 or args.warmup < 0:
        raise CommandError("--period, --duration and --ref-duration must be > 0, --warmup >= 0")
    if args.period / 2 >= args.duration:
        raise CommandError("--duration must exceed half a --period (the first fault comes then)")
    if not 0 <= args.restart_after < args.period:
        raise CommandError("--restart-after must be >= 0 and shorter than --period")
    if args.rounds < 1 or args.global_batch < 1 or args.threads < 1:
        raise CommandError("--rounds, --global-batch and --threads must be >= 1")


def handle(args: argparse.Namespace) -> int:
    import logging

    _check(args)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per status poll is noise
    if args.output:
        out = _measure(args, Path(args.output))
    else:
        with tempfile.TemporaryDirectory(prefix="zerowire-bench-faults-") as tmp:
            out = _measure(args, Path(tmp))
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for key, goal in out["goals"].items():
            verdict = "met" if goal["met"] else "MISSED"
            print(f"{key:14s} {goal['value']!s:>10}   goal {goal['goal']:8s} {verdict}")
        print(f"breakdown (medians): {out['breakdown_median']}")
        print(f"join_s {out['join_s_median']}  join_pause_s {out['join_pause_s_median']} (medians)")
        print(f"goodput per round {out['goodput_per_round']}, in run {out['goodput_in_run']}")
    return 0


def _measure(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    from zerowire.bench.faults_window import run_window

    kinds = [("faults", args.workers), ("fault_free", args.workers), ("fault_free", args.workers - 1)]
    windows: list[Window] = []
    for rnd in range(args.rounds):
        for kind, workers in kinds[rnd % len(kinds) :] + kinds[: rnd % len(kinds)]:  # rotated each round
            name = f"r{rnd}-{kind}-{workers}"
            print(
                f"zerowire bench faults: round {rnd + 1}/{args.rounds}: {kind}, {workers} workers",
                file=sys.stderr,
            )
            try:
                windows.append(run_window(args, kind, workers, rnd, folder / name))
            except RuntimeError as exc:
                raise CommandError(f"{name}: {exc}", code=1) from exc
    # a world size the faulty runs passed through that no fault-free run measured (two faults at once)
    seen = {w for win in windows if win.kind == "faults" for w in (*win.time_at_size, *win.time_by_commits)}
    for workers in sorted(seen - {win.workers for win in windows if win.kind == "fault_free"}):
        windows.append(run_window(args, "fault_free", workers, args.rounds, folder / f"extra-{workers}"))
    return report(args, windows)


def report(args: argparse.Namespace, windows: list[Window]) -> dict[str, Any]:
    """The JSON object (see the module docstring for the formulas)."""
    faulty = [w for w in windows if w.kind == "faults"]
    rates = _rates([w for w in windows if w.kind == "fault_free"])
    at_size = _total(w.time_at_size for w in faulty)
    by_commits = _total(w.time_by_commits for w in faulty)
    expected = sum(t * rates[size] for size, t in at_size.items())
    expected_by_commits = sum(t * rates[size] for size, t in by_commits.items())
    samples = sum(w.samples for w in faulty)
    kills = [k for w in faulty for k in w.kills]

    def values(key: str) -> list[float]:
        return [float(k[key]) for k in kills if k.get(key) is not None]

    def median(key: str) -> float | None:
        got = values(key)
        return round(statistics.median(got), 3) if got else None

    figures: dict[str, Any] = {
        "detect_s": median("detect_s"),
        "next_commit_s": median("next_commit_s"),
        "steps_redone": sum(w.steps_redone for w in faulty),
        "goodput": round(samples / expected, 4) if expected else None,
    }
    goals = {key: _goal(key, figures[key]) for key in GOALS}
    parts = ("detect_s", "reform_wait_s", "formation_s", "first_step_s")
    splits = [k["breakdown"] for k in kills if "breakdown" in k]
    return {
        **figures,
        "goals": goals,
        "detect_s_max": max(values("detect_s"), default=None),
        "next_commit_s_max": max(values("next_commit_s"), default=None),
        "faults": len(kills),
        "faults_unmeasured": sum(1 for k in kills if k.get("next_commit_s") is None),
        "breakdown_median": {p: round(statistics.median(s[p] for s in splits), 3) for p in parts}
        if splits
        else None,
        "join_s_median": median("join_s"),
        "join_pause_s_median": median("join_pause_s"),
        "steps_lost_max": max((int(k["steps_lost"]) for k in kills), default=0),
        # the same with the window's time attributed to world sizes by the commits (faults_window.committed)
        "goodput_by_commits": round(samples / expected_by_commits, 4) if expected_by_commits else None,
        # R_w from the faulty runs themselves (their pace inside each epoch): what the pauses cost, free of
        # the machine's load drifting between runs
        "goodput_in_run": _in_run(faulty, at_size, samples),
        # each round's faulty run against that round's fault-free runs alone: the spread of the figure
        "goodput_per_round": [_round_goodput(windows, r) for r in sorted({w.round for w in faulty})],
        "committed_samples": samples,
        "expected_samples": round(expected, 1),
        "time_at_size_s": {str(s): round(t, 3) for s, t in sorted(at_size.items())},
        "fault_free_samples_per_s": {str(s): round(r, 2) for s, r in rates.items()},
        "faulty_samples_per_s": round(samples / sum(w.end - w.start for w in faulty), 2),
        "settings": {k: getattr(args, k) for k in SETTINGS},
        "runs": [w.as_dict() for w in windows],
        "kills": [{k: v for k, v in kill.items() if k != "time"} for kill in kills],
    }


def _rates(refs: list[Window]) -> dict[int, float]:
    """Committed samples/s of fault-free runs at each world size, all their windows together."""
    sizes = sorted({w.workers for w in refs})
    return {
        n: sum(w.samples for w in refs if w.workers == n)
        / sum(w.end - w.start for w in refs if w.workers == n)
        for n in sizes
    }


def _in_run(faulty: list[Window], at_size: dict[int, float], samples: int) -> float | None:
    pooled: dict[int, tuple[int, float]] = {}
    for w in faulty:
        for n, (k, t) in w.steady.items():
            a, b = pooled.get(n, (0, 0.0))
            pooled[n] = (a + k, b + t)
    if not set(at_size) <= {n for n, (_k, t) in pooled.items() if t > 0}:
        return None
    expected = sum(t * pooled[n][0] / pooled[n][1] for n, t in at_size.items())
    return round(samples / expected, 4) if expected else None


def _round_goodput(windows: list[Window], rnd: int) -> float | None:
    mine = [w for w in windows if w.round == rnd]
    rates = _rates([w for w in mine if w.kind == "fault_free"])
    at_size = _total(w.time_at_size for w in mine if w.kind == "faults")
    if not set(at_size) <= set(rates):
        return None
    expected = sum(t * rates[n] for n, t in at_size.items())
    return round(sum(w.samples for w in mine if w.kind == "faults") / expected, 4) if expected else None


def _total(parts: Iterable[dict[int, float]]) -> dict[int, float]:
    out: dict[int, float] = {}
    for part in parts:
        for size, t in part.items():
            out[size] = out.get(size, 0.0) + t
    return out


def _goal(key: str, value: float | None) -> dict[str, Any]:
    op, bound = GOALS[key]
    met = value is not None and (
        value <= bound if op == "<=" else value >= bound if op == ">=" else value == bound
    )
    return {"value": value, "goal": f"{op} {bound:g}", "met": met}
