"""A snapshot that does not decode is quarantined at recovery; the other chains resume and end.

The store is written by a real runtime whose chains are caught with their first task running
(the simulated SPM's clock is held still), then three snapshots are damaged behind its back with
``sqlite3``: one byte flipped, one cut in half, one re-framed as schema version 99 (a valid frame
and checksum around a version this code does not know). A new runtime on the same store must
keep those three aside (with the reason, counted in the metrics), discard their tasks on the SPM
as orphans, and resume and end every other chain.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _engine_proc import ENGINE_OPTIONS, chain_specs
from conftest import FAST, ScriptedSpm, chain, step, wait_until

from actors._chain import ENDED_SUCCESSFULLY, TaskEnded
from actors._command import CommandActor
from actors._faults import InjectedFault
from actors._loadtest import pool_ids
from actors._runtime import Runtime, RuntimeOptions
from actors._snapshot import HEADER_SIZE, _frame, decode_snapshot
from actors._spec import ChainSpec
from actors._spm_task import SpmTaskActor
from spm._clock import HeldClock
from spm._simulator import SimulatedSpm

WAIT = 15.0
CHAINS = 8
STEPS = 3


def _metric(rt: Runtime, name: str) -> float:
    value = rt.metrics.registry.get_sample_value(name)
    return 0.0 if value is None else value


def _blob(db: Path, chain_id: str) -> bytes:
    with sqlite3.connect(db) as conn:
        row = conn.execute("SELECT blob FROM snapshots WHERE chain_id = ?", (chain_id,)).fetchone()
    assert row is not None, chain_id
    return bytes(row[0])


def _overwrite(db: Path, chain_id: str, blob: bytes) -> None:
    conn = sqlite3.connect(db)
    try:
        with conn:
            conn.execute("UPDATE snapshots SET blob = ? WHERE chain_id = ?", (blob, chain_id))
    finally:
        conn.close()


@pytest.fixture
def live_store(tmp_path: Path, seed: int) -> Iterator[tuple[Path, SimulatedSpm, HeldClock,
                                                          list[ChainSpec]]]:
    """A store whose chains all have their first task running on ``spm`` (clock held)."""
    pool = pool_ids(1, seed)[0]
    clock = HeldClock()
    spm = SimulatedSpm(pool, clock=clock, durations=0.01, seed=seed)
    specs = chain_specs(CHAINS, STEPS, seed, [pool])
    db = tmp_path / "snapshots.sqlite"
    rt = Runtime({pool: spm}, RuntimeOptions(**ENGINE_OPTIONS), store=db).start()
    try:
        for spec in specs:
            rt.submit(spec)

        def first_task_recorded() -> bool:
            states = rt.chains()
            return len(states) == CHAINS and all(
                s.steps and s.steps[0].task_id is not None for s in states)

        wait_until(first_task_recorded, "every chain to record its first task id", WAIT)
        rt.flush()
    finally:
        rt.stop()
    assert len(spm.getAllTasksStatuses()) == CHAINS
    yield db, spm, clock, specs
    spm.close()


def test_corrupt_truncated_and_unknown_version_snapshots_are_quarantined_and_the_rest_resume(
    live_store: tuple[Path, SimulatedSpm, HeldClock, list[ChainSpec]],
) -> None:
    db, spm, clock, specs = live_store
    ids = [str(s.chain_id) for s in specs]
    corrupt, truncated, future = ids[1], ids[4], ids[6]
    damaged: dict[str, bytes] = {}

    blob = bytearray(_blob(db, corrupt))
    blob[HEADER_SIZE + len(blob[HEADER_SIZE:]) // 2] ^= 0x10  # one bit, mid-payload
    damaged[corrupt] = bytes(blob)
    blob = bytearray(_blob(db, truncated))
    damaged[truncated] = bytes(blob[: len(blob) // 2])
    damaged[future] = _frame(_blob(db, future)[HEADER_SIZE:], 99)
    for chain_id, data in damaged.items():
        _overwrite(db, chain_id, data)

    clock.release(jump=60.0)  # the first tasks are done by the time anyone looks
    rt = Runtime({spm.pool: spm}, RuntimeOptions(**ENGINE_OPTIONS), store=db).start()
    try:
        assert rt.quarantined == 3
        assert _metric(rt, "spmchain_snapshots_quarantined_total") == 3.0
        assert rt.store is not None
        kept = {q.chain_id: q for q in rt.store.quarantined()}
        assert set(kept) == set(damaged)
        for chain_id, data in damaged.items():
            assert kept[chain_id].blob == data, f"{chain_id}: the blob was not kept as it was"
        assert "corrupt" in kept[corrupt].reason and "checksum" in kept[corrupt].reason
        assert "truncated" in kept[truncated].reason
        assert "unsupported_version" in kept[future].reason and "99" in kept[future].reason

        resumed = {h.chain_id: h for h in rt.recovered}
        assert set(resumed) == set(ids) - set(damaged)
        for chain_id, handle in resumed.items():
            result = handle.result(WAIT)
            assert result.outcome == ENDED_SUCCESSFULLY, (chain_id, result.reason)
        counts = rt.store.counts()
        assert (counts.live, counts.ended, counts.quarantined) == (0, CHAINS - 3, 3)
        # The quarantined chains' tasks are owned by no chain: discarded as orphans.
        wait_until(lambda: not spm.getAllTasksStatuses(),
                   "every task to be cleared from the SPM", WAIT)
    finally:
        rt.stop()

    by_image: dict[str, set[str]] = {}
    for obj in spm.objects():
        by_image.setdefault(obj.img_uuid, set()).add(obj.vol_uuid or "")
    for spec in specs:
        assert spec.steps is not None
        vols = by_image.get(spec.params["imgUUID"], set())
        if spec.chain_id in damaged:
            assert not vols, f"{spec.chain_id}: an orphan's effect was left on the storage"
        else:
            assert vols == {"", *(s.params["volUUID"] for s in spec.steps)}, spec.chain_id
    assert spm.duplicated_effects() == 0, spm.duplicates()

    # Quarantined once: the next start neither counts nor resumes them again.
    again = Runtime({spm.pool: spm}, RuntimeOptions(**ENGINE_OPTIONS), store=db).start()
    try:
        assert (again.quarantined, len(again.recovered)) == (0, 0)
        assert _metric(again, "spmchain_snapshots_quarantined_total") == 0.0
        assert again.store is not None and len(again.store.quarantined()) == 3
    finally:
        again.stop()



def test_orphans_that_end_before_the_pools_spm_task_actor_is_registered_are_still_discarded(
    live_store: tuple[Path, SimulatedSpm, HeldClock, list[ChainSpec]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The poller may see a recovery orphan end at its first poll, before the runtime has put
    the new SpmTaskActor where the poller sends its reports. That report must not be lost (it
    was: the discard stayed "stopping" forever and the pool never fired again)."""
    db, spm, clock, specs = live_store
    ids = [str(s.chain_id) for s in specs]
    damaged = ids[1], ids[4]
    for chain_id in damaged:
        _overwrite(db, chain_id, _blob(db, chain_id)[: HEADER_SIZE + 3])

    polled = threading.Condition()
    polls = [0]
    real_statuses = spm.getAllTasksStatuses

    def counting_statuses() -> Any:
        out = real_statuses()
        with polled:
            polls[0] += 1
            polled.notify_all()
        return out

    monkeypatch.setattr(spm, "getAllTasksStatuses", counting_statuses)
    real_start = SpmTaskActor.start

    def late_registered_start(*args: Any, **kwargs: Any) -> Any:
        ref = real_start(*args, **kwargs)
        with polled:  # the poller looks a few times before the runtime knows ``ref``
            seen = polls[0]
            assert polled.wait_for(lambda: polls[0] >= seen + 3, WAIT), "the poller never polled"
        return ref

    monkeypatch.setattr(SpmTaskActor, "start", staticmethod(late_registered_start))
    clock.release(jump=60.0)
    rt = Runtime({spm.pool: spm}, RuntimeOptions(**ENGINE_OPTIONS), store=db).start()
    try:
        assert rt.quarantined == len(damaged)
        for handle in rt.recovered:
            result = handle.result(WAIT)
            assert result.outcome == ENDED_SUCCESSFULLY, (handle.chain_id, result.reason)
        wait_until(lambda: not spm.getAllTasksStatuses(), "every task to be cleared from the SPM",
                   WAIT)
    finally:
        rt.stop()
    for spec in specs:
        if spec.chain_id in damaged:
            assert not any(o.img_uuid == spec.params["imgUUID"] for o in spm.objects()), (
                f"{spec.chain_id}: an orphan's effect was left on the storage")


def test_a_snapshot_damaged_under_a_running_runtime_does_not_lose_its_chain_at_a_rebuild(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The chain's actor fails after its snapshot was damaged on disk: it is rebuilt from the
    state the runtime recorded last (still in memory), which is written again; the chain
    ends as if nothing had happened (it was dropped, its handle never answering)."""
    spm = ScriptedSpm(pool="A")
    db = tmp_path / "snapshots.sqlite"
    failed: list[bool] = []
    real_on_receive = CommandActor.on_receive

    def on_receive_failing_at_the_first_task_end(self: CommandActor, message: Any) -> Any:
        if isinstance(message, TaskEnded) and not failed:
            failed.append(True)
            raise InjectedFault("the chain's actor fails")
        return real_on_receive(self, message)

    monkeypatch.setattr(CommandActor, "on_receive", on_receive_failing_at_the_first_task_end)
    rt = Runtime([spm], RuntimeOptions(**FAST), store=db).start()
    try:
        handle = rt.submit(chain("A", step("a"), step("b")))
        first = spm.wait_fired(1)[0]
        spm.wait_polls(3)
        rt.flush()
        blob = bytearray(_blob(db, handle.chain_id))
        blob[HEADER_SIZE + len(blob[HEADER_SIZE:]) // 2] ^= 0x10
        _overwrite(db, handle.chain_id, bytes(blob))
        spm.finish(first.task_id)
        spm.finish(spm.wait_fired(2)[1].task_id)
        result = handle.result(WAIT)
        assert result.outcome == ENDED_SUCCESSFULLY, result.reason
        assert failed == [True]
        rt.flush()
    finally:
        rt.stop()
    assert spm.verbs() == ["a", "b"]
    state = decode_snapshot(_blob(db, handle.chain_id))  # whole again, and up to date
    assert state["phase"] == "ended" and state["outcome"] == ENDED_SUCCESSFULLY
    with sqlite3.connect(db) as conn:  # the damaged blob kept, with the reason
        kept = conn.execute("SELECT chain_id, blob, reason FROM quarantine").fetchall()
    assert [(c, bytes(b)) for c, b, _ in kept] == [(handle.chain_id, bytes(blob))]
    assert "checksum" in kept[0][2]
