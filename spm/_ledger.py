"""The simulated storage of one pool: which volumes, images and synced images exist.

Every object in the ledger names the task (id and verb) whose effect made it, and the
engine-chosen UUIDs it carries (storage domain, image, volume), so a caller can match what is
left on the storage to its chains — for example to check that a reverted chain left nothing
behind. Every change is performed through :meth:`Ledger.perform` and recorded as a
:class:`LedgerEvent`; an effect whose key is already in the state the effect would produce (a
create of what exists, a second delete of what another task already deleted, a second sync) is
recorded as a :class:`DuplicateEffect`.

The ledger is plain data: it has no clock, lock or I/O of its own. The simulator owns one, changes
it under its lock and persists the changes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any, Final, Literal, NamedTuple

ObjectKind = Literal["volume", "image", "synced"]
"""What a ledger object is: a volume, an image (a volume chain's directory), or the mark that an
image's data was synchronised to a destination domain (``syncImageData``)."""

OpKind = Literal["create", "remove"]
Action = Literal["apply", "undo"]

LedgerKey = tuple[str, ...]
"""``("volume", sdUUID, imgUUID, volUUID)``, ``("image", sdUUID, imgUUID)`` or
``("synced", dstSdUUID, imgUUID)``."""

HISTORY_LIMIT: Final = 1_000_000
"""How many of the latest :class:`LedgerEvent` records :meth:`Ledger.history` keeps in memory.
Counters (``events_recorded``, duplicates) stay exact past it."""


class LedgerObject(NamedTuple):
    """One object on the simulated storage and the task whose effect created it."""

    kind: ObjectKind
    sd_uuid: str
    img_uuid: str
    vol_uuid: str | None
    task_id: str
    verb: str
    created_at: float

    @property
    def key(self) -> LedgerKey:
        """The object's identity in the ledger (see :data:`LedgerKey`)."""
        if self.vol_uuid is not None:
            return (self.kind, self.sd_uuid, self.img_uuid, self.vol_uuid)
        return (self.kind, self.sd_uuid, self.img_uuid)

    def to_list(self) -> list[Any]:
        """A compact, msgpack-friendly form; :meth:`from_list` reads it back."""
        return [self.kind, self.sd_uuid, self.img_uuid, self.vol_uuid, self.task_id, self.verb,
                self.created_at]

    @staticmethod
    def from_list(data: Sequence[Any]) -> LedgerObject:
        """Rebuild an object from :meth:`to_list`'s form. Raises ValueError on a wrong shape."""
        if len(data) != 7 or data[0] not in ("volume", "image", "synced"):
            raise ValueError(f"not a ledger object: {data!r}")
        kind, sd, img, vol, task_id, verb, at = data
        return LedgerObject(kind, str(sd), str(img), None if vol is None else str(vol),
                            str(task_id), str(verb), float(at))


def volume_key(sd_uuid: str, img_uuid: str, vol_uuid: str) -> LedgerKey:
    """The key of a volume."""
    return ("volume", sd_uuid, img_uuid, vol_uuid)


def image_key(sd_uuid: str, img_uuid: str) -> LedgerKey:
    """The key of an image."""
    return ("image", sd_uuid, img_uuid)


def synced_key(dst_sd_uuid: str, img_uuid: str) -> LedgerKey:
    """The key of the mark left by ``syncImageData`` on the destination domain."""
    return ("synced", dst_sd_uuid, img_uuid)


Op = tuple[OpKind, LedgerObject]
"""One change of an effect: create this object, or remove it (the removed object is kept so the
change can be undone with its original creator)."""


class LedgerEvent(NamedTuple):
    """One recorded change: which task did what to which key, when (virtual seconds)."""

    at: float
    task_id: str
    verb: str
    action: Action
    op: OpKind
    key: LedgerKey
    creator_task_id: str
    """The task whose effect created the object (for a remove: the creator of what was
    removed)."""


class DuplicateEffect(NamedTuple):
    """An effect applied (or attempted) a second time by another task."""

    at: float
    key: LedgerKey
    first_task_id: str
    """The task whose effect is already in place (created it, or already removed it)."""
    task_id: str
    """The task that tried again; empty when the verb was refused at fire and made no task
    (``deleteImage`` of an image another task's effect removed: 268)."""
    verb: str


class Ledger:
    """The objects on the simulated storage, the history of changes and the duplicates."""

    def __init__(self) -> None:
        self._objects: dict[LedgerKey, LedgerObject] = {}
        self._image_volumes: dict[tuple[str, str], dict[str, None]] = {}
        self._removed_by: dict[LedgerKey, str] = {}
        self._history: deque[LedgerEvent] = deque(maxlen=HISTORY_LIMIT)
        self._duplicates: list[DuplicateEffect] = []
        self.events_recorded = 0
        """How many changes were performed since this ledger was made (or loaded)."""

    # ---- queries -------------------------------------------------------------------------

    def get(self, key: LedgerKey) -> LedgerObject | None:
        """The object under ``key``, or None when nothing is there."""
        return self._objects.get(key)

    def __contains__(self, key: object) -> bool:
        return key in self._objects

    def __len__(self) -> int:
        return len(self._objects)

    def volumes_of(self, sd_uuid: str, img_uuid: str) -> list[str]:
        """The volume UUIDs of one image, in creation order (empty when the image has none)."""
        return list(self._image_volumes.get((sd_uuid, img_uuid), ()))

    def removed_by(self, key: LedgerKey) -> str | None:
        """The task whose effect removed ``key`` (and nothing re-created it since), if any."""
        return self._removed_by.get(key)

    def objects(self) -> list[LedgerObject]:
        """Every object that exists now, in creation order."""
        return list(self._objects.values())

    def removals(self) -> list[tuple[LedgerKey, str]]:
        """``(key, task id)`` for every key an effect removed and nothing re-created since."""
        return list(self._removed_by.items())

    def history(self) -> list[LedgerEvent]:
        """The recorded changes, oldest first (the latest :data:`HISTORY_LIMIT` of them)."""
        return list(self._history)

    def duplicates(self) -> list[DuplicateEffect]:
        """Every effect that was applied or attempted a second time, oldest first."""
        return list(self._duplicates)

    @property
    def duplicate_count(self) -> int:
        """How many duplicated effects were recorded."""
        return len(self._duplicates)

    # ---- changes -------------------------------------------------------------------------

    def perform(self, op: OpKind, obj: LedgerObject, *, action: Action, task_id: str, verb: str,
                at: float) -> LedgerObject | None:
        """Create or remove ``obj`` on behalf of ``task_id`` and record it.

        Returns the object created or removed (for a remove: the one that was there), or None
        (and changes nothing) when the ledger is already in the state the change would produce:
        a create of a key that exists, a remove of a key that does not. The caller decides
        whether that is a duplicate, a conflict or a precondition failure.
        """
        key = obj.key
        if op == "create":
            if key in self._objects:
                return None
            self._objects[key] = obj
            self._removed_by.pop(key, None)
            if obj.kind == "volume":
                assert obj.vol_uuid is not None
                self._image_volumes.setdefault((obj.sd_uuid, obj.img_uuid), {})[obj.vol_uuid] = None
        else:
            current = self._objects.pop(key, None)
            if current is None:
                return None
            obj = current
            if action == "apply":
                self._removed_by[key] = task_id
            if obj.kind == "volume":
                vols = self._image_volumes.get((obj.sd_uuid, obj.img_uuid))
                if vols is not None:
                    vols.pop(obj.vol_uuid or "", None)
                    if not vols:
                        del self._image_volumes[(obj.sd_uuid, obj.img_uuid)]
        self.events_recorded += 1
        self._history.append(LedgerEvent(at, task_id, verb, action, op, key, obj.task_id))
        return obj

    def note_duplicate(self, key: LedgerKey, first_task_id: str, *, task_id: str, verb: str,
                       at: float) -> DuplicateEffect:
        """Record that ``task_id`` applied or attempted an effect already in place."""
        dup = DuplicateEffect(at, key, first_task_id, task_id, verb)
        self._duplicates.append(dup)
        return dup

    def restore_duplicate(self, dup: DuplicateEffect) -> None:
        """Put back a duplicate read from persisted state."""
        self._duplicates.append(dup)

    def restore_removal(self, key: LedgerKey, task_id: str) -> None:
        """Put back who removed ``key`` (read from persisted state)."""
        self._removed_by[key] = task_id

    def apply_ops(self, ops: Iterable[Op], *, task_id: str, verb: str, at: float) -> list[Op]:
        """Apply an effect's changes in order; return the ones that changed the ledger."""
        done: list[Op] = []
        for op, obj in ops:
            changed = self.perform(op, obj, action="apply", task_id=task_id, verb=verb, at=at)
            if changed is not None:
                done.append((op, changed))
        return done

    def undo_ops(self, ops: Sequence[Op], *, task_id: str, verb: str, at: float) -> list[Op]:
        """Undo an effect: its changes inverted, newest first; return the inverted changes made.

        A created object is removed only while it is still the one the effect created (same
        creator task); a removed object is put back only while its key is free. A change that
        no longer applies is skipped, so undoing never destroys another task's object.
        """
        done: list[Op] = []
        for op, obj in reversed(ops):
            if op == "create":
                current = self._objects.get(obj.key)
                if current is None or current.task_id != obj.task_id:
                    continue
                if self.perform("remove", current, action="undo", task_id=task_id, verb=verb,
                                at=at) is not None:
                    done.append(("remove", current))
            elif self.perform("create", obj, action="undo", task_id=task_id, verb=verb,
                              at=at) is not None:
                done.append(("create", obj))
        return done
