"""A cache of grpc.aio channels, one per peer address, with keepalive and short reconnect backoff
(a restarted peer is reachable again quickly; a dead one fails calls fast with UNAVAILABLE)."""

from __future__ import annotations

from typing import Any

import grpc

from communication.tensor_stream import MAX_MESSAGE_BYTES
from communication.tls import TlsConfig, secure_channel

CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
    ("grpc.enable_retries", 0),
    # A distinct channel per address: do not share one TCP connection between caches.
    ("grpc.use_local_subchannel_pool", 1),
]


class ChannelCache:
    """Channels by "host:port" (TLS with `tls`, plaintext without). Use from the event loop that owns them."""

    def __init__(self, tls: TlsConfig | None = None) -> None:
        self._channels: dict[tuple[str, int], grpc.aio.Channel] = {}
        self._tls = tls

    def get(self, address: str, lane: int = 0) -> grpc.aio.Channel:
        """The channel of `lane` to `address`: each lane is its own TCP connection (parallel streams)."""
        channel = self._channels.get((address, lane))
        if channel is None:
            options = [*CHANNEL_OPTIONS, ("zerowire.lane", lane)]
            channel = self._channels[(address, lane)] = secure_channel(address, options, self._tls)
        return channel

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close(grace=None)
