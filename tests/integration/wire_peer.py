"""One rank of a multi-process wire test: `python -m tests.integration.wire_peer DIR RANK WORLD SCENARIO`.

Starts a GrpcBackend on 127.0.0.1 port 0, writes its port to DIR/port.RANK, waits for every rank's
port, installs the group (with a data-plane key per pair of ranks, as the coordinator hands out), runs
SCENARIO and writes DIR/result.RANK.json.

Scenarios: `conformance` (tests/integration/wire_harness.py: raw, int8 and mixed runs side by side, on
backends built alike: each call names its codec; then the point-to-point cases), and
`hang-gather`, `hang-reduce` (a victim rank stops after step 0; the others block in step 1 until the
test kills it; if DIR/epoch appears they call set_epoch and time how fast the collective fails).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from communication.errors import CommError
from communication.group import PeerGroup
from communication.grpc_backend import GrpcBackend
from tests.integration.wire_harness import run_cases, run_contract_cases, run_control_cases, run_p2p_cases

TOKEN = "test-token"


def pair_keys(rank: int, world: int) -> dict[int, bytes]:
    """The same 32-byte key on both sides of every pair of ranks."""
    return {
        peer: hashlib.sha256(f"wire-test:{min(rank, peer)}:{max(rank, peer)}".encode()).digest()
        for peer in range(world)
        if peer != rank
    }


def _wait_for(path: Path, limit: float) -> None:
    deadline = time.monotonic() + limit
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {limit}s")
        time.sleep(0.01)


def _write(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    tmp.rename(path)


def _hang(
    backend: GrpcBackend, group: PeerGroup, directory: Path, kind: str, timeout: float
) -> dict[str, Any]:
    world, rank = group.world_size, group.rank
    n = 300_000
    shard = torch.ones(n) * rank
    out = torch.empty(world * n)
    backend.all_gather(group, 0, 0, shard, out, 10).result(15)
    backend.reduce_scatter(group, 0, 0, torch.ones(world * n), torch.empty(n), 10).result(15)
    backend.release(group, 0)
    time.sleep(0.2)
    loop = backend._loop
    assert loop is not None
    tasks_before = backend.call_soon(_count_tasks()).result(5)
    _write(directory / f"ready.{rank}", {})
    if rank == world - 1:  # the victim: waits to be killed
        time.sleep(120)
    epoch_at: list[float] = []

    def watch() -> None:
        path = directory / "epoch"
        while not path.exists():
            time.sleep(0.005)
        epoch_at.append(time.monotonic())
        backend.set_epoch(group.epoch + 1)

    threading.Thread(target=watch, daemon=True).start()
    start = time.monotonic()
    sent = backend.stats().bytes_sent
    if kind == "hang-gather":
        fut = backend.all_gather(group, 1, 0, shard, out, timeout)
    else:
        fut = backend.reduce_scatter(group, 1, 0, torch.ones(world * n), torch.empty(n), timeout)
        # every push (also the victim's) is acknowledged: only the victim's contribution is missing
        while backend.stats().bytes_sent < sent + 4 * n * (world - 1) and not fut.done():
            time.sleep(0.005)
    _write(directory / f"waiting.{rank}", {})
    error, peer = "", None
    try:
        fut.result(timeout + 10)
    except CommError as exc:
        error, peer = type(exc).__name__, exc.peer
    end = time.monotonic()
    time.sleep(0.2)
    tasks_after = backend.call_soon(_count_tasks()).result(5)
    return {
        "rank": rank,
        "error": error,
        "peer": peer,  # the address the failed call talked to, where known
        "victim": group.addresses[-1],
        "elapsed": end - start,
        "since_epoch": (end - epoch_at[0]) if epoch_at else None,
        "inflight": backend.inflight(),
        "tasks_before": tasks_before,
        "tasks_after": tasks_after,
    }


async def _mailbox_bytes(backend: GrpcBackend) -> int:
    return backend._mailbox.held_bytes


async def _count_tasks() -> int:
    return len([t for t in asyncio.all_tasks() if t is not asyncio.current_task()])


def main(argv: list[str]) -> int:
    directory, rank, world, scenario = Path(argv[0]), int(argv[1]), int(argv[2]), argv[3]
    timeout = float(argv[4]) if len(argv) > 4 else 30.0
    codecs = ["none", "int8", "mixed"] if scenario == "conformance" else ["none"]
    backends = {c: GrpcBackend(TOKEN, int8_block=1024) for c in codecs}
    try:
        ports = [backends[c].start("127.0.0.1:0") for c in codecs]
        _write(directory / f"port.{rank}", ports)
        for r in range(world):
            _wait_for(directory / f"port.{r}", 60)
        all_ports = [json.loads((directory / f"port.{r}").read_text()) for r in range(world)]
        keys = pair_keys(rank, world)
        groups = {
            c: PeerGroup("job-test", 1, rank, tuple(f"127.0.0.1:{p[i]}" for p in all_ports), peer_keys=keys)
            for i, c in enumerate(codecs)
        }
        for c in codecs:
            backends[c].set_group(groups[c])
        if scenario == "conformance":
            result = {c: run_cases(backends[c], groups[c], c, 1024, timeout) for c in codecs}
            result["control"] = run_control_cases(backends["none"], groups["none"], timeout)
            p2p = run_p2p_cases(backends["none"], groups["none"], timeout)
            p2p["mailbox_bytes"] = backends["none"].call_soon(_mailbox_bytes(backends["none"])).result(5)
            result["p2p"] = p2p
            newer = dataclasses.replace(groups["none"], epoch=2)
            backends["none"].set_group(newer)
            lone = world == 2  # the timeout case at one world size
            result["contract"] = run_contract_cases(
                backends["none"], newer, groups["none"], timeout, lone=lone
            )
        else:
            result = _hang(backends["none"], groups["none"], directory, scenario, timeout)
        _write(directory / f"result.{rank}.json", result)
    finally:
        for backend in backends.values():
            backend.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
