"""The snapshot store contract (both stores), group commit, failure, and SQLite durability."""

from __future__ import annotations

import os
import queue
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from actors._snapshot import decode_snapshot, encode_snapshot
from actors._store import (
    SnapshotStore,
    StoreClosedError,
    StoreError,
    StoreTimeoutError,
)
from actors._store_memory import MemoryStore
from actors._store_sqlite import STORE_FORMAT, SqliteStore, open_readonly

REPO = Path(__file__).resolve().parent.parent
WAIT = 10.0

StoreFactory = Callable[..., SnapshotStore]


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["memory", "sqlite"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """Build stores of the parametrized kind; each is closed at teardown."""
    made: list[SnapshotStore] = []

    def make(**kwargs: Any) -> SnapshotStore:
        store: SnapshotStore
        if request.param == "memory":
            store = MemoryStore(**kwargs)
        else:
            store = SqliteStore(tmp_path / f"store{len(made)}.db", **kwargs)
        made.append(store)
        return store

    yield make
    for store in made:
        try:
            store.close(timeout=WAIT)
        except StoreError:
            pass


@pytest.fixture
def store(make_store: StoreFactory) -> SnapshotStore:
    return make_store()


class WriterGate:
    """Holds the writer thread inside an on_durable callback, so later writes queue up.

    Saves chain "gate" (ended) to get there. `release` lets the writer go on.
    """

    def __init__(self, store: SnapshotStore) -> None:
        self._entered = threading.Event()
        self._release = threading.Event()
        store.save("gate", b"gate", ended=True, on_durable=self._hold)
        assert self._entered.wait(WAIT), "writer never committed the gate save"

    def _hold(self) -> None:
        self._entered.set()
        self._release.wait(WAIT)

    def release(self) -> None:
        self._release.set()


@pytest.fixture
def gates() -> Iterator[list[WriterGate]]:
    opened: list[WriterGate] = []
    yield opened
    for gate in opened:
        gate.release()


def gate_writer(store: SnapshotStore, gates: list[WriterGate]) -> WriterGate:
    gate = WriterGate(store)
    gates.append(gate)
    return gate


def blob_for(chain: str, seq: int = 0) -> bytes:
    return encode_snapshot({"chain": chain, "seq": seq})


# --- the contract, for both stores ------------------------------------------------------------


def test_saved_snapshot_is_loadable_after_flush(store: SnapshotStore) -> None:
    store.save("c1", blob_for("c1"))
    store.flush(WAIT)
    assert store.load("c1") == blob_for("c1")
    assert store.load("unknown") is None


def test_save_sync_returns_once_durable(store: SnapshotStore) -> None:
    store.save_sync("c1", blob_for("c1"), timeout=WAIT)
    assert store.load("c1") == blob_for("c1")


def test_on_durable_fires_only_after_commit(store: SnapshotStore, gates: list[WriterGate]) -> None:
    gate = gate_writer(store, gates)
    seen_in_callback: list[bytes | None] = []
    fired = threading.Event()

    def on_durable() -> None:
        seen_in_callback.append(store.load("c1"))
        fired.set()

    store.save("c1", blob_for("c1"), on_durable=on_durable)
    assert not fired.is_set()
    assert store.load("c1") is None, "an uncommitted save must not be visible"
    gate.release()
    assert fired.wait(WAIT)
    assert seen_in_callback == [blob_for("c1")]


def test_on_durable_runs_on_the_writer_thread(store: SnapshotStore) -> None:
    threads: list[threading.Thread] = []
    fired = threading.Event()

    def on_durable() -> None:
        threads.append(threading.current_thread())
        fired.set()

    store.save("c1", b"x", on_durable=on_durable)
    assert fired.wait(WAIT)
    assert threads[0] is not threading.current_thread()
    assert threads[0].name == "spmchain-snapshot-writer"


def test_later_save_supersedes_uncommitted_one_and_every_on_durable_fires(
    store: SnapshotStore, gates: list[WriterGate]
) -> None:
    gate = gate_writer(store, gates)
    before = store.stats()
    fired: list[int] = []

    def reporter(seq: int) -> Callable[[], None]:
        return lambda: fired.append(seq)

    for seq in range(3):
        store.save("c1", blob_for("c1", seq), on_durable=reporter(seq))
    gate.release()
    store.flush(WAIT)
    assert sorted(fired) == [0, 1, 2]
    assert decode_snapshot(store.load("c1") or b"")["seq"] == 2
    after = store.stats()
    assert after.superseded - before.superseded == 2
    assert after.rows_written - before.rows_written == 1
    assert after.last_batch_size == 3


def test_concurrent_saves_are_batched_into_few_commits(
    make_store: StoreFactory, gates: list[WriterGate]
) -> None:
    batches: list[int] = []
    store = make_store(on_commit=lambda size, seconds: batches.append(size))
    gate = gate_writer(store, gates)
    durable = threading.Semaphore(0)
    threads_n, per_thread = 4, 500
    start = threading.Barrier(threads_n)

    def saver(t: int) -> None:
        start.wait(WAIT)
        for i in range(per_thread):
            store.save(f"t{t}-c{i}", blob_for(f"t{t}-c{i}"), on_durable=durable.release)

    threads = [threading.Thread(target=saver, args=(t,)) for t in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    commits_before = store.stats().commits
    gate.release()
    store.flush(WAIT)
    stats = store.stats()
    saves = threads_n * per_thread
    assert all(durable.acquire(timeout=WAIT) for _ in range(saves))
    assert stats.commits - commits_before == 1
    assert batches[-1] == saves
    assert stats.saves == saves + 1
    assert stats.commits <= 3
    expected = {
        f"t{t}-c{i}": blob_for(f"t{t}-c{i}") for t in range(threads_n) for i in range(per_thread)
    }
    assert dict(store.load_live()) == expected


def test_max_batch_bounds_rows_per_commit(
    make_store: StoreFactory, gates: list[WriterGate]
) -> None:
    batches: list[int] = []
    store = make_store(max_batch=10, on_commit=lambda size, seconds: batches.append(size))
    gate = gate_writer(store, gates)
    for i in range(25):
        store.save(f"c{i}", b"x")
    gate.release()
    store.flush(WAIT)
    assert batches[1:] == [10, 10, 5]
    assert store.counts().live == 25


def test_on_commit_reports_batch_size_and_duration(make_store: StoreFactory) -> None:
    seen: list[tuple[int, float]] = []
    store = make_store(on_commit=lambda size, seconds: seen.append((size, seconds)))
    store.save_sync("c1", b"x", timeout=WAIT)
    assert len(seen) == 1
    size, seconds = seen[0]
    assert size == 1
    assert 0 <= seconds < WAIT


def test_load_live_lists_chains_not_ended(store: SnapshotStore) -> None:
    store.save("live-1", b"a")
    store.save("live-2", b"b")
    store.save("done", b"c", ended=True)
    store.flush(WAIT)
    assert sorted(store.load_live()) == [("live-1", b"a"), ("live-2", b"b")]
    assert store.load("done") == b"c"
    counts = store.counts()
    assert (counts.live, counts.ended, counts.quarantined) == (2, 1, 0)


def test_chain_saved_as_ended_leaves_the_live_set(store: SnapshotStore) -> None:
    store.save("c1", b"running")
    store.save_sync("c1", b"ended", ended=True, timeout=WAIT)
    assert list(store.load_live()) == []
    assert store.counts().ended == 1


def test_load_all_reports_ended_flag_and_commit_time(make_store: StoreFactory) -> None:
    clock = FakeClock(5000.0)
    store = make_store(clock=clock)
    store.save_sync("c1", b"a", timeout=WAIT)
    clock.now = 6000.0
    store.save_sync("c2", b"b", ended=True, timeout=WAIT)
    rows = sorted(store.load_all(), key=lambda row: row.chain_id)
    assert [(r.chain_id, r.blob, r.ended, r.updated_at) for r in rows] == [
        ("c1", b"a", False, 5000.0),
        ("c2", b"b", True, 6000.0),
    ]


def test_quarantine_keeps_the_blob_and_removes_the_chain_from_live_set(
    make_store: StoreFactory,
) -> None:
    clock = FakeClock(7000.0)
    store = make_store(clock=clock)
    store.save("bad", b"\x00garbage")
    store.save("good", blob_for("good"))
    store.quarantine("bad", b"\x00garbage", "bad_magic: not a snapshot", timeout=WAIT)
    assert [chain for chain, _ in store.load_live()] == ["good"]
    assert store.load("bad") is None
    (kept,) = store.quarantined()
    assert (kept.chain_id, kept.blob, kept.reason, kept.quarantined_at) == (
        "bad",
        b"\x00garbage",
        "bad_magic: not a snapshot",
        7000.0,
    )
    assert store.counts().quarantined == 1


def test_quarantine_applies_after_an_earlier_uncommitted_save(
    store: SnapshotStore, gates: list[WriterGate]
) -> None:
    gate = gate_writer(store, gates)
    store.save("c1", b"late save")
    done = threading.Event()

    def quarantine() -> None:
        store.quarantine("c1", b"late save", "corrupt", timeout=WAIT)
        done.set()

    thread = threading.Thread(target=quarantine)
    thread.start()
    gate.release()
    thread.join(WAIT)
    assert done.is_set()
    assert store.load("c1") is None
    assert [q.chain_id for q in store.quarantined()] == ["c1"]


def test_delete_ended_removes_only_old_ended_chains(make_store: StoreFactory) -> None:
    clock = FakeClock(1000.0)
    store = make_store(clock=clock)
    store.save("old-ended", b"a", ended=True)
    store.save("old-live", b"b")
    store.flush(WAIT)
    clock.now = 2000.0
    store.save_sync("new-ended", b"c", ended=True, timeout=WAIT)
    clock.now = 2500.0
    assert store.delete_ended(older_than_s=1000.0, timeout=WAIT) == 1
    assert store.load("old-ended") is None
    assert {row.chain_id for row in store.load_all()} == {"old-live", "new-ended"}


def test_flush_times_out_while_the_writer_is_held(
    store: SnapshotStore, gates: list[WriterGate]
) -> None:
    gate = gate_writer(store, gates)
    store.save("c1", b"x")
    with pytest.raises(StoreTimeoutError, match="not durable after"):
        store.flush(timeout=0.05)
    gate.release()
    store.flush(WAIT)
    assert store.load("c1") == b"x"


def test_flush_from_on_durable_is_refused_instead_of_deadlocking(store: SnapshotStore) -> None:
    errors: list[BaseException] = []
    fired = threading.Event()

    def on_durable() -> None:
        try:
            store.flush(WAIT)
        except StoreError as exc:
            errors.append(exc)
        fired.set()

    store.save("c1", b"x", on_durable=on_durable)
    assert fired.wait(WAIT)
    assert len(errors) == 1
    assert "deadlock" in str(errors[0])


def test_raising_on_durable_is_counted_and_the_writer_goes_on(store: SnapshotStore) -> None:
    def broken() -> None:
        raise RuntimeError("callback bug")

    store.save("c1", b"x", on_durable=broken)
    store.save_sync("c2", b"y", timeout=WAIT)
    assert store.stats().callback_errors == 1
    assert store.load("c2") == b"y"


def test_close_makes_queued_saves_durable_and_refuses_later_saves(
    store: SnapshotStore,
) -> None:
    fired = threading.Event()
    store.save("c1", b"x", on_durable=fired.set)
    store.close(timeout=WAIT)
    assert fired.is_set()
    with pytest.raises(StoreClosedError):
        store.save("c2", b"y")
    store.close(timeout=WAIT)


def test_store_is_a_context_manager(make_store: StoreFactory) -> None:
    fired = threading.Event()
    with make_store() as store:
        store.save("c1", b"x", on_durable=fired.set)
    assert fired.is_set()


def _poison(store: SnapshotStore) -> None:
    """Make the next write of chain "poison" fail the way a full disk would."""
    if isinstance(store, MemoryStore):
        store.fail_next_commit(OSError(28, "No space left on device"))
    else:
        assert isinstance(store, SqliteStore)
        conn = sqlite3.connect(store.path)
        conn.execute(
            "CREATE TRIGGER poison BEFORE INSERT ON snapshots WHEN NEW.chain_id = 'poison' "
            "BEGIN SELECT RAISE(ABORT, 'No space left on device'); END"
        )
        conn.commit()
        conn.close()


def test_failed_commit_fails_the_store_loudly_and_skips_on_durable(
    make_store: StoreFactory,
) -> None:
    failures: list[BaseException] = []
    store = make_store(on_failure=failures.append)
    store.save_sync("kept", b"committed before", timeout=WAIT)
    _poison(store)
    fired = threading.Event()
    store.save("poison", b"x", on_durable=fired.set)
    with pytest.raises(StoreError, match="No space left on device"):
        store.flush(WAIT)
    assert not fired.is_set()
    assert len(failures) == 1
    assert store.stats().failed
    assert store.failure is failures[0]
    with pytest.raises(StoreError, match="No space left on device"):
        store.save("later", b"y")
    with pytest.raises(StoreError, match="No space left on device"):
        store.flush(WAIT)
    with pytest.raises(StoreError, match="No space left on device"):
        store.quarantine("kept", b"", "x", timeout=WAIT)
    assert store.load("kept") == b"committed before"
    assert store.load("poison") is None
    with pytest.raises(StoreError, match="No space left on device"):
        store.close(timeout=WAIT)


# --- SQLite only ------------------------------------------------------------------------------


def test_committed_snapshots_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with SqliteStore(path) as store:
        store.save("c1", b"a")
        store.save("c2", b"b", ended=True)
        store.quarantine("c3", b"c", "corrupt")
    with SqliteStore(path) as store:
        assert list(store.load_live()) == [("c1", b"a")]
        assert store.load("c2") == b"b"
        assert [q.chain_id for q in store.quarantined()] == ["c3"]


def test_sqlite_store_uses_wal_and_the_chosen_synchronous_level(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with SqliteStore(path, synchronous="NORMAL") as store:
        store.save_sync("c1", b"a", timeout=WAIT)
        conn = sqlite3.connect(path)
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        conn.close()
    with pytest.raises(ValueError, match="synchronous"):
        SqliteStore(path, synchronous="OFF")  # type: ignore[arg-type]


def test_store_written_by_a_newer_format_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    SqliteStore(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {STORE_FORMAT + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer"):
        SqliteStore(path)
    with pytest.raises(StoreError, match="newer"):
        open_readonly(path)


def test_open_readonly_refuses_a_missing_file_or_a_foreign_database(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        open_readonly(tmp_path / "missing.db")
    foreign = tmp_path / "foreign.db"
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE t (x)")
    conn.close()
    with pytest.raises(StoreError, match="not a snapshot store"):
        open_readonly(foreign)


def test_readonly_reader_reads_while_the_writer_writes(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with SqliteStore(path) as store:
        for i in range(100):
            store.save(f"c{i}", blob_for(f"c{i}"))
        store.flush(WAIT)
        stop = threading.Event()
        wrote = threading.Semaphore(0)

        def keep_writing() -> None:
            seq = 0
            while not stop.is_set():
                seq += 1
                store.save(
                    f"c{seq % 100}", blob_for(f"c{seq % 100}", seq), on_durable=wrote.release
                )

        writer = threading.Thread(target=keep_writing)
        writer.start()
        try:
            assert wrote.acquire(timeout=WAIT)
            with open_readonly(path) as reader:
                live = dict(reader.load_live())
                assert len(live) == 100
                assert all(decode_snapshot(blob)["chain"] == c for c, blob in live.items())
                assert reader.counts().live == 100
            script = textwrap.dedent(
                f"""
                import sys
                sys.path.insert(0, {str(REPO)!r})
                from actors._store_sqlite import open_readonly
                with open_readonly({str(path)!r}) as reader:
                    print(reader.counts().live, len(list(reader.load_live())))
                """
            )
            result = subprocess.run(
                [sys.executable, "-c", script], capture_output=True, text=True, timeout=WAIT
            )
            assert result.returncode == 0, result.stderr
            assert result.stdout.split() == ["100", "100"]
            assert wrote.acquire(timeout=WAIT), "the writer stalled while being read"
        finally:
            stop.set()
            writer.join(WAIT)


def test_readonly_reader_cannot_write(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    SqliteStore(path).close()
    with open_readonly(path) as reader:
        conn = reader._thread_connection()
        with pytest.raises(sqlite3.Error):
            conn.execute("DELETE FROM snapshots")


def test_reading_after_close_raises_store_closed(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    store.close()
    with pytest.raises(StoreClosedError):
        store.load("c1")


_KILL_CHILD = """
import sys, threading
sys.path.insert(0, {repo!r})
from actors._snapshot import encode_snapshot
from actors._store_sqlite import SqliteStore

store = SqliteStore({path!r}, synchronous={synchronous!r})
window = threading.Semaphore(2000)

def reporter(seq):
    def on_durable():
        sys.stdout.write(f"durable {{seq}}\\n")
        sys.stdout.flush()
        window.release()
    return on_durable

seq = 0
while True:
    window.acquire()
    chain = f"chain-{{seq % {chains}}}"
    store.save(chain, encode_snapshot({{"chain": chain, "seq": seq}}), on_durable=reporter(seq))
    seq += 1
"""


@pytest.mark.parametrize("synchronous", ["FULL", "NORMAL"])
def test_every_snapshot_reported_durable_survives_kill_9(tmp_path: Path, synchronous: str) -> None:
    path = tmp_path / "s.db"
    chains, reports_before_kill = 500, 3000
    script = _KILL_CHILD.format(
        repo=str(REPO), path=str(path), synchronous=synchronous, chains=chains
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def read_stdout() -> None:
        assert child.stdout is not None
        for line in child.stdout:
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=read_stdout, daemon=True)
    reader.start()
    reported: list[str] = []
    try:
        while len(reported) < reports_before_kill:
            line = lines.get(timeout=WAIT)
            assert line is not None, f"child exited early: {child.stderr and child.stderr.read()}"
            reported.append(line)
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=WAIT) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=WAIT)
    reader.join(WAIT)
    while (line := lines.get(timeout=WAIT)) is not None:
        reported.append(line)

    newest: dict[str, int] = {}
    for line in reported:
        if not line.endswith("\n"):
            continue  # cut off by the kill
        seq = int(line.split()[1])
        chain = f"chain-{seq % chains}"
        newest[chain] = max(newest.get(chain, -1), seq)
    assert len(newest) == chains

    with SqliteStore(path) as store:
        for chain, seq in newest.items():
            blob = store.load(chain)
            assert blob is not None, f"{chain} was reported durable at seq {seq} but is gone"
            payload = decode_snapshot(blob)
            assert payload["chain"] == chain
            assert payload["seq"] >= seq, f"{chain} lost its durable save {seq}"
