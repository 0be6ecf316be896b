"""The conformance cases every CollectiveBackend must pass, shared by the in-process fake run and the
multi-process gRPC run (tests/integration/wire_peer.py), the torch.distributed lane's
(tests/integration/torchdist_peer.py) and the hierarchical backend's (tests/integration/hier_peer.py).

Each rank calls `run_cases` with its backend and group; the data of every rank is derived from
(case, rank) alone, so each rank computes the expected results itself. Results are a JSON-able dict.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import torch

from communication.backend import CollectiveBackend
from communication.group import PeerGroup
from tests.conftest import ProcessReaper

CHUNK = 1 << 20
REPO = Path(__file__).resolve().parents[2]


def spawn_peers(
    reaper: ProcessReaper, tmp_path: Path, world: int, scenario: str, *extra: str
) -> list[subprocess.Popen[bytes]]:
    """Start one `tests.integration.wire_peer` process per rank of `world`, each running `scenario`; they
    meet through files in `tmp_path` and are killed by the reaper at teardown."""
    peer = [sys.executable, "-m", "tests.integration.wire_peer", str(tmp_path)]
    return [reaper.spawn([*peer, str(r), str(world), scenario, *extra], cwd=REPO) for r in range(world)]


def spawn_torchdist(
    reaper: ProcessReaper, tmp_path: Path, world: int, scenario: str, *rdv: str
) -> list[subprocess.Popen[bytes]]:
    """Start one `tests.integration.torchdist_peer` per rank; `rdv`: the rendezvous of each epoch."""
    peer = [sys.executable, "-m", "tests.integration.torchdist_peer", str(tmp_path)]
    return [reaper.spawn([*peer, str(r), str(world), scenario, *rdv], cwd=REPO) for r in range(world)]


def torchdist_results(
    procs: list[subprocess.Popen[bytes]], tmp_path: Path, ranks: range, limit: float
) -> list[Any]:
    """Wait for `ranks` to exit cleanly and read their results."""
    deadline = time.monotonic() + limit
    for r in ranks:
        assert procs[r].wait(timeout=max(1.0, deadline - time.monotonic())) == 0
    return [json.loads((tmp_path / f"result.{r}.json").read_text()) for r in ranks]


def int8_boundary_numel(block: int, extra: int = 0) -> int:
    """The numel whose int8 payload (4 bytes per block + 1 per value) is exactly 1 MiB (+extra)."""
    for nb in range(1, CHUNK):
        n = CHUNK - 4 * nb
        if -(-n // block) == nb:
            return n + extra
    raise AssertionError("no boundary size")


def case_sizes(compression: str, block: int) -> list[int]:
    # the last one is large enough to be fetched as parallel striped streams
    sizes = [1, 7, 1000, 12_345, CHUNK // 4, CHUNK // 4 + 1, 3 * CHUNK // 4 + 3, 5 * CHUNK // 4 + 1]
    if compression == "int8":
        sizes += [int8_boundary_numel(block), int8_boundary_numel(block, 1), block - 1, block + 1]
    return sizes


def _data(case: int, rank: int, numel: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * case + rank)
    return torch.randn(numel, generator=gen)


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


def rounding_bound(world: int) -> float:
    """The tolerance of a sum in another fixed order than rank order, in units of 2^-24 * sum_r |x_r|
    per value: each order's fp32 error is at most (world - 1) of them (to first order), so two orders
    differ by at most twice that; 0.1% covers the second-order term."""
    return 2 * (world - 1) * 1.001


def rounding_units(reduced: torch.Tensor, want: torch.Tensor, parts: list[torch.Tensor]) -> float:
    """max |reduced - want| / (2^-24 * sum_r |part_r|) over the values (float64)."""
    scale = torch.stack([p.double().abs() for p in parts]).sum(0) * 2.0**-24
    return float(((reduced.double() - want.double()).abs() / scale.clamp_min(1e-300)).max())


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    denom = float(b.norm())
    return float((a - b).norm()) / (denom if denom > 0 else 1.0)


def run_cases(
    backend: CollectiveBackend, group: PeerGroup, compression: str, block: int, timeout: float = 30.0
) -> dict[str, Any]:
    """all_gather then reduce_scatter for every size; a step and a unit per case (the declared plan);
    commit after each."""
    world, rank = group.world_size, group.rank
    results: list[dict[str, Any]] = []
    sizes = case_sizes(compression, block)
    backend.set_plan(group, dict(enumerate(sizes)))
    for case, numel in enumerate(sizes):
        step, unit = case, case
        shards = [_data(case, r, numel) for r in range(world)]
        out = torch.full((world * numel,), float("nan"))
        backend.all_gather(group, step, unit, shards[rank], out, timeout).result(timeout + 5)
        expected = torch.cat(shards)
        fulls = [_data(case + 500, r, world * numel) for r in range(world)]
        reduced = torch.full((numel,), float("nan"))
        backend.reduce_scatter(group, step, unit, fulls[rank], reduced, timeout).result(timeout + 5)
        parts = [fulls[r][rank * numel : (rank + 1) * numel] for r in range(world)]
        want = parts[0].clone()
        for r in range(1, world):
            want.add_(parts[r])
        backend.commit(group, step)
        results.append(
            {
                "numel": numel,
                "gather_exact": bool(torch.equal(out, expected)),
                "gather_own_exact": bool(torch.equal(out[rank * numel : (rank + 1) * numel], shards[rank])),
                "gather_rel_err": rel_err(out, expected),
                "gather_finite": bool(torch.isfinite(out).all()),
                "gather_digest": digest(out),
                "reduce_exact": bool(torch.equal(reduced, want)),
                "reduce_rel_err": rel_err(reduced, want),
                "reduce_units": rounding_units(reduced, want, parts),
                "reduce_crc": zlib.crc32(reduced.numpy().tobytes()),
            }
        )
    stats = backend.stats()
    return {
        "rank": rank,
        "cases": results,
        "bytes_sent": stats.bytes_sent,
        "bytes_received": stats.bytes_received,
    }


def check_results(per_rank: list[dict[str, Any]], compression: str, exact_reduce: bool = True) -> None:
    """Assertions shared by every backend (called by the tests on all ranks' results). Without
    `exact_reduce` (another fixed summation order), raw reductions need only be within
    `rounding_bound` of the rank-order sum."""
    world = len(per_rank)
    assert sorted(r["rank"] for r in per_rank) == list(range(world))
    n_cases = len(per_rank[0]["cases"])
    for i in range(n_cases):
        cases = [r["cases"][i] for r in per_rank]
        numel = cases[0]["numel"]
        # Every rank sees the very same gathered tensor.
        assert len({c["gather_digest"] for c in cases}) == 1, f"ranks disagree on all_gather of {numel}"
        for c in cases:
            assert c["gather_finite"], c
            if compression == "none":
                assert c["gather_exact"], c
                assert c["reduce_exact"] if exact_reduce else c["reduce_units"] <= rounding_bound(world), c
            else:
                assert c["gather_rel_err"] < 0.01, c
                assert c["reduce_rel_err"] < 0.03, c
    if compression == "none":
        # raw fp32: every byte of every shard except one's own crossed the wire exactly once per peer
        for r in per_rank:
            assert r["bytes_received"] >= 0
