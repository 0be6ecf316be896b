"""Stand-ins for the CUDA side of the NCCL lane, so its logic runs on the CPU: the streams and events
(`FakeStreams`, a `LaneStreams`), a process group that says it is NCCL (`FakeNcclGroup`: world 1, every
collective done at once on the host unless the test holds it), and the lane over them (`StandInLane`,
the real TorchDistBackend with its dispatcher and watcher, whose formation makes a `FakeNcclGroup`)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from communication.torchdist import TorchDistBackend
from communication.torchdist_group import EpochGroup

RENDEZVOUS = "127.0.0.1:1"  # parsed, never dialled: the stand-in formation meets nobody


class FakeStreams:
    """Events are tokens; one recorded while `stuck` is set never passes (a collective whose peer never
    comes), the others pass at once. `orders` lists (token, stream) waits the consumers enqueued;
    `retired` and `collected` what the owner threads let go of."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next = 0
        self.stuck = threading.Event()
        self.never: set[int] = set()
        self.marks: list[int] = []
        self.issued: list[tuple[str, int | None]] = []
        self.orders: list[tuple[int, Any]] = []
        self.retired: set[int] = set()
        self.collected: set[int] = set()
        self.host_copies = 0
        self.copy_error: RuntimeError | None = None  # the next host copy fails with it

    def _token(self) -> int:
        with self._lock:
            self._next += 1
            return self._next

    def mark_input(self) -> int | None:
        token = self._token()
        self.marks.append(token)
        return token

    @contextmanager
    def issuing(self, kind: str, mark: int | None) -> Iterator[None]:
        self.issued.append((kind, mark))
        if mark is not None:
            self.retire(mark)
        yield

    def record_done(self, kind: str) -> int:
        token = self._token()
        if self.stuck.is_set():
            self.never.add(token)
        return token

    def passed(self, token: int) -> bool:
        return token not in self.never

    def order(self, token: int, stream: Any) -> None:
        self.orders.append((token, stream))

    def retire(self, token: int) -> None:
        with self._lock:
            self.retired.add(token)

    def collect(self) -> None:
        with self._lock:
            self.collected |= self.retired

    def host_copy(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        error, self.copy_error = self.copy_error, None
        if error is not None:
            raise error
        self.host_copies += 1
        dst.view(-1).copy_(src.view(-1))

    def close(self) -> None:
        self.collect()


class FakeWork:
    """The library's work of one collective: complete unless the streams are stuck (until its group is
    aborted, which ends its kernel); `error` makes it report a failure (a peer that closed its
    connection)."""

    def __init__(self, group: FakeNcclGroup, error: BaseException | None = None) -> None:
        self._group = group
        self._stuck = group.streams.stuck.is_set()
        self._error = error
        self.waited = 0

    def wait(self) -> bool:
        self.waited += 1  # on a GPU: the lane's stream waits for the library's
        return True

    def is_completed(self) -> bool:
        return self._error is not None or not self._stuck or bool(self._group.aborts)

    def exception(self) -> BaseException | None:
        return self._error

    def get_future(self) -> Any:
        raise AssertionError("the NCCL path never waits on a work's future")


class FakeNcclGroup:
    """A world-1 process group that answers like NCCL's: every collective copies at once; `abort` and
    `shutdown` are counted, with the group's error at the time of the abort."""

    def __init__(self, eg: EpochGroup, streams: FakeStreams) -> None:
        self.eg = eg
        self.streams = streams
        self.calls: list[str] = []
        self.aborts: list[Any] = []  # eg.failed when abort() was called
        self.shutdowns = 0
        self.fail_next: BaseException | None = None

    def _work(self) -> FakeWork:
        error, self.fail_next = self.fail_next, None
        return FakeWork(self, error)

    def _allgather_base(self, out: torch.Tensor, inp: torch.Tensor) -> FakeWork:
        self.calls.append("allgather")
        out.copy_(inp)
        return self._work()

    def alltoall_base(self, out: torch.Tensor, inp: torch.Tensor, *splits: Any) -> FakeWork:
        self.calls.append("alltoall")
        out.copy_(inp)
        return self._work()

    def _reduce_scatter_base(self, out: torch.Tensor, inp: torch.Tensor, opts: Any) -> FakeWork:
        self.calls.append("reduce_scatter")
        out.copy_(inp)
        return self._work()

    def abort(self) -> None:
        self.aborts.append(self.eg.failed)

    def shutdown(self) -> None:
        self.shutdowns += 1


class StandInLane(TorchDistBackend):
    """The torch.distributed lane, its dispatcher and deadline watcher as they are, over FakeStreams and
    a FakeNcclGroup per epoch (`groups`, in formation order)."""

    def __init__(self, **kwargs: Any) -> None:
        self.fake_streams = FakeStreams()
        self.groups: list[FakeNcclGroup] = []
        super().__init__(streams=self.fake_streams, **kwargs)

    def _form(self, eg: EpochGroup) -> None:
        pg = FakeNcclGroup(eg, self.fake_streams)
        self.groups.append(pg)
        with eg._end_lock:
            eg.pg, eg.backend_name = pg, "nccl"


class StandInGroup:
    """A `Watched` group for the watcher alone: counts aborts, with its error at the time of each."""

    def __init__(self, name: str = "group") -> None:
        self.name = name
        self.failed: Any = None
        self.aborts: list[Any] = []
        self._lock = threading.Lock()

    def describe(self) -> str:
        return self.name

    def mark_failed(self, error: Any) -> bool:
        with self._lock:
            if self.failed is not None:
                return False
            self.failed = error
            return True

    def abort(self) -> None:
        self.aborts.append(self.failed)


class Never:
    """A completion that never passes (a collective whose peer never comes)."""

    def passed(self) -> bool:
        return False

    def error(self) -> BaseException | None:
        return None


class Switch:
    """A completion the test ends: `done` passes it, `error` makes the library report a failure."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.failure: BaseException | None = None

    def passed(self) -> bool:
        return self.done.is_set()

    def error(self) -> BaseException | None:
        return self.failure
