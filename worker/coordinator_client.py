"""HTTP client of the coordinator's REST API: bearer token, per-call timeouts, bounded retries.

Connection errors and 5xx answers are retried with exponential backoff (bounded attempts); a 401
(wrong token), a 404/410 or a 409 on a heartbeat (this worker must register again) and other 4xx
answers raise at once, each as its own exception so the daemon can act on it. Used from the worker's
asyncio loop (`CoordinatorClient`) and from the CLI (`SyncCoordinatorClient`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import httpx

log = logging.getLogger(__name__)


class CoordinatorError(Exception):
    """Base class of every error talking to the coordinator."""


class Unauthorized(CoordinatorError):
    """The coordinator rejected the cluster token (401)."""


class MustRegister(CoordinatorError):
    """The coordinator does not know this worker (404), declared it dead (410), or is at an older epoch than
    the one this worker reports (409: its state was replaced); either way, register again."""


class CoordinatorUnreachable(CoordinatorError):
    """No answer (connection refused, timeout, 5xx) after every retry."""


class Rejected(CoordinatorError):
    """Any other 4xx answer: the request itself is wrong (message from the coordinator)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"coordinator answered {status}: {detail}")
        self.status = status
        self.detail = detail


@dataclass(frozen=True)
class RetryPolicy:
    """How hard one call tries: `attempts` tries, backoff doubling from `backoff_s` up to `max_backoff_s`."""

    attempts: int = 4
    backoff_s: float = 0.1
    max_backoff_s: float = 2.0

    def delay(self, attempt: int) -> float:
        return float(min(self.max_backoff_s, self.backoff_s * (2**attempt)))


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    if isinstance(body, dict) and "detail" in body:
        return str(body["detail"])[:300]
    return str(body)[:300]


def check_response(response: httpx.Response) -> None:
    """Map an answer to the client's exceptions (5xx is a `CoordinatorUnreachable` candidate for retry)."""
    status = response.status_code
    if status < 400:
        return
    if status == 401:
        raise Unauthorized("the coordinator rejected the cluster token (401): check --token / ZEROWIRE_TOKEN")
    stale_epoch = status == 409 and response.request.url.path.endswith("/heartbeat")
    if status in (404, 410) or stale_epoch:
        raise MustRegister(
            f"{response.request.method} {response.request.url.path}: {status} {_detail(response)}"
        )
    if status >= 500:
        raise CoordinatorUnreachable(f"coordinator error {status}: {_detail(response)}")
    raise Rejected(status, _detail(response))


def _base_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    return url


def _headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


class CoordinatorClient:
    """Async client (one httpx.AsyncClient, connection reuse). Every method has its own timeout."""

    def __init__(
        self,
        url: str,
        token: str | None,
        *,
        timeout_s: float = 5.0,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = _base_url(url)
        self.timeout_s = timeout_s
        self.retry = retry or RetryPolicy()
        self._http = httpx.AsyncClient(
            base_url=self.url, headers=_headers(token), timeout=timeout_s, transport=transport
        )

    async def close(self) -> None:
        await self._http.aclose()

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
        timeout_s: float | None = None,
        retry: RetryPolicy | None = None,
    ) -> httpx.Response:
        policy = retry or self.retry
        last: Exception | None = None
        for attempt in range(policy.attempts):
            try:
                response = await self._http.request(
                    method, path, json=json, params=params, timeout=timeout_s or self.timeout_s
                )
                check_response(response)
                return response
            except (httpx.TransportError, CoordinatorUnreachable) as exc:
                last = exc
                if attempt + 1 < policy.attempts:
                    delay = policy.delay(attempt)
                    log.debug("%s %s failed (%s); retry in %.2fs", method, path, exc, delay)
                    await asyncio.sleep(delay)
        raise CoordinatorUnreachable(
            f"coordinator {self.url} unreachable ({method} {path}, {policy.attempts} attempts): {last}"
        )

    async def register(self, body: dict[str, Any]) -> dict[str, Any]:
        response = await self.request("POST", "/workers/register", json=body)
        return dict(response.json())

    async def heartbeat(
        self, worker_id: str, body: dict[str, Any], *, timeout_s: float, retry: RetryPolicy | None = None
    ) -> dict[str, Any]:
        response = await self.request(
            "POST", f"/workers/{worker_id}/heartbeat", json=body, timeout_s=timeout_s, retry=retry
        )
        return dict(response.json())

    async def leave(self, worker_id: str) -> None:
        try:
            await self.request("DELETE", f"/workers/{worker_id}", retry=RetryPolicy(attempts=2))
        except MustRegister:
            pass  # already gone

    async def ready(self, min_workers: int, wait_s: float) -> dict[str, Any]:
        response = await self.request(
            "GET",
            "/training/ready",
            params={"min_workers": min_workers, "wait_s": wait_s},
            timeout_s=wait_s + self.timeout_s,
        )
        return dict(response.json())

    async def job(self) -> dict[str, Any]:
        response = await self.request("GET", "/job")
        return dict(response.json())

    async def cluster_status(self) -> dict[str, Any]:
        response = await self.request("GET", "/cluster/status")
        return dict(response.json())


class SyncCoordinatorClient:
    """Blocking client for the CLI (`zerowire status`, `zerowire run`)."""

    def __init__(
        self, url: str, token: str | None, *, timeout_s: float = 5.0, retry: RetryPolicy | None = None
    ) -> None:
        self.url = _base_url(url)
        self.timeout_s = timeout_s
        self.retry = retry or RetryPolicy(attempts=3)
        self._http = httpx.Client(base_url=self.url, headers=_headers(token), timeout=timeout_s)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> SyncCoordinatorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get(self, path: str, params: dict[str, Any] | None = None, retry: RetryPolicy | None = None) -> Any:
        policy = retry or self.retry
        last: Exception | None = None
        for attempt in range(policy.attempts):
            try:
                response = self._http.get(path, params=params)
                check_response(response)
                return response.json()
            except (httpx.TransportError, CoordinatorUnreachable) as exc:
                last = exc
                if attempt + 1 < policy.attempts:
                    time.sleep(policy.delay(attempt))
        raise CoordinatorUnreachable(f"coordinator {self.url} unreachable (GET {path}): {last}")

    def cluster_status(self) -> dict[str, Any]:
        return dict(self.get("/cluster/status"))

    def events(self, after: int = 0) -> list[dict[str, Any]]:
        body = self.get("/events", params={"after": after})
        if isinstance(body, dict):
            body = body.get("events", [])
        return [dict(e) for e in body]

    def healthy(self) -> bool:
        try:
            return self._http.get("/healthz", timeout=1.0).status_code == 200
        except httpx.TransportError:
            return False
