"""The hierarchical backend between real processes on loopback, hosts simulated by host ids: the shared
conformance cases on 2 hosts x 2 (interleaved ranks) and on one member per host; bytes per lane; a
co-located member SIGKILLed mid-collective.

Tolerance: a hierarchical reduce-scatter adds in another fixed order than rank order, so each value may
differ from the flat rank-order sum by at most 2 (N-1) * 2^-24 * sum_r |x_r| (wire_harness.rounding_bound);
all-gathers are exact; with one member per host or one host the results are bit-exact.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ProcessReaper
from tests.integration.hier_peer import KILL_TIMEOUT, MEASURE_NUMEL
from tests.integration.wire_harness import (
    REPO,
    check_contract,
    check_control,
    check_results,
    payload_bytes,
    rounding_bound,
)

pytestmark = [pytest.mark.slow]


def _spawn(
    reaper: ProcessReaper, tmp_path: Path, hosts: str, scenario: str, *extra: str
) -> list[subprocess.Popen[bytes]]:
    world = len(hosts.split(","))
    peer = [sys.executable, "-m", "tests.integration.hier_peer", str(tmp_path)]
    return [
        reaper.spawn([*peer, str(r), str(world), scenario, hosts, *extra], cwd=REPO) for r in range(world)
    ]


def _results(
    procs: list[subprocess.Popen[bytes]], tmp_path: Path, ranks: list[int], limit: float
) -> list[Any]:
    deadline = time.monotonic() + limit
    for r in ranks:
        assert procs[r].wait(timeout=max(1.0, deadline - time.monotonic())) == 0
    return [json.loads((tmp_path / f"result.{r}.json").read_text()) for r in ranks]


def _same_cases(a: dict[str, Any], b: dict[str, Any]) -> None:
    for x, y in zip(a["cases"], b["cases"], strict=True):
        assert (x["gather_digest"], x["reduce_crc"]) == (y["gather_digest"], y["reduce_crc"]), (x, y)


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    ("hosts", "mode"),
    [
        ("h0,h1,h0,h1", "hierarchical"),  # ranks not host-major (host-major: test_hierarchy, end to end)
        ("a,b,c", "flat"),  # one member per host: bit-exact against a plain gRPC lane
        # (one host, the local torch.distributed lane: every default `zerowire run`, end to end)
    ],
)
def test_hierarchical_conformance(hosts: str, mode: str, reaper: ProcessReaper, tmp_path: Path) -> None:
    procs = _spawn(reaper, tmp_path, hosts, "conformance")
    world = len(procs)
    results = _results(procs, tmp_path, list(range(world)), 200)
    host_ids = hosts.split(",")
    per_host = world // len(set(host_ids))
    num_hosts = world // per_host
    exact = mode != "hierarchical"
    for run in (0, 1):
        check_results([r["runs"][run] for r in results], "none", exact_reduce=exact)
    check_results([r["mixed"] for r in results], "mixed", exact_reduce=exact)
    check_control([r["control"] for r in results])
    check_contract([r["contract"] for r in results])
    sizes = [c["numel"] for c in results[0]["runs"][0]["cases"]]
    mixed = [(c["numel"], c["codec"]) for c in results[0]["mixed"]["cases"]]
    for r in results:
        assert r["mode"] == mode, r["mode"]
        _same_cases(r["runs"][0], r["runs"][1])  # deterministic: the same bits in two epochs
        # bytes sent per lane, per all-gather + reduce-scatter of shard numel n (exact, fp32 payloads):
        # gRPC: n to each other host (or each other rank, flat), local: H n to each co-located member
        grpc_peers = world - 1 if mode == "flat" else num_hosts - 1
        local_peers = 0 if mode == "flat" else per_host - 1
        for lanes in r["lanes"]:
            assert lanes["grpc"] == sum(2 * 4 * n * grpc_peers for n in sizes), lanes
            assert lanes["local"] == sum(2 * 4 * num_hosts * n * local_peers for n in sizes), lanes
        # each call's codec reaches the gRPC stage (int8 payloads there); the local lane carries raw fp32
        lanes = r["mixed_lanes"]
        assert lanes["grpc"] == sum(2 * payload_bytes(n, c, 1024) * grpc_peers for n, c in mixed), lanes
        assert lanes["local"] == sum(2 * 4 * num_hosts * n * local_peers for n, _ in mixed), lanes
        hier, flat = r["measure"]
        assert flat["mode"] == "flat" and flat["exact"], flat
        assert flat["lanes"] == {"grpc": 4 * MEASURE_NUMEL * (world - 1), "local": 0}
        assert hier["units"] <= rounding_bound(world), hier
        if mode == "hierarchical":
            # what crosses hosts: flat sends n to each of the L (H-1) members of other hosts, this
            # backend n to each of the H-1 members of its local index: 1/L of it (1% slack)
            cross_flat = 4 * MEASURE_NUMEL * per_host * (num_hosts - 1)
            assert hier["lanes"]["grpc"] <= cross_flat / per_host * 1.01, hier
            assert hier["lanes"]["local"] == 4 * num_hosts * MEASURE_NUMEL * (per_host - 1), hier
        else:
            assert hier["exact"], hier
        if mode == "flat":  # bit-exact against a plain GrpcBackend beside it
            _same_cases(r["runs"][0], r["plain"])
        assert r["threads"] == ["MainThread"], r["threads"]


@pytest.mark.timeout(150)
def test_co_located_member_killed_mid_collective(reaper: ProcessReaper, tmp_path: Path) -> None:
    """Hosts h0 = {0, 2}, h1 = {1, 3}; rank 1 (h1's lowest rank, whose store h1 met through) is
    SIGKILLed while the others are inside a reduce-scatter. Its co-located member fails with PeerLost;
    the other host's members with PeerLost or at the call's timeout; none hangs or leaks a thread."""
    victim = 1
    procs = _spawn(reaper, tmp_path, "h0,h1,h0,h1", "kill", str(victim))
    deadline = time.monotonic() + 90
    while not all((tmp_path / f"waiting.{r}").exists() for r in range(4)):
        for proc in procs:
            assert proc.poll() is None, f"peer exited early with {proc.returncode}"
        assert time.monotonic() < deadline, "peers did not reach the collective"
        time.sleep(0.01)
    time.sleep(0.3)  # the survivors are inside the collective
    os.killpg(procs[victim].pid, signal.SIGKILL)
    procs[victim].wait(10)
    survivors = [0, 2, 3]
    results = {r["rank"]: r for r in _results(procs, tmp_path, survivors, KILL_TIMEOUT + 60)}
    assert results[3]["error"] == "PeerLost", results[3]
    for r in results.values():
        assert r["error"] in ("PeerLost", "CollectiveTimeout"), r
        assert r["elapsed"] < KILL_TIMEOUT + 2, r
        assert r["close_s"] < KILL_TIMEOUT + 2, r
        assert r["threads"] == ["MainThread"], r
