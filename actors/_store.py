"""The snapshot store interface and its group-commit writer.

A store keeps one snapshot blob per chain (the latest one saved), whether the chain has ended,
and a quarantine of blobs that did not decode. Writes are asynchronous and batched: `save`
returns at once, a single writer thread takes everything pending and writes it in one
transaction (a group commit), and each save's ``on_durable`` callback runs on that thread after
the transaction holding it committed. Reads see committed state only.

`SnapshotReader` is the read side (what ``spmchain inspect`` needs), `SnapshotStore` adds the
writes; `GroupCommitStore` implements the queue, the writer thread, batching, callbacks and the
failed state once, so a backend supplies only "write these operations in one transaction" and
its reads. `actors._store_memory.MemoryStore` and `actors._store_sqlite.SqliteStore` are the two
backends; a server database can be a third.

A write that fails is never silently lost: the store enters a failed state, the failed batch's
``on_durable`` callbacks are not called, the ``on_failure`` callback is told, and every later
`save`, `flush`, `quarantine` and `delete_ended` raises `StoreError` naming the cause. The store
does not retry: what was committed before the failure is intact, and the owner is expected to
stop and recover from it.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Self

__all__ = [
    "DEFAULT_MAX_BATCH",
    "GroupCommitStore",
    "QuarantinedSnapshot",
    "SnapshotCounts",
    "SnapshotReader",
    "SnapshotStore",
    "StoreClosedError",
    "StoreError",
    "StoreStats",
    "StoreTimeoutError",
    "StoredSnapshot",
]

_log = logging.getLogger("spmchain.store")

DEFAULT_MAX_BATCH: Final = 10_000
"""Most chain rows (plus control operations) one group commit writes."""

OnDurable = Callable[[], None]
OnCommit = Callable[[int, float], None]
OnFailure = Callable[[BaseException], None]


class StoreError(RuntimeError):
    """The store cannot accept or make durable a write; the message names the cause."""


class StoreClosedError(StoreError):
    """The store was closed; it accepts no more writes."""


class StoreTimeoutError(StoreError, TimeoutError):
    """Waiting for durability took longer than the caller's timeout. The writes stay queued."""


@dataclass(frozen=True, slots=True)
class StoredSnapshot:
    """One chain's latest committed snapshot, as `SnapshotReader.load_all` lists it."""

    chain_id: str
    blob: bytes
    ended: bool
    updated_at: float
    """Wall-clock time (seconds since the epoch) of the commit that wrote this blob."""
    spec: bytes | None = None
    """The chain's spec as saved once with its first snapshot (see `SnapshotStore.save`)."""


@dataclass(frozen=True, slots=True)
class QuarantinedSnapshot:
    """A blob that did not decode, kept aside with the reason it was refused."""

    chain_id: str
    blob: bytes
    reason: str
    quarantined_at: float
    spec: bytes | None = None


@dataclass(frozen=True, slots=True)
class SnapshotCounts:
    """How many chains are live (not ended), ended, and how many blobs are quarantined."""

    live: int
    ended: int
    quarantined: int


@dataclass(frozen=True, slots=True)
class StoreStats:
    """Counters of a store's writer, for metrics.

    `saves` counts accepted `save` calls; `rows_written` counts chain rows written after later
    saves of the same chain superseded earlier uncommitted ones (`superseded` counts those);
    `last_batch_size` is the number of saves and control operations the latest commit made
    durable; `pending` is what waits for the next commit.
    """

    commits: int
    saves: int
    rows_written: int
    superseded: int
    last_batch_size: int
    max_batch_size: int
    pending: int
    callback_errors: int
    failed: bool


class SnapshotReader(ABC):
    """Read access to committed snapshots. Safe to call from any thread."""

    @abstractmethod
    def load(self, chain_id: str) -> bytes | None:
        """Return the chain's latest committed blob, ended or not; None if there is none
        (never saved, quarantined, or deleted by `SnapshotStore.delete_ended`)."""

    @abstractmethod
    def load_spec(self, chain_id: str) -> bytes | None:
        """The spec saved with the chain (``save(..., spec=...)``), or None."""

    @abstractmethod
    def load_live(self) -> Iterator[tuple[str, bytes]]:
        """Yield ``(chain_id, blob)`` for every chain not marked ended: what recovery resumes.

        The listing is a consistent view of one moment; writes committed while it is being
        iterated may or may not appear.
        """

    @abstractmethod
    def load_all(self) -> Iterator[StoredSnapshot]:
        """Yield every stored chain, live and ended, with its flag and update time."""

    @abstractmethod
    def counts(self) -> SnapshotCounts:
        """Return how many chains are live and ended and how many blobs are quarantined."""

    @abstractmethod
    def quarantined(self) -> list[QuarantinedSnapshot]:
        """Return every quarantined blob, oldest first."""

    @abstractmethod
    def close(self) -> None:
        """Release the reader's resources; calling it again does nothing."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class SnapshotStore(SnapshotReader):
    """A durable home for chain snapshots, written by group commit.

    Ordering: operations become durable in the order they were called (a save and a later
    quarantine of the same chain are applied in that order), and a later save of a chain
    replaces an earlier one that has not been committed yet.
    """

    @abstractmethod
    def save(
        self,
        chain_id: str,
        blob: bytes,
        *,
        ended: bool = False,
        on_durable: OnDurable | None = None,
        spec: bytes | None = None,
    ) -> None:
        """Queue `blob` as the chain's snapshot and return at once.

        `spec` is a part of the chain's snapshot that never changes (its spec): given once,
        typically with the first save, it is kept with the chain for as long as the chain is
        stored, so later saves need not repeat it; `load_spec` reads it back.

        The write joins the next group commit. If the chain is saved again before that commit,
        only the later blob is written, but every `on_durable` still fires. `on_durable` runs on
        the writer thread after the transaction containing the write committed; it must be
        quick and must not call `flush`. An exception it raises is logged and counted, not
        propagated. If the commit fails, `on_durable` is never called. Raises `StoreError` if the
        store has failed, `StoreClosedError` if it was closed.
        """

    @abstractmethod
    def flush(self, timeout: float | None = None) -> None:
        """Wait until every operation queued before this call is durable and the ``on_durable``
        callbacks of those saves have run.

        Raises `StoreTimeoutError` after `timeout` seconds (the writes stay queued),
        `StoreError` if the store fails or has failed, and `StoreError` when called from the
        writer thread (from inside a callback), where waiting would deadlock.
        """

    def save_sync(
        self, chain_id: str, blob: bytes, *, ended: bool = False, timeout: float | None = None
    ) -> None:
        """`save`, then wait until it is durable; raises like `flush`."""
        self.save(chain_id, blob, ended=ended)
        self.flush(timeout)

    @abstractmethod
    def quarantine(
        self, chain_id: str, blob: bytes, reason: str, *, timeout: float | None = None
    ) -> None:
        """Keep `blob` aside with `reason`, remove the chain from the stored snapshots, and wait
        until that is durable. Raises like `flush`."""

    @abstractmethod
    def delete_ended(self, older_than_s: float, *, timeout: float | None = None) -> int:
        """Delete ended chains whose last commit is older than `older_than_s` seconds; wait until
        that is durable and return how many were deleted. Raises like `flush`.

        Keep `older_than_s` well past the time an engine may stay down: a chain that ended just
        before a crash may have left its last task uncleared on the SPM, and the next start
        needs its row to clear that task as an ended chain's rather than discard it as an
        orphan (an orphan that succeeded is reverted, undoing the chain's work)."""

    @abstractmethod
    def stats(self) -> StoreStats:
        """Return the writer's counters."""

    @property
    @abstractmethod
    def failure(self) -> BaseException | None:
        """The error that put the store in its failed state, or None while it is healthy."""

    @abstractmethod
    def close(self, timeout: float | None = None) -> None:
        """Make everything queued durable, stop the writer thread and release resources.

        Calling it again does nothing. Raises `StoreError` if the store failed (queued writes
        were then not made durable) and `StoreTimeoutError` if the writer did not finish within
        `timeout`.
        """


# --- group commit ---------------------------------------------------------------------------


class PendingRow:
    """A queued write of one chain; a later save replaces `blob` and `ended` and adds its
    callback. Backends read `blob` and `ended`."""

    __slots__ = ("blob", "callbacks", "ended", "saves", "spec")

    def __init__(
        self, blob: bytes, ended: bool, callback: OnDurable | None, spec: bytes | None = None
    ) -> None:
        self.blob = blob
        self.ended = ended
        self.spec = spec
        self.saves = 1
        self.callbacks: list[OnDurable] | None = None if callback is None else [callback]


class _Saves:
    """Consecutive saves, keyed by chain so that later ones supersede earlier ones."""

    __slots__ = ("index", "rows")

    def __init__(self, index: int) -> None:
        self.index = index
        self.rows: dict[str, PendingRow] = {}


@dataclass(slots=True)
class Quarantine:
    """Control operation: move a chain's blob to the quarantine."""

    index: int
    chain_id: str
    blob: bytes
    reason: str


@dataclass(slots=True)
class DeleteEnded:
    """Control operation: delete ended chains last written before `cutoff`."""

    index: int
    cutoff: float
    deleted: int = 0


Upserts = dict[str, PendingRow]
"""Rows to insert or replace; a backend reads ``row.blob`` and ``row.ended``."""

WriteOp = Upserts | Quarantine | DeleteEnded
"""One element of a batch handed to `GroupCommitStore._commit`, applied in order."""

_Segment = _Saves | Quarantine | DeleteEnded


class GroupCommitStore(SnapshotStore):
    """The writer side shared by every backend: a queue, one writer thread, group commits.

    A backend implements `_commit` (write a batch in one transaction, on the writer thread),
    optionally `_writer_open`/`_writer_close` (per-thread setup), and the `SnapshotReader`
    methods; its ``__init__`` calls ``super().__init__(...)`` and then `_start_writer`.

    `max_batch` bounds the rows plus control operations of one transaction. `on_commit` is
    called on the writer thread after every commit with the number of saves and control
    operations made durable and the seconds the transaction took; `on_failure` is called once
    with the error when the store enters its failed state. `clock` supplies the wall-clock
    times stored with each row.
    """

    def __init__(
        self,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        on_commit: OnCommit | None = None,
        on_failure: OnFailure | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        self._max_batch = max_batch
        self._on_commit = on_commit
        self._on_failure = on_failure
        # Called by the writer once a commit's on_durable callbacks have all run (a runtime
        # sends what they queued, one message per actor and commit): one per runtime using it.
        self._after_durable: list[Callable[[], None]] = []
        # Told, after ``on_failure``, when the store fails: one per runtime using it.
        self._failure_hooks: list[OnFailure] = []
        self._clock = clock
        self._cond = threading.Condition(threading.Lock())
        self._pending: collections.deque[_Segment] = collections.deque()
        self._pending_ops = 0
        self._last_index = 0
        self._durable_index = 0
        self._writer_idle = False
        self._waiters = 0
        self._closing = False
        self._closed = False
        self._failure: BaseException | None = None
        self._writer: threading.Thread | None = None
        self._commits = 0
        self._saves = 0
        self._rows_written = 0
        self._superseded = 0
        self._last_batch_size = 0
        self._max_batch_size = 0
        self._callback_errors = 0

    # -- backend hooks --

    def _writer_open(self) -> None:
        """Prepare the writer thread (e.g. open its connection). An error fails the store."""

    def _writer_close(self) -> None:
        """Release what `_writer_open` acquired; runs on the writer thread as it stops."""

    @abstractmethod
    def _commit(self, batch: Sequence[WriteOp], now: float) -> None:
        """Apply `batch` in order in one transaction, stamping rows with `now`.

        Either all of it is durable when this returns, or it raises and none of it is (the
        backend rolls back). A `DeleteEnded` records its count in ``op.deleted``.
        """

    def _close_readers(self) -> None:
        """Release read resources; called by `close` after the writer stopped."""

    def _start_writer(self) -> None:
        self._writer = threading.Thread(
            target=self._run, name="spmchain-snapshot-writer", daemon=True
        )
        self._writer.start()

    # -- the write API --

    def _check_open(self) -> None:
        if self._failure is not None:
            raise StoreError(f"snapshot store failed: {self._failure!r}") from self._failure
        if self._closing:
            raise StoreClosedError("snapshot store is closed")

    def save(
        self,
        chain_id: str,
        blob: bytes,
        *,
        ended: bool = False,
        on_durable: OnDurable | None = None,
        spec: bytes | None = None,
    ) -> None:
        with self._cond:
            self._check_open()
            last = self._pending[-1] if self._pending else None
            if type(last) is not _Saves:
                self._last_index += 1
                last = _Saves(self._last_index)
                self._pending.append(last)
            row = last.rows.get(chain_id)
            if row is None:
                last.rows[chain_id] = PendingRow(blob, ended, on_durable, spec)
            else:
                row.blob = blob
                row.ended = ended
                if spec is not None:
                    row.spec = spec
                row.saves += 1
                if on_durable is not None:
                    if row.callbacks is None:
                        row.callbacks = [on_durable]
                    else:
                        row.callbacks.append(on_durable)
                self._superseded += 1
            self._saves += 1
            self._pending_ops += 1
            if self._writer_idle:
                self._cond.notify()

    def flush(self, timeout: float | None = None) -> None:
        with self._cond:
            self._wait_durable(self._last_index, timeout, "flush")

    def quarantine(
        self, chain_id: str, blob: bytes, reason: str, *, timeout: float | None = None
    ) -> None:
        with self._cond:
            self._check_open()
            self._last_index += 1
            op = Quarantine(self._last_index, chain_id, bytes(blob), reason)
            self._enqueue_control(op)
            self._wait_durable(op.index, timeout, f"quarantine of chain {chain_id}")

    def delete_ended(self, older_than_s: float, *, timeout: float | None = None) -> int:
        with self._cond:
            self._check_open()
            self._last_index += 1
            op = DeleteEnded(self._last_index, self._clock() - older_than_s)
            self._enqueue_control(op)
            self._wait_durable(op.index, timeout, "delete_ended")
            return op.deleted

    def _enqueue_control(self, op: Quarantine | DeleteEnded) -> None:
        self._pending.append(op)
        self._pending_ops += 1
        if self._writer_idle:
            self._cond.notify()

    def _wait_durable(self, index: int, timeout: float | None, what: str) -> None:
        """Wait (holding `_cond`) until segment `index` is committed and its callbacks ran; raise
        on failure or timeout."""
        if threading.current_thread() is self._writer:
            raise StoreError(
                f"{what} called on the snapshot writer thread (from a callback) would deadlock"
            )
        deadline = None if timeout is None else time.monotonic() + timeout
        self._waiters += 1
        try:
            while self._durable_index < index:
                if self._failure is not None:
                    raise StoreError(f"snapshot store failed: {self._failure!r}") from self._failure
                if self._closed:
                    raise StoreClosedError(f"{what}: snapshot store stopped before the write")
                if deadline is None:
                    self._cond.wait()
                else:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise StoreTimeoutError(
                            f"{what}: writes not durable after {timeout} s "
                            f"({self._pending_ops} operations pending)"
                        )
                    self._cond.wait(remaining)
        finally:
            self._waiters -= 1

    def stats(self) -> StoreStats:
        with self._cond:
            return StoreStats(
                commits=self._commits,
                saves=self._saves,
                rows_written=self._rows_written,
                superseded=self._superseded,
                last_batch_size=self._last_batch_size,
                max_batch_size=self._max_batch_size,
                pending=self._pending_ops,
                callback_errors=self._callback_errors,
                failed=self._failure is not None,
            )

    @property
    def failure(self) -> BaseException | None:
        return self._failure

    def close(self, timeout: float | None = None) -> None:
        writer = self._writer
        if writer is threading.current_thread():
            raise StoreError("close called on the snapshot writer thread (from a callback)")
        with self._cond:
            if self._closed:
                return
            self._closing = True
            if self._writer_idle:
                self._cond.notify()
        if writer is not None:
            writer.join(timeout)
            if writer.is_alive():
                raise StoreTimeoutError(
                    f"snapshot writer did not finish within {timeout} s "
                    f"({self._pending_ops} operations pending)"
                )
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._close_readers()
        if self._failure is not None:
            raise StoreError(f"snapshot store failed: {self._failure!r}") from self._failure

    # -- the writer thread --

    def _take_batch(self) -> tuple[list[WriteOp], int, int]:
        """Pop up to `max_batch` operations (holding `_cond`).

        Returns the batch, the number of saves and control operations it makes durable, and
        the index of the last segment it completes (a partly taken segment is not complete).
        """
        batch: list[WriteOp] = []
        size = 0
        budget = self._max_batch
        done_index = self._durable_index
        while self._pending and budget > 0:
            head = self._pending[0]
            if isinstance(head, _Saves):
                rows = head.rows
                if len(rows) <= budget:
                    self._pending.popleft()
                    taken = rows
                    done_index = head.index
                else:
                    taken = dict(itertools.islice(rows.items(), budget))
                    for chain_id in taken:
                        del rows[chain_id]
                budget -= len(taken)
                size += sum(row.saves for row in taken.values())
                batch.append(taken)
            else:
                self._pending.popleft()
                budget -= 1
                size += 1
                done_index = head.index
                batch.append(head)
        self._pending_ops -= size
        return batch, size, done_index

    def _run(self) -> None:
        try:
            self._writer_open()
        except BaseException as exc:
            self._fail(exc, 0)
            return
        try:
            self._loop()
        finally:
            try:
                self._writer_close()
            except Exception:
                _log.exception("closing the snapshot writer failed")

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._writer_idle = True
                    self._cond.wait()
                self._writer_idle = False
                if not self._pending:
                    return
                batch, size, done_index = self._take_batch()
            started = time.perf_counter()
            try:
                self._commit(batch, self._clock())
            except BaseException as exc:
                self._fail(exc, size)
                return
            elapsed = time.perf_counter() - started
            rows = sum(len(op) for op in batch if isinstance(op, dict))
            with self._cond:
                self._commits += 1
                self._rows_written += rows
                self._last_batch_size = size
                self._max_batch_size = max(self._max_batch_size, size)
            errors = self._after_commit(batch, size, elapsed)
            with self._cond:
                self._callback_errors += errors
                self._durable_index = done_index
                if self._waiters:
                    self._cond.notify_all()

    def _after_commit(self, batch: Sequence[WriteOp], size: int, elapsed: float) -> int:
        """Run `on_commit` and the batch's `on_durable` callbacks; return how many raised."""
        errors = 0
        if self._on_commit is not None:
            try:
                self._on_commit(size, elapsed)
            except Exception:
                errors += 1
                _log.exception("snapshot store on_commit callback raised")
        for op in batch:
            if not isinstance(op, dict):
                continue
            for row in op.values():
                if row.callbacks is None:
                    continue
                for callback in row.callbacks:
                    try:
                        callback()
                    except Exception:
                        errors += 1
                        _log.exception("snapshot on_durable callback raised")
        for hook in list(self._after_durable):
            try:
                hook()
            except Exception:
                errors += 1
                _log.exception("snapshot store after_durable callback raised")
        return errors

    def _fail(self, exc: BaseException, in_flight: int) -> None:
        """Enter the failed state: refuse new writes at once, tell `on_failure`, then wake the
        waiters (so a caller woken by the failure finds `on_failure` already told)."""
        with self._cond:
            self._failure = exc
            lost = self._pending_ops + in_flight
            self._pending.clear()
            self._pending_ops = 0
        _log.error("snapshot store failed; %d queued operations were not written: %r", lost, exc)
        for hook in [self._on_failure, *self._failure_hooks]:
            if hook is None:
                continue
            try:
                hook(exc)
            except Exception:
                _log.exception("snapshot store on_failure callback raised")
        with self._cond:
            self._cond.notify_all()
