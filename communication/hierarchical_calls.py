"""The collectives of the hierarchical lane (communication/hierarchical.py, whose module doc says how a call
is split and ordered), each composed of a stage on the torch.distributed lane inside the host and one on
the gRPC lane across hosts. The composed call's handle fails with the first stage error; cancelling it
cancels the stage in flight and never starts the next one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError

import torch

from communication.backend import Codec, check_exchange
from communication.errors import Cancelled, CollectiveTimeout, CommError, EpochChanged
from communication.group import PeerGroup
from communication.grpc_backend import GrpcBackend
from communication.handle import Handle
from communication.host_layout import HostLayout
from communication.torchdist import TorchDistBackend

Stage = Future[torch.Tensor]


class HierarchicalCalls:
    """Mixed into HierarchicalBackend, whose lanes and installed layout it uses."""

    remote: GrpcBackend
    local: TorchDistBackend
    _closed: bool

    def _installed(self, group: PeerGroup) -> HostLayout | None:
        raise NotImplementedError  # HierarchicalBackend's

    def all_gather(
        self,
        group: PeerGroup,
        step: int,
        unit: int,
        shard: torch.Tensor,
        out: torch.Tensor,
        timeout: float,
        *,
        codec: Codec = "none",
    ) -> Handle:
        try:
            layout = self._installed(group)
        except EpochChanged as exc:
            return _failed(exc)
        if layout is None:
            return self.remote.all_gather(group, step, unit, shard, out, timeout, codec=codec)
        n = shard.numel()
        if shard.dtype != torch.float32 or out.dtype != torch.float32 or out.numel() != n * group.world_size:
            raise ValueError(f"need a float32 shard and float32 out of {n * group.world_size} values")
        if layout.remote_group is None:  # one host: local order is rank order
            return self.local.all_gather(layout.local_group, step, unit, shard, out, timeout, codec=codec)
        mid = torch.empty(layout.num_hosts * n)
        across = self.remote.all_gather(layout.remote_group, step, unit, shard, mid, timeout, codec=codec)
        gathered = torch.empty(group.world_size * n)
        inside = self.local.all_gather(
            layout.local_group, step, unit, mid, gathered, timeout, codec=codec, ready=across
        )
        result = Handle()
        _starts_with(across, result)
        _fail_on_error(across, result)

        def done(f: Future[torch.Tensor]) -> None:
            if _fail_on_error(f, result):
                layout.from_local_major(gathered, out, n)
                _settle(result, value=out)

        inside.add_done_callback(done)
        result.bind(lambda: _withdraw([across, inside]))  # inside waits for across: either ends both
        return result

    def reduce_scatter(
        self,
        group: PeerGroup,
        step: int,
        unit: int,
        full: torch.Tensor,
        out: torch.Tensor,
        timeout: float,
        *,
        codec: Codec = "none",
    ) -> Handle:
        try:
            layout = self._installed(group)
        except EpochChanged as exc:
            return _failed(exc)
        if layout is None:
            return self.remote.reduce_scatter(group, step, unit, full, out, timeout, codec=codec)
        n = out.numel()
        if out.dtype != torch.float32 or full.numel() != n * group.world_size:
            raise ValueError(f"full must have {n * group.world_size} values and out be float32")
        if layout.remote_group is None:  # one host: local order is rank order
            return self.local.reduce_scatter(layout.local_group, step, unit, full, out, timeout, codec=codec)
        remote_group = layout.remote_group
        mid, res = torch.empty(layout.num_hosts * n), torch.empty(n)
        arranged = layout.to_local_major(full, n)
        inside = self.local.reduce_scatter(
            layout.local_group, step, unit, arranged, mid, timeout, codec=codec
        )

        def across(left: float) -> Stage:
            return self.remote.reduce_scatter(remote_group, step, unit, mid, res, left, codec=codec)

        def finish(_: Stage) -> torch.Tensor:
            out.view(-1).copy_(res)
            return out

        what = f"{group.describe()}: reduce_scatter of unit {unit}"
        return self._inside_then_across(inside, across, finish, timeout, what)

    def exchange(self, values: torch.Tensor, *, group: PeerGroup, key: int, timeout: float) -> Handle:
        """See CollectiveBackend: inside the host first, then every host's block across hosts (between
        matching local ranks), rows put back in rank order."""
        flat = check_exchange(group, key, values)
        try:
            layout = self._installed(group)
        except EpochChanged as exc:
            return _failed(exc)
        if layout is None:
            return self.remote.exchange(flat, group=group, key=key, timeout=timeout)
        if layout.remote_group is None:  # one host: local order is rank order
            return self.local.exchange(flat, group=layout.local_group, key=key, timeout=timeout)
        remote_group, n = layout.remote_group, flat.numel()
        inside = self.local.exchange(flat, group=layout.local_group, key=key, timeout=timeout)

        def across(left: float) -> Stage:
            block = inside.result().reshape(-1)  # this host's rows, by local index
            return self.remote.exchange(block, group=remote_group, key=key, timeout=left)

        def finish(second: Stage) -> torch.Tensor:
            blocks = second.result().view(layout.num_hosts, layout.per_host, n)
            out = torch.empty((group.world_size, n), dtype=flat.dtype)
            for h, ranks in enumerate(layout.hosts):
                for local, rank in enumerate(ranks):
                    out[rank] = blocks[h, local]
            return out

        return self._inside_then_across(
            inside, across, finish, timeout, f"{group.describe()}: exchange {key}"
        )

    def _inside_then_across(
        self,
        inside: Stage,
        across: Callable[[float], Stage],
        finish: Callable[[Stage], torch.Tensor],
        timeout: float,
        what: str,
    ) -> Handle:
        """A call whose gRPC stage starts once its local stage succeeded, with what is left of `timeout`;
        `finish(second)` gives the call's result once the gRPC stage succeeded too."""
        deadline = time.monotonic() + timeout
        result = Handle()
        _starts_with(inside, result)
        stages: list[Stage] = [inside]
        withdrawn = threading.Event()

        def start() -> None:
            if not _fail_on_error(inside, result):
                return
            try:
                if self._closed:
                    raise CommError("backend closing")
                if withdrawn.is_set():
                    raise Cancelled(f"{what}: cancelled by the caller")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CollectiveTimeout(f"{what}: no time left for the gRPC stage")
                second = across(left)
            except CommError as exc:
                _settle(result, error=exc)
                return
            except Exception as exc:  # a lane refusing the call must not leave `result` pending
                _settle(result, error=CommError(f"{what}: gRPC stage failed to start: {exc}"))
                return
            stages.append(second)
            second.add_done_callback(done)

        def done(second: Stage) -> None:
            if _fail_on_error(second, result):
                _settle(result, value=finish(second))

        def withdraw() -> bool:
            withdrawn.set()  # a stage not started yet never starts
            pending = [stage for stage in stages if not stage.done()]
            return _withdraw(pending) if pending else not result.done()

        inside.add_done_callback(lambda _: start())
        result.bind(withdraw)
        return result


def _failed(exc: BaseException) -> Handle:
    failed = Handle()
    failed.set_exception(exc)
    return failed


def _withdraw(stages: list[Stage]) -> bool:
    """Cancel the stages of a composed call that are still pending; whether any was withdrawn (its
    failure, Cancelled, then settles the composed handle)."""
    return any([stage.cancel() for stage in stages if isinstance(stage, Handle) and not stage.done()])


def _settle(
    fut: Future[torch.Tensor], *, value: torch.Tensor | None = None, error: BaseException | None = None
) -> None:
    try:
        if error is not None:
            fut.set_exception(error)
        else:
            assert value is not None
            fut.set_result(value)
    except InvalidStateError:
        pass  # the other stage failed it first


def _starts_with(stage: Future[torch.Tensor], result: Handle) -> None:
    """`result` is started once its first stage is (stages from a lane are Handles)."""
    if isinstance(stage, Handle):
        stage.on_start(result.mark_started)
    else:
        result.mark_started()


def _fail_on_error(stage: Future[torch.Tensor], result: Future[torch.Tensor]) -> bool:
    """Chain a stage's failure into `result` as soon as it happens; True when the stage succeeded."""
    if not stage.done():
        stage.add_done_callback(lambda f: _fail_on_error(f, result))
        return True
    exc = stage.exception()
    if exc is not None:
        _settle(result, error=exc)
    return exc is None
