"""`SqliteStore`: chain snapshots in an SQLite database (stdlib ``sqlite3``), WAL mode.

Layout (``PRAGMA user_version`` = 1)::

    snapshots(chain_id TEXT PRIMARY KEY, blob BLOB, ended INTEGER, updated_at REAL)
    quarantine(id INTEGER PRIMARY KEY, chain_id TEXT, blob BLOB, reason TEXT,
               quarantined_at REAL)

One writer thread owns the only writing connection and applies each group commit as one
transaction: a single multi-row upsert statement when the batch fits in one, otherwise
``BEGIN IMMEDIATE … COMMIT`` around the statements. Readers use their
own connections (one per reading thread, plus one per `load_live`/`load_all` listing), so reads
never wait for the writer: in WAL mode a reader sees the last committed state. Another process
can read the same file while the runtime writes it, through `open_readonly`.

Durability: ``synchronous=FULL`` by default, so SQLite fsyncs the write-ahead log at every
commit and a commit reported durable survives power loss as well as kill -9 of the process;
group commit pays one fsync per batch, not per save. ``synchronous="NORMAL"`` skips that fsync:
every commit still reaches the operating system before ``on_durable`` runs, so it survives
kill -9 of the process, but the last commits can be rolled back by a power loss or a kernel
crash (the database stays consistent).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final, Literal
from urllib.parse import quote

from actors._store import (
    DEFAULT_MAX_BATCH,
    DeleteEnded,
    GroupCommitStore,
    OnCommit,
    OnFailure,
    QuarantinedSnapshot,
    SnapshotCounts,
    SnapshotReader,
    StoreClosedError,
    StoredSnapshot,
    StoreError,
    Upserts,
    WriteOp,
)

__all__ = ["SqliteSnapshotReader", "SqliteStore", "open_readonly"]

STORE_FORMAT: Final = 1
"""``PRAGMA user_version`` of a database this module created."""

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS snapshots (
    chain_id   TEXT PRIMARY KEY,
    blob       BLOB NOT NULL,
    ended      INTEGER NOT NULL,
    updated_at REAL NOT NULL,
    spec       BLOB
);
CREATE TABLE IF NOT EXISTS quarantine (
    id             INTEGER PRIMARY KEY,
    chain_id       TEXT NOT NULL,
    blob           BLOB NOT NULL,
    reason         TEXT NOT NULL,
    quarantined_at REAL NOT NULL,
    spec           BLOB
);
"""

_UPSERT_CHUNK: Final = 1024
"""Most rows one upsert statement writes."""
_UPSERT_STEP: Final = 64
"""Upsert statements come in sizes that are multiples of this (the last row is repeated to
fill one up), so the few statement texts stay prepared in the connection's cache."""


@functools.cache
def _upsert_sql(rows: int) -> str:
    """The upsert of `rows` rows (5 parameters each) into ``snapshots``; a row saved without
    a spec keeps the one stored."""
    return (
        "INSERT INTO snapshots (chain_id, blob, ended, updated_at, spec) VALUES "
        + ", ".join(["(?, ?, ?, ?, ?)"] * rows)
        + " ON CONFLICT (chain_id) DO UPDATE SET "
        "blob = excluded.blob, ended = excluded.ended, updated_at = excluded.updated_at, "
        "spec = COALESCE(excluded.spec, snapshots.spec)"
    )


def _upsert(conn: sqlite3.Connection, rows: Upserts, now: float) -> None:
    """Write `rows` with as few statements as possible.

    Python's sqlite3 releases the GIL around every statement step, and while other Python
    threads are busy each re-acquisition can wait a whole switch interval (5 ms). One step per
    row (``executemany``) would let busy actor threads starve the writer, so rows go in
    multi-row statements of up to `_UPSERT_CHUNK` rows. Repeating a row is harmless: the upsert
    writes the same values again.
    """
    params: list[object] = []
    for chain_id, row in rows.items():
        params += (chain_id, row.blob, row.ended, now, row.spec)
    total = len(rows)
    for first in range(0, total, _UPSERT_CHUNK):
        count = min(_UPSERT_CHUNK, total - first)
        size = -(-count // _UPSERT_STEP) * _UPSERT_STEP
        chunk = params[5 * first : 5 * (first + count)]
        if size > count:
            chunk += chunk[-5:] * (size - count)
        conn.execute(_upsert_sql(size), chunk)


Synchronous = Literal["FULL", "NORMAL"]


class SqliteSnapshotReader(SnapshotReader):
    """Reads committed snapshots from an SQLite store file; never writes.

    Each reading thread gets its own connection; `load_live` and `load_all` each open one for
    the listing and close it when the iteration ends. Errors from SQLite are raised as
    `StoreError` naming the file; reading after `close` raises `StoreClosedError`.
    """

    def __init__(self, path: str | os.PathLike[str], *, read_only: bool = True) -> None:
        self._path = os.fspath(path)
        self._read_only = read_only
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        self._closed = False

    def _connect(self) -> sqlite3.Connection:
        if self._read_only:
            target = "file:" + _uri_path(self._path) + "?mode=ro"
        else:
            target = "file:" + _uri_path(self._path)
        try:
            conn = sqlite3.connect(
                target, uri=True, isolation_level=None, check_same_thread=False, timeout=5.0
            )
            conn.execute("PRAGMA query_only = ON")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open snapshot store {self._path!r}: {exc}") from exc
        return conn

    def _thread_connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            if self._closed:
                raise StoreClosedError(f"snapshot store {self._path!r} is closed")
            return conn
        with self._lock:
            if self._closed:
                raise StoreClosedError(f"snapshot store {self._path!r} is closed")
            conn = self._connect()
            self._connections.append(conn)
        self._local.conn = conn
        return conn

    def _query(self, sql: str, params: tuple[object, ...] = ()) -> list[Any]:
        conn = self._thread_connection()
        try:
            return conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"reading snapshot store {self._path!r} failed: {exc}") from exc

    def _listing(self, sql: str) -> Iterator[Any]:
        if self._closed:
            raise StoreClosedError(f"snapshot store {self._path!r} is closed")
        conn = self._connect()
        try:
            cursor = conn.execute(sql)
            while rows := cursor.fetchmany(1024):
                yield from rows
        except sqlite3.Error as exc:
            raise StoreError(f"reading snapshot store {self._path!r} failed: {exc}") from exc
        finally:
            conn.close()

    def load(self, chain_id: str) -> bytes | None:
        rows = self._query("SELECT blob FROM snapshots WHERE chain_id = ?", (chain_id,))
        return None if not rows else bytes(rows[0][0])

    def load_spec(self, chain_id: str) -> bytes | None:
        rows = self._query("SELECT spec FROM snapshots WHERE chain_id = ?", (chain_id,))
        return None if not rows or rows[0][0] is None else bytes(rows[0][0])

    def load_live(self) -> Iterator[tuple[str, bytes]]:
        for chain_id, blob in self._listing("SELECT chain_id, blob FROM snapshots WHERE ended = 0"):
            yield str(chain_id), bytes(blob)

    def load_all(self) -> Iterator[StoredSnapshot]:
        for chain_id, blob, ended, updated_at, spec in self._listing(
            "SELECT chain_id, blob, ended, updated_at, spec FROM snapshots"
        ):
            yield StoredSnapshot(
                str(chain_id),
                bytes(blob),
                bool(ended),
                float(updated_at),
                None if spec is None else bytes(spec),
            )

    def counts(self) -> SnapshotCounts:
        by_flag: dict[int, int] = dict(
            self._query("SELECT ended, count(*) FROM snapshots GROUP BY ended")
        )
        (quarantined,) = self._query("SELECT count(*) FROM quarantine")[0]
        return SnapshotCounts(
            live=int(by_flag.get(0, 0)),
            ended=int(by_flag.get(1, 0)),
            quarantined=int(quarantined),
        )

    def quarantined(self) -> list[QuarantinedSnapshot]:
        rows = self._query(
            "SELECT chain_id, blob, reason, quarantined_at, spec FROM quarantine ORDER BY id"
        )
        return [
            QuarantinedSnapshot(
                str(chain_id),
                bytes(blob),
                str(reason),
                float(at),
                None if spec is None else bytes(spec),
            )
            for chain_id, blob, reason, at, spec in rows
        ]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()


def _uri_path(path: str) -> str:
    """Quote a filesystem path for an SQLite ``file:`` URI."""
    return quote(os.path.abspath(path))


def open_readonly(path: str | os.PathLike[str]) -> SqliteSnapshotReader:
    """Open an existing store file for reading only, e.g. for ``spmchain inspect``.

    Works while another process (the runtime) writes the file. Raises `StoreError` if the file
    does not exist, is not a store, or was written by a newer store format.
    """
    text = os.fspath(path)
    if not os.path.exists(text):
        raise StoreError(f"snapshot store {text!r} does not exist")
    reader = SqliteSnapshotReader(text, read_only=True)
    try:
        _check_format(reader._thread_connection(), text, create=False)
    except BaseException:
        reader.close()
        raise
    return reader


def _check_format(conn: sqlite3.Connection, path: str, *, create: bool) -> None:
    try:
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        if version == 0 and create:
            conn.executescript(_SCHEMA + f"PRAGMA user_version = {STORE_FORMAT};")
            return
        if version == 0:
            tables = {
                name
                for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            }
            if not {"snapshots", "quarantine"} <= tables:
                raise StoreError(f"{path!r} is not a snapshot store (no snapshots table)")
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open snapshot store {path!r}: {exc}") from exc
    if version > STORE_FORMAT:
        raise StoreError(
            f"snapshot store {path!r} has format {version}, newer than the supported {STORE_FORMAT}"
        )


class SqliteStore(GroupCommitStore):
    """The default snapshot store: an SQLite file in WAL mode, written by group commit.

    Creates the file and its tables if needed (raises `StoreError` if it cannot, or if the file
    was written by a newer store format). `synchronous` chooses what a reported commit survives
    (see the module documentation): "FULL" (the default) also survives power loss, "NORMAL"
    survives kill -9 of the process. Reads go through `SqliteSnapshotReader` connections and see
    committed state only. See `GroupCommitStore` for `max_batch`, `on_commit`, `on_failure` and
    `clock`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: Synchronous = "FULL",
        max_batch: int = DEFAULT_MAX_BATCH,
        on_commit: OnCommit | None = None,
        on_failure: OnFailure | None = None,
        clock: Callable[[], float] = time.time,
        busy_timeout_s: float = 5.0,
    ) -> None:
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError(f"synchronous must be 'FULL' or 'NORMAL', not {synchronous!r}")
        super().__init__(
            max_batch=max_batch, on_commit=on_commit, on_failure=on_failure, clock=clock
        )
        self.path = os.fspath(path)
        self._synchronous = synchronous
        self._busy_timeout_s = busy_timeout_s
        try:
            setup = sqlite3.connect(self.path, isolation_level=None, timeout=busy_timeout_s)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open snapshot store {self.path!r}: {exc}") from exc
        try:
            try:
                # Before the first table exists: pages big enough that a chain's snapshot
                # (a few KiB) fits in one, without overflow pages.
                setup.execute("PRAGMA page_size = 16384")
                (mode,) = setup.execute("PRAGMA journal_mode = WAL").fetchone()
            except sqlite3.Error as exc:
                raise StoreError(f"cannot open snapshot store {self.path!r}: {exc}") from exc
            if str(mode).lower() != "wal":
                raise StoreError(f"snapshot store {self.path!r} cannot use WAL mode ({mode})")
            _check_format(setup, self.path, create=True)
        finally:
            setup.close()
        self._reader = SqliteSnapshotReader(self.path, read_only=False)
        self._wconn: sqlite3.Connection | None = None
        self._start_writer()

    def _writer_open(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=self._busy_timeout_s)
        conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        conn.execute("PRAGMA cache_size = -65536")
        self._wconn = conn

    def _writer_close(self) -> None:
        if self._wconn is not None:
            self._wconn.close()
            self._wconn = None

    def _commit(self, batch: Sequence[WriteOp], now: float) -> None:
        conn = self._wconn
        assert conn is not None
        if len(batch) == 1 and isinstance(batch[0], dict) and len(batch[0]) <= _UPSERT_CHUNK:
            # One statement is a transaction of its own: skip two more GIL round trips.
            _upsert(conn, batch[0], now)
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            for op in batch:
                if isinstance(op, dict):
                    _upsert(conn, op, now)
                elif isinstance(op, DeleteEnded):
                    cursor = conn.execute(
                        "DELETE FROM snapshots WHERE ended = 1 AND updated_at < ?", (op.cutoff,)
                    )
                    op.deleted = cursor.rowcount
                else:
                    conn.execute(
                        "INSERT INTO quarantine (chain_id, blob, reason, quarantined_at, spec) "
                        "VALUES (?, ?, ?, ?, (SELECT spec FROM snapshots WHERE chain_id = ?))",
                        (op.chain_id, op.blob, op.reason, now, op.chain_id),
                    )
                    conn.execute("DELETE FROM snapshots WHERE chain_id = ?", (op.chain_id,))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise

    def _close_readers(self) -> None:
        self._reader.close()

    def load(self, chain_id: str) -> bytes | None:
        return self._reader.load(chain_id)

    def load_spec(self, chain_id: str) -> bytes | None:
        return self._reader.load_spec(chain_id)

    def load_live(self) -> Iterator[tuple[str, bytes]]:
        return self._reader.load_live()

    def load_all(self) -> Iterator[StoredSnapshot]:
        return self._reader.load_all()

    def counts(self) -> SnapshotCounts:
        return self._reader.counts()

    def quarantined(self) -> list[QuarantinedSnapshot]:
        return self._reader.quarantined()
