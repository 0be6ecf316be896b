"""Bounds on the wire server's calls: per-sender stream slots, the waiting room of calls for an epoch not
installed yet, and the server-wide cap on concurrent calls (a real grpc.aio server on loopback)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import grpc
import pytest

from communication.accumulator import GradientAccumulator
from communication.errors import ResourceExhausted
from communication.group import PeerGroup
from communication.peer_limits import StreamLimits
from communication.server import create_server, token_metadata
from communication.servicer import FETCH_METHOD, WireCounters, WireServicer
from communication.shard_store import ShardStore
from protos import zerowire_pb2 as pb

TOKEN = "s3cret"
pytestmark = pytest.mark.timeout(60)


def test_slots_are_per_sender_and_method_and_always_given_back() -> None:
    limits = StreamLimits(per_peer=2)
    with limits.slot("FetchShard", 1), limits.slot("FetchShard", 1):
        with pytest.raises(ResourceExhausted, match="rank 1 already has 2 FetchShard streams"):
            with limits.slot("FetchShard", 1):
                pass
        with limits.slot("FetchShard", 2), limits.slot("PushGradient", 1, limit=3):
            assert limits.open("FetchShard", 2) == limits.open("PushGradient", 1) == 1
    with pytest.raises(RuntimeError), limits.slot("PushGradient", 1):
        raise RuntimeError("a failed stream")
    assert limits.open("FetchShard", 1) == limits.open("PushGradient", 1) == 0
    with pytest.raises(ValueError):
        StreamLimits(per_peer=0)


async def _status(stream: AsyncIterator[bytes]) -> grpc.StatusCode:
    try:
        async for _ in stream:
            pass
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_waiting_room_and_server_wide_cap() -> None:
    store, acc = ShardStore(), GradientAccumulator()
    group = PeerGroup("job", 1, 0, ("a:1", "b:1", "c:1"))
    store.set_group(group)
    acc.set_group(group)
    servicer = WireServicer(store, acc, WireCounters())
    servicer.limits = StreamLimits(per_peer=8, pre_auth=1)
    server, port = create_server("127.0.0.1:0", servicer, TOKEN, max_concurrent_rpcs=3)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            fetch = channel.unary_stream(
                FETCH_METHOD, request_serializer=lambda b: b, response_deserializer=lambda b: b
            )

            def call(epoch: int, sender: int, timeout: float = 20) -> grpc.aio.UnaryStreamCall:
                req = pb.FetchRequest(
                    job_id="job", epoch=epoch, step=5, unit=0, shard=0, sender=sender, codec=pb.CODEC_NONE
                )
                return fetch(req.SerializeToString(), timeout=timeout, metadata=token_metadata(TOKEN))

            newer = call(2, 1)  # epoch 2 is not installed: it waits, before its MAC can be checked
            await _until(lambda: store.waiting == 1)
            assert await _status(call(2, 2)) == grpc.StatusCode.RESOURCE_EXHAUSTED  # the room holds one
            held = [call(1, 1), call(1, 2)]  # step 5 is not published: both wait
            await _until(lambda: store.waiting == 3)
            over = call(1, 2)
            assert await _status(over) == grpc.StatusCode.RESOURCE_EXHAUSTED  # a 4th call to the server
            assert "concurrent" in (await over.details() or "").lower()
            for c in (newer, *held):
                c.cancel()
            await _until(lambda: store.waiting == 0)
            # room again: a call gets in and waits for step 5 until its deadline
            assert await _status(call(1, 1, timeout=0.5)) == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        await server.stop(0)


async def _until(condition: Callable[[], bool], limit: float = 10.0) -> None:
    for _ in range(int(limit / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not reached within {limit}s")
