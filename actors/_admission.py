"""Admission: how many of a pool's chains run at once.

Every submitted chain is accepted at once (recorded, listed, cancellable), but a chain only
*runs* — gets a CommandActor that fires its first step — when its pool admits it. A pool admits
chains first come first served while fewer than ``limit`` of its chains run; the others wait.

The limit adapts to what the runtime itself adds to a chain's reaction latency: the time from a
task's end seen by the poller to the next task of its chain fired (and from a chain's admission
to its first task fired). Those delays are sampled as the pool's SpmTaskActor fires; once per
window the limit is moved toward what keeps their 90th percentile under ``target_s``:

- above the target, the limit shrinks in proportion (at most halved in one window): more
  chains running at once only makes every one of them wait longer for its next step;
- well under it, the limit actually binding (chains wait) and no request waiting for an SPM
  slot (more chains would only queue there), it grows (doubles in a window when the delays are
  under half the target, 5 % up to 80 %);
- a window with too few samples to judge (tasks that take minutes fire rarely) grows a binding
  limit (doubles it) when nothing waits for an SPM slot either and what samples there are are
  well under the target: little is fired because little is
  running, not because the runtime is behind. :meth:`tick` (every poll) ends such windows even
  when nothing is fired at all.

A pool starts at ``initial`` (4) and ramps up from there, a slow start: the chains that run
while thousands more are being submitted share the interpreter with the submitting thread, and
fewer of them wait for it.

Without an adaptive target (``target_s=None``) the limit is fixed (``maximum``; None: no limit).
The delays that count are the runtime's own share of the reaction latency; the poll interval
comes on top. A slow SPM makes them grow too (requests wait for a free slot): the limit then
settles where the SPM's slots are kept full, with the rest of the chains waiting unstarted
rather than half done.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar

__all__ = ["PoolAdmission"]

T = TypeVar("T")


class PoolAdmission(Generic[T]):
    """The admission of one pool's chains (thread-safe). ``T`` is whatever the caller starts."""

    __slots__ = (
        "_clock", "_dated", "_deadlines", "_lock", "_samples", "_seq", "_window_end", "limit",
        "maximum", "minimum", "running", "target_s", "waiting", "window_s",
    )

    def __init__(
        self,
        *,
        target_s: float | None,
        initial: int = 4,
        minimum: int = 4,
        maximum: int | None = None,
        window_s: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.target_s = target_s
        self.minimum = max(1, minimum)
        self.maximum = maximum
        if target_s is None:
            self.limit = float(maximum) if maximum is not None else float("inf")
        else:
            start = max(self.minimum, initial)
            self.limit = float(min(start, maximum) if maximum is not None else start)
        self.window_s = window_s
        self.running = 0
        self.waiting: deque[T] = deque()
        # [deadline, seq, chain] of the waiting chains that have one (wall clock), a heap; the
        # chain is set to None when it stops waiting (admitted, removed), and the heap is
        # rebuilt when such husks make up most of it
        self._deadlines: list[list[Any]] = []
        self._dated: dict[int, list[Any]] = {}  # id(chain) -> its heap entry, while waiting
        self._seq = itertools.count()
        self._samples: list[float] = []
        self._clock = clock
        self._window_end = clock() + window_s
        self._lock = threading.Lock()

    # -- chains coming and going -------------------------------------------------------------

    def offer(self, item: T, deadline: float | None = None) -> bool:
        """A new chain: True when it runs now (the caller starts it), False when it waits
        (until admitted, or until :meth:`expired` hands it back after ``deadline``)."""
        with self._lock:
            if not self.waiting and self.running < self.limit:
                self.running += 1
                return True
            self.waiting.append(item)
            if deadline is not None:
                entry = [deadline, next(self._seq), item]
                self._dated[id(item)] = entry
                heap = self._deadlines
                if len(heap) > 1024 and len(heap) > 2 * len(self._dated):
                    heap[:] = [e for e in heap if e[2] is not None]
                    heapq.heapify(heap)
                heapq.heappush(heap, entry)
            return False

    def _undate(self, item: T) -> None:
        entry = self._dated.pop(id(item), None)
        if entry is not None:
            entry[2] = None
            if not self._dated:
                self._deadlines.clear()  # only husks left

    def expired(self, now: float) -> list[T]:
        """The waiting chains whose deadline passed, taken out of the queue and counted as
        running (the caller starts them, to end them)."""
        out: list[T] = []
        heap = self._deadlines
        if not heap or heap[0][0] > now:
            return out
        with self._lock:
            while heap and heap[0][0] <= now:
                item = heapq.heappop(heap)[2]
                if item is None:
                    continue  # admitted or removed meanwhile
                self._undate(item)
                self.waiting.remove(item)
                self.running += 1
                out.append(item)
        return out

    def enter(self) -> None:
        """A chain that runs regardless (resumed half done, or cancelled while waiting)."""
        with self._lock:
            self.running += 1

    def remove(self, item: T) -> bool:
        """Take a waiting chain out (True), or say it is not waiting (False)."""
        with self._lock:
            try:
                self.waiting.remove(item)
            except ValueError:
                return False
            self._undate(item)
            return True

    def ended(self) -> list[T]:
        """A running chain ended: the waiting chains that run now, in order."""
        with self._lock:
            self.running = max(0, self.running - 1)
            return self._admit()

    # -- adapting ----------------------------------------------------------------------------

    def observe(self, delay_s: float, idle: bool = True) -> list[T]:
        """One delay of the runtime's own (seconds); at the end of a window the limit moves.
        ``idle``: no request waits for an SPM slot. Returns the waiting chains that run now
        (when the limit grew)."""
        if self.target_s is None:
            return []
        now = self._clock()
        with self._lock:
            self._samples.append(delay_s)
            if now < self._window_end:
                return []
            return self._adapt(now, idle)

    def tick(self, idle: bool) -> list[T]:
        """End the window if its time is up, even without samples; ``idle``: no request waits
        for an SPM slot. Returns the waiting chains that run now."""
        if self.target_s is None:
            return []
        now = self._clock()
        with self._lock:
            if now < self._window_end:
                return []
            return self._adapt(now, idle)

    def _adapt(self, now: float, idle: bool = False) -> list[T]:
        samples = self._samples
        self._samples = []
        self._window_end = now + self.window_s
        target = self.target_s
        assert target is not None
        limit = self.limit
        binding = bool(self.waiting) and self.running >= limit - 1 and idle
        if len(samples) < 4:
            # Too few to judge: a binding limit grows if what there is is well under target.
            if binding and not (samples and max(samples) > 0.5 * target):
                limit = limit * 2 + 1
        else:
            samples.sort()
            p90 = samples[(len(samples) * 9) // 10]
            if p90 > target:
                limit *= max(0.5, target / p90)
            elif binding and p90 < 0.5 * target:
                limit = limit * 2 + 1
            elif binding and p90 < 0.8 * target:
                limit = limit * 1.05 + 1
        limit = max(float(self.minimum), limit)
        if self.maximum is not None:
            limit = min(float(self.maximum), limit)
        self.limit = limit
        return self._admit()

    def _admit(self) -> list[T]:
        out: list[T] = []
        waiting = self.waiting
        while waiting and self.running < self.limit:
            item = waiting.popleft()
            if self._dated:
                self._undate(item)
            out.append(item)
            self.running += 1
        return out
