"""One thread that calls functions at given times: the runtime's clock for ticks and deadlines."""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)


class TimerHandle:
    """What :meth:`Scheduler.call_at` returns: :meth:`cancel` it and ``fn`` is never called.

    Cancelling drops the function at once (a chain's deadline timer would otherwise keep the
    chain's whole state alive until the deadline, hours later); the scheduler forgets the
    cancelled entries when they make up most of its queue.
    """

    __slots__ = ("cancelled", "fn", "scheduler")

    def __init__(self, fn: Callable[[], None] | None = None,
                 scheduler: Scheduler | None = None) -> None:
        self.cancelled = False
        self.fn = fn
        self.scheduler = scheduler

    def cancel(self) -> None:
        if self.cancelled:
            return
        self.cancelled = True
        self.fn = None
        scheduler = self.scheduler
        if scheduler is not None:
            self.scheduler = None
            scheduler._cancelled += 1  # a hint for compaction; exactness is not needed


class Scheduler:
    """Calls ``fn()`` on its own thread at (or just after) a monotonic time.

    Callbacks must be quick (they should only ``tell`` an actor); one that raises is logged and
    the scheduler goes on. :meth:`stop` ends the thread; timers not yet due are dropped.
    """

    def __init__(self, name: str = "spmchain-timer") -> None:
        self._heap: list[tuple[float, int, TimerHandle]] = []
        self._cancelled = 0
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def call_later(self, delay: float, fn: Callable[[], None]) -> TimerHandle:
        return self.call_at(time.monotonic() + max(0.0, delay), fn)

    def call_at(self, when: float, fn: Callable[[], None]) -> TimerHandle:
        handle = TimerHandle(fn, self)
        with self._cond:
            if self._stopped:
                handle.cancelled = True
                handle.fn = handle.scheduler = None
                return handle
            heap = self._heap
            if self._cancelled > 1024 and self._cancelled * 2 > len(heap):
                heap[:] = [e for e in heap if not e[2].cancelled]
                heapq.heapify(heap)
                self._cancelled = 0
            entry = (when, next(self._seq), handle)
            heapq.heappush(heap, entry)
            if self._heap[0] is entry:
                self._cond.notify()
        return handle

    def _run(self) -> None:
        heap = self._heap
        while True:
            with self._cond:
                while True:
                    if self._stopped:
                        return
                    if heap:
                        delay = heap[0][0] - time.monotonic()
                        if delay <= 0:
                            break
                        self._cond.wait(delay)
                    else:
                        self._cond.wait()
                due = []
                now = time.monotonic()
                while heap and heap[0][0] <= now:
                    due.append(heapq.heappop(heap))
            for _when, _seq, handle in due:
                fn = handle.fn
                if fn is None or handle.cancelled:
                    continue
                handle.fn = handle.scheduler = None
                try:
                    fn()
                except Exception:
                    logger.exception("timer callback %r raised", fn)

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopped = True
            self._heap.clear()
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
