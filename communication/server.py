"""`create_server(bind, ...) -> (server, port)`: the Wire service plus the standard health service,
behind a token check. Bind port 0 to get a free port (tests do)."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from communication.servicer import WireServicer
from communication.tensor_stream import MAX_MESSAGE_BYTES
from communication.tls import TlsConfig, server_credentials

log = logging.getLogger(__name__)

TOKEN_METADATA_KEY = "authorization"
HEALTH_PREFIX = "/grpc.health.v1.Health/"

SERVER_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.so_reuseport", 0),
]
# Calls served at once, all peers together (beyond: RESOURCE_EXHAUSTED). Each peer holds at most its
# share of streams (communication.peer_limits), so this bounds only what a flood of callers can hold.
MAX_CONCURRENT_RPCS = 2048


def token_metadata(token: str) -> tuple[tuple[str, str], ...]:
    return ((TOKEN_METADATA_KEY, f"Bearer {token}"),)


def _abort_handler(like: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    async def abort(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if like.request_streaming and like.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if like.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if like.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without `authorization: Bearer <token>` (UNAUTHENTICATED); health is open."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("the cluster token must not be empty")
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(HEALTH_PREFIX):
            return handler
        presented = b""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == TOKEN_METADATA_KEY:
                presented = value.encode() if isinstance(value, str) else value
        if not hmac.compare_digest(presented, self._expected):
            log.warning("rejected unauthenticated call to %s", method)
            return _abort_handler(handler, "missing or wrong cluster token")
        return handler


def create_server(
    bind: str,
    servicer: WireServicer,
    token: str,
    tls: TlsConfig | None = None,
    max_concurrent_rpcs: int = MAX_CONCURRENT_RPCS,
) -> tuple[grpc.aio.Server, int]:
    """Build (not start) the server on `bind` ("host:port", port 0 picks a free one); TLS with `tls`
    (mutual when it has a CA), plaintext without."""
    server = grpc.aio.server(
        interceptors=[TokenInterceptor(token)],
        options=SERVER_OPTIONS,
        maximum_concurrent_rpcs=max_concurrent_rpcs,
    )
    server.add_generic_rpc_handlers((servicer.handler(),))
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_secure_port(bind, server_credentials(tls)) if tls else server.add_insecure_port(bind)
    if port == 0:
        raise OSError(f"cannot bind the wire server to {bind}")
    return server, port
