"""CommandActor: owns one chain, runs on the shared worker pool.

It turns messages into chain events, calls the pure :func:`actors._chain.transition`, records
the new state (write ahead: in the snapshot store when there is one) and only then performs the
effects: asking the pool's SpmTaskActor to fire, stop, clear or discard a task, running the
Command's hooks, ending the chain. With a group-commit store, what a record asks of the
SpmTaskActor is sent by the store's writer as soon as the record is durable, batched per pool
and commit (the chain's actor only takes the end of the chain back). Hooks run inline and feed
their HookDone straight back, so a task end, its end hook and the next step's submission are
recorded together.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from actors import _chain as ch
from actors import _messages as m
from actors._pool import PooledActor, WorkerPool
from actors._supervisor import Supervised

if TYPE_CHECKING:
    from types import TracebackType

    from actors._runtime import _Core, _Entry
    from actors._spec import Command

logger = logging.getLogger(__name__)

_EVENTS = (
    ch.TaskEnded,
    ch.TaskFired,
    ch.HookDone,
    ch.FireRefused,
    ch.Cancel,
    ch.Tick,
    ch.TaskLost,
    ch.ZombieTask,
    ch.Start,
)


class _Durable:
    """Store → CommandActor: the snapshot holding these effects is committed; perform them."""

    __slots__ = ("effects", "seen_at")

    def __init__(self, effects: list[ch.Effect], seen_at: float | None) -> None:
        self.effects = effects
        self.seen_at = seen_at


class CommandActor(Supervised, PooledActor):
    kind = "command"

    def __init__(
        self,
        pool: WorkerPool,
        core: _Core,
        entry: _Entry,
        state: ch.ChainState,
        command: Command,
    ) -> None:
        super().__init__(pool)
        self.core = core
        self.entry = entry
        self.state = state
        self.command = command
        self.chain_id = state.chain_id
        self.pool_id = state.spec.pool
        self.timer: Any = None

    def log_extra(self) -> dict[str, Any]:
        return {"chain_id": self.chain_id, "pool": self.pool_id}

    # -- lifecycle -------------------------------------------------------------------------

    def on_start(self) -> None:
        if self.state.phase == "new":
            now = time.time()
            if self.entry.cancel is not None:
                self._apply(ch.Cancel(self.entry.cancel, now))
            elif now >= self.state.deadline_at:
                self._apply(ch.Tick(now))  # its deadline passed while it waited: it fails
            else:
                self._apply(ch.Start(now))
        else:
            self._resume()
            if self.entry.cancel is not None and not self.state.ended:
                # Cancelled while it was being rebuilt, or the Cancel was lost with the
                # actor it replaces (a no-op when the chain had applied it already).
                self._apply(ch.Cancel(self.entry.cancel, time.time()))
        self._arm_deadline()

    def supervision_key(self) -> str:
        return self.chain_id

    def on_failure(
        self,
        exception_type: type[BaseException] | None,
        exception_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self.timer is not None:
            self.timer.cancel()
        super().on_failure(exception_type, exception_value, traceback)

    def _arm_deadline(self) -> None:
        st = self.state
        if st.ended:
            return
        now = time.time()
        when = st.deadline_at if now < st.deadline_at else ch.hard_deadline(st)
        ref = self.actor_ref

        def tick() -> None:
            if ref.is_alive():
                ref.tell(ch.Tick(time.time()))

        self.timer = self.core.scheduler.call_later(max(0.0, when - now) + 0.001, tick)

    # -- messages --------------------------------------------------------------------------

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, _Durable):
            self._perform(message.effects, message.seen_at)
            return None
        if isinstance(message, m.GetState):
            return self.state
        self.core.faults.maybe_fail("command")
        if isinstance(message, _EVENTS):
            self._apply(message)
            if isinstance(message, ch.Tick) and not self.state.ended:
                self._arm_deadline()
        else:
            return super().on_receive(message)
        return None

    def _apply(self, event: ch.Event) -> None:
        """Run ``event`` and the hooks it leads to; record once; then perform the effects."""
        state = self.state
        command = self.command
        new, effects = ch.transition(state, event, command)
        if new is state and not effects:
            return
        out: list[ch.Effect] = []
        while True:
            hook = None
            for eff in effects:
                if isinstance(eff, ch.RunHook):
                    hook = eff  # a transition emits at most one hook, last
                else:
                    out.append(eff)
            if hook is None:
                break
            error = self._run_hook(new, hook)
            new, effects = ch.transition(
                new, ch.HookDone(hook.hook, hook.index, error, time.time()), command
            )
        self.state = new
        seen_at = event.now if isinstance(event, ch.TaskEnded | ch.HookDone | ch.Start) else None
        if not self.core.record(self.entry, new, out, seen_at, self):
            self._perform(out, seen_at)

    def _run_hook(self, state: ch.ChainState, hook: ch.RunHook) -> str | None:
        cmd = self.command
        try:
            if hook.hook == "end_step":
                cmd.end_step(state.steps[hook.index].result())
            elif hook.hook == "end_successfully":
                cmd.end_successfully(state.results())
            elif hook.hook == "end_with_failure":
                cmd.end_with_failure(state.results(), state.reason or "")
            else:  # pragma: no cover - the chain model emits only these
                return f"unknown hook {hook.hook!r}"
        except Exception as exc:  # noqa: BLE001 - user code: the chain decides what follows
            logger.warning(
                "chain %s: %s hook raised: %r",
                self.chain_id,
                hook.hook,
                exc,
                extra={"chain_id": self.chain_id, "pool": self.pool_id},
            )
            return f"{type(exc).__name__}: {exc}"
        return None

    def _perform(self, effects: list[ch.Effect], seen_at: float | None) -> None:
        core = self.core
        pool = self.pool_id
        out, ended = task_messages(effects, self.chain_id, pool, self.state.task_timeout_s,
                                   seen_at)
        if out:
            core.tell_task_actor(pool, out[0] if len(out) == 1 else m.Batch(tuple(out)))
        if ended:
            if self.timer is not None:
                self.timer.cancel()
            core.chain_ended(self.entry, self.state)
            self.stop()

    # -- rebuilding ------------------------------------------------------------------------

    def _resume(self) -> None:
        """Rebuilt from a recorded state: re-adopt running tasks, redo what was pending."""
        self._readopt()
        effects = ch.resume_effects(self.state)
        hooks = [e for e in effects if isinstance(e, ch.RunHook)]
        if hooks:
            hook = hooks[0]
            error = self._run_hook(self.state, hook)
            self._apply(ch.HookDone(hook.hook, hook.index, error, time.time()))
            return
        self._perform(effects, None)

    def _readopt(self) -> None:
        for adopt in adopts_of(self.state):
            self.core.tell_task_actor(self.pool_id, adopt)


def task_messages(effects: list[ch.Effect], chain_id: str, pool: str, task_timeout_s: float,
                  seen_at: float | None) -> tuple[list[Any], bool]:
    """What ``effects`` ask of the pool's SpmTaskActor, in order (sent in one message: one
    wake-up of its thread), and whether they end the chain."""
    out: list[Any] = []
    ended = False
    for eff in effects:
        if isinstance(eff, ch.FireTask):
            out.append(m.FireRequest(
                chain_id, eff.ref, eff.verb, eff.params, eff.exclusive, eff.shared,
                task_timeout_s, seen_at,
            ))
        elif isinstance(eff, ch.AckTask):
            out.append(m.Ack(chain_id, eff.task_id))
        elif isinstance(eff, ch.StopTask):
            logger.info(
                "chain %s: stopping task %s",
                chain_id,
                eff.task_id,
                extra={"chain_id": chain_id, "pool": pool, "task_id": eff.task_id},
            )
            out.append(m.Stop(eff.task_id))
        elif isinstance(eff, ch.DiscardTask):
            out.append(m.Discard(eff.task_id, f"no longer wanted by chain {chain_id}",
                                 disowned=True))
        elif isinstance(eff, ch.ChainEnded):
            ended = True
    return out, ended


def adopts_of(state: ch.ChainState) -> list[m.Adopt]:
    """An Adopt for every task ``state`` has in flight with a known id."""
    out: list[m.Adopt] = []
    for ref, task_id, rec in state.in_flight():
        if task_id is not None:
            verb = rec.verb if ref[0] == "step" else (rec.revert_verb or "")
            out.append(m.Adopt(state.chain_id, ref, task_id, verb, rec.exclusive, rec.shared,
                               state.task_timeout_s))
    return out


def resync_of(state: ch.ChainState) -> tuple[list[m.Adopt], list[m.FireRequest], list[str]]:
    """What a restarted SpmTaskActor must learn of ``state``: its tasks in flight, the fires
    it asked for (maybe never received) and the stops it decided (maybe never sent)."""
    fires: list[m.FireRequest] = []
    stops: list[str] = []
    if state.phase in ("new", "ended") or state.hook is not None:
        return adopts_of(state), fires, stops
    for eff in ch.resume_effects(state):
        if isinstance(eff, ch.FireTask):
            fires.append(m.FireRequest(state.chain_id, eff.ref, eff.verb, eff.params,
                                       eff.exclusive, eff.shared, state.task_timeout_s))
        elif isinstance(eff, ch.StopTask):
            stops.append(eff.task_id)
    return adopts_of(state), fires, stops
