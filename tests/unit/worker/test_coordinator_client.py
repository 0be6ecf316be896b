"""The coordinator client: credentials, error mapping, bounded retries with backoff."""

from __future__ import annotations

import httpx
import pytest

from worker.coordinator_client import (
    CoordinatorClient,
    CoordinatorUnreachable,
    Forbidden,
    MustRegister,
    RateLimited,
    RequestRejected,
    RetryPolicy,
    SyncCoordinatorClient,
    Unauthorized,
)

FAST = RetryPolicy(attempts=3, backoff_s=0.001, max_backoff_s=0.002)


def client_for(handler: object, retry: RetryPolicy = FAST) -> CoordinatorClient:
    return CoordinatorClient("127.0.0.1:9", "tok", retry=retry, transport=httpx.MockTransport(handler))  # type: ignore[arg-type]


async def test_sends_bearer_token_and_parses_json() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"job": {}, "job_hash": "x"})

    client = client_for(handler)
    assert await client.job() == {"job": {}, "job_hash": "x"}
    await client.close()
    assert seen[0].headers["authorization"] == "Bearer tok"
    assert str(seen[0].url) == "http://127.0.0.1:9/job"


@pytest.mark.parametrize(
    ("status", "error"),
    [(401, Unauthorized), (403, Forbidden), (404, MustRegister), (410, MustRegister), (422, RequestRejected)],
)
async def test_client_errors_raise_at_once_without_retry(status: int, error: type[Exception]) -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(status, json={"detail": "nope"})

    client = client_for(handler)
    with pytest.raises(error):
        await client.heartbeat("w0", {"epoch": 1}, timeout_s=1.0)
    await client.close()
    assert calls == 1


async def test_5xx_and_connection_errors_are_retried_then_succeed() -> None:
    answers = iter(["refused", 503, 200])

    def handler(request: httpx.Request) -> httpx.Response:
        answer = next(answers)
        if answer == "refused":
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(int(answer), json={"epoch": 3, "action": "continue"})

    client = client_for(handler)
    assert (await client.heartbeat("w0", {"epoch": 3}, timeout_s=1.0))["epoch"] == 3
    await client.close()


async def test_unreachable_after_bounded_attempts_names_the_url() -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        raise httpx.ConnectError("refused", request=request)

    client = client_for(handler)
    with pytest.raises(CoordinatorUnreachable, match=r"127\.0\.0\.1:9.*3 attempts"):
        await client.register({"host": "h", "port": 1})
    await client.close()
    assert calls == 3


async def test_leave_of_an_unknown_worker_is_not_an_error() -> None:
    client = client_for(lambda request: httpx.Response(404, json={"detail": "unknown"}))
    await client.leave("w9")
    await client.close()


def test_backoff_doubles_and_is_capped() -> None:
    policy = RetryPolicy(attempts=10, backoff_s=0.1, max_backoff_s=0.5)
    assert [policy.delay(i) for i in range(4)] == [0.1, 0.2, 0.4, 0.5]


def test_sync_client_against_a_closed_port_is_unreachable() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens there
    with SyncCoordinatorClient(f"http://127.0.0.1:{port}", "tok", retry=FAST) as client:
        assert not client.healthy()
        with pytest.raises(CoordinatorUnreachable):
            client.cluster_status()


async def test_the_worker_secret_replaces_the_cluster_token_after_registration() -> None:
    seen: list[tuple[str, str, str | None, str | None]] = []
    secrets = iter(["first-secret", "second-secret"])

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(
            (
                request.method,
                request.url.path,
                request.headers.get("authorization"),
                request.headers.get("x-worker-secret"),
            )
        )
        if request.url.path == "/workers/register":
            return httpx.Response(201, json={"worker_id": "w0", "epoch": 1, "worker_secret": next(secrets)})
        if request.url.path == "/training/ready":
            return httpx.Response(200, json={"ready": False})
        return httpx.Response(200, json={"epoch": 1, "action": "continue", "job": {}, "job_hash": "x"})

    client = client_for(handler)
    await client.job()
    answer = await client.register({"worker_id": "w0"})
    assert "worker_secret" not in answer  # held by the client only
    await client.heartbeat("w0", {"epoch": 1}, timeout_s=1.0)
    await client.ready(1, wait_s=0.0)
    await client.register({"worker_id": "w0"})  # again: proves the id with the secret it holds
    await client.leave("w0")
    await client.job()
    await client.close()
    assert seen == [
        ("GET", "/job", "Bearer tok", None),
        ("POST", "/workers/register", "Bearer tok", None),
        ("POST", "/workers/w0/heartbeat", "Bearer first-secret", None),
        ("GET", "/training/ready", "Bearer first-secret", None),
        ("POST", "/workers/register", "Bearer tok", "first-secret"),
        ("DELETE", "/workers/w0", "Bearer second-secret", None),
        ("GET", "/job", "Bearer tok", None),
    ]
    assert client.worker_secret == "second-secret"


async def test_a_wrong_worker_secret_says_so() -> None:
    client = client_for(lambda request: httpx.Response(401, json={"detail": "unknown"}))
    client.worker_secret = "stale"
    with pytest.raises(Unauthorized, match="no longer knows this worker's secret"):
        await client.heartbeat("w0", {"epoch": 1}, timeout_s=1.0)
    with pytest.raises(Unauthorized, match="rejected the cluster token"):
        await client.job()
    await client.close()


async def test_429_waits_for_retry_after_without_using_up_attempts() -> None:
    answers = iter([429, 429, 429, 201])
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        code = next(answers)
        if code == 429:
            return httpx.Response(429, headers={"Retry-After": "0"}, json={"detail": "slow down"})
        return httpx.Response(201, json={"worker_id": "w0", "worker_secret": "s"})

    client = client_for(handler, RetryPolicy(attempts=1, backoff_s=0.001, rate_limited_s=1.0))
    assert (await client.register({}))["worker_id"] == "w0"
    assert calls == 4
    await client.close()


async def test_429_gives_up_after_the_policy_time() -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(429, headers={"Retry-After": "1"}, json={"detail": "slow down"})

    client = client_for(handler, RetryPolicy(attempts=3, rate_limited_s=0.5))
    with pytest.raises(RateLimited):
        await client.register({})
    assert calls == 1  # the first wait (at least 1 s) would already exceed the 0.5 s allowed
    await client.close()


def test_the_cli_client_names_the_read_token() -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Refuse(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            code = 401 if self.headers.get("Authorization") != "Bearer cluster" else 403
            body = b'{"detail": "no"}'
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Refuse)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        with SyncCoordinatorClient(url, "wrong", retry=FAST, timeout_s=2.0) as client:
            with pytest.raises(Unauthorized, match="ZEROWIRE_READ_TOKEN"):
                client.cluster_status()
        with SyncCoordinatorClient(url, "cluster", retry=FAST, timeout_s=2.0) as client:
            with pytest.raises(Forbidden, match="GET /cluster/status"):
                client.cluster_status()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
