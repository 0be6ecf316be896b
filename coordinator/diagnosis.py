"""Who holds the job up, and why: a pure function of the workers' views (``coordinator.views.worker_dict``).

Every worker's heartbeat carries the head of its flight recorder (``waiting``: the oldest call through the
collective contract still in flight, when it has waited ``WAIT_MIN_S`` or more: op, lane, epoch, step, unit or
key, the ranks it waits on, for how long) and, while its training makes no progress, the top of its training
thread's stack (``stack``). From these the diagnosis names:

- a **frozen** member: others wait on it and its heartbeat is stale (the process is stopped, or gone);
- a **stuck trainer**: others wait on it, its heartbeat is fresh, it waits on nothing and its training has
  made no progress (it sends its stack, which says where it is; a member that has not reported yet is no
  suspect);
- a member **in another collective**: others wait on it while it waits in another call than most members
  (a data collective of another step, or an exchange or point-to-point call where they are in a step: the
  sequence of calls diverged; each side's op is named);
- a **partition**: every member waits, every heartbeat is fresh, none is frozen, stuck or in a minority's
  call, and the wait has lasted ``PARTITION_S``: the network between them is the suspect. (Two members whose
  calls differ, one each, are named so too: a divergence of two cannot be told from a partition that caught
  them on either side of a step's boundary, and the reason says their calls differ.)

``waiting`` lists every member that waits, and on whom; ``summary`` is one sentence a person can act on.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

WAIT_MIN_S = 0.5  # a call in flight for less is no wait worth reporting (workers leave it out)
STALE_BEATS = 2.5  # heartbeat intervals without a heartbeat: the worker is not answering
PARTITION_S = 3.0  # an equal wait this long, everyone's heartbeat fresh: more than a slow collective


def _call(waiting: Mapping[str, Any]) -> tuple[Any, ...]:
    """Where a rank is, as ranks can be compared: the step of its data collective (within a step the ranks'
    gathers and reductions run ahead of each other, unit by unit, so units and ops differ legitimately), or
    for an exchange or a point-to-point call, which name no step, that call's op and key."""
    if waiting.get("step") is not None:
        return (waiting.get("epoch"), waiting.get("step"))
    return (waiting.get("epoch"), waiting.get("op"), waiting.get("key"))


def describe_call(waiting: Mapping[str, Any]) -> str:
    op = str(waiting.get("op"))
    if waiting.get("unit") is not None:
        where = f"unit {waiting['unit']} of step {waiting.get('step')}"
    elif waiting.get("key") is not None:
        where = f"key {waiting['key']}"
    else:
        where = f"step {waiting.get('step')}"
    return f"{op} {where} (epoch {waiting.get('epoch')}, {waiting.get('lane')})"


def innermost_frame(stack: str) -> str:
    """The innermost frame of a formatted stack outside Python's own library (``file:line in function:
    code``): where the program, not ``threading``, holds the thread."""
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)', stack)
    own = [f for f in frames if "/lib/python" not in f[0] or "site-packages" in f[0]] or frames
    if not own:
        return ""
    path, line, function, code = own[-1]
    return f"{path.rsplit('/', 1)[-1]}:{line} in {function}: {code.strip()}"


def _names(workers: Sequence[Mapping[str, Any]]) -> str:
    ids = [str(w["worker_id"]) for w in workers]
    return ids[0] if len(ids) == 1 else ", ".join(ids[:-1]) + " and " + ids[-1]


def diagnose(workers: Sequence[Mapping[str, Any]], heartbeat_interval_s: float, epoch: int) -> dict[str, Any]:
    """``{"suspects": [...], "waiting": [...], "summary": str}`` for the alive members of ``epoch`` (a wait
    reported in another epoch names that epoch's ranks, and is left out)."""
    members = [
        {**w, "waiting": w["waiting"] if w.get("waiting") and w["waiting"].get("epoch") == epoch else None}
        for w in workers
        if w.get("state") == "alive" and w.get("rank") is not None
    ]
    by_rank = {int(w["rank"]): w for w in members}
    stale_after = max(STALE_BEATS * heartbeat_interval_s, 1.0)
    waiting = []
    for w in members:
        wait = w.get("waiting")
        if not wait:
            continue
        age = float(w.get("last_heartbeat_age_s") or 0.0)
        waiting.append(
            {
                "worker_id": w["worker_id"],
                "rank": w["rank"],
                "op": wait.get("op"),
                "lane": wait.get("lane"),
                "epoch": wait.get("epoch"),
                "step": wait.get("step"),
                "unit": wait.get("unit") if wait.get("unit") is not None else wait.get("key"),
                "waiting_on_ranks": sorted(int(r) for r in wait.get("peers", ())),
                "since_s": round(float(wait.get("since_s", 0.0)) + age, 3),
            }
        )
    suspects: list[dict[str, Any]] = []
    sentences: list[str] = []
    if waiting:
        calls = Counter(_call(w["waiting"]) for w in members if w.get("waiting"))
        main_call = calls.most_common(1)[0][0]
        minority = {  # the calls fewer members wait in than the most common one: the sequences diverged
            c for c in calls if c != main_call and calls[c] < calls[main_call]
        }
        for m in members:
            rank = int(m["rank"])
            waiters = [e for e in waiting if rank in e["waiting_on_ranks"] and e["rank"] != rank]
            if not waiters:
                continue
            names = [by_rank[int(e["rank"])] for e in waiters]
            longest = max(waiters, key=lambda e: e["since_s"])
            on = describe_call(next(w["waiting"] for w in names if w["rank"] == longest["rank"]))
            age = float(m.get("last_heartbeat_age_s") or 0.0)
            own = m.get("waiting")
            where = f"rank {rank} ({m['worker_id']} on host {m.get('host_id') or m.get('host')})"
            reason = None
            if age > stale_after:
                reason = f"frozen: its last heartbeat was {age:.1f} s ago while others wait on it"
                tail = f"whose last heartbeat was {age:.1f} s ago"
            elif not own and m.get("stack"):  # it says so itself: no progress, and in no collective
                frame = innermost_frame(str(m.get("stack") or ""))
                at = f"; its training is at {frame}" if frame else ""
                reason = "stuck trainer: heartbeat alive, in no collective, while others wait on it" + at
                tail = f"whose heartbeat is fresh but whose training is in no collective{at}"
            elif own and _call(own) in minority:
                reason = f"in another collective: {describe_call(own)}, while the others are in {on}"
                tail = f"which is in {describe_call(own)} instead"
            elif not minority and len(waiting) == len(members) and longest["since_s"] > PARTITION_S:
                same = "in the same call" if len(calls) == 1 else "on each other (in calls that differ)"
                reason = f"partition: every member waits {same} with fresh heartbeats"
                tail = "whose heartbeat is fresh: the network between them may be partitioned"
            if reason is None:
                continue
            suspects.append(
                {
                    "worker_id": m["worker_id"],
                    "rank": rank,
                    "host": m.get("host_id") or m.get("host"),
                    "reason": reason,
                }
            )
            verb = "has" if len(names) == 1 else "have"
            sentences.append(
                f"{_names(names)} {verb} waited {longest['since_s']:.1f} s in {on} for {where}, {tail}"
            )
    if sentences:
        summary = "; ".join(sentences)
    elif waiting:
        longest = max(waiting, key=lambda e: e["since_s"])
        who, since = longest["worker_id"], longest["since_s"]
        summary = f"no member holds the job up; the longest wait is {who}'s, {since:.1f} s"
    else:
        summary = "no member is waiting on another"
    return {"suspects": suspects, "waiting": waiting, "summary": summary}
