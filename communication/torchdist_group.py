"""One epoch's torch.distributed process group, formed from a rendezvous store without a default group.

The lowest rank of the epoch (rank 0) hosts a `TCPStore` on the epoch's rendezvous address ("host:port",
handed out with the epoch); the others connect to it. With `host_store=False` every member, rank 0
included, joins as a client a store hosted for longer (`communication/rendezvous_store.py`). Every key
lives under `job/epoch`, so a late member of an old epoch never meets a new one. Each member announces
itself and its device kind; once every member is there the group is created (NCCL when every member has
CUDA, gloo otherwise) with the collective timeout, and the store (or this member's connection to it) is
only kept alive until the group is dropped.

Formation polls the store in short slices, so a newer epoch (`abandoned`) or the rendezvous deadline
ends it promptly instead of blocking the calling thread for the whole timeout.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from communication.errors import CommError, EpochChanged, PeerLost
from communication.group import PeerGroup

log = logging.getLogger(__name__)
POLL_S = 0.02  # how often a waiting formation or collective looks at the epoch and its deadline
CONNECT_SLICE_S = 1.0  # one attempt to reach the rendezvous host
LOOPBACK = "127.0.0.1"


def parse_rendezvous(rendezvous: str) -> tuple[str, int]:
    """Split "host:port"; ValueError on anything else."""
    host, sep, port_text = rendezvous.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"rendezvous must be 'host:port', got {rendezvous!r}")
    return host.strip("[]"), int(port_text)


@dataclass(eq=False)
class EpochGroup:
    """The group of one epoch as this rank sees it. `pg` is set once formed; `failed` once unusable."""

    group: PeerGroup
    rendezvous: str
    cuda: torch.device | None  # this member's GPU (None: it computes on the host)
    host_store: bool = True  # rank 0 hosts the store; False: everyone joins an already-hosted one
    pg: Any = None
    backend_name: str = ""
    store: Any = None
    failed: CommError | None = None
    abandoned: threading.Event = field(default_factory=threading.Event)

    @property
    def epoch(self) -> int:
        return self.group.epoch

    def check_live(self) -> None:
        if self.abandoned.is_set():
            raise EpochChanged(f"{self.group.describe()}: a newer epoch is known")
        if self.failed is not None:
            raise self.failed

    def form(self, timeout: float, collective_timeout: float) -> None:
        """Meet every member through the store, then create the process group (or raise CommError)."""
        group = self.group
        host, port = parse_rendezvous(self.rendezvous)
        deadline = time.monotonic() + timeout
        store = self._connect(host, port, deadline)
        prefix = dist.PrefixStore(f"zerowire/{group.job_id}/{group.epoch}", store)
        prefix.set(f"member/{group.rank}", "cpu" if self.cuda is None else f"cuda:{self.cuda.index or 0}")
        keys = [f"member/{r}" for r in group.peers()]
        while not prefix.check(keys):
            self._wait_slice(deadline, "members to join the rendezvous")
        # the members are all here: the group's own exchange may now take what is left of the deadline
        store.set_timeout(datetime.timedelta(seconds=max(deadline - time.monotonic(), CONNECT_SLICE_S)))
        backend, why = choose_backend([prefix.get(k).decode() for k in keys], dist.is_nccl_available())
        if why:
            log.warning("%s: %s", group.describe(), why)
        nccl = backend == "nccl"
        span = datetime.timedelta(seconds=collective_timeout)
        pg_store = dist.PrefixStore("pg", prefix)
        if nccl:
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = span
            self.pg = dist.ProcessGroupNCCL(pg_store, group.rank, group.world_size, options)
            self.backend_name = "nccl"
        else:
            options = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
            options._timeout = span
            # co-located members only: gloo's pairs listen and connect on loopback, never on the network
            options._devices = [dist.ProcessGroupGloo.create_device(hostname=LOOPBACK)]
            self.pg = dist.ProcessGroupGloo(pg_store, group.rank, group.world_size, options)
            self.backend_name = "gloo"
        self.store = store
        log.info("%s: %s group formed on %s", group.describe(), self.backend_name, self.rendezvous)

    def _connect(self, host: str, port: int, deadline: float) -> Any:
        slice_span = datetime.timedelta(seconds=CONNECT_SLICE_S)
        if self.host_store and self.group.rank == 0:
            try:
                return dist.TCPStore(
                    host, port, self.group.world_size, True, slice_span, wait_for_workers=False
                )
            except (RuntimeError, OSError) as exc:
                raise PeerLost(
                    f"{self.group.describe()}: cannot host the rendezvous on {host}:{port}: {exc}"
                ) from exc
        while True:
            try:
                return dist.TCPStore(host, port, self.group.world_size, False, slice_span)
            except (RuntimeError, OSError):
                self._wait_slice(deadline, f"the rendezvous host {host}:{port}")

    def _wait_slice(self, deadline: float, what: str) -> None:
        self.check_live()
        if time.monotonic() > deadline:
            raise PeerLost(f"{self.group.describe()}: gave up waiting for {what}")
        self.abandoned.wait(POLL_S)

    def release(self) -> None:
        """Abort the group (NCCL frees its communicator; gloo refuses new work) and drop the store."""
        pg = self.pg
        if pg is not None and hasattr(pg, "abort"):
            try:
                pg.abort()
            except RuntimeError as exc:  # pragma: no cover - depends on the backend's state
                log.debug("%s: abort: %s", self.group.describe(), exc)
        self.store = None


def choose_backend(members: list[str], nccl_available: bool) -> tuple[str, str]:
    """The process group's backend from what each co-located member computes on ("cpu" or "cuda:<index>",
    by rank): NCCL when every member has a GPU of its own, gloo otherwise (CUDA tensors then travel through
    host memory); and why not NCCL when every member has a GPU (empty when there is nothing to say)."""
    if not members or any(not m.startswith("cuda") for m in members):
        return "gloo", ""
    if not nccl_available:
        return "gloo", "every member has a GPU but this torch has no NCCL: gloo, through host memory"
    shared = sorted({m for m in members if members.count(m) > 1})
    if shared:
        ranks = {m: [r for r, x in enumerate(members) if x == m] for m in shared}
        return "gloo", (
            "NCCL needs a GPU per rank, and ranks share "
            + ", ".join(f"{m} (ranks {', '.join(map(str, rs))})" for m, rs in ranks.items())
            + ": gloo, through host memory (give each worker its own GPU: --device cuda:<i>)"
        )
    return "nccl", ""


def device_has_cuda(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available()


def settle(
    fut: Future[torch.Tensor], *, result: torch.Tensor | None = None, error: BaseException | None = None
) -> None:
    try:
        if error is not None:
            fut.set_exception(error)
        else:
            assert result is not None
            fut.set_result(result)
    except InvalidStateError:
        pass  # already failed by an epoch change
