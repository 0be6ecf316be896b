"""The collectives of the gRPC lane (communication/grpc_backend.py for the lane): all-gather, one-way
publish and fetch of a shard, and reduce-scatter. Each encodes what this rank sends on the calling thread
and schedules the streams on the lane's event loop (communication/collectives.py); it returns a Handle.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import torch

from communication import collectives
from communication.backend import Codec
from communication.compression import ErrorFeedback, codec_id_for
from communication.group import PeerGroup
from communication.handle import Handle
from communication.shard_store import Published, ShardStore, encode_shard
from communication.wire_encode import flat_view, gradient_sends


class GrpcCollectives:
    """Mixed into GrpcBackend, whose plumbing it uses."""

    block: int
    _wire: collectives.Wire | None
    _store: ShardStore | None
    _feedback: ErrorFeedback

    def _stale(self, group: PeerGroup) -> Handle | None:
        raise NotImplementedError  # GrpcBackend's

    def _check_group(self, group: PeerGroup) -> None:
        raise NotImplementedError  # GrpcBackend's

    def _on_loop(self, fn: Callable[[], None]) -> None:
        raise NotImplementedError  # GrpcBackend's

    def _submit(self, group: PeerGroup, make: Callable[[], Coroutine[Any, Any, torch.Tensor]]) -> Handle:
        raise NotImplementedError  # GrpcBackend's

    def _encode_shard(
        self, group: PeerGroup, step: int, unit: int, flat: torch.Tensor, codec: int
    ) -> Published:
        assert self._store is not None
        pub = self._store.lookup((group.epoch, step, unit), flat, codec)
        return pub if pub is not None else encode_shard(group, step, unit, flat, codec, self.block)

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
        """See CollectiveBackend. `shard` is served from its own memory until released: keep it unchanged."""
        codec_id = codec_id_for(codec)
        if (stale := self._stale(group)) is not None:
            return stale
        assert self._store is not None and self._wire is not None
        flat = flat_view(shard)
        if (
            out.numel() != flat.numel() * group.world_size
            or out.dtype != flat.dtype
            or not out.is_contiguous()
        ):
            raise ValueError(
                f"out must be contiguous {flat.dtype} of {flat.numel() * group.world_size} values, "
                f"got {out.dtype} of {out.numel()}"
            )
        pub = self._encode_shard(group, step, unit, flat, codec_id)
        store, wire, block = self._store, self._wire, self.block

        async def run() -> torch.Tensor:
            store.publish(group, step, unit, flat, pub)
            if group.world_size > 1:
                wire.precompute_checksums(pub)
            return await collectives.all_gather(
                wire, group, step, unit, pub, flat, out, codec_id, block, timeout
            )

        return self._submit(group, run)

    def publish(
        self, group: PeerGroup, step: int, unit: int, shard: torch.Tensor, *, codec: Codec = "none"
    ) -> None:
        """Serve `shard` to peers for (step, unit) until released, without gathering (one-way transfers)."""
        codec_id = codec_id_for(codec)
        self._check_group(group)
        assert self._store is not None
        flat = flat_view(shard)
        pub = self._encode_shard(group, step, unit, flat, codec_id)
        store, wire = self._store, self._wire
        assert wire is not None

        def run() -> None:
            store.publish(group, step, unit, flat, pub)
            wire.precompute_checksums(pub)

        self._on_loop(run)

    def fetch(
        self,
        group: PeerGroup,
        step: int,
        unit: int,
        peer: int,
        out: torch.Tensor,
        timeout: float,
        *,
        codec: Codec = "none",
    ) -> Handle:
        """Fetch one peer's published shard into `out` (flat, contiguous, the shard's dtype and numel)."""
        codec_id = codec_id_for(codec)
        if (stale := self._stale(group)) is not None:
            return stale
        wire, block = self._wire, self.block
        assert wire is not None

        async def run() -> torch.Tensor:
            dest = out.view(-1)
            await collectives.fetch_into(wire, group, peer, step, unit, dest, codec_id, block, timeout)
            return out

        return self._submit(group, run)

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
        codec_id = codec_id_for(codec)
        if (stale := self._stale(group)) is not None:
            return stale
        assert self._wire is not None
        n = out.numel()
        flat = full.detach().reshape(-1)
        if flat.dtype != torch.float32 or not flat.is_contiguous():
            flat = flat.to(torch.float32).contiguous()
        if flat.numel() != n * group.world_size or out.dtype != torch.float32:
            raise ValueError(f"full must have {n * group.world_size} values and out be float32")
        sends = gradient_sends(group, step, unit, flat, codec_id, self.block, self._feedback)
        own = flat[group.rank * n : (group.rank + 1) * n]
        wire = self._wire
        return self._submit(
            group,
            lambda: collectives.reduce_scatter(wire, group, step, unit, own, sends, out, codec_id, timeout),
        )
