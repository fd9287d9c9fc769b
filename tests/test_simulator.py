"""The simulated SPM: VDSM's task states, queue, workers, locks, task verbs and the SPM role.

Every test drives the simulator with a fake clock: time moves only when the test moves it, and
the simulator advances to it on the next call, so nothing here sleeps.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from spm._client import TaskStatus
from spm._errors import (
    GenericError,
    IllegalTransitionError,
    NotSpmError,
    ResourceTimeoutError,
    SpmError,
    TaskNotFinishedError,
    TaskStateError,
    UnknownTaskError,
)
from spm._simstate import ALL_STATES, DONE, MOVE_TO, WIRE_RESULT, WIRE_STATE, is_legal, move
from spm._simulator import (
    ABORTED_MESSAGE,
    SimulatedSpm,
    TaskQueueFullError,
    parse_duration,
)
from spm._verbs import image_resource

POOL = "pool-1"
SD = "sd-1"
SD2 = "sd-2"


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def to(self, t: float) -> None:
        self.t = t


def make(clock: FakeClock, **kwargs: Any) -> SimulatedSpm:
    kwargs.setdefault("pool", POOL)
    return SimulatedSpm(clock=clock, **kwargs)


def create(img: str, vol: str, sd: str = SD, **extra: Any) -> dict[str, Any]:
    return {"sdUUID": sd, "spUUID": POOL, "imgUUID": img, "volUUID": vol, "size": 1 << 30,
            "volFormat": 4, "preallocate": 2, "diskType": "DATA", "desc": "", **extra}


def copy(src_img: str, src_vol: str, dst_img: str, dst_vol: str, **extra: Any) -> dict[str, Any]:
    return {"sdUUID": SD, "spUUID": POOL, "srcImgUUID": src_img, "srcVolUUID": src_vol,
            "dstImgUUID": dst_img, "dstVolUUID": dst_vol, **extra}


def image(img: str, sd: str = SD) -> dict[str, Any]:
    return {"sdUUID": sd, "spUUID": POOL, "imgUUID": img}


def two_domains(img: str, **extra: Any) -> dict[str, Any]:
    return {"spUUID": POOL, "sdUUID": SD, "imgUUID": img, "dstSdUUID": SD2, **extra}


def status(spm: SimulatedSpm, tid: str) -> tuple[str, str, int, str]:
    s = spm.getTaskStatus(tid)
    return (s["taskState"], s["taskResult"], s["code"], s["message"])


SUCCESS = ("finished", "success", 0, "1 jobs completed successfully")


# ------------------------------------------------------------------------------------------------
# VDSM's state table and wire mapping
# ------------------------------------------------------------------------------------------------

LEGAL = sorted((src, dst) for dst, sources in MOVE_TO.items() for src in sources)
ILLEGAL = sorted((src, dst) for src in ALL_STATES for dst in ALL_STATES
                 if src not in MOVE_TO[dst])


def test_state_table_is_vdsms() -> None:
    # VDSM task.py State._moveto, transcribed: target <- sources.
    expected = {
        "unknown": set(), "init": set(),
        "preparing": {"init", "blocked"},
        "blocked": {"preparing"},
        "acquiring": {"preparing", "acquiring"},
        "queued": {"acquiring", "running"},
        "running": {"queued"},
        "finished": {"running", "preparing"},
        "aborting": {"preparing", "blocked", "acquiring", "queued", "running"},
        "waitrecover": {"aborting"},
        "racquiring": {"aborting", "finished", "racquiring", "waitrecover"},
        "recovering": {"racquiring"},
        "raborting": {"racquiring", "recovering", "waitrecover"},
        "recovered": {"recovering"},
        "failed": {"recovering", "aborting", "raborting"},
    }
    assert {k: set(v) for k, v in MOVE_TO.items()} == expected
    assert set(DONE) == {"finished", "recovered", "failed"}


@pytest.mark.parametrize(("src", "dst"), LEGAL)
def test_every_legal_transition_is_accepted(src: str, dst: Any) -> None:
    assert is_legal(src, dst)
    assert move(src, dst) == dst


@pytest.mark.parametrize(("src", "dst"), ILLEGAL)
def test_every_illegal_transition_raises_441(src: str, dst: Any) -> None:
    assert not is_legal(src, dst)
    with pytest.raises(IllegalTransitionError) as err:
        move(src, dst)
    assert err.value.code == 441
    assert f"from {src} to {dst}" in err.value.message


WIRE = {
    "unknown": ("unknown", ""),
    "init": ("init", ""),
    "preparing": ("running", ""),
    "blocked": ("running", ""),
    "acquiring": ("running", ""),
    "queued": ("running", ""),
    "running": ("running", ""),
    "finished": ("finished", "success"),
    "aborting": ("aborting", ""),
    "waitrecover": ("cleaning", ""),
    "recovering": ("cleaning", ""),
    "racquiring": ("cleaning", ""),
    "raborting": ("aborting", ""),
    "recovered": ("finished", "cleanSuccess"),
    "failed": ("finished", "cleanFailure"),
}


@pytest.mark.parametrize(("state", "wire"), sorted(WIRE.items()))
def test_wire_mapping_of_every_internal_state(state: Any, wire: tuple[str, str]) -> None:
    assert (WIRE_STATE[state], WIRE_RESULT[state]) == wire


def test_wire_mapping_covers_exactly_the_fifteen_states() -> None:
    assert len(ALL_STATES) == 15
    assert set(WIRE_STATE) == set(WIRE_RESULT) == set(ALL_STATES) == set(MOVE_TO)


# ------------------------------------------------------------------------------------------------
# Life of a task
# ------------------------------------------------------------------------------------------------


def test_task_runs_for_its_duration_then_finishes_with_vdsms_success_status() -> None:
    clock = FakeClock()
    spm = make(clock, durations=5.0)
    tid = spm.fire("createVolume", create("img-1", "vol-1"))
    assert uuid.UUID(tid).version == 4
    assert status(spm, tid) == ("running", "", 0, "running job 1 of 1")
    assert spm.internal_state(tid) == "running"
    clock.to(4.999)
    assert spm.getAllTasksStatuses()[tid]["taskState"] == "running"
    clock.to(5.0)
    assert status(spm, tid) == SUCCESS
    assert spm.internal_state(tid) == "finished"
    params = create("img-1", "vol-1")
    assert spm.getAllTasksInfo() == {tid: {"id": tid, "verb": "createVolume", "params": params}}


def test_zero_duration_task_is_finished_at_the_next_call() -> None:
    spm = make(FakeClock())
    tid = spm.fire("createVolume", create("img-1", "vol-1"))
    assert status(spm, tid) == SUCCESS


def test_queued_task_reports_running_with_the_initializing_message() -> None:
    clock = FakeClock()
    spm = make(clock, workers=1, durations=1.0)
    spm.fire("createVolume", create("img-1", "vol-1"))
    tid = spm.fire("createVolume", create("img-2", "vol-1"))
    assert spm.internal_state(tid) == "queued"
    assert status(spm, tid) == ("running", "", 0, "Task is initializing")


def test_status_dicts_are_cached_but_each_poll_returns_a_new_outer_dict() -> None:
    clock = FakeClock()
    spm = make(clock, durations=1.0)
    tid = spm.fire("createVolume", create("img-1", "vol-1"))
    first = spm.getAllTasksStatuses()
    second = spm.getAllTasksStatuses()
    assert first == second and first is not second
    assert first[tid] is second[tid]  # unchanged status: not rebuilt
    clock.to(1.0)
    third = spm.getAllTasksStatuses()
    assert third[tid] is not first[tid] and third[tid]["taskState"] == "finished"
    info1, info2 = spm.getAllTasksInfo(), spm.getAllTasksInfo()
    assert info1 == info2 and info1 is not info2


# ------------------------------------------------------------------------------------------------
# fire() refuses bad input and creates no task
# ------------------------------------------------------------------------------------------------

BAD_FIRES: list[tuple[str, Any, int, str]] = [
    ("resizeVolume", create("i", "v"), 100, "resizeVolume"),
    ("createVolume", {k: v for k, v in create("i", "v").items() if k != "imgUUID"}, 1000,
     "imgUUID"),
    ("createVolume", create("i", "v", volUUID=5), 1000, "volUUID"),
    ("createVolume", create("i", "v", volUUID=""), 1000, "volUUID"),
    ("createVolume", create("i", "v", size="big"), 1000, "size"),
    ("createVolume", create("i", "v", colour="red"), 1000, "colour"),
    ("createVolume", create("i", "v", spUUID="pool-9"), 309, "pool-9"),
    ("createVolume", ["not", "a", "mapping"], 1000, "params"),
    ("deleteVolume", image("i"), 1000, "volumes"),
    ("deleteVolume", {**image("i"), "volumes": []}, 1000, "volumes"),
    ("deleteVolume", {**image("i"), "volumes": ["v"], "volUUID": "v"}, 1000, "volUUID"),
    ("deleteVolume", {**image("i"), "volumes": ["v"], "postZero": "maybe"}, 1000, "postZero"),
    ("copyImage", copy("i", "v", "i", "v2"), 1000, "dstImgUUID"),
    ("copyImage", {k: v for k, v in copy("i", "v", "j", "w").items() if k != "srcVolUUID"},
     1000, "srcVolUUID"),
    ("deleteImage", image("missing"), 268, "image=missing, domain=sd-1"),
    ("cloneImageStructure", {**two_domains("i"), "dstSdUUID": SD}, 1000, "dstSdUUID"),
    ("cloneImageStructure", {k: v for k, v in two_domains("i").items() if k != "dstSdUUID"},
     1000, "dstSdUUID"),
    ("syncImageData", two_domains("i", syncType=7), 1000, "syncType"),
]


@pytest.mark.parametrize(("verb", "params", "code", "named"), BAD_FIRES)
def test_fire_refuses_bad_input_naming_it_and_creates_no_task(
    verb: str, params: Any, code: int, named: str
) -> None:
    spm = make(FakeClock())
    with pytest.raises(SpmError) as err:
        spm.fire(verb, params)
    assert err.value.code == code
    assert named in err.value.message
    assert spm.getAllTasksStatuses() == {}
    assert spm.stats().tasks_fired == 0


def test_unknown_verb_is_a_generic_error() -> None:
    spm = make(FakeClock())
    with pytest.raises(GenericError, match="known: cloneImageStructure"):
        spm.fire("moveImage", image("i"))


def test_optional_parameters_may_be_none_or_vdsm_strings() -> None:
    spm = make(FakeClock())
    tid = spm.fire("createVolume", create("i", "v", initialSize=None, size="1073741824",
                                          srcImgUUID="00000000-0000-0000-0000-000000000000",
                                          legal="true"))
    assert status(spm, tid) == SUCCESS


# ------------------------------------------------------------------------------------------------
# Storage errors of each verb: the job fails, rolls back, and reports VDSM's code and message
# ------------------------------------------------------------------------------------------------


def _setup_volume(spm: SimulatedSpm, img: str = "img-1", vol: str = "vol-1") -> None:
    tid = spm.fire("createVolume", create(img, vol))
    assert status(spm, tid) == SUCCESS


def _setup_two_images(spm: SimulatedSpm) -> None:
    _setup_volume(spm)
    _setup_volume(spm, "img-2", "vol-2")


def _setup_both_domains(spm: SimulatedSpm) -> None:
    _setup_volume(spm)
    assert status(spm, spm.fire("createVolume", create("img-1", "vol-1", sd=SD2))) == SUCCESS


JOB_ERRORS: list[tuple[str, Callable[[SimulatedSpm], None], str, dict[str, Any], int, str]] = [
    ("create existing volume", _setup_volume, "createVolume", create("img-1", "vol-1"), 212,
     "value=Volume already exists: ('vol-1',) abortedcode=212"),
    ("create on a missing parent", lambda spm: None, "createVolume",
     create("img-1", "vol-2", srcVolUUID="vol-1"), 201,
     "value=Volume does not exist: ('vol-1',) abortedcode=201"),
    ("copy from a missing volume", lambda spm: None, "copyImage",
     copy("img-1", "vol-1", "img-2", "vol-2"), 201,
     "value=Volume does not exist: ('vol-1',) abortedcode=201"),
    ("copy onto an existing volume", _setup_two_images, "copyImage",
     copy("img-1", "vol-1", "img-2", "vol-2"), 212,
     "value=Volume already exists: ('vol-2',) abortedcode=212"),
    ("delete a missing volume", _setup_volume, "deleteVolume",
     {**image("img-1"), "volumes": ["vol-9"]}, 201,
     "value=Volume does not exist: ('vol-9',) abortedcode=201"),
    ("clone a missing image", lambda spm: None, "cloneImageStructure", two_domains("img-1"), 268,
     "value=Image does not exist in domain: 'image=img-1, domain=sd-1' abortedcode=268"),
    ("clone onto an existing volume", _setup_both_domains,
     "cloneImageStructure", two_domains("img-1"), 212,
     "value=Volume already exists: ('vol-1',) abortedcode=212"),
    ("sync a missing source", lambda spm: None, "syncImageData", two_domains("img-1"), 268,
     "value=Image does not exist in domain: 'image=img-1, domain=sd-1' abortedcode=268"),
    ("sync to a missing destination", _setup_volume, "syncImageData", two_domains("img-1"), 268,
     "value=Image does not exist in domain: 'image=img-1, domain=sd-2' abortedcode=268"),
]


@pytest.mark.parametrize(("case", "setup", "verb", "params", "code", "message"), JOB_ERRORS,
                         ids=[c[0] for c in JOB_ERRORS])
def test_failed_precondition_fails_the_job_with_vdsms_code_and_message(
    case: str, setup: Callable[[SimulatedSpm], None], verb: str, params: dict[str, Any],
    code: int, message: str,
) -> None:
    spm = make(FakeClock())
    setup(spm)
    before = {o.key for o in spm.objects()}
    tid = spm.fire(verb, params)
    assert status(spm, tid) == ("finished", "cleanSuccess", code, message)
    assert spm.internal_state(tid) == "recovered"
    assert {o.key for o in spm.objects()} == before


def test_failed_precondition_fails_at_once_not_after_the_jobs_duration() -> None:
    clock = FakeClock()
    spm = make(clock, durations={"copyImage": 100.0})
    tid = spm.fire("copyImage", copy("img-1", "vol-1", "img-2", "vol-2"))
    assert status(spm, tid)[:3] == ("finished", "cleanSuccess", 201)
    assert spm.stats().worker_busy_seconds == 0.0


INJECTED = [
    ("createVolume", create("img-9", "vol-9"), 205, "Error creating a new volume"),
    ("deleteVolume", {**image("img-1"), "volumes": ["vol-1"]}, 222, "Volume deletion error"),
    ("copyImage", copy("img-1", "vol-1", "img-2", "vol-2"), 261, "low level Image copy failed"),
    # With postZero the job does the removal; without, the call did it (test_simulator_ledger).
    ("deleteImage", {**image("img-1"), "postZero": True}, 256,
     "Could not remove all image's volumes"),
    ("cloneImageStructure", two_domains("img-1"), 250, "Error images action"),
    ("syncImageData", two_domains("img-1"), 261, "low level Image copy failed"),
]


@pytest.mark.parametrize(("verb", "params", "code", "text"), INJECTED,
                         ids=[c[0] for c in INJECTED])
def test_injected_failure_fails_the_job_with_a_storage_error_and_leaves_no_effect(
    verb: str, params: dict[str, Any], code: int, text: str
) -> None:
    spm = make(FakeClock(), failure_rates={verb: 1.0})
    if verb != "createVolume":  # createVolume itself fails here; the others need a volume
        _setup_volume(spm)
    if verb == "syncImageData":
        assert status(spm, spm.fire("cloneImageStructure", two_domains("img-1"))) == SUCCESS
    before = spm.objects()
    tid = spm.fire(verb, params)
    state, result, got_code, message = status(spm, tid)
    assert (state, result, got_code) == ("finished", "cleanSuccess", code)
    assert message.startswith(f"value={text}: (") and message.endswith(f"abortedcode={code}")
    assert spm.objects() == before
    assert spm.stats().tasks_failed == 1


# ------------------------------------------------------------------------------------------------
# Workers and the queue
# ------------------------------------------------------------------------------------------------


def test_full_queue_refuses_the_verb_with_405_and_creates_no_task() -> None:
    spm = make(FakeClock(), workers=1, queue_size=2, durations=10.0)
    ids = [spm.fire("createVolume", create(f"img-{i}", "vol")) for i in range(3)]
    with pytest.raises(TaskQueueFullError) as err:
        spm.fire("createVolume", create("img-3", "vol"))
    assert err.value.code == 405
    assert "queue is full" in err.value.message
    assert sorted(spm.getAllTasksStatuses()) == sorted(ids)
    stats = spm.stats()
    assert (stats.tasks_fired, stats.tasks_refused_queue_full, stats.queued) == (3, 1, 2)


def test_queued_tasks_start_in_fifo_order_as_workers_free() -> None:
    clock = FakeClock()
    spm = make(clock, workers=1, durations=1.0)
    ids = [spm.fire("createVolume", create(f"img-{i}", "vol")) for i in range(4)]
    for step in range(4):
        clock.to(step + 0.5)
        states = [spm.internal_state(t) for t in ids]
        assert states == ["finished"] * step + ["running"] + ["queued"] * (3 - step)


def test_no_more_tasks_run_than_workers_and_each_starts_when_a_worker_frees() -> None:
    clock = FakeClock()
    spm = make(clock, workers=3, durations=1.0)
    ids = [spm.fire("createVolume", create(f"img-{i}", "vol")) for i in range(10)]
    assert [spm.internal_state(t) for t in ids].count("running") == 3
    # Observe only once, long after: the workers must have run continuously meanwhile.
    clock.to(100.0)
    assert all(spm.getAllTasksStatuses()[t]["taskResult"] == "success" for t in ids)
    made = sorted(o.created_at for o in spm.objects() if o.kind == "volume")
    assert made == [1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 3.0, 3.0, 3.0, 4.0]
    stats = spm.stats()
    assert stats.max_running == 3
    assert stats.max_unfinished == 10
    assert stats.worker_busy_seconds == pytest.approx(10.0)
    assert stats.utilization == pytest.approx(10.0 / (3 * 100.0))


def test_hundred_thousand_queued_tasks_cost_memory_only_and_no_thread() -> None:
    clock = FakeClock()
    threads = threading.active_count()
    spm = make(clock, workers=10, queue_size=100_000, durations=1.0)
    for i in range(100_010):
        spm.fire("createVolume", create(f"img-{i}", "vol"))
    assert threading.active_count() == threads
    stats = spm.stats()
    assert (stats.running, stats.queued, stats.max_unfinished) == (10, 100_000, 100_010)
    with pytest.raises(TaskQueueFullError):
        spm.fire("createVolume", create("one-more", "vol"))
    clock.to(10_001.0)
    stats = spm.stats()
    assert (stats.tasks_succeeded, stats.unfinished, stats.queued) == (100_010, 0, 0)
    assert threading.active_count() == threads


def test_fire_poll_clear_stays_cheap_with_thousands_of_tasks_known() -> None:
    # The floor is far below the rate measured on this kind of machine (~35-50k steps/s): it
    # catches a per-call cost that grows with the number of tasks, not a slow machine.
    spm = make(FakeClock(), queue_size=20_000)
    for i in range(5_000):
        spm.fire("createVolume", create(f"known-{i}", "vol"))  # finished and never cleared
    steps = 5_000
    start = time.perf_counter()
    pending: list[str] = []
    for i in range(steps):
        pending.append(spm.fire("createVolume", create(f"img-{i}", "vol")))
        if len(pending) == 20:
            statuses = spm.getAllTasksStatuses()
            for tid in pending:
                assert statuses[tid]["taskResult"] == "success"
                spm.clearTask(tid)
            pending.clear()
    rate = steps / (time.perf_counter() - start)
    assert len(spm.getAllTasksStatuses()) == 5_000
    assert rate > 4_000, f"{rate:.0f} steps/s"


# ------------------------------------------------------------------------------------------------
# Resource locks
# ------------------------------------------------------------------------------------------------


def test_job_waits_for_an_exclusive_lock_holding_its_worker() -> None:
    clock = FakeClock()
    spm = make(clock, workers=2, durations={"copyImage": 2.0, "createVolume": 1.0})
    spm.fire("createVolume", create("img-1", "vol-1"))
    clock.to(1.0)
    copier = spm.fire("copyImage", copy("img-1", "vol-1", "img-2", "vol-2"))
    waiter = spm.fire("createVolume", create("img-2", "vol-3"))
    assert spm.lock_wait(waiter) == image_resource(SD, "img-2")
    assert spm.internal_state(waiter) == "running"
    assert spm.stats().running == 2
    third = spm.fire("createVolume", create("img-3", "vol"))
    assert spm.internal_state(third) == "queued"  # both workers are held
    clock.to(3.0)
    assert status(spm, copier) == SUCCESS
    assert spm.lock_wait(waiter) is None
    assert spm.internal_state(third) == "running"  # started when the copy freed its worker
    clock.to(4.0)
    assert status(spm, waiter) == SUCCESS
    assert status(spm, third) == SUCCESS
    stats = spm.stats()
    assert (stats.lock_waits, stats.exclusive_overlaps) == (1, 1)
    assert stats.worker_busy_seconds == pytest.approx(1.0 + 2.0 + 3.0 + 1.0)


def test_shared_locks_on_a_source_image_do_not_wait() -> None:
    clock = FakeClock()
    spm = make(clock, durations={"copyImage": 2.0})
    _setup_volume(spm)
    a = spm.fire("copyImage", copy("img-1", "vol-1", "img-2", "vol-2"))
    b = spm.fire("copyImage", copy("img-1", "vol-1", "img-3", "vol-3"))
    clock.to(2.0)
    assert status(spm, a) == status(spm, b) == SUCCESS
    stats = spm.stats()
    assert (stats.lock_waits, stats.exclusive_overlaps) == (0, 0)


def test_waiting_jobs_take_a_lock_in_fifo_order() -> None:
    clock = FakeClock()
    spm = make(clock, workers=4, durations=1.0)
    ids = [spm.fire("createVolume", create("img-1", f"vol-{i}")) for i in range(4)]
    clock.to(100.0)
    made = {o.vol_uuid: o.created_at for o in spm.objects() if o.kind == "volume"}
    assert made == {"vol-0": 1.0, "vol-1": 2.0, "vol-2": 3.0, "vol-3": 4.0}
    assert spm.stats().lock_waits == 3
    assert all(status(spm, t) == SUCCESS for t in ids)


def test_lock_wait_past_resource_timeout_fails_the_job_with_851() -> None:
    clock = FakeClock()
    spm = make(clock, durations=10.0, resource_timeout=5.0)
    holder = spm.fire("createVolume", create("img-1", "vol-1"))
    waiter = spm.fire("createVolume", create("img-1", "vol-2"))
    clock.to(5.0)
    state, result, code, message = status(spm, waiter)
    assert (state, result, code) == ("finished", "cleanSuccess", ResourceTimeoutError.code)
    assert message.startswith("value=Resource timeout: (") and message.endswith("abortedcode=851")
    clock.to(10.0)
    assert status(spm, holder) == SUCCESS
    assert [o.vol_uuid for o in spm.objects() if o.kind == "volume"] == ["vol-1"]
    assert spm.stats().lock_timeouts == 1


def test_exclusive_overlaps_count_only_steps_that_were_not_serialised() -> None:
    clock = FakeClock()
    spm = make(clock, durations=1.0)
    spm.fire("createVolume", create("img-1", "vol-1"))
    clock.to(1.0)
    spm.fire("createVolume", create("img-1", "vol-2"))  # after the first ended: serialised
    assert spm.stats().exclusive_overlaps == 0
    spm.fire("copyImage", copy("img-1", "vol-1", "img-2", "vol-9"))  # shared on img-1: overlap
    assert spm.stats().exclusive_overlaps == 1
    spm.fire("createVolume", create("img-3", "vol-1"))  # unrelated image
    assert spm.stats().exclusive_overlaps == 1


# ------------------------------------------------------------------------------------------------
# revertTask, stopTask, clearTask, unknown ids
# ------------------------------------------------------------------------------------------------


def test_revert_of_an_unfinished_task_raises_403() -> None:
    spm = make(FakeClock(), durations=5.0)
    tid = spm.fire("createVolume", create("img-1", "vol-1"))
    with pytest.raises(TaskNotFinishedError) as err:
        spm.revertTask(tid)
    assert err.value.code == 403


def test_revert_of_a_task_that_ended_recovered_raises_441() -> None:
    spm = make(FakeClock())
    tid = spm.fire("copyImage", copy("img-1", "vol-1", "img-2", "vol-2"))  # fails: 201
    assert spm.internal_state(tid) == "recovered"
    with pytest.raises(IllegalTransitionError):
        spm.revertTask(tid)


def test_revert_runs_the_rollback_for_rollback_duration_then_ends_recovered() -> None:
    clock = FakeClock()
    spm = make(clock, rollback_duration=2.0)
    tid = spm.fire("createVolume", create("img-1", "vol-1"))
    assert status(spm, tid) == SUCCESS
    spm.revertTask(tid)
    assert spm.internal_state(tid) == "recovering"
    assert status(spm, tid) == ("cleaning", "", 0, "1 jobs completed successfully")
    with pytest.raises(TaskStateError):
        spm.clearTask(tid)
    assert len(spm.objects()) == 2
    clock.to(2.0)
    assert status(spm, tid) == ("finished", "cleanSuccess", 0, "1 jobs completed successfully")
    assert spm.objects() == []
    assert spm.stats().tasks_reverted == 1


def test_clear_forgets_a_finished_task_and_refuses_an_unfinished_one_with_410() -> None:
    clock = FakeClock()
    spm = make(clock, durations=1.0)
    tid = spm.fire("createVolume", create("img-1", "vol-1"))
    with pytest.raises(TaskStateError) as err:
        spm.clearTask(tid)
    assert err.value.code == 410
    clock.to(1.0)
    spm.clearTask(tid)
    assert spm.getAllTasksStatuses() == {} and spm.getAllTasksInfo() == {}
    with pytest.raises(UnknownTaskError):
        spm.clearTask(tid)


@pytest.mark.parametrize("call", ["getTaskStatus", "clearTask", "stopTask", "revertTask"])
def test_every_verb_on_an_unknown_task_id_raises_401(call: str) -> None:
    spm = make(FakeClock())
    with pytest.raises(UnknownTaskError) as err:
        getattr(spm, call)(str(uuid.uuid4()))
    assert err.value.code == 401
    assert "Task id unknown" in err.value.message


def test_stop_of_a_queued_task_aborts_it_without_effect() -> None:
    clock = FakeClock()
    spm = make(clock, workers=1, durations=1.0)
    first = spm.fire("createVolume", create("img-1", "vol-1"))
    queued = spm.fire("createVolume", create("img-2", "vol-1"))
    spm.stopTask(queued)
    assert status(spm, queued) == ("finished", "cleanSuccess", 411, ABORTED_MESSAGE)
    assert spm.stats().queued == 0
    clock.to(10.0)
    assert status(spm, first) == SUCCESS
    assert status(spm, queued)[2] == 411
    assert [o.img_uuid for o in spm.objects()] == ["img-1", "img-1"]
    assert spm.stats().tasks_stopped == 1


def test_stop_of_a_running_task_aborts_and_rolls_back_on_its_worker() -> None:
    clock = FakeClock()
    spm = make(clock, workers=1, durations=5.0, rollback_duration=1.0)
    running = spm.fire("createVolume", create("img-1", "vol-1"))
    queued = spm.fire("createVolume", create("img-2", "vol-1"))
    clock.to(1.0)
    spm.stopTask(running)
    assert spm.internal_state(running) == "recovering"
    assert status(spm, running) == ("cleaning", "", 411, ABORTED_MESSAGE)
    spm.stopTask(running)  # stopping during the rollback changes nothing
    assert spm.internal_state(queued) == "queued"  # the rollback holds the worker
    clock.to(2.0)
    assert status(spm, running) == ("finished", "cleanSuccess", 411, ABORTED_MESSAGE)
    assert spm.internal_state(queued) == "running"
    clock.to(7.0)
    assert status(spm, queued) == SUCCESS
    assert {o.img_uuid for o in spm.objects()} == {"img-2"}


def test_stop_of_a_task_waiting_for_a_lock_releases_its_place() -> None:
    clock = FakeClock()
    spm = make(clock, durations=5.0)
    holder = spm.fire("createVolume", create("img-1", "vol-1"))
    waiter = spm.fire("createVolume", create("img-1", "vol-2"))
    later = spm.fire("createVolume", create("img-1", "vol-3"))
    spm.stopTask(waiter)
    assert status(spm, waiter)[2] == 411
    clock.to(10.0)
    assert status(spm, holder) == SUCCESS and status(spm, later) == SUCCESS
    assert sorted(o.vol_uuid or "" for o in spm.objects() if o.kind == "volume") == [
        "vol-1", "vol-3"]


def test_stop_of_a_finished_task_is_a_no_op() -> None:
    spm = make(FakeClock())
    tid = spm.fire("createVolume", create("img-1", "vol-1"))
    assert status(spm, tid) == SUCCESS
    spm.stopTask(tid)
    assert status(spm, tid) == SUCCESS
    assert spm.stats().tasks_stopped == 0


# ------------------------------------------------------------------------------------------------
# The SPM role
# ------------------------------------------------------------------------------------------------

SPM_CALLS: list[tuple[str, Callable[[SimulatedSpm, str], object]]] = [
    ("fire", lambda spm, tid: spm.fire("createVolume", create("img-9", "vol-9"))),
    ("getAllTasksStatuses", lambda spm, tid: spm.getAllTasksStatuses()),
    ("getAllTasksInfo", lambda spm, tid: spm.getAllTasksInfo()),
]
# Calls on one task: VDSM unloads the SPM's tasks when the role is lost, so they answer 401.
TASK_CALLS: list[tuple[str, Callable[[SimulatedSpm, str], object]]] = [
    ("getTaskStatus", lambda spm, tid: spm.getTaskStatus(tid)),
    ("clearTask", lambda spm, tid: spm.clearTask(tid)),
    ("stopTask", lambda spm, tid: spm.stopTask(tid)),
    ("revertTask", lambda spm, tid: spm.revertTask(tid)),
]


@pytest.mark.parametrize(("name", "call"), SPM_CALLS, ids=[c[0] for c in SPM_CALLS])
def test_every_call_raises_654_after_the_spm_role_is_lost(
    name: str, call: Callable[[SimulatedSpm, str], object]
) -> None:
    spm = make(FakeClock())
    tid = spm.fire("createVolume", create("img-1", "vol-1"))
    spm.spm_stop()
    assert not spm.is_spm
    with pytest.raises(NotSpmError) as err:
        call(spm, tid)
    assert err.value.code == 654
    spm.spm_start()
    call(spm, tid)  # works again


@pytest.mark.parametrize(("name", "call"), TASK_CALLS, ids=[c[0] for c in TASK_CALLS])
def test_every_task_call_raises_401_while_the_spm_role_is_lost(
    name: str, call: Callable[[SimulatedSpm, str], object]
) -> None:
    spm = make(FakeClock())
    tid = spm.fire("createVolume", create("img-1", "vol-1"))
    spm.spm_stop()
    with pytest.raises(UnknownTaskError) as err:
        call(spm, tid)
    assert err.value.code == 401
    spm.spm_start()
    assert tid in spm.getAllTasksStatuses()  # listed again: it was only unloaded
    call(spm, tid)  # works again


def test_spm_start_keeps_finished_tasks_and_rolls_back_unfinished_ones() -> None:
    clock = FakeClock()
    spm = make(clock, workers=2, durations={"createVolume": 1.0, "copyImage": 10.0},
               rollback_duration=5.0)
    done = spm.fire("createVolume", create("img-1", "vol-1"))
    reverted = spm.fire("createVolume", create("img-2", "vol-1"))
    clock.to(1.0)
    spm.revertTask(reverted)  # rolling back until t=6
    running = spm.fire("copyImage", copy("img-1", "vol-1", "img-3", "vol-3"))
    queued = spm.fire("copyImage", copy("img-1", "vol-1", "img-4", "vol-4"))
    spm.fire("createVolume", create("img-5", "vol-5"))  # queued behind the two
    clock.to(2.0)
    spm.spm_stop()
    clock.to(50.0)  # nothing runs while the role is lost
    assert spm.stats().unfinished == 4
    spm.spm_start()
    statuses = spm.getAllTasksStatuses()
    assert all(s["taskState"] == "finished" for s in statuses.values())
    assert status(spm, done) == SUCCESS
    assert status(spm, reverted) == ("finished", "cleanSuccess", 0, SUCCESS[3])
    for tid in (running, queued):
        assert status(spm, tid) == ("finished", "cleanSuccess", 411, ABORTED_MESSAGE)
    assert {o.key for o in spm.objects()} == {("image", SD, "img-1"),
                                             ("volume", SD, "img-1", "vol-1")}
    stats = spm.stats()
    assert (stats.tasks_aborted_by_spm_start, stats.unfinished, stats.running) == (4, 0, 0)
    for tid in statuses:
        spm.clearTask(tid)


# ------------------------------------------------------------------------------------------------
# Durations, failure rates and seeds
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "kind"), [
    (0, "fixed"), (2.5, "fixed"), (("uniform", 1, 2), "uniform"),
    (("exponential", 3.0), "exponential"), (("normal", 1.0, 0.5), "normal"),
    (["uniform", 0, 0], "uniform"),
])
def test_duration_specs_are_parsed(spec: Any, kind: str) -> None:
    assert parse_duration(spec).kind == kind


@pytest.mark.parametrize(("spec", "complaint"), [
    (-1.0, "must be >= 0"),
    (True, "expected seconds"),
    (float("nan"), "finite"),
    (("uniform", 2, 1), "lo <= hi"),
    (("uniform", 1), "takes 2 numbers"),
    (("exponential", -1), "mean must be >= 0"),
    (("normal", 1, -1), "sd must be >= 0"),
    (("gamma", 1, 1), "unknown distribution 'gamma'"),
    (("normal", "a", 1), "normal mean must be a number"),
    ("fast", "expected seconds"),
])
def test_bad_duration_specs_raise_value_error_naming_the_problem(spec: Any,
                                                                 complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint.replace("(", r"\(")):
        parse_duration(spec)


@pytest.mark.parametrize(("kwargs", "complaint"), [
    ({"durations": {"copyImage": ("uniform", 3, 1)}}, r"durations\['copyImage'\]"),
    ({"durations": {"copyImages": 1.0}}, "unknown verb"),
    ({"failure_rates": 1.5}, r"within \[0, 1\]"),
    ({"failure_rates": {"*": -0.1}}, r"failure_rates\['\*'\]"),
    ({"workers": 0}, "workers"),
    ({"queue_size": -1}, "queue_size"),
    ({"resource_timeout": -1}, "resource_timeout"),
    ({"rollback_duration": "slow"}, "rollback_duration"),
    ({"pool": ""}, "pool"),
])
def test_bad_constructor_arguments_raise_value_error_naming_them(kwargs: dict[str, Any],
                                                                 complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        SimulatedSpm(clock=FakeClock(), **kwargs)


def test_per_verb_durations_with_a_default_entry() -> None:
    clock = FakeClock()
    spm = make(clock, durations={"*": 3.0, "copyImage": 1.0})
    a = spm.fire("createVolume", create("img-1", "vol-1"))
    clock.to(3.0)
    assert status(spm, a) == SUCCESS
    b = spm.fire("copyImage", copy("img-1", "vol-1", "img-2", "vol-2"))
    clock.to(4.0)
    assert status(spm, b) == SUCCESS


def _seeded_run(seed: int) -> list[tuple[str, TaskStatus]]:
    clock = FakeClock()
    spm = make(clock, seed=seed, workers=3, durations=("exponential", 2.0),
               failure_rates=0.3)
    ids = [spm.fire("createVolume", create(f"img-{i}", "vol")) for i in range(30)]
    trace: list[tuple[str, TaskStatus]] = []
    for t in itertools.count(1):
        clock.to(t * 0.5)
        statuses = spm.getAllTasksStatuses()
        trace.extend(sorted(statuses.items()))
        if all(s["taskState"] == "finished" for s in statuses.values()):
            break
    assert sorted(ids) == sorted(statuses)
    return trace


def test_a_seeded_run_is_reproducible() -> None:
    first = _seeded_run(seed=7)
    assert first == _seeded_run(seed=7)
    assert first != _seeded_run(seed=8)
    results = {s["taskResult"] for _, s in first}
    assert "cleanSuccess" in results and "success" in results


def test_exponential_durations_have_roughly_the_requested_mean() -> None:
    seed = 1234
    clock = FakeClock()
    spm = make(clock, seed=seed, workers=1000, queue_size=0, durations=("exponential", 2.0))
    for i in range(1000):
        spm.fire("createVolume", create(f"img-{i}", "vol"))
    clock.to(1e6)
    busy = spm.stats().worker_busy_seconds
    assert 1.8 < busy / 1000 < 2.2, f"seed={seed}"
