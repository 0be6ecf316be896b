"""Point-to-point `send` / `recv` and the exact `exchange` of the gRPC lane (communication/p2p.py and
communication/backend.py for the semantics).

`send` streams the tensor's bytes to the destination's SendTensor method (the header names the key in
`step`, unit 0, the destination as `shard`); the destination checks and holds it in its mailbox
(communication/mailbox.py) and acknowledges, which resolves the send. `recv` claims the message from
this rank's mailbox, waiting for it if it has not arrived. Cancelling a send stops its stream (the
receiver frees what it reserved for it); cancelling a recv withdraws it (a message that arrives later
stays held for another recv, until the epoch changes).

`exchange` sends this rank's control values to every peer as SendTensor messages of unit `CONTROL_UNIT`
(their own namespace of keys, int64 or float64) and receives each peer's into its row of the result.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import torch

from communication import collectives
from communication.backend import check_exchange
from communication.group import PeerGroup
from communication.handle import Handle
from communication.mailbox import CONTROL_UNIT, Mailbox
from communication.p2p import check_call
from communication.servicer import SEND_METHOD
from communication.tensor_stream import Key, make_header
from protos import zerowire_pb2 as pb


class GrpcPointToPoint:
    """Mixed into GrpcBackend, whose plumbing it uses."""

    _wire: collectives.Wire | None
    _mailbox: Mailbox

    def _stale(self, group: PeerGroup) -> Handle | None:
        raise NotImplementedError  # GrpcBackend's

    def _submit(self, group: PeerGroup, make: Callable[[], Coroutine[Any, Any, torch.Tensor]]) -> Handle:
        raise NotImplementedError  # GrpcBackend's

    def send(self, tensor: torch.Tensor, *, group: PeerGroup, dest: int, key: int, timeout: float) -> Handle:
        """See CollectiveBackend: resolves once `dest` holds the message; keep `tensor` unchanged."""
        flat = check_call(group, dest, key, tensor, "send")
        if (stale := self._stale(group)) is not None:
            return stale
        wire = self._wire
        assert wire is not None
        payload = flat.view(torch.uint8)
        header = make_header(
            Key(group.job_id, group.epoch, key, 0, dest),
            group.rank,
            torch.float32,
            flat.numel(),
            pb.CODEC_NONE,
            0,
            payload,
            with_checksum=False,
        )

        async def run() -> torch.Tensor:
            await collectives.push(wire, group, dest, header, payload, timeout, SEND_METHOD)
            return tensor

        return self._submit(group, run)

    def recv(self, out: torch.Tensor, *, group: PeerGroup, src: int, key: int, timeout: float) -> Handle:
        """See CollectiveBackend: resolves to `out` once the message from `src` under `key` is in it."""
        flat = check_call(group, src, key, out, "recv")
        if (stale := self._stale(group)) is not None:
            return stale
        mailbox = self._mailbox

        async def run() -> torch.Tensor:
            await mailbox.recv(group.epoch, src, key, flat, timeout)
            return out

        return self._submit(group, run)

    def exchange(self, values: torch.Tensor, *, group: PeerGroup, key: int, timeout: float) -> Handle:
        """See CollectiveBackend: N - 1 messages out, N - 1 in, each peer's values into its row."""
        flat = check_exchange(group, key, values)
        if (stale := self._stale(group)) is not None:
            return stale
        wire, mailbox = self._wire, self._mailbox
        assert wire is not None
        out = torch.empty((group.world_size, flat.numel()), dtype=flat.dtype)
        out[group.rank].copy_(flat)
        payload = flat.view(torch.uint8)

        def header(dest: int) -> pb.TensorHeader:
            name = Key(group.job_id, group.epoch, key, CONTROL_UNIT, dest)
            return make_header(
                name, group.rank, flat.dtype, flat.numel(), pb.CODEC_NONE, 0, payload, with_checksum=False
            )

        async def run() -> torch.Tensor:
            peers = [p for p in group.peers() if p != group.rank]
            sends = [
                collectives.push(wire, group, p, header(p), payload, timeout, SEND_METHOD) for p in peers
            ]
            recvs = [mailbox.recv(group.epoch, p, key, out[p], timeout, unit=CONTROL_UNIT) for p in peers]
            tasks = [asyncio.ensure_future(call) for call in (*sends, *recvs)]
            try:
                await asyncio.gather(*tasks)
            except BaseException:  # the first failure ends the exchange: nothing of it lingers
                for task in tasks:
                    task.cancel()
                raise
            return out

        return self._submit(group, run)
