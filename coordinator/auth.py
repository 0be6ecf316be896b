"""Who may call what. Each route names a `Gate`: the credential kinds it admits. A request's bearer credential
is identified as an operator token (cluster, read-only, admin) or a worker's secret.

- 401: no bearer credential, or one this coordinator does not know.
- 403: a known credential that does not grant the route, or a worker secret used for another worker.
- Routes of one worker (`/workers/{worker_id}/...`) admit only that worker's own secret (and, where the gate
  says so, the admin token). An id the coordinator does not know passes the gate: the route answers 404
  (or 422 for a malformed id), so a worker whose record is gone learns to register again.

The checks read the Authorization header directly (no security sub-dependency): the heartbeat gate costs
one sha256 and one constant-time comparison.
"""

from __future__ import annotations

import base64
import binascii
from typing import TYPE_CHECKING, Any

from fastapi import HTTPException, Request, status

from coordinator.credentials import ANYONE, Principal, PrincipalKind, digest, same_digest
from coordinator.settings import CoordinatorSettings

if TYPE_CHECKING:
    from coordinator.service import CoordinatorService

# OpenAPI security schemes, one per credential kind (all bearer tokens)
SECURITY_SCHEMES: dict[str, dict[str, str]] = {
    "clusterToken": {
        "type": "http",
        "scheme": "bearer",
        "description": "the cluster token (--token): admits a worker: registration and reading the job",
    },
    "workerSecret": {
        "type": "http",
        "scheme": "bearer",
        "description": "a worker's own secret (worker_secret of its registration answer)",
    },
    "readToken": {"type": "http", "scheme": "bearer", "description": "the read-only token (--read-token)"},
    "adminToken": {"type": "http", "scheme": "bearer", "description": "the admin token (--admin-token)"},
}
SCHEME_OF: dict[PrincipalKind, str] = {
    "cluster": "clusterToken",
    "worker": "workerSecret",
    "read": "readToken",
    "admin": "adminToken",
}


async def get_settings(request: Request) -> CoordinatorSettings:
    settings: CoordinatorSettings = request.app.state.settings
    return settings


def bearer(request: Request) -> str | None:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    given = given.strip()
    return given if scheme.lower() == "bearer" and given else None


def basic_password(request: Request) -> str | None:
    """The password of HTTP Basic credentials (browsers ask for it on /docs; the user name is ignored)."""
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(given.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return decoded.partition(":")[2] or None


def unauthorized(detail: str, challenge: str = "Bearer") -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail, headers={"WWW-Authenticate": challenge})


def forbidden(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_403_FORBIDDEN, detail)


def identify(service: CoordinatorService, token: str) -> Principal | None:
    """The principal `token` speaks for, or None when no credential matches."""
    d = digest(token)
    kind = service.tokens.match(d)
    if kind is not None:
        return Principal(kind)
    worker_id = service.worker_by_digest(d)
    return Principal("worker", worker_id, d) if worker_id is not None else None


class Gate:
    """A route's access rule. `own_worker`: the route acts on the worker named in its path, and `worker` means
    that worker's own secret. `browser`: also accept the token as the password of HTTP Basic credentials."""

    def __init__(self, *kinds: PrincipalKind, own_worker: bool = False, browser: bool = False) -> None:
        self.kinds = frozenset(kinds)
        self.own_worker = own_worker
        self.browser = browser
        self.openapi: dict[str, Any] = {"security": [{SCHEME_OF[k]: []} for k in kinds]}

    def _token(self, request: Request) -> str | None:
        token = bearer(request)
        if token is None and self.browser:
            token = basic_password(request)
        return token

    async def __call__(self, request: Request) -> Principal:
        app_state = request.app.state
        service: CoordinatorService = app_state.service
        token = self._token(request)
        if app_state.settings.insecure_no_auth:  # anyone may do anything; a worker still gets its keys
            known = identify(service, token) if token is not None and not self.own_worker else None
            return known if known is not None else ANYONE
        challenge = 'Basic realm="zerowire"' if self.browser else "Bearer"
        if token is None:
            raise unauthorized("missing bearer credential (Authorization: Bearer ...)", challenge)
        if self.own_worker:
            return self._own(service, request.path_params.get("worker_id", ""), token)
        principal = identify(service, token)
        if principal is None:
            raise unauthorized("unknown bearer credential", challenge)
        if principal.kind not in self.kinds:
            raise forbidden(f"{principal.describe()} does not grant {request.method} {request.url.path}")
        return principal

    def _own(self, service: CoordinatorService, worker_id: str, token: str) -> Principal:
        d = digest(token)
        record = service.state.workers.get(worker_id)
        if record is None:  # the route answers 404 (or 422): register again
            return Principal("worker", worker_id, d)
        if same_digest(record.secret_digest, d):
            return Principal("worker", worker_id, d)
        other = identify(service, token)
        if other is None:
            raise unauthorized(f"not the secret of worker {worker_id!r}, nor any credential known here")
        if other.kind in self.kinds and other.kind != "worker":
            return other
        raise forbidden(f"{other.describe()} does not speak for worker {worker_id!r}")


# The access rules (see the table in README.md, "REST API")
REGISTER = Gate("cluster")
OWN_WORKER = Gate("worker", own_worker=True)
LEAVE_OR_EVICT = Gate("worker", "admin", own_worker=True)
BARRIER = Gate("worker")
JOB = Gate("cluster", "worker", "read", "admin")
LISTING = Gate("worker", "read", "admin")
OPERATOR = Gate("read", "admin")
DOCS = Gate("read", "admin", browser=True)
