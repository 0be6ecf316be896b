"""The torch.distributed lane's NCCL path on the CPU: the real TorchDistBackend (dispatcher, deadline
watcher, handles) over stand-ins for the GPU's streams and events and for ProcessGroupNCCL
(tests/unit/communication/nccl_standins.py). What needs CUDA itself runs in tests/gpu/test_nccl_lane.py."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import pytest
import torch

from communication.errors import CollectiveTimeout, EpochChanged, PeerLost
from communication.group import PeerGroup
from communication.nccl_group import ASYNC_ERROR_HANDLING, library_timeout, prepare_environment
from communication.torchdist import TorchDistBackend
from tests.unit.communication.nccl_standins import RENDEZVOUS, StandInLane

pytestmark = pytest.mark.timeout(30)
SLACK_S = 0.5  # a loaded shared CPU may delay the watcher this much


def _group(epoch: int) -> PeerGroup:
    return PeerGroup("job", epoch, 0, ("127.0.0.1:9",))


def _lane(**kw: Any) -> StandInLane:
    kw.setdefault("collective_timeout", 10.0)
    kw.setdefault("rendezvous_timeout", 5.0)
    return StandInLane(**kw)


def _lane_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(("torchdist", "nccl-watch"))]


def _wait_for(cond: Any, limit: float = 5.0) -> None:
    deadline = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


def test_a_collective_that_never_completes_times_out_aborts_once_and_the_next_epoch_forms() -> None:
    lane = _lane()
    try:
        lane.set_group(_group(1), RENDEZVOUS)
        lane.fake_streams.stuck.set()  # the peer never comes: the event after the gather never passes
        t0 = time.monotonic()
        first = lane.all_gather(_group(1), 0, 0, torch.ones(3), torch.empty(3), 0.4)
        behind = lane.reduce_scatter(_group(1), 0, 0, torch.ones(3), torch.empty(3), 5.0)
        with pytest.raises(CollectiveTimeout):
            first.wait(5)
        elapsed = time.monotonic() - t0
        assert 0.4 <= elapsed < 0.4 + SLACK_S, elapsed
        with pytest.raises(CollectiveTimeout):  # the call behind it fails with it, not at its deadline
            behind.wait(1)
        old = lane.groups[0]
        _wait_for(lambda: len(old.aborts) == 1)
        time.sleep(0.05)
        assert len(old.aborts) == 1 and isinstance(old.aborts[0], CollectiveTimeout), old.aborts
        assert old.shutdowns == 0
        # the next epoch's group forms fresh and works
        lane.fake_streams.stuck.clear()
        lane.set_group(_group(2), RENDEZVOUS)
        shard = torch.tensor([1.0, 2.0])
        out = lane.all_gather(_group(2), 0, 0, shard, torch.empty(2), 5.0).wait(5)
        assert torch.equal(out, shard) and len(lane.groups) == 2 and lane.groups[1].aborts == []
    finally:
        lane.close()
    assert _lane_threads() == [], "close() joins the dispatcher, the watcher and the aborts"


def test_a_peer_lost_mid_collective_is_peer_lost_and_aborts_once() -> None:
    lane = _lane()
    try:
        lane.set_group(_group(1), RENDEZVOUS)
        lane.all_gather(_group(1), 0, 0, torch.ones(2), torch.empty(2), 5.0).wait(5)  # formed, healthy
        pg = lane.groups[0]
        pg.fail_next = RuntimeError("NCCL error: remote process exited or there was a network error")
        lane.fake_streams.stuck.set()  # its kernel would spin: only the library's report ends it
        call = lane.all_gather(_group(1), 1, 0, torch.ones(2), torch.empty(2), 5.0)
        with pytest.raises(PeerLost, match="remote process exited"):
            call.wait(2)
        _wait_for(lambda: len(pg.aborts) == 1)
        assert isinstance(pg.aborts[0], PeerLost)
    finally:
        lane.close()


def test_an_epoch_change_fails_the_calls_in_flight_with_epoch_changed_and_aborts_once() -> None:
    lane = _lane()
    try:
        lane.set_group(_group(1), RENDEZVOUS)
        lane.fake_streams.stuck.set()
        in_flight = lane.all_gather(_group(1), 0, 0, torch.ones(2), torch.empty(2), 10.0)
        _wait_for(lambda: lane._watch.in_flight == 1)  # issued, watched
        t0 = time.monotonic()
        lane.set_epoch(2)
        with pytest.raises(EpochChanged):
            in_flight.wait(2)
        assert time.monotonic() - t0 < SLACK_S
        old = lane.groups[0]
        _wait_for(lambda: len(old.aborts) == 1)
        time.sleep(0.05)
        assert len(old.aborts) == 1 and isinstance(old.aborts[0], EpochChanged) and old.shutdowns == 0
        assert lane._watch.in_flight == 0
    finally:
        lane.close()


def test_an_idle_group_of_an_old_epoch_is_shut_down_not_aborted() -> None:
    lane = _lane()
    try:
        lane.set_group(_group(1), RENDEZVOUS)
        lane.all_gather(_group(1), 0, 0, torch.ones(2), torch.empty(2), 5.0).wait(5)
        lane.set_group(_group(2), RENDEZVOUS)  # a clean epoch change (a join): nothing in flight
        old = lane.groups[0]
        _wait_for(lambda: old.shutdowns == 1)
        lane.all_gather(_group(2), 0, 0, torch.ones(2), torch.empty(2), 5.0).wait(5)
        assert old.aborts == []
    finally:
        lane.close()
    new = lane.groups[1]
    assert new.shutdowns == 1 and new.aborts == [], "close() ends a healthy idle group cleanly"
    assert _lane_threads() == []


def test_device_handles_order_the_consumer_stream_without_waiting_on_the_host() -> None:
    lane = _lane()
    streams = lane.fake_streams
    try:
        lane.set_group(_group(1), RENDEZVOUS)
        lane.all_gather(_group(1), 0, 0, torch.ones(2), torch.empty(2), 5.0).wait(5)
        streams.stuck.set()  # the device has not got to the gather yet
        shard, out = torch.tensor([4.0, 5.0]), torch.empty(2)
        handle = lane.all_gather(_group(1), 1, 0, shard, out, 5.0)
        compute = object()  # the consumer's stream
        assert handle.order_after(compute, 5.0) is True  # ordered on the device: no host wait
        assert not handle.done()
        token, stream = streams.orders[-1]
        assert stream is compute and token in streams.never  # the wait is on the gather's own event
        kind, mark = streams.issued[-1]
        assert kind == "gather" and mark == streams.marks[-1]  # issued after the caller's mark
        reduce = lane.reduce_scatter(_group(1), 1, 0, torch.ones(2), torch.empty(2), 5.0)
        _wait_for(lambda: len(streams.issued) == 3)
        assert streams.issued[-1][0] == "reduce"
        streams.never.clear()  # the device gets there
        assert torch.equal(handle.wait(5), shard) and reduce.wait(5) is not None
        _wait_for(lambda: token in streams.retired)
    finally:
        lane.close()
    assert set(streams.marks) <= streams.collected, "every mark was destroyed by its own thread"


def test_host_results_and_buffers_wait_for_the_call_to_complete_and_a_failed_call_keeps_them() -> None:
    """`out` in another dtype goes through a staging buffer of the lane: copied into host memory, and the
    buffer given back, only once the call completed; after a failure never (the library may still write
    it)."""
    lane = _lane()
    streams, pool = lane.fake_streams, lane._buffers
    try:
        lane.set_group(_group(1), RENDEZVOUS)
        streams.stuck.set()
        shard = torch.tensor([1.0, 2.0, 3.0])
        out = torch.zeros(3, dtype=torch.float64)
        handle = lane.all_gather(_group(1), 0, 0, shard, out, 5.0)
        _wait_for(lambda: lane._watch.in_flight == 1)
        assert streams.host_copies == 0 and not handle.done() and pool._held == 0
        assert torch.equal(out, torch.zeros(3, dtype=torch.float64))
        streams.never.clear()
        assert handle.wait(5) is out and torch.equal(out, shard.double())
        assert streams.host_copies == 1 and pool._held == 4 * 3  # given back, after the copy
        held = pool._held
        lane.set_group(_group(2), RENDEZVOUS)
        streams.stuck.set()
        late = lane.all_gather(_group(2), 0, 0, shard, torch.zeros(3, dtype=torch.float64), 0.2)
        with pytest.raises(CollectiveTimeout):
            late.wait(5)
        assert streams.host_copies == 1 and pool._held == held - 4 * 3  # taken, never given back
    finally:
        lane.close()


def test_a_device_failure_under_a_completed_call_fails_its_group() -> None:
    lane = _lane()
    try:
        lane.set_group(_group(1), RENDEZVOUS)
        lane.fake_streams.copy_error = RuntimeError("CUDA error: an illegal memory access was encountered")
        out = torch.zeros(2, dtype=torch.float64)  # copied into host memory once the call completed
        with pytest.raises(PeerLost, match="illegal memory access"):
            lane.all_gather(_group(1), 0, 0, torch.ones(2), out, 5.0).wait(5)
        pg = lane.groups[0]
        _wait_for(lambda: len(pg.aborts) == 1)
        with pytest.raises(PeerLost):  # the group is failed: later calls fail with its error
            lane.all_gather(_group(1), 1, 0, torch.ones(2), torch.empty(2), 5.0).wait(5)
    finally:
        lane.close()


@pytest.mark.parametrize("reduce", ["ordered", "native"])
def test_the_reduce_scatter_the_job_asks_for(reduce: str) -> None:
    lane = _lane(reduce=reduce)
    try:
        lane.set_group(_group(1), RENDEZVOUS)
        full = torch.tensor([1.5, -2.0, 3.25])
        out = lane.reduce_scatter(_group(1), 0, 0, full, torch.empty(3), 5.0).wait(5)
        assert torch.equal(out, full)
        assert lane.groups[0].calls == ["alltoall" if reduce == "ordered" else "reduce_scatter"]
    finally:
        lane.close()


def test_reduce_modes_are_checked() -> None:
    with pytest.raises(ValueError, match="ordered, native"):
        TorchDistBackend(reduce="fast")


def test_the_library_never_ends_the_process_and_its_timeout_comes_after_the_lanes() -> None:
    env: dict[str, str] = {}
    prepare_environment(75.0, env)
    assert env[ASYNC_ERROR_HANDLING] == "2"
    assert env["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "0" and env["TORCH_NCCL_ENABLE_MONITORING"] == "0"
    assert env["TORCH_NCCL_NONBLOCKING_TIMEOUT"] == "75"
    for teardown in ("1", "3"):  # values that let the watchdog end the process are replaced
        env = {ASYNC_ERROR_HANDLING: teardown, "TORCH_NCCL_ENABLE_MONITORING": "1"}
        prepare_environment(75.0, env)
        assert env[ASYNC_ERROR_HANDLING] == "2" and env["TORCH_NCCL_ENABLE_MONITORING"] == "1"
    env = {ASYNC_ERROR_HANDLING: "0"}  # no handling keeps the process alive too
    prepare_environment(75.0, env)
    assert env[ASYNC_ERROR_HANDLING] == "0"
    assert ASYNC_ERROR_HANDLING not in os.environ or os.environ[ASYNC_ERROR_HANDLING] != "3"
    for deadline in (0.5, 30.0, 600.0):
        assert library_timeout(deadline) > deadline + 10


def test_the_jobs_nccl_reduce_reaches_the_workers_local_lane() -> None:
    from jobspec import InvalidJob, make_job
    from worker.identity import WorkerConfig
    from worker.lanes import default_backend_factory

    assert make_job({}).nccl_reduce == "ordered"  # deterministic unless asked
    with pytest.raises(InvalidJob, match="--nccl-reduce"):
        make_job({"nccl_reduce": "fast"})
    import argparse

    from zerowire.commands import run

    parser = argparse.ArgumentParser()
    run.add_parser(parser.add_subparsers())
    args = parser.parse_args(["run", "--output", "o", "--workers", "2", "--nccl-reduce", "native"])
    values = run._job_values(args)
    assert values["nccl_reduce"] == "native"
    cfg = WorkerConfig(coordinator="http://unused", worker_id="w")
    lane = default_backend_factory(make_job(values), "token", cfg=cfg)
    try:
        assert lane.local.reduce == "native"  # type: ignore[attr-defined]
    finally:
        lane.close()
