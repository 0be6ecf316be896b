"""An in-process fake of the coordinator's REST API for unit tests of the worker (httpx.MockTransport).

Minimal semantics: registering (again) bumps the epoch and re-ranks; a heartbeat of an older epoch
answers `reform`; `ready` answers whether enough workers are alive. Credentials as the real one: the
cluster token registers and reads the job; registration answers a per-worker secret, which a live id needs
(X-Worker-Secret) to register again and which its heartbeats, leave and the barrier use. Every request is
recorded, with the credential it carried.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from jobspec import JobSpec


async def eventually(predicate: Callable[[], object], timeout_s: float = 5.0) -> None:
    """Wait until `predicate()` is true (polling); fail the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(0.01)


@dataclass
class FakeCoordinator:
    job: JobSpec = field(default_factory=lambda: JobSpec(steps=5, warmup_steps=0))
    token: str = "secret"
    epoch: int = 0
    workers: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[tuple[float, str, str, dict[str, Any]]] = field(default_factory=list)
    heartbeat_status: int = 200  # set to 410 to declare workers dead, 503 to simulate an outage
    action: str | None = None  # forced heartbeat action
    served_hash: str | None = None
    next_id: int = 0
    secrets: dict[str, str] = field(default_factory=dict)  # worker id -> its secret
    credentials: list[tuple[str, str, str]] = field(default_factory=list)  # (method, path, bearer)
    timeouts: dict[str, Any] = field(  # announced in GET /job, as the real coordinator's settings
        default_factory=lambda: {
            "collective_timeout_s": 30.0,
            "startup_timeout_s": 120.0,
            "barrier_timeout_s": 600.0,
        }
    )

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def _bump(self) -> None:
        self.epoch += 1
        for rank, wid in enumerate(sorted(self.workers)):
            self.workers[wid]["rank"] = rank

    def add_worker(self, worker_id: str, host: str = "127.0.0.1", port: int = 1) -> str:
        """Add (or re-add) a live worker; returns its secret (kept when it had one)."""
        self.workers[worker_id] = {"worker_id": worker_id, "host": host, "port": port, "host_id": "h"}
        self.secrets.setdefault(worker_id, secrets.token_urlsafe(32))
        self._bump()
        return self.secrets[worker_id]

    def pair_key(self, a: str, b: str, epoch: int | None = None) -> str:
        lo, hi = sorted((a, b))
        return hashlib.sha256(f"{lo}:{hi}:{self.epoch if epoch is None else epoch}".encode()).hexdigest()

    def _caller(self, request: httpx.Request) -> str | None:
        """The worker whose secret the request carries (None: not a worker's secret)."""
        given = request.headers.get("authorization", "").removeprefix("Bearer ")
        return next((wid for wid, secret in self.secrets.items() if secret == given), None)

    def calls(self, method: str, path_part: str) -> list[tuple[float, str, str, dict[str, Any]]]:
        return [r for r in self.requests if r[1] == method and path_part in r[2]]

    def handle(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else {}
        path = request.url.path
        self.requests.append((time.monotonic(), request.method, path, body))
        bearer = request.headers.get("authorization", "").removeprefix("Bearer ")
        self.credentials.append((request.method, path, bearer))
        cluster = bearer == self.token
        caller = self._caller(request)
        if not cluster and caller is None:
            return httpx.Response(401, json={"detail": "bad token"})
        if path == "/workers/register" and not cluster:
            return httpx.Response(403, json={"detail": "registration needs the cluster token"})
        if path.startswith("/workers/") and path != "/workers/register":
            target = path.split("/")[2]
            if target in self.secrets and caller != target:
                return httpx.Response(403, json={"detail": f"not the secret of {target}"})
        if path in ("/workers", "/training/ready") and caller is None:
            return httpx.Response(403, json={"detail": "a worker's secret is needed"})
        if path == "/job":
            return httpx.Response(
                200,
                json={
                    "job": self.job.model_dump(mode="json"),
                    "job_hash": self.served_hash or self.job.hash,
                    **self.timeouts,
                },
            )
        if path == "/workers/register":
            wid = body.get("worker_id") or f"w{self.next_id}"
            self.next_id += 1
            if wid in self.workers and request.headers.get("x-worker-secret") != self.secrets[wid]:
                return httpx.Response(403, json={"detail": f"{wid} is live: its secret is needed"})
            if wid not in self.workers:
                self.secrets.pop(wid, None)  # a dead or unknown id gets a fresh secret
            secret = self.add_worker(wid, body["host"], body["port"])
            return httpx.Response(
                201,
                json={
                    "worker_id": wid,
                    "epoch": self.epoch,
                    "heartbeat_interval_s": 0.05,
                    "heartbeat_timeout_s": 0.3,
                    "rank": 0,
                    "world_size": 1,
                    "worker_secret": secret,
                },
            )
        if path.startswith("/workers/") and path.endswith("/heartbeat"):
            wid = path.split("/")[2]
            if self.heartbeat_status != 200:
                return httpx.Response(self.heartbeat_status, json={"detail": "fake"})
            if wid not in self.workers:
                return httpx.Response(404, json={"detail": "unknown"})
            self.workers[wid]["worker_state"] = body.get("state", "starting")
            action = self.action or ("reform" if body["epoch"] < self.epoch else "continue")
            return httpx.Response(200, json={"epoch": self.epoch, "action": action})
        if path.startswith("/workers/") and request.method == "DELETE":
            wid = path.split("/")[2]
            if self.workers.pop(wid, None) is not None:
                self._bump()
            return httpx.Response(204)
        if path == "/workers" and request.method == "GET":
            views = [
                {
                    "worker_id": w["worker_id"],
                    "state": "alive",
                    "worker_state": w.get("worker_state", "starting"),
                }
                for w in self.workers.values()
            ]
            return httpx.Response(200, json={"epoch": self.epoch, "workers": views})
        if path == "/training/ready":
            n = int(request.url.params["min_workers"])
            members = [
                {
                    "worker_id": w["worker_id"],
                    "ip_address": w["host"],
                    "port": w["port"],
                    "rank": w["rank"],
                    "host_id": w["host_id"],
                }
                for w in sorted(self.workers.values(), key=lambda w: w["rank"])
            ]
            return httpx.Response(
                200,
                json={
                    "ready": len(members) >= n,
                    "epoch": self.epoch,
                    "active_workers": len(members),
                    "min_workers": n,
                    "job_hash": self.job.hash,
                    "workers": members,
                    "peer_keys": {
                        w["worker_id"]: self.pair_key(caller, w["worker_id"])
                        for w in members
                        if caller in self.workers and w["worker_id"] != caller
                    },
                },
            )
        return httpx.Response(404, json={"detail": f"no route {path}"})
