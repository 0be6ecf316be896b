"""A worker frozen (SIGSTOP) for 5 s, then thawed (SIGCONT): the diagnosis names it within seconds, it is
declared dead and evicted, the others
go on without it from its buddy's replica, nothing it does in its old epoch outlives it, and it rejoins as
a joiner with no rollback of the others. Real processes on the default co-located lane."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import ProcessReaper
from tests.integration.cluster_support import (
    get,
    processes_mentioning,
    read_jsonl,
    start_coordinator,
    start_worker,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

STEPS = 240
FREEZE_AT = 20
FROZEN_S = 5.0
HEARTBEAT_TIMEOUT = "3"  # evicted about 3.3 s into the freeze; named by the diagnosis long before


def test_a_frozen_worker_is_evicted_and_rejoins_without_a_rollback(
    reaper: ProcessReaper, tmp_path: Path
) -> None:
    coordinator, url = start_coordinator(
        reaper, tmp_path, "--steps", str(STEPS), "--min-workers", "3", heartbeat_timeout=HEARTBEAT_TIMEOUT
    )
    procs = {name: start_worker(reaper, tmp_path, url, name) for name in ("w0", "w1", "w2")}

    def committed() -> int:
        return max((w.get("committed_step", -1) for w in get(url, "/workers")["workers"]), default=-1)

    wait_for(lambda: committed() >= FREEZE_AT, 120, f"step {FREEZE_AT}")
    os.kill(procs["w2"].pid, signal.SIGSTOP)
    frozen_at = time.time()

    def frozen() -> dict[str, object] | None:  # the others wait on it, and its heartbeat is stale
        found = get(url, "/cluster/diagnosis")
        return found if [s["worker_id"] for s in found["suspects"]] == ["w2"] else None

    found = wait_for(frozen, FROZEN_S - 1.0, "the diagnosis to name w2", every_s=0.1)
    named_s = time.time() - frozen_at
    (suspect,) = found["suspects"]  # type: ignore[misc]
    assert suspect["reason"].startswith("frozen: its last heartbeat was"), suspect
    assert "whose last heartbeat was" in str(found["summary"]), found["summary"]
    print(f"\ndiagnosis named w2 {named_s:.2f} s into its freeze: {found['summary']}")
    time.sleep(max(0.0, FROZEN_S - (time.time() - frozen_at)))
    os.kill(procs["w2"].pid, signal.SIGCONT)

    for name, proc in procs.items():
        assert proc.wait(150) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
    events = get(url, "/events")["events"]
    (gone,) = [e for e in events if e["worker_id"] == "w2" and e["kind"] in ("died", "evicted")]
    assert gone["time"] - frozen_at < FROZEN_S, gone  # evicted while frozen
    telemetry = {n: read_jsonl(tmp_path / "telemetry" / f"{n}.jsonl") for n in procs}
    steps = {n: [r for r in rows if r["kind"] == "step"] for n, rows in telemetry.items()}

    # Nothing w2 did in its old epoch outlives it. A vote is an all-gather, which can complete on one rank and
    # not on another: w2 may have held every vote of the step in flight as it froze (checked its lease, then
    # froze) and applied it on thaw while the others, short of its vote, dropped that step and committed it in
    # the next epoch. That one step is the last of w2's old epoch, and its state is discarded when it rejoins
    # (asserted below: it joins with fresh shards). Every other step of w2's old epoch the others committed
    # too.
    others = {(r["step"], r["epoch"]) for r in steps["w0"]}
    old = [r for r in steps["w2"] if r["epoch"] < gone["epoch"]]
    alone = [r for r in old if (r["step"], r["epoch"]) not in others]
    assert old and len(alone) <= 1 and all(r is old[-1] for r in alone), alone
    for r in alone:
        assert any(o["step"] == r["step"] and o["epoch"] > r["epoch"] for o in steps["w0"]), r
    late = [r for r in old if r["time"] > gone["time"]]
    assert len(late) <= 1, late  # at most the step that was decided as it froze
    # w0 and w1 never redid a step: each committed every step once, in order, to the end
    for name in ("w0", "w1"):
        numbers = [r["step"] for r in steps[name]]
        assert numbers == list(range(STEPS)), (name, numbers[:5], len(numbers))
    recoveries = {n: [r for r in rows if r["kind"] == "recovery"] for n, rows in telemetry.items()}
    assert all(r["steps_lost"] == 0 for rows in recoveries.values() for r in rows)
    modes = [r["mode"] for r in recoveries["w0"]]
    assert modes[0] == "fresh" and modes[1:] == ["handover"] * (len(modes) - 1) and len(modes) >= 3, modes
    joined = [r for r in recoveries["w2"] if r["mode"] == "join"]
    assert joined, recoveries["w2"]  # its old state was stale: it took fresh shards, the others kept theirs
    assert any(r["epoch"] >= joined[0]["epoch"] for r in steps["w2"]), "w2 contributed again after rejoining"
    world = {r["step"]: r["world_size"] for r in steps["w0"]}
    assert world[0] == 3 and 2 in world.values() and world[STEPS - 1] == 3, "3, then 2, then 3 again"
    coordinator.terminate()
    assert coordinator.wait(15) is not None
    assert processes_mentioning(str(tmp_path)) == []
