"""A scripted SpmClient for actor tests: tasks end when the test says so (or at once).

Unlike the simulator it models no VDSM internals; it lets a test decide exactly when and how
each task ends, and records every call, so tests can pin the runtime's behaviour step by step.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from spm._client import SpmClient, TaskInfo, TaskStatus
from spm._errors import SpmError, TaskNotFinishedError, TaskStateError, UnknownTaskError


@dataclass
class FakeTask:
    task_id: str
    verb: str
    params: Mapping[str, Any]
    state: str = "running"
    result: str = ""
    code: int = 0
    message: str = ""

    def status(self) -> TaskStatus:
        return {"taskID": self.task_id, "taskState": self.state,  # type: ignore[typeddict-item]
                "taskResult": self.result, "code": self.code,  # type: ignore[typeddict-item]
                "message": self.message}


@dataclass
class FakeSpm(SpmClient):
    pool: str = "pool-a"
    auto: str | None = None          # "success": tasks end at once; None: the test ends them
    fail_verbs: set[str] = field(default_factory=set)  # verbs whose tasks fail (auto mode)
    refuse: Callable[[str, Mapping[str, Any]], SpmError | None] | None = None
    poll_error: Exception | None = None

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        self.tasks: dict[str, FakeTask] = {}
        self.fired: list[FakeTask] = []
        self.calls: list[tuple[str, Any]] = []
        self.fired_event = threading.Condition(self.lock)
        self.polls = 0
        self.max_running = 0

    # -- test controls -------------------------------------------------------------------

    def finish(self, task_id: str, ok: bool = True, code: int = 0, message: str = "") -> None:
        with self.lock:
            t = self.tasks[task_id]
            t.state = "finished"
            if ok:
                t.result, t.code, t.message = "success", 0, "1 jobs completed successfully"
            else:
                t.result = "cleanSuccess"
                t.code = code or 205
                t.message = message or f"value=failed abortedcode={t.code}"

    def wait_fired(self, n: int, timeout: float = 10.0) -> list[FakeTask]:
        with self.fired_event:
            if not self.fired_event.wait_for(lambda: len(self.fired) >= n, timeout):
                raise TimeoutError(f"{len(self.fired)} tasks fired, wanted {n}")
            return list(self.fired)

    def running(self) -> int:
        return sum(1 for t in self.tasks.values() if t.state != "finished")

    # -- SpmClient -----------------------------------------------------------------------

    def fire(self, verb: str, params: Mapping[str, Any]) -> str:
        with self.lock:
            self.calls.append(("fire", verb))
            if self.refuse is not None:
                err = self.refuse(verb, params)
                if err is not None:
                    raise err
            t = FakeTask(str(uuid.uuid4()), verb, dict(params))
            self.tasks[t.task_id] = t
            self.fired.append(t)
            if self.auto == "success":
                ok = verb not in self.fail_verbs
                t.state = "finished"
                t.result = "success" if ok else "cleanSuccess"
                t.code = 0 if ok else 205
                t.message = "" if ok else "value=x abortedcode=205"
            self.max_running = max(self.max_running, self.running())
            self.fired_event.notify_all()
            return t.task_id

    def getAllTasksStatuses(self) -> dict[str, TaskStatus]:  # noqa: N802
        with self.lock:
            self.polls += 1
            if self.poll_error is not None:
                raise self.poll_error
            return {tid: t.status() for tid, t in self.tasks.items()}

    def getAllTasksInfo(self) -> dict[str, TaskInfo]:  # noqa: N802
        with self.lock:
            return {tid: {"id": tid, "verb": t.verb} for tid, t in self.tasks.items()}

    def getTaskStatus(self, task_id: str) -> TaskStatus:  # noqa: N802
        with self.lock:
            if task_id not in self.tasks:
                raise UnknownTaskError()
            return self.tasks[task_id].status()

    def clearTask(self, task_id: str) -> None:  # noqa: N802
        with self.lock:
            self.calls.append(("clear", task_id))
            t = self.tasks.get(task_id)
            if t is None:
                raise UnknownTaskError()
            if t.state != "finished":
                raise TaskStateError()
            del self.tasks[task_id]

    def stopTask(self, task_id: str) -> None:  # noqa: N802
        with self.lock:
            self.calls.append(("stop", task_id))
            t = self.tasks.get(task_id)
            if t is None:
                raise UnknownTaskError()
            if t.state != "finished":
                t.state, t.result, t.code = "finished", "cleanSuccess", 411
                t.message = "value=Task is aborted abortedcode=411"

    def revertTask(self, task_id: str) -> None:  # noqa: N802
        with self.lock:
            self.calls.append(("revert", task_id))
            t = self.tasks.get(task_id)
            if t is None:
                raise UnknownTaskError()
            if t.state != "finished":
                raise TaskNotFinishedError()
            t.result, t.code = "cleanSuccess", 0
