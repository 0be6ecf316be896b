"""The torch.distributed lane (gloo on CPU) between real processes on loopback: a peer that dies
(SIGKILL) or stalls mid-collective, bad input, a group of one. Conformance: test_wire_conformance.py."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from communication.errors import CollectiveTimeout, EpochChanged
from communication.group import PeerGroup
from communication.torchdist import TorchDistBackend
from tests.conftest import ProcessReaper, free_port
from tests.integration.wire_harness import spawn_torchdist, torchdist_results


def _wait_files(paths: list[Path], limit: float) -> None:
    deadline = time.monotonic() + limit
    while not all(p.exists() for p in paths):
        assert time.monotonic() < deadline, f"not all of {paths} appeared"
        time.sleep(0.01)


@pytest.mark.slow
@pytest.mark.timeout(150)
@pytest.mark.parametrize("scenario", ["kill", "stall"])
def test_torchdist_peer_lost_or_epoch_change(scenario: str, reaper: ProcessReaper, tmp_path: Path) -> None:
    world = 3
    rdv = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    procs = spawn_torchdist(reaper, tmp_path, world, scenario, *rdv)
    _wait_files([tmp_path / f"waiting.{r}" for r in range(world)], 90)
    time.sleep(0.3)  # the survivors are inside the collective
    if scenario == "kill":
        os.killpg(procs[world - 1].pid, signal.SIGKILL)
    else:
        (tmp_path / "epoch").write_text("2")
    results = torchdist_results(procs, tmp_path, range(world - 1), 90)
    for r in results:
        if scenario == "kill":
            assert r["error"] == "PeerLost", r
            assert r["elapsed"] < 20, r  # within the collective timeout
        else:
            assert r["error"] == "EpochChanged", r
            assert r["since_epoch"] < 1.0, r
        assert r["next_gather_exact"] and r["next_reduce_exact"], r
        assert r["threads"] == ["MainThread"], r
        # kill: the old group ended with the peer; stall: it ends at the library's collective timeout (5 s)
        assert r["close_s"] < (2 if scenario == "kill" else 10), r
    if scenario == "stall":
        os.killpg(procs[world - 1].pid, signal.SIGKILL)


def test_bad_input_changes_nothing() -> None:
    backend = TorchDistBackend(collective_timeout=5, rendezvous_timeout=5)
    try:
        group = PeerGroup("job-test", 1, 0, ("a:1",))
        with pytest.raises(ValueError, match="host:port"):
            backend.set_group(group, "no-port")
        # nothing was installed: a call of the group fails at once
        fut = backend.all_gather(group, 0, 0, torch.ones(2), torch.empty(2), 5)
        with pytest.raises(EpochChanged):
            fut.result(5)
        with pytest.raises(ValueError, match="expected 2"):
            backend.all_gather(group, 0, 0, torch.ones(2), torch.empty(5), 5)
    finally:
        backend.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("torchdist")]


def test_single_rank_group_is_exact() -> None:
    backend = TorchDistBackend(collective_timeout=5, rendezvous_timeout=10)
    try:
        group = PeerGroup("job-test", 3, 0, ("a:1",))
        backend.set_group(group, f"127.0.0.1:{free_port()}")
        shard = torch.randn(5)
        out = torch.empty(5)
        assert torch.equal(backend.all_gather(group, 0, 0, shard, out, 5).result(10), shard)
        red = torch.empty(5)
        assert torch.equal(backend.reduce_scatter(group, 0, 0, shard, red, 5).result(10), shard)
        backend.set_epoch(4)
        with pytest.raises(EpochChanged):
            backend.all_gather(group, 1, 0, shard, out, 5).result(5)
    finally:
        backend.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("torchdist")]


@pytest.mark.timeout(60)
def test_silent_peer_times_out_and_close_returns() -> None:
    """Two ranks in one process: rank 1 calls, rank 0 never does. CollectiveTimeout at the call's
    timeout; close() returns within the library's own collective timeout (3 s)."""
    backends = [TorchDistBackend(collective_timeout=3, rendezvous_timeout=20) for _ in range(2)]
    rdv = f"127.0.0.1:{free_port()}"
    groups = [PeerGroup("job-test", 1, r, ("a:1", "a:2")) for r in range(2)]
    try:
        for backend, group in zip(backends, groups, strict=True):
            backend.set_group(group, rdv)
        shards = [torch.full((10,), float(r)) for r in range(2)]
        outs = [torch.empty(20) for _ in range(2)]
        futs = [
            b.all_gather(g, 0, 0, s, o, 10) for b, g, s, o in zip(backends, groups, shards, outs, strict=True)
        ]
        assert all(torch.equal(f.result(20), torch.cat(shards)) for f in futs)
        start = time.monotonic()
        fut = backends[1].all_gather(groups[1], 1, 0, shards[1], torch.empty(20), 0.5)
        with pytest.raises(CollectiveTimeout):
            fut.result(10)
        assert 0.4 < time.monotonic() - start < 2.5
        # the group is unusable now: a later call of its epoch fails at once with the same error
        with pytest.raises(CollectiveTimeout):
            backends[1].all_gather(groups[1], 2, 0, shards[1], torch.empty(20), 5).result(5)
    finally:
        began = time.monotonic()
        for backend in backends:
            backend.close()
        assert time.monotonic() - began < 10
    assert not [t for t in threading.enumerate() if t.name.startswith("torchdist")]


@pytest.mark.timeout(60)
def test_tensors_in_place_or_staged_give_the_same_bits() -> None:
    """Two ranks in one process. Contiguous float32 tensors are used by the library in place, others
    (strided views, another dtype) go through staging buffers: both give the exact rank-order results,
    and a call's inputs are left as they were."""
    backends = [TorchDistBackend(collective_timeout=10, rendezvous_timeout=20) for _ in range(2)]
    rdv = f"127.0.0.1:{free_port()}"
    groups = [PeerGroup("job-test", 1, r, ("a:1", "a:2")) for r in range(2)]
    gen = torch.Generator().manual_seed(7)
    shards = [torch.randn(6, generator=gen) for _ in range(2)]
    fulls = [torch.randn(12, generator=gen) for _ in range(2)]
    gathered = torch.cat(shards)
    reduced = [fulls[0][r * 6 : (r + 1) * 6] + fulls[1][r * 6 : (r + 1) * 6] for r in range(2)]
    try:
        for backend, group in zip(backends, groups, strict=True):
            backend.set_group(group, rdv)
        for layout in ("in place", "staged"):
            futs, outs = [], []
            for r, (b, g) in enumerate(zip(backends, groups, strict=True)):
                if layout == "in place":
                    shard, full = shards[r], fulls[r]
                    out, red = torch.empty(12), torch.empty(6)
                else:  # strided inputs and outputs, a float64 gradient
                    shard = torch.stack([shards[r], shards[r]], dim=1)[:, 0]
                    full = fulls[r].double()
                    out, red = torch.empty(12, 2)[:, 1], torch.empty(6, 3)[:, 2]
                    assert not (shard.is_contiguous() or out.is_contiguous() or red.is_contiguous())
                futs.append(b.all_gather(g, 0, 0, shard, out, 10))
                futs.append(b.reduce_scatter(g, 0, 1, full, red, 10))
                outs.append((out, red, shard.clone(), full.clone(), shard, full))
            for f in futs:
                f.result(20)
            for r, (out, red, shard_before, full_before, shard, full) in enumerate(outs):
                assert torch.equal(out, gathered), layout
                assert torch.equal(red, reduced[r]), layout
                assert torch.equal(shard, shard_before) and torch.equal(full, full_before), layout
    finally:
        for backend in backends:
            backend.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("torchdist")]
