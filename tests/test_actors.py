"""The actors' jobs, seen from the SPM: slots, FIFO, resource locks, clearing, polling,
supervision, zombies and orphans."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from _fake_spm import FakeTask
from conftest import FAST, WAIT, EndLog, ScriptedSpm, chain, step

from actors._chain import ENDED_SUCCESSFULLY, ENDED_WITH_FAILURE, TaskFired
from actors._command import CommandActor
from actors._faults import FaultInjector, InjectedFault
from actors._messages import Rewatch, Watch
from actors._runtime import ChainHandle, Runtime, RuntimeOptions, RuntimeStoppedError, _Core
from actors._spm_task import SpmTaskActor
from actors._supervisor import DEFAULT_SUPERVISION, ChildSpec
from spm._errors import NotSpmError, SpmConnectionError, SpmError, SpmTimeoutError
from spm._stomp_client import NotConnectedError

pytestmark = pytest.mark.timeout(30)

MakeRuntime = Callable[..., Runtime]


def sample(rt: Runtime, name: str, **labels: str) -> float:
    value = rt.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def finish_one_at_a_time(
    spm: ScriptedSpm, handles: list[ChainHandle], limit: int, timeout: float = 20.0
) -> None:
    """Drive the SPM: let the runtime poll twice (time enough to fire anything it would), check
    that no more than ``limit`` tasks are unfinished, finish the oldest; until all chains end."""
    deadline = time.monotonic() + timeout
    while not all(h.done() for h in handles):
        assert time.monotonic() < deadline, "chains did not end"
        spm.wait_polls(2)
        running = spm.unfinished()
        assert len(running) <= limit, f"{len(running)} tasks unfinished at the SPM"
        if running:
            spm.finish(running[0].task_id)


# -- the per-pool slot limit, FIFO, resources ---------------------------------------------


def test_at_most_max_outstanding_tasks_are_unfinished_at_the_spm(
    make_runtime: MakeRuntime,
) -> None:
    spm = ScriptedSpm(pool="A")
    rt = make_runtime(spm, max_outstanding=3)
    handles = [
        rt.submit(chain("A", step("create", params={"c": i}), step("copy", params={"c": i})))
        for i in range(20)
    ]
    spm.wait_fired(3)
    finish_one_at_a_time(spm, handles, limit=3)
    assert all(h.result(WAIT).succeeded for h in handles)
    assert spm.max_running == 3  # the limit was reached, and never passed
    assert len(spm.fired) == 40


def test_first_steps_fire_in_submit_order_when_all_wait_for_a_slot(
    make_runtime: MakeRuntime,
) -> None:
    spm = ScriptedSpm(pool="A")
    # One command worker: chains start, and ask for their first step, in submit order. All of
    # them at once (no admission limit): the SpmTaskActor's own queue is what is tested.
    rt = make_runtime(spm, max_outstanding=1, command_workers=1, admission_target_s=None)
    n = 8
    handles = [
        rt.submit(chain("A", step("first", params={"c": i}), step("second", params={"c": i})))
        for i in range(n)
    ]
    finish_one_at_a_time(spm, handles, limit=1)
    order = [(t.verb, t.params["c"]) for t in spm.fired]
    # Chain 0's second step asks for a slot after every first step did: it queues behind them.
    assert order == [("first", i) for i in range(n)] + [("second", i) for i in range(n)]


class ResourceSpm(ScriptedSpm):
    """Records, at each fire, the unfinished tasks whose declared resources conflict with the
    new one's (each task's params carry its step's ``exclusive`` and ``shared`` lists)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.conflicts: list[tuple[str, str]] = []
        self.overlaps: list[tuple[str, str]] = []

    def fire(self, verb: str, params: Mapping[str, Any]) -> str:
        with self.lock:
            excl, shared = set(params.get("x", ())), set(params.get("s", ()))
            for t in self.tasks.values():
                if t.state == "finished":
                    continue
                t_excl, t_shared = set(t.params.get("x", ())), set(t.params.get("s", ()))
                if excl & (t_excl | t_shared) or shared & t_excl:
                    self.conflicts.append((t.verb, verb))
                elif shared & t_shared:
                    self.overlaps.append((t.verb, verb))
        return super().fire(verb, params)


def res_step(verb: str, exclusive: tuple[str, ...] = (), shared: tuple[str, ...] = ()) -> Any:
    return step(verb, params={"x": list(exclusive), "s": list(shared)},
                exclusive=exclusive, shared=shared)


def test_steps_declaring_the_same_exclusive_resource_never_overlap(
    make_runtime: MakeRuntime,
) -> None:
    spm = ResourceSpm(pool="A")
    rt = make_runtime(spm)
    handles = [
        rt.submit(chain("A", *[res_step(f"write-{c}-{k}", exclusive=("img-1",))
                               for k in range(3)]))
        for c in range(2)
    ]
    finish_one_at_a_time(spm, handles, limit=1)
    assert all(h.result(WAIT).succeeded for h in handles)
    assert spm.conflicts == []
    assert len(spm.fired) == 6


def test_exclusive_and_shared_declarations_of_a_resource_never_overlap(
    make_runtime: MakeRuntime,
) -> None:
    spm = ResourceSpm(pool="A")
    rt = make_runtime(spm)
    writer = rt.submit(chain("A", res_step("write", exclusive=("img-1",))))
    spm.wait_fired(1)
    reader = rt.submit(chain("A", res_step("read", shared=("img-1",))))
    spm.wait_polls(3)
    assert spm.verbs() == ["write"]  # the reader waits for the writer
    finish_one_at_a_time(spm, [writer, reader], limit=1)
    assert spm.verbs() == ["write", "read"]
    assert spm.conflicts == []


def test_steps_sharing_a_resource_may_run_at_once(make_runtime: MakeRuntime) -> None:
    spm = ResourceSpm(pool="A")
    rt = make_runtime(spm)
    handles = [rt.submit(chain("A", res_step(f"read-{i}", shared=("img-1",)))) for i in range(2)]
    spm.expect(lambda: spm.running() == 2, "both readers running at once")
    assert spm.overlaps == [("read-0", "read-1")] or spm.overlaps == [("read-1", "read-0")]
    for t in spm.unfinished():
        spm.finish(t.task_id)
    assert all(h.result(WAIT).succeeded for h in handles)
    assert spm.conflicts == []


def test_a_step_waiting_for_a_resource_does_not_hold_back_others(
    make_runtime: MakeRuntime,
) -> None:
    spm = ResourceSpm(pool="A")
    rt = make_runtime(spm)
    first = rt.submit(chain("A", res_step("hold", exclusive=("img-1",))))
    spm.wait_fired(1)
    blocked = rt.submit(chain("A", res_step("wait", exclusive=("img-1",))))
    free = rt.submit(chain("A", res_step("other", exclusive=("img-2",))))
    spm.expect(lambda: [t.verb for t in spm.fired] == ["hold", "other"], "the free step fired")
    for t in spm.unfinished():
        spm.finish(t.task_id)
    spm.expect(lambda: len(spm.fired) == 3, "the blocked step fired once the resource was free")
    spm.finish(spm.fired[2].task_id)
    assert all(h.result(WAIT).succeeded for h in (first, blocked, free))
    assert spm.conflicts == []


# -- clearing --------------------------------------------------------------------------------


class ClearCheckingSpm(ScriptedSpm):
    """At each clearTask, checks that the owning chain has already recorded the task's end."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.rt: Runtime | None = None
        self.handles: dict[str, ChainHandle] = {}
        self.violations: list[str] = []
        self.checked = 0

    def clearTask(self, task_id: str) -> None:  # noqa: N802
        with self.lock:
            task = self.tasks.get(task_id)
        if task is not None and task.state == "finished":
            self._check(task)
        super().clearTask(task_id)

    def _check(self, task: FakeTask) -> None:
        handle = self.handles[task.params["chain"]]
        try:
            state = handle.state()
        except KeyError:  # ending right now: its result is being published
            state = handle.result(WAIT).state
        for rec in state.steps:
            if rec.task_id == task.task_id:
                recorded = rec.status in ("succeeded", "failed")
                break
            if rec.revert_task_id == task.task_id:
                recorded = rec.revert_status in ("succeeded", "failed")
                break
        else:
            recorded = False
        self.checked += 1
        if not recorded:
            self.violations.append(f"{task.verb} {task.task_id} cleared before it was recorded")


def test_tasks_are_cleared_only_after_their_chain_recorded_the_outcome(
    make_runtime: MakeRuntime,
) -> None:
    spm = ClearCheckingSpm(pool="A", auto="success", fail_verbs={"sync"})
    rt = make_runtime(spm, max_outstanding=4)
    for i in range(12):
        cid = f"c{i}"
        last = "sync" if i % 3 == 0 else "finish"
        spm.handles[cid] = rt.submit(chain(
            "A",
            step("create", "delete", params={"chain": cid}),
            step("copy", "uncopy", params={"chain": cid}),
            step(last, params={"chain": cid}),
            chain_id=cid,
        ))
    results = [h.result(WAIT) for h in spm.handles.values()]
    assert Counter(r.outcome for r in results) == {ENDED_SUCCESSFULLY: 8, ENDED_WITH_FAILURE: 4}
    # Finished tasks do not pile up: every task fired is cleared, once.
    spm.expect(lambda: not spm.tasks, "every task cleared")
    cleared = spm.called("clear")
    assert Counter(cleared) == Counter({t.task_id for t in spm.fired})
    assert spm.violations == []
    assert spm.checked == len(spm.fired)


# -- polling ---------------------------------------------------------------------------------


def test_a_pool_whose_polls_fail_does_not_stop_another_pools_chains(
    make_runtime: MakeRuntime,
) -> None:
    a = ScriptedSpm(pool="A", auto="success")
    b = ScriptedSpm(pool="B", auto="success")
    a.poll_error = SpmConnectionError()
    rt = make_runtime(a, b)
    on_a = [rt.submit(chain("A", step("a1"), step("a2"))) for _ in range(3)]
    on_b = [rt.submit(chain("B", step("b1"), step("b2"), step("b3"))) for _ in range(3)]
    assert all(h.result(WAIT).succeeded for h in on_b)
    a.wait_polls(3)
    assert not any(h.done() for h in on_a)
    assert sample(rt, "spmchain_poll_errors_total", pool="A") > 0
    assert sample(rt, "spmchain_poll_errors_total", pool="B") == 0
    a.poll_error = None
    assert all(h.result(WAIT).succeeded for h in on_a)
    assert a.verbs().count("a2") == 3


def test_a_poller_exception_of_any_kind_is_counted_and_polling_goes_on(
    make_runtime: MakeRuntime,
) -> None:
    spm = ScriptedSpm(pool="A", auto="success")
    spm.poll_error = ZeroDivisionError("a client bug")
    rt = make_runtime(spm)
    handle = rt.submit(chain("A", step("a")))
    spm.wait_polls(3)
    errors = sample(rt, "spmchain_poll_errors_total", pool="A")
    assert errors >= 3
    spm.poll_error = None
    assert handle.result(WAIT).succeeded


class CountingSpm(ScriptedSpm):
    """Sets ``nth_poll`` when the SPM has been polled ``target`` times."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.nth_poll = threading.Event()
        self.target = 0

    def getAllTasksStatuses(self) -> Any:  # noqa: N802
        try:
            return super().getAllTasksStatuses()
        finally:
            if self.target and self.polls >= self.target:
                self.nth_poll.set()


def test_poll_interval_backs_off_while_idle_and_snaps_back_on_activity(
    make_runtime: MakeRuntime,
) -> None:
    spm = CountingSpm(pool="A", auto="success")
    poll_min, poll_max, idle = 0.01, 2.0, 1.5
    spm.target = 40  # at the minimum interval this comes after 0.4 s
    rt = make_runtime(spm, poll_min_s=poll_min, poll_max_s=poll_max)
    # Waiting for the 40th poll is the thing under test: it must not come in an idle 1.5 s.
    assert not spm.nth_poll.wait(idle)
    with spm.lock:
        polls = spm.polls
    at_min = idle / poll_min
    assert polls <= 12, f"{polls} polls in {idle} s idle (the minimum interval allows {at_min:.0f})"
    # Activity brings the interval back to the minimum: three steps end well within one
    # backed-off interval.
    t0 = time.monotonic()
    handle = rt.submit(chain("A", step("a"), step("b"), step("c")))
    assert handle.result(WAIT).succeeded
    assert time.monotonic() - t0 < 1.0


# -- supervision ----------------------------------------------------------------------------


def fire_keys(spm: ScriptedSpm) -> Counter[tuple[str, tuple[tuple[str, Any], ...]]]:
    with spm.lock:
        return Counter((t.verb, tuple(sorted(t.params.items()))) for t in spm.fired)


def submit_mixed(rt: Runtime, pool: str, n: int) -> list[ChainHandle]:
    """``n`` chains of three steps with reverts; every third fails at its last step. Every
    step and revert has params unique to its chain and step, so a second fire shows."""
    handles = []
    for i in range(n):
        cid = f"{pool}-{i}"
        last = "fail" if i % 3 == 0 else "finish"
        handles.append(rt.submit(chain(
            pool,
            *[
                step(verb, f"un{verb}", params={"chain": cid, "k": k},
                     revert_params={"chain": cid, "revert": k})
                for k, verb in enumerate(("create", "copy"))
            ],
            step(last, params={"chain": cid, "k": 2}),
            chain_id=cid,
        )))
    return handles


def assert_every_chain_ended_once_and_no_step_fired_twice(
    spm: ScriptedSpm, handles: list[ChainHandle], ended: EndLog
) -> None:
    results = [h.result(WAIT) for h in handles]
    ended.wait(len(handles))
    assert ended.counts() == Counter({h.chain_id: 1 for h in handles})
    outcomes = {r.chain_id: r.outcome for r in results}
    for i, h in enumerate(handles):
        expected = ENDED_WITH_FAILURE if i % 3 == 0 else ENDED_SUCCESSFULLY
        assert outcomes[h.chain_id] == expected, (h.chain_id, results[i].reason)
    twice = {k: n for k, n in fire_keys(spm).items() if n > 1}
    assert twice == {}
    n_fail = len(range(0, len(handles), 3))
    assert len(spm.fired) == 3 * len(handles) + 2 * n_fail


@pytest.mark.timeout(60)
def test_a_failing_command_actor_is_restarted_and_its_chain_ends_once(
    make_runtime: MakeRuntime, seed: int
) -> None:
    spm = ScriptedSpm(pool="A", auto="success", fail_verbs={"fail"})
    rt = make_runtime(spm, fault_rates={"command": 0.2}, fault_seed=seed)
    ended = EndLog(rt)
    handles = submit_mixed(rt, "A", 30)
    assert_every_chain_ended_once_and_no_step_fired_twice(spm, handles, ended)
    assert sample(rt, "spmchain_actor_restarts_total", kind="command") > 0
    assert rt.stopped_reason is None


# Every restart of a pool actor makes each live chain of the pool say again what it has in
# flight, so under a steady fault rate restarts come in bursts: the intensity is not under test
# here and is raised out of the way.
GENEROUS = tuple(
    ChildSpec(s.kind, s.restart, s.strategy, max_restarts=10_000, period_s=s.period_s)
    for s in DEFAULT_SUPERVISION
)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("strategy", ["one_for_one", "one_for_pool"])
@pytest.mark.parametrize(("kind", "rate"), [("spm_task", 0.05), ("poller", 0.1)])
def test_a_failing_pool_actor_is_restarted_and_no_chain_ends_twice_or_fires_twice(
    make_runtime: MakeRuntime, seed: int, kind: str, rate: float, strategy: str
) -> None:
    spm = ScriptedSpm(pool="A", auto="success", fail_verbs={"fail"})
    supervision = tuple(
        replace(s, strategy=strategy) if s.kind in ("spm_task", "poller") else s
        for s in GENEROUS
    )
    rt = make_runtime(spm, fault_rates={kind: rate}, fault_seed=seed, max_outstanding=5,
                      supervision=supervision)
    ended = EndLog(rt)
    handles = submit_mixed(rt, "A", 30)
    assert_every_chain_ended_once_and_no_step_fired_twice(spm, handles, ended)
    assert sample(rt, "spmchain_actor_restarts_total", kind=kind) > 0
    assert rt.stopped_reason is None


class ScriptedFaults(FaultInjector):
    """Injects exactly the faults a test plans, in order: ``plan([("spm_task", 1)])`` fails the
    second message the SpmTaskActor handles from then on, and nothing else."""

    def __init__(self) -> None:
        super().__init__()
        self._plan: list[tuple[str, int]] = []
        self._guard = threading.Lock()
        self.done = threading.Event()

    def plan(self, faults: list[tuple[str, int]]) -> None:
        with self._guard:
            self._plan = list(faults)
            self.done.clear()

    def maybe_fail(self, kind: str) -> None:
        with self._guard:
            if not self._plan or self._plan[0][0] != kind:
                return
            skip = self._plan[0][1]
            if skip > 0:
                self._plan[0] = (kind, skip - 1)
                return
            self._plan.pop(0)
            self.injected += 1
            if not self._plan:
                self.done.set()
        raise InjectedFault(f"injected fault in a {kind} actor")


def scripted_faults(rt: Runtime) -> ScriptedFaults:
    faults = ScriptedFaults()
    rt._core.faults = faults  # type: ignore[union-attr]
    return faults


def test_chains_queued_for_a_slot_end_after_the_spm_task_actor_restarts_once(
    make_runtime: MakeRuntime,
) -> None:
    spm = ScriptedSpm(pool="A")
    rt = make_runtime(spm, max_outstanding=1)
    faults = scripted_faults(rt)
    handles = [rt.submit(chain("A", step("a", params={"c": i}))) for i in range(6)]
    spm.wait_fired(1)
    spm.wait_polls(3)  # the other five wait in the SpmTaskActor's queue
    faults.plan([("spm_task", 0)])
    spm.finish(spm.fired[0].task_id)  # its Finished is the message that fails
    assert faults.done.wait(WAIT)
    finish_one_at_a_time(spm, handles, limit=1)
    assert all(h.result(WAIT).succeeded for h in handles)
    assert sample(rt, "spmchain_actor_restarts_total", kind="spm_task") == 1
    assert sorted(t.params["c"] for t in spm.fired) == list(range(6))


def test_running_tasks_are_watched_again_after_the_poller_restarts_once(
    make_runtime: MakeRuntime,
) -> None:
    spm = ScriptedSpm(pool="A")
    rt = make_runtime(spm, admission_target_s=None)  # the six running at once
    faults = scripted_faults(rt)
    handles = [rt.submit(chain("A", step("a", params={"c": i}))) for i in range(6)]
    spm.wait_fired(6)
    faults.plan([("poller", 0)])
    assert faults.done.wait(WAIT)
    spm.wait_polls(3)  # the new poller runs
    for t in spm.unfinished():
        spm.finish(t.task_id)
    assert all(h.result(WAIT).succeeded for h in handles)
    assert sample(rt, "spmchain_actor_restarts_total", kind="poller") == 1
    assert len(spm.fired) == 6


def test_the_task_of_an_ended_chain_is_cleared_even_when_its_ack_was_lost(
    make_runtime: MakeRuntime,
) -> None:
    spm = ScriptedSpm(pool="A")
    rt = make_runtime(spm)
    faults = scripted_faults(rt)
    handle = rt.submit(chain("A", step("last")))
    task = spm.wait_fired(1)[0]
    spm.wait_polls(3)
    # The SpmTaskActor hears Finished (from the poller), then Ack (from the chain, which then
    # ends): the Ack is the message it fails on, and is lost with it.
    faults.plan([("spm_task", 1)])
    spm.finish(task.task_id)
    assert handle.result(WAIT).succeeded
    assert faults.done.wait(WAIT)
    spm.expect(lambda: task.task_id not in spm.tasks, "the finished task cleared", timeout=5.0)
    assert ("revert", task.task_id) not in spm.calls


def test_a_rebuilt_spm_task_actor_tells_a_chain_again_the_task_it_fired_for_it(
    make_runtime: MakeRuntime, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The chain never heard that its step was fired (the TaskFired was lost with its failing
    actor, and its rebuilt actor's request with a failing SpmTaskActor), and the poller never
    heard it should watch the task (lost with a failing poller); the rebuilt SpmTaskActor
    watches every task it owns again, and its resync, asking for that step again, tells the
    chain the task fired for it (it ignored the task's end, not knowing it as its own, and
    waited forever)."""
    spm = ScriptedSpm(pool="A")
    rt = make_runtime(spm, orphan_grace_s=3600.0)
    faults = scripted_faults(rt)
    real_tell = _Core.tell_chain
    real_tell_poller = _Core.tell_poller
    dropped: list[str] = []
    unwatched: list[str] = []

    def losing_the_first_task_fired(self: _Core, chain_id: str, event: Any,
                                    seen_at: float | None = None) -> bool:
        if isinstance(event, TaskFired) and not dropped:
            dropped.append(event.task_id)
            return True
        return real_tell(self, chain_id, event, seen_at)

    def losing_the_first_watch(self: _Core, pool: str, message: Any) -> None:
        if isinstance(message, Watch) and not unwatched:
            unwatched.append(message.tasks[0].task_id)
            return
        real_tell_poller(self, pool, message)

    monkeypatch.setattr(_Core, "tell_chain", losing_the_first_task_fired)
    monkeypatch.setattr(_Core, "tell_poller", losing_the_first_watch)
    handle = rt.submit(chain("A", step("a"), step("b")))
    task = spm.wait_fired(1)[0]
    spm.wait_polls(3)
    assert dropped == [task.task_id] and unwatched == [task.task_id]
    assert rt.chains()[0].steps[0].task_id is None  # the chain does not know its task
    spm.finish(task.task_id)  # nobody hears of it
    spm.wait_polls(3)
    faults.plan([("spm_task", 0)])  # the next message it handles fails it
    rt._core.tell_task_actor("A", Rewatch())  # type: ignore[union-attr]
    assert faults.done.wait(WAIT)
    spm.finish(spm.wait_fired(2)[1].task_id)
    assert handle.result(WAIT).succeeded
    assert spm.verbs() == ["a", "b"]


def test_a_succeeded_task_of_an_ended_chain_is_never_reverted_as_an_orphan(
    make_runtime: MakeRuntime,
) -> None:
    spm = ScriptedSpm(pool="A")
    rt = make_runtime(spm, orphan_grace_s=0.2)
    faults = scripted_faults(rt)
    handle = rt.submit(chain("A", step("last", "unlast")))
    task = spm.wait_fired(1)[0]
    spm.wait_polls(3)
    # The Ack is lost with a failing SpmTaskActor, then the poller fails too and its
    # successor no longer knows the task was a chain's.
    faults.plan([("spm_task", 1), ("poller", 0)])
    spm.finish(task.task_id)
    assert handle.result(WAIT).succeeded
    assert faults.done.wait(WAIT)
    spm.expect(lambda: task.task_id not in spm.tasks, "the finished task cleared", timeout=5.0)
    # The step succeeded and its chain reported success: its effect must stay.
    assert ("revert", task.task_id) not in spm.calls
    assert spm.verbs() == ["last"]


def test_a_cancel_lost_with_the_chains_failing_actor_is_applied_by_the_rebuilt_one(
    make_runtime: MakeRuntime,
) -> None:
    spm = ScriptedSpm(pool="A")
    rt = make_runtime(spm)
    faults = scripted_faults(rt)
    handle = rt.submit(chain("A", step("prepare", "unprepare"), step("copy")))
    spm.finish(spm.wait_fired(1)[0].task_id)
    copy = spm.wait_fired(2)[1]
    spm.wait_polls(3)  # the chain has heard that copy was fired
    assert rt.chains()[0].steps[1].task_id == copy.task_id
    faults.plan([("command", 0)])  # the Cancel is the message its actor fails on
    assert handle.cancel("operator asked")
    assert faults.done.wait(WAIT)
    spm.expect(lambda: ("stop", copy.task_id) in spm.calls, "the running task stopped")
    spm.finish(spm.wait_fired(3)[2].task_id)  # the revert of prepare
    result = handle.result(WAIT)
    assert result.outcome == ENDED_WITH_FAILURE
    assert result.reason is not None and "operator asked" in result.reason
    assert spm.verbs() == ["prepare", "copy", "unprepare"]
    assert sample(rt, "spmchain_actor_restarts_total", kind="command") == 1


def test_a_chain_whose_actor_fails_while_starting_is_rebuilt_not_left_without_one(
    make_runtime: MakeRuntime, monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_on_start = CommandActor.on_start
    failed: list[bool] = []

    def on_start_failing_once(self: CommandActor) -> None:
        if not failed:
            failed.append(True)
            raise InjectedFault("the chain's actor fails as it starts")
        real_on_start(self)

    monkeypatch.setattr(CommandActor, "on_start", on_start_failing_once)
    spm = ScriptedSpm(pool="A", auto="success")
    rt = make_runtime(spm)
    handle = rt.submit(chain("A", step("a"), step("b")))
    assert handle.result(WAIT).succeeded
    assert failed == [True]
    assert sample(rt, "spmchain_actor_restarts_total", kind="command") == 1
    assert spm.verbs() == ["a", "b"]


def test_restarts_past_the_intensity_escalate_and_stop_the_runtime(
    make_runtime: MakeRuntime,
) -> None:
    spm = ScriptedSpm(pool="A", auto="success")
    supervision = tuple(
        ChildSpec("spm_task", max_restarts=2, period_s=30.0) if s.kind == "spm_task" else s
        for s in DEFAULT_SUPERVISION
    )
    rt = make_runtime(spm, fault_rates={"spm_task": 1.0}, fault_seed=1,
                      supervision=supervision)
    handle = rt.submit(chain("A", step("a")))
    with pytest.raises(RuntimeStoppedError) as info:
        handle.result(WAIT)
    reason = rt.stopped_reason
    assert reason is not None
    assert "supervisor escalated" in reason
    assert "spm_task" in reason and "2 allowed" in reason
    assert info.value.reason == reason
    assert sample(rt, "spmchain_actor_restarts_total", kind="spm_task") == 2
    assert sample(rt, "spmchain_supervisor_escalations_total") == 1
    assert spm.fired == []
    with pytest.raises(RuntimeStoppedError):
        rt.submit(chain("A", step("b")))


# -- zombies and orphans ---------------------------------------------------------------------


def test_a_task_running_past_its_chains_task_timeout_is_stopped_and_the_chain_fails(
    make_runtime: MakeRuntime,
) -> None:
    spm = ScriptedSpm(pool="A")
    rt = make_runtime(spm)
    handle = rt.submit(chain("A", step("prepare", "unprepare"), step("copy"),
                             task_timeout_s=0.2))
    spm.finish(spm.wait_fired(1)[0].task_id)
    zombie = spm.wait_fired(2)[1]  # never finished by the test
    spm.expect(lambda: ("stop", zombie.task_id) in spm.calls, "stopTask of the zombie", 3.0)
    spm.finish(spm.wait_fired(3)[2].task_id)  # the revert of prepare
    result = handle.result(WAIT)
    assert result.outcome == ENDED_WITH_FAILURE
    assert result.reason is not None and "zombie" in result.reason
    assert spm.verbs() == ["prepare", "copy", "unprepare"]
    assert sample(rt, "spmchain_zombie_tasks_total", pool="A") == 1


def test_a_task_running_past_the_runtimes_task_timeout_is_a_zombie(
    make_runtime: MakeRuntime,
) -> None:
    spm = ScriptedSpm(pool="A")
    rt = make_runtime(spm, task_timeout_s=0.2)
    handle = rt.submit(chain("A", step("copy")))
    zombie = spm.wait_fired(1)[0]
    spm.expect(lambda: ("stop", zombie.task_id) in spm.calls, "stopTask of the zombie", 3.0)
    result = handle.result(WAIT)
    assert result.outcome == ENDED_WITH_FAILURE
    assert result.reason is not None and "zombie" in result.reason
    assert sample(rt, "spmchain_zombie_tasks_total", pool="A") == 1


def test_a_request_whose_chain_ended_while_it_waited_for_the_spm_is_never_fired(
    make_runtime: MakeRuntime,
) -> None:
    """The SPM refuses for now (a failover); the chain passes its deadline and ends with its
    step still waiting in the SpmTaskActor; once the SPM is back that step must not run (its
    effect would be left behind: its chain has ended and reverts nothing more)."""
    away = threading.Event()
    away.set()
    spm = ScriptedSpm(pool="A", auto="success",
                      refuse=lambda verb, params: NotSpmError() if away.is_set() else None)
    rt = make_runtime(spm)
    late = rt.submit(chain("A", step("create", "delete"), deadline_s=0.2, task_timeout_s=0.1))
    result = late.result(WAIT)
    assert result.outcome == ENDED_WITH_FAILURE and "deadline" in (result.reason or "")
    away.clear()  # the SPM is back: the request first in line goes first, if it still goes
    assert rt.submit(chain("A", step("after"))).result(WAIT).succeeded
    assert spm.verbs() == ["after"]


@dataclass
class _LosingAnswers(ScriptedSpm):
    """Loses the answer to the first fire of ``verb``: ``made`` says whether the SPM made the
    task first; ``error`` is what the caller gets (a connection dropped in flight by default).
    ``tells_params``: getAllTasksInfo reports each task's parameters (as the simulator does;
    VDSM does not)."""

    verb: str = ""
    made: bool = True
    error: type[SpmError] = SpmConnectionError
    tells_params: bool = False
    lost: int = 0
    on_lose: Callable[[], None] | None = None  # called as the answer is lost

    def fire(self, verb: str, params: Mapping[str, Any]) -> str:
        if verb == self.verb and not self.lost:
            self.lost += 1
            if self.made:
                super().fire(verb, params)
            if self.on_lose is not None:
                self.on_lose()
            raise self.error("the answer was lost")
        return super().fire(verb, params)

    def getAllTasksInfo(self) -> Any:  # noqa: N802
        if not self.tells_params:
            return super().getAllTasksInfo()
        with self.lock:
            return {tid: {"id": tid, "verb": t.verb, "params": dict(t.params)}
                    for tid, t in self.tasks.items()}


def test_a_fire_whose_answer_was_lost_adopts_the_task_the_spm_made(
    make_runtime: MakeRuntime,
) -> None:
    spm = _LosingAnswers(pool="A", auto="success", verb="copy", tells_params=True)
    rt = make_runtime(spm)
    handle = rt.submit(chain("A", step("create", "delete"), step("copy", params={"n": 1})))
    assert handle.result(WAIT).succeeded
    assert spm.lost == 1
    assert spm.verbs() == ["create", "copy"]  # copy made once, adopted, never fired again
    spm.expect(lambda: not spm.tasks, "every task cleared")


@pytest.mark.parametrize("error", [SpmConnectionError, SpmTimeoutError])
def test_a_fire_whose_answer_was_lost_is_not_fired_again_when_its_task_cannot_be_told(
    make_runtime: MakeRuntime, error: type[SpmError],
) -> None:
    """The SPM does not tell parameters (VDSM): the task it may have made cannot be told from
    another, so the step is refused (the chain fails and reverts), and the task is discarded
    at once (not after the orphan grace), holding the step's resources until it is gone: the
    verb never runs twice, the revert of the step before never runs beside it, nothing is
    left."""
    spm = _LosingAnswers(pool="A", auto="success", verb="copy", error=error)
    rt = make_runtime(spm, orphan_grace_s=3600.0)
    handle = rt.submit(chain("A", step("create", "delete", exclusive=("img",)),
                             step("copy", params={"n": 1}, exclusive=("img",))))
    result = handle.result(WAIT)
    assert result.outcome == ENDED_WITH_FAILURE
    assert result.reason is not None and "not fired again" in result.reason
    spm.expect(lambda: not spm.tasks, "the orphan copy discarded, every task cleared")
    assert spm.verbs() == ["create", "copy", "delete"]
    (copy,) = [t for t in spm.fired if t.verb == "copy"]
    calls = list(spm.calls)
    assert ("revert", copy.task_id) in calls  # it had succeeded: its effect is undone
    assert calls.index(("clear", copy.task_id)) < calls.index(("fire", "delete"))
    assert sample(rt, "spmchain_orphan_tasks_total", pool="A") == 1


def test_a_step_refused_when_its_fire_was_settled_is_refused_again_if_asked_again(
    make_runtime: MakeRuntime,
) -> None:
    """The chain's actor fails on the refusal and its successor asks for the step again: it is
    refused again, never fired (a second task beside the one the lost fire may have made)."""
    spm = _LosingAnswers(pool="A", auto="success", verb="copy")
    rt = make_runtime(spm, orphan_grace_s=3600.0)
    faults = scripted_faults(rt)
    spm.on_lose = lambda: faults.plan([("command", 0)])  # the refusal is what it fails on
    handle = rt.submit(chain("A", step("create", "delete"), step("copy")))
    result = handle.result(WAIT)
    assert faults.done.is_set()
    assert sample(rt, "spmchain_actor_restarts_total", kind="command") == 1
    assert result.outcome == ENDED_WITH_FAILURE
    assert result.reason is not None and "not fired again" in result.reason
    spm.expect(lambda: not spm.tasks, "every task cleared")
    assert spm.verbs() == ["create", "copy", "delete"]


def test_a_task_fired_as_its_chain_ends_is_discarded_not_just_cleared(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The chain passes its deadline while its step is being fired: it has ended (recorded)
    when the task id comes back. The task is nobody's to keep: stopped, reverted, cleared."""
    ending = threading.Event()
    returned = threading.Event()
    real_end = _Core.chain_ended

    def chain_ended_after_the_fire_returned(self: _Core, entry: Any, state: Any) -> None:
        ending.set()
        assert returned.wait(WAIT)
        real_end(self, entry, state)

    monkeypatch.setattr(_Core, "chain_ended", chain_ended_after_the_fire_returned)

    @dataclass
    class FiringLate(ScriptedSpm):
        def fire(self, verb: str, params: Mapping[str, Any]) -> str:
            assert ending.wait(WAIT)  # the chain ends while its fire is on its way
            try:
                return super().fire(verb, params)
            finally:
                returned.set()

    spm = FiringLate(pool="A", auto="success")
    rt = Runtime([spm], RuntimeOptions(**FAST), store="memory").start()
    try:
        handle = rt.submit(chain("A", step("create", "delete"), deadline_s=0.1,
                                 task_timeout_s=0.1))
        result = handle.result(WAIT)
        assert result.outcome == ENDED_WITH_FAILURE
        spm.expect(lambda: not spm.tasks, "the late task discarded")
    finally:
        rt.stop()
    (late,) = spm.fired
    assert [c for c in spm.calls if c[1] == late.task_id] == [
        ("stop", late.task_id), ("revert", late.task_id), ("clear", late.task_id)]


def test_a_fire_refused_before_it_was_sent_is_fired_again(make_runtime: MakeRuntime) -> None:
    spm = _LosingAnswers(pool="A", auto="success", verb="copy", made=False,
                         error=NotConnectedError)
    rt = make_runtime(spm)
    handle = rt.submit(chain("A", step("create", "delete"), step("copy")))
    assert handle.result(WAIT).succeeded
    assert spm.lost == 1
    assert spm.verbs() == ["create", "copy"]


def test_a_zombie_report_lost_with_the_chains_failing_actor_is_made_again(
    make_runtime: MakeRuntime,
) -> None:
    spm = ScriptedSpm(pool="A")
    rt = make_runtime(spm)
    faults = scripted_faults(rt)
    handle = rt.submit(chain("A", step("copy"), task_timeout_s=0.3))
    zombie = spm.wait_fired(1)[0]
    spm.wait_polls(3)  # the chain has heard that copy was fired: nothing else is on its way
    faults.plan([("command", 0)])  # the zombie report is the message its actor fails on
    assert faults.done.wait(WAIT)
    spm.expect(lambda: ("stop", zombie.task_id) in spm.calls, "stopTask of the zombie")
    result = handle.result(WAIT)
    assert result.outcome == ENDED_WITH_FAILURE
    assert result.reason is not None and "zombie" in result.reason
    assert sample(rt, "spmchain_actor_restarts_total", kind="command") == 1


def test_orphan_tasks_are_stopped_or_reverted_and_cleared_after_the_grace(
    make_runtime: MakeRuntime,
) -> None:
    spm = ScriptedSpm(pool="A")
    running = FakeTask("orphan-running", "copyImage", {})
    done = FakeTask("orphan-done", "createVolume", {}, state="finished", result="success")
    with spm.lock:
        spm.tasks[running.task_id] = running
        spm.tasks[done.task_id] = done
    rt = make_runtime(spm, orphan_grace_s=0.2)
    # A chain's own task, running past the grace, is not an orphan.
    own = rt.submit(chain("A", step("mine")))
    mine = spm.wait_fired(1)[0]
    spm.expect(lambda: "orphan-running" not in spm.tasks and "orphan-done" not in spm.tasks,
               "both orphans cleared")
    calls = list(spm.calls)
    assert ("stop", "orphan-running") in calls
    assert ("revert", "orphan-running") not in calls  # it never succeeded
    assert ("revert", "orphan-done") in calls  # its effect is undone
    for orphan in ("orphan-running", "orphan-done"):
        assert calls.index(("clear", orphan)) > max(
            i for i, c in enumerate(calls) if c[1] == orphan and c[0] != "clear"
        )
    assert ("stop", mine.task_id) not in calls
    assert not own.done()
    spm.finish(mine.task_id)
    assert own.result(WAIT).succeeded
    assert sample(rt, "spmchain_orphan_tasks_total", pool="A") == 2


@dataclass
class _RefusingSpm(ScriptedSpm):
    """Refuses, for now (a connection error), the first ``refusals[call]`` reverts or clears
    of the task ``victim``."""

    victim: str = ""
    refusals: Counter[str] = field(default_factory=Counter)

    def _refuse(self, call: str, task_id: str) -> None:
        with self.lock:
            if task_id == self.victim and self.refusals[call] > 0:
                self.refusals[call] -= 1
                self.calls.append((f"refused {call}", task_id))
                raise SpmConnectionError("the SPM is moving")

    def revertTask(self, task_id: str) -> None:  # noqa: N802
        self._refuse("revert", task_id)
        super().revertTask(task_id)

    def clearTask(self, task_id: str) -> None:  # noqa: N802
        self._refuse("clear", task_id)
        super().clearTask(task_id)


def test_an_orphan_whose_revert_and_clear_the_spm_refuses_for_now_is_tried_again(
    make_runtime: MakeRuntime,
) -> None:
    spm = _RefusingSpm(pool="A", victim="orphan-done")
    spm.refusals.update({"revert": 1, "clear": 2})
    done = FakeTask("orphan-done", "createVolume", {}, state="finished", result="success")
    with spm.lock:
        spm.tasks[done.task_id] = done
    rt = make_runtime(spm, orphan_grace_s=0.1)
    spm.expect(lambda: "orphan-done" not in spm.tasks, "the orphan reverted and cleared")
    calls = [c for c in spm.calls if c[1] == "orphan-done"]
    assert calls == [("stop", "orphan-done"), ("refused revert", "orphan-done"),
                     ("revert", "orphan-done"), ("refused clear", "orphan-done"),
                     ("refused clear", "orphan-done"), ("clear", "orphan-done")]
    assert rt.submit(chain("A", step("after"))) is not None


def test_a_recovery_orphan_whose_clear_fails_once_still_lets_the_pool_fire() -> None:
    """Recovery holds the pool's fires until its orphans are gone; a clear the SPM refuses
    once must not keep the hold forever (the poller reports an orphan's end only once)."""
    spm = _RefusingSpm(pool="A", victim="orphan", auto="success")
    spm.refusals.update({"clear": 1})
    with spm.lock:
        spm.tasks["orphan"] = FakeTask("orphan", "copyImage", {}, state="finished",
                                       result="cleanSuccess")
    rt = Runtime([spm], RuntimeOptions(**FAST), store="memory").start()
    try:
        handle = rt.submit(chain("A", step("s1")))
        assert handle.result(WAIT).succeeded
    finally:
        rt.stop()
    calls = list(spm.calls)
    assert calls.index(("refused clear", "orphan")) < calls.index(("clear", "orphan"))
    assert calls.index(("clear", "orphan")) < calls.index(("fire", "s1"))


def test_recovery_work_survives_the_first_spm_task_actor_failing_before_it_began(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What recovery found is kept in the pool's state, not handed to one actor: its
    successor still holds the pool until the orphans are gone, and still knows a task whose
    ended chain recorded its outcome (cleared, never reverted as an orphan)."""
    db = tmp_path / "snapshots.sqlite"
    spm = ScriptedSpm(pool="A", auto="success")
    rt = Runtime([spm], RuntimeOptions(**FAST), store=db).start()
    try:
        assert rt.submit(chain("A", step("create", "delete"))).result(WAIT).succeeded
    finally:
        rt.stop()
    created = spm.fired[0].task_id
    with spm.lock:  # the engine died after the chain recorded its end, before the clear
        spm.tasks[created] = FakeTask(created, "create", {}, state="finished", result="success")
        spm.tasks["orphan"] = FakeTask("orphan", "copyImage", {})  # running, owned by no one
        spm.calls.clear()
    real_begin = SpmTaskActor._begin
    failed: list[bool] = []

    def begin_failing_once(self: SpmTaskActor) -> None:
        if not failed:
            failed.append(True)
            raise InjectedFault("the first SpmTaskActor fails before it began")
        real_begin(self)

    monkeypatch.setattr(SpmTaskActor, "_begin", begin_failing_once)
    rt = Runtime([spm], RuntimeOptions(**FAST, orphan_grace_s=0.2), store=db).start()
    try:
        handle = rt.submit(chain("A", step("other")))
        assert handle.result(WAIT).succeeded
        spm.expect(lambda: not spm.tasks, "every task cleared")
        assert failed == [True]
        assert sample(rt, "spmchain_actor_restarts_total", kind="spm_task") == 1
    finally:
        rt.stop()
    calls = list(spm.calls)
    assert [c for c in calls if c[1] == created] == [("clear", created)]
    assert calls.index(("stop", "orphan")) < calls.index(("clear", "orphan"))
    assert calls.index(("clear", "orphan")) < calls.index(("fire", "other"))
