"""A worker facing a wrong token, an unexpected job, an unreachable coordinator or a broken trainer says
so clearly, exits non-zero, and never leaves a heartbeat running behind a dead trainer."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from communication.errors import CollectiveTimeout, CommError, EpochChanged
from communication.group import PeerGroup
from communication.grpc_backend import GrpcBackend
from tests.conftest import ProcessReaper, free_port
from tests.integration.cluster_support import READ_TOKEN, TOKEN, get, start_coordinator, start_worker
from worker.daemon import WorkerDaemon
from worker.forming import Formed
from worker.identity import WorkerConfig

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]


def output(proc: Any, tmp: Path, name: str) -> str:
    return (tmp / f"{name}.log").read_text(errors="replace")


def test_wrong_token_unexpected_job_and_unreachable_coordinator(
    reaper: ProcessReaper, tmp_path: Path
) -> None:
    _, url = start_coordinator(reaper, tmp_path, "--steps", "5", "--warmup-steps", "0")
    wrong = start_worker(reaper, tmp_path, url, "wrong-token", token="not-the-token")
    other_job = start_worker(reaper, tmp_path, url, "other-job", "--expect-job-hash", "0123abcd")
    dead_port = free_port()  # nothing listens there
    unreachable = start_worker(reaper, tmp_path, f"http://127.0.0.1:{dead_port}", "unreachable")

    assert wrong.wait(30) == 2
    assert "rejected the cluster token" in output(wrong, tmp_path, "wrong-token")
    assert other_job.wait(30) == 3
    assert "job hash mismatch" in output(other_job, tmp_path, "other-job")
    assert "not the expected 0123abcd" in output(other_job, tmp_path, "other-job")
    assert unreachable.wait(30) == 2
    log = output(unreachable, tmp_path, "unreachable")
    assert f"coordinator http://127.0.0.1:{dead_port} unreachable" in log
    assert "Traceback" not in log
    # None of them joined: the coordinator knows no worker.
    assert get(url, "/workers")["workers"] == []


def test_a_worker_that_cannot_load_the_data_never_joins(reaper: ProcessReaper, tmp_path: Path) -> None:
    _, url = start_coordinator(
        reaper, tmp_path, "--steps", "5", "--warmup-steps", "0", "--dataset", "mnist:/nonexistent/mnist"
    )
    worker = start_worker(reaper, tmp_path, url, "w0")
    assert worker.wait(60) == 2  # a configuration error of this worker, found before it registers
    log = output(worker, tmp_path, "w0")
    assert "cannot load the job's data" in log and "does not exist" in log and "Traceback" not in log
    assert get(url, "/workers")["workers"] == []  # it never disturbed the cluster's membership


class RaisingTrainer:
    """Steps slowly, then fails with a bug (not a membership error)."""

    raised_at: float = 0.0

    def __init__(self, job: Any, group: PeerGroup, backend: Any, **kwargs: Any) -> None:
        self.group = group

    @staticmethod
    def prepare(job: Any, cfg: Any) -> None:
        return None

    def form(self, state: Any, ids: tuple[str, ...], job_committed: int) -> Formed:
        return Formed("fresh", 0, 0, 0.0, holding=None, keep=None)

    def run(self, *, on_step: Any, on_eval: Any, should_stop: Any) -> Any:
        time.sleep(1.5)  # a few heartbeats while "training"
        RaisingTrainer.raised_at = time.monotonic()
        raise RuntimeError("a bug in the step loop")

    def save_model(self, path: Path) -> None:
        raise AssertionError("never reached")


async def test_a_trainer_that_raises_leaves_within_one_heartbeat_timeout(
    reaper: ProcessReaper, tmp_path: Path
) -> None:
    _, url = start_coordinator(reaper, tmp_path, "--steps", "5", "--warmup-steps", "0")
    cfg = WorkerConfig(
        coordinator=url,
        token=TOKEN,
        worker_id="buggy",
        bind="127.0.0.1:0",
        host_id="h",
        device="cpu",
        save_model=tmp_path / "m.safetensors",
    )
    daemon = WorkerDaemon(cfg, trainers=RaisingTrainer)
    seen: list[tuple[float, str, str]] = []

    async def watch() -> None:
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {READ_TOKEN}"}) as client:
            while True:
                workers = (await client.get(f"{url}/workers")).json()["workers"]
                for w in workers:
                    seen.append((time.monotonic(), w["state"], w["worker_state"]))
                await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch())
    with pytest.raises(RuntimeError, match="a bug"):
        await asyncio.wait_for(daemon.run(), 30)
    await asyncio.sleep(1.0)
    watcher.cancel()
    assert any(state == "alive" and phase == "training" for _, state, phase in seen)
    left = [t for t, state, _ in seen if state == "left"]
    assert left, "the worker never left"
    assert left[0] - RaisingTrainer.raised_at < 2.0  # the heartbeat timeout
    assert seen[-1][1:] == ("left", "failed")


def test_a_collective_of_an_old_epoch_is_rejected() -> None:
    a, b = GrpcBackend(TOKEN), GrpcBackend(TOKEN)
    try:
        ports = [a.start("127.0.0.1:0"), b.start("127.0.0.1:0")]
        addresses = tuple(f"127.0.0.1:{p}" for p in ports)
        old = [PeerGroup("job", 1, r, addresses) for r in range(2)]
        new = [PeerGroup("job", 2, r, addresses) for r in range(2)]
        shard = torch.ones(4)
        a.set_group(old[0])  # a has not heard of epoch 2 yet
        b.set_group(new[1])
        started = time.monotonic()
        with pytest.raises(CommError) as caught:  # b refuses to serve epoch 1
            a.all_gather(old[0], 0, 0, shard, torch.empty(8), timeout=10).result(20)
        assert not isinstance(caught.value, CollectiveTimeout), caught.value
        assert time.monotonic() - started < 5
        a.set_group(new[0])
        with pytest.raises(EpochChanged):  # and a itself now refuses its old epoch at once
            a.all_gather(old[0], 1, 0, shard, torch.empty(8), timeout=10).result(5)
        # The current epoch works across the two servers.
        fa = a.all_gather(new[0], 0, 0, shard, torch.empty(8), timeout=10)
        fb = b.all_gather(new[1], 0, 0, 2 * shard, torch.empty(8), timeout=10)
        assert fa.result(15).tolist() == [1.0] * 4 + [2.0] * 4
        assert fb.result(15).tolist() == [1.0] * 4 + [2.0] * 4
    finally:
        a.close()
        b.close()
