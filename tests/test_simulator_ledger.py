"""The simulated storage: each verb's effect, its rollback, the history and duplicated effects."""

from __future__ import annotations

from typing import Any

import pytest

from spm._errors import SpmError
from spm._ledger import Ledger, LedgerObject, image_key, synced_key, volume_key
from spm._simulator import SimulatedSpm

POOL = "pool-1"
SD = "sd-1"
SD2 = "sd-2"


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


Step = tuple[str, dict[str, Any]]


def create(img: str, vol: str, sd: str = SD, **extra: Any) -> Step:
    return ("createVolume", {"sdUUID": sd, "spUUID": POOL, "imgUUID": img, "volUUID": vol,
                             **extra})


def copy(src_img: str, src_vol: str, dst_img: str, dst_vol: str, **extra: Any) -> Step:
    return ("copyImage", {"sdUUID": SD, "spUUID": POOL, "srcImgUUID": src_img,
                          "srcVolUUID": src_vol, "dstImgUUID": dst_img, "dstVolUUID": dst_vol,
                          **extra})


def delete_volume(img: str, *vols: str) -> Step:
    return ("deleteVolume", {"sdUUID": SD, "spUUID": POOL, "imgUUID": img, "volumes": list(vols)})


def delete_image(img: str, sd: str = SD, **extra: Any) -> Step:
    return ("deleteImage", {"sdUUID": sd, "spUUID": POOL, "imgUUID": img, **extra})


def clone(img: str) -> Step:
    return ("cloneImageStructure", {"spUUID": POOL, "sdUUID": SD, "imgUUID": img,
                                    "dstSdUUID": SD2})


def sync(img: str) -> Step:
    return ("syncImageData", {"spUUID": POOL, "sdUUID": SD, "imgUUID": img, "dstSdUUID": SD2,
                              "syncType": "INTERNAL"})


def run(spm: SimulatedSpm, step: Step) -> str:
    """Fire one step and check it succeeded (durations are 0: it ends at the next call)."""
    tid = spm.fire(*step)
    assert spm.getTaskStatus(tid)["taskResult"] == "success", spm.getTaskStatus(tid)
    return tid


def state(spm: SimulatedSpm) -> dict[tuple[str, ...], tuple[str, str]]:
    """What is on the storage: key -> (creator task, verb)."""
    return {o.key: (o.task_id, o.verb) for o in spm.objects()}


# (name, setup steps, the verb under test, keys it adds, keys it removes)
EFFECTS: list[tuple[str, list[Step], Step, set[tuple[str, ...]], set[tuple[str, ...]]]] = [
    ("createVolume makes the image with its first volume", [], create("img-1", "vol-1"),
     {image_key(SD, "img-1"), volume_key(SD, "img-1", "vol-1")}, set()),
    ("createVolume of a snapshot adds a volume to the image", [create("img-1", "vol-1")],
     create("img-1", "vol-2", srcImgUUID="img-1", srcVolUUID="vol-1"),
     {volume_key(SD, "img-1", "vol-2")}, set()),
    ("copyImage makes the destination image and volume", [create("img-1", "vol-1")],
     copy("img-1", "vol-1", "img-2", "vol-2"),
     {image_key(SD, "img-2"), volume_key(SD, "img-2", "vol-2")}, set()),
    ("copyImage to another domain", [create("img-1", "vol-1")],
     copy("img-1", "vol-1", "img-2", "vol-2", dstSdUUID=SD2),
     {image_key(SD2, "img-2"), volume_key(SD2, "img-2", "vol-2")}, set()),
    ("deleteVolume of one of two volumes keeps the image",
     [create("img-1", "vol-1"), create("img-1", "vol-2")], delete_volume("img-1", "vol-2"),
     set(), {volume_key(SD, "img-1", "vol-2")}),
    ("deleteVolume of the last volume removes the image", [create("img-1", "vol-1")],
     delete_volume("img-1", "vol-1"),
     set(), {volume_key(SD, "img-1", "vol-1"), image_key(SD, "img-1")}),
    ("cloneImageStructure copies the volume chain to the other domain",
     [create("img-1", "vol-1"), create("img-1", "vol-2")], clone("img-1"),
     {image_key(SD2, "img-1"), volume_key(SD2, "img-1", "vol-1"),
      volume_key(SD2, "img-1", "vol-2")}, set()),
    ("syncImageData marks the destination synced", [create("img-1", "vol-1"), clone("img-1")],
     sync("img-1"), {synced_key(SD2, "img-1")}, set()),
]


@pytest.mark.parametrize(("name", "setup", "step", "added", "removed"), EFFECTS,
                         ids=[e[0] for e in EFFECTS])
def test_each_verb_changes_the_storage_and_revert_undoes_it(
    name: str, setup: list[Step], step: Step, added: set[tuple[str, ...]],
    removed: set[tuple[str, ...]],
) -> None:
    spm = SimulatedSpm(POOL, clock=FakeClock())
    for s in setup:
        run(spm, s)
    before = state(spm)
    tid = run(spm, step)
    after = state(spm)
    assert set(after) - set(before) == added
    assert set(before) - set(after) == removed
    assert all(after[key] == (tid, step[0]) for key in added)
    spm.revertTask(tid)
    assert spm.getTaskStatus(tid)["taskResult"] == "cleanSuccess"
    # Undone exactly: what it removed is back with its original creator.
    assert state(spm) == before


# deleteImage as VDSM's hsm.deleteImage: the call removes the image (pool.deleteImage), the job
# only purges it (purgeImage), and no rollback is registered for either.

CLONED = [create("img-1", "vol-1"), create("img-1", "vol-2"), clone("img-1"), sync("img-1")]
CLONE_KEYS = {image_key(SD2, "img-1"), volume_key(SD2, "img-1", "vol-1"),
              volume_key(SD2, "img-1", "vol-2"), synced_key(SD2, "img-1")}


def test_delete_image_removes_the_image_when_the_verb_is_accepted() -> None:
    clock = FakeClock()
    spm = SimulatedSpm(POOL, clock=clock, durations={"deleteImage": 10.0})
    for s in CLONED:
        run(spm, s)
    before = state(spm)
    clock.t = 1.0
    tid = spm.fire(*delete_image("img-1", sd=SD2))
    # Gone while the task still runs: its volumes, its sync mark and the image itself.
    assert spm.getTaskStatus(tid)["taskState"] == "running"
    assert set(before) - set(state(spm)) == CLONE_KEYS
    assert set(state(spm)) <= set(before)
    removed = [(e.at, e.task_id, e.verb, e.action, e.op) for e in spm.ledger_history()
               if e.key in CLONE_KEYS and e.op == "remove"]
    assert removed == [(1.0, tid, "deleteImage", "apply", "remove")] * len(CLONE_KEYS)
    clock.t = 11.0
    events = len(spm.ledger_history())
    assert spm.getTaskStatus(tid)["taskResult"] == "success"
    assert len(spm.ledger_history()) == events  # the job (purgeImage) changes nothing more


def test_a_reverted_delete_image_ends_recovered_with_nothing_put_back() -> None:
    spm = SimulatedSpm(POOL, clock=FakeClock())
    for s in CLONED:
        run(spm, s)
    tid = run(spm, delete_image("img-1", sd=SD2))
    after = state(spm)
    spm.revertTask(tid)
    s = spm.getTaskStatus(tid)
    assert (s["taskState"], s["taskResult"], s["code"]) == ("finished", "cleanSuccess", 0)
    assert spm.internal_state(tid) == "recovered"
    assert state(spm) == after
    assert [e.action for e in spm.ledger_history()].count("undo") == 0


def test_a_stopped_or_failed_delete_image_leaves_the_image_removed() -> None:
    clock = FakeClock()
    spm = SimulatedSpm(POOL, clock=clock, durations={"deleteImage": 10.0})
    run(spm, create("img-1", "vol-1"))
    stopped = spm.fire(*delete_image("img-1"))
    spm.stopTask(stopped)
    s = spm.getTaskStatus(stopped)
    assert (s["taskState"], s["taskResult"], s["code"]) == ("finished", "cleanSuccess", 411)
    assert spm.objects() == []
    failing = SimulatedSpm(POOL, clock=FakeClock(), failure_rates={"deleteImage": 1.0})
    run(failing, create("img-2", "vol-1"))
    failed = failing.fire(*delete_image("img-2"))
    s = failing.getTaskStatus(failed)
    assert (s["taskState"], s["taskResult"], s["code"]) == ("finished", "cleanSuccess", 256)
    assert failing.objects() == []


def test_delete_image_with_post_zero_removes_the_image_at_the_end_of_its_job() -> None:
    clock = FakeClock()
    spm = SimulatedSpm(POOL, clock=clock, durations={"deleteImage": 10.0})
    run(spm, create("img-1", "vol-1"))
    run(spm, create("img-2", "vol-1"))
    before = state(spm)
    stopped = spm.fire(*delete_image("img-1", postZero=True))
    assert state(spm) == before  # zeroImage removes the image when it is done
    spm.stopTask(stopped)
    assert state(spm) == before
    tid = spm.fire(*delete_image("img-2", postZero="true"))
    clock.t = 10.0
    assert spm.getTaskStatus(tid)["taskResult"] == "success"
    assert set(before) - set(state(spm)) == {image_key(SD, "img-2"),
                                             volume_key(SD, "img-2", "vol-1")}
    spm.revertTask(tid)  # no rollback registered for zeroImage either
    assert spm.getTaskStatus(tid)["taskResult"] == "cleanSuccess"
    assert set(before) - set(state(spm)) == {image_key(SD, "img-2"),
                                             volume_key(SD, "img-2", "vol-1")}


def test_a_reverted_chain_leaves_nothing_behind() -> None:
    spm = SimulatedSpm(POOL, clock=FakeClock())
    chain = [create("img-1", "vol-1"), create("img-1", "vol-2", srcImgUUID="img-1",
                                              srcVolUUID="vol-1"),
             clone("img-1"), sync("img-1"), copy("img-1", "vol-2", "img-3", "vol-3")]
    ids = [run(spm, step) for step in chain]
    assert {o.task_id for o in spm.objects()} == set(ids)
    for tid in reversed(ids):
        spm.revertTask(tid)
    assert spm.objects() == []
    history = spm.ledger_history()
    assert [e.action for e in history].count("apply") == [e.action for e in history].count("undo")
    assert spm.duplicated_effects() == 0


def test_history_records_every_application_and_undo_with_its_task() -> None:
    clock = FakeClock()
    spm = SimulatedSpm(POOL, clock=clock)
    tid = run(spm, create("img-1", "vol-1"))
    clock.t = 5.0
    spm.revertTask(tid)
    assert spm.getTaskStatus(tid)["taskResult"] == "cleanSuccess"
    events = [(e.at, e.task_id, e.action, e.op, e.key) for e in spm.ledger_history()]
    assert events == [
        (0.0, tid, "apply", "create", image_key(SD, "img-1")),
        (0.0, tid, "apply", "create", volume_key(SD, "img-1", "vol-1")),
        (5.0, tid, "undo", "remove", volume_key(SD, "img-1", "vol-1")),
        (5.0, tid, "undo", "remove", image_key(SD, "img-1")),
    ]


def test_objects_name_the_engine_uuids_and_the_creator_task() -> None:
    spm = SimulatedSpm(POOL, clock=FakeClock())
    tid = run(spm, create("img-1", "vol-1"))
    vol = next(o for o in spm.objects() if o.kind == "volume")
    assert (vol.sd_uuid, vol.img_uuid, vol.vol_uuid, vol.task_id, vol.verb) == (
        SD, "img-1", "vol-1", tid, "createVolume")
    assert vol.key == ("volume", SD, "img-1", "vol-1")
    assert LedgerObject.from_list(vol.to_list()) == vol


def test_a_second_create_of_an_existing_volume_counts_as_a_duplicated_effect() -> None:
    spm = SimulatedSpm(POOL, clock=FakeClock())
    first = run(spm, create("img-1", "vol-1"))
    second = spm.fire(*create("img-1", "vol-1"))
    assert spm.getTaskStatus(second)["code"] == 212
    assert spm.duplicated_effects() == 1
    dup = spm.duplicates()[0]
    assert (dup.key, dup.first_task_id, dup.task_id, dup.verb) == (
        volume_key(SD, "img-1", "vol-1"), first, second, "createVolume")
    assert state(spm)[volume_key(SD, "img-1", "vol-1")] == (first, "createVolume")


def test_a_second_delete_by_another_task_counts_as_a_duplicated_effect() -> None:
    spm = SimulatedSpm(POOL, clock=FakeClock())
    run(spm, create("img-1", "vol-1"))
    run(spm, create("img-1", "vol-2"))
    deleter = run(spm, delete_volume("img-1", "vol-2"))
    again = spm.fire(*delete_volume("img-1", "vol-2"))
    assert spm.getTaskStatus(again)["code"] == 201
    assert spm.duplicated_effects() == 1
    assert spm.duplicates()[0].first_task_id == deleter
    # A volume that never existed is a plain precondition failure, not a duplicate.
    missing = spm.fire(*delete_volume("img-1", "vol-9"))
    assert spm.getTaskStatus(missing)["code"] == 201
    assert spm.duplicated_effects() == 1


def test_deleting_an_image_twice_concurrently_counts_one_duplicated_effect() -> None:
    clock = FakeClock()
    spm = SimulatedSpm(POOL, clock=clock, durations={"deleteImage": 1.0})
    run(spm, create("img-1", "vol-1"))
    # With postZero the removal is the job's: both pass fire, the image is still there.
    first = spm.fire(*delete_image("img-1", postZero=True))
    second = spm.fire(*delete_image("img-1", postZero=True))
    clock.t = 1.0
    assert spm.getTaskStatus(first)["taskResult"] == "success"
    assert spm.getTaskStatus(second)["code"] == 268
    assert spm.duplicated_effects() == 1
    assert spm.stats().exclusive_overlaps == 1


def test_delete_image_of_an_image_another_task_deleted_is_refused_and_counted() -> None:
    spm = SimulatedSpm(POOL, clock=FakeClock())
    run(spm, create("img-1", "vol-1"))
    first = run(spm, delete_image("img-1"))
    with pytest.raises(SpmError) as err:  # as VDSM: refused in the call, no task
        spm.fire(*delete_image("img-1"))
    assert err.value.code == 268
    assert spm.stats().tasks_fired == 2  # the create and the first delete
    assert spm.duplicated_effects() == 1
    assert spm.stats().duplicated_effects == 1
    dup = spm.duplicates()[0]
    assert (dup.key, dup.first_task_id, dup.task_id, dup.verb) == (
        image_key(SD, "img-1"), first, "", "deleteImage")
    # An image that never existed is refused the same way but duplicates nothing.
    with pytest.raises(SpmError) as err:
        spm.fire(*delete_image("img-9"))
    assert err.value.code == 268
    assert spm.duplicated_effects() == 1


def test_a_second_sync_succeeds_and_counts_as_a_duplicated_effect() -> None:
    spm = SimulatedSpm(POOL, clock=FakeClock())
    run(spm, create("img-1", "vol-1"))
    run(spm, clone("img-1"))
    first = run(spm, sync("img-1"))
    second = run(spm, sync("img-1"))
    assert spm.duplicated_effects() == 1
    spm.revertTask(second)  # undoing the duplicate leaves the first sync's mark in place
    assert state(spm)[synced_key(SD2, "img-1")] == (first, "syncImageData")


def test_redoing_an_effect_after_its_revert_is_not_a_duplicate() -> None:
    spm = SimulatedSpm(POOL, clock=FakeClock())
    first = run(spm, create("img-1", "vol-1"))
    spm.revertTask(first)
    run(spm, create("img-1", "vol-1"))
    assert spm.duplicated_effects() == 0


def test_undo_never_removes_another_tasks_object() -> None:
    ledger = Ledger()
    mine = LedgerObject("volume", SD, "img-1", "vol-1", "task-a", "createVolume", 0.0)
    theirs = mine._replace(task_id="task-b")
    applied = ledger.apply_ops([("create", mine)], task_id="task-a", verb="createVolume", at=0.0)
    ledger.perform("remove", mine, action="apply", task_id="task-x", verb="deleteVolume", at=1.0)
    ledger.perform("create", theirs, action="apply", task_id="task-b", verb="createVolume",
                   at=2.0)
    assert ledger.undo_ops(applied, task_id="task-a", verb="createVolume", at=3.0) == []
    assert ledger.get(mine.key) == theirs
