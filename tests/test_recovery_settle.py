"""What recovery settles against the SPM is recorded before any actor acts on it.

A chain recovered in the middle of a revert whose task the SPM no longer knows has lost that
revert: its state moves on (the next attempt is fired, or the chain ends). The store must say
so before the SPM sees the next verb, and must hold the end of a chain whose handle reports it.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from _fake_spm import FakeTask
from conftest import FAST, WAIT, ScriptedSpm, chain, step

from actors import _chain as ch
from actors._runtime import Runtime, RuntimeOptions
from actors._snapshot import decode_snapshot, encode_snapshot
from actors._store_memory import MemoryStore

pytestmark = pytest.mark.timeout(30)

SPEC = chain("A", step("create", "delete", params={"img": "i1"}), step("copy"), chain_id="c1")


def _store_with_a_chain_reverting(attempts: int) -> MemoryStore:
    """Step 0 succeeded (T0), step 1 failed, the revert of step 0 runs as attempt
    ``attempts`` (task R<attempts>), a task the SPM will not know."""
    state = ch.new_chain(SPEC, "c1", time.time(), 3600, 600)
    old = tuple(f"R{k}" for k in range(1, attempts))
    r0 = ch.StepRecord(0, "create", {"img": "i1"}, "delete", None, (), (), status="succeeded",
                       task_id="T0", revert_status="running", revert_task_id=f"R{attempts}",
                       revert_attempts=attempts, old_revert_task_ids=old)
    r1 = ch.StepRecord(1, "copy", {}, None, None, (), (), status="failed", task_id="T1")
    state = ch.replace(state, phase="reverting", steps=(r0, r1), reason="step 1 failed",
                       revert_queue=())
    store = MemoryStore()
    store.save("c1", encode_snapshot(state.to_dict(with_spec=False)), spec=SPEC.packed())
    store.flush()
    return store


def _durable(store: MemoryStore) -> dict[str, Any]:
    blob = store.load("c1")
    assert blob is not None
    return decode_snapshot(blob)


def test_a_revert_fired_again_after_its_task_was_lost_is_recorded_before_it_is_fired() -> None:
    store = _store_with_a_chain_reverting(1)
    seen: list[tuple[str, int | None]] = []

    class Watching(ScriptedSpm):
        def fire(self, verb: str, params: Any) -> str:
            record = ch.ChainState.from_dict(_durable(store), store.load_spec("c1")).steps[0]
            seen.append((verb, record.revert_attempts))
            return str(super().fire(verb, params))

    spm = Watching(pool="A", auto="success")
    rt = Runtime([spm], RuntimeOptions(**FAST), store=store).start()
    try:
        (handle,) = rt.recovered
        result = handle.result(WAIT)
    finally:
        rt.stop()
    assert result.outcome == ch.ENDED_WITH_FAILURE
    # The lost attempt 1 is recorded as such (attempt 2 asked for) before attempt 2 is fired.
    assert seen == [("delete", 2)]


def test_a_chain_that_ends_at_recovery_is_recorded_ended_before_its_handle_says_so() -> None:
    store = _store_with_a_chain_reverting(ch.REVERT_ATTEMPTS)
    spm = ScriptedSpm(pool="A", auto="success")
    rt = Runtime([spm], RuntimeOptions(**FAST), store=store).start()
    try:
        (handle,) = rt.recovered
        result = handle.result(WAIT)
        assert result.outcome == ch.ENDED_WITH_FAILURE
        durable = _durable(store)
    finally:
        rt.stop()
    assert durable["phase"] == "ended"
    assert spm.fired == []  # nothing more to revert: it ran out of attempts


class _TellingParams(ScriptedSpm):
    """Reports each task's parameters in getAllTasksInfo, as the simulator does."""

    def getAllTasksInfo(self) -> Any:  # noqa: N802
        with self.lock:
            return {tid: {"id": tid, "verb": t.verb, "params": dict(t.params)}
                    for tid, t in self.tasks.items()}


def test_a_live_chain_never_adopts_the_uncleared_task_of_an_ended_chain() -> None:
    """An ended chain's task with the same verb and parameters is still on the SPM (the
    engine died before clearing it); a live chain whose step was being fired must not take it
    for its own: that task is only cleared, and the live step is fired anew."""
    params = {"img": "i1"}
    ended_spec = chain("A", step("create", params=params), chain_id="c0")
    ended = ch.new_chain(ended_spec, "c0", time.time(), 3600, 600)
    ended = ch.replace(ended, phase="ended", outcome=ch.ENDED_SUCCESSFULLY, steps=(
        ch.StepRecord(0, "create", params, None, None, (), (), status="succeeded",
                      task_id="T-old"),))
    live_spec = chain("A", step("create", params=params), chain_id="c1")
    live = ch.new_chain(live_spec, "c1", time.time(), 3600, 600)
    live = ch.replace(live, phase="running", steps=(
        ch.StepRecord(0, "create", params, None, None, (), (), status="submitting"),))
    store = MemoryStore()
    store.save("c0", encode_snapshot(ended.to_dict(with_spec=False)), ended=True,
               spec=ended_spec.packed())
    store.save("c1", encode_snapshot(live.to_dict(with_spec=False)), spec=live_spec.packed())
    store.flush()
    spm = _TellingParams(pool="A", auto="success")
    with spm.lock:
        spm.tasks["T-old"] = FakeTask("T-old", "create", params, state="finished",
                                      result="success")
    rt = Runtime([spm], RuntimeOptions(**FAST), store=store).start()
    try:
        (handle,) = rt.recovered
        assert handle.result(WAIT).succeeded
        spm.expect(lambda: not spm.tasks, "every task cleared")
    finally:
        rt.stop()
    assert [c for c in spm.calls if c[1] == "T-old"] == [("clear", "T-old")]
    assert spm.verbs() == ["create"]  # fired anew for c1
    recorded = ch.ChainState.from_dict(_durable(store), store.load_spec("c1")).steps[0]
    assert recorded.task_id not in (None, "T-old")


def test_a_rebuilt_spm_task_actor_is_not_asked_again_for_a_step_its_chain_saw_fired() -> None:
    """The durable state may still show a step being fired after the chain heard its task id
    (that record asks nothing of the SPM, so it is not waited for); a resync must not ask for
    that step again (with its clear already through, it would be fired a second time)."""
    spm = ScriptedSpm(pool="A")
    rt = Runtime([spm], RuntimeOptions(**FAST), store="memory").start()
    try:
        rt.submit(chain("A", step("a"), step("b")))
        fired = spm.wait_fired(1)[0]
        spm.wait_polls(3)
        core = rt._core
        assert core is not None
        (entry,) = core.chains.values()
        assert entry.state.steps[0].task_id == fired.task_id
        assert entry.durable.steps[0].task_id is None  # still "being fired" there
        sent: list[Any] = []
        core.tell_task_actor = lambda pool, message: sent.append(message)  # type: ignore
        core.resync("A")
        (resync,) = sent
        assert [a.task_id for a in resync.adopts] == [fired.task_id]
        assert resync.fires == ()
    finally:
        rt.stop()
