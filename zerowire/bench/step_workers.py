"""Worker processes of `zerowire bench step` (one function per contender): each runs ``--warmup``
unmeasured and ``--steps`` measured steps, and returns its timings (the harness uses rank 0's), its torch
thread count and the settings of :func:`process_env` it saw. With ``--memory`` it also returns
``peak_bytes``: the peak tensor bytes of its measured steps (see ``step_peak``), tracked from before the
model is built."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from zerowire.bench.step_peak import PeakMeter
from zerowire.bench.step_rounds import TORCH_THREADS, process_env

# Every contender's optimizer: SGD with these settings (zerowire's job spells the same ones).
LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 5e-4


def device_of(a: argparse.Namespace) -> torch.device:
    """This rank's device: the CPU, or with ``--device cuda`` GPU ``rank % visible GPUs`` (ranks share
    GPUs where there are fewer GPUs than ranks)."""
    if getattr(a, "device", "cpu") != "cuda":
        return torch.device("cpu")
    device = torch.device("cuda", a.rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def run(a: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(TORCH_THREADS)
    meter = PeakMeter(device_of(a)) if a.memory else None
    runners: dict[str, Callable[[argparse.Namespace, PeakMeter | None], dict[str, Any]]] = {
        "zerowire": _zerowire,
        "zerowire_local": _zerowire,
        "zerowire_grpc": _zerowire,
        "fsdp2": _fsdp2,
        "ddp": _ddp,
        "floor": _floor,
    }
    env = {key: os.environ.get(key, "") for key in process_env()}
    report = runners[a.worker](a, meter)
    if meter is not None:
        report["peak_bytes"] = meter.stop()
    return {**report, "torch_threads": torch.get_num_threads(), "env": env}


def _model(a: argparse.Namespace, meter: PeakMeter | None) -> nn.Module:
    from worker.models import build_model

    if meter is not None:
        meter.start()  # after any process-group set-up, right before the model exists
    torch.manual_seed(0)
    return build_model(a.model, 10, 3).to(device_of(a))


def _batch(a: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + a.rank)
    x, y = torch.randn(a.batch, 3, 32, 32, generator=g), torch.randint(0, 10, (a.batch,), generator=g)
    return x.to(device_of(a)), y.to(device_of(a))


def _timed(step: Callable[[], None], a: argparse.Namespace, meter: PeakMeter | None) -> list[float]:
    """``a.warmup`` unmeasured steps, then the times of ``a.steps`` measured ones (inside the meter's
    window when there is one)."""
    for _ in range(a.warmup):
        step()
    times: list[float] = []
    if meter is not None:
        meter.open_window()
    cuda = device_of(a).type == "cuda"
    for _ in range(a.steps):
        t0 = time.perf_counter()
        step()
        if cuda:  # a step is done when its kernels are
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if meter is not None:
        meter.close_window()
    return times


def _ready_barrier(directory: Path, rank: int, world: int, timeout: float = 120.0) -> None:
    """Every rank's wire server is up before the first collective (the daemon uses the coordinator)."""
    (directory / f"up-{rank}").touch()
    deadline = time.monotonic() + timeout
    while not all((directory / f"up-{r}").exists() for r in range(world)):
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark peers did not start")
        time.sleep(0.02)


def _zerowire(a: argparse.Namespace, meter: PeakMeter | None) -> dict[str, Any]:
    from communication.recorder import FlightRecorder, RecordedLane
    from jobspec import JobSpec
    from worker.state import WorkerState
    from worker.trainer import StepReport, Trainer

    ports = [int(p) for p in a.ports.split(",")]
    # A memory run holds one global batch of images, as the other contenders hold their batch.
    samples = a.batch * a.world if meter is not None else max(256, a.batch * a.world)
    job = JobSpec.model_validate(
        dict(
            job_id="bench", model=a.model, dataset=f"synthetic:3x32x32:{samples}",
            steps=a.warmup + a.steps, global_batch=a.batch * a.world, lr=LR, momentum=MOMENTUM,
            weight_decay=WEIGHT_DECAY,
            schedule="constant", warmup_steps=0, compression=a.compression, replicas=a.replicas,
        )
    )  # fmt: skip
    backend, group = _zerowire_plane(a, job.job_id, ports)
    # as in a worker, every call goes through the flight recorder (unless its cost is what is measured)
    lane = backend if getattr(a, "recorder", "on") == "off" else RecordedLane(backend, FlightRecorder())
    try:
        if meter is not None:
            meter.start()  # the trainer builds the model
        trainer = Trainer(job, group, lane, device=device_of(a), collective_timeout=600.0)
        # formed as a worker's epoch is: agree on the (fresh) state, mirror every shard on its buddy
        trainer.form(WorkerState(backend), tuple(f"bench-{r}" for r in range(a.world)), -1)
        reports: list[StepReport] = []

        def on_step(report: StepReport) -> None:
            # The meter's window: from the end of the last warm-up step to the end of the last step.
            if meter is not None and len(reports) == a.warmup + a.steps - 1:
                meter.close_window()
            reports.append(report)
            if meter is not None and len(reports) == a.warmup:
                meter.open_window()

        if meter is not None and a.warmup == 0:
            meter.open_window()
        trainer.run(on_step=on_step)
        measured = reports[a.warmup :]
        return {
            "step_times_s": [r.step_time_s for r in measured],
            "wait_times_s": [r.wait_s for r in measured],
            "bytes_sent": backend.stats().bytes_sent,
            "bytes_by_lane": backend.bytes_by_lane(),
            "peak_full_bytes": trainer.engine.peak_full_bytes,
        }
    finally:
        backend.close()


def _zerowire_plane(a: argparse.Namespace, job_id: str, ports: list[int]) -> tuple[Any, Any]:
    """The backend and epoch-0 group of one zerowire rank: flat gRPC (``zerowire``, ``zerowire_grpc``), or
    the worker's HierarchicalBackend with every rank on one host id (``zerowire_local``: its local lane on
    the rank's device, each rank hosting a rendezvous store, as a worker does, and the host's lowest
    rank's is used). Returns once every rank is up."""
    from communication.group import PeerGroup
    from communication.grpc_backend import GrpcBackend

    remote = GrpcBackend(token="bench")
    addresses = tuple(f"127.0.0.1:{p}" for p in ports)
    if a.worker != "zerowire_local":
        remote.start(addresses[a.rank])
        _ready_barrier(a.dir, a.rank, a.world)
        return remote, PeerGroup(job_id, 0, a.rank, addresses)
    from communication.hierarchical import HierarchicalBackend
    from communication.torchdist import TorchDistBackend

    local = TorchDistBackend(
        device=device_of(a),  # NCCL on GPUs of their own, gloo otherwise
        collective_timeout=600.0,
        rendezvous_timeout=120.0,
        reduce=getattr(a, "nccl_reduce", "ordered"),
    )
    backend = HierarchicalBackend(remote, local)
    backend.start(addresses[a.rank])
    assert backend.store is not None
    mine = a.dir / f"store-{a.rank}"
    mine.with_suffix(".tmp").write_text(backend.store.address)
    os.replace(mine.with_suffix(".tmp"), mine)
    _ready_barrier(a.dir, a.rank, a.world)
    stores = tuple((a.dir / f"store-{r}").read_text() for r in range(a.world))
    group = PeerGroup(job_id, 0, a.rank, addresses, host_ids=("localhost",) * a.world, store_addresses=stores)
    return backend, group


def _dist_init(a: argparse.Namespace) -> None:
    """gloo; NCCL on GPUs when every rank has a GPU of its own (NCCL cannot put two ranks on one)."""
    import torch.distributed as dist

    port = int(a.ports.split(",")[0])
    cuda = device_of(a).type == "cuda"
    backend = "nccl" if cuda and torch.cuda.device_count() >= a.world else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=a.rank, world_size=a.world)


def _train_loop(model: nn.Module, a: argparse.Namespace, meter: PeakMeter | None) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    x, y = _batch(a)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y, reduction="sum").backward()
        opt.step()

    return _timed(step, a, meter)


def _fsdp2(a: argparse.Namespace, meter: PeakMeter | None) -> dict[str, Any]:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from worker.models import units

    _dist_init(a)
    try:
        model = _model(a, meter)
        for unit in units(model):
            fully_shard(unit)
        fully_shard(model)
        dist.barrier()
        return {"step_times_s": _train_loop(model, a, meter)}
    finally:
        dist.destroy_process_group()


def _ddp(a: argparse.Namespace, meter: PeakMeter | None) -> dict[str, Any]:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    _dist_init(a)
    try:
        model = DistributedDataParallel(_model(a, meter))
        dist.barrier()
        return {"step_times_s": _train_loop(model, a, meter)}
    finally:
        dist.destroy_process_group()


def _floor(a: argparse.Namespace, meter: PeakMeter | None) -> dict[str, Any]:
    return {"step_times_s": _train_loop(_model(a, meter), a, meter)}
