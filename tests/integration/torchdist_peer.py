"""One rank of a multi-process torch.distributed lane test:
`python -m tests.integration.torchdist_peer DIR RANK WORLD SCENARIO RENDEZVOUS [RENDEZVOUS2]`.

Scenarios: `conformance` (tests/integration/wire_harness.py on gloo), and `kill`, `stall`: the last rank
(the victim) stops after step 0; the others block in step 1 until the test SIGKILLs the victim (`kill`)
or writes DIR/epoch (`stall`: they call set_epoch; collective timeout 5 s instead of 20 s). The
survivors then form the next epoch's group without the victim on RENDEZVOUS2, check one exact
all_gather and reduce_scatter on it, close the backend and report the threads left. Results go to
DIR/result.RANK.json.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from communication.errors import CommError
from communication.group import PeerGroup
from communication.torchdist import TorchDistBackend
from tests.integration.wire_harness import run_cases, run_contract_cases, run_control_cases, run_p2p_cases


def _write(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    tmp.rename(path)


def _group(epoch: int, rank: int, world: int) -> PeerGroup:
    return PeerGroup("job-test", epoch, rank, tuple(f"127.0.0.1:{r}" for r in range(world)))


def _fault(backend: TorchDistBackend, directory: Path, rank: int, world: int, rdv2: str) -> dict[str, Any]:
    group = _group(1, rank, world)
    n = 300_000
    out = torch.empty(world * n)
    backend.all_gather(group, 0, 0, torch.ones(n) * rank, out, 20).result(30)
    if rank == world - 1:  # the victim
        _write(directory / f"waiting.{rank}", {})
        time.sleep(120)
    epoch_at: list[float] = []
    stop = threading.Event()

    def watch() -> None:
        path = directory / "epoch"
        while not path.exists():
            if stop.wait(0.005):
                return
        epoch_at.append(time.monotonic())
        backend.set_epoch(group.epoch + 1)

    watcher = threading.Thread(target=watch, name="epoch-watch")
    watcher.start()
    start = time.monotonic()
    fut = backend.reduce_scatter(group, 1, 0, torch.ones(world * n), torch.empty(n), 15)
    time.sleep(0.3)
    _write(directory / f"waiting.{rank}", {})
    error = ""
    try:
        fut.result(30)
    except CommError as exc:
        error = type(exc).__name__
    end = time.monotonic()
    stop.set()
    watcher.join(5)
    # the next epoch, without the victim
    survivors = world - 1
    group2 = _group(2, rank, survivors)
    backend.set_group(group2, rdv2)
    m = 1001
    shards = [torch.randn(m, generator=torch.Generator().manual_seed(r)) for r in range(survivors)]
    fulls = [
        torch.randn(survivors * m, generator=torch.Generator().manual_seed(50 + r)) for r in range(survivors)
    ]
    gathered = torch.empty(survivors * m)
    backend.all_gather(group2, 0, 0, shards[rank], gathered, 20).result(30)
    reduced = torch.empty(m)
    backend.reduce_scatter(group2, 0, 0, fulls[rank], reduced, 20).result(30)
    want = fulls[0][rank * m : (rank + 1) * m].clone()
    for r in range(1, survivors):
        want.add_(fulls[r][rank * m : (rank + 1) * m])
    return {
        "rank": rank,
        "error": error,
        "elapsed": end - start,
        "since_epoch": (end - epoch_at[0]) if epoch_at else None,
        "next_gather_exact": bool(torch.equal(gathered, torch.cat(shards))),
        "next_reduce_exact": bool(torch.equal(reduced, want)),
    }


def main(argv: list[str]) -> int:
    directory, rank, world, scenario, rdv = Path(argv[0]), int(argv[1]), int(argv[2]), argv[3], argv[4]
    torch.set_num_threads(1)
    # stall: the abandoned group's library work ends at its collective timeout; close() waits 2 s at most
    backend = TorchDistBackend(collective_timeout=5 if scenario == "stall" else 20, rendezvous_timeout=30)
    close_s = 0.0
    try:
        if scenario == "conformance":
            group = _group(1, rank, world)
            backend.set_group(group, rdv)
            result = run_cases(backend, group, "none", 1024, 30)
            p2p = run_p2p_cases(backend, group, 30, in_call_order=True)
            result["mixed"] = run_cases(backend, group, "mixed", 1024, 30)  # int8 calls served raw
            result["p2p"] = p2p
            result["control"] = run_control_cases(backend, group, 30)
            newer = _group(2, rank, world)
            backend.set_group(newer, argv[5])
            result["contract"] = run_contract_cases(backend, newer, group, 30, lone=world == 2)
        else:
            backend.set_group(_group(1, rank, world), rdv)
            result = _fault(backend, directory, rank, world, argv[5])
    finally:
        began = time.monotonic()
        backend.close()
        close_s = time.monotonic() - began
    result["close_s"] = close_s
    result["threads"] = sorted(t.name for t in threading.enumerate())
    _write(directory / f"result.{rank}.json", result)
    return 0


if __name__ == "__main__":
    from zerowire.process_exit import exit_without_teardown

    exit_without_teardown(main(sys.argv[1:]))
