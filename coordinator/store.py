"""SQLite persistence (WAL): workers (with the digests of their secrets, never the secrets), the membership
epoch, events, the job, the data-plane master key, and the training's history (curve points, formations)."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from coordinator.cluster_state import ClusterState, Event, WorkerInfo, WorkerRecord
from coordinator.credentials import new_master_key
from coordinator.history import CurveRow, FormationRow

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS workers (
    worker_id TEXT PRIMARY KEY, host TEXT NOT NULL, port INTEGER NOT NULL, host_id TEXT NOT NULL,
    device TEXT NOT NULL, device_name TEXT, memory_bytes INTEGER, version TEXT,
    status TEXT NOT NULL, rank INTEGER, joined_wall REAL NOT NULL, last_heartbeat_wall REAL NOT NULL,
    epoch_seen INTEGER NOT NULL, step INTEGER NOT NULL, loss REAL, samples_per_s REAL,
    bytes_sent INTEGER NOT NULL, bytes_received INTEGER NOT NULL, state TEXT NOT NULL,
    secret_digest BLOB, ended_wall REAL
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL, kind TEXT NOT NULL, worker_id TEXT,
    epoch INTEGER NOT NULL, reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS curve (
    series TEXT NOT NULL, step INTEGER NOT NULL, time REAL NOT NULL, first REAL, second REAL,
    PRIMARY KEY (series, step)
);
CREATE TABLE IF NOT EXISTS formations (
    epoch INTEGER NOT NULL, worker_id TEXT NOT NULL, mode TEXT NOT NULL, resumed_at INTEGER NOT NULL,
    steps_lost INTEGER NOT NULL, seconds REAL, time REAL NOT NULL, PRIMARY KEY (epoch, worker_id)
);
"""

# columns added after the first release: a file written by an older coordinator gains them on open
ADDED_COLUMNS = (
    ("secret_digest", "BLOB"),
    ("ended_wall", "REAL"),
    ("store_port", "INTEGER"),
    ("committed_step", "INTEGER"),
)
WORKER_COLUMNS = (
    "worker_id, host, port, host_id, device, device_name, memory_bytes, version, status, rank, joined_wall,"
    " last_heartbeat_wall, epoch_seen, step, loss, samples_per_s, bytes_sent, bytes_received, state,"
    " secret_digest, ended_wall, store_port, committed_step"
)
UPSERT_WORKER = f"INSERT OR REPLACE INTO workers ({WORKER_COLUMNS}) VALUES ({', '.join('?' * 23)})"
UPDATE_HEARTBEAT = (
    "UPDATE workers SET last_heartbeat_wall=?, epoch_seen=?, step=?, loss=?, samples_per_s=?, bytes_sent=?,"
    " bytes_received=?, state=?, committed_step=? WHERE worker_id=?"
)


@dataclass(frozen=True)
class Loaded:
    state: ClusterState
    job_json: str | None
    master_key: bytes
    curve: list[CurveRow]
    formations: list[FormationRow]


@dataclass(frozen=True)
class StoredEvent:
    id: int
    time: float
    kind: str
    worker_id: str | None
    epoch: int
    reason: str


def worker_row(w: WorkerRecord) -> tuple[Any, ...]:
    i = w.info
    return (
        w.worker_id, i.host, i.port, i.host_id, i.device, i.device_name, i.memory_bytes, i.version, w.status,
        w.rank, w.joined_wall, w.last_heartbeat_wall, w.epoch_seen, w.step, w.loss, w.samples_per_s,
        w.bytes_sent, w.bytes_received, w.state, w.secret_digest or None, w.ended_wall, i.store_port,
        w.committed_step,
    )  # fmt: skip


def heartbeat_row(w: WorkerRecord) -> tuple[Any, ...]:
    return (
        w.last_heartbeat_wall, w.epoch_seen, w.step, w.loss, w.samples_per_s, w.bytes_sent, w.bytes_received,
        w.state, w.committed_step, w.worker_id,
    )  # fmt: skip


def _record_from_row(row: sqlite3.Row) -> WorkerRecord:
    info = WorkerInfo(
        row["host"], row["port"], row["host_id"], row["device"], row["device_name"], row["memory_bytes"],
        row["version"], row["store_port"],
    )  # fmt: skip
    return WorkerRecord(
        worker_id=row["worker_id"], info=info, status=row["status"], rank=row["rank"],
        joined_wall=row["joined_wall"], last_heartbeat=0.0, last_heartbeat_wall=row["last_heartbeat_wall"],
        epoch_seen=row["epoch_seen"], step=row["step"], loss=row["loss"], samples_per_s=row["samples_per_s"],
        bytes_sent=row["bytes_sent"], bytes_received=row["bytes_received"], state=row["state"],
        secret_digest=bytes(row["secret_digest"] or b""), ended_wall=row["ended_wall"],
        committed_step=-1 if row["committed_step"] is None else row["committed_step"],
    )  # fmt: skip


class Store:
    """One SQLite file, used from the event-loop thread only. In WAL mode with synchronous=NORMAL a commit
    is an append to the log without fsync (tens of microseconds for a membership change), which is cheaper
    than handing each write to another thread and back; the rare large write is the coalesced heartbeat
    flush, once per flush interval."""

    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        self._conn: sqlite3.Connection | None = None

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("store is not open")
        return self._conn

    # -- opening and loading -------------------------------------------------------------------------
    def open(self) -> Loaded:
        conn = sqlite3.connect(self.path, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit survives a crash of this process (SIGKILL);
        # a power loss may drop the last few.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.executescript(SCHEMA)
        have = {r["name"] for r in conn.execute("PRAGMA table_info(workers)")}
        for name, kind in ADDED_COLUMNS:
            if name not in have:
                conn.execute(f"ALTER TABLE workers ADD COLUMN {name} {kind}")
        self._conn = conn
        meta = {r["key"]: r["value"] for r in conn.execute("SELECT key, value FROM meta")}
        if "master_key" not in meta:  # generated once, kept for the life of the file, never served
            meta["master_key"] = new_master_key().hex()
            with _transaction(conn):
                conn.execute("INSERT INTO meta (key, value) VALUES ('master_key', ?)", (meta["master_key"],))
        rows = conn.execute(f"SELECT {WORKER_COLUMNS} FROM workers")
        workers = {r["worker_id"]: _record_from_row(r) for r in rows}
        state = ClusterState(
            epoch=int(meta.get("epoch", "0")),
            workers=workers,
            finished=meta.get("finished") == "1",
            trained=meta.get("trained") == "1",
        )
        log.info("opened %s: epoch %d, %d worker record(s)", self.path, state.epoch, len(workers))
        curve = [tuple(r) for r in conn.execute("SELECT series, step, time, first, second FROM curve")]
        formations = [
            tuple(r)
            for r in conn.execute(
                "SELECT epoch, worker_id, mode, resumed_at, steps_lost, seconds, time FROM formations"
            )
        ]
        return Loaded(
            state,
            meta.get("job"),
            bytes.fromhex(meta["master_key"]),
            cast(list[CurveRow], curve),
            cast(list[FormationRow], formations),
        )

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- writes ----------------------------------------------------------------------------------------
    def save_job(self, job_json: str) -> None:
        db = self._db()
        with _transaction(db):
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('job', ?)", (job_json,))

    def save(
        self,
        state: ClusterState,
        changed: Iterable[str],
        events: Sequence[Event],
        formation: FormationRow | None = None,
        forget_formations_before: int | None = None,
    ) -> None:
        """One transaction: the epoch and flags, every changed worker row, the events, and a member's
        formation of an epoch (forgetting those of epochs before ``forget_formations_before``)."""
        meta = {"epoch": str(state.epoch), "trained": "1" if state.trained else "0"}
        meta["finished"] = "1" if state.finished else "0"
        rows = [worker_row(state.workers[wid]) for wid in changed]
        ev_rows = [(e.time, e.kind, e.worker_id, e.epoch, e.reason) for e in events]
        db = self._db()
        with _transaction(db):
            db.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", list(meta.items()))
            db.executemany(UPSERT_WORKER, rows)
            db.executemany(
                "INSERT INTO events (time, kind, worker_id, epoch, reason) VALUES (?, ?, ?, ?, ?)", ev_rows
            )
            if formation is not None:
                db.execute("INSERT OR REPLACE INTO formations VALUES (?, ?, ?, ?, ?, ?, ?)", formation)
            if forget_formations_before is not None:
                db.execute("DELETE FROM formations WHERE epoch < ?", (forget_formations_before,))

    def delete_workers(self, worker_ids: Sequence[str]) -> None:
        """Forget purged worker records (their events stay)."""
        db = self._db()
        with _transaction(db):
            db.executemany("DELETE FROM workers WHERE worker_id = ?", [(wid,) for wid in worker_ids])

    def write_heartbeats(
        self,
        rows: list[tuple[Any, ...]],
        meta: dict[str, str],
        curve: Sequence[CurveRow] = (),
        dropped: Sequence[tuple[str, int]] = (),
    ) -> None:
        """Coalesced heartbeat fields (many heartbeats, one transaction), the sticky job flags, and the
        curve points the heartbeats added (``curve``) or thinned out (``dropped``)."""
        db = self._db()
        with _transaction(db):
            db.executemany(UPDATE_HEARTBEAT, rows)
            db.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", list(meta.items()))
            db.executemany("INSERT OR REPLACE INTO curve VALUES (?, ?, ?, ?, ?)", curve)
            db.executemany("DELETE FROM curve WHERE series = ? AND step = ?", dropped)

    # -- reads -----------------------------------------------------------------------------------------
    def events(self, after: int, limit: int) -> list[StoredEvent]:
        cur = self._db().execute(
            "SELECT id, time, kind, worker_id, epoch, reason FROM events WHERE id > ? ORDER BY id LIMIT ?",
            (after, limit),
        )
        return [StoredEvent(*cast(tuple[Any, ...], tuple(r))) for r in cur]


class _transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")


def read_stored_job(path: Path | str) -> str | None:
    """The job JSON stored in an existing state file, without creating or changing anything."""
    if str(path) == ":memory:" or not Path(path).exists():
        return None
    conn = sqlite3.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'job'").fetchone()
    except sqlite3.OperationalError:  # not (yet) a coordinator file
        return None
    finally:
        conn.close()
    return str(row[0]) if row else None
