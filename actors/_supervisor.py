"""SupervisorActor and the supervision policy, written as data (OTP style).

Each actor kind has a :class:`ChildSpec`: its restart type (``permanent``: always restarted;
``transient``: restarted only when it failed, not when it stopped normally; ``temporary``: never
restarted), a strategy (``one_for_one``: restart the failed actor alone; ``one_for_pool``:
restart every actor of the failed actor's pool, the SpmTaskActor and the PollerActor together),
and an intensity: at most ``max_restarts`` restarts of that kind in ``period_s`` seconds. One
more than that escalates: the supervisor stops the runtime cleanly and says why, instead of
restarting in a loop.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from actors import _messages as m
from actors._pool import ThreadActor

if TYPE_CHECKING:
    from types import TracebackType

    from actors._runtime import _Core

logger = logging.getLogger(__name__)

Restart = Literal["permanent", "transient", "temporary"]
Strategy = Literal["one_for_one", "one_for_pool"]


@dataclass(frozen=True, slots=True)
class ChildSpec:
    """How one actor kind is supervised."""

    kind: str
    restart: Restart = "permanent"
    strategy: Strategy = "one_for_one"
    max_restarts: int = 10
    period_s: float = 10.0


DEFAULT_SUPERVISION: tuple[ChildSpec, ...] = (
    ChildSpec("spm_task", restart="permanent", strategy="one_for_one",
              max_restarts=20, period_s=10.0),
    ChildSpec("poller", restart="permanent", strategy="one_for_one",
              max_restarts=20, period_s=10.0),
    # Command actors are many: a few failing is expected under fault injection, a storm is not.
    ChildSpec("command", restart="transient", strategy="one_for_one",
              max_restarts=1000, period_s=10.0),
)


class Supervised:
    """Mixin for a supervised actor: its failure (pykka's ``on_failure``) is reported to the
    SupervisorActor as its ``kind`` and ``supervision_key()``."""

    kind: str
    core: _Core

    def supervision_key(self) -> str:
        raise NotImplementedError

    def on_failure(
        self,
        exception_type: type[BaseException] | None,
        exception_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.core.child_failed(self.kind, self.supervision_key(), exception_value)


class SupervisorActor(ThreadActor):

    def __init__(self, core: _Core, specs: tuple[ChildSpec, ...]) -> None:
        super().__init__()
        self.core = core
        self.specs = {s.kind: s for s in specs}
        self.history: dict[str, deque[float]] = {s.kind: deque() for s in specs}
        self.restarts: dict[str, int] = {s.kind: 0 for s in specs}
        self.escalated: str | None = None

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, m.ChildFailed):
            self._child_failed(message)
            return None
        return super().on_receive(message)

    def _extra(self, msg: m.ChildFailed) -> dict[str, Any]:
        if msg.kind == "command":
            entry = self.core.chains.get(msg.key)
            return {"chain_id": msg.key, "pool": entry.pool if entry is not None else None}
        return {"pool": msg.key}

    def _child_failed(self, msg: m.ChildFailed) -> None:
        if self.escalated is not None or self.core.stopping:
            return
        spec = self.specs.get(msg.kind)
        extra = self._extra(msg)
        if spec is None or spec.restart == "temporary":
            logger.error("%s actor %s failed (%s); not restarted", msg.kind, msg.key, msg.error,
                         extra=extra)
            return
        now = time.monotonic()
        hist = self.history[msg.kind]
        hist.append(now)
        while hist and hist[0] < now - spec.period_s:
            hist.popleft()
        if len(hist) > spec.max_restarts:
            self.escalated = (
                f"{msg.kind} actors failed {len(hist)} times in {spec.period_s:g} s "
                f"(more than the {spec.max_restarts} allowed); last: {msg.kind} {msg.key}: "
                f"{msg.error}"
            )
            logger.critical("supervisor escalates: %s", self.escalated)
            self.core.escalate(self.escalated)
            return
        self.restarts[msg.kind] += 1
        logger.warning("restarting %s actor %s after: %s", msg.kind, msg.key, msg.error,
                       extra=extra)
        try:
            self.core.restart(msg.kind, msg.key, spec.strategy)
        except Exception as exc:  # noqa: BLE001 - a restart that fails escalates at once
            self.escalated = f"restarting {msg.kind} {msg.key} failed: {exc!r}"
            logger.critical("supervisor escalates: %s", self.escalated)
            self.core.escalate(self.escalated)
