"""HTTP client of the coordinator's REST API: credentials, per-call timeouts, bounded retries.

A worker holds two credentials: the cluster token, which admits it (registration, the job), and the
secret its registration answers, the bearer credential of everything it does afterwards (heartbeats,
leave, the barrier). A re-registration presents the secret in X-Worker-Secret; the client keeps whatever
secret the coordinator answers. The secret lives in this process's memory only.

Connection errors and 5xx answers are retried with exponential backoff (bounded attempts); a 429 is
retried after its Retry-After (bounded in time); a 401 (unknown credential), a 403 (a credential that does
not grant the call), a 404/410 or a 409 on a heartbeat (this worker must register again) and other 4xx
answers raise at once, each as its own exception so the daemon can act on it. Used from the worker's
asyncio loop (`CoordinatorClient`) and from the CLI (`SyncCoordinatorClient`, with an operator token).
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from dataclasses import dataclass
from typing import Any, Literal

import httpx

from communication.tls import https_hint

log = logging.getLogger(__name__)


class CoordinatorError(Exception):
    """Base class of every error talking to the coordinator."""


class Unauthorized(CoordinatorError):
    """The coordinator does not know the credential (401)."""


class Forbidden(CoordinatorError):
    """The coordinator knows the credential but it does not grant the call (403): for example an operator
    route with the cluster token, or a live worker id registered again without its secret."""


class MustRegister(CoordinatorError):
    """The coordinator does not know this worker (404), declared it dead (410), or is at an older epoch than
    the one this worker reports (409: its state was replaced); either way, register again."""


class CoordinatorUnreachable(CoordinatorError):
    """No answer (connection refused, timeout, 5xx) after every retry."""


class RequestRejected(CoordinatorError):
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
    rate_limited_s: float = 120.0  # longest total wait on 429 answers (Retry-After) before giving up

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


Credential = Literal["cluster", "worker", "operator"]
UNAUTHORIZED_HINT: dict[str, str] = {
    "cluster": "the coordinator rejected the cluster token (401): check --token / ZEROWIRE_TOKEN",
    "worker": "the coordinator no longer knows this worker's secret (401): its id was registered again "
    "by another process",
    "operator": "the coordinator rejected the token (401): check --token / ZEROWIRE_READ_TOKEN "
    "(the read-only or admin token)",
}


class RateLimited(CoordinatorError):
    """429: try again after `retry_after_s`."""

    def __init__(self, retry_after_s: float, detail: str) -> None:
        super().__init__(f"coordinator answered 429: {detail}")
        self.retry_after_s = retry_after_s


def _retry_after(response: httpx.Response) -> float:
    try:
        return max(0.0, float(response.headers.get("retry-after", "1")))
    except ValueError:  # an HTTP date: not sent by zerowire
        return 1.0


def check_response(response: httpx.Response, credential: Credential = "cluster") -> None:
    """Map an answer to the client's exceptions (5xx is a `CoordinatorUnreachable` candidate for retry)."""
    status = response.status_code
    if status < 400:
        return
    if status == 401:
        raise Unauthorized(UNAUTHORIZED_HINT[credential])
    if status == 403:
        raise Forbidden(
            f"the coordinator refused {response.request.method} {response.request.url.path} (403): "
            f"{_detail(response)}"
        )
    if status == 429:
        raise RateLimited(_retry_after(response), _detail(response))
    stale_epoch = status == 409 and response.request.url.path.endswith("/heartbeat")
    if status in (404, 410) or stale_epoch:
        raise MustRegister(
            f"{response.request.method} {response.request.url.path}: {status} {_detail(response)}"
        )
    if status >= 500:
        raise CoordinatorUnreachable(f"coordinator error {status}: {_detail(response)}")
    raise RequestRejected(status, _detail(response))


def _base_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    return url


def _headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _rate_limit_wait(exc: RateLimited, waited: float, policy: RetryPolicy) -> float | None:
    """How long to sleep before retrying a 429 (with jitter, so rate-limited workers do not return as one
    herd), or None when the policy's time for rate-limited waits is spent."""
    delay = max(exc.retry_after_s, policy.backoff_s) * (1.0 + 0.5 * random.random())
    return delay if waited + delay <= policy.rate_limited_s else None


class CoordinatorClient:
    """Async client (one httpx.AsyncClient, connection reuse). Every method has its own timeout.

    `token` is the cluster token; `worker_secret` (set by `register`) is the credential of every call but
    registration and the job once known."""

    def __init__(
        self,
        url: str,
        token: str | None,
        *,
        worker_secret: str | None = None,
        timeout_s: float = 5.0,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        self.url = _base_url(url)
        self.timeout_s = timeout_s
        self.retry = retry or RetryPolicy()
        self.worker_secret = worker_secret
        self._token = token
        self._http = httpx.AsyncClient(
            base_url=self.url, timeout=timeout_s, transport=transport, verify=verify
        )

    def _credential(self, use: Credential | None) -> tuple[Credential, dict[str, str]]:
        if use is None:
            use = "worker" if self.worker_secret else "cluster"
        return use, _headers(self.worker_secret if use == "worker" else self._token)

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
        credential: Credential | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        """`credential`: "cluster" or "worker" (default: the worker secret once known, else the cluster
        token)."""
        policy = retry or self.retry
        last: Exception | None = None
        attempt = 0
        rate_limited = 0.0
        while attempt < policy.attempts:
            use, auth = self._credential(credential)
            try:
                response = await self._http.request(
                    method,
                    path,
                    json=json,
                    params=params,
                    headers={**auth, **(headers or {})},
                    timeout=timeout_s or self.timeout_s,
                )
                check_response(response, use)
                return response
            except RateLimited as exc:
                wait = _rate_limit_wait(exc, rate_limited, policy)
                if wait is None:
                    raise
                log.info("%s %s rate-limited; retry in %.1fs", method, path, wait)
                rate_limited += wait
                await asyncio.sleep(wait)  # a 429 does not use up an attempt
            except (httpx.TransportError, CoordinatorUnreachable) as exc:
                last = exc
                attempt += 1
                if attempt < policy.attempts:
                    delay = policy.delay(attempt - 1)
                    log.debug("%s %s failed (%s); retry in %.2fs", method, path, exc, delay)
                    await asyncio.sleep(delay)
        raise CoordinatorUnreachable(
            f"coordinator {self.url} unreachable ({method} {path}, {policy.attempts} attempts): {last}"
            + https_hint(self.url, last)
        )

    async def register(self, body: dict[str, Any]) -> dict[str, Any]:
        """Register (again) with the cluster token, proving the id with the secret held, if any; keep the
        secret the coordinator answers (it is not returned)."""
        proof = {"X-Worker-Secret": self.worker_secret} if self.worker_secret else None
        response = await self.request(
            "POST", "/workers/register", json=body, credential="cluster", headers=proof
        )
        answer = dict(response.json())
        secret = answer.pop("worker_secret", None)  # held here only: never handed around or logged
        if isinstance(secret, str) and secret:
            self.worker_secret = secret
        return answer

    async def heartbeat(
        self, worker_id: str, body: dict[str, Any], *, timeout_s: float, retry: RetryPolicy | None = None
    ) -> dict[str, Any]:
        response = await self.request(
            "POST", f"/workers/{worker_id}/heartbeat", json=body, timeout_s=timeout_s, retry=retry
        )
        return dict(response.json())

    async def suspect(self, worker_id: str, epoch: int, suspect: int | str, reason: str) -> dict[str, Any]:
        """Report a peer of `epoch` (its rank, or its worker id) that this worker found unreachable or
        stalled. Evidence only: the coordinator decides whom to evict, and answers `evicted` (or None).
        RequestRejected(409) when `epoch` is no longer the current one (form the new epoch first)."""
        response = await self.request(
            "POST",
            f"/workers/{worker_id}/suspect",
            json={"epoch": epoch, "suspect": suspect, "reason": reason},
            retry=RetryPolicy(attempts=2),
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
        response = await self.request("GET", "/job", credential="cluster")
        return dict(response.json())

    async def cluster_status(self) -> dict[str, Any]:
        response = await self.request("GET", "/cluster/status")
        return dict(response.json())


class SyncCoordinatorClient:
    """Blocking client for the CLI (`zerowire status`, `zerowire run`), with an operator token (read-only or
    admin)."""

    def __init__(
        self,
        url: str,
        token: str | None,
        *,
        timeout_s: float = 5.0,
        retry: RetryPolicy | None = None,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        self.url = _base_url(url)
        self.timeout_s = timeout_s
        self.retry = retry or RetryPolicy(attempts=3)
        self._http = httpx.Client(
            base_url=self.url, headers=_headers(token), timeout=timeout_s, verify=verify
        )

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
                check_response(response, "operator")
                return response.json()
            except (httpx.TransportError, CoordinatorUnreachable) as exc:
                last = exc
                if attempt + 1 < policy.attempts:
                    time.sleep(policy.delay(attempt))
        raise CoordinatorUnreachable(
            f"coordinator {self.url} unreachable (GET {path}): {last}{https_hint(self.url, last)}"
        )

    def cluster_status(self) -> dict[str, Any]:
        return dict(self.get("/cluster/status"))

    def diagnosis(self) -> dict[str, Any]:
        return dict(self.get("/cluster/diagnosis"))

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
