"""The streams and events of the NCCL lane on its GPU (communication/torchdist.py for the lane).

Collectives are issued from streams of the lane's own, ordered by events, never from the compute stream
(FSDP2 does the same): NCCL's stream waits on the stream it is issued from, so issuing from the compute
stream would make every collective wait for all the compute queued before it, and the `work.wait()` that
follows would make all later compute wait for the collective.

- `mark_input()` (the caller's thread, at the call): an event on the caller's current stream, after
  whatever produced the call's tensors (the shard's copy-in, the gradient), and after their allocation.
- `issuing(kind, mark)` (the lane's dispatcher): the stream of `kind` ("gather" for all-gathers, "reduce"
  for reduce-scatters and everything else) waits on the mark, and becomes the current stream while the
  library call is made, so NCCL's stream waits for the mark and nothing else.
- `record_done(kind)`: after `work.wait()` (the stream waits for NCCL's, the host does not) and any
  device-side finishing (rank-order sums): an event that passes once the call is done on the device. The
  deadline watcher polls it (communication/nccl_watch.py); a consumer's stream waits on it (`order`).
- `host_copy(src, dst)`: results copied to host memory once the call has completed, on a copy stream of
  its own (the legacy default stream would wait for all queued compute first).

Events are destroyed on the thread that made them (cudaEventDestroy can block; the watcher must never
block): each event is kept here with the thread that made it, other threads only query, wait on or
`retire` it, and `collect()` destroys the retired events of the calling thread. Events left when the lane
closes (their thread gone) are kept until the process ends.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch

STREAM_PRIORITY = -1  # the highest: a collective's short kernels should not queue behind compute
_KEPT: list[Any] = []  # events whose thread is gone: destroyed with the process


class LaneStreams(Protocol):
    """What the lane's dispatcher and calls need of a device's streams (a CPU stand-in in unit tests)."""

    def mark_input(self) -> int | None: ...

    def issuing(self, kind: str, mark: int | None) -> Any: ...

    def record_done(self, kind: str) -> int: ...

    def passed(self, token: int) -> bool: ...

    def order(self, token: int, stream: Any) -> None: ...

    def retire(self, token: int) -> None: ...

    def collect(self) -> None: ...

    def host_copy(self, src: torch.Tensor, dst: torch.Tensor) -> None: ...

    def close(self) -> None: ...


@dataclass(eq=False)
class _Kept:
    event: Any
    owner: int  # threading.get_ident() of the thread that made it
    retired: bool = False


class CudaStreams:
    """The streams of one GPU and the events recorded on them, by token."""

    def __init__(self, device: torch.device) -> None:
        assert device.type == "cuda" and device.index is not None, device
        self.device = device
        self._lock = threading.Lock()
        self._streams: dict[str, Any] = {}
        self._events: dict[int, _Kept] = {}
        self._tokens = itertools.count(1)

    def stream(self, kind: str) -> Any:
        """The lane's stream for `kind` ("gather", "reduce", "copy"), made on first use."""
        with self._lock:
            s = self._streams.get(kind)
            if s is None:
                s = torch.cuda.Stream(device=self.device, priority=STREAM_PRIORITY)
                self._streams[kind] = s
            return s

    def _record(self, stream: Any) -> int:
        event = torch.cuda.Event()  # no timing: the cheapest kind
        event.record(stream)
        token = next(self._tokens)
        with self._lock:
            self._events[token] = _Kept(event, threading.get_ident())
        return token

    def mark_input(self) -> int | None:
        """An event on the calling thread's current stream of the lane's GPU: the call's inputs are ready
        there (and its outputs allocated)."""
        return self._record(torch.cuda.current_stream(self.device))

    @contextmanager
    def issuing(self, kind: str, mark: int | None) -> Iterator[Any]:
        """Make `kind`'s stream current (on the lane's GPU) after it waited for `mark`, which is retired."""
        stream = self.stream(kind)
        with torch.cuda.device(self.device), torch.cuda.stream(stream):
            if mark is not None:
                self.order(mark, stream)
                self.retire(mark)
            yield stream

    def record_done(self, kind: str) -> int:
        """An event after everything queued so far on `kind`'s stream (the collective and its finishing)."""
        return self._record(self.stream(kind))

    def passed(self, token: int) -> bool:
        """Whether the device passed the event (a retired or unknown one counts as passed)."""
        with self._lock:
            kept = self._events.get(token)
            return kept is None or kept.retired or bool(kept.event.query())

    def order(self, token: int, stream: Any) -> None:
        """Make `stream` wait, on the device, for the event (nothing to wait for once it is retired: the
        call it closes has settled)."""
        with self._lock:
            kept = self._events.get(token)
            if kept is not None and not kept.retired:
                stream.wait_event(kept.event)

    def retire(self, token: int) -> None:
        """Nobody waits on the event any more; its own thread destroys it at its next `collect()`."""
        with self._lock:
            kept = self._events.get(token)
            if kept is not None:
                kept.retired = True

    def collect(self) -> None:
        """Destroy the retired events this thread made."""
        me = threading.get_ident()
        with self._lock:
            mine = [t for t, k in self._events.items() if k.retired and k.owner == me]
            dropped = [self._events.pop(t) for t in mine]
        del dropped  # the last references: destroyed here, on their own thread

    def host_copy(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy a completed call's device result into host memory, on the copy stream."""
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream("copy")):
            dst.view(-1).copy_(src.view(-1))

    def close(self) -> None:
        """Destroy this thread's retired events; keep the others (their threads may be gone) to the end."""
        self.collect()
        with self._lock:
            left, self._events = list(self._events.values()), {}
        _KEPT.extend(k.event for k in left)
