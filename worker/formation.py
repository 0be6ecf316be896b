"""Forming an epoch: the worker's failure kinds and exit codes, and the pure step from the barrier's
answer to the epoch's PeerGroup."""

from __future__ import annotations

from typing import Any

from communication.group import PeerGroup
from jobspec import JobSpec
from worker.identity import format_address

EXIT_OK = 0
EXIT_TRAINING_FAILED = 1
EXIT_CONFIG = 2
EXIT_JOB_MISMATCH = 3


class JobMismatch(Exception):
    """The job the coordinator serves is not the one this worker agreed to train."""


class ConfigError(Exception):
    """The worker's settings do not fit the coordinator's (for example timeouts that do not nest)."""


class BarrierTimeout(Exception):
    """No epoch with this worker in it became ready within the barrier timeout."""


class Stopped(Exception):
    """A stop was requested (signal or coordinator) while waiting."""


class TooManyReforms(Exception):
    """The cluster keeps re-forming without a single step of progress."""


def checked_job(answer: dict[str, Any], expect_hash: str | None) -> JobSpec:
    """The job of the coordinator's GET /job answer, checked against its hash and the one expected."""
    from worker.identity import parse_job_answer

    try:
        job, job_hash = parse_job_answer(answer)
    except ValueError as exc:  # pydantic's ValidationError included
        raise JobMismatch(f"cannot read the coordinator's job (another zerowire version?): {exc}") from exc
    if job.hash != job_hash:
        raise JobMismatch(
            f"the coordinator's job hash {job_hash[:12]} differs from its spec's {job.hash[:12]}"
        )
    if expect_hash and not job_hash.startswith(expect_hash):
        raise JobMismatch(
            f"the coordinator serves job {job.job_id} with hash {job_hash[:12]}, "
            f"not the expected {expect_hash[:12]}"
        )
    return job


def peer_keys_by_rank(ready: dict[str, Any], ids: tuple[str, ...], worker_id: str) -> dict[int, bytes]:
    """The barrier's `peer_keys` (worker id -> hex key) keyed by rank; {} when it sent none. A key for a
    non-member, for this worker itself, or that is not 32 bytes of hex is an error."""
    raw = ready.get("peer_keys") or {}
    if not isinstance(raw, dict):
        raise RuntimeError("barrier answered peer_keys that are not an object")
    keys: dict[int, bytes] = {}
    for wid, value in raw.items():
        if wid not in ids or wid == worker_id:
            raise RuntimeError(f"barrier answered a peer key for {wid!r}, not another member of the epoch")
        try:
            key = bytes.fromhex(str(value))
        except ValueError:
            key = b""
        if len(key) != 32:
            raise RuntimeError(f"barrier answered a malformed peer key for {wid!r}")
        keys[ids.index(wid)] = key
    return keys


def group_from_ready(
    ready: dict[str, Any], job: JobSpec, worker_id: str
) -> tuple[PeerGroup, tuple[str, ...]]:
    """The PeerGroup of the epoch the barrier announced, as seen by `worker_id`, and its members' ids in
    rank order. Ranks must be dense and this worker a member; the data-plane keys ride along by rank."""
    members = sorted(ready["workers"], key=lambda w: int(w["rank"]))
    ids = tuple(str(w["worker_id"]) for w in members)
    ranks = [int(w["rank"]) for w in members]
    if ranks != list(range(len(members))):
        raise RuntimeError(f"barrier answered non-dense ranks {ranks}")
    if worker_id not in ids:
        raise RuntimeError(f"worker {worker_id} is not a member of epoch {ready['epoch']}")
    group = PeerGroup(
        job_id=job.job_id,
        epoch=int(ready["epoch"]),
        rank=ids.index(worker_id),
        addresses=tuple(format_address(str(w["ip_address"]), int(w["port"])) for w in members),
        host_ids=tuple(str(w.get("host_id") or "") for w in members),
        peer_keys=peer_keys_by_rank(ready, ids, worker_id),
        store_addresses=store_addresses(members),
    )
    return group, ids


def store_addresses(members: list[dict[str, Any]]) -> tuple[str, ...]:
    """Each member's rendezvous store as "host:port" ("" for a member that hosts none); () when none does.
    A store listens on its machine's loopback, and only members that share the machine use it."""
    addresses = tuple(
        format_address("127.0.0.1", int(w["store_port"])) if w.get("store_port") else "" for w in members
    )
    return addresses if any(addresses) else ()


def suspect_of(exc: BaseException, group: PeerGroup, members: tuple[str, ...]) -> str | None:
    """The worker id of the member a lost connection points at (PeerLost naming a member's address,
    never this worker itself), or None."""
    from communication.errors import PeerLost

    if not isinstance(exc, PeerLost) or exc.peer is None or exc.peer not in group.addresses:
        return None
    rank = group.addresses.index(exc.peer)
    return members[rank] if rank != group.rank and rank < len(members) else None
