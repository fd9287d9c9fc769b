"""Shared fixtures for the actor and runtime tests.

- :class:`ScriptedSpm`: the scripted :class:`FakeSpm` whose every call wakes waiters, so a test
  waits for a condition on the SPM ("3 tasks fired", "2 more polls") instead of sleeping.
- ``make_runtime``: builds started runtimes with fast poll settings and stops them at teardown.
- ``seed``: the seed of a randomised test, from ``SPMCHAIN_SEED`` or fresh; a failing test's
  report shows it (``SPMCHAIN_SEED=<n>`` reproduces the run's choices).
- :func:`step`, :func:`chain` build specs; :class:`EndLog` records every chain end a runtime
  reports.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Generator, Iterator, Mapping
from typing import Any

import pytest
from _fake_spm import FakeSpm, FakeTask

from actors._runtime import ChainResult, Runtime, RuntimeOptions
from actors._spec import ChainSpec, StepSpec

WAIT = 10.0
"""How long a test waits for something that should happen (it fails rather than hangs)."""

FAST: dict[str, Any] = {
    "poll_min_s": 0.005,
    "poll_max_s": 0.05,
    "redeliver_s": 0.1,
    "retry_min_s": 0.01,
    "retry_max_s": 0.1,
}
"""RuntimeOptions for tests: steps take milliseconds, not the production poll interval."""

_SEED_KEY = pytest.StashKey[int]()


class ScriptedSpm(FakeSpm):
    """A FakeSpm that notifies waiters after every call (fire, poll, finish, clear, stop...).

    :meth:`wait_until` predicates run while the SPM's lock is held: they may read attributes
    (``fired``, ``tasks``, ``polls``, ``running()``) but must not call the SPM's own methods.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        self.cond = self.fired_event  # a Condition on self.lock

    def _changed(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def wait_until(self, pred: Callable[[], bool], timeout: float = WAIT) -> bool:
        """Wait until ``pred()`` holds; False when ``timeout`` passes first."""
        with self.cond:
            return self.cond.wait_for(pred, timeout)

    def expect(self, pred: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
        """Wait until ``pred()`` holds; AssertionError naming ``what`` after ``timeout``."""
        if not self.wait_until(pred, timeout):
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")

    def wait_polls(self, n: int, timeout: float = WAIT) -> None:
        """Wait until the SPM has been polled ``n`` more times (failed polls count)."""
        with self.lock:
            target = self.polls + n
        self.expect(lambda: self.polls >= target, f"{n} more polls", timeout)

    def unfinished(self) -> list[FakeTask]:
        """Tasks fired, still listed and not finished, oldest first."""
        with self.lock:
            return [t for t in self.fired if t.task_id in self.tasks and t.state != "finished"]

    def verbs(self) -> list[str]:
        with self.lock:
            return [t.verb for t in self.fired]

    def called(self, kind: str) -> list[Any]:
        """Arguments of the recorded calls of ``kind`` (fire: verbs; clear/stop/revert: ids)."""
        with self.lock:
            return [arg for k, arg in self.calls if k == kind]

    # -- every call wakes the waiters ------------------------------------------------------

    def fire(self, verb: str, params: Mapping[str, Any]) -> str:
        try:
            return super().fire(verb, params)
        finally:
            self._changed()

    def getAllTasksStatuses(self) -> Any:  # noqa: N802
        try:
            return super().getAllTasksStatuses()
        finally:
            self._changed()

    def finish(self, task_id: str, ok: bool = True, code: int = 0, message: str = "") -> None:
        try:
            super().finish(task_id, ok, code, message)
        finally:
            self._changed()

    def clearTask(self, task_id: str) -> None:  # noqa: N802
        try:
            super().clearTask(task_id)
        finally:
            self._changed()

    def stopTask(self, task_id: str) -> None:  # noqa: N802
        try:
            super().stopTask(task_id)
        finally:
            self._changed()

    def revertTask(self, task_id: str) -> None:  # noqa: N802
        try:
            super().revertTask(task_id)
        finally:
            self._changed()


class EndLog:
    """Every chain end a runtime reports through its runtime-wide done callback."""

    def __init__(self, rt: Runtime) -> None:
        self.results: list[ChainResult] = []
        self._cond = threading.Condition()
        rt.add_done_callback(self._ended)

    def _ended(self, result: ChainResult) -> None:
        with self._cond:
            self.results.append(result)
            self._cond.notify_all()

    def wait(self, n: int, timeout: float = WAIT) -> list[ChainResult]:
        """Wait until ``n`` ends were reported; AssertionError saying how many after timeout."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.results) >= n, timeout):
                raise AssertionError(f"{len(self.results)} chains ended within {timeout} s, "
                                     f"wanted {n}")
            return list(self.results)

    def counts(self) -> Counter[str]:
        with self._cond:
            return Counter(r.chain_id for r in self.results)


def wait_until(pred: Callable[[], object], what: str, timeout: float = WAIT) -> None:
    """Check ``pred`` every 10 ms until it holds; AssertionError naming ``what`` after timeout.

    For conditions on the runtime's recorded state or an SPM's task list, which signal nothing
    when they change.
    """
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        pause.wait(0.01)


def step(verb: str, revert: str | None = None, **kw: Any) -> StepSpec:
    return StepSpec(verb, revert_verb=revert, **kw)


def chain(pool: str, *steps: StepSpec, command_type: str = "test", **kw: Any) -> ChainSpec:
    return ChainSpec(pool=pool, command_type=command_type, steps=list(steps), **kw)


@pytest.fixture
def make_runtime() -> Iterator[Callable[..., Runtime]]:
    """``make_runtime(*spms, **options)``: a started Runtime over ``spms`` (ScriptedSpm, each
    naming its pool) with :data:`FAST` options overridden by ``options``; stopped at teardown."""
    made: list[Runtime] = []

    def make(*spms: FakeSpm, **options: Any) -> Runtime:
        rt = Runtime(list(spms), RuntimeOptions(**{**FAST, **options})).start()
        made.append(rt)
        return rt

    yield make
    for rt in made:
        rt.stop(timeout=5.0)


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """The seed of a randomised test: ``SPMCHAIN_SEED`` if set, else a fresh one.

    A failing test's report carries a ``seed`` section saying how to run it again.
    """
    env = os.environ.get("SPMCHAIN_SEED")
    value = int(env) if env else random.randrange(2**32)
    request.node.stash[_SEED_KEY] = value
    print(f"SPMCHAIN_SEED={value}")
    return value


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    value = item.stash.get(_SEED_KEY, None)
    if value is not None and report.failed:
        report.sections.append(("seed", f"rerun with SPMCHAIN_SEED={value}"))
    return report
