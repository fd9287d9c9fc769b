"""Admission: how many of a pool's chains run at once, and what the waiting ones are."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from conftest import FAST, WAIT, ScriptedSpm, chain, step

from actors._admission import PoolAdmission
from actors._chain import ENDED_SUCCESSFULLY, ENDED_WITH_FAILURE
from actors._command import CommandActor
from actors._runtime import Runtime, RuntimeOptions
from spm._errors import NotSpmError

pytestmark = pytest.mark.timeout(30)

MakeRuntime = Callable[..., Runtime]


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _adm(**kw: object) -> tuple[PoolAdmission[str], _Clock]:
    clock = _Clock()
    args: dict[str, object] = {"target_s": 0.01, "initial": 4, "minimum": 2, "window_s": 0.1}
    args.update(kw)
    return PoolAdmission(clock=clock, **args), clock  # type: ignore[arg-type]


def _window(adm: PoolAdmission[str], clock: _Clock, delay: float, n: int = 10) -> list[str]:
    """``n`` samples of ``delay`` and the end of the window; what was admitted by it."""
    out: list[str] = []
    for _ in range(n - 1):
        out += adm.observe(delay)
    clock.t += adm.window_s
    out += adm.observe(delay)
    return out


# -- the pure controller -----------------------------------------------------------------------


def test_chains_beyond_the_limit_wait_and_start_in_order_as_others_end() -> None:
    adm, _ = _adm(target_s=None, maximum=2)
    assert [adm.offer(c) for c in "abcde"] == [True, True, False, False, False]
    assert adm.running == 2
    assert list(adm.waiting) == ["c", "d", "e"]
    assert adm.ended() == ["c"]
    assert adm.ended() == ["d"]
    assert adm.running == 2
    assert adm.remove("e") is True
    assert adm.remove("e") is False
    assert adm.ended() == []
    assert adm.running == 1


def test_a_new_chain_waits_behind_the_waiting_ones_even_when_a_slot_is_free() -> None:
    adm, _ = _adm(target_s=None, maximum=1)
    assert adm.offer("a") and not adm.offer("b")
    adm.enter()  # a chain that runs regardless (resumed half done)
    assert adm.running == 2
    assert adm.ended() == []  # still at the limit
    assert adm.ended() == ["b"]
    assert adm.offer("c") is False  # one runs: the limit again


def test_no_target_and_no_maximum_admits_everything() -> None:
    adm, clock = _adm(target_s=None)
    assert all(adm.offer(str(i)) for i in range(1000))
    assert _window(adm, clock, 10.0) == []
    assert adm.limit == float("inf")


def test_the_limit_shrinks_in_proportion_when_delays_pass_the_target() -> None:
    adm, clock = _adm(initial=40, minimum=2)
    for i in range(50):
        adm.offer(str(i))
    assert adm.limit == 40
    _window(adm, clock, 0.02)  # twice the target: halved
    assert adm.limit == pytest.approx(20)
    _window(adm, clock, 0.0125)  # 25 % over: 80 %
    assert adm.limit == pytest.approx(16)
    for _ in range(20):
        _window(adm, clock, 1.0)
    assert adm.limit == 2  # never below the minimum
    # Running chains are not stopped; no new one starts until enough have ended.
    assert adm.running == 40
    assert adm.ended() == []


def test_the_limit_grows_only_while_chains_wait_and_delays_stay_well_under_the_target() -> None:
    adm, clock = _adm(initial=4, maximum=100)
    for i in range(4):
        assert adm.offer(str(i))
    # Nothing waits: the limit is not what bounds anything; it does not grow.
    _window(adm, clock, 0.001)
    assert adm.limit == 4
    for i in range(4, 200):
        adm.offer(str(i))
    admitted = _window(adm, clock, 0.001)  # under half the target: doubles (+1)
    assert adm.limit == pytest.approx(9)
    assert admitted == ["4", "5", "6", "7", "8"]
    _window(adm, clock, 0.007)  # between half and 80 %: +5 % (+1)
    assert adm.limit == pytest.approx(10.45)
    assert adm.running == 11  # while fewer run than the limit (10.45), one more starts
    _window(adm, clock, 0.009)  # close to the target: holds
    assert adm.limit == pytest.approx(10.45)
    for _ in range(3):  # requests wait for SPM slots: more chains would only queue there
        for _ in range(9):
            adm.observe(0.0, idle=False)
        clock.t += adm.window_s
        adm.observe(0.0, idle=False)
    assert adm.limit == pytest.approx(10.45)
    for _ in range(50):
        _window(adm, clock, 0.0)
    assert adm.limit == 100  # never above the maximum
    assert adm.running == 100


def test_a_window_with_too_few_samples_never_shrinks_and_grows_only_if_they_are_small() -> None:
    adm, clock = _adm(initial=10)
    for i in range(40):
        adm.offer(str(i))
    _window(adm, clock, 1.0, n=3)
    assert adm.limit == 10
    _window(adm, clock, 0.001, n=3)
    assert adm.limit == 21


# -- in the runtime ----------------------------------------------------------------------------


def _fixed(limit: int) -> dict[str, object]:
    return {"admission_target_s": None, "max_running": limit}


def test_at_most_max_running_chains_of_a_pool_run_the_rest_wait_unstarted(
    make_runtime: MakeRuntime,
) -> None:
    spm = ScriptedSpm(pool="A")
    rt = make_runtime(spm, **_fixed(2))
    handles = [rt.submit(chain("A", step("create", params={"n": i}))) for i in range(5)]
    fired = spm.wait_fired(2)
    spm.wait_polls(3)
    assert len(spm.fired) == 2  # the other three wait
    phases = sorted(s.phase for s in rt.chains())
    assert phases == ["new", "new", "new", "running", "running"]
    assert [dict(t.params)["n"] for t in fired] == [0, 1]
    for k in range(5):
        spm.finish(spm.wait_fired(k + 1)[k].task_id)
        assert handles[k].result(WAIT).outcome == ENDED_SUCCESSFULLY
    # Started in the order submitted, never more than two at once.
    assert [dict(t.params)["n"] for t in spm.fired] == [0, 1, 2, 3, 4]
    text = rt.metrics.registry.get_sample_value("spmchain_chains_waiting", {"pool": "A"})
    assert text == 0


def test_cancelling_a_waiting_chain_ends_it_with_failure_without_firing_anything(
    make_runtime: MakeRuntime,
) -> None:
    spm = ScriptedSpm(pool="A")
    rt = make_runtime(spm, **_fixed(1))
    first = rt.submit(chain("A", step("create", "delete")))
    waiting = rt.submit(chain("A", step("copy", "uncopy")))
    spm.wait_fired(1)
    assert waiting.cancel("not needed any more") is True
    result = waiting.result(WAIT)
    assert result.outcome == ENDED_WITH_FAILURE
    assert result.reason == "not needed any more"
    assert spm.verbs() == ["create"]  # nothing fired for it, nothing to revert
    spm.finish(spm.fired[0].task_id)
    assert first.result(WAIT).outcome == ENDED_SUCCESSFULLY
    assert spm.verbs() == ["create"]
    assert waiting.cancel() is False


def test_waiting_chains_are_recorded_and_start_after_a_restart(tmp_path: object) -> None:
    path = f"{tmp_path}/snapshots.sqlite"
    spm = ScriptedSpm(pool="A")
    rt = Runtime([spm], RuntimeOptions(**{**FAST, **_fixed(1)}), store=path).start()
    try:
        rt.submit(chain("A", step("create", params={"n": 0}), chain_id="c0"))
        rt.submit(chain("A", step("create", params={"n": 1}), chain_id="c1"))
        spm.wait_fired(1)
        rt.flush()
    finally:
        rt.stop()
    assert len(spm.fired) == 1
    rt = Runtime([spm], RuntimeOptions(**FAST), store=path).start()
    try:
        by_id = {h.chain_id: h for h in rt.recovered}
        assert set(by_id) == {"c0", "c1"}
        spm.expect(lambda: len(spm.fired) == 2, "the waiting chain fired after the restart")
        for t in list(spm.fired):
            spm.finish(t.task_id)
        assert by_id["c0"].result(WAIT).outcome == ENDED_SUCCESSFULLY
        assert by_id["c1"].result(WAIT).outcome == ENDED_SUCCESSFULLY
        assert [dict(t.params)["n"] for t in spm.fired] == [0, 1]
    finally:
        rt.stop()


def test_admission_is_per_pool_a_full_pool_does_not_hold_another_back(
    make_runtime: MakeRuntime,
) -> None:
    a, b = ScriptedSpm(pool="A"), ScriptedSpm(pool="B")
    rt = make_runtime(a, b, **_fixed(1))
    for i in range(3):
        rt.submit(chain("A", step("create", params={"n": i})))
    hb = rt.submit(chain("B", step("create")))
    b.finish(b.wait_fired(1)[0].task_id)
    assert hb.result(WAIT).outcome == ENDED_SUCCESSFULLY
    assert len(a.fired) == 1
    assert rt.metrics.registry.get_sample_value("spmchain_chains_waiting", {"pool": "A"}) == 2
    assert rt.metrics.registry.get_sample_value(
        "spmchain_chains_running_limit", {"pool": "A"}) == 1


def test_a_window_without_enough_samples_grows_a_binding_limit_when_nothing_waits_for_the_spm(
) -> None:
    adm, clock = _adm(initial=4, maximum=10)
    for i in range(20):
        adm.offer(str(i))
    assert adm.tick(idle=True) == []  # the window is not over yet
    clock.t += adm.window_s
    assert adm.tick(idle=True) == ["4", "5", "6", "7", "8"]  # 4 * 2 + 1 = 9
    clock.t += adm.window_s
    assert adm.tick(idle=False) == []  # requests wait for SPM slots: no reason to add chains
    assert adm.limit == 9
    for _ in range(10):
        clock.t += adm.window_s
        adm.tick(idle=True)
    assert adm.limit == 10 and adm.running == 10


def test_long_tasks_do_not_keep_a_pool_at_its_initial_limit(make_runtime: MakeRuntime) -> None:
    # Tasks that never end while the test looks: few fires, hence few samples. The pool must
    # still start every chain (ticks of the poller end the windows).
    spm = ScriptedSpm(pool="A")
    rt = make_runtime(spm, max_outstanding=100)
    for i in range(30):
        rt.submit(chain("A", step("create", params={"n": i})))
    spm.wait_fired(30, timeout=WAIT)
    assert rt.metrics.registry.get_sample_value("spmchain_chains_waiting", {"pool": "A"}) == 0


def test_adapting_a_pool_never_runs_more_chains_than_it_may_have_tasks_outstanding(
    make_runtime: MakeRuntime,
) -> None:
    spm = ScriptedSpm(pool="A")
    rt = make_runtime(spm, max_outstanding=6)
    for i in range(20):
        rt.submit(chain("A", step("create", params={"n": i})))
    spm.wait_fired(6)
    spm.wait_polls(40)  # many admission windows, all with nothing to slow anything down
    state = rt.admission()["A"]
    assert state.limit == 6 and state.running == 6 and state.waiting == 14
    assert len(spm.fired) == 6


def test_a_command_whose_constructor_raises_is_refused_at_submit_and_holds_no_place(
    make_runtime: MakeRuntime,
) -> None:
    from actors._spec import ChainSpec, ChainSpecError, Command, register_command

    @register_command("tests.admission.broken")
    class Broken(Command):
        def __init__(self, params: object) -> None:
            raise RuntimeError("no such image")

        def next_step(self, results: object) -> None:  # type: ignore[override]
            return None

    spm = ScriptedSpm(pool="A")
    rt = make_runtime(spm, **_fixed(1))
    with pytest.raises(ChainSpecError, match=r"command.*no such image"):
        rt.submit(ChainSpec(pool="A", command_type="broken", command="tests.admission.broken"))
    assert rt.chains() == []
    assert rt.admission()["A"].running == 0
    handle = rt.submit(chain("A", step("create")))
    spm.finish(spm.wait_fired(1)[0].task_id)
    assert handle.result(WAIT).outcome == ENDED_SUCCESSFULLY


def test_a_chain_whose_deadline_passes_while_it_waits_ends_with_failure_firing_nothing(
    make_runtime: MakeRuntime,
) -> None:
    spm = ScriptedSpm(pool="A")
    rt = make_runtime(spm, **_fixed(1))
    first = rt.submit(chain("A", step("create")))
    late = rt.submit(chain("A", step("copy", "uncopy"), deadline_s=0.05))
    spm.wait_fired(1)
    result = late.result(WAIT)  # ends while the first chain still holds the only place
    assert result.outcome == ENDED_WITH_FAILURE
    assert result.reason is not None and "deadline" in result.reason
    assert spm.verbs() == ["create"]
    assert not first.done()
    spm.finish(spm.fired[0].task_id)
    assert first.result(WAIT).outcome == ENDED_SUCCESSFULLY
    assert spm.verbs() == ["create"]


def test_a_waiting_chain_past_its_deadline_ends_even_while_the_spm_cannot_be_polled(
    make_runtime: MakeRuntime,
) -> None:
    spm = ScriptedSpm(pool="A")
    rt = make_runtime(spm, **_fixed(1))
    first = rt.submit(chain("A", step("create")))
    spm.wait_fired(1)
    spm.poll_error = NotSpmError()  # the host lost the SPM role: every poll fails
    spm.wait_polls(2)
    late = rt.submit(chain("A", step("copy", "uncopy"), deadline_s=0.05))
    result = late.result(WAIT)
    assert result.outcome == ENDED_WITH_FAILURE
    assert result.reason is not None and "deadline" in result.reason
    assert not first.done()
    spm.poll_error = None
    spm.finish(spm.fired[0].task_id)
    assert first.result(WAIT).outcome == ENDED_SUCCESSFULLY
    assert spm.verbs() == ["create"]


def test_a_cancel_while_a_chain_is_being_queued_ends_it_without_waiting_for_a_place(
    make_runtime: MakeRuntime, monkeypatch: pytest.MonkeyPatch,
) -> None:
    spm = ScriptedSpm(pool="A")
    rt = make_runtime(spm, **_fixed(1))
    first = rt.submit(chain("A", step("create")))
    spm.wait_fired(1)
    real_offer = PoolAdmission.offer
    told: list[bool] = []

    def offer_after_a_cancel(self: PoolAdmission[Any], item: Any, deadline: Any = None) -> Any:
        if item.chain_id == "victim":  # another thread's cancel lands just before the queue
            told.append(rt.cancel(item.chain_id, "cancelled by user"))
        return real_offer(self, item, deadline)

    monkeypatch.setattr(PoolAdmission, "offer", offer_after_a_cancel)
    victim = rt.submit(chain("A", step("copy"), chain_id="victim"))
    assert told == [True]
    result = victim.result(WAIT)  # while the first chain still holds the only place
    assert result.outcome == ENDED_WITH_FAILURE and result.reason == "cancelled by user"
    assert not first.done()
    assert rt.admission()["A"].waiting == 0
    assert spm.verbs() == ["create"]


def test_a_cancel_told_as_a_chain_starts_ends_it_once(
    make_runtime: MakeRuntime, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The Cancel arrives as soon as the chain's actor is published, before its on_start
    could run: the chain ends once (one result, one done callback, one count)."""
    spm = ScriptedSpm(pool="A")
    rt = make_runtime(spm)
    ends: list[str] = []
    rt.add_done_callback(lambda result: ends.append(result.chain_id))
    refs: list[Any] = []
    real_start_with = CommandActor.start_with.__func__  # type: ignore[attr-defined]

    def start_with_a_cancel(cls: Any, before: Any, *args: Any, **kwargs: Any) -> Any:
        def publish_then_cancel(ref: Any) -> None:
            before(ref)
            refs.append(ref)
            rt.cancel(args[2].chain_id, "cancelled by user")  # told in that very moment

        return real_start_with(cls, publish_then_cancel, *args, **kwargs)

    monkeypatch.setattr(CommandActor, "start_with", classmethod(start_with_a_cancel))
    handle = rt.submit(chain("A", step("create"), chain_id="once"))
    result = handle.result(WAIT)
    assert result.outcome == ENDED_WITH_FAILURE and result.reason == "cancelled by user"
    assert refs[0].actor_stopped.wait(WAIT)  # every turn it had is over
    assert ends == ["once"]
    ended = rt.metrics.registry.get_sample_value(
        "spmchain_chains_ended_total",
        {"outcome": ENDED_WITH_FAILURE, "command_type": "test"})
    assert ended == 1
    assert spm.fired == []


def test_a_store_passed_in_serves_one_runtime_after_another(tmp_path: object) -> None:
    from actors._store_memory import MemoryStore

    store = MemoryStore()
    try:
        for n in range(2):
            spm = ScriptedSpm(pool="A", auto="success")
            rt = Runtime([spm], RuntimeOptions(**FAST), store=store).start()
            try:
                handle = rt.submit(chain("A", step("create"), step("copy"), chain_id=f"c{n}"))
                assert handle.result(WAIT).outcome == ENDED_SUCCESSFULLY
            finally:
                rt.stop()
        assert store._after_durable == []  # each runtime took its hook back
    finally:
        store.close()


def test_the_deadline_queue_keeps_no_chain_that_stopped_waiting() -> None:
    import gc
    import weakref

    class Chain:
        pass

    adm: PoolAdmission[Chain] = PoolAdmission(target_s=None, maximum=1)
    first = Chain()
    assert adm.offer(first, deadline=1e12)
    chains = [Chain() for _ in range(5000)]
    refs = [weakref.ref(c) for c in chains]
    for c in chains:
        assert not adm.offer(c, deadline=1e12)
    del c
    for _ in range(5000):
        admitted = adm.ended()
        assert len(admitted) == 1
    del chains, admitted
    gc.collect()
    # Every chain was admitted (and dropped by the caller): none is kept for its deadline.
    assert all(r() is None for r in refs)
    assert adm._deadlines == []  # nothing waits: not even the husks are kept


def test_expired_hands_back_only_chains_still_waiting_in_deadline_order() -> None:
    adm, _ = _adm(target_s=None, maximum=1)
    assert adm.offer("run", deadline=5.0)
    for name, deadline in (("a", 30.0), ("b", 10.0), ("c", 20.0), ("d", None)):
        adm.offer(name, deadline=deadline)
    assert adm.remove("c")
    assert adm.expired(9.0) == []
    assert adm.expired(25.0) == ["b"]  # c was removed
    assert list(adm.waiting) == ["a", "d"]
    assert adm.ended() == []  # b counts as running now: the limit (1) is still taken
    assert adm.running == 2 - 1
    assert adm.expired(100.0) == ["a"]
    assert list(adm.waiting) == ["d"]
