"""The data plane a worker trains over: gRPC across hosts, torch.distributed among the workers of its own
host, composed by host id (communication/hierarchical.py). Each epoch's composition follows from its
members' host ids, so this only builds the lanes once per worker process."""

from __future__ import annotations

from communication.backend import WorkerLane
from jobspec import JobSpec
from worker.identity import WorkerConfig, describe_device


def default_backend_factory(job: JobSpec, token: str, *, cfg: WorkerConfig) -> WorkerLane:
    """The worker's collective backend: a HierarchicalBackend over a GrpcBackend (the job's int8 block
    size, the worker's TLS; the engine names each call's codec) and a TorchDistBackend on the worker's
    device (NCCL when every co-located member has a GPU of its own, gloo otherwise; reduce-scatters over
    NCCL as the job's `nccl_reduce` says). Each call names its own timeout; the lane's collective timeout
    is the start-up timeout, the longest any call is given."""
    from communication.grpc_backend import GrpcBackend
    from communication.hierarchical import HierarchicalBackend
    from communication.torchdist import TorchDistBackend

    remote = GrpcBackend(token, int8_block=job.int8_block, tls=cfg.tls)
    device, _, _ = describe_device(cfg.device)
    local = TorchDistBackend(
        device=device,
        collective_timeout=cfg.startup_timeout_s,
        rendezvous_timeout=cfg.collective_timeout_s,
        reduce=job.nccl_reduce,
    )
    return HierarchicalBackend(remote, local)
