"""A clock for :class:`~spm.SimulatedSpm` that stands still until released."""

from __future__ import annotations

import time


class HeldClock:
    """Stands still until :meth:`release`; then runs, shifted ``jump`` seconds ahead, so that
    every task that was running while it stood still is done at once. For tests and benchmarks
    that need chains caught mid-task (``SimulatedSpm(pool, clock=HeldClock())``)."""

    def __init__(self) -> None:
        self._held: float | None = time.monotonic()
        self._shift = 0.0

    def __call__(self) -> float:
        held = self._held
        return held if held is not None else time.monotonic() + self._shift

    def release(self, jump: float) -> None:
        """Let time run again, ``jump`` seconds past the moment it stood still."""
        held = self._held
        assert held is not None, "the clock was already released"
        self._shift = held + jump - time.monotonic()
        self._held = None
