"""The simulated SPM's state directory: a restarted simulator recovers like a new SPM.

A crash is simulated by dropping the simulator without closing it (its log is never synced or
closed by it; its finalizers let go of the files and the directory's lock, as the kernel does
for a killed process), by cutting the log's last record, and by ``kill -9`` of a real process.
"""

from __future__ import annotations

import gc
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from spm._errors import SpmError, UnknownTaskError
from spm._simlog import LOG_NAME, StateDirInUseError, encode
from spm._simulator import ABORTED_MESSAGE, SimulatedSpm

POOL = "pool-1"
SD = "sd-1"
REPO = Path(__file__).resolve().parents[1]


class FakeClock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def create(img: str, vol: str) -> dict[str, Any]:
    return {"sdUUID": SD, "spUUID": POOL, "imgUUID": img, "volUUID": vol}


def crash() -> None:
    """Let simulators the test dropped (``del``) without closing them go, as a killed process
    does: their finalizers close the log and release the directory's lock, syncing and writing
    nothing."""
    gc.collect()


SUCCESS = ("finished", "success", 0)


def wire(spm: SimulatedSpm, tid: str) -> tuple[str, str, int]:
    s = spm.getTaskStatus(tid)
    return (s["taskState"], s["taskResult"], s["code"])


def test_restart_keeps_finished_tasks_and_rolls_back_unfinished_ones(tmp_path: Path) -> None:
    clock = FakeClock()
    spm = SimulatedSpm(POOL, clock=clock, workers=1, durations=1.0, state_dir=tmp_path)
    done = spm.fire("createVolume", create("img-1", "vol-1"))
    clock.t = 1.5
    running = spm.fire("createVolume", create("img-2", "vol-1"))
    queued = spm.fire("createVolume", create("img-3", "vol-1"))
    assert wire(spm, done) == SUCCESS
    objects = spm.objects()
    del spm
    crash()

    restarted = SimulatedSpm(POOL, clock=FakeClock(100.0), state_dir=tmp_path)
    assert wire(restarted, done) == SUCCESS
    for tid in (running, queued):
        assert wire(restarted, tid) == ("finished", "cleanSuccess", 411)
        assert restarted.getTaskStatus(tid)["message"] == ABORTED_MESSAGE
    assert restarted.objects() == objects
    info = restarted.getAllTasksInfo()[done]
    assert (info["id"], info["verb"]) == (done, "createVolume")
    assert info["params"]["volUUID"]  # the parameters survive the restart (recovery proves
    # which task a chain fired by them)
    assert restarted.stats().tasks_aborted_by_spm_start == 2
    for tid in (done, running, queued):
        restarted.clearTask(tid)
    assert restarted.getAllTasksStatuses() == {}


def test_a_task_whose_end_passed_unobserved_before_the_crash_counts_as_unfinished(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    spm = SimulatedSpm(POOL, clock=clock, durations=1.0, state_dir=tmp_path)
    tid = spm.fire("createVolume", create("img-1", "vol-1"))
    clock.t = 50.0  # the job's end is due, but no call applied it
    del spm
    crash()
    restarted = SimulatedSpm(POOL, clock=FakeClock(), state_dir=tmp_path)
    assert wire(restarted, tid) == ("finished", "cleanSuccess", 411)
    assert restarted.objects() == []


def test_closed_simulator_reopens_with_the_same_tasks_and_storage(tmp_path: Path) -> None:
    spm = SimulatedSpm(POOL, clock=FakeClock(), state_dir=tmp_path)
    a = spm.fire("createVolume", create("img-1", "vol-1"))
    b = spm.fire("createVolume", create("img-1", "vol-1"))  # fails: 212, a duplicate
    c = spm.fire("createVolume", create("img-2", "vol-1"))
    assert wire(spm, b)[2] == 212
    spm.clearTask(c)
    statuses, objects = spm.getAllTasksStatuses(), spm.objects()
    spm.close()
    for _ in range(2):  # twice: the compacted log reloads the same
        again = SimulatedSpm(POOL, clock=FakeClock(), state_dir=tmp_path)
        assert again.getAllTasksStatuses() == statuses
        assert again.objects() == objects
        assert again.duplicated_effects() == 1
        with pytest.raises(UnknownTaskError):
            again.getTaskStatus(c)
        assert wire(again, a) == SUCCESS
        again.close()


def test_with_fsync_every_answer_is_synced_and_reloads_the_same(tmp_path: Path) -> None:
    spm = SimulatedSpm(POOL, clock=FakeClock(), state_dir=tmp_path, fsync=True)
    done = spm.fire("createVolume", create("img-1", "vol-1"))
    assert wire(spm, done) == SUCCESS
    cleared = spm.fire("createVolume", create("img-2", "vol-1"))
    assert wire(spm, cleared) == SUCCESS
    spm.clearTask(cleared)
    del spm
    crash()
    restarted = SimulatedSpm(POOL, clock=FakeClock(), state_dir=tmp_path, fsync=True)
    assert set(restarted.getAllTasksStatuses()) == {done}
    assert len(restarted.objects()) == 4


def test_revert_in_progress_at_the_crash_completes_on_restart(tmp_path: Path) -> None:
    spm = SimulatedSpm(POOL, clock=FakeClock(), rollback_duration=10.0, state_dir=tmp_path)
    tid = spm.fire("createVolume", create("img-1", "vol-1"))
    assert wire(spm, tid) == SUCCESS
    spm.revertTask(tid)
    assert spm.getTaskStatus(tid)["taskState"] == "cleaning"
    del spm
    crash()
    restarted = SimulatedSpm(POOL, clock=FakeClock(), state_dir=tmp_path)
    assert wire(restarted, tid) == ("finished", "cleanSuccess", 0)
    assert restarted.objects() == []


def test_a_finished_task_reloaded_from_disk_can_still_be_reverted(tmp_path: Path) -> None:
    spm = SimulatedSpm(POOL, clock=FakeClock(), state_dir=tmp_path)
    tid = spm.fire("createVolume", create("img-1", "vol-1"))
    assert wire(spm, tid) == SUCCESS
    del spm
    crash()
    restarted = SimulatedSpm(POOL, clock=FakeClock(), state_dir=tmp_path)
    restarted.revertTask(tid)
    assert wire(restarted, tid) == ("finished", "cleanSuccess", 0)
    assert restarted.objects() == []


def test_a_delete_image_reloaded_from_disk_keeps_the_image_removed(tmp_path: Path) -> None:
    clock = FakeClock()
    spm = SimulatedSpm(POOL, clock=clock, durations={"deleteImage": 10.0}, state_dir=tmp_path)
    for img in ("img-1", "img-2"):
        assert wire(spm, spm.fire("createVolume", create(img, "vol-1")))[1] == "success"
    image = {"sdUUID": SD, "spUUID": POOL}
    done = spm.fire("deleteImage", {**image, "imgUUID": "img-1"})
    clock.t = 10.0
    assert wire(spm, done) == SUCCESS
    running = spm.fire("deleteImage", {**image, "imgUUID": "img-2"})  # removed by the call
    assert spm.objects() == []
    del spm
    crash()
    restarted = SimulatedSpm(POOL, clock=FakeClock(), state_dir=tmp_path)
    # The purge caught running is aborted; neither task has a rollback that puts an image back.
    assert wire(restarted, running) == ("finished", "cleanSuccess", 411)
    restarted.revertTask(done)
    assert wire(restarted, done) == ("finished", "cleanSuccess", 0)
    assert restarted.objects() == []


def test_a_delete_image_refused_as_a_duplicate_is_still_counted_after_a_restart(
    tmp_path: Path,
) -> None:
    spm = SimulatedSpm(POOL, clock=FakeClock(), state_dir=tmp_path)
    assert wire(spm, spm.fire("createVolume", create("img-1", "vol-1")))[1] == "success"
    image = {"sdUUID": SD, "spUUID": POOL, "imgUUID": "img-1"}
    first = spm.fire("deleteImage", image)
    with pytest.raises(SpmError, match="Image does not exist"):
        spm.fire("deleteImage", image)
    del spm
    crash()
    restarted = SimulatedSpm(POOL, clock=FakeClock(), state_dir=tmp_path)
    assert [(d.first_task_id, d.task_id) for d in restarted.duplicates()] == [(first, "")]


def test_torn_last_record_is_cut_off_and_the_rest_recovered(tmp_path: Path) -> None:
    spm = SimulatedSpm(POOL, clock=FakeClock(), durations=1.0, state_dir=tmp_path)
    first = spm.fire("createVolume", create("img-1", "vol-1"))
    log = tmp_path / LOG_NAME
    size_before_last = log.stat().st_size
    last = spm.fire("createVolume", create("img-2", "vol-1"))
    del spm
    crash()
    # The last write was cut short: only part of its frame reached the file.
    with open(log, "r+b") as f:
        f.truncate(log.stat().st_size - 3)
    restarted = SimulatedSpm(POOL, clock=FakeClock(), state_dir=tmp_path)
    assert wire(restarted, first) == ("finished", "cleanSuccess", 411)
    with pytest.raises(UnknownTaskError):
        restarted.getTaskStatus(last)
    assert log.stat().st_size > 0
    del restarted
    crash()
    # Garbage after a good record (a frame whose header promises more than is there).
    with open(log, "ab") as f:
        f.write(encode(["F", "x", "createVolume"])[:6])
    size = log.stat().st_size
    again = SimulatedSpm(POOL, clock=FakeClock(), state_dir=tmp_path)
    assert set(again.getAllTasksStatuses()) == {first}
    assert log.stat().st_size < size
    assert size_before_last > 0


def test_a_restarted_seeded_simulator_never_hands_out_an_old_task_id(tmp_path: Path) -> None:
    seen: set[str] = set()
    for run in range(3):
        spm = SimulatedSpm(POOL, clock=FakeClock(), seed=42, state_dir=tmp_path)
        for i in range(5):
            tid = spm.fire("createVolume", create(f"img-{run}-{i}", "vol"))
            assert tid not in seen
            seen.add(tid)
            spm.clearTask(tid)
        del spm
        crash()


def test_a_state_dir_of_another_pool_is_refused(tmp_path: Path) -> None:
    SimulatedSpm(POOL, clock=FakeClock(), state_dir=tmp_path).close()
    with pytest.raises(ValueError, match="pool-1"):
        SimulatedSpm("pool-2", clock=FakeClock(), state_dir=tmp_path)
    # The simulator that was not made let go of the directory.
    SimulatedSpm(POOL, clock=FakeClock(), state_dir=tmp_path).close()


def test_a_second_simulator_on_an_open_state_dir_is_refused_naming_it(tmp_path: Path) -> None:
    clock = FakeClock()
    first = SimulatedSpm(POOL, clock=clock, durations=1.0, state_dir=tmp_path)
    tid = first.fire("createVolume", create("img-1", "vol-1"))
    log = tmp_path / LOG_NAME
    size = log.stat().st_size
    with pytest.raises(StateDirInUseError) as err:
        SimulatedSpm(POOL, clock=clock, state_dir=tmp_path)
    assert isinstance(err.value, OSError)
    assert str(err.value) == (
        f"{tmp_path}: in use by another simulator (process {os.getpid()})")
    assert log.stat().st_size == size  # the refused opener neither read nor rewrote the log
    # The first goes on, and what it acknowledged is what the next opener finds.
    clock.t = 1.0
    assert wire(first, tid) == SUCCESS
    first.clearTask(tid)
    first.close()
    again = SimulatedSpm(POOL, clock=clock, state_dir=tmp_path)
    assert again.getAllTasksStatuses() == {}
    assert len(again.objects()) == 2
    again.close()


def test_the_log_is_compacted_on_reopen(tmp_path: Path) -> None:
    spm = SimulatedSpm(POOL, clock=FakeClock(), state_dir=tmp_path)
    for i in range(200):
        tid = spm.fire("createVolume", create(f"img-{i}", "vol"))
        assert spm.getTaskStatus(tid)["taskResult"] == "success"
        spm.clearTask(tid)
    spm.close()
    log = tmp_path / LOG_NAME
    grown = log.stat().st_size
    reopened = SimulatedSpm(POOL, clock=FakeClock(), state_dir=tmp_path)
    assert log.stat().st_size < grown
    assert len(reopened.objects()) == 400
    assert reopened.getAllTasksStatuses() == {}


# ------------------------------------------------------------------------------------------------
# kill -9 of a real process
# ------------------------------------------------------------------------------------------------

_CHILD = textwrap.dedent("""
    import sys
    from spm._simulator import SimulatedSpm

    spm = SimulatedSpm("pool-1", state_dir=sys.argv[1], workers=4,
                       durations=("uniform", 0.0, 0.002))
    i = 0
    while True:
        i += 1
        tid = spm.fire("createVolume", {"sdUUID": "sd-1", "spUUID": "pool-1",
                                        "imgUUID": f"img-{i}", "volUUID": "vol"})
        print("F", tid, f"img-{i}", flush=True)
        for t, s in spm.getAllTasksStatuses().items():
            if s["taskState"] == "finished":
                print("S", t, s["taskResult"], flush=True)
                spm.clearTask(t)
                print("C", t, flush=True)
""")


def test_kill_9_at_any_moment_loses_no_acknowledged_task_or_effect(
    tmp_path: Path, seed: int
) -> None:
    rng = random.Random(seed)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for round_ in range(3):
        state_dir = tmp_path / f"round-{round_}"
        lines_before_kill = rng.randrange(20, 600)
        child = subprocess.Popen([sys.executable, "-c", _CHILD, str(state_dir)],
                                 stdout=subprocess.PIPE, env=env, text=True)
        assert child.stdout is not None
        lines: list[list[str]] = []
        try:
            while len(lines) < lines_before_kill:
                line = child.stdout.readline()
                assert line, f"child ended early (seed={seed})"
                lines.append(line.split())
            # The directory is the live child's: no one else may open it meanwhile.
            with pytest.raises(StateDirInUseError, match=f"process {child.pid}"):
                SimulatedSpm(POOL, state_dir=state_dir)
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.wait(timeout=30)
            # Everything the child printed before it died, including what it ran ahead with.
            rest = child.stdout.read()
            child.stdout.close()
        # Only whole lines: the last one may have been cut short by the kill anywhere (it
        # has no newline then), even in the middle of a task id.
        *whole, _cut = rest.split("\n")
        lines.extend(line.split() for line in whole)

        fired = {parts[1]: parts[2] for parts in lines if parts[0] == "F"}
        observed = {parts[1]: parts[2] for parts in lines if parts[0] == "S"}
        cleared = {parts[1] for parts in lines if parts[0] == "C"}
        spm = SimulatedSpm(POOL, state_dir=state_dir)  # the killed child's lock went with it
        statuses = spm.getAllTasksStatuses()
        volumes = {o.img_uuid: o for o in spm.objects() if o.kind == "volume"}
        why = f"seed={seed} round={round_} lines={lines_before_kill}"
        for tid, img in fired.items():
            if tid not in observed:
                assert tid in statuses, why  # acknowledged by fire: never lost
            if tid in cleared:
                assert tid not in statuses, why
            if observed.get(tid) == "success":
                # An effect the caller saw succeed is on the storage, made by that task.
                assert volumes[img].task_id == tid, why
                if tid in statuses:
                    assert statuses[tid]["taskResult"] == "success", why
        made_by = {o.task_id for o in volumes.values()}
        for tid, s in statuses.items():
            assert s["taskState"] == "finished", why
            # Known tasks either succeeded with their effect in place, or rolled back without.
            assert (s["taskResult"] == "success") == (tid in made_by), why
        # A task fired just before the kill may have been acknowledged but not printed.
        assert made_by <= set(fired) | set(statuses), why
        assert spm.duplicated_effects() == 0, why
        spm.close()
