"""Fault injection: make an actor kind raise on a chosen fraction of its messages."""

from __future__ import annotations

import random
import threading
from collections.abc import Mapping

ACTOR_KINDS = ("command", "spm_task", "poller", "supervisor")


class InjectedFault(RuntimeError):
    """Raised by an actor because fault injection told it to (never by real trouble)."""


class FaultInjector:
    """``rates`` maps an actor kind (command, spm_task, poller) to the fraction of messages on
    which it raises :class:`InjectedFault`. Seeded, thread-safe. Unknown kinds are refused."""

    def __init__(self, rates: Mapping[str, float] | None = None, seed: int | None = None) -> None:
        self.rates: dict[str, float] = {}
        for kind, rate in (rates or {}).items():
            if kind not in ACTOR_KINDS:
                raise ValueError(
                    f"fault rate for unknown actor kind {kind!r}; "
                    f"kinds are {', '.join(ACTOR_KINDS)}"
                )
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"fault rate for {kind} must be within [0, 1], got {rate}")
            if rate > 0:
                self.rates[kind] = float(rate)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.injected = 0

    def maybe_fail(self, kind: str) -> None:
        rate = self.rates.get(kind)
        if not rate:
            return
        with self._lock:
            hit = self._rng.random() < rate
            if hit:
                self.injected += 1
        if hit:
            raise InjectedFault(f"injected fault in a {kind} actor")
