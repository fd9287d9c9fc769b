"""The embedding API end to end on a scripted SPM: submit, follow, cancel, stop."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytest
from conftest import FAST, WAIT, EndLog, ScriptedSpm, chain, step

from actors._chain import ENDED_SUCCESSFULLY, ENDED_WITH_FAILURE
from actors._runtime import ChainResult, Runtime, RuntimeOptions, RuntimeStoppedError
from actors._spec import (
    ChainSpec,
    ChainSpecError,
    Command,
    StepResult,
    StepSpec,
    register_command,
)
from actors._store import StoreError
from actors._store_memory import MemoryStore
from metrics._metrics import RuntimeMetrics

pytestmark = pytest.mark.timeout(30)

MakeRuntime = Callable[..., Runtime]


def test_chain_ends_successfully_with_its_steps_fired_one_after_another(
    make_runtime: MakeRuntime,
) -> None:
    spm = ScriptedSpm(pool="A")
    rt = make_runtime(spm)
    handle = rt.submit(chain("A", step("create", params={"n": 1}), step("copy", params={"n": 2}),
                             step("sync", params={"n": 3})))
    for k in range(3):
        fired = spm.wait_fired(k + 1)
        # Step k+1 is fired only after step k finished: nothing more while step k runs.
        spm.wait_polls(3)
        assert len(spm.fired) == k + 1
        assert not handle.done()
        spm.finish(fired[k].task_id)
    result = handle.result(WAIT)
    assert result.outcome == ENDED_SUCCESSFULLY
    assert result.succeeded
    assert result.reason is None
    assert spm.verbs() == ["create", "copy", "sync"]
    assert [dict(t.params) for t in spm.fired] == [{"n": 1}, {"n": 2}, {"n": 3}]
    assert [s.status for s in result.state.steps] == ["succeeded"] * 3
    assert [s.task_id for s in result.state.steps] == [t.task_id for t in spm.fired]


def test_failed_step_reverts_previous_steps_in_reverse(make_runtime: MakeRuntime) -> None:
    spm = ScriptedSpm(pool="A", auto="success", fail_verbs={"sync"})
    rt = make_runtime(spm)
    handle = rt.submit(chain(
        "A",
        step("create", "delete", params={"img": "i1"}),
        step("copy", "uncopy", params={"img": "i2"}, revert_params={"img": "i2", "force": True}),
        step("sync", "unsync"),
    ))
    result = handle.result(WAIT)
    assert result.outcome == ENDED_WITH_FAILURE
    assert not result.succeeded
    assert result.reason is not None
    assert "step 2 (sync) failed" in result.reason
    # The failed step itself is not reverted; the others are, newest first.
    assert spm.verbs() == ["create", "copy", "sync", "uncopy", "delete"]
    assert dict(spm.fired[3].params) == {"img": "i2", "force": True}
    assert dict(spm.fired[4].params) == {"img": "i1"}  # no revert_params: the step's own


def test_cancel_while_a_task_runs_stops_it_and_reverts_earlier_steps(
    make_runtime: MakeRuntime,
) -> None:
    spm = ScriptedSpm(pool="A")
    rt = make_runtime(spm)
    handle = rt.submit(chain("A", step("create", "delete"), step("copy", "uncopy"),
                             step("sync")))
    spm.finish(spm.wait_fired(1)[0].task_id)
    running = spm.wait_fired(2)[1]
    assert handle.cancel("operator asked") is True
    spm.expect(lambda: ("stop", running.task_id) in spm.calls, "stopTask of the running copy")
    revert = spm.wait_fired(3)[2]
    assert revert.verb == "delete"
    spm.finish(revert.task_id)
    result = handle.result(WAIT)
    assert result.outcome == ENDED_WITH_FAILURE
    assert result.reason is not None and "operator asked" in result.reason
    # The stopped step is not reverted (it did not succeed) and the unfired one never fires.
    assert spm.verbs() == ["create", "copy", "delete"]
    assert handle.cancel("again") is False


def test_done_callbacks_runtime_wide_and_per_handle_even_added_after_the_end(
    make_runtime: MakeRuntime,
) -> None:
    spm = ScriptedSpm(pool="A", auto="success")
    rt = make_runtime(spm)
    everyone: list[ChainResult] = []
    rt.add_done_callback(everyone.append)
    ended = EndLog(rt)
    mine: list[ChainResult] = []
    first_done = threading.Event()
    h1 = rt.submit(chain("A", step("a"), chain_id="c1"))

    def on_first(result: ChainResult) -> None:
        mine.append(result)
        first_done.set()

    h1.add_done_callback(on_first)
    h2 = rt.submit(chain("A", step("b"), chain_id="c2"))
    assert first_done.wait(WAIT)
    h2.result(WAIT)
    ended.wait(2)
    assert sorted(r.chain_id for r in everyone) == ["c1", "c2"]
    assert [r.chain_id for r in mine] == ["c1"]
    late: list[ChainResult] = []
    h2.add_done_callback(late.append)  # after the end: called at once, here
    assert [r.chain_id for r in late] == ["c2"]
    assert late[0] is h2.result(WAIT)


def test_a_done_callback_that_raises_does_not_stop_the_others(
    make_runtime: MakeRuntime,
) -> None:
    spm = ScriptedSpm(pool="A", auto="success")
    rt = make_runtime(spm)

    def broken(_result: ChainResult) -> None:
        raise RuntimeError("callback bug")

    rt.add_done_callback(broken)
    ended = EndLog(rt)
    handle = rt.submit(chain("A", step("a")))
    handle.add_done_callback(broken)
    assert handle.result(WAIT).succeeded
    ended.wait(1)
    assert rt.submit(chain("A", step("b"))).result(WAIT).succeeded


def test_chains_lists_live_chains_and_not_ended_ones(make_runtime: MakeRuntime) -> None:
    spm = ScriptedSpm(pool="A")
    rt = make_runtime(spm)
    assert rt.chains() == []
    h1 = rt.submit(chain("A", step("a"), chain_id="first"))
    h2 = rt.submit(chain("A", step("b"), chain_id="second"))
    assert sorted(s.chain_id for s in rt.chains()) == ["first", "second"]
    tasks = {t.verb: t for t in spm.wait_fired(2)}
    spm.finish(tasks["a"].task_id)
    h1.result(WAIT)
    assert [s.chain_id for s in rt.chains()] == ["second"]
    assert rt.handle("first") is None
    assert rt.handle("second") is h2
    spm.finish(tasks["b"].task_id)
    h2.result(WAIT)
    assert rt.chains() == []


BAD_SPECS: list[tuple[Mapping[str, Any], str]] = [
    ({"command_type": "t", "steps": [{"verb": "a"}]}, "pool"),
    ({"pool": "A", "steps": [{"verb": "a"}]}, "command_type"),
    ({"pool": "A", "command_type": "t", "steps": []}, "steps"),
    ({"pool": "A", "command_type": "t"}, "steps"),
    ({"pool": "A", "command_type": "t", "steps": [{"verb": "a"}, {"verb": ""}]}, "steps[1].verb"),
    ({"pool": "A", "command_type": "t", "steps": [{"verb": "a", "params": {"x": math.nan}}]},
     "steps[0].params.x"),
    ({"pool": "A", "command_type": "t", "steps": [{"verb": "a", "colour": "red"}]},
     "steps[0].colour"),
    ({"pool": "A", "command_type": "t", "steps": [{"verb": "a"}], "deadline_s": -1},
     "deadline_s"),
    ({"pool": "A", "command_type": "t", "steps": [{"verb": "a"}], "params": {"o": object()}},
     "params.o"),
    ({"pool": "A", "command_type": "t", "steps": [{"verb": "a"}], "command": "nope"}, "steps"),
    ({"pool": "A", "command_type": "t", "command": "never-registered"}, "command"),
]


@pytest.mark.parametrize(("spec", "field"), BAD_SPECS, ids=[repr(s) for s, _ in BAD_SPECS])
def test_malformed_spec_is_refused_naming_the_field_and_nothing_is_lost(
    make_runtime: MakeRuntime, spec: Mapping[str, Any], field: str
) -> None:
    spm = ScriptedSpm(pool="A")
    rt = make_runtime(spm)
    ended = EndLog(rt)
    before = rt.submit(chain("A", step("before")))
    fired_before = spm.wait_fired(1)
    with pytest.raises(ChainSpecError) as info:
        rt.submit(spec)
    assert info.value.field == field
    assert field in str(info.value)
    after = rt.submit(chain("A", step("after")))
    for t in spm.wait_fired(2):
        spm.finish(t.task_id)
    assert before.result(WAIT).succeeded
    assert after.result(WAIT).succeeded
    assert len(ended.wait(2)) == 2
    assert spm.verbs() == ["before", "after"]
    assert fired_before[0].verb == "before"


def test_malformed_chain_spec_object_is_refused_naming_the_step_field(
    make_runtime: MakeRuntime,
) -> None:
    rt = make_runtime(ScriptedSpm(pool="A", auto="success"))
    bad = ChainSpec(pool="A", command_type="t",
                    steps=[StepSpec("a"), StepSpec("b", exclusive="img-1")])  # type: ignore[arg-type]
    with pytest.raises(ChainSpecError, match=r"steps\[1\]\.exclusive") as info:
        rt.submit(bad)
    assert info.value.field == "steps[1].exclusive"
    assert rt.chains() == []
    assert rt.submit(chain("A", step("a"))).result(WAIT).succeeded


def test_submit_to_an_unknown_pool_is_refused_naming_pool(make_runtime: MakeRuntime) -> None:
    rt = make_runtime(ScriptedSpm(pool="A", auto="success"))
    with pytest.raises(ChainSpecError, match="pool") as info:
        rt.submit(chain("B", step("a")))
    assert info.value.field == "pool"
    assert "'B'" in str(info.value)
    assert rt.chains() == []


def test_a_spec_given_as_a_dict_runs(make_runtime: MakeRuntime) -> None:
    spm = ScriptedSpm(pool="A", auto="success", fail_verbs={"boom"})
    rt = make_runtime(spm)
    handle = rt.submit({
        "pool": "A",
        "command_type": "migrate",
        "chain_id": "from-json",
        "steps": [
            {"verb": "create", "params": {"img": "i"}, "revert_verb": "delete",
             "exclusive": ["i"]},
            {"verb": "boom", "shared": ["i2"]},
        ],
    })
    assert handle.chain_id == "from-json"
    assert handle.pool == "A"
    result = handle.result(WAIT)
    assert result.outcome == ENDED_WITH_FAILURE
    assert spm.verbs() == ["create", "boom", "delete"]
    assert result.state.spec.command_type == "migrate"


def test_duplicate_live_chain_id_is_refused(make_runtime: MakeRuntime) -> None:
    spm = ScriptedSpm(pool="A")
    rt = make_runtime(spm)
    first = rt.submit(chain("A", step("a"), chain_id="dup"))
    with pytest.raises(ChainSpecError, match="already live") as info:
        rt.submit(chain("A", step("b"), chain_id="dup"))
    assert info.value.field == "chain_id"
    spm.finish(spm.wait_fired(1)[0].task_id)
    assert first.result(WAIT).succeeded
    spm.wait_polls(3)
    assert spm.verbs() == ["a"]  # the refused one fired nothing


def test_result_times_out_while_the_chain_runs(make_runtime: MakeRuntime) -> None:
    spm = ScriptedSpm(pool="A")
    rt = make_runtime(spm)
    handle = rt.submit(chain("A", step("slow")))
    spm.wait_fired(1)
    with pytest.raises(TimeoutError):
        handle.result(timeout=0.05)
    assert not handle.done()
    assert handle.state().phase == "running"


def test_after_stop_results_raise_runtime_stopped_error(make_runtime: MakeRuntime) -> None:
    spm = ScriptedSpm(pool="A")
    rt = make_runtime(spm)
    handle = rt.submit(chain("A", step("never-ends")))
    spm.wait_fired(1)
    waiter_error: list[BaseException] = []

    def wait() -> None:
        try:
            handle.result(WAIT)
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            waiter_error.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    rt.stop(reason="maintenance")
    waiter.join(WAIT)
    assert not waiter.is_alive()
    assert len(waiter_error) == 1 and isinstance(waiter_error[0], RuntimeStoppedError)
    with pytest.raises(RuntimeStoppedError, match="maintenance") as info:
        handle.result(WAIT)
    assert info.value.reason == "maintenance"
    assert rt.stopped_reason == "maintenance"
    with pytest.raises(RuntimeStoppedError):
        rt.submit(chain("A", step("late")))


def test_runtime_as_context_manager_stops_on_exit() -> None:
    spm = ScriptedSpm(pool="A")
    with Runtime([spm], RuntimeOptions(poll_min_s=0.005, poll_max_s=0.05)) as rt:
        handle = rt.submit(chain("A", step("never-ends")))
        spm.wait_fired(1)
    with pytest.raises(RuntimeStoppedError):
        handle.result(WAIT)


BAD_OPTIONS: list[tuple[dict[str, Any], str]] = [
    ({"max_outstanding": 0}, "max_outstanding"),
    ({"max_outstanding": 2.5}, "max_outstanding"),
    ({"command_workers": 0}, "command_workers"),
    ({"poll_min_s": 0}, "poll_min_s"),
    ({"poll_min_s": 0.5, "poll_max_s": 0.1}, "poll_max_s"),
    ({"redeliver_s": -1}, "redeliver_s"),
    ({"orphan_grace_s": 0}, "orphan_grace_s"),
    ({"deadline_s": math.nan}, "deadline_s"),
    ({"task_timeout_s": "1"}, "task_timeout_s"),
    ({"retry_min_s": 0}, "retry_min_s"),
    ({"fault_rates": {"command": 1.5}}, "fault_rates"),
    ({"fault_rates": {"no-such-actor": 0.1}}, "fault_rates"),
    ({"admission_target_s": 0}, "admission_target_s"),
    ({"max_running": 0}, "max_running"),
    ({"max_running": 1.5}, "max_running"),
    ({"switch_interval_s": 0}, "switch_interval_s"),
]


@pytest.mark.parametrize(("kwargs", "field"), BAD_OPTIONS,
                         ids=[repr(kw) for kw, _ in BAD_OPTIONS])
def test_runtime_options_refuse_bad_values_naming_the_field(
    kwargs: dict[str, Any], field: str
) -> None:
    with pytest.raises(ValueError, match=field):
        RuntimeOptions(**kwargs)


def test_runtime_refuses_no_pools_and_clients_that_name_no_pool() -> None:
    with pytest.raises(ValueError, match="at least one pool"):
        Runtime([])
    with pytest.raises(ValueError, match="two SPM clients"):
        Runtime([ScriptedSpm(pool="A"), ScriptedSpm(pool="A")])
    with pytest.raises(TypeError, match="not an SpmClient"):
        Runtime({"A": object()})  # type: ignore[arg-type]


def test_chain_past_its_deadline_ends_with_failure_and_its_task_is_stopped(
    make_runtime: MakeRuntime,
) -> None:
    spm = ScriptedSpm(pool="A")
    rt = make_runtime(spm)
    handle = rt.submit(chain("A", step("prepare", "unprepare"), step("copy"), deadline_s=0.3))
    spm.finish(spm.wait_fired(1)[0].task_id)
    running = spm.wait_fired(2)[1]  # never finished by the test
    spm.expect(lambda: ("stop", running.task_id) in spm.calls, "stopTask at the deadline")
    revert = spm.wait_fired(3)[2]
    assert revert.verb == "unprepare"
    spm.finish(revert.task_id)
    result = handle.result(WAIT)
    assert result.outcome == ENDED_WITH_FAILURE
    assert result.reason is not None and "deadline of 0.3 s exceeded" in result.reason


HOOK_CALLS: list[tuple[str, Any]] = []


@register_command("tests.runtime.copy_then_verify")
class CopyThenVerify(Command):
    """Copies ``params['images']`` one by one, then verifies the last task; records hooks."""

    def next_step(self, results: Sequence[StepResult]) -> StepSpec | None:
        images = list(self.params["images"])
        if len(results) < len(images):
            img = images[len(results)]
            return StepSpec("copyImage", params={"img": img}, revert_verb="deleteImage")
        if len(results) == len(images):
            return StepSpec("verify", params={"after": results[-1].task_id})
        return None

    def end_step(self, result: StepResult) -> None:
        HOOK_CALLS.append(("end_step", result.index))
        if self.params.get("fail_hook_at") == result.index:
            raise RuntimeError(f"end_step {result.index} refused")

    def end_successfully(self, results: Sequence[StepResult]) -> None:
        HOOK_CALLS.append(("end_successfully", len(results)))

    def end_with_failure(self, results: Sequence[StepResult], reason: str) -> None:
        HOOK_CALLS.append(("end_with_failure", len(results)))


def test_a_registered_command_decides_each_step_from_the_results_so_far(
    make_runtime: MakeRuntime,
) -> None:
    HOOK_CALLS.clear()
    spm = ScriptedSpm(pool="A", auto="success")
    rt = make_runtime(spm)
    handle = rt.submit({"pool": "A", "command_type": "copy", "command":
                        "tests.runtime.copy_then_verify", "params": {"images": ["i1", "i2"]}})
    assert handle.result(WAIT).succeeded
    assert spm.verbs() == ["copyImage", "copyImage", "verify"]
    assert spm.fired[2].params == {"after": spm.fired[1].task_id}
    assert HOOK_CALLS == [("end_step", 0), ("end_step", 1), ("end_step", 2),
                          ("end_successfully", 3)]


def test_a_raising_end_step_hook_fails_the_chain_and_reverts_without_restarting_its_actor(
    make_runtime: MakeRuntime,
) -> None:
    HOOK_CALLS.clear()
    spm = ScriptedSpm(pool="A", auto="success")
    rt = make_runtime(spm)
    handle = rt.submit({"pool": "A", "command_type": "copy", "command":
                        "tests.runtime.copy_then_verify",
                        "params": {"images": ["i1", "i2"], "fail_hook_at": 1}})
    result = handle.result(WAIT)
    assert result.outcome == ENDED_WITH_FAILURE
    assert result.reason is not None and "end_step 1 refused" in result.reason
    # Both copies succeeded on the SPM; both are reverted, newest first; verify never fires.
    assert spm.verbs() == ["copyImage", "copyImage", "deleteImage", "deleteImage"]
    assert [t.params["img"] for t in spm.fired[2:]] == ["i2", "i1"]
    assert HOOK_CALLS[-1] == ("end_with_failure", 2)
    value = rt.metrics.registry.get_sample_value(
        "spmchain_actor_restarts_total", {"kind": "command"})
    assert not value


def test_the_interpreter_settings_are_changed_while_running_and_restored_after(
    tmp_path: Any,
) -> None:
    import gc
    import sys

    from actors._store import StoreError

    gc_before, switch_before = gc.get_threshold(), sys.getswitchinterval()
    rt = Runtime([ScriptedSpm(pool="A")],
                 RuntimeOptions(gc_threshold=40_000, switch_interval_s=0.002)).start()
    try:
        assert gc.get_threshold()[0] == max(40_000, gc_before[0])
        assert sys.getswitchinterval() == pytest.approx(0.002)
    finally:
        rt.stop()
    assert gc.get_threshold() == gc_before
    assert sys.getswitchinterval() == pytest.approx(switch_before)
    # A start that fails (its store cannot be opened) leaves them as they were too.
    bad = Runtime([ScriptedSpm(pool="A")], store=f"{tmp_path}/missing-dir/s.sqlite")
    with pytest.raises(StoreError):
        bad.start()
    assert gc.get_threshold() == gc_before
    assert sys.getswitchinterval() == pytest.approx(switch_before)
    # None leaves the interpreter alone.
    rt = Runtime([ScriptedSpm(pool="A")],
                 RuntimeOptions(gc_threshold=None, switch_interval_s=None)).start()
    try:
        assert gc.get_threshold() == gc_before
        assert sys.getswitchinterval() == pytest.approx(switch_before)
    finally:
        rt.stop()


def test_overlapping_runtimes_restore_the_interpreter_settings_when_the_last_stops() -> None:
    import gc
    import socket
    import sys

    gc_before, switch_before = gc.get_threshold(), sys.getswitchinterval()
    a = Runtime([ScriptedSpm(pool="A")], RuntimeOptions(switch_interval_s=0.002)).start()
    b = Runtime([ScriptedSpm(pool="A")], RuntimeOptions(switch_interval_s=0.003)).start()
    try:
        assert sys.getswitchinterval() == pytest.approx(0.002)  # the shortest asked for
        a.stop()
        assert sys.getswitchinterval() == pytest.approx(0.002)  # b still runs
        assert gc.get_threshold()[0] >= 50_000
    finally:
        a.stop()
        b.stop()
    assert sys.getswitchinterval() == pytest.approx(switch_before)
    assert gc.get_threshold() == gc_before
    # A start that fails before the store (its metrics port is taken) restores them too.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        bad = Runtime([ScriptedSpm(pool="A")], metrics_port=port)
        with pytest.raises(OSError):
            bad.start()
    assert sys.getswitchinterval() == pytest.approx(switch_before)
    assert gc.get_threshold() == gc_before


def test_a_store_passed_to_one_runtime_after_another_tells_the_second_when_it_fails() -> None:
    store = MemoryStore()
    spm = ScriptedSpm(pool="A", auto="success")
    first = Runtime([spm], RuntimeOptions(**FAST), store=store).start()
    try:
        assert first.submit(chain("A", step("create"))).result(WAIT).succeeded
    finally:
        first.stop()
    spm = ScriptedSpm(pool="A")
    second = Runtime([spm], RuntimeOptions(**FAST), store=store).start()
    try:
        handle = second.submit(chain("A", step("create"), step("copy")))
        task = spm.wait_fired(1)[0]
        spm.wait_polls(3)
        second.flush()
        store.fail_next_commit(OSError(28, "No space left on device"))
        spm.finish(task.task_id)  # the chain records the outcome: that commit fails
        with pytest.raises(RuntimeStoppedError) as stopped:
            handle.result(WAIT)
        assert "snapshot store failed" in stopped.value.reason
        assert "No space left" in stopped.value.reason
    finally:
        second.stop()
    # A runtime given a store that has failed refuses to start, naming the failure.
    with pytest.raises(StoreError, match=r"has failed.*No space left"):
        Runtime([ScriptedSpm(pool="A")], RuntimeOptions(**FAST), store=store).start()


def test_metrics_shared_by_a_runtime_and_the_one_resuming_its_chains_count_them_once() -> None:
    store = MemoryStore()
    metrics = RuntimeMetrics()
    spm = ScriptedSpm(pool="A")
    first = Runtime([spm], RuntimeOptions(**FAST), store=store, metrics=metrics).start()
    try:
        for _ in range(3):
            first.submit(chain("A", step("create")))
        spm.wait_fired(3)
        spm.wait_polls(3)  # the chains have recorded their tasks: they resume adopting them
        assert all(s.steps[0].task_id is not None for s in first.chains())
        first.flush()
    finally:
        first.stop()
    assert metrics.registry.get_sample_value("spmchain_chains_in_flight") == 0
    second = Runtime([spm], RuntimeOptions(**FAST), store=store, metrics=metrics).start()
    try:
        assert len(second.recovered) == 3
        assert metrics.registry.get_sample_value("spmchain_chains_in_flight") == 3
        for task in spm.fired:
            spm.finish(task.task_id)
        for handle in second.recovered:
            assert handle.result(WAIT).succeeded
        assert metrics.registry.get_sample_value("spmchain_chains_in_flight") == 0
    finally:
        second.stop()
