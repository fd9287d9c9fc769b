"""The chain state machine, example by example: each test pins one behaviour of ``transition``.

Every event goes through :meth:`Run.send`, which also checks what holds at every point of every
run: the state given to ``transition`` is left as it was, and the new state survives a snapshot
(``to_dict`` → msgpack → ``from_dict``) unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgpack  # type: ignore[import-untyped]
import pytest

from actors._chain import (
    ENDED_SUCCESSFULLY,
    ENDED_WITH_FAILURE,
    REVERT_ATTEMPTS,
    AckTask,
    Cancel,
    ChainEnded,
    ChainState,
    DiscardTask,
    Effect,
    Event,
    FireRefused,
    FireTask,
    HookDone,
    RunHook,
    Start,
    StopTask,
    TaskEnded,
    TaskFired,
    TaskLost,
    Tick,
    ZombieTask,
    new_chain,
    resume_effects,
    transition,
)
from actors._spec import ChainSpec, Command, StepResult, StepSpec, register_command

DEADLINE = 100.0
TASK_TIMEOUT = 10.0
ABORTED = 411  # VDSM's "task aborted": what a stopped task ends with


def _step(i: int, revert: bool = True) -> StepSpec:
    return StepSpec(
        verb=f"verb{i}",
        params={"i": i},
        revert_verb=f"undo{i}" if revert else None,
        exclusive=(f"img-{i}",),
    )


def _spec(n: int = 3, no_revert: Sequence[int] = ()) -> ChainSpec:
    return ChainSpec(
        pool="pool-1",
        command_type="test",
        steps=[_step(i, i not in no_revert) for i in range(n)],
    )


def _fire(i: int) -> FireTask:
    return FireTask(("step", i, 0), f"verb{i}", {"i": i}, (f"img-{i}",), ())


def _fire_revert(i: int, attempt: int = 1) -> FireTask:
    return FireTask(("revert", i, attempt), f"undo{i}", {"i": i}, (f"img-{i}",), ())


def _snapshot(state: ChainState) -> ChainState:
    """What a recorded snapshot gives back: the state through to_dict, msgpack and from_dict."""
    blob = msgpack.packb(state.to_dict(), use_bin_type=True)
    return ChainState.from_dict(msgpack.unpackb(blob, raw=False))


class Run:
    """One chain driven event by event, with the checks every transition must pass."""

    def __init__(self, spec: ChainSpec | None = None, command: Command | None = None) -> None:
        spec = spec if spec is not None else _spec()
        self.state = new_chain(spec, "chain-1", 0.0, DEADLINE, TASK_TIMEOUT)
        self.command = command if command is not None else spec.make_command()
        self.now = 0.0
        self.states = [self.state]

    def send(self, event: Event) -> list[Effect]:
        before = self.state
        recorded = before.to_dict()
        copy = ChainState.from_dict(recorded)
        new, effects = transition(before, event, self.command)
        assert before.to_dict() == recorded, "transition modified the state it was given"
        assert before == copy
        assert ChainState.from_dict(new.to_dict()) == new
        assert _snapshot(new) == new
        self.state = new
        self.states.append(new)
        return list(effects)

    def at(self) -> float:
        self.now += 1.0
        return self.now

    # Shorthands for the common events.
    def start(self) -> list[Effect]:
        return self.send(Start(self.at()))

    def fired(self, i: int, task_id: str | None = None) -> list[Effect]:
        return self.send(TaskFired(("step", i, 0), task_id or f"t{i}", self.at()))

    def ended(self, task_id: str, ok: bool = True, code: int = 0, msg: str = "") -> list[Effect]:
        return self.send(TaskEnded(task_id, ok, code, msg, self.at()))

    def hook(self, hook: str, index: int = -1, error: str | None = None) -> list[Effect]:
        return self.send(HookDone(hook, index, error, self.at()))

    def revert_fired(self, i: int, attempt: int = 1) -> list[Effect]:
        return self.send(TaskFired(("revert", i, attempt), f"r{i}.{attempt}", self.at()))

    def step_succeeds(self, i: int) -> list[Effect]:
        """Step ``i`` (already fired) runs and succeeds; returns what its end_step hook leads to."""
        assert self.fired(i) == []
        assert self.ended(f"t{i}") == [AckTask(f"t{i}"), RunHook("end_step", i)]
        return self.hook("end_step", i)

    def revert_succeeds(self, i: int, attempt: int = 1) -> list[Effect]:
        assert self.revert_fired(i, attempt) == []
        effects = self.ended(f"r{i}.{attempt}")
        assert effects[0] == AckTask(f"r{i}.{attempt}")
        return effects[1:]


def _phase(run: Run) -> str:
    return run.state.phase


def _ended(effects: Sequence[Effect]) -> ChainEnded:
    assert len(effects) >= 1 and isinstance(effects[-1], ChainEnded), effects
    return effects[-1]


# --------------------------------------------------------------------------------------------
# Happy path


def test_three_step_chain_fires_each_step_after_the_previous_ended_and_its_hook_ran() -> None:
    run = Run()
    assert run.start() == [_fire(0)]
    assert run.state.phase == "running"
    assert run.fired(0) == []
    assert run.ended("t0") == [AckTask("t0"), RunHook("end_step", 0)]
    assert run.hook("end_step", 0) == [_fire(1)]
    assert run.fired(1) == []
    assert run.ended("t1") == [AckTask("t1"), RunHook("end_step", 1)]
    assert run.hook("end_step", 1) == [_fire(2)]
    assert run.fired(2) == []
    assert run.ended("t2") == [AckTask("t2"), RunHook("end_step", 2)]
    assert run.hook("end_step", 2) == [RunHook("end_successfully", -1)]
    assert run.hook("end_successfully") == [ChainEnded(ENDED_SUCCESSFULLY, None)]
    st = run.state
    assert st.ended and st.outcome == ENDED_SUCCESSFULLY and st.reason is None
    assert [s.status for s in st.steps] == ["succeeded"] * 3
    assert [r.task_id for r in st.results()] == ["t0", "t1", "t2"]


def test_start_twice_fires_the_first_step_once() -> None:
    run = Run()
    assert run.start() == [_fire(0)]
    state = run.state
    assert run.start() == []
    assert run.state is state


def test_events_after_the_end_change_nothing() -> None:
    run = Run(_spec(1))
    run.start()
    assert run.step_succeeds(0) == [RunHook("end_successfully", -1)]
    run.hook("end_successfully")
    ended = run.state
    for event in (
        Cancel("late", run.at()),
        Tick(DEADLINE * 10),
        HookDone("end_successfully", -1, None, run.at()),
        Start(run.at()),
        TaskLost("t0", run.at()),
        ZombieTask("t0", run.at()),
        FireRefused(("step", 0, 0), 400, "late", run.at()),
    ):
        assert run.send(event) == []
        assert run.state is ended


# --------------------------------------------------------------------------------------------
# Failure and revert


def test_failed_step_reverts_previous_steps_in_reverse() -> None:
    run = Run()
    run.start()
    run.step_succeeds(0)
    run.step_succeeds(1)
    assert run.fired(2) == []
    message = "value=Volume does not exist abortedcode=201"
    assert run.ended("t2", ok=False, code=201, msg=message) == [
        AckTask("t2"),
        RunHook("end_with_failure", -1),
    ]
    assert _phase(run) == "failing"
    assert run.hook("end_with_failure") == [_fire_revert(1)]
    assert _phase(run) == "reverting"
    # Nothing moves the revert of step 0 forward before the revert of step 1 has ended.
    assert run.revert_fired(1) == []
    assert run.send(Tick(run.at())) == []
    assert run.ended("t2", ok=False, code=201, msg=message) == [AckTask("t2")]
    assert run.ended("r1.1") == [AckTask("r1.1"), _fire_revert(0)]
    assert run.revert_fired(0) == []
    effects = run.ended("r0.1")
    assert effects[0] == AckTask("r0.1")
    end = _ended(effects)
    assert len(effects) == 2
    assert end.outcome == ENDED_WITH_FAILURE
    assert end.reason is not None
    assert "step 2" in end.reason and "verb2" in end.reason and "201" in end.reason
    st = run.state
    assert st.outcome == ENDED_WITH_FAILURE and st.reason == end.reason
    assert [s.status for s in st.steps] == ["succeeded", "succeeded", "failed"]
    assert [s.revert_status for s in st.steps] == ["succeeded", "succeeded", None]


def test_first_step_failing_ends_the_chain_with_nothing_to_revert() -> None:
    run = Run()
    run.start()
    run.fired(0)
    assert run.ended("t0", ok=False, code=100, msg="boom") == [
        AckTask("t0"),
        RunHook("end_with_failure", -1),
    ]
    end = _ended(run.hook("end_with_failure"))
    assert end.outcome == ENDED_WITH_FAILURE
    assert end.reason is not None and "step 0" in end.reason


def test_steps_without_revert_verb_are_skipped_in_reverts() -> None:
    run = Run(_spec(4, no_revert=[1, 2]))
    run.start()
    for i in range(3):
        run.step_succeeds(i)
    run.fired(3)
    run.ended("t3", ok=False, code=100, msg="boom")
    assert run.hook("end_with_failure") == [_fire_revert(0)]
    effects = run.revert_succeeds(0)
    assert _ended(effects).outcome == ENDED_WITH_FAILURE
    assert len(effects) == 1


def test_revert_uses_revert_params_when_given() -> None:
    spec = ChainSpec(
        pool="pool-1",
        command_type="test",
        steps=[
            StepSpec("create", {"img": "a"}, "delete", {"img": "a", "force": True}, ("a",)),
            StepSpec("copy", {"src": "a"}),
        ],
    )
    run = Run(spec)
    run.start()
    run.step_succeeds(0)
    run.fired(1)
    run.ended("t1", ok=False, code=100, msg="boom")
    assert run.hook("end_with_failure") == [
        FireTask(("revert", 0, 1), "delete", {"img": "a", "force": True}, ("a",), ())
    ]


def test_revert_failure_is_retried_up_to_revert_attempts_then_noted_in_the_reason() -> None:
    run = Run()
    run.start()
    run.step_succeeds(0)
    run.step_succeeds(1)
    run.fired(2)
    run.ended("t2", ok=False, code=100, msg="boom")
    assert run.hook("end_with_failure") == [_fire_revert(1)]
    for attempt in range(1, REVERT_ATTEMPTS):
        assert run.revert_fired(1, attempt) == []
        assert run.ended(f"r1.{attempt}", ok=False, code=352, msg="lock busy") == [
            AckTask(f"r1.{attempt}"),
            _fire_revert(1, attempt + 1),
        ]
    assert run.revert_fired(1, REVERT_ATTEMPTS) == []
    last = f"r1.{REVERT_ATTEMPTS}"
    # Given up on step 1's revert, the chain goes on with step 0's.
    assert run.ended(last, ok=False, code=352, msg="lock busy") == [AckTask(last), _fire_revert(0)]
    end = _ended(run.revert_succeeds(0))
    assert end.reason is not None
    assert end.reason.startswith("step 2 (verb2) failed")
    assert f"revert of step 1 (undo1) failed {REVERT_ATTEMPTS} times" in end.reason
    assert "352" in end.reason
    assert [s.revert_status for s in run.state.steps[:2]] == ["succeeded", "failed"]


def test_refused_revert_is_retried_like_a_failed_one() -> None:
    run = Run(_spec(2))
    run.start()
    run.step_succeeds(0)
    run.fired(1)
    run.ended("t1", ok=False, code=100, msg="boom")
    run.hook("end_with_failure")
    for attempt in range(1, REVERT_ATTEMPTS):
        refused = FireRefused(("revert", 0, attempt), 654, "not SPM", run.at())
        assert run.send(refused) == [_fire_revert(0, attempt + 1)]
    refused = FireRefused(("revert", 0, REVERT_ATTEMPTS), 654, "not SPM", run.at())
    end = _ended(run.send(refused))
    assert end.reason is not None and "654" in end.reason


def test_refused_step_fails_the_chain_without_reverting_the_refused_step() -> None:
    run = Run()
    run.start()
    run.step_succeeds(0)
    refused = FireRefused(("step", 1, 0), 100, "Storage domain does not exist", run.at())
    assert run.send(refused) == [RunHook("end_with_failure", -1)]
    assert run.state.steps[1].status == "failed"
    assert run.hook("end_with_failure") == [_fire_revert(0)]
    end = _ended(run.revert_succeeds(0))
    assert end.reason is not None
    assert "step 1" in end.reason and "refused" in end.reason and "100" in end.reason
    assert run.state.steps[1].revert_status is None


def test_lost_step_task_is_treated_as_unknown_and_reverted_too() -> None:
    run = Run()
    run.start()
    run.step_succeeds(0)
    run.fired(1)
    assert run.send(TaskLost("t1", run.at())) == [RunHook("end_with_failure", -1)]
    assert run.state.steps[1].status == "unknown"
    assert run.hook("end_with_failure") == [_fire_revert(1)]
    assert run.revert_succeeds(1) == [_fire_revert(0)]
    end = _ended(run.revert_succeeds(0))
    assert end.reason is not None and "unknown" in end.reason and "t1" in end.reason


def test_lost_revert_task_is_fired_again() -> None:
    run = Run(_spec(2))
    run.start()
    run.step_succeeds(0)
    run.fired(1)
    run.ended("t1", ok=False, code=100, msg="boom")
    run.hook("end_with_failure")
    run.revert_fired(0)
    assert run.send(TaskLost("r0.1", run.at())) == [_fire_revert(0, 2)]


def test_end_with_failure_hook_error_is_noted_and_reverts_go_on() -> None:
    run = Run(_spec(2))
    run.start()
    run.step_succeeds(0)
    run.fired(1)
    run.ended("t1", ok=False, code=100, msg="boom")
    assert run.hook("end_with_failure", error="ValueError: bad") == [_fire_revert(0)]
    end = _ended(run.revert_succeeds(0))
    assert end.reason is not None and "ValueError: bad" in end.reason


# --------------------------------------------------------------------------------------------
# Cancel, deadlines, zombies


@pytest.mark.parametrize("stopped_task_succeeded", [False, True])
def test_cancel_while_a_task_runs_stops_it_then_reverts_the_succeeded_steps(
    stopped_task_succeeded: bool,
) -> None:
    run = Run()
    run.start()
    run.step_succeeds(0)
    run.fired(1)
    assert run.send(Cancel("operator asked", run.at())) == [StopTask("t1")]
    assert run.send(Cancel("again", run.at())) == []
    if stopped_task_succeeded:
        # It finished just before the stop reached the SPM: it is reverted too.
        assert run.ended("t1") == [AckTask("t1"), RunHook("end_with_failure", -1)]
        assert run.hook("end_with_failure") == [_fire_revert(1)]
        assert run.revert_succeeds(1) == [_fire_revert(0)]
    else:
        aborted = "value=Task is aborted abortedcode=411"
        assert run.ended("t1", ok=False, code=ABORTED, msg=aborted) == [
            AckTask("t1"),
            RunHook("end_with_failure", -1),
        ]
        assert run.hook("end_with_failure") == [_fire_revert(0)]
    end = _ended(run.revert_succeeds(0))
    assert end == ChainEnded(ENDED_WITH_FAILURE, "operator asked")


def test_cancel_while_submitting_sends_the_stop_once_the_task_is_fired() -> None:
    run = Run()
    run.start()
    run.step_succeeds(0)
    assert run.send(Cancel("operator asked", run.at())) == []
    assert run.fired(1) == [StopTask("t1")]
    assert run.state.steps[1].stop_sent
    assert run.ended("t1", ok=False, code=ABORTED, msg="aborted") == [
        AckTask("t1"),
        RunHook("end_with_failure", -1),
    ]
    assert run.hook("end_with_failure") == [_fire_revert(0)]
    assert _ended(run.revert_succeeds(0)).reason == "operator asked"


def test_cancel_while_submitting_then_refused_fails_with_the_cancel_reason() -> None:
    run = Run()
    run.start()
    run.send(Cancel("operator asked", run.at()))
    assert run.send(FireRefused(("step", 0, 0), 100, "no", run.at())) == [
        RunHook("end_with_failure", -1)
    ]
    assert _ended(run.hook("end_with_failure")).reason == "operator asked"


def test_cancel_during_the_end_step_hook_fails_the_chain_when_the_hook_is_done() -> None:
    run = Run()
    run.start()
    run.fired(0)
    assert run.ended("t0") == [AckTask("t0"), RunHook("end_step", 0)]
    assert run.send(Cancel("operator asked", run.at())) == []
    assert run.hook("end_step", 0) == [RunHook("end_with_failure", -1)]
    assert run.hook("end_with_failure") == [_fire_revert(0)]
    assert _ended(run.revert_succeeds(0)) == ChainEnded(ENDED_WITH_FAILURE, "operator asked")
    assert len(run.state.steps) == 1


def test_cancel_during_the_end_successfully_hook_fails_the_chain() -> None:
    run = Run(_spec(1))
    run.start()
    assert run.step_succeeds(0) == [RunHook("end_successfully", -1)]
    assert run.send(Cancel("operator asked", run.at())) == []
    assert run.hook("end_successfully") == [RunHook("end_with_failure", -1)]
    assert run.hook("end_with_failure") == [_fire_revert(0)]
    assert _ended(run.revert_succeeds(0)).outcome == ENDED_WITH_FAILURE


def test_cancel_before_start_ends_the_chain_without_firing_anything() -> None:
    run = Run()
    assert run.send(Cancel("not wanted", run.at())) == [RunHook("end_with_failure", -1)]
    assert run.hook("end_with_failure") == [ChainEnded(ENDED_WITH_FAILURE, "not wanted")]
    assert run.start() == []


def test_cancel_while_failing_or_reverting_changes_nothing() -> None:
    run = Run()
    run.start()
    run.step_succeeds(0)
    run.fired(1)
    run.ended("t1", ok=False, code=100, msg="boom")
    failing = run.state
    assert run.send(Cancel("late", run.at())) == []
    assert run.state is failing
    run.hook("end_with_failure")
    reverting = run.state
    assert run.send(Cancel("late", run.at())) == []
    assert run.state is reverting
    end = _ended(run.revert_succeeds(0))
    assert end.reason is not None and "late" not in end.reason


def test_tick_past_the_deadline_cancels_with_a_reason_naming_the_deadline() -> None:
    run = Run()
    run.start()
    run.step_succeeds(0)
    run.fired(1)
    assert run.send(Tick(DEADLINE - 0.5)) == []
    assert run.send(Tick(DEADLINE)) == [StopTask("t1")]
    assert run.send(Tick(DEADLINE + 1)) == []
    assert run.ended("t1", ok=False, code=ABORTED, msg="aborted") == [
        AckTask("t1"),
        RunHook("end_with_failure", -1),
    ]
    assert run.hook("end_with_failure") == [_fire_revert(0)]
    end = _ended(run.revert_succeeds(0))
    assert end.reason is not None and "deadline" in end.reason and "100 s" in end.reason


def test_tick_past_the_deadline_before_start_fails_the_chain() -> None:
    run = Run()
    assert run.send(Tick(DEADLINE)) == [RunHook("end_with_failure", -1)]
    end = _ended(run.hook("end_with_failure"))
    assert end.reason is not None and "deadline" in end.reason


def test_tick_past_the_hard_deadline_ends_the_chain_and_discards_tasks_in_flight() -> None:
    run = Run()
    run.start()
    run.step_succeeds(0)
    run.fired(1)
    assert run.send(Tick(DEADLINE)) == [StopTask("t1")]
    # The stopped task never ends; the chain does, at deadline + task timeout.
    assert run.send(Tick(DEADLINE + TASK_TIMEOUT - 0.1)) == []
    effects = run.send(Tick(DEADLINE + TASK_TIMEOUT))
    assert effects[:-1] == [DiscardTask("t1")]
    end = _ended(effects)
    assert end.outcome == ENDED_WITH_FAILURE
    assert end.reason is not None
    assert "deadline" in end.reason and "not reverted: [0, 1]" in end.reason
    assert run.state.ended
    assert run.send(Tick(DEADLINE * 10)) == []


def test_tick_past_the_hard_deadline_while_reverting_names_the_unreverted_steps() -> None:
    run = Run()
    run.start()
    run.step_succeeds(0)
    run.step_succeeds(1)
    run.fired(2)
    run.ended("t2", ok=False, code=100, msg="boom")
    run.hook("end_with_failure")
    run.revert_fired(1)
    assert run.send(Tick(DEADLINE)) == []  # already failing: nothing more to cancel
    effects = run.send(Tick(DEADLINE + TASK_TIMEOUT))
    assert effects[:-1] == [DiscardTask("r1.1")]
    end = _ended(effects)
    assert end.reason is not None
    assert end.reason.startswith("step 2 (verb2) failed")
    assert "not reverted: [0, 1]" in end.reason


def test_zombie_task_is_stopped_once_and_fails_the_chain() -> None:
    run = Run()
    run.start()
    run.step_succeeds(0)
    run.fired(1)
    assert run.send(ZombieTask("t1", run.at())) == [StopTask("t1")]
    assert run.send(ZombieTask("t1", run.at())) == []
    assert run.send(Cancel("operator asked", run.at())) == []  # already stopping
    run.ended("t1", ok=False, code=ABORTED, msg="aborted")
    run.hook("end_with_failure")
    end = _ended(run.revert_succeeds(0))
    assert end.reason is not None and "zombie" in end.reason and "t1" in end.reason


def test_zombie_report_for_a_task_not_running_is_ignored() -> None:
    run = Run()
    run.start()
    state = run.state
    assert run.send(ZombieTask("t0", run.at())) == []  # not fired yet
    assert run.send(ZombieTask("other", run.at())) == []
    assert run.state is state


# --------------------------------------------------------------------------------------------
# Duplicates and stale events


def test_duplicate_task_ended_is_only_acknowledged_again() -> None:
    run = Run()
    run.start()
    run.fired(0)
    run.ended("t0")

    def duplicates_are_only_acknowledged() -> None:
        state = run.state
        assert run.ended("t0") == [AckTask("t0")]
        assert run.ended("t0", ok=False, code=100) == [AckTask("t0")]
        assert run.state is state

    duplicates_are_only_acknowledged()  # while the end_step hook is pending
    run.hook("end_step", 0)
    duplicates_are_only_acknowledged()  # once the next step is fired


def test_duplicate_task_fired_changes_nothing() -> None:
    run = Run()
    run.start()
    run.fired(0)
    state = run.state
    assert run.fired(0) == []
    assert run.state is state


def test_stale_task_fired_for_an_unknown_ref_is_discarded() -> None:
    run = Run()
    run.start()
    run.fired(0)
    state = run.state
    assert run.send(TaskFired(("step", 7, 0), "stray", run.at())) == [DiscardTask("stray")]
    assert run.send(TaskFired(("revert", 0, 1), "stray2", run.at())) == [DiscardTask("stray2")]
    # The same step fired twice (a re-fire after a restart): the second task is not ours.
    assert run.send(TaskFired(("step", 0, 0), "t0-bis", run.at())) == [DiscardTask("t0-bis")]
    assert run.state is state


def test_stale_events_for_unknown_tasks_change_nothing() -> None:
    run = Run()
    run.start()
    run.fired(0)
    state = run.state
    for event in (
        TaskEnded("stray", True, 0, "", run.at()),
        TaskLost("stray", run.at()),
        ZombieTask("stray", run.at()),
        FireRefused(("step", 3, 0), 100, "no", run.at()),
        FireRefused(("step", 0, 0), 100, "already fired", run.at()),
        HookDone("end_step", 0, None, run.at()),
        HookDone("end_with_failure", -1, None, run.at()),
    ):
        assert run.send(event) == [], event
        assert run.state is state


def test_duplicate_report_of_a_revert_is_acknowledged_again() -> None:
    run = Run()
    run.start()
    run.step_succeeds(0)
    run.step_succeeds(1)
    run.fired(2)
    run.ended("t2", ok=False, code=100, msg="boom")
    run.hook("end_with_failure")
    run.revert_succeeds(1)
    state = run.state
    assert run.ended("r1.1") == [AckTask("r1.1")]
    assert run.state is state


def test_duplicate_report_of_an_earlier_failed_revert_attempt_is_acknowledged_again() -> None:
    """The poller reports a task until it sees the ack; a report crossing the ack is answered."""
    run = Run(_spec(2))
    run.start()
    run.step_succeeds(0)
    run.fired(1)
    run.ended("t1", ok=False, code=100, msg="boom")
    run.hook("end_with_failure")
    run.revert_fired(0, 1)
    assert run.ended("r0.1", ok=False, code=352, msg="busy") == [
        AckTask("r0.1"),
        _fire_revert(0, 2),
    ]
    assert run.ended("r0.1", ok=False, code=352, msg="busy") == [AckTask("r0.1")]


# --------------------------------------------------------------------------------------------
# After the end: tasks still in flight when the hard deadline ended the chain


def _ended_at_the_hard_deadline_with_step_1(fired: bool) -> Run:
    run = Run()
    run.start()
    run.step_succeeds(0)
    if fired:
        run.fired(1)
    run.send(Tick(DEADLINE))
    effects = run.send(Tick(DEADLINE + TASK_TIMEOUT))
    assert _ended(effects).outcome == ENDED_WITH_FAILURE
    return run


@pytest.mark.parametrize("ok", [False, True])
def test_report_of_a_task_discarded_at_the_hard_deadline_does_not_reopen_the_chain(
    ok: bool,
) -> None:
    run = _ended_at_the_hard_deadline_with_step_1(fired=True)
    ended = run.state
    effects = run.ended("t1", ok=ok, code=0 if ok else ABORTED, msg="")
    assert all(isinstance(e, AckTask) for e in effects), effects
    assert run.state.phase == "ended"
    assert run.state.outcome == ended.outcome and run.state.reason == ended.reason


def test_loss_or_zombie_of_a_task_discarded_at_the_hard_deadline_changes_nothing() -> None:
    run = _ended_at_the_hard_deadline_with_step_1(fired=True)
    ended = run.state
    assert run.send(ZombieTask("t1", run.at())) == []
    assert run.send(TaskLost("t1", run.at())) == []
    assert run.state.phase == "ended" and run.state.reason == ended.reason


def test_task_fired_after_the_chain_ended_is_discarded() -> None:
    run = _ended_at_the_hard_deadline_with_step_1(fired=False)
    ended = run.state
    assert run.fired(1) == [DiscardTask("t1")]
    assert run.state == ended


def test_refusal_after_the_chain_ended_changes_nothing() -> None:
    run = _ended_at_the_hard_deadline_with_step_1(fired=False)
    ended = run.state
    assert run.send(FireRefused(("step", 1, 0), 100, "late", run.at())) == []
    assert run.state == ended


def test_revert_ending_after_the_hard_deadline_does_not_end_the_chain_again() -> None:
    run = Run(_spec(2))
    run.start()
    run.step_succeeds(0)
    run.fired(1)
    run.ended("t1", ok=False, code=100, msg="boom")
    run.hook("end_with_failure")
    run.revert_fired(0)
    effects = run.send(Tick(DEADLINE + TASK_TIMEOUT))
    assert effects[:-1] == [DiscardTask("r0.1")]
    _ended(effects)
    ended = run.state
    after = run.ended("r0.1")
    assert not any(isinstance(e, ChainEnded | FireTask | RunHook) for e in after), after
    assert run.state.phase == "ended" and run.state.reason == ended.reason


# --------------------------------------------------------------------------------------------
# Commands that decide the next step


@register_command("test_chain.copies")
class CopiesCommand(Command):
    """Create an image, then one copy per ``params['copies']``, each naming the task before it.

    ``params['raise_at']`` makes next_step raise when that many steps succeeded;
    ``params['bad_at']`` makes it return an invalid step there.
    """

    def next_step(self, results: Sequence[StepResult]) -> StepSpec | None:
        n = len(results)
        if n == self.params.get("raise_at"):
            raise RuntimeError(f"cannot plan step {n}")
        if n == self.params.get("bad_at"):
            return StepSpec(verb="")
        if n == 0:
            return StepSpec("createImage", {"img": "a"}, revert_verb="deleteImage")
        if n > int(self.params["copies"]):
            return None
        return StepSpec("copyImage", {"after": results[-1].task_id, "n": n}, "deleteImage")


def _command_run(**params: Any) -> Run:
    spec = ChainSpec(
        pool="pool-1", command_type="copies", params=params, command="test_chain.copies"
    )
    return Run(spec)


def test_command_decides_each_step_from_the_results_so_far() -> None:
    run = _command_run(copies=2)
    assert run.start() == [FireTask(("step", 0, 0), "createImage", {"img": "a"}, (), ())]
    assert run.step_succeeds(0) == [
        FireTask(("step", 1, 0), "copyImage", {"after": "t0", "n": 1}, (), ())
    ]
    assert run.step_succeeds(1) == [
        FireTask(("step", 2, 0), "copyImage", {"after": "t1", "n": 2}, (), ())
    ]
    assert run.step_succeeds(2) == [RunHook("end_successfully", -1)]
    assert run.hook("end_successfully") == [ChainEnded(ENDED_SUCCESSFULLY, None)]


def test_next_step_raising_fails_the_chain_with_the_error_in_the_reason() -> None:
    run = _command_run(copies=3, raise_at=1)
    run.start()
    assert run.step_succeeds(0) == [RunHook("end_with_failure", -1)]
    assert run.hook("end_with_failure") == [
        FireTask(("revert", 0, 1), "deleteImage", {"img": "a"}, (), ())
    ]
    end = _ended(run.revert_succeeds(0))
    assert end.reason is not None
    assert "next_step raised RuntimeError" in end.reason and "cannot plan step 1" in end.reason


def test_next_step_raising_before_the_first_step_fails_the_chain() -> None:
    run = _command_run(copies=1, raise_at=0)
    assert run.start() == [RunHook("end_with_failure", -1)]
    end = _ended(run.hook("end_with_failure"))
    assert end.reason is not None and "cannot plan step 0" in end.reason


def test_next_step_returning_an_invalid_step_fails_the_chain_naming_the_field() -> None:
    run = _command_run(copies=3, bad_at=1)
    run.start()
    assert run.step_succeeds(0) == [RunHook("end_with_failure", -1)]
    assert run.state.reason is not None and "step 1.verb" in run.state.reason


def test_end_step_hook_error_fails_the_chain() -> None:
    run = Run()
    run.start()
    run.fired(0)
    run.ended("t0")
    assert run.hook("end_step", 0, error="RuntimeError: boom") == [RunHook("end_with_failure", -1)]
    assert run.hook("end_with_failure") == [_fire_revert(0)]
    end = _ended(run.revert_succeeds(0))
    assert end.reason is not None and "end_step" in end.reason and "boom" in end.reason
    assert len(run.state.steps) == 1


def test_end_successfully_hook_error_fails_the_chain() -> None:
    run = Run(_spec(1))
    run.start()
    run.step_succeeds(0)
    assert run.hook("end_successfully", error="RuntimeError: boom") == [
        RunHook("end_with_failure", -1)
    ]
    assert run.hook("end_with_failure") == [_fire_revert(0)]
    end = _ended(run.revert_succeeds(0))
    assert end.reason is not None and "end_successfully" in end.reason


# --------------------------------------------------------------------------------------------
# Snapshots and resuming


def _scenario_runs() -> list[Run]:
    """Runs that between them go through every phase and every kind of record."""
    happy = Run()
    happy.start()
    for i in range(3):
        happy.step_succeeds(i)
    happy.hook("end_successfully")

    failing = Run()
    failing.start()
    failing.step_succeeds(0)
    failing.step_succeeds(1)
    failing.fired(2)
    failing.ended("t2", ok=False, code=100, msg="boom")
    failing.hook("end_with_failure", error="ValueError: x")
    failing.revert_fired(1)
    failing.ended("r1.1", ok=False, code=352, msg="busy")
    failing.revert_succeeds(1, 2)
    failing.send(TaskLost("r0.1", failing.at()))

    cancelled = Run(_command_run(copies=2).state.spec)
    cancelled.start()
    cancelled.step_succeeds(0)
    cancelled.send(Cancel("operator asked", cancelled.at()))
    cancelled.fired(1)
    cancelled.send(Tick(DEADLINE + TASK_TIMEOUT))
    return [happy, failing, cancelled]


def test_states_round_trip_through_a_snapshot_at_every_point_of_a_run() -> None:
    for run in _scenario_runs():
        assert len(run.states) > 5
        for state in run.states:
            again = _snapshot(state)
            assert again == state
            assert again.to_dict() == state.to_dict()
            assert resume_effects(again) == resume_effects(state)


def test_a_rebuilt_state_goes_on_exactly_like_the_original() -> None:
    run = Run()
    run.start()
    run.step_succeeds(0)
    run.fired(1)
    rebuilt = _snapshot(run.state)
    event = TaskEnded("t1", False, 100, "boom", run.at())
    assert transition(rebuilt, event, run.command) == transition(run.state, event, run.command)


def test_original_state_is_never_modified_by_transition() -> None:
    # Run.send checks this for every event; this test names it and replays every scenario.
    for run in _scenario_runs():
        for state in run.states:
            recorded = state.to_dict()
            for event in (
                Tick(DEADLINE + TASK_TIMEOUT),
                Cancel("x", 1.0),
                TaskEnded("t0", True, 0, "", 1.0),
                TaskEnded("t1", False, 1, "", 1.0),
                HookDone("end_with_failure", -1, None, 1.0),
            ):
                transition(state, event, run.command)
                assert state.to_dict() == recorded


def _phase_runs() -> dict[str, tuple[ChainState, list[Effect]]]:
    out: dict[str, tuple[ChainState, list[Effect]]] = {}
    run = Run()
    out["new"] = (run.state, [])
    run.start()
    out["step 0 submitting"] = (run.state, [_fire(0)])
    run.fired(0)
    out["step 0 running"] = (run.state, [])
    run.ended("t0")
    out["end_step hook pending"] = (run.state, [RunHook("end_step", 0)])
    run.hook("end_step", 0)
    out["step 1 submitting"] = (run.state, [_fire(1)])
    run.fired(1)
    run.ended("t1", ok=False, code=100, msg="boom")
    out["failing"] = (run.state, [RunHook("end_with_failure", -1)])
    run.hook("end_with_failure")
    out["revert submitting"] = (run.state, [_fire_revert(0)])
    run.revert_fired(0)
    out["revert running"] = (run.state, [])
    stuck, _ = transition(run.state, ZombieTask("r0.1", run.at()), run.command)
    out["revert running past the timeout, stop decided"] = (stuck, [StopTask("r0.1")])
    run.ended("r0.1", ok=False, code=352, msg="busy")
    out["revert attempt 2 submitting"] = (run.state, [_fire_revert(0, 2)])
    end = _ended(run.revert_succeeds(0, 2))
    out["ended with failure"] = (run.state, [end])

    ok = Run(_spec(1))
    ok.start()
    ok.step_succeeds(0)
    out["end_successfully hook pending"] = (ok.state, [RunHook("end_successfully", -1)])
    ok.hook("end_successfully")
    out["ended successfully"] = (ok.state, [ChainEnded(ENDED_SUCCESSFULLY, None)])

    cancelled = Run()
    cancelled.start()
    cancelled.fired(0)
    cancelled.send(Cancel("operator asked", cancelled.at()))
    out["step 0 running, stop decided"] = (cancelled.state, [StopTask("t0")])
    return out


@pytest.mark.parametrize("phase", list(_phase_runs()))
def test_resume_effects_redo_what_may_not_have_been_done_in_each_phase(phase: str) -> None:
    state, expected = _phase_runs()[phase]
    assert resume_effects(state) == expected
    assert resume_effects(_snapshot(state)) == expected


def test_in_flight_lists_the_tasks_a_rebuilt_chain_must_re_adopt() -> None:
    run = Run()
    run.start()
    assert [(ref, tid) for ref, tid, _ in run.state.in_flight()] == [(("step", 0, 0), None)]
    run.fired(0)
    assert [(ref, tid) for ref, tid, _ in run.state.in_flight()] == [(("step", 0, 0), "t0")]
    run.ended("t0", ok=False, code=100)
    run.hook("end_with_failure")
    assert run.state.in_flight() == []


def test_transition_refuses_what_is_not_an_event() -> None:
    run = Run()
    with pytest.raises(TypeError):
        transition(run.state, "Start", run.command)  # type: ignore[arg-type]
