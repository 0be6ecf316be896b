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

from communication.backend import CODECS, Codec, CollectiveBackend, UnitSpec, barrier
from communication.errors import Cancelled, CollectiveTimeout, CommError
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
    if compression != "none":
        sizes += [int8_boundary_numel(block), int8_boundary_numel(block, 1), block - 1, block + 1]
    return sizes


def case_codecs(compression: str, n_cases: int) -> list[Codec]:
    """The codec of each case: all "none", all "int8", or ("mixed") int8 and raw units alternating in
    one plan, every call naming its own."""
    if compression == "mixed":
        return ["int8" if case % 2 == 0 else "none" for case in range(n_cases)]
    return [next(c for c in CODECS if c == compression)] * n_cases


def payload_bytes(numel: int, codec: str, block: int) -> int:
    """Bytes of one shard of `numel` fp32 values on the gRPC wire in `codec`."""
    return 4 * numel if codec == "none" else numel + 4 * -(-numel // block)


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
    """all_gather then reduce_scatter for every size; a step and a unit per case (the declared plan, each
    unit in its case's codec: `case_codecs`); commit after each."""
    world, rank = group.world_size, group.rank
    results: list[dict[str, Any]] = []
    sizes = case_sizes(compression, block)
    codecs = case_codecs(compression, len(sizes))
    backend.set_plan(group, {u: UnitSpec(n, c) for u, (n, c) in enumerate(zip(sizes, codecs, strict=True))})
    for case, (numel, codec) in enumerate(zip(sizes, codecs, strict=True)):
        step, unit = case, case
        shards = [_data(case, r, numel) for r in range(world)]
        out = torch.full((world * numel,), float("nan"))
        backend.all_gather(group, step, unit, shards[rank], out, timeout, codec=codec).result(timeout + 5)
        expected = torch.cat(shards)
        fulls = [_data(case + 500, r, world * numel) for r in range(world)]
        reduced = torch.full((numel,), float("nan"))
        backend.reduce_scatter(group, step, unit, fulls[rank], reduced, timeout, codec=codec).result(
            timeout + 5
        )
        parts = [fulls[r][rank * numel : (rank + 1) * numel] for r in range(world)]
        want = parts[0].clone()
        for r in range(1, world):
            want.add_(parts[r])
        backend.release(group, step)
        results.append(
            {
                "numel": numel,
                "codec": codec,
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


def check_results(
    per_rank: list[dict[str, Any]], compression: str, exact_reduce: bool = True, int8_exact: bool = False
) -> None:
    """Assertions shared by every backend (called by the tests on all ranks' results), each case by its
    own codec. Without `exact_reduce` (another fixed summation order), raw reductions need only be within
    `rounding_bound` of the rank-order sum. With `int8_exact` (a lane that serves int8 calls raw), int8
    cases are held to the raw cases' standard."""
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
            if c["codec"] == "none" or int8_exact:
                assert c["gather_exact"], c
                assert c["reduce_exact"] if exact_reduce else c["reduce_units"] <= rounding_bound(world), c
            else:
                assert c["gather_rel_err"] < 0.01, c
                assert c["reduce_rel_err"] < 0.03, c
    if compression == "none":
        # raw fp32: every byte of every shard except one's own crossed the wire exactly once per peer
        # and in a symmetric pattern every rank receives what it sends (the exact counts: per lane)
        for r in per_rank:
            assert r["bytes_received"] == r["bytes_sent"] > 0, r


def control_values(case: int, rank: int) -> torch.Tensor:
    """The control values rank `rank` passes in exchange case `case`: int64 at both ends of its range and
    past 2**53 (no float carries them), float64 with NaN payloads, infinities, -0.0 and subnormals, and
    a float64 exchange one value past a 1 MiB chunk."""
    if case == 0:
        return torch.tensor([rank, -(2**63), 2**63 - 1, 2**62 + rank, 2**53 + 1], dtype=torch.int64)
    if case == 1:
        bits = torch.tensor(
            [0x7FF8_0000_DEAD_0000 + rank, 0x7FF0_0000_0000_0000, 1, -(2**63)], dtype=torch.int64
        )
        return torch.cat(
            [bits.view(torch.float64), torch.tensor([1 / 3 + rank, 5e-324], dtype=torch.float64)]
        )
    return torch.arange(CHUNK // 8 + 1, dtype=torch.float64) * (rank + 1) + 0.5


def run_control_cases(backend: CollectiveBackend, group: PeerGroup, timeout: float = 30.0) -> dict[str, Any]:
    """The exact exchange: three exchanges (`control_values`) and a barrier, each under its own key; then
    what a lane must refuse (values that are not int64 or float64, a key out of range, a matrix)."""
    world, rank = group.world_size, group.rank
    exact = []
    for case in range(3):
        got = backend.exchange(control_values(case, rank), group=group, key=10 + case, timeout=timeout).wait(
            timeout + 5
        )
        want = torch.stack([control_values(case, r) for r in range(world)])
        exact.append(
            got.dtype == want.dtype
            and tuple(got.shape) == (world, want.shape[1])
            and bool(torch.equal(got.view(torch.int64), want.view(torch.int64)))  # bit for bit, NaNs too
        )
    barrier(backend, group=group, key=20, timeout=timeout).wait(timeout + 5)
    refused = []
    for bad, key in (
        (torch.ones(3), 21),
        (torch.ones(3, dtype=torch.int32), 21),
        (torch.ones(2, 2, dtype=torch.int64), 21),
        (torch.ones(1, dtype=torch.int64), -1),
        (torch.ones(1, dtype=torch.int64), 1 << 31),
    ):
        try:
            backend.exchange(bad, group=group, key=key, timeout=timeout)
            refused.append(False)
        except ValueError:
            refused.append(True)
    return {"rank": rank, "exact": exact, "refused": refused}


def check_control(per_rank: list[dict[str, Any]]) -> None:
    """Every exchange arrived bit for bit on every rank, in rank order; every bad call was refused."""
    assert sorted(r["rank"] for r in per_rank) == list(range(len(per_rank)))
    for r in per_rank:
        assert r["exact"] == [True, True, True], r
        assert all(r["refused"]), r


LONE_TIMEOUT = 0.5  # the timeout of the exchange no peer joins (run_contract_cases)


def _outcome(call: Any, timeout: float) -> str:
    """How a call ends: "ok", the name of its CommError, or "ValueError" if it is refused at the call."""
    try:
        call().wait(timeout)
    except ValueError:
        return "ValueError"
    except CommError as exc:
        return type(exc).__name__
    return "ok"


def run_contract_cases(
    backend: CollectiveBackend,
    group: PeerGroup,
    older: PeerGroup,
    timeout: float = 30.0,
    *,
    lone: bool = True,
) -> dict[str, Any]:
    """What every lane refuses or fails, the same way: calls off the declared plan (a unit it does not
    have, another numel, another codec) fail with InvalidMessage; calls that name an older epoch's group
    once `group` is installed fail with EpochChanged; and last, on rank 0 alone (it leaves a lane that
    runs calls in call order with a failed group: call it at the end of a run), an exchange no peer joins
    fails with CollectiveTimeout within its timeout (with `lone`: the case does not depend on the world
    size, so a test runs it at one size). The members meet at a barrier of `group` first."""
    world, rank = group.world_size, group.rank
    n = 4
    backend.set_plan(group, {0: UnitSpec(n)})
    # every member meets in the epoch first (a lane that forms its group at the first call has formed it)
    barrier(backend, group=group, key=903, timeout=timeout).wait(timeout + 5)
    out = torch.empty(world * n)
    off_plan = {
        "unit": _outcome(lambda: backend.all_gather(group, 900, 5, torch.ones(n), out, timeout), 10),
        "numel": _outcome(
            lambda: backend.all_gather(
                group, 900, 0, torch.ones(n - 1), torch.empty(world * (n - 1)), timeout
            ),
            10,
        ),
        "codec": _outcome(
            lambda: backend.all_gather(group, 900, 0, torch.ones(n), out, timeout, codec="int8"), 10
        ),
    }
    peer = (rank + 1) % world
    stale = {
        "all_gather": _outcome(lambda: backend.all_gather(older, 901, 0, torch.ones(n), out, timeout), 10),
        "reduce_scatter": _outcome(
            lambda: backend.reduce_scatter(older, 901, 0, torch.ones(world * n), torch.empty(n), timeout), 10
        ),
        "exchange": _outcome(
            lambda: backend.exchange(torch.ones(1, dtype=torch.int64), group=older, key=901, timeout=timeout),
            10,
        ),
        "send": _outcome(
            lambda: backend.send(torch.ones(2), group=older, dest=peer, key=901, timeout=timeout), 10
        ),
    }
    result: dict[str, Any] = {"rank": rank, "off_plan": off_plan, "stale": stale}
    if not lone:
        return result
    if rank != 0:  # alive, and in no call, while rank 0's exchange waits for it (a peer gone is PeerLost)
        time.sleep(LONE_TIMEOUT + 1.5)
    else:
        began = time.monotonic()
        lone = backend.exchange(torch.ones(1, dtype=torch.int64), group=group, key=902, timeout=LONE_TIMEOUT)
        try:
            lone.wait(30)
            result["lone"] = "ok"
        except CollectiveTimeout:
            result["lone"] = "CollectiveTimeout"
        except CommError as exc:
            result["lone"] = type(exc).__name__
        result["lone_s"] = time.monotonic() - began
    return result


def check_contract(per_rank: list[dict[str, Any]], *, lone: bool = True) -> None:
    for r in per_rank:
        assert r["off_plan"] == dict.fromkeys(("unit", "numel", "codec"), "InvalidMessage"), r
        assert r["stale"] == dict.fromkeys(
            ("all_gather", "reduce_scatter", "exchange", "send"), "EpochChanged"
        ), r
        assert ("lone" in r) == (lone and r["rank"] == 0), r
        if "lone" in r:
            assert r["lone"] == "CollectiveTimeout" and LONE_TIMEOUT <= r["lone_s"] < LONE_TIMEOUT + 5.0, r


def p2p_sizes(world: int) -> dict[tuple[int, int], int]:
    """The numel of the message from a to b: one value, a few, one past a 1 MiB chunk."""
    sizes = [1, 1000, CHUNK // 4 + 1]
    return {(a, b): sizes[(a * world + b) % len(sizes)] for a in range(world) for b in range(world) if a != b}


def run_p2p_cases(
    backend: CollectiveBackend, group: PeerGroup, timeout: float = 30.0, *, in_call_order: bool = False
) -> dict[str, Any]:
    """Point-to-point between every ordered pair of ranks. "scheduled": the pairs in one global order,
    every rank posting its sends and receives in that order (what a lane that runs calls in call order
    needs). Unless `in_call_order`, also "held": every rank sends to every peer and waits for its sends
    (the messages wait at their receivers), then receives; and "cancelled": a receive nobody sends to,
    cancelled, fails with Cancelled."""
    world, rank = group.world_size, group.rank
    sizes = p2p_sizes(world)

    def data(a: int, b: int, key: int) -> torch.Tensor:
        return _data(700 + key, a * world + b, sizes[(a, b)])

    def exchange(key: int, sends_first: bool) -> list[bool]:
        sends, recvs = [], []
        got = {a: torch.full((sizes[(a, rank)],), float("nan")) for a in range(world) if a != rank}
        for a, b in sorted(sizes):  # the global order
            if a == rank:
                sends.append(backend.send(data(a, b, key), group=group, dest=b, key=key, timeout=timeout))
            elif b == rank and not sends_first:
                recvs.append(backend.recv(got[a], group=group, src=a, key=key, timeout=timeout))
        if sends_first:
            for h in sends:
                h.wait(timeout + 5)
            recvs = [backend.recv(got[a], group=group, src=a, key=key, timeout=timeout) for a in sorted(got)]
        for h in [*sends, *recvs]:
            h.wait(timeout + 5)
        return [bool(torch.equal(got[a], data(a, rank, key))) for a in sorted(got)]

    result: dict[str, Any] = {"rank": rank, "scheduled": exchange(1, sends_first=False)}
    if not in_call_order:
        result["held"] = exchange(2, sends_first=True)
        pending = backend.recv(torch.empty(3), group=group, src=(rank + 1) % world, key=99, timeout=timeout)
        cancelled = pending.cancel()
        try:
            pending.wait(timeout)
            outcome = "completed"
        except Cancelled:
            outcome = "Cancelled"
        except CommError as exc:
            outcome = type(exc).__name__
        result["cancelled"] = {"accepted": cancelled, "outcome": outcome, "cancel_again": pending.cancel()}
    return result


def check_p2p(per_rank: list[dict[str, Any]], in_call_order: bool = False) -> None:
    """Every message arrived bit for bit; a cancelled receive failed with Cancelled."""
    for r in per_rank:
        assert r["scheduled"] and all(r["scheduled"]), r
        if not in_call_order:
            assert r["held"] and all(r["held"]), r
            assert r["cancelled"] == {"accepted": True, "outcome": "Cancelled", "cancel_again": False}, r
