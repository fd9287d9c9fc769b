"""Properties of the chain state machine under any interleaving of what an SPM and a shell can do.

A :class:`Driver` plays one chain against a model SPM. Hypothesis chooses, for every task the
chain fires, whether the SPM refuses it and how it ends (success, failure, lost — a task stopped
by the chain ends aborted or, having finished first, succeeded), and interleaves duplicate
reports, stale events, cancels, zombie reports and clock ticks at arbitrary points. Every
transition is checked as it happens; the end of the run checks what the whole run must show.

On failure hypothesis prints the falsifying draws and a ``@reproduce_failure`` blob; rerun with
``--hypothesis-seed=<seed>`` to replay a seed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
HARD_DEADLINE = DEADLINE + TASK_TIMEOUT
ABORTED = 411
Ref = tuple[str, int, int]

SETTINGS = settings(
    deadline=None,
    max_examples=300,
    # Fresh examples on every developer run (to keep finding new interleavings); in CI a fixed
    # sequence, so that a submission lands or not on its own merits. A failure prints the
    # example and a @reproduce_failure blob either way.
    derandomize=os.environ.get("CI") == "true",
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@register_command("test_chain_properties.plan")
class PlanCommand(Command):
    """``params['n']`` steps; each names the task of the step before it, so it needs results."""

    def next_step(self, results: Sequence[StepResult]) -> StepSpec | None:
        k = len(results)
        if k >= int(self.params["n"]):
            return None
        after = results[-1].task_id if results else None
        revert = None if k in self.params["no_revert"] else f"undo{k}"
        return StepSpec(f"verb{k}", {"k": k, "after": after}, revert, exclusive=(f"img-{k}",))


@dataclass
class SpmTask:
    """A task the model SPM accepted."""

    task_id: str
    ref: Ref
    stop_requested: bool = False
    outcome: str | None = None  # success / failure / lost, decided when it first reports
    code: int = 0
    reports: int = 0  # reports delivered to the chain
    reported_before_end: bool = False
    discarded: bool = False


class Driver:
    """One chain, the model SPM around it, and the bookkeeping the properties need."""

    def __init__(self, data: Any, late_in_flight_events: bool) -> None:
        self.data = data
        self.late = late_in_flight_events
        self.n = data.draw(st.integers(1, 4), label="steps")
        self.no_revert: list[int] = data.draw(
            st.lists(st.integers(0, self.n - 1), unique=True, max_size=self.n), label="no_revert"
        )
        if data.draw(st.booleans(), label="declared steps (else a Command)"):
            spec = ChainSpec(
                pool="pool-1",
                command_type="prop",
                steps=[
                    StepSpec(
                        f"verb{k}",
                        {"k": k},
                        None if k in self.no_revert else f"undo{k}",
                        exclusive=(f"img-{k}",),
                    )
                    for k in range(self.n)
                ],
            )
        else:
            spec = ChainSpec(
                pool="pool-1",
                command_type="prop",
                params={"n": self.n, "no_revert": sorted(self.no_revert)},
                command="test_chain_properties.plan",
            )
        self.command = spec.make_command()
        self.state = new_chain(spec, "chain-p", 0.0, DEADLINE, TASK_TIMEOUT)
        self.now = 0.0
        self.ids = 0

        # The model SPM and shell.
        self.pending_fires: list[FireTask] = []
        self.tasks: dict[str, SpmTask] = {}
        self.hook: RunHook | None = None

        # What the run showed, for the properties.
        self.chain_ended: list[tuple[int, ChainEnded]] = []
        self.events = 0
        self.ended_by_hard_deadline = False
        self.fired_steps: list[int] = []
        self.learnt: dict[int, str] = {}  # step index -> success/failure/lost/refused
        self.end_step_done: set[int] = set()
        self.end_with_failure_done = False
        self.revert_in_flight: Ref | None = None
        self.revert_results: dict[Ref, str] = {}
        self.revert_first: list[int] = []  # step indices, in the order their reverts began
        self.disturbed = False  # a cancel, a deadline tick or a zombie reached the chain
        self.failure_injected = False  # a step failed/lost/refused or a hook raised
        self.stops: list[str] = []

    # -- helpers ----------------------------------------------------------------------------

    def has_revert(self, k: int) -> bool:
        return k not in self.no_revert

    def draw(self, strategy: Any, label: str) -> Any:
        return self.data.draw(strategy, label=label)

    def tick_clock(self) -> float:
        self.now += 0.01
        return self.now

    def new_id(self) -> str:
        self.ids += 1
        return f"T{self.ids}"

    @property
    def ended(self) -> bool:
        return bool(self.chain_ended)

    def in_flight_tasks(self) -> list[SpmTask]:
        # Tasks discarded when the chain ended still report to it if their reports were
        # already on the way; the driver models that only where late events are wanted.
        return [t for t in self.tasks.values() if t.reports == 0]

    def reported_tasks(self) -> list[SpmTask]:
        return [t for t in self.tasks.values() if t.reports > 0 and t.reports < 4]

    # -- delivering an event and checking what it led to ---------------------------------

    def deliver(self, event: Event) -> list[Effect]:
        before = self.state
        recorded = before.to_dict()
        was_ended = before.phase == "ended"
        self._before(before, event, was_ended)
        new, effects = transition(before, event, self.command)
        effects = list(effects)
        self.events += 1
        # (g) the given state is left as it was; the new one survives a snapshot.
        assert before.to_dict() == recorded, "transition modified the state it was given"
        again = ChainState.from_dict(new.to_dict())
        assert again == new, "state does not round-trip through to_dict/from_dict"
        assert resume_effects(again) == resume_effects(new)
        self._check(before, new, event, effects, was_ended)
        self.state = new
        self._perform(effects)
        return effects

    def _before(self, before: ChainState, event: Event, was_ended: bool) -> None:
        """Bookkeeping of what the chain learns from ``event`` (only while it has not ended)."""
        if was_ended:
            return
        if isinstance(event, Cancel) or (isinstance(event, Tick) and event.now >= DEADLINE):
            self.disturbed = True
        elif isinstance(event, ZombieTask):
            task = self.tasks.get(event.task_id)
            if task is not None and task.ref[0] == "step" and task.reports == 0:
                self.disturbed = True
        elif isinstance(event, TaskEnded | TaskLost):
            task = self.tasks.get(event.task_id)
            if task is None or task.reports > 0:
                return
            kind, k, _ = task.ref
            result = (
                "lost"
                if isinstance(event, TaskLost)
                else ("success" if event.succeeded else "failure")
            )
            if kind == "step":
                self.learnt[k] = result
                if result != "success":
                    self.failure_injected = True
            else:
                assert self.revert_in_flight == task.ref, "a revert ended that was not in flight"
                self.revert_in_flight = None
                self.revert_results[task.ref] = result
        elif isinstance(event, FireRefused):
            if not any(f.ref == event.ref for f in self.pending_fires):
                return
            kind, k, _ = event.ref
            if kind == "step":
                self.learnt[k] = "refused"
                self.failure_injected = True
            else:
                assert self.revert_in_flight == event.ref
                self.revert_in_flight = None
                self.revert_results[event.ref] = "refused"
        elif isinstance(event, HookDone):
            if (before.hook, before.hook_index) != (event.hook, event.index):
                return
            if event.hook == "end_step" and event.error is None:
                self.end_step_done.add(event.index)
            if event.hook in ("end_step", "end_successfully") and event.error is not None:
                self.failure_injected = True
            if event.hook == "end_with_failure":
                self.end_with_failure_done = True

    def _check(
        self,
        before: ChainState,
        new: ChainState,
        event: Event,
        effects: list[Effect],
        was_ended: bool,
    ) -> None:
        where = f"event {self.events}: {event!r} -> {effects!r}"
        ends = [e for e in effects if isinstance(e, ChainEnded)]
        # (a) the chain ends exactly once, ChainEnded is the last effect of its transition, and
        # after it the chain only acknowledges reports and discards tasks fired too late.
        if ends:
            assert len(ends) == 1 and effects[-1] == ends[0], where
            assert not self.chain_ended, f"the chain ended a second time: {where}"
            self.chain_ended.append((self.events, ends[0]))
            assert new.phase == "ended" and new.outcome == ends[0].outcome, where
            if isinstance(event, Tick) and event.now >= HARD_DEADLINE:
                self.ended_by_hard_deadline = True
        if was_ended:
            allowed: tuple[type, ...] = (
                (AckTask, DiscardTask) if isinstance(event, TaskFired) else (AckTask,)
            )
            assert all(isinstance(e, allowed) for e in effects), f"effect after the end: {where}"
            assert new.phase == "ended", where
            assert (new.outcome, new.reason) == (before.outcome, before.reason), where
        # Stale and duplicate events.
        if isinstance(event, TaskFired):
            # A task fired for a ref the chain no longer waits for (stale, or the chain has
            # ended) is not the chain's: it is discarded and the state does not change.
            awaited = not was_ended and any(f.ref == event.ref for f in self.pending_fires)
            if not awaited:
                assert effects == [DiscardTask(event.task_id)], f"stale fire kept: {where}"
                assert new == before, f"stale fire changed the state: {where}"
        if isinstance(event, TaskEnded):
            task = self.tasks.get(event.task_id)
            if task is None:
                assert effects == [] and new == before, f"report of a stranger: {where}"
            elif task.reports > 0:
                # A duplicate: answered with another AckTask at most, nothing else changes.
                assert effects in ([], [AckTask(event.task_id)]), f"duplicate: {where}"
                assert new == before, f"duplicate report changed the state: {where}"
            elif not was_ended:
                # (f) the first report of a task of this chain is acknowledged at once.
                assert effects[:1] == [AckTask(event.task_id)], f"report not acked: {where}"
        if isinstance(event, TaskLost):
            task = self.tasks.get(event.task_id)
            if task is None or task.reports > 0:
                assert effects == [] and new == before, f"stale loss: {where}"
        stops = [e.task_id for e in effects if isinstance(e, StopTask)]
        for task_id in stops:
            assert task_id not in self.stops, f"StopTask sent twice for {task_id}: {where}"
            # A step is stopped on cancel, deadline or zombie; a revert only as a zombie.
            assert task_id in self.tasks, where
            if self.tasks[task_id].ref[0] == "revert":
                assert isinstance(event, ZombieTask), f"revert stopped without a zombie: {where}"
            self.stops.append(task_id)
        for eff in effects:
            if isinstance(eff, FireTask):
                self._check_fire(eff, where)

    def _check_fire(self, eff: FireTask, where: str) -> None:
        kind, k, attempt = eff.ref
        if kind == "step":
            # (b) fired at most once; (d) only after step k-1 succeeded and its end_step ran.
            assert k not in self.fired_steps, f"step {k} fired twice: {where}"
            assert k == len(self.fired_steps), f"step {k} fired out of order: {where}"
            if k > 0:
                assert self.learnt.get(k - 1) == "success", f"step {k} before {k - 1}: {where}"
                assert k - 1 in self.end_step_done, f"step {k} before end_step {k - 1}: {where}"
            assert not self.end_with_failure_done and self.revert_in_flight is None, where
            self.fired_steps.append(k)
            return
        # (c) reverts: for steps that succeeded or whose outcome is unknown, with a revert_verb,
        # after end_with_failure, newest step first, one attempt at a time.
        assert self.learnt.get(k) in ("success", "lost"), f"revert of step {k}: {where}"
        assert self.has_revert(k), f"revert of step {k} without revert_verb: {where}"
        assert self.end_with_failure_done, f"revert before end_with_failure: {where}"
        assert self.revert_in_flight is None, f"revert while another is in flight: {where}"
        assert 1 <= attempt <= REVERT_ATTEMPTS, where
        if attempt == 1:
            assert k not in self.revert_first, f"revert of step {k} began twice: {where}"
            assert all(k < j for j in self.revert_first), f"reverts out of order: {where}"
            self.revert_first.append(k)
        else:
            assert self.revert_first[-1] == k, where
            previous = self.revert_results.get(("revert", k, attempt - 1))
            assert previous in ("failure", "lost", "refused"), f"re-fired revert: {where}"
        assert eff.verb == f"undo{k}", where
        self.revert_in_flight = eff.ref

    def _perform(self, effects: list[Effect]) -> None:
        for eff in effects:
            if isinstance(eff, FireTask):
                self.pending_fires.append(eff)
            elif isinstance(eff, RunHook):
                assert self.hook is None or self.ended, "a second hook while one is pending"
                self.hook = eff
            elif isinstance(eff, StopTask):
                self.tasks[eff.task_id].stop_requested = True
            elif isinstance(eff, DiscardTask) and eff.task_id in self.tasks:
                self.tasks[eff.task_id].discarded = True

    # -- what the model SPM, the poller and the shell do ------------------------------------

    def answer_fire(self, fire: FireTask, accept: bool | None = None) -> None:
        if accept is None:
            accept = self.draw(st.sampled_from([True, True, True, True, False]), "accept fire")
        if not accept:
            self.deliver(FireRefused(fire.ref, 100, "refused", self.tick_clock()))
        else:
            task = SpmTask(self.new_id(), fire.ref)
            self.tasks[task.task_id] = task
            self.deliver(TaskFired(fire.ref, task.task_id, self.tick_clock()))
        self.pending_fires.remove(fire)

    def report(self, task: SpmTask, outcome: str | None = None) -> None:
        if task.outcome is None:
            if outcome is None:
                if task.stop_requested:
                    choices = ["failure", "success"]
                else:
                    choices = ["success", "success", "success", "failure", "lost"]
                outcome = self.draw(st.sampled_from(choices), f"outcome of {task.ref}")
            task.outcome = outcome
            code = ABORTED if task.stop_requested else 100
            task.code = 0 if outcome == "success" else code
        if task.outcome == "lost":
            event: Event = TaskLost(task.task_id, self.tick_clock())
        else:
            ok = task.outcome == "success"
            msg = "" if ok else f"value=failed abortedcode={task.code}"
            event = TaskEnded(task.task_id, ok, task.code, msg, self.tick_clock())
        self.deliver(event)
        task.reports += 1

    def finish_hook(self, error: str | None = None, draw: bool = True) -> None:
        hook = self.hook
        assert hook is not None
        if draw:
            error = self.draw(st.sampled_from([None, None, None, None, "RuntimeError: x"]), "hook")
        self.hook = None
        self.deliver(HookDone(hook.hook, hook.index, error, self.tick_clock()))

    def stale(self) -> None:
        kind = self.draw(
            st.sampled_from(["fired", "ended", "hook", "refused", "start", "lost", "zombie"]),
            "stale event",
        )
        pending = {f.ref for f in self.pending_fires}
        now = self.tick_clock()
        if kind == "fired":
            refs: list[Ref] = [
                ("step", 9, 0),
                ("revert", 0, 9),
                *(t.ref for t in self.tasks.values()),
            ]
            ref = self.draw(st.sampled_from(refs), "stale ref")
            if ref not in pending:
                self.deliver(TaskFired(ref, f"stray{self.new_id()}", now))
        elif kind == "ended":
            self.deliver(TaskEnded("stranger", self.draw(st.booleans(), "ok"), 0, "", now))
        elif kind == "lost":
            self.deliver(TaskLost("stranger", now))
        elif kind == "zombie":
            self.deliver(ZombieTask("stranger", now))
        elif kind == "hook":
            hooks = [("end_step", 7), ("end_step", 0), ("end_successfully", -1)]
            hooks.append(("end_with_failure", -1))
            hook, index = self.draw(st.sampled_from(hooks), "stale hook")
            if self.hook is None or (self.hook.hook, self.hook.index) != (hook, index):
                before = self.state
                assert self.deliver(HookDone(hook, index, None, now)) == []
                assert self.state == before
        elif kind == "refused":
            stale_refs: list[Ref] = [("step", 9, 0), ("revert", 0, 9), ("step", 0, 0)]
            ref = self.draw(st.sampled_from(stale_refs), "stale ref")
            if ref not in pending:
                before = self.state
                assert self.deliver(FireRefused(ref, 100, "stale", now)) == []
                assert self.state == before
        else:
            before = self.state
            assert self.deliver(Start(now)) == []
            assert self.state == before

    # -- one run ---------------------------------------------------------------------------

    def actions(self) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]]]:
        progress: list[tuple[str, Any]] = []
        late_ok = self.late or not self.ended
        if late_ok:
            progress += [("answer", f) for f in self.pending_fires]
            progress += [("report", t) for t in self.in_flight_tasks()]
        if self.hook is not None:
            progress.append(("hook", None))
        disturb: list[tuple[str, Any]] = [("cancel", None), ("tick", None), ("stale", None)]
        disturb += [("duplicate", t) for t in self.reported_tasks()]
        if late_ok:
            disturb += [("zombie", t) for t in self.in_flight_tasks()]
        return progress, disturb

    def step(self) -> None:
        progress, disturb = self.actions()
        if progress and self.draw(st.sampled_from([True, True, True, False]), "progress"):
            name, arg = self.draw(st.sampled_from(progress), "action")
        else:
            name, arg = self.draw(st.sampled_from(disturb), "action")
        if name == "answer":
            self.answer_fire(arg)
        elif name == "report" or name == "duplicate":
            self.report(arg)
        elif name == "hook":
            self.finish_hook()
        elif name == "zombie":
            self.deliver(ZombieTask(arg.task_id, self.tick_clock()))
        elif name == "cancel":
            self.deliver(Cancel("operator asked", self.tick_clock()))
        elif name == "tick":
            self.now += self.draw(st.sampled_from([1.0, 20.0, 60.0, 105.0]), "time passes")
            self.deliver(Tick(self.now))
        else:
            self.stale()

    def drain(self) -> None:
        """Let everything outstanding succeed until the chain ends (the hard deadline at worst)."""
        for _ in range(200):
            if self.ended:
                return
            if self.hook is not None:
                self.finish_hook(None, draw=False)
            elif self.pending_fires:
                self.answer_fire(self.pending_fires[0], accept=True)
            elif self.in_flight_tasks():
                self.report(self.in_flight_tasks()[0], "success")
            else:
                self.now = max(self.now, HARD_DEADLINE) + 1.0
                self.deliver(Tick(self.now))
        raise AssertionError("the chain did not end")

    def after_the_end(self) -> None:
        """Everything still outstanding reaches the ended chain, in an order hypothesis picks."""
        for _ in range(50):
            progress, _ = self.actions()
            if not progress:
                return
            name, arg = self.draw(st.sampled_from(progress), "late action")
            if name == "answer":
                self.answer_fire(arg)
            elif name == "report":
                self.report(arg)
            else:
                self.finish_hook()

    def run(self) -> None:
        self.deliver(Start(self.tick_clock()))
        for _ in range(self.draw(st.integers(0, 60), "actions")):
            self.step()
        self.drain()
        if self.late:
            self.after_the_end()
        for task in self.reported_tasks():  # one more duplicate of each report
            self.report(task)
        self.check_run()

    # -- what the whole run must show -------------------------------------------------------

    def check_run(self) -> None:
        # (a) exactly one ChainEnded.
        assert len(self.chain_ended) == 1, self.chain_ended
        _, end = self.chain_ended[0]
        state = self.state
        assert state.phase == "ended" and state.outcome == end.outcome
        # (e) ended_successfully iff every step succeeded and nothing cancelled the chain.
        all_succeeded = self.learnt == {k: "success" for k in range(self.n)}
        expect_success = not self.disturbed and not self.failure_injected
        if end.outcome == ENDED_SUCCESSFULLY:
            assert expect_success and all_succeeded, (self.learnt, self.disturbed)
            assert end.reason is None and not self.revert_first
        else:
            assert end.outcome == ENDED_WITH_FAILURE
            assert not expect_success, (
                f"failed without cause: learnt={self.learnt} reason={end.reason!r}"
            )
            assert end.reason
        # (c) every step that succeeded (or was lost) and can be reverted was reverted,
        # unless the hard deadline ended the chain first.
        expected = sorted(
            (k for k, r in self.learnt.items() if r in ("success", "lost") and self.has_revert(k)),
            reverse=True,
        )
        if end.outcome == ENDED_WITH_FAILURE and not self.ended_by_hard_deadline:
            assert self.revert_first == expected, (self.revert_first, expected)
        else:
            assert set(self.revert_first) <= set(expected)
        # (f) every task whose outcome the chain learnt before its end was acknowledged.
        # (Checked per event in _check: the first report of a task gets AckTask at once.)


@SETTINGS
@given(st.data())
def test_chain_invariants_hold_under_any_interleaving(data: Any) -> None:
    Driver(data, late_in_flight_events=False).run()


@SETTINGS
@given(st.data())
def test_chain_invariants_hold_when_tasks_in_flight_report_after_the_chain_ended(
    data: Any,
) -> None:
    """A chain ended at its hard deadline with tasks in flight: their late fires and reports
    reach it and must neither reopen nor re-end it."""
    Driver(data, late_in_flight_events=True).run()
