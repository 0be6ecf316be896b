"""The coordinator client: token, error mapping, bounded retries with backoff."""

from __future__ import annotations

import httpx
import pytest

from worker.coordinator_client import (
    CoordinatorClient,
    CoordinatorUnreachable,
    MustRegister,
    Rejected,
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
    ("status", "error"), [(401, Unauthorized), (404, MustRegister), (410, MustRegister), (422, Rejected)]
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
