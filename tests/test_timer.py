"""The runtime's timer thread: calls due functions, forgets cancelled ones."""

from __future__ import annotations

import gc
import threading
import weakref

import pytest
from conftest import WAIT

from actors._timer import Scheduler

pytestmark = pytest.mark.timeout(30)


class _Payload:
    """Stands for what a chain's deadline timer keeps: the chain's state."""


@pytest.fixture
def scheduler() -> Scheduler:
    s = Scheduler(name="test-timer")
    yield s  # type: ignore[misc]
    s.stop()


def test_due_functions_are_called_in_time_order(scheduler: Scheduler) -> None:
    calls: list[int] = []
    done = threading.Event()
    scheduler.call_later(0.02, lambda: calls.append(2))
    scheduler.call_later(0.0, lambda: calls.append(1))
    scheduler.call_later(0.04, lambda: (calls.append(3), done.set()))
    assert done.wait(WAIT)
    assert calls == [1, 2, 3]


def test_a_cancelled_timer_is_not_called_and_lets_go_of_its_function_at_once(
    scheduler: Scheduler,
) -> None:
    payload = _Payload()
    alive = weakref.ref(payload)
    called = threading.Event()

    def fn(p: _Payload = payload) -> None:
        called.set()

    handle = scheduler.call_later(3600.0, fn)
    del payload, fn
    gc.collect()
    assert alive() is not None  # held by the pending timer
    handle.cancel()
    handle.cancel()  # twice is harmless
    assert alive() is None  # gone long before the timer's hour
    assert not called.is_set()


def test_cancelled_entries_are_dropped_from_the_queue_when_they_dominate(
    scheduler: Scheduler,
) -> None:
    handles = [scheduler.call_later(3600.0, lambda: None) for _ in range(3000)]
    for h in handles[:2500]:
        h.cancel()
    scheduler.call_later(3600.0, lambda: None)  # the next call compacts
    assert len(scheduler._heap) == 501
    fired = threading.Event()
    scheduler.call_later(0.0, fired.set)
    assert fired.wait(WAIT)


def test_after_stop_nothing_is_called(scheduler: Scheduler) -> None:
    called = threading.Event()
    scheduler.stop()
    handle = scheduler.call_later(0.0, called.set)
    assert handle.cancelled
    assert not called.wait(0.05)
