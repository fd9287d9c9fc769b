"""PollerActor: learns task ends from one pool's SPM and reports them to their chains.

One ``getAllTasksStatuses`` call per tick, never one per task. The tick adapts: right after
activity (a task fired, a task ended) it is ``poll_min_s``; each tick that sees no change
doubles it, up to ``poll_max_s``. A finished task is reported to its chain, and reported again
every ``redeliver_s`` while the SPM still lists it (the chain acknowledges, the SpmTaskActor
clears it, and it disappears). An error while polling is logged and counted, and the next tick
comes as usual: it never stops the polling, of this pool or any other (each pool has its own
PollerActor). It also finds zombies (tasks running past the task timeout: their chain is told
and stops them) and orphans (tasks the SPM lists that no chain owns, for longer than
``orphan_grace_s``: handed to the SpmTaskActor to stop, revert and clear).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pykka

from actors import _chain as ch
from actors import _messages as m
from actors._pool import ThreadActor
from actors._supervisor import Supervised
from spm._client import TaskStatus

if TYPE_CHECKING:

    from actors._runtime import _Core

logger = logging.getLogger(__name__)

_CLEARED = "<cleared>"

# A watched, unfinished task missing from this many successful polls in a row is lost.
LOST_AFTER_MISSES = 3


@dataclass(slots=True)
class _Watch:
    chain_id: str | None
    verb: str
    fired_at: float
    timeout_s: float
    ended: bool = False
    succeeded: bool = False
    code: int = 0
    message: str = ""
    delivered_at: float = 0.0
    redeliver_after: float = 0.0  # doubles with every report its chain leaves unanswered
    misses: int = 0
    zombie_told: bool = False


class PollerActor(Supervised, ThreadActor):
    kind = "poller"


    def __init__(self, core: _Core, pool: str) -> None:
        super().__init__()
        self.core = core
        self.pool = pool
        self.spm = core.spms[pool]
        opts = core.options
        self.min_s = opts.poll_min_s
        self.max_s = opts.poll_max_s
        self.redeliver_s = opts.redeliver_s
        self.orphan_grace_s = opts.orphan_grace_s
        self.interval = self.min_s
        self.generation = 0
        self.next_tick_at = 0.0
        self.watched: dict[str, _Watch] = {}
        self.pending: dict[str, _Watch] = {}  # watched and not yet seen finished
        self.next_redelivery = 0.0
        self.unowned: dict[str, float] = {}
        self.activity = False
        self.last_sweep = 0.0
        self.polls = 0
        self.errors = 0
        self._error_logged_at = 0.0

    def on_start(self) -> None:
        self._schedule(0.0)

    def supervision_key(self) -> str:
        return self.pool

    def _schedule(self, delay: float) -> None:
        self.generation += 1
        gen = self.generation
        ref = self.actor_ref
        self.next_tick_at = time.monotonic() + delay

        def tick() -> None:
            try:
                ref.tell(m.PollTick(gen))
            except pykka.ActorDeadError:
                pass

        self.core.scheduler.call_later(delay, tick)

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, m.PollTick):
            if message.generation != self.generation:
                return None  # superseded by an earlier tick
            self.core.faults.maybe_fail("poller")
            started = time.monotonic()
            try:
                self._poll()
            finally:
                # Also when the SPM cannot be polled: waiting chains past their deadline end,
                # and the admission window closes.
                self.core.admission_tick(self.pool)
            # The interval runs from this poll's start: the time the poll itself took (and
            # the wake-up of this thread) is not added to every task's wait for the next one.
            self._schedule(max(0.0, started + self.interval - time.monotonic()))
            return None
        self.core.faults.maybe_fail("poller")
        if isinstance(message, m.Watch):
            self._watch(message.tasks)
        else:
            return super().on_receive(message)
        return None

    def _watch(self, tasks: tuple[m.Watched, ...]) -> None:
        finished_again: list[str] = []
        for t in tasks:
            w = self.watched.get(t.task_id)
            self.unowned.pop(t.task_id, None)
            if w is None or w.chain_id is None or t.chain_id is None:
                # New, or being discarded (watched for the SpmTaskActor, chain or not before).
                w = self.watched[t.task_id] = _Watch(t.chain_id, t.verb, t.fired_at, t.timeout_s)
                self.pending[t.task_id] = w
            elif not w.ended:
                # Re-adopted while running (its chain or the SpmTaskActor was rebuilt): a zombie
                # report the old actor may have lost is made again at the next sweep.
                w.zombie_told = False
            else:
                # Re-adopted after it ended (a restarted SpmTaskActor): it needs to hear again
                # that the slot is free, and the chain needs the outcome again (next pass).
                finished_again.append(t.task_id)
                w.delivered_at, w.redeliver_after = 0.0, 0.0
                self.next_redelivery = 0.0
        if finished_again:
            self.core.tell_task_actor(self.pool, m.Finished(tuple(finished_again)))
        # New activity: poll soon.
        self.activity = True
        if self.interval > self.min_s:
            self.interval = self.min_s
            if self.next_tick_at - time.monotonic() > self.min_s:
                self._schedule(self.min_s)

    def _poll(self) -> None:
        core = self.core
        t0 = time.monotonic()
        try:
            statuses = self.spm.getAllTasksStatuses()
            if not isinstance(statuses, dict):
                raise TypeError(f"getAllTasksStatuses answered {type(statuses).__name__}")
        except Exception as err:  # noqa: BLE001 - counted and logged; polling goes on
            self.errors += 1
            core.metrics.poll_error(self.pool)
            if t0 - self._error_logged_at > 5.0:
                self._error_logged_at = t0
                logger.warning(
                    "pool %s: polling the SPM failed (%d so far): %s",
                    self.pool,
                    self.errors,
                    err,
                    extra={"pool": self.pool},
                )
            self.interval = min(max(self.interval * 2, self.min_s), self.max_s)
            return
        now = time.monotonic()
        core.metrics.poll(self.pool, now - t0)
        self.polls += 1
        changed = self.activity
        self.activity = False
        finished: list[str] = []
        deliveries: list[tuple[str, ch.TaskEnded]] = []
        orphans_ended: list[tuple[str, bool]] = []
        lost: list[tuple[str, str]] = []
        wall = time.time()
        # Every poll looks at the tasks not yet seen finished (at most the tasks outstanding at
        # the SPM); the finished ones waiting for their chain's acknowledgement are looked at
        # on the redelivery pass below, which is rarer.
        for task_id, w in list(self.pending.items()):
            st = statuses.get(task_id)
            if st is None:
                w.misses += 1
                if w.misses >= LOST_AFTER_MISSES:
                    del self.watched[task_id]
                    del self.pending[task_id]
                    changed = True
                    if w.chain_id is not None:
                        lost.append((w.chain_id, task_id))
                        finished.append(task_id)  # its slot at the SPM is free
                    else:
                        orphans_ended.append((task_id, False))  # gone: nothing to revert
                continue
            w.misses = 0
            try:
                state = st["taskState"]
            except (TypeError, KeyError):
                logger.warning(
                    "pool %s: status of task %s has the wrong shape: %r", self.pool, task_id, st,
                    extra={"pool": self.pool, "task_id": task_id, "chain_id": w.chain_id},
                )
                continue
            if state != "finished":
                continue
            w.ended = True
            del self.pending[task_id]
            changed = True
            succeeded, code, message = _outcome(st)
            w.succeeded, w.code, w.message = succeeded, code, message
            if w.chain_id is None:
                orphans_ended.append((task_id, succeeded))
                continue
            finished.append(task_id)
            self._deliver(task_id, w, now, wall, deliveries)
        if now >= self.next_redelivery:
            self.next_redelivery = now + min(self.redeliver_s, 0.5)
            for task_id, w in list(self.watched.items()):
                if not w.ended or task_id in self.pending:
                    continue
                if task_id not in statuses:
                    del self.watched[task_id]  # cleared
                elif w.chain_id is not None and now - w.delivered_at >= w.redeliver_after:
                    self._deliver(task_id, w, now, wall, deliveries)
        # The slot is free before the chain can react (Finished is queued first).
        if finished:
            core.tell_task_actor(self.pool, m.Finished(tuple(finished)))
        for task_id, ok in orphans_ended:
            core.tell_task_actor(self.pool, m.OrphanEnded(task_id, ok))
        for chain_id, event in deliveries:
            if not core.tell_chain(chain_id, event, seen_at=now):
                # Its chain has ended: it recorded the outcome before ending (clear the task),
                # or ended without it and discarded the task (stop, revert, clear). A task
                # the runtime no longer knows was cleared meanwhile: nothing to do.
                owner = core.task_owners.get(event.task_id, _CLEARED)
                if owner is None:
                    core.tell_task_actor(self.pool, m.Discard(
                        event.task_id, f"its chain {chain_id} ended without its outcome"))
                elif owner is not _CLEARED:
                    core.tell_task_actor(self.pool, m.Ack(chain_id, event.task_id))
        for chain_id, task_id in lost:
            logger.warning(
                "pool %s: task %s of chain %s is unknown to the SPM",
                self.pool,
                task_id,
                chain_id,
                extra={"pool": self.pool, "task_id": task_id, "chain_id": chain_id},
            )
            core.tell_chain(chain_id, ch.TaskLost(task_id, wall))
        if now - self.last_sweep >= min(1.0, self.max_s):
            self.last_sweep = now
            self._sweep(statuses, now, wall)
        if changed:
            self.interval = self.min_s
        else:
            self.interval = min(self.interval * 2, self.max_s)

    def _deliver(self, task_id: str, w: _Watch, now: float, wall: float,
                 deliveries: list[tuple[str, ch.TaskEnded]]) -> None:
        """Report ``task_id``'s end to its chain (again), backing off the next report."""
        assert w.chain_id is not None
        w.redeliver_after = (
            self.redeliver_s if w.redeliver_after == 0.0 else min(w.redeliver_after * 2, 60.0)
        )
        w.delivered_at = now
        deliveries.append(
            (w.chain_id, ch.TaskEnded(task_id, w.succeeded, w.code, w.message, wall))
        )

    def _sweep(self, statuses: dict[str, TaskStatus], now: float, wall: float) -> None:
        """Zombies among the watched tasks; orphans among the SPM's."""
        core = self.core
        for task_id, w in self.pending.items():
            if w.ended or w.zombie_told or w.chain_id is None or now - w.fired_at < w.timeout_s:
                continue
            w.zombie_told = True
            core.metrics.zombie_task(self.pool)
            logger.warning(
                "pool %s: task %s of chain %s is a zombie (running for %.0f s)",
                self.pool,
                task_id,
                w.chain_id,
                now - w.fired_at,
                extra={"pool": self.pool, "task_id": task_id, "chain_id": w.chain_id},
            )
            core.tell_chain(w.chain_id, ch.ZombieTask(task_id, wall))
        unowned = statuses.keys() - self.watched.keys()
        for task_id in list(self.unowned):
            if task_id not in unowned:
                del self.unowned[task_id]
        for task_id in unowned:
            first = self.unowned.setdefault(task_id, now)
            if now - first >= self.orphan_grace_s:
                del self.unowned[task_id]
                core.tell_task_actor(
                    self.pool,
                    m.Discard(task_id, f"orphan: no chain owns it after {self.orphan_grace_s:g} s"),
                )


def _outcome(st: TaskStatus) -> tuple[bool, int, str]:
    code = st.get("code", 0)
    message = st.get("message", "")
    if not isinstance(code, int):
        code = 100
    if not isinstance(message, str):
        message = str(message)
    return st.get("taskResult") == "success", code, message
