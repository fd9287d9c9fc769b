"""VDSM's internal task states: the transition table and the wire mapping, as data.

The fifteen states and the table of legal moves are VDSM's (``lib/vdsm/storage/task.py``,
``State._moveto``: for each target state, the states a task may come from). Every state change
of a simulated task goes through :func:`move`, so a move the table does not list raises
:class:`~spm._errors.IllegalTransitionError` (441) exactly where VDSM raises
``TaskStateTransitionError``.

On the wire (``getAllTasksStatuses``) the internal state is folded into VDSM's older
``taskState`` / ``taskResult`` pair by :data:`WIRE_STATE` and :data:`WIRE_RESULT` (VDSM's
``DEPRECATED_STATE`` / ``DEPRECATED_RESULT``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final, Literal

from spm._client import TaskResult, TaskState
from spm._errors import IllegalTransitionError

InternalState = Literal[
    "unknown",
    "init",
    "preparing",
    "blocked",
    "acquiring",
    "queued",
    "running",
    "finished",
    "aborting",
    "waitrecover",
    "recovering",
    "racquiring",
    "raborting",
    "recovered",
    "failed",
]
"""A task's internal state, as VDSM's ``task.State`` names it."""

UNKNOWN: Final = "unknown"
INIT: Final = "init"
PREPARING: Final = "preparing"
BLOCKED: Final = "blocked"
ACQUIRING: Final = "acquiring"
QUEUED: Final = "queued"
RUNNING: Final = "running"
FINISHED: Final = "finished"
ABORTING: Final = "aborting"
WAITRECOVER: Final = "waitrecover"
RECOVERING: Final = "recovering"
RACQUIRING: Final = "racquiring"
RABORTING: Final = "raborting"
RECOVERED: Final = "recovered"
FAILED: Final = "failed"

ALL_STATES: Final[tuple[InternalState, ...]] = (
    UNKNOWN,
    INIT,
    PREPARING,
    BLOCKED,
    ACQUIRING,
    QUEUED,
    RUNNING,
    FINISHED,
    ABORTING,
    WAITRECOVER,
    RECOVERING,
    RACQUIRING,
    RABORTING,
    RECOVERED,
    FAILED,
)

MOVE_TO: Final[Mapping[InternalState, frozenset[InternalState]]] = {
    UNKNOWN: frozenset(),
    INIT: frozenset(),
    PREPARING: frozenset({INIT, BLOCKED}),
    BLOCKED: frozenset({PREPARING}),
    ACQUIRING: frozenset({PREPARING, ACQUIRING}),
    QUEUED: frozenset({ACQUIRING, RUNNING}),
    RUNNING: frozenset({QUEUED}),
    FINISHED: frozenset({RUNNING, PREPARING}),
    ABORTING: frozenset({PREPARING, BLOCKED, ACQUIRING, QUEUED, RUNNING}),
    WAITRECOVER: frozenset({ABORTING}),
    RACQUIRING: frozenset({ABORTING, FINISHED, RACQUIRING, WAITRECOVER}),
    RECOVERING: frozenset({RACQUIRING}),
    RABORTING: frozenset({RACQUIRING, RECOVERING, WAITRECOVER}),
    RECOVERED: frozenset({RECOVERING}),
    FAILED: frozenset({RECOVERING, ABORTING, RABORTING}),
}
"""VDSM's legal moves: target state -> the states a task may move to it from."""

DONE: Final[frozenset[InternalState]] = frozenset({FINISHED, RECOVERED, FAILED})
"""States in which a task has ended (``isDone`` in VDSM): it may be cleared or reverted."""

ABORTABLE: Final[frozenset[InternalState]] = MOVE_TO[ABORTING]
"""States from which a stop aborts the task (VDSM's ``canAbort``)."""

WIRE_STATE: Final[Mapping[InternalState, TaskState]] = {
    UNKNOWN: "unknown",
    INIT: "init",
    PREPARING: "running",
    BLOCKED: "running",
    ACQUIRING: "running",
    QUEUED: "running",
    RUNNING: "running",
    FINISHED: "finished",
    ABORTING: "aborting",
    WAITRECOVER: "cleaning",
    RECOVERING: "cleaning",
    RACQUIRING: "cleaning",
    RABORTING: "aborting",
    RECOVERED: "finished",
    FAILED: "finished",
}
"""``taskState`` on the wire for each internal state."""

WIRE_RESULT: Final[Mapping[InternalState, TaskResult]] = {
    UNKNOWN: "",
    INIT: "",
    PREPARING: "",
    BLOCKED: "",
    ACQUIRING: "",
    QUEUED: "",
    RUNNING: "",
    FINISHED: "success",
    ABORTING: "",
    WAITRECOVER: "",
    RECOVERING: "",
    RACQUIRING: "",
    RABORTING: "",
    RECOVERED: "cleanSuccess",
    FAILED: "cleanFailure",
}
"""``taskResult`` on the wire for each internal state."""


def is_legal(current: str, new: str) -> bool:
    """True when VDSM's table allows moving from ``current`` to ``new``.

    A ``new`` that is not a state at all is never legal.
    """
    allowed = MOVE_TO.get(new)  # type: ignore[call-overload]
    return allowed is not None and current in allowed


def move(current: str, new: InternalState) -> InternalState:
    """Check one move against the table and return the new state.

    Raises :class:`IllegalTransitionError` (441) when the table does not allow it, with VDSM's
    text ("cannot move task to requested state: from X to Y").
    """
    if current not in MOVE_TO[new]:
        raise IllegalTransitionError(
            f"cannot move task to requested state: from {current} to {new}"
        )
    return new
