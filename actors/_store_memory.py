"""`MemoryStore`: the snapshot store contract without durability, for tests and comparisons."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence

from actors._store import (
    DEFAULT_MAX_BATCH,
    DeleteEnded,
    GroupCommitStore,
    OnCommit,
    OnFailure,
    QuarantinedSnapshot,
    SnapshotCounts,
    StoredSnapshot,
    WriteOp,
)

__all__ = ["MemoryStore"]


class MemoryStore(GroupCommitStore):
    """Snapshots kept in process memory, behind the same group-commit writer as `SqliteStore`.

    Everything `SnapshotStore` promises holds — asynchronous batched saves, ``on_durable`` on
    the writer thread after the batch is applied, supersession, quarantine, committed-only
    reads, the failed state — except that "durable" means "applied to this process's
    dictionaries": nothing survives the process. See `GroupCommitStore` for the parameters.
    `fail_next_commit` makes the next commit raise,
    to exercise the failed state.
    """

    def __init__(
        self,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        on_commit: OnCommit | None = None,
        on_failure: OnFailure | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(
            max_batch=max_batch, on_commit=on_commit, on_failure=on_failure, clock=clock
        )
        self._data_lock = threading.Lock()
        self._rows: dict[str, StoredSnapshot] = {}
        self._quarantine: list[QuarantinedSnapshot] = []
        self._inject: BaseException | None = None
        self._start_writer()

    def fail_next_commit(self, error: BaseException) -> None:
        """Make the next group commit raise `error` and apply nothing (the store then fails)."""
        self._inject = error

    def _commit(self, batch: Sequence[WriteOp], now: float) -> None:
        if self._inject is not None:
            error, self._inject = self._inject, None
            raise error
        with self._data_lock:
            rows = self._rows
            for op in batch:
                if isinstance(op, dict):
                    for chain_id, row in op.items():
                        spec = row.spec
                        if spec is None:
                            prev = rows.get(chain_id)
                            spec = None if prev is None else prev.spec
                        rows[chain_id] = StoredSnapshot(chain_id, row.blob, row.ended, now, spec)
                elif isinstance(op, DeleteEnded):
                    doomed = [
                        chain_id
                        for chain_id, stored in rows.items()
                        if stored.ended and stored.updated_at < op.cutoff
                    ]
                    for chain_id in doomed:
                        del rows[chain_id]
                    op.deleted = len(doomed)
                else:
                    prev = rows.pop(op.chain_id, None)
                    self._quarantine.append(
                        QuarantinedSnapshot(op.chain_id, op.blob, op.reason, now,
                                            None if prev is None else prev.spec)
                    )

    def load(self, chain_id: str) -> bytes | None:
        with self._data_lock:
            stored = self._rows.get(chain_id)
        return None if stored is None else stored.blob

    def load_spec(self, chain_id: str) -> bytes | None:
        with self._data_lock:
            stored = self._rows.get(chain_id)
        return None if stored is None else stored.spec

    def load_live(self) -> Iterator[tuple[str, bytes]]:
        with self._data_lock:
            live = [(s.chain_id, s.blob) for s in self._rows.values() if not s.ended]
        return iter(live)

    def load_all(self) -> Iterator[StoredSnapshot]:
        with self._data_lock:
            everything = list(self._rows.values())
        return iter(everything)

    def counts(self) -> SnapshotCounts:
        with self._data_lock:
            ended = sum(1 for s in self._rows.values() if s.ended)
            return SnapshotCounts(
                live=len(self._rows) - ended, ended=ended, quarantined=len(self._quarantine)
            )

    def quarantined(self) -> list[QuarantinedSnapshot]:
        with self._data_lock:
            return list(self._quarantine)
