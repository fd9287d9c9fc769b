"""Crash points: kill the process at a chosen write-ahead point, for crash tests and chaos.

``SPMCHAIN_CRASH_AT=<point>[:<n>]`` in the environment makes the n-th time (default the first)
the process passes ``<point>`` a ``SIGKILL`` of itself: no cleanup, no flush, exactly what a
crash looks like to the snapshot store and the SPM. The points:

``before_send``
    a step or revert is recorded as being fired (durable), the verb not yet sent to the SPM;
``after_send``
    the SPM answered the task id, which is not yet recorded;
``after_outcome``
    the outcome of a task is recorded (durable), the task not yet cleared on the SPM.

Unset (the normal case) every check is one global lookup.
"""

from __future__ import annotations

import os
import signal
import threading

POINTS = ("before_send", "after_send", "after_outcome")

_armed: str | None = None
_left = 0
_lock = threading.Lock()


def _arm_from_env() -> None:
    global _armed, _left
    spec = os.environ.get("SPMCHAIN_CRASH_AT", "")
    if not spec:
        return
    point, _, count = spec.partition(":")
    if point not in POINTS:
        raise ValueError(f"SPMCHAIN_CRASH_AT: unknown crash point {point!r}; points are "
                         f"{', '.join(POINTS)}")
    try:
        n = int(count) if count else 1
    except ValueError:
        raise ValueError(f"SPMCHAIN_CRASH_AT: {count!r} is not a whole number") from None
    if n < 1:
        raise ValueError(f"SPMCHAIN_CRASH_AT: the count must be at least 1, got {n}")
    _armed, _left = point, n


def reached(point: str) -> None:
    """Called at ``point``; kills the process when armed for it and its count is reached."""
    global _left
    if _armed != point:
        return
    with _lock:
        _left -= 1
        if _left > 0:
            return
    os.kill(os.getpid(), signal.SIGKILL)


_arm_from_env()
