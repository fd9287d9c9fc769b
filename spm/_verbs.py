"""The SPM verbs the simulator runs: their parameters, locks, preconditions, effects and errors.

Names and codes are VDSM's: parameter names from ``hsm.py`` (``sdUUID``, ``spUUID``,
``imgUUID`` ...), image locks as ``sp.py``'s jobs take them (shared on a source image, exclusive
on a destination image, acquired in sorted order), storage errors from
``storage/exception.py`` with their codes and their text (``"<message>: <repr(value)>"``, as
VDSM's ``GeneralException.__str__`` prints them).

A verb does its work in four places:

* :meth:`Verb.parse` when the task is fired: parameters are checked (an unknown, missing or
  ill-typed one raises :class:`~spm._errors.SpmError` code 1000 naming it; a foreign pool raises
  309), and nothing is created when it raises.
* :meth:`Verb.prepare` when the task is fired, against the storage as it is: the checks VDSM
  makes in the API call itself (``deleteImage`` of an image that is not there raises 268).
* :meth:`Verb.fire_effect` once the task is accepted: what VDSM changes in the API call itself,
  before the job is queued (``deleteImage`` removes the image there). It is never undone: VDSM
  registers no rollback for it.
* :meth:`Verb.plan` when the job runs: the preconditions on the storage and the effect as a list
  of ledger changes. A failed precondition raises :class:`StorageFailure`, which fails the job.
  The job's effect is undone by the task's rollback unless the verb registers none
  (:attr:`Verb.registers_rollback`).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Literal, NamedTuple

from spm._errors import GenericError, SpmError, error_for_code
from spm._ledger import (
    Ledger,
    LedgerKey,
    LedgerObject,
    Op,
    image_key,
    synced_key,
    volume_key,
)

BLANK_UUID: Final = "00000000-0000-0000-0000-000000000000"
"""VDSM's "no UUID" (``sc.BLANK_UUID``)."""

ResourceKey = tuple[str, str]
"""A lockable resource: ``(namespace, name)``, e.g. ``("01_img_<sdUUID>", imgUUID)``."""

LockSpec = tuple[ResourceKey, bool]
"""A resource and whether the lock on it is exclusive (False: shared)."""


def image_resource(sd_uuid: str, img_uuid: str) -> ResourceKey:
    """The resource VDSM locks for an image of a storage domain (its image namespace)."""
    return (f"01_img_{sd_uuid}", img_uuid)


# ------------------------------------------------------------------------------------------------
# Storage errors
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StorageErrorKind:
    """One of VDSM's storage exceptions: its code and its message."""

    code: int
    message: str


VOLUME_DOES_NOT_EXIST: Final = StorageErrorKind(201, "Volume does not exist")
VOLUME_CREATION_ERROR: Final = StorageErrorKind(205, "Error creating a new volume")
VOLUME_ALREADY_EXISTS: Final = StorageErrorKind(212, "Volume already exists")
CANNOT_DELETE_VOLUME: Final = StorageErrorKind(222, "Volume deletion error")
IMAGES_ACTION_ERROR: Final = StorageErrorKind(250, "Error images action")
IMAGE_DELETE_ERROR: Final = StorageErrorKind(256, "Could not remove all image's volumes")
COPY_IMAGE_ERROR: Final = StorageErrorKind(261, "low level Image copy failed")
IMAGE_DOES_NOT_EXIST_IN_SD: Final = StorageErrorKind(268, "Image does not exist in domain")
STORAGE_POOL_UNKNOWN: Final = StorageErrorKind(309, "Unknown pool id, pool not connected")
ADD_TASK_ERROR: Final = StorageErrorKind(405, "TaskManager error, unable to add task")
RESOURCE_TIMEOUT: Final = StorageErrorKind(851, "Resource timeout")
INVALID_PARAMETER: Final = StorageErrorKind(1000, "Invalid parameter")


class StorageFailure(Exception):
    """A VDSM storage error: fails a job (or, raised at fire, refuses the verb).

    ``value`` is the exception's value as VDSM keeps it (a tuple of the constructor's arguments,
    or the string some exceptions build); ``duplicate_of`` names the ledger key and the task whose
    effect is already in place when the failure is a second application of an effect.
    """

    def __init__(self, kind: StorageErrorKind, value: object,
                 duplicate_of: tuple[LedgerKey, str] | None = None) -> None:
        self.kind = kind
        self.value = value
        self.duplicate_of = duplicate_of
        super().__init__(self.text)

    @property
    def code(self) -> int:
        """VDSM's code of the error."""
        return self.kind.code

    @property
    def text(self) -> str:
        """The error as VDSM prints it: ``"<message>: <repr(value)>"``."""
        return f"{self.kind.message}: {self.value!r}"

    def task_message(self) -> str:
        """The message of a task whose job failed with this error (VDSM's ``TaskAborted``
        value): ``"value=<text> abortedcode=<code>"``."""
        return f"value={self.text} abortedcode={self.code}"

    def to_spm_error(self) -> SpmError:
        """The error raised to a caller when the verb is refused at fire."""
        return error_for_code(self.code, self.text)


def invalid_parameter(name: str, value: object, reason: str) -> SpmError:
    """VDSM's ``InvalidParameterException(name, value, reason)`` as an SpmError (code 1000)."""
    return StorageFailure(INVALID_PARAMETER, f"{name}={value!r} ({reason})").to_spm_error()


# ------------------------------------------------------------------------------------------------
# Parameters
# ------------------------------------------------------------------------------------------------

ParamKind = Literal["uuid", "uuid_list", "bool", "int", "int_or_str", "str"]


@dataclass(frozen=True, slots=True)
class ParamSpec:
    """One parameter of a verb: its VDSM name, what it must hold, and whether it is required.

    Kinds: ``uuid`` a non-empty string; ``uuid_list`` a non-empty list of them; ``bool`` a bool or
    "true"/"false"; ``int`` a non-negative int or a string of digits; ``int_or_str`` an int or a
    string (VDSM's format/allocation enums); ``str`` any string. An optional parameter may be None.
    """

    name: str
    kind: ParamKind
    required: bool = False


def _is_uuid(value: Any) -> bool:
    return isinstance(value, str) and value != ""


def _is_uuid_list(value: Any) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) > 0
            and all(isinstance(v, str) and v != "" for v in value))


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool) or (
        isinstance(value, str) and value.lower() in ("true", "false"))


def _is_int(value: Any) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool) and value >= 0) or (
        isinstance(value, str) and value.isdigit())


def _is_int_or_str(value: Any) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or isinstance(value, str)


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


_CHECKS: Final[Mapping[ParamKind, tuple[Callable[[Any], bool], str]]] = {
    "uuid": (_is_uuid, "must be a non-empty UUID string"),
    "uuid_list": (_is_uuid_list, "must be a non-empty list of UUID strings"),
    "bool": (_is_bool, "must be a bool or 'true'/'false'"),
    "int": (_is_int, "must be a non-negative integer"),
    "int_or_str": (_is_int_or_str, "must be an integer or a string"),
    "str": (_is_str, "must be a string"),
}


class VerbCall(NamedTuple):
    """A verb's checked parameters, reduced to what the simulation needs (the UUIDs)."""

    verb: str
    sd: str
    img: str
    vol: str | None = None
    volumes: tuple[str, ...] = ()
    src_img: str | None = None
    src_vol: str | None = None
    dst_sd: str | None = None
    dst_img: str | None = None
    dst_vol: str | None = None
    post_zero: bool = False


Plan = tuple[list[Op], list[tuple[LedgerKey, str]]]
"""A job's effect: the ledger changes to apply, and ``(key, first task)`` for each part of it
that was already in place (a duplicate that does not fail the job, e.g. a second sync)."""


class Verb(abc.ABC):
    """One asynchronous SPM verb."""

    name: ClassVar[str]
    params: ClassVar[tuple[ParamSpec, ...]]
    failure: ClassVar[StorageErrorKind]
    """The storage error an injected failure of this verb's job reports."""
    registers_rollback: ClassVar[bool] = True
    """Whether the job registers a rollback (VDSM's ``pushRecovery``): when it does, a revert of
    the finished task and the abort of a failed job undo the job's effect; when it does not,
    the rollback has nothing to undo and the task still ends recovered."""

    def __init__(self) -> None:
        self._specs = {spec.name: spec for spec in self.params}
        self._checks = {spec.name: (_CHECKS[spec.kind], spec.required) for spec in self.params}
        self._required = tuple(spec.name for spec in self.params if spec.required)

    def parse(self, params: Mapping[str, Any], pool: str) -> VerbCall:
        """Check ``params`` and reduce them to a :class:`VerbCall`.

        Raises SpmError 1000 naming the parameter that is unknown, missing or ill-typed, and 309
        when ``spUUID`` is not ``pool``.
        """
        if not isinstance(params, Mapping):
            raise invalid_parameter("params", params, f"{self.name}: must be a mapping")
        checks = self._checks
        for name, value in params.items():
            check = checks.get(name)
            if check is None:
                raise invalid_parameter(
                    str(name), value,
                    f"unknown parameter of {self.name}; known: {', '.join(sorted(checks))}")
            (ok, reason), required = check
            if value is None and not required:
                continue
            if not ok(value):
                raise invalid_parameter(name, value, f"{self.name}: {reason}")
        for name in self._required:
            if params.get(name) is None:
                raise invalid_parameter(name, None, f"{self.name}: required parameter is missing")
        if params["spUUID"] != pool:
            raise StorageFailure(STORAGE_POOL_UNKNOWN, (params["spUUID"],)).to_spm_error()
        return self._build(params)

    @abc.abstractmethod
    def _build(self, params: Mapping[str, Any]) -> VerbCall:
        """The call for checked parameters; may raise SpmError for parameters that conflict."""

    @abc.abstractmethod
    def locks(self, call: VerbCall) -> tuple[LockSpec, ...]:
        """The image locks the job takes, sorted in VDSM's acquisition order."""

    def prepare(self, call: VerbCall, ledger: Ledger) -> None:  # noqa: B027
        """Fire-time checks against the storage; raise StorageFailure to refuse the verb (with
        ``duplicate_of`` when what is missing was removed by another task's effect)."""

    def fire_effect(self, call: VerbCall, ledger: Ledger, task_id: str,
                    at: float) -> list[Op]:
        """What the API call itself changes once the verb is accepted as task ``task_id``
        (after :meth:`prepare`); applied at once and never undone. None by default."""
        return []

    @abc.abstractmethod
    def plan(self, call: VerbCall, ledger: Ledger, task_id: str, at: float) -> Plan:
        """The job's effect on the storage as it is now; raises StorageFailure when a
        precondition does not hold."""

    def failure_value(self, call: VerbCall) -> object:
        """The value of the error an injected failure reports."""
        return (f"injected failure of {self.name} on image {call.img}",)

    # ---- helpers -----------------------------------------------------------------------------

    def _new(self, kind: Literal["volume", "image", "synced"], sd: str, img: str,
             vol: str | None, task_id: str, at: float) -> LedgerObject:
        return LedgerObject(kind, sd, img, vol, task_id, self.name, at)


def _opt(params: Mapping[str, Any], name: str) -> str | None:
    value = params.get(name)
    if value is None or value == BLANK_UUID:
        return None
    return str(value)


def _sorted_locks(*locks: LockSpec) -> tuple[LockSpec, ...]:
    return tuple(sorted(locks))


_BOOLS: Final = (ParamSpec("postZero", "bool"), ParamSpec("force", "bool"),
                 ParamSpec("discard", "bool"))


class CreateVolume(Verb):
    """``createVolume``: a new volume in an image (the image is made with its first volume).

    Locks the image exclusively (and a template's image shared). Fails with 212 when the volume
    exists (a duplicated effect) and 201 when the parent volume is missing. Rollback removes the
    volume, and the image when this task made it.
    """

    name = "createVolume"
    params = (
        ParamSpec("sdUUID", "uuid", True), ParamSpec("spUUID", "uuid", True),
        ParamSpec("imgUUID", "uuid", True), ParamSpec("volUUID", "uuid", True),
        ParamSpec("size", "int"), ParamSpec("volFormat", "int_or_str"),
        ParamSpec("preallocate", "int_or_str"), ParamSpec("diskType", "str"),
        ParamSpec("desc", "str"), ParamSpec("srcImgUUID", "uuid"),
        ParamSpec("srcVolUUID", "uuid"), ParamSpec("initialSize", "int"),
        ParamSpec("addBitmaps", "bool"), ParamSpec("legal", "bool"),
        ParamSpec("sequence", "int"),
    )
    failure = VOLUME_CREATION_ERROR

    def _build(self, params: Mapping[str, Any]) -> VerbCall:
        return VerbCall(self.name, params["sdUUID"], params["imgUUID"], vol=params["volUUID"],
                        src_img=_opt(params, "srcImgUUID"), src_vol=_opt(params, "srcVolUUID"))

    def locks(self, call: VerbCall) -> tuple[LockSpec, ...]:
        own = (image_resource(call.sd, call.img), True)
        if call.src_img is not None and call.src_img != call.img:
            return _sorted_locks(own, (image_resource(call.sd, call.src_img), False))
        return (own,)

    def plan(self, call: VerbCall, ledger: Ledger, task_id: str, at: float) -> Plan:
        assert call.vol is not None
        key = volume_key(call.sd, call.img, call.vol)
        existing = ledger.get(key)
        if existing is not None:
            raise StorageFailure(VOLUME_ALREADY_EXISTS, (call.vol,), (key, existing.task_id))
        if call.src_vol is not None:
            parent_img = call.src_img or call.img
            if volume_key(call.sd, parent_img, call.src_vol) not in ledger:
                raise StorageFailure(VOLUME_DOES_NOT_EXIST, (call.src_vol,))
        ops: list[Op] = []
        if image_key(call.sd, call.img) not in ledger:
            ops.append(("create", self._new("image", call.sd, call.img, None, task_id, at)))
        ops.append(("create", self._new("volume", call.sd, call.img, call.vol, task_id, at)))
        return ops, []


def _image_removal(ledger: Ledger, sd: str, img: str, vols: Sequence[str]) -> list[Op]:
    """Remove ``vols`` of an image; the image (and its sync mark) go with its last volume."""
    ops: list[Op] = []
    for vol in vols:
        obj = ledger.get(volume_key(sd, img, vol))
        if obj is not None:
            ops.append(("remove", obj))
    remaining = set(ledger.volumes_of(sd, img)) - set(vols)
    if not remaining:
        for key in (synced_key(sd, img), image_key(sd, img)):
            obj = ledger.get(key)
            if obj is not None:
                ops.append(("remove", obj))
    return ops


class DeleteVolume(Verb):
    """``deleteVolume``: remove volumes of an image (``volumes``, or a single ``volUUID``).

    Locks the image exclusively. Fails with 201 when a volume is missing (a duplicated effect when
    another task already deleted it). Removing an image's last volume removes the image. Rollback
    puts the removed objects back.
    """

    name = "deleteVolume"
    params = (
        ParamSpec("sdUUID", "uuid", True), ParamSpec("spUUID", "uuid", True),
        ParamSpec("imgUUID", "uuid", True), ParamSpec("volumes", "uuid_list"),
        ParamSpec("volUUID", "uuid"), *_BOOLS,
    )
    failure = CANNOT_DELETE_VOLUME

    def _build(self, params: Mapping[str, Any]) -> VerbCall:
        volumes = params.get("volumes")
        vol = params.get("volUUID")
        if volumes is None and vol is None:
            raise invalid_parameter("volumes", None,
                                    "deleteVolume: required parameter is missing (or volUUID)")
        if volumes is not None and vol is not None:
            raise invalid_parameter("volUUID", vol, "deleteVolume: give volumes or volUUID, "
                                    "not both")
        vols = tuple(volumes) if volumes is not None else (str(vol),)
        return VerbCall(self.name, params["sdUUID"], params["imgUUID"], volumes=vols)

    def locks(self, call: VerbCall) -> tuple[LockSpec, ...]:
        return ((image_resource(call.sd, call.img), True),)

    def plan(self, call: VerbCall, ledger: Ledger, task_id: str, at: float) -> Plan:
        for vol in call.volumes:
            key = volume_key(call.sd, call.img, vol)
            if key not in ledger:
                remover = ledger.removed_by(key)
                dup = (key, remover) if remover is not None and remover != task_id else None
                raise StorageFailure(VOLUME_DOES_NOT_EXIST, (vol,), dup)
        return _image_removal(ledger, call.sd, call.img, call.volumes), []


class CopyImage(Verb):
    """``copyImage``: copy a volume (collapsed) to a new volume of a destination image.

    Locks the source image shared and the destination image exclusively. Fails with 201 when the
    source volume is missing and 212 when the destination volume exists (a duplicated effect).
    Rollback removes the destination volume, and its image when this task made it.
    """

    name = "copyImage"
    params = (
        ParamSpec("sdUUID", "uuid", True), ParamSpec("spUUID", "uuid", True),
        ParamSpec("vmUUID", "uuid"), ParamSpec("srcImgUUID", "uuid", True),
        ParamSpec("srcVolUUID", "uuid", True), ParamSpec("dstImgUUID", "uuid", True),
        ParamSpec("dstVolUUID", "uuid", True), ParamSpec("description", "str"),
        ParamSpec("dstSdUUID", "uuid"), ParamSpec("volType", "int_or_str"),
        ParamSpec("volFormat", "int_or_str"), ParamSpec("preallocate", "int_or_str"), *_BOOLS,
    )
    failure = COPY_IMAGE_ERROR

    def _build(self, params: Mapping[str, Any]) -> VerbCall:
        sd = params["sdUUID"]
        dst_sd = _opt(params, "dstSdUUID") or sd
        if dst_sd == sd and params["srcImgUUID"] == params["dstImgUUID"]:
            raise invalid_parameter("dstImgUUID", params["dstImgUUID"],
                                    "copyImage: same image as the source on the same domain")
        return VerbCall(self.name, sd, params["srcImgUUID"], src_img=params["srcImgUUID"],
                        src_vol=params["srcVolUUID"], dst_sd=dst_sd,
                        dst_img=params["dstImgUUID"], dst_vol=params["dstVolUUID"])

    def locks(self, call: VerbCall) -> tuple[LockSpec, ...]:
        assert call.src_img is not None and call.dst_sd is not None and call.dst_img is not None
        return _sorted_locks((image_resource(call.sd, call.src_img), False),
                             (image_resource(call.dst_sd, call.dst_img), True))

    def plan(self, call: VerbCall, ledger: Ledger, task_id: str, at: float) -> Plan:
        assert call.src_img is not None and call.src_vol is not None
        assert call.dst_sd is not None and call.dst_img is not None and call.dst_vol is not None
        if volume_key(call.sd, call.src_img, call.src_vol) not in ledger:
            raise StorageFailure(VOLUME_DOES_NOT_EXIST, (call.src_vol,))
        key = volume_key(call.dst_sd, call.dst_img, call.dst_vol)
        existing = ledger.get(key)
        if existing is not None:
            raise StorageFailure(VOLUME_ALREADY_EXISTS, (call.dst_vol,), (key, existing.task_id))
        ops: list[Op] = []
        if image_key(call.dst_sd, call.dst_img) not in ledger:
            ops.append(("create", self._new("image", call.dst_sd, call.dst_img, None, task_id,
                                            at)))
        ops.append(("create", self._new("volume", call.dst_sd, call.dst_img, call.dst_vol,
                                        task_id, at)))
        return ops, []

    def failure_value(self, call: VerbCall) -> object:
        return (f"injected failure of copyImage to image {call.dst_img}",)


def _missing_image(ledger: Ledger, sd: str, img: str, task_id: str) -> StorageFailure:
    key = image_key(sd, img)
    remover = ledger.removed_by(key)
    dup = (key, remover) if remover is not None and remover != task_id else None
    return StorageFailure(IMAGE_DOES_NOT_EXIST_IN_SD, f"image={img}, domain={sd}", dup)


class DeleteImage(Verb):
    """``deleteImage``: remove an image with all its volumes (and its sync mark).

    As VDSM's ``hsm.deleteImage``: the API call checks that the image is there (refused with 268
    otherwise, a duplicated effect when another task's effect removed it; no task is made) and,
    without ``postZero``, removes it right there (``pool.deleteImage``); the task's job only
    purges what was removed (``purgeImage``). With ``postZero`` the job zeroes the volumes and
    removes the image at its end (``zeroImage``), failing with 268 when it went away meanwhile
    (a duplicated effect when another task deleted it). Neither job registers a rollback: a
    revert, a stop or a failed job never puts the image back. Locks the image exclusively.
    """

    name = "deleteImage"
    params = (
        ParamSpec("sdUUID", "uuid", True), ParamSpec("spUUID", "uuid", True),
        ParamSpec("imgUUID", "uuid", True), *_BOOLS,
    )
    failure = IMAGE_DELETE_ERROR
    registers_rollback = False

    def _build(self, params: Mapping[str, Any]) -> VerbCall:
        post_zero = params.get("postZero")
        return VerbCall(self.name, params["sdUUID"], params["imgUUID"],
                        post_zero=post_zero is True or (
                            isinstance(post_zero, str) and post_zero.lower() == "true"))

    def locks(self, call: VerbCall) -> tuple[LockSpec, ...]:
        return ((image_resource(call.sd, call.img), True),)

    def prepare(self, call: VerbCall, ledger: Ledger) -> None:
        if image_key(call.sd, call.img) not in ledger:
            raise _missing_image(ledger, call.sd, call.img, "")

    def fire_effect(self, call: VerbCall, ledger: Ledger, task_id: str,
                    at: float) -> list[Op]:
        if call.post_zero:
            return []
        return _image_removal(ledger, call.sd, call.img, ledger.volumes_of(call.sd, call.img))

    def plan(self, call: VerbCall, ledger: Ledger, task_id: str, at: float) -> Plan:
        if not call.post_zero:
            return [], []  # purgeImage: the image was removed when the verb was accepted
        if image_key(call.sd, call.img) not in ledger:
            raise _missing_image(ledger, call.sd, call.img, task_id)
        return _image_removal(ledger, call.sd, call.img, ledger.volumes_of(call.sd, call.img)), []


def _two_domains(verb: str, params: Mapping[str, Any]) -> VerbCall:
    if params["sdUUID"] == params["dstSdUUID"]:
        raise invalid_parameter("dstSdUUID", params["dstSdUUID"],
                                f"{verb}: must differ from sdUUID")
    return VerbCall(verb, params["sdUUID"], params["imgUUID"], dst_sd=params["dstSdUUID"])


def _two_domain_locks(call: VerbCall) -> tuple[LockSpec, ...]:
    assert call.dst_sd is not None
    return _sorted_locks((image_resource(call.sd, call.img), False),
                         (image_resource(call.dst_sd, call.img), True))


class CloneImageStructure(Verb):
    """``cloneImageStructure``: the image's volume chain, empty, on a destination domain.

    Locks the source image shared and the destination image exclusively. Fails with 268 when the
    source image is not there and 212 when a destination volume exists (a duplicated effect).
    Rollback removes what it made.
    """

    name = "cloneImageStructure"
    params = (
        ParamSpec("spUUID", "uuid", True), ParamSpec("sdUUID", "uuid", True),
        ParamSpec("imgUUID", "uuid", True), ParamSpec("dstSdUUID", "uuid", True),
    )
    failure = IMAGES_ACTION_ERROR

    def _build(self, params: Mapping[str, Any]) -> VerbCall:
        return _two_domains(self.name, params)

    def locks(self, call: VerbCall) -> tuple[LockSpec, ...]:
        return _two_domain_locks(call)

    def plan(self, call: VerbCall, ledger: Ledger, task_id: str, at: float) -> Plan:
        assert call.dst_sd is not None
        vols = ledger.volumes_of(call.sd, call.img)
        if image_key(call.sd, call.img) not in ledger or not vols:
            raise _missing_image(ledger, call.sd, call.img, task_id)
        ops: list[Op] = []
        if image_key(call.dst_sd, call.img) not in ledger:
            ops.append(("create", self._new("image", call.dst_sd, call.img, None, task_id, at)))
        for vol in vols:
            key = volume_key(call.dst_sd, call.img, vol)
            existing = ledger.get(key)
            if existing is not None:
                raise StorageFailure(VOLUME_ALREADY_EXISTS, (vol,), (key, existing.task_id))
            ops.append(("create", self._new("volume", call.dst_sd, call.img, vol, task_id, at)))
        return ops, []


class SyncImageData(Verb):
    """``syncImageData``: copy the image's data to its structure on a destination domain.

    Locks the source image shared and the destination image exclusively. Fails with 268 when the
    source or the destination image is not there. Syncing again succeeds (as in VDSM) and counts
    as a duplicated effect. The effect is the ``synced`` mark; rollback removes it.
    """

    name = "syncImageData"
    params = (
        ParamSpec("spUUID", "uuid", True), ParamSpec("sdUUID", "uuid", True),
        ParamSpec("imgUUID", "uuid", True), ParamSpec("dstSdUUID", "uuid", True),
        ParamSpec("syncType", "str"),
    )
    failure = COPY_IMAGE_ERROR

    def _build(self, params: Mapping[str, Any]) -> VerbCall:
        return _two_domains(self.name, params)

    def locks(self, call: VerbCall) -> tuple[LockSpec, ...]:
        return _two_domain_locks(call)

    def plan(self, call: VerbCall, ledger: Ledger, task_id: str, at: float) -> Plan:
        assert call.dst_sd is not None
        if image_key(call.sd, call.img) not in ledger:
            raise _missing_image(ledger, call.sd, call.img, task_id)
        if image_key(call.dst_sd, call.img) not in ledger:
            raise _missing_image(ledger, call.dst_sd, call.img, task_id)
        key = synced_key(call.dst_sd, call.img)
        existing = ledger.get(key)
        if existing is not None:
            return [], [(key, existing.task_id)]
        return [("create", self._new("synced", call.dst_sd, call.img, None, task_id, at))], []


VERBS: Final[Mapping[str, Verb]] = {
    v.name: v
    for v in (CreateVolume(), DeleteVolume(), CopyImage(), DeleteImage(),
              CloneImageStructure(), SyncImageData())
}
"""The verbs the simulator runs, by name."""


def verb_for(name: object) -> Verb:
    """The verb called ``name``; raises GenericError (100) naming the known verbs otherwise."""
    verb = VERBS.get(name) if isinstance(name, str) else None
    if verb is None:
        raise GenericError(f"unknown SPM verb {name!r}; known: {', '.join(sorted(VERBS))}")
    return verb
