"""One epoch's torch.distributed process group, formed from a rendezvous store without a default group.

The lowest rank of the epoch (rank 0) hosts a `TCPStore` on the epoch's rendezvous address ("host:port",
handed out with the epoch); the others connect to it. With `host_store=False` every member, rank 0
included, joins as a client a store hosted for longer (`communication/rendezvous_store.py`). Every key
lives under `job/epoch`, so a late member of an old epoch never meets a new one. Each member announces
itself and its device kind; once every member is there the group is created (NCCL when every member has
a GPU of its own, gloo otherwise), and the store (or this member's connection to it) is only kept alive
until the group is dropped. A gloo group gets the collective timeout; an NCCL group is made eagerly on
this member's GPU with a longer one (communication/nccl_group.py: the lane's own deadlines come first).

A group ends once (`end`): aborted when it failed or has calls in flight (`abort()`, after its error is
set, so code woken by the abort sees it), shut down when it ends clean (`shutdown()` waits for its
kernels, so it is never the call for a group whose peer may be dead).

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
from communication.nccl_group import make_nccl_group

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
    kept: list[Any] = field(default_factory=list)  # library works of failed calls, kept until they end
    ending: threading.Thread | None = None  # a clean shutdown under way
    _ended: bool = False
    _end_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def epoch(self) -> int:
        return self.group.epoch

    def describe(self) -> str:
        return self.group.describe()

    def mark_failed(self, error: CommError) -> bool:
        """Set the group's error unless it has one (the first stands); True when this call set it."""
        with self._end_lock:
            if self.failed is not None:
                return False
            self.failed = error
            return True

    def abort(self) -> None:
        """Abort the communicator (its error is set first; see `end`)."""
        self.end(clean=False)

    def end(self, *, clean: bool) -> bool:
        """End the formed group once: `shutdown()` if `clean`, else `abort()` (after marking it failed);
        the store is dropped. False when it had ended already or is not formed yet (the formation ends it
        then, seeing `failed` or `abandoned`)."""
        with self._end_lock:
            pg = self.pg
            if self._ended or pg is None:
                return False
            self._ended = True
            if not clean and self.failed is None:
                self.failed = EpochChanged(f"{self.group.describe()}: the group was aborted")
        try:
            if clean and hasattr(pg, "shutdown"):
                pg.shutdown()
            elif hasattr(pg, "abort"):
                pg.abort()
        except RuntimeError as exc:  # the library's own failure: the group is gone either way
            log.warning("%s: %s: %s", self.group.describe(), "shutdown" if clean else "abort", exc)
        self.store = None
        return True

    def end_in_background(self) -> None:
        """A clean end (`end(clean=True)`) on a thread of its own: a shutdown waits for the library."""
        thread = threading.Thread(
            target=self.end, kwargs={"clean": True}, name="torchdist-shutdown", daemon=True
        )
        self.ending = thread
        thread.start()

    def idle(self) -> bool:
        """Nothing of the group runs any more: its kept works completed, no shutdown under way."""
        self.kept = [w for w in self.kept if not w.is_completed()]
        return not self.kept and (self.ending is None or not self.ending.is_alive())

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
        pg_store = dist.PrefixStore("pg", prefix)
        if backend == "nccl" and self.cuda is not None:
            # eager, on this member's GPU, ended by the lane (communication/nccl_group.py)
            pg = make_nccl_group(pg_store, group.rank, group.world_size, self.cuda, collective_timeout)
        else:
            backend = "gloo"
            options = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
            options._timeout = datetime.timedelta(seconds=collective_timeout)
            # co-located members only: gloo's pairs listen and connect on loopback, never on the network
            options._devices = [dist.ProcessGroupGloo.create_device(hostname=LOOPBACK)]
            pg = dist.ProcessGroupGloo(pg_store, group.rank, group.world_size, options)
        with self._end_lock:
            self.pg, self.backend_name, self.store = pg, backend, store
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
        """Abort the group (gloo refuses new work) and drop the store."""
        if not self.end(clean=False):
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
