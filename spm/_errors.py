"""Typed SPM errors carrying VDSM's error codes.

Every failure of an :class:`~spm.SpmClient` call is an :class:`SpmError` (or a subclass) whose
``code`` is the number VDSM answers with, so a caller can branch on the class or on the code and
get the same result whether the SPM is in-process or across the wire.
"""

from __future__ import annotations

from typing import ClassVar


class SpmError(Exception):
    """An SPM call failed. ``code`` is VDSM's error code, ``message`` its text."""

    code: ClassVar[int] = 100
    default_message: ClassVar[str] = "General Exception"

    def __init__(self, message: str | None = None, *, code: int | None = None) -> None:
        self.message = message if message is not None else self.default_message
        if code is not None:
            # An instance may carry a more specific code than its class (for example a storage
            # error code reported through a GenericError).
            self.code = code  # type: ignore[misc]
        super().__init__(f"{self.message} (code {self.code})")

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_error, (type(self), self.message, self.code))


def _rebuild_error(cls: type[SpmError], message: str, code: int) -> SpmError:
    return cls(message, code=code)


class GenericError(SpmError):
    """VDSM code 100: a general exception."""

    code = 100
    default_message = "General Exception"


class NotReadyError(SpmError):
    """VDSM code 99: the host is not ready (still recovering, or shutting down)."""

    code = 99
    default_message = "Recovering from crash or Initializing"


class UnknownTaskError(SpmError):
    """VDSM code 401: no task with that id on this SPM."""

    code = 401
    default_message = "Task id unknown"


class TaskNotFinishedError(SpmError):
    """VDSM code 403: the verb needs a finished task (``revertTask`` on an unfinished one)."""

    code = 403
    default_message = "Task not finished"


class TaskStateError(SpmError):
    """VDSM code 410: the task is in the wrong state for the verb (``clearTask`` too early)."""

    code = 410
    default_message = "Operation is not allowed in this task state"


class TaskAbortedError(SpmError):
    """VDSM code 411: the task was aborted (``stopTask``) and rolled back."""

    code = 411
    default_message = "Task is aborted"


class IllegalTransitionError(SpmError):
    """VDSM code 441: an illegal transition of a task's internal state."""

    code = 441
    default_message = "Task state transition error"


class NotSpmError(SpmError):
    """VDSM code 654: this host is not the SPM of the pool."""

    code = 654
    default_message = "Not SPM"


class ResourceTimeoutError(SpmError):
    """VDSM code 851: a resource lock could not be acquired in time."""

    code = 851
    default_message = "Resource timeout"


class SpmTimeoutError(SpmError):
    """The SPM did not answer a call in time (no VDSM code; reported with code 100)."""

    code = 100
    default_message = "SPM call timed out"


class SpmConnectionError(SpmError):
    """The connection to the SPM failed or dropped with the call in flight (code 100)."""

    code = 100
    default_message = "Connection to the SPM failed"


class BadAnswerError(SpmError):
    """The SPM answered with something of the wrong shape. Fails the call, never the caller."""

    code = 100
    default_message = "SPM answer of the wrong shape"


_BY_CODE: dict[int, type[SpmError]] = {
    cls.code: cls
    for cls in (
        NotReadyError,
        UnknownTaskError,
        TaskNotFinishedError,
        TaskStateError,
        TaskAbortedError,
        IllegalTransitionError,
        NotSpmError,
        ResourceTimeoutError,
    )
}


def error_for_code(code: int, message: str | None = None) -> SpmError:
    """The typed error for a VDSM code; codes without a class of their own give SpmError."""
    cls = _BY_CODE.get(code)
    if cls is None:
        return SpmError(message, code=code)
    return cls(message)
