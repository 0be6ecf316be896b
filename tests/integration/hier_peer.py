"""One rank of a multi-process hierarchical backend test:
`python -m tests.integration.hier_peer DIR RANK WORLD SCENARIO HOSTS [VICTIM]`, HOSTS a comma-separated
host id per rank (simulated hosts: every process is on loopback).

Every rank hosts a RendezvousStore for its whole life and a GrpcBackend on port 0, writes both addresses
to DIR/port.RANK, waits for every rank's, then runs SCENARIO and writes DIR/result.RANK.json:

- `conformance`: the shared cases (tests/integration/wire_harness.py) in epoch 1 and again in epoch 2
  (a new local group through the same stores), with the bytes each lane sent; then one reduce-scatter of
  1 MiB per rank hierarchically (epoch 3) and on the flat path (epoch 4, no host ids) with the bytes
  per lane of each. With one member per host, also the cases on a plain GrpcBackend beside it.
- `kill`: after a first step, rank VICTIM stops; the others enter a reduce-scatter (timeout 8 s) and the
  test SIGKILLs the victim; they report the error and how long it took.
Each reports the time close() took and the threads left after it.
"""

from __future__ import annotations

import gc
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from communication.backend import UnitSpec
from communication.errors import CommError
from communication.group import PeerGroup
from communication.grpc_backend import GrpcBackend
from communication.hierarchical import HierarchicalBackend
from communication.rendezvous_store import RendezvousStore
from communication.torchdist import TorchDistBackend
from tests.integration.wire_harness import rounding_units, run_cases, run_contract_cases, run_control_cases
from tests.integration.wire_peer import TOKEN, _wait_for, _write, pair_keys

KILL_TIMEOUT = 8.0
MEASURE_NUMEL = 1 << 18  # 1 MiB of fp32 per rank's shard


def _data(seed: int, numel: int) -> torch.Tensor:
    return torch.randn(numel, generator=torch.Generator().manual_seed(seed))


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {lane: after[lane] - before[lane] for lane in after}


def _measure(backend: HierarchicalBackend, group: PeerGroup) -> dict[str, Any]:
    """One reduce-scatter of MEASURE_NUMEL per rank: bytes per lane, seconds, how it compares."""
    world, rank, n = group.world_size, group.rank, MEASURE_NUMEL
    backend.set_plan(group, {0: UnitSpec(n)})
    fulls = [_data(9000 + r, world * n) for r in range(world)]
    # a first step (gather, reduce): once its reduce-scatter is done here, every peer has fetched this
    # rank's shard, so the counters then move only with the measured reduce-scatter of step 1
    backend.all_gather(group, 0, 0, _data(rank, n), torch.empty(world * n), 30).result(40)
    backend.reduce_scatter(group, 0, 0, fulls[rank], torch.empty(n), 30).result(40)
    backend.release(group, 0)
    out = torch.empty(n)
    before = backend.bytes_by_lane()
    began = time.monotonic()
    backend.reduce_scatter(group, 1, 0, fulls[rank], out, 30).result(40)
    seconds = time.monotonic() - began
    lanes = _delta(backend.bytes_by_lane(), before)
    backend.release(group, 1)
    parts = [f[rank * n : (rank + 1) * n] for f in fulls]
    want = parts[0].clone()
    for p in parts[1:]:
        want.add_(p)
    return {
        "mode": backend.mode,
        "lanes": lanes,
        "seconds": seconds,
        "exact": bool(torch.equal(out, want)),
        "units": rounding_units(out, want, parts),
        "values": out.tolist()[:64],
    }


def _conformance(
    backend: HierarchicalBackend, make: Any, plain: GrpcBackend | None, plain_group: PeerGroup | None
) -> dict[str, Any]:
    runs, lanes = [], []
    for epoch in (1, 2):
        group = make(epoch)
        backend.set_group(group)
        before = backend.bytes_by_lane()
        runs.append(run_cases(backend, group, "none", 1024, 30))
        lanes.append(_delta(backend.bytes_by_lane(), before))
    result: dict[str, Any] = {"rank": runs[0]["rank"], "runs": runs, "lanes": lanes, "mode": backend.mode}
    result["measure"] = [_measure(backend, make(3)), _measure(backend, make(4, flat=True))]
    group = make(5)  # int8 and raw units in one plan: the gRPC stage encodes, the local lane carries raw
    backend.set_group(group)
    before = backend.bytes_by_lane()
    result["mixed"] = run_cases(backend, group, "mixed", 1024, 30)
    result["mixed_lanes"] = _delta(backend.bytes_by_lane(), before)
    result["control"] = run_control_cases(backend, group, 30)
    newer = make(6)
    backend.set_group(newer)
    result["contract"] = run_contract_cases(backend, newer, group, 30)
    if plain is not None and plain_group is not None:
        plain.set_group(plain_group)
        result["plain"] = run_cases(plain, plain_group, "none", 1024, 30)
    return result


def _kill(backend: HierarchicalBackend, group: PeerGroup, directory: Path, victim: int) -> dict[str, Any]:
    world, rank, n = group.world_size, group.rank, 100_000
    backend.set_group(group)
    backend.set_plan(group, {0: UnitSpec(n)})
    out = torch.empty(world * n)
    backend.all_gather(group, 0, 0, torch.full((n,), float(rank)), out, 30).result(40)
    backend.reduce_scatter(group, 0, 0, torch.ones(world * n), torch.empty(n), 30).result(40)
    backend.release(group, 0)
    if rank == victim:
        _write(directory / f"waiting.{rank}", {})
        time.sleep(120)
    start = time.monotonic()
    fut = backend.reduce_scatter(group, 1, 0, torch.ones(world * n), torch.empty(n), KILL_TIMEOUT)
    _write(directory / f"waiting.{rank}", {})
    error = ""
    try:
        fut.result(KILL_TIMEOUT + 20)
    except CommError as exc:
        error = type(exc).__name__
    return {"rank": rank, "error": error, "elapsed": time.monotonic() - start}


def main(argv: list[str]) -> int:
    directory, rank, world, scenario = Path(argv[0]), int(argv[1]), int(argv[2]), argv[3]
    hosts = tuple(argv[4].split(","))
    torch.set_num_threads(1)
    store = RendezvousStore("127.0.0.1")
    remote = GrpcBackend(TOKEN)
    local = TorchDistBackend(
        collective_timeout=KILL_TIMEOUT if scenario == "kill" else 30, rendezvous_timeout=30
    )
    backend = HierarchicalBackend(remote, local)
    distinct = len(set(hosts)) == world and scenario == "conformance"
    plain = GrpcBackend(TOKEN) if distinct else None
    close_s = 0.0
    try:
        ports = [remote.start("127.0.0.1:0"), plain.start("127.0.0.1:0") if plain is not None else 0]
        _write(directory / f"port.{rank}", {"ports": ports, "store": store.address})
        for r in range(world):
            _wait_for(directory / f"port.{r}", 60)
        peers = [json.loads((directory / f"port.{r}").read_text()) for r in range(world)]
        keys = pair_keys(rank, world)
        stores = tuple(p["store"] for p in peers)

        def make(epoch: int, flat: bool = False, which: int = 0) -> PeerGroup:
            addresses = tuple(f"127.0.0.1:{p['ports'][which]}" for p in peers)
            host_ids = () if flat else hosts
            return PeerGroup("job-test", epoch, rank, addresses, host_ids, keys, stores)

        if scenario == "conformance":
            result = _conformance(backend, make, plain, make(1, which=1) if plain is not None else None)
        else:
            result = _kill(backend, make(1), directory, int(argv[5]))
    finally:
        began = time.monotonic()
        backend.close()
        if plain is not None:
            plain.close()
        store.close()
        close_s = time.monotonic() - began
    result["close_s"] = close_s
    del backend, remote, local, plain
    gc.collect()  # the gRPC runtime's poller thread ends with the last object that uses it
    time.sleep(0.2)
    result["threads"] = sorted(t.name for t in threading.enumerate())
    _write(directory / f"result.{rank}.json", result)
    return 0


if __name__ == "__main__":
    from zerowire.process_exit import exit_without_teardown

    exit_without_teardown(main(sys.argv[1:]))
