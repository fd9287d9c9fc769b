"""The interface the runtime talks to: one SPM, one storage pool."""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any, Literal, NotRequired, TypedDict

TaskState = Literal["init", "running", "finished", "aborting", "cleaning", "unknown"]
"""``taskState`` as VDSM puts it on the wire."""

TaskResult = Literal["success", "cleanSuccess", "cleanFailure", ""]
"""``taskResult`` as VDSM puts it on the wire."""


class TaskStatus(TypedDict):
    """One task's status as ``getAllTasksStatuses`` / ``getTaskStatus`` return it (VDSM shape)."""

    taskID: str
    taskState: TaskState
    taskResult: TaskResult
    code: int
    message: str


class TaskInfo(TypedDict):
    """One task's info as ``getAllTasksInfo`` returns it (VDSM shape: the verb and the id).

    ``params``, the parameters the verb was fired with, is an extension only the simulator
    gives; when present, crash recovery uses it to prove which task a chain fired.
    """

    id: str
    verb: str
    params: NotRequired[dict[str, Any]]


def task_succeeded(status: TaskStatus) -> bool:
    """True when the task ended and its job succeeded (``finished`` + ``success``)."""
    return status["taskState"] == "finished" and status["taskResult"] == "success"


def task_ended(status: TaskStatus) -> bool:
    """True when the task is done (VDSM's finished, recovered or failed: wire ``finished``)."""
    return status["taskState"] == "finished"


class SpmClient(abc.ABC):
    """The SPM of one storage pool, as the runtime sees it.

    Names and shapes are VDSM's. Every call either returns VDSM's answer or raises an
    :class:`~spm.SpmError` subclass carrying VDSM's code (``UnknownTaskError`` 401,
    ``TaskNotFinishedError`` 403, ``TaskStateError`` 410, ``NotSpmError`` 654, ...). A call that
    goes over a network has a timeout and raises ``SpmTimeoutError`` when it passes; an answer of
    the wrong shape raises ``BadAnswerError``. Implementations are thread-safe.
    """

    pool: str
    """The storage pool id this SPM manages."""

    @abc.abstractmethod
    def fire(self, verb: str, params: Mapping[str, Any]) -> str:
        """Start ``verb`` (``createVolume``, ``copyImage``, ...) as an SPM task.

        Returns the task id the SPM generated. Raises ``SpmError`` when the SPM refuses the verb
        (unknown verb or bad parameters: code 100 or the storage error's code; queue full; not
        SPM: 654), in which case no task exists.
        """

    @abc.abstractmethod
    def getAllTasksStatuses(self) -> dict[str, TaskStatus]:  # noqa: N802
        """Every task the SPM knows, finished or not, by task id."""

    @abc.abstractmethod
    def getAllTasksInfo(self) -> dict[str, TaskInfo]:  # noqa: N802
        """The verb of every task the SPM knows, by task id."""

    @abc.abstractmethod
    def getTaskStatus(self, task_id: str) -> TaskStatus:  # noqa: N802
        """One task's status. Raises ``UnknownTaskError`` (401) for an id the SPM does not know."""

    @abc.abstractmethod
    def clearTask(self, task_id: str) -> None:  # noqa: N802
        """Forget a finished task. 410 when it has not finished, 401 when unknown."""

    @abc.abstractmethod
    def stopTask(self, task_id: str) -> None:  # noqa: N802
        """Abort a task: it rolls back and ends ``finished``/``cleanSuccess`` with code 411.

        Stopping a task that already finished is a no-op, as in VDSM. 401 when unknown.
        """

    @abc.abstractmethod
    def revertTask(self, task_id: str) -> None:  # noqa: N802
        """Run a finished task's rollback. 403 when it has not finished, 401 when unknown."""

    def close(self) -> None:  # noqa: B027
        """Release connections and threads. The default does nothing."""
