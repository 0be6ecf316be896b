"""One conformance harness, run against the in-process fake and against real gRPC between real
processes on loopback: 2, 3 and 4 peers, uneven sizes, sizes at a 1 MiB chunk boundary and one past
it, raw float32, int8 and both in one plan (each call naming its codec); and against the torch.distributed
lane (gloo) at 2 and 3 peers, raw float32 (int8 calls served raw). The same point-to-point cases run on
all three (on the torch.distributed lane only those posted in one call order), and the same exact
control exchanges (int64 and float64, bit for bit, and a barrier) and the same failures (off-plan calls,
calls of an older epoch, an exchange no peer joins); tests/integration/test_hierarchical.py runs the harness
on the hierarchical lane."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from communication.group import PeerGroup
from communication.testing import FakeHub
from tests.conftest import ProcessReaper, free_port
from tests.integration.wire_harness import (
    case_codecs,
    check_contract,
    check_control,
    check_p2p,
    check_results,
    payload_bytes,
    run_cases,
    run_contract_cases,
    run_control_cases,
    run_p2p_cases,
    spawn_peers,
    spawn_torchdist,
    torchdist_results,
)


def run_peers(reaper: ProcessReaper, tmp_path: Path, world: int, scenario: str, *extra: str) -> list[Any]:
    procs = spawn_peers(reaper, tmp_path, world, scenario, *extra)
    deadline = time.monotonic() + 90
    for proc in procs:
        assert proc.wait(timeout=max(1.0, deadline - time.monotonic())) == 0
    return [json.loads((tmp_path / f"result.{r}.json").read_text()) for r in range(world)]


@pytest.mark.parametrize("world", [2, 3, 4])
def test_fake_backend_conformance(world: int) -> None:
    hub = FakeHub(world)
    addresses = tuple(f"fake:{r}" for r in range(world))

    def rank_main(rank: int) -> dict[str, Any]:
        backend = hub.backend(rank)
        group = PeerGroup("job-test", 1, rank, addresses)
        backend.set_group(group)
        try:
            raw = run_cases(backend, group, "none", 1024, timeout=20)
            second = PeerGroup("job-test", 2, rank, addresses)
            backend.set_group(second)
            mixed = run_cases(backend, second, "mixed", 1024, timeout=20)
            control = run_control_cases(backend, second, timeout=20)
            p2p = run_p2p_cases(backend, second, timeout=20)
            contract = run_contract_cases(backend, second, group, timeout=20, lone=world == 2)
            return {"none": raw, "mixed": mixed, "p2p": p2p, "control": control, "contract": contract}
        finally:
            backend.close()

    with ThreadPoolExecutor(world) as pool:
        results = list(pool.map(rank_main, range(world)))
    check_results([r["none"] for r in results], "none")
    check_results([r["mixed"] for r in results], "mixed", int8_exact=True)  # the fake serves int8 raw
    check_p2p([r["p2p"] for r in results])
    check_control([r["control"] for r in results])
    check_contract([r["contract"] for r in results], lone=world == 2)


@pytest.mark.slow
@pytest.mark.timeout(100)
@pytest.mark.parametrize("world", [2, 3])  # even and uneven shards (the fake lane runs 4 too)
def test_grpc_backend_conformance(world: int, reaper: ProcessReaper, tmp_path: Path) -> None:
    results = run_peers(reaper, tmp_path, world, "conformance")
    check_results([r["none"] for r in results], "none")
    check_results([r["int8"] for r in results], "int8")
    check_results([r["mixed"] for r in results], "mixed")
    check_p2p([r["p2p"] for r in results])
    check_control([r["control"] for r in results])
    check_contract([r["contract"] for r in results], lone=world == 2)
    # raw float32: every peer's shard and every slice for a peer crossed the wire exactly once
    sizes = [c["numel"] for c in results[0]["none"]["cases"]]
    expected = sum(4 * n * (world - 1) * 2 for n in sizes)
    int8_sizes = [c["numel"] for c in results[0]["int8"]["cases"]]
    fp32_equivalent = sum(4 * n * (world - 1) * 2 for n in int8_sizes)
    # mixed: each call's bytes are its own codec's payload
    cases = results[0]["mixed"]["cases"]
    codecs = case_codecs("mixed", len(cases))
    assert [c["codec"] for c in cases] == codecs and {"none", "int8"} <= set(codecs)
    mixed = sum(2 * payload_bytes(c["numel"], c["codec"], 1024) * (world - 1) for c in cases)
    for r in results:
        assert r["none"]["bytes_received"] == expected
        assert r["none"]["bytes_sent"] == expected
        assert r["int8"]["bytes_sent"] < 0.26 * fp32_equivalent
        assert r["mixed"]["bytes_sent"] == r["mixed"]["bytes_received"] == mixed
        assert r["p2p"]["mailbox_bytes"] == 0  # every message received, the cancelled receive withdrawn


@pytest.mark.slow
@pytest.mark.timeout(150)
@pytest.mark.parametrize("world", [2, 3])
def test_torchdist_conformance(world: int, reaper: ProcessReaper, tmp_path: Path) -> None:
    rendezvous = (f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}")  # epochs 1 and 2
    procs = spawn_torchdist(reaper, tmp_path, world, "conformance", *rendezvous)
    results = torchdist_results(procs, tmp_path, range(world), 120)
    check_results(results, "none")
    check_results([r["mixed"] for r in results], "mixed", int8_exact=True)  # the local lane serves int8 raw
    check_p2p([r["p2p"] for r in results], in_call_order=True)
    check_control([r["control"] for r in results])
    check_contract([r["contract"] for r in results], lone=world == 2)
    sizes = [c["numel"] for c in results[0]["cases"]]
    expected = sum(4 * n * (world - 1) * 2 for n in sizes)
    for r in results:
        assert r["bytes_sent"] == expected and r["bytes_received"] == expected
        assert r["threads"] == ["MainThread"]
