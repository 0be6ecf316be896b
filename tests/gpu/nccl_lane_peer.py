"""One rank of the two-GPU tests of the NCCL lane: ``python -m tests.gpu.nccl_lane_peer DIR RANK SCENARIO
RENDEZVOUS RENDEZVOUS2``, on ``cuda:RANK``, writing DIR/result.RANK.json.

- ``lost``: both ranks form epoch 1 and gather once, then say so (DIR/ready.RANK); the test kills rank 1
  and writes DIR/go. Rank 0 then starts a gather rank 1 never joins: it must fail with PeerLost or
  CollectiveTimeout within its timeout, and the process must live on (the library's watchdog never ends
  it): rank 0 forms epoch 2 alone on RENDEZVOUS2, gathers exactly, and stays up a while before it reports.
- ``reduce``: both ranks reduce-scatter the same seeded values with the ordered (epoch 1, RENDEZVOUS) and
  the native (epoch 2, RENDEZVOUS2) reduce-scatter and report both results, with the sequential rank-order
  sum as the reference.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from communication.errors import CollectiveTimeout, PeerLost
from communication.group import PeerGroup
from communication.torchdist import TorchDistBackend

CALL_TIMEOUT_S = 3.0
LINGER_S = 5.0  # alive this long after the failure: a watchdog that ends the process would have by then
ADDRESSES = ("127.0.0.1:1", "127.0.0.1:2")


def _lost(directory: Path, rank: int, rendezvous: str, alone: str) -> dict[str, object]:
    device = torch.device("cuda", rank)
    lane = TorchDistBackend(device=device, collective_timeout=30.0, rendezvous_timeout=60.0)
    try:
        group = PeerGroup("gpu", 1, rank, ADDRESSES)
        lane.set_group(group, rendezvous)
        shard = torch.full((4,), float(rank + 1), device=device)
        out = lane.all_gather(group, 0, 0, shard, torch.empty(8, device=device), 60.0).wait(90)
        (directory / f"ready.{rank}").touch()
        if rank == 1:
            time.sleep(600)  # killed by the test
        deadline = time.monotonic() + 60
        while not (directory / "go").exists():
            assert time.monotonic() < deadline, "the test never said go"
            time.sleep(0.01)
        t0 = time.monotonic()
        error = ""
        try:
            lane.all_gather(group, 1, 0, shard, torch.empty(8, device=device), CALL_TIMEOUT_S).wait(60)
        except (PeerLost, CollectiveTimeout) as exc:
            error = type(exc).__name__
        elapsed = time.monotonic() - t0
        time.sleep(LINGER_S)
        solo = PeerGroup("gpu", 2, 0, ADDRESSES[:1])
        lane.set_group(solo, alone)
        again = lane.all_gather(solo, 0, 0, shard, torch.empty(4, device=device), 60.0).wait(90)
        return {
            "first": out.tolist(),
            "error": error,
            "elapsed": elapsed,
            "next_epoch_exact": bool(torch.equal(again, shard)),
        }
    finally:
        lane.close()


def _reduce(rank: int, rendezvous: list[str]) -> dict[str, object]:
    device = torch.device("cuda", rank)
    world, n = 2, 4096
    g = torch.Generator().manual_seed(7)
    fulls = [torch.randn(world * n, generator=g) * (10.0 ** (r + 1)) for r in range(world)]
    results: dict[str, object] = {}
    for epoch, mode in enumerate(("ordered", "native"), start=1):  # a lane, and an epoch, for each
        lane = TorchDistBackend(device=device, collective_timeout=30.0, rendezvous_timeout=60.0, reduce=mode)
        try:
            group = PeerGroup("gpu", epoch, rank, ADDRESSES)
            lane.set_group(group, rendezvous[epoch - 1])
            mine = fulls[rank].to(device)
            out = lane.reduce_scatter(group, 0, 0, mine, torch.empty(n, device=device), 60.0).wait(90)
            results[mode] = out.cpu().tolist()
        finally:
            lane.close()
    parts = [f[rank * n : (rank + 1) * n] for f in fulls]
    sequential = parts[0] + parts[1]  # the rank-order sum, on the host
    results["sequential"] = sequential.tolist()
    return results


def main(argv: list[str]) -> int:
    directory, rank, scenario, rendezvous = Path(argv[0]), int(argv[1]), argv[2], argv[3:5]
    torch.cuda.set_device(rank)
    if scenario == "lost":
        result = _lost(directory, rank, rendezvous[0], rendezvous[1])
    else:
        result = _reduce(rank, rendezvous)
    out = directory / f"result.{rank}.json"
    out.with_suffix(".tmp").write_text(json.dumps(result))
    out.with_suffix(".tmp").replace(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
