"""The embedding API: :class:`Runtime`, :class:`ChainHandle`, :class:`ChainResult`."""

from __future__ import annotations

import gc
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Self

import pykka

from actors import _chain as ch
from actors import _messages as m
from actors._admission import PoolAdmission
from actors._command import CommandActor, _Durable, resync_of, task_messages
from actors._faults import FaultInjector
from actors._ids import new_hex
from actors._poller import PollerActor
from actors._pool import WorkerPool
from actors._snapshot import SnapshotError, decode_snapshot, encode_snapshot
from actors._spec import ChainSpec, ChainSpecError, Command, validate_spec
from actors._spm_task import SpmTaskActor, same_params
from actors._store import GroupCommitStore, SnapshotStore, StoreError
from actors._store_memory import MemoryStore
from actors._store_sqlite import SqliteStore
from actors._supervisor import DEFAULT_SUPERVISION, ChildSpec, SupervisorActor
from actors._timer import Scheduler
from metrics._exposition import MetricsServer, start_metrics_server
from metrics._metrics import RuntimeMetrics
from spm._client import SpmClient
from spm._errors import SpmError

if TYPE_CHECKING:
    from types import TracebackType

__all__ = [
    "ChainHandle",
    "ChainResult",
    "PoolAdmissionState",
    "Runtime",
    "RuntimeOptions",
    "RuntimeStoppedError",
]

logger = logging.getLogger(__name__)


class RuntimeStoppedError(RuntimeError):
    """The runtime stopped (or escalated) before the chain ended. ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)



@dataclass(frozen=True, slots=True)
class RuntimeOptions:
    """Tunables of a :class:`Runtime`. Every field has a default fit for production use.

    ``max_outstanding``: tasks fired and not yet finished per pool (VDSM runs 10 and queues 500:
    above 10 keeps its workers busy from its own queue while we poll, well below 500 keeps the
    queue from filling). ``poll_min_s``/``poll_max_s``: the adaptive poll interval per pool.
    ``redeliver_s``: how often a finished task is reported again until its chain acknowledges.
    ``orphan_grace_s``: how long a task nobody owns may sit on the SPM before it is stopped,
    reverted if it succeeded, and cleared. ``deadline_s``/``task_timeout_s``: a chain's and a
    task's limits when the spec gives none. ``command_workers``: threads of the worker pool
    that runs every CommandActor (one by default: the work is Python under one interpreter
    lock, and a second thread measured 20-30 % slower in the capacity load test; more threads
    only help hooks that wait, which they must not).
    ``admission_target_s``: a pool runs only as many of its chains at once as keeps the
    runtime's own share of reaction latency (from a task's end seen to the chain's next task
    fired) under this, in its 90th percentile: the limit adapts as the pool's tasks are fired,
    and the other chains wait, accepted and recorded, to be started in the order submitted
    (see ``actors._admission``). None: no adaptive limit. ``max_running``: a fixed upper bound
    on the chains of one pool running at once (None: none); with ``admission_target_s=None``
    and ``max_running=None`` every chain starts as soon as it is submitted.
    ``gc_threshold``: while the runtime runs, the collector's first generation threshold is
    raised to at least this (``gc.set_threshold``; None leaves the interpreter's setting): tens
    of thousands of live chains are millions of tracked objects, and with the default (700)
    full collections over all of them come often enough to cost most of the CPU (at 30,000
    chains: 1,700 steps/s with the default, 5,500 with 50,000). It is process-wide; the
    previous setting is restored at :meth:`Runtime.stop`. ``switch_interval_s``: while the
    runtime runs, the interpreter's thread switch interval (``sys.setswitchinterval``; None
    leaves it): every step crosses threads (poller, worker pool, store writer, SpmTaskActor),
    and with the default 5 ms a thread woken while another computes may wait that long for the
    interpreter lock at each crossing (capacity load test, no store: reaction p99 59 ms with
    5 ms, 45 ms with 1 ms, same throughput). Process-wide too, restored at stop.
    """

    max_outstanding: int = 100
    poll_min_s: float = 0.02
    poll_max_s: float = 1.0
    redeliver_s: float = 1.0
    orphan_grace_s: float = 30.0
    deadline_s: float = 6 * 3600.0
    task_timeout_s: float = 3600.0
    command_workers: int = 1
    retry_min_s: float = 0.05
    retry_max_s: float = 2.0
    recovery_timeout_s: float = 60.0
    gc_threshold: int | None = 50_000
    switch_interval_s: float | None = 0.001
    admission_target_s: float | None = 0.012
    max_running: int | None = None
    supervision: tuple[ChildSpec, ...] = DEFAULT_SUPERVISION
    fault_rates: Mapping[str, float] = field(default_factory=dict)
    fault_seed: int | None = None

    def __post_init__(self) -> None:
        def positive(name: str, value: float) -> None:
            if not (isinstance(value, int | float) and value > 0):
                raise ValueError(f"RuntimeOptions.{name} must be positive, got {value!r}")

        if not isinstance(self.max_outstanding, int) or self.max_outstanding < 1:
            raise ValueError(
                f"RuntimeOptions.max_outstanding must be an integer >= 1, got "
                f"{self.max_outstanding!r}"
            )
        if not isinstance(self.command_workers, int) or self.command_workers < 1:
            raise ValueError(
                f"RuntimeOptions.command_workers must be an integer >= 1, got "
                f"{self.command_workers!r}"
            )
        for name in ("poll_min_s", "poll_max_s", "redeliver_s", "orphan_grace_s",
                     "deadline_s", "task_timeout_s", "retry_min_s", "retry_max_s",
                     "recovery_timeout_s"):
            positive(name, getattr(self, name))
        try:
            FaultInjector(self.fault_rates, self.fault_seed)
        except (ValueError, TypeError, AttributeError) as exc:
            raise ValueError(f"RuntimeOptions.fault_rates: {exc}") from None
        if self.switch_interval_s is not None:
            positive("switch_interval_s", self.switch_interval_s)
        if self.gc_threshold is not None and (
            not isinstance(self.gc_threshold, int) or self.gc_threshold < 1
        ):
            raise ValueError(
                f"RuntimeOptions.gc_threshold must be a positive integer or None, got "
                f"{self.gc_threshold!r}"
            )
        if self.admission_target_s is not None:
            positive("admission_target_s", self.admission_target_s)
        if self.max_running is not None and (
            not isinstance(self.max_running, int) or self.max_running < 1
        ):
            raise ValueError(
                f"RuntimeOptions.max_running must be an integer >= 1 or None, got "
                f"{self.max_running!r}"
            )
        if self.poll_max_s < self.poll_min_s:
            raise ValueError(
                f"RuntimeOptions.poll_max_s ({self.poll_max_s}) is below poll_min_s "
                f"({self.poll_min_s})"
            )


@dataclass(frozen=True, slots=True)
class PoolAdmissionState:
    """One pool's admission (see :meth:`Runtime.admission`)."""

    running: int
    waiting: int
    limit: float


@dataclass(frozen=True, slots=True)
class ChainResult:
    """How a chain ended: ``outcome`` is ``ended_successfully`` or ``ended_with_failure``."""

    chain_id: str
    outcome: str
    reason: str | None
    state: ch.ChainState

    @property
    def succeeded(self) -> bool:
        return self.outcome == ch.ENDED_SUCCESSFULLY


class _Entry:
    """The runtime's record of one live chain."""

    __slots__ = ("actor", "cancel", "chain_id", "command", "durable", "handle", "pool", "ref",
                 "running", "state")

    def __init__(self, chain_id: str, pool: str, state: ch.ChainState, handle: ChainHandle):
        self.chain_id = chain_id
        self.pool = pool
        self.state = state  # the last recorded state
        self.durable = state  # the last state known durable (what effects may act upon)
        self.handle = handle
        self.ref: pykka.ActorRef[Any] | None = None
        self.actor: CommandActor | None = None
        self.running = False  # admitted (counted by its pool's admission) and not ended
        self.cancel: str | None = None  # cancelled: the reason, applied when its actor starts
        self.command: Command | None = None  # built at submit, used by the first start


class ChainHandle:
    """What :meth:`Runtime.submit` returns: follow, wait for or cancel one chain."""

    __slots__ = ("_callbacks", "_result", "_rt", "chain_id", "pool")

    def __init__(self, rt: Runtime, chain_id: str, pool: str) -> None:
        self._rt = rt
        self.chain_id = chain_id
        self.pool = pool
        self._result: ChainResult | None = None
        self._callbacks: list[Callable[[ChainResult], None]] | None = None

    def __repr__(self) -> str:
        state = self._result.outcome if self._result else "live"
        return f"<ChainHandle {self.chain_id} on {self.pool}: {state}>"

    def done(self) -> bool:
        return self._result is not None

    def result(self, timeout: float | None = None) -> ChainResult:
        """Wait until the chain ends and return how.

        Raises TimeoutError when ``timeout`` passes first, RuntimeStoppedError when the
        runtime stops (or escalates) before the chain ends.
        """
        return self._rt._wait(self, timeout)

    def state(self, timeout: float = 5.0) -> ch.ChainState:
        """The chain's current state (its final state once ended)."""
        if self._result is not None:
            return self._result.state
        return self._rt._state_of(self.chain_id, timeout)

    def cancel(self, reason: str = "cancelled") -> bool:
        """Stop the running task and revert the steps that succeeded; the chain then ends with
        failure and ``reason``. False when the chain had already ended."""
        return self._rt.cancel(self.chain_id, reason)

    def add_done_callback(self, fn: Callable[[ChainResult], None]) -> None:
        """Call ``fn(result)`` when the chain ends (at once, here, if it already has).

        Callbacks run on a runtime thread: they must be quick. One that raises is logged.
        """
        self._rt._add_callback(self, fn)


class _PoolState:
    """What one pool's SpmTaskActor knows that must outlive it (see SpmTaskActor)."""

    __slots__ = ("by_ref", "discarding", "hold", "owners", "queued", "recovery_acked",
                 "recovery_orphans", "refused", "unsettled")

    def __init__(self) -> None:
        self.owners: dict[str, tuple[str, tuple[str, int, int]]] = {}
        self.by_ref: dict[tuple[str, tuple[str, int, int]], str | None] = {}
        self.discarding: dict[str, str] = {}
        self.hold = False
        self.queued = 0  # requests waiting in the SpmTaskActor for an SPM slot (admission)
        # Found by recovery, for the pool's first SpmTaskActor to act upon (and, should it
        # fail before it has, its successor): tasks owned by no chain, to discard before
        # anything is fired (``hold``); tasks whose outcome a chain recorded, to clear.
        self.recovery_orphans: list[str] = []
        self.recovery_acked: list[str] = []
        # Fires whose answer was lost (the SPM may or may not have made the task), waiting to
        # be settled from its task list: (chain id, ref) -> (request, code, message, when).
        self.unsettled: dict[tuple[str, tuple[str, int, int]],
                             tuple[m.FireRequest, int, str, float]] = {}
        # Fires settled as refused: asked for again (a chain rebuilt before it heard), they
        # are refused again, never fired (the task the first one may have made is discarded).
        self.refused: dict[tuple[str, tuple[str, int, int]], ch.FireRefused] = {}


class _Core:
    """What the actors share: the directory of actors, the clock, metrics, options."""

    def __init__(self, rt: Runtime, spms: dict[str, SpmClient], options: RuntimeOptions,
                 metrics: RuntimeMetrics, store: SnapshotStore | None) -> None:
        self.rt = rt
        self.store = store
        # Every task fired and not yet cleared -> the chain that owns it, or None once the
        # chain ended without learning its outcome (it discarded the task). Kept here, not in
        # an actor, so that a restarted SpmTaskActor or PollerActor can tell a task whose chain
        # ended (clear it) from an orphan (stop, revert, clear).
        self.task_owners: dict[str, str | None] = {}
        self.pool_states: dict[str, _PoolState] = {}
        self.spms = spms
        self.options = options
        self.metrics = metrics
        self.faults = FaultInjector(options.fault_rates, options.fault_seed)
        self.scheduler = Scheduler()
        self.workers = WorkerPool(options.command_workers)
        self.chains: dict[str, _Entry] = {}
        # Adapting, a pool never runs more chains than it may have tasks outstanding (a chain
        # has one task in flight at most: more would only queue for a slot).
        cap = options.max_running
        if options.admission_target_s is not None:
            cap = min(cap or options.max_outstanding, options.max_outstanding)
        self.admissions: dict[str, PoolAdmission[_Entry]] = {
            pool: PoolAdmission(target_s=options.admission_target_s, maximum=cap)
            for pool in spms
        }
        self.task_actors: dict[str, pykka.ActorRef[Any]] = {}
        self.pollers: dict[str, pykka.ActorRef[Any]] = {}
        self.supervisor: pykka.ActorRef[Any] | None = None
        self.stopping = False
        # What durable records ask of each pool's SpmTaskActor, queued by the store's writer
        # (its only user) and sent once per commit: see record().
        self.outbox: dict[str, list[Any]] = {}
        self.batched = isinstance(store, GroupCommitStore)
        if isinstance(store, GroupCommitStore):
            store._after_durable.append(self.send_outbox)

    # -- telling -----------------------------------------------------------------------------

    def pool_state(self, pool: str) -> _PoolState:
        state = self.pool_states.get(pool)
        if state is None:
            state = self.pool_states[pool] = _PoolState()
        return state

    def tell_chain(self, chain_id: str, event: Any, seen_at: float | None = None) -> bool:
        """Tell a live chain; False when it is not live (ended, or unknown). A chain being
        rebuilt counts as live: the message is dropped and the rebuilt actor asks again."""
        entry = self.chains.get(chain_id)
        if entry is None:
            return False
        if entry.ref is None:
            return True
        try:
            entry.ref.tell(event)
        except pykka.ActorDeadError:
            pass
        return True

    def tell_task_actor(self, pool: str, message: Any) -> None:
        ref = self.task_actors.get(pool)
        if ref is None:
            return
        try:
            ref.tell(message)
        except pykka.ActorDeadError:
            pass  # being restarted: the new actor is told what the chains have in flight (resync)

    def tell_poller(self, pool: str, message: Any) -> None:
        ref = self.pollers.get(pool)
        if ref is None:
            return
        try:
            ref.tell(message)
        except pykka.ActorDeadError:
            pass

    def resync(self, pool: str) -> None:
        """Tell a rebuilt SpmTaskActor, in one message, what every live chain of ``pool`` has in
        flight, still wants fired and decided to stop (from their last recorded states; it
        fires a (chain, step) at most once, so a request a chain sends meanwhile is harmless)."""
        adopts: list[m.Adopt] = []
        fires: list[m.FireRequest] = []
        stops: list[str] = []
        for entry in list(self.chains.values()):
            if entry.pool != pool:
                continue
            # Tasks in flight from the last recorded state (they exist on the SPM, durable or
            # not); fires and stops only from the last durable one (write ahead).
            state = entry.state
            a, _, _ = resync_of(state)
            _, f, s = resync_of(entry.durable)
            adopts.extend(a)
            if f:
                # Only what the chain still waits for: a step fired and done since the
                # durable state (its clear may reach the new actor before this) is not asked
                # for again.
                waiting = {ref for ref, task_id, _ in state.in_flight() if task_id is None}
                fires.extend(req for req in f if req.ref in waiting)
            stops.extend(s)
        self.tell_task_actor(pool, m.Resync(tuple(adopts), tuple(fires), tuple(stops)))

    # -- recording and ending ----------------------------------------------------------------

    def record(self, entry: _Entry, state: ch.ChainState, effects: list[ch.Effect],
               seen_at: float | None, actor: CommandActor) -> bool:
        """Record ``state``. True when the effects were handed on to be performed once the
        record is durable; False when the caller performs them now."""
        entry.state = state
        store = self.store
        if store is None:
            entry.durable = state
            return False
        blob = encode_snapshot(state.to_dict(with_spec=False), checked=False)
        callback: Callable[[], None] | None = None
        if effects:
            # Every state that asks for a fire or a stop comes with effects: the callback is
            # where it becomes what a rebuilt SpmTaskActor may act upon (see resync).
            pool = entry.pool
            ended = any(isinstance(eff, ch.ChainEnded) for eff in effects)
            if ended or not self.batched:
                ref = actor.actor_ref

                def callback() -> None:
                    entry.durable = state
                    try:
                        ref.tell(_Durable(effects, seen_at))
                    except pykka.ActorDeadError:
                        pass  # the rebuilt actor redoes what is safe to redo (resume_effects)
            else:
                # Straight from the writer to the SpmTaskActor, not through the chain's actor:
                # one hop and one actor turn less a step. Safe if the actor died meanwhile:
                # its successor asks again, and the SpmTaskActor fires a (chain, step) once and
                # takes a second clear of a task as done.
                outbox = self.outbox
                msgs, _ = task_messages(effects, entry.chain_id, pool, state.task_timeout_s,
                                        seen_at)

                def callback() -> None:
                    entry.durable = state
                    if msgs:
                        box = outbox.get(pool)
                        if box is None:
                            outbox[pool] = list(msgs)
                        else:
                            box.extend(msgs)

        try:
            store.save(entry.chain_id, blob, ended=state.ended, on_durable=callback)
        except StoreError as exc:
            # Nothing may happen that is not recorded: the effects are dropped with the actor.
            self.escalate(f"the snapshot store failed: {exc}")
            raise
        return True

    def send_outbox(self) -> None:
        """On the store's writer, after a commit's callbacks: send what they queued."""
        outbox = self.outbox
        if not outbox:
            return
        items = list(outbox.items())
        outbox.clear()
        for pool, msgs in items:
            self.tell_task_actor(pool, msgs[0] if len(msgs) == 1 else m.Batch(tuple(msgs)))

    def chain_ended(self, entry: _Entry, state: ch.ChainState) -> None:
        if self.chains.get(entry.chain_id) is not entry:
            return  # its end was reported already
        del self.chains[entry.chain_id]
        for _ref, task_id, _rec in state.in_flight():
            if task_id is not None and task_id in self.task_owners:
                self.task_owners[task_id] = None  # discarded by the chain's end
        assert state.outcome is not None
        self.metrics.chain_ended(state.outcome, state.spec.command_type)  # type: ignore[arg-type]
        # A chain that ends with failure is business as usual (it was reverted); INFO, not WARNING.
        logger.info("chain %s %s%s", entry.chain_id, state.outcome,
            f": {state.reason}" if state.reason else "",
            extra={"chain_id": entry.chain_id, "pool": entry.pool})
        self.rt._finish(entry.handle, ChainResult(entry.chain_id, state.outcome, state.reason,
                                                  state))
        self.left(entry)  # its place goes to a waiting chain (after its own result is out)

    # -- supervision -------------------------------------------------------------------------

    def child_failed(self, kind: str, key: str, error: BaseException | None) -> None:
        if self.stopping or self.supervisor is None:
            return
        try:
            self.supervisor.tell(m.ChildFailed(kind, key, repr(error)))
        except pykka.ActorDeadError:
            pass

    def start_pool_actors(self, pool: str) -> None:
        # The poller first: the SpmTaskActor's first message may already watch recovery
        # orphans, and begins only once both are reachable (what it starts is answered by the
        # poller to ``task_actors[pool]``).
        self.pollers[pool] = PollerActor.start(self, pool)
        self.task_actors[pool] = ref = SpmTaskActor.start(self, pool)
        ref.tell(m.Begin())

    def restart(self, kind: str, key: str, strategy: str) -> None:
        self.metrics.actor_restarted(kind)
        if kind == "command":
            self._restart_chain(key)
            return
        pool = key
        # The failed actor is dead; a live one (one_for_pool) is stopped and waited for before
        # its successor starts: the two would otherwise work the pool's shared state at once
        # (fire a step twice, report an orphan's end twice).
        if kind == "poller" or strategy == "one_for_pool":
            _stop_and_wait(self.pollers.get(pool))
            self.pollers[pool] = PollerActor.start(self, pool)
        if kind == "spm_task" or strategy == "one_for_pool":
            _stop_and_wait(self.task_actors.get(pool))
            self.task_actors[pool] = ref = SpmTaskActor.start(self, pool)
            # Only now that the new actor is reachable: the discards its predecessor left
            # (Begin), what the chains have in flight and still want fired (its Adopts also
            # tell the poller what to watch).
            ref.tell(m.Begin())
            self.resync(pool)
        else:
            # A new poller alone: the SpmTaskActor tells it every task it knows.
            self.tell_task_actor(pool, m.Rewatch())

    def _restart_chain(self, chain_id: str) -> None:
        """Rebuild a failed CommandActor from its snapshot (its last recorded state).

        A snapshot that no longer decodes (the store's file was damaged under a running
        runtime) is not the end of the chain: the state this runtime recorded last is still
        in memory; the chain is rebuilt from it and it is written again, repairing the store.
        """
        entry = self.chains.get(chain_id)
        if entry is None:
            return
        entry.ref = None  # messages for it are dropped until the rebuilt actor asks again
        state = entry.state
        store = self.store
        if store is not None:
            store.flush(timeout=30.0)
            blob = store.load(chain_id)
            if blob is not None:
                try:
                    state = ch.ChainState.from_dict(decode_snapshot(blob),
                                                    store.load_spec(chain_id))
                except (SnapshotError, KeyError, TypeError, ValueError) as exc:
                    # The damaged blob is kept aside and counted like any other that does
                    # not decode; the chain's row is then written again whole.
                    self.metrics.snapshot_quarantined()
                    store.quarantine(chain_id, blob, f"does not decode: {exc}", timeout=30.0)
                    logger.error(
                        "chain %s: its snapshot in the store does not decode (%s: %s); kept "
                        "in quarantine, the chain rebuilt from the state recorded last in "
                        "memory, which is written again", chain_id, type(exc).__name__, exc,
                        extra={"chain_id": chain_id, "pool": entry.pool})
                    store.save(chain_id, encode_snapshot(state.to_dict(with_spec=False)),
                               ended=state.ended, spec=state.spec.packed())
                    store.flush(timeout=30.0)
        entry.state = entry.durable = state
        self.start_chain_actor(entry, state)

    def start_chain_actor(self, entry: _Entry, state: ch.ChainState) -> None:
        command = entry.command
        entry.command = None
        if command is None:
            command = state.spec.make_command()

        def publish(ref: pykka.ActorRef[Any]) -> None:
            entry.ref = ref  # before on_start runs: a chain with a ref has started or will

        CommandActor.start_with(publish, self.workers, self, entry, state, command)

    # -- admission ---------------------------------------------------------------------------

    def admit(self, entry: _Entry) -> None:
        """A chain that has not started: start it now if its pool admits it, else it waits
        (until admitted, cancelled, or past its deadline)."""
        if entry.cancel is not None:
            self.run_now(entry)  # cancelled before it was even queued
            return
        adm = self.admissions[entry.pool]
        if adm.offer(entry, entry.state.deadline_at):
            self.start_admitted(entry.pool, [entry])
        elif entry.cancel is not None and adm.remove(entry):
            # Cancelled while it was being queued (the cancel found it not yet waiting).
            self.run_now(entry)
        else:
            self.publish_admission(entry.pool)

    def run_now(self, entry: _Entry) -> None:
        """Start a chain regardless of its pool's limit (it is half done, or being cancelled)."""
        self.admissions[entry.pool].enter()
        self.start_admitted(entry.pool, [entry])

    def left(self, entry: _Entry) -> None:
        """A running chain ended (or was quarantined): start the chains it made room for."""
        if not entry.running:
            return
        entry.running = False
        self.start_admitted(entry.pool, self.admissions[entry.pool].ended())

    def reaction(self, pool: str, delay_s: float, idle: bool) -> None:
        """One sample of the runtime's own delay on ``pool`` (see actors._admission); ``idle``:
        no request waits in its SpmTaskActor for an SPM slot."""
        adm = self.admissions[pool]
        if adm.target_s is not None:
            self.start_admitted(pool, adm.observe(delay_s, idle))

    def admission_tick(self, pool: str) -> None:
        """Every poll: end the admission window of ``pool`` even if nothing was fired, and
        start (to end them) the waiting chains whose deadline passed."""
        adm = self.admissions[pool]
        expired = adm.expired(time.time())
        if adm.target_s is not None:
            expired += adm.tick(self.pool_state(pool).queued == 0)
        if expired:
            self.start_admitted(pool, expired)

    def start_admitted(self, pool: str, entries: list[_Entry]) -> None:
        """Start chains their pool counted as running. One that is gone (or the runtime is
        stopping) gives its place back; one whose start fails is a failed actor."""
        adm = self.admissions[pool]
        todo = list(entries)
        while todo:
            entry = todo.pop(0)
            if self.stopping or self.chains.get(entry.chain_id) is not entry:
                todo.extend(adm.ended())  # not running after all: its place goes on
                continue
            entry.running = True
            try:
                self.start_chain_actor(entry, entry.state)
            except Exception as exc:  # noqa: BLE001 - reported to the supervisor, like a crash
                logger.exception("chain %s: starting its actor failed", entry.chain_id,
                                 extra={"chain_id": entry.chain_id, "pool": pool})
                entry.ref = None
                self.child_failed("command", entry.chain_id, exc)
        self.publish_admission(pool)

    def publish_admission(self, pool: str) -> None:
        """Set the pool's admission gauges (waiting, running, limit)."""
        adm = self.admissions[pool]
        self.metrics.set_admission(pool, len(adm.waiting), adm.running, adm.limit)

    def escalate(self, reason: str) -> None:
        threading.Thread(target=self.rt._escalate, args=(reason,), daemon=True,
                         name="spmchain-escalate").start()


def _stop_and_wait(ref: pykka.ActorRef[Any] | None, timeout: float = 60.0) -> None:
    """Stop ``ref`` after the messages it has (a no-op if it is dead already). The wait is
    longer than an SPM call's own timeout: the actor may be in one."""
    if ref is None:
        return
    try:
        ref.stop(block=True, timeout=timeout)
    except pykka.ActorDeadError:
        pass
    except pykka.Timeout:
        logger.warning("%s did not stop within %g s; starting its successor regardless",
                       ref, timeout)


class Runtime:
    """Runs chains on the SPMs of a set of storage pools.

    ``spms`` gives one :class:`~spm.SpmClient` per pool (a mapping pool → client, or clients
    whose ``pool`` attribute names it). Use it as a context manager, or call :meth:`start` and
    :meth:`stop`. ``metrics`` defaults to a new :class:`~metrics.RuntimeMetrics` on a registry of
    its own; ``metrics_port`` (0: any free port) serves them over HTTP on ``metrics_addr``
    (127.0.0.1 by default) while the runtime runs, see :attr:`metrics_server`.

    ``store`` keeps each chain's snapshot so that chains survive a crash: a
    :class:`~actors.SnapshotStore`, a file path (an SQLite store, created if needed),
    ``"memory"`` (a MemoryStore: snapshots taken, not durable) or None (no snapshots). At
    :meth:`start` every chain the store holds that has not ended is recovered and goes on.
    """

    def __init__(
        self,
        spms: Mapping[str, SpmClient] | Iterable[SpmClient],
        options: RuntimeOptions | None = None,
        *,
        metrics: RuntimeMetrics | None = None,
        store: SnapshotStore | str | os.PathLike[str] | None = None,
        metrics_port: int | None = None,
        metrics_addr: str = "127.0.0.1",
    ) -> None:
        if metrics_port is not None and not (
            isinstance(metrics_port, int) and 0 <= metrics_port <= 65535
        ):
            raise ValueError(f"metrics_port must be a port number (0-65535), got {metrics_port!r}")
        if isinstance(spms, Mapping):
            by_pool = dict(spms)
        else:
            by_pool = {}
            for client in spms:
                pool = getattr(client, "pool", None)
                if not isinstance(pool, str) or not pool:
                    raise ValueError(f"SPM client {client!r} names no pool; pass a mapping")
                if pool in by_pool:
                    raise ValueError(f"two SPM clients for pool {pool!r}")
                by_pool[pool] = client
        if not by_pool:
            raise ValueError("a Runtime needs at least one pool's SPM client")
        for pool, client in by_pool.items():
            if not isinstance(client, SpmClient):
                raise TypeError(f"the client for pool {pool!r} is not an SpmClient: {client!r}")
        self.options = options or RuntimeOptions()
        self.metrics = metrics or RuntimeMetrics()
        self.pools = tuple(sorted(by_pool))
        self._spms = by_pool
        self._core: _Core | None = None
        self._cond = threading.Condition()
        self._callbacks: list[Callable[[ChainResult], None]] = []
        self._stopped_reason: str | None = None
        self._started = False
        self._submit_lock = threading.Lock()
        self._store_arg = store
        self._metrics_port = metrics_port
        self._metrics_addr = metrics_addr
        self.metrics_server: MetricsServer | None = None
        self.store: SnapshotStore | None = None
        self._owns_store = False
        self._store_had_rows = False
        self.recovered: list[ChainHandle] = []
        self._tuned = False  # this runtime counts among the interpreter settings' users
        self._ended_task_index: dict[str, tuple[bool, str]] | None = None
        self.quarantined = 0

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Self:
        """Start the supervisor, one SpmTaskActor and one PollerActor per pool."""
        if self._started:
            raise RuntimeError("this Runtime was already started")
        self._started = True
        _interpreter.enter(self.options)
        self._tuned = True
        try:
            if self._metrics_port is not None:
                self.metrics_server = start_metrics_server(
                    self.metrics, self._metrics_port, self._metrics_addr
                )
            store = self._open_store()
        except BaseException:
            self._close_store()
            self._undo_start()
            raise
        core = _Core(self, self._spms, self.options, self.metrics, store)
        self._core = core
        try:
            recovered = self._load_recovered(core) if store is not None else []
        except BaseException:
            self._close_store()
            core.scheduler.stop()
            core.workers.shutdown()
            self._undo_start()
            raise
        core.supervisor = SupervisorActor.start(core, self.options.supervision)
        for pool in self.pools:
            self.metrics.declare_pool(pool)
            core.publish_admission(pool)
            core.start_pool_actors(pool)
        for state in recovered:
            handle = ChainHandle(self, state.chain_id, state.spec.pool)
            entry = _Entry(state.chain_id, state.spec.pool, state, handle)
            core.chains[state.chain_id] = entry
            self.recovered.append(handle)
            self.metrics.chain_resumed(state.spec.command_type)
        for handle in self.recovered:
            entry = core.chains[handle.chain_id]
            if entry.state.phase == "new":
                core.admit(entry)  # had not started: waits its turn as if just submitted
            else:
                core.run_now(entry)
        if recovered:
            logger.info("recovered %d chains from the snapshot store", len(recovered))
        return self

    def _undo_start(self) -> None:
        """A start that failed leaves nothing running and the interpreter as it was."""
        if self.metrics_server is not None:
            self.metrics_server.stop()
        self._restore_interpreter()

    def _restore_interpreter(self) -> None:
        if self._tuned:
            self._tuned = False
            _interpreter.leave()

    # -- durability --------------------------------------------------------------------------

    def _open_store(self) -> SnapshotStore | None:
        arg = self._store_arg
        metrics = self.metrics
        on_commit = metrics.snapshot_commit

        on_failure = self._store_failed

        store: SnapshotStore | None
        if arg is None:
            store = None
        elif isinstance(arg, SnapshotStore):
            store = arg
            if store.failure is not None:
                raise StoreError(f"the snapshot store given has failed: {store.failure!r}")
            if isinstance(store, GroupCommitStore):
                if store._on_commit is None:
                    store._on_commit = on_commit
                # Each runtime using it hears of its failure (removed at stop).
                store._failure_hooks.append(on_failure)
        elif arg == "memory":
            store = MemoryStore(on_commit=on_commit, on_failure=on_failure)
            self._owns_store = True
        else:
            store = SqliteStore(arg, on_commit=on_commit, on_failure=on_failure)
            self._owns_store = True
        self.store = store
        if store is not None:
            counts = store.counts()
            self._store_had_rows = (counts.live + counts.ended) > 0
        return store

    def _store_failed(self, exc: BaseException) -> None:
        core = self._core
        if core is not None and not core.stopping:
            core.escalate(f"the snapshot store failed: {exc!r}")

    def _close_store(self) -> None:
        store = self.store
        if isinstance(store, GroupCommitStore):  # a store passed in lives on: let go of it
            core = self._core
            if core is not None and core.send_outbox in store._after_durable:
                store._after_durable.remove(core.send_outbox)
            if self._store_failed in store._failure_hooks:
                store._failure_hooks.remove(self._store_failed)
        if store is not None and self._owns_store:
            try:
                store.close(timeout=30.0)
            except StoreError as exc:
                logger.error("closing the snapshot store failed: %s", exc)

    def flush(self, timeout: float | None = 30.0) -> None:
        """Wait until every chain's last recorded state is durable in the store (a no-op
        without a store). Raises StoreError (StoreTimeoutError after ``timeout``)."""
        if self.store is not None:
            self.store.flush(timeout)

    def _load_recovered(self, core: _Core) -> list[ch.ChainState]:
        """Every chain the store holds that has not ended, resolved against the SPMs.

        A snapshot that does not decode (or names a pool or command this runtime does not
        have) is quarantined: kept aside, counted, logged; the rest go on. Then, per pool,
        the SPM's task list (``getAllTasksInfo``) settles what each chain had in flight:

        - a step or revert recorded as being fired but without a task id (the process died
          between sending the verb and recording the answer) adopts the one unowned task of
          the same verb and parameters, when the SPM tells the parameters and exactly one task
          matches; otherwise it is fired again, after the unowned tasks were discarded;
        - a task recorded as running that the SPM no longer knows is lost: the chain treats
          the step's outcome as unknown, fails and reverts it with the others;
        - every task on the SPM that no chain owns is an orphan: stopped, reverted if it
          finished successfully, and cleared, before the pool fires anything else.
        """
        store = core.store
        assert store is not None
        states: list[ch.ChainState] = []
        for chain_id, blob in list(store.load_live()):
            reason = None
            try:
                state = ch.ChainState.from_dict(decode_snapshot(blob), store.load_spec(chain_id))
                if state.chain_id != chain_id:
                    reason = f"holds chain {state.chain_id!r}, stored as {chain_id!r}"
                elif state.spec.pool not in self._spms:
                    reason = f"its pool {state.spec.pool!r} is not served by this runtime"
                else:
                    state.spec.make_command()
            except (SnapshotError, KeyError, TypeError, ValueError, AttributeError) as exc:
                reason = f"does not decode: {type(exc).__name__}: {exc}"
            if reason is not None:
                self.quarantined += 1
                self.metrics.snapshot_quarantined()
                logger.error("chain %s: snapshot quarantined: %s", chain_id, reason,
                             extra={"chain_id": chain_id})
                store.quarantine(chain_id, blob, reason, timeout=30.0)
                continue
            states.append(state)
        by_pool: dict[str, list[ch.ChainState]] = {}
        for state in states:
            by_pool.setdefault(state.spec.pool, []).append(state)
        out: list[ch.ChainState] = []
        for pool in self.pools:
            out.extend(self._resolve_pool(core, pool, by_pool.get(pool, [])))
        # What the SPMs settled (a task adopted, a task lost) is recorded before any actor
        # acts on it: a rebuilt chain performs what its state asks (the next revert fired,
        # its end reported), and that state must be the durable one (write ahead).
        decoded = {id(state) for state in states}
        settled = [state for state in out if id(state) not in decoded]
        for state in settled:
            store.save(state.chain_id, encode_snapshot(state.to_dict(with_spec=False)),
                       ended=state.ended)
        if settled:
            store.flush(timeout=30.0)
        return out

    def _resolve_pool(
        self, core: _Core, pool: str, states: list[ch.ChainState]
    ) -> list[ch.ChainState]:
        spm = self._spms[pool]
        info = _retry_spm(lambda: spm.getAllTasksInfo(), self.options.recovery_timeout_s,
                          f"getAllTasksInfo on pool {pool}")
        known: set[str] = set()
        # Tasks whose outcome a live chain recorded but that were not cleared before the
        # engine died: cleared at start, never reverted (their chain counts on their effect).
        acked: list[str] = []
        for state in states:
            for rec in state.steps:
                if rec.task_id:
                    known.add(rec.task_id)
                    if rec.status not in ("submitting", "running") and rec.task_id in info:
                        acked.append(rec.task_id)
                        core.task_owners[rec.task_id] = state.chain_id
                if rec.revert_task_id:
                    known.add(rec.revert_task_id)
                    if (rec.revert_status not in ("submitting", "running")
                            and rec.revert_task_id in info):
                        acked.append(rec.revert_task_id)
                        core.task_owners[rec.revert_task_id] = state.chain_id
                for old in rec.old_revert_task_ids:
                    known.add(old)
                    if old in info:
                        acked.append(old)
                        core.task_owners[old] = state.chain_id
        unowned = {tid: inf for tid, inf in info.items() if tid not in known}
        ps = core.pool_state(pool)
        # Tasks whose outcome an ended chain recorded only need clearing; they are set apart
        # first, so that no live chain adopts one as its own (same verb, same parameters).
        ended_acked = self._ended_chains_tasks(core, set(unowned)) if unowned else {}
        for tid, chain_id in sorted(ended_acked.items()):
            del unowned[tid]
            acked.append(tid)
            # Known as its ended chain's: a clear that fails is tried again when the poller
            # finds it unowned, and it is never taken for an orphan (reverted).
            core.task_owners[tid] = chain_id
        out: list[ch.ChainState] = []
        now = time.time()
        for state in states:
            if state.ended:
                out.append(state)
                continue
            command = state.spec.make_command()
            for ref, task_id, rec in state.in_flight():
                if task_id is None:
                    verb = rec.verb if ref[0] == "step" else rec.revert_verb
                    params = rec.params if ref[0] == "step" else (
                        rec.revert_params if rec.revert_params is not None else rec.params)
                    matches = [
                        tid for tid, inf in unowned.items()
                        if inf.get("verb") == verb and "params" in inf
                        and same_params(inf["params"], params)  # type: ignore[typeddict-item]
                    ]
                    if len(matches) == 1:
                        tid = matches[0]
                        del unowned[tid]
                        logger.info("chain %s: recovered task %s fired for %s", state.chain_id,
                                    tid, ref, extra={"chain_id": state.chain_id, "pool": pool,
                                                     "task_id": tid})
                        state, _ = ch.transition(state, ch.TaskFired(ref, tid, now), command)
                elif task_id not in info:
                    logger.warning("chain %s: task %s is unknown to the SPM", state.chain_id,
                                   task_id, extra={"chain_id": state.chain_id, "pool": pool,
                                                   "task_id": task_id})
                    state, _ = ch.transition(state, ch.TaskLost(task_id, now), command)
            out.append(state)
        if unowned:
            orphans = list(unowned)
            logger.warning("pool %s: %d tasks on the SPM belong to no chain; discarding "
                           "them", pool, len(orphans), extra={"pool": pool})
            ps.recovery_orphans = orphans
            ps.hold = True  # nothing is fired on the pool until they are gone
        if acked:
            logger.info("pool %s: %d tasks whose outcome was recorded are still on the SPM; "
                        "clearing them", pool, len(acked), extra={"pool": pool})
            ps.recovery_acked = acked
        return out

    def _ended_chains_tasks(self, core: _Core, candidates: set[str]) -> dict[str, str]:
        """Those of ``candidates`` whose outcome an ended chain recorded (they only need
        clearing: the chain ended before clearing them), with that chain. Reads ended
        snapshots, only when some task on an SPM is owned by no live chain."""
        if self._ended_task_index is None:
            index: dict[str, tuple[bool, str]] = {}
            assert core.store is not None
            for row in core.store.load_all():
                if not row.ended:
                    continue
                try:
                    state = ch.ChainState.from_dict(decode_snapshot(row.blob), row.spec)
                except (SnapshotError, KeyError, TypeError, ValueError, AttributeError):
                    continue
                cid = state.chain_id
                for rec in state.steps:
                    if rec.task_id:
                        index[rec.task_id] = (rec.status not in ("running", "submitting"), cid)
                    if rec.revert_task_id:
                        index[rec.revert_task_id] = (
                            rec.revert_status not in ("running", "submitting"), cid)
                    for old in rec.old_revert_task_ids:
                        index[old] = (True, cid)
            self._ended_task_index = index
        out: dict[str, str] = {}
        for tid in candidates:
            known = self._ended_task_index.get(tid)
            if known is not None and known[0]:
                out[tid] = known[1]
        return out

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self, reason: str = "runtime stopped", timeout: float = 10.0) -> None:
        """Stop every actor. Chains still live are left as they are (with a durable store they
        resume at the next start); their handles' ``result()`` raises RuntimeStoppedError."""
        core = self._core
        if core is None or core.stopping:
            return
        core.stopping = True
        with self._cond:
            if self._stopped_reason is None:
                self._stopped_reason = reason
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for entry in list(core.chains.values()):
            if entry.ref is not None:
                try:
                    entry.ref.stop(block=False)
                except pykka.ActorDeadError:
                    pass
        for ref in [*core.pollers.values(), *core.task_actors.values()]:
            try:
                ref.stop(block=True, timeout=max(0.1, deadline - time.monotonic()))
            except (pykka.ActorDeadError, pykka.Timeout):
                pass
        if core.supervisor is not None:
            try:
                core.supervisor.stop(block=True, timeout=max(0.1, deadline - time.monotonic()))
            except (pykka.ActorDeadError, pykka.Timeout):
                pass
        core.scheduler.stop()
        core.workers.shutdown(max(0.1, deadline - time.monotonic()))
        # Left live (a later runtime resumes them): out of this runtime's in-flight.
        self.metrics.chains_left(len(core.chains))
        self._close_store()
        if self.metrics_server is not None:
            self.metrics_server.stop()
        self._restore_interpreter()

    def _escalate(self, reason: str) -> None:
        self.metrics.supervisor_escalated()
        self.stop(reason=f"supervisor escalated: {reason}")

    @property
    def stopped_reason(self) -> str | None:
        """Why the runtime stopped (None while it runs)."""
        return self._stopped_reason

    # -- chains ------------------------------------------------------------------------------

    def submit(self, spec: ChainSpec | Mapping[str, Any]) -> ChainHandle:
        """Validate ``spec`` and start the chain; return its handle at once.

        Raises ChainSpecError naming the field when the spec is malformed (nothing is started),
        ValueError when ``chain_id`` is already live, RuntimeStoppedError when the runtime is
        not running.
        """
        core = self._core
        if core is None or core.stopping:
            raise RuntimeStoppedError(self._stopped_reason or "the runtime is not started")
        if isinstance(spec, Mapping):
            spec = ChainSpec.from_dict(spec)
        spec = validate_spec(spec, self.pools)
        try:
            command = spec.make_command()  # here, not on whichever thread starts the chain
        except Exception as exc:  # noqa: BLE001 - user code: the spec is refused
            raise ChainSpecError(
                "command", f"{spec.command or 'steps'}: building the command raised "
                           f"{type(exc).__name__}: {exc}") from exc
        chain_id = spec.chain_id or new_hex()
        opts = self.options
        state = ch.new_chain(
            spec, chain_id, time.time(),
            spec.deadline_s if spec.deadline_s is not None else opts.deadline_s,
            spec.task_timeout_s if spec.task_timeout_s is not None else opts.task_timeout_s,
        )
        handle = ChainHandle(self, chain_id, spec.pool)
        entry = _Entry(chain_id, spec.pool, state, handle)
        entry.command = command
        store = core.store
        with self._submit_lock:
            if chain_id in core.chains:
                raise ChainSpecError("chain_id", f"a chain {chain_id!r} is already live")
            if (spec.chain_id is not None and store is not None and self._store_had_rows
                    and store.load(chain_id) is not None):
                raise ChainSpecError(
                    "chain_id", f"a chain {chain_id!r} is already in the snapshot store"
                )
            core.chains[chain_id] = entry
            if store is not None:
                # Accepted: recorded as submitted (durable at the next group commit; flush()
                # waits for it).
                store.save(chain_id, encode_snapshot(state.to_dict(with_spec=False),
                                                     checked=False), spec=spec.packed())
        self.metrics.chain_started(spec.command_type)
        core.admit(entry)
        return handle

    def admission(self) -> dict[str, PoolAdmissionState]:
        """Per pool: chains running, chains waiting to be started, and the running limit (inf:
        none). A snapshot, never blocking; empty when the runtime is not running."""
        core = self._core
        if core is None:
            return {}
        return {
            pool: PoolAdmissionState(adm.running, len(adm.waiting), adm.limit)
            for pool, adm in core.admissions.items()
        }

    def chains(self) -> list[ch.ChainState]:
        """The live chains' last recorded states (a consistent copy, never blocking)."""
        core = self._core
        if core is None:
            return []
        return [e.state for e in list(core.chains.values())]

    def handle(self, chain_id: str) -> ChainHandle | None:
        """The handle of a live chain, or None."""
        core = self._core
        entry = core.chains.get(chain_id) if core else None
        return entry.handle if entry else None

    def cancel(self, chain_id: str, reason: str = "cancelled") -> bool:
        """Cancel a live chain (see :meth:`ChainHandle.cancel`). False if it is not live."""
        core = self._core
        entry = core.chains.get(chain_id) if core else None
        if entry is None or core is None:
            return False
        if entry.ref is None and core.admissions[entry.pool].remove(entry):
            # Waiting, never started: start it now to end it (end_with_failure, no revert).
            entry.cancel = reason
            core.run_now(entry)
            return True
        # Kept on the entry: the chain's actor applies it when it starts (admitted a moment
        # ago, or being rebuilt after a failure: its ref is published before its on_start
        # runs), and a rebuilt actor applies it again (the Cancel sent below may be lost with
        # an actor that fails before it gets to it). Applying it twice changes nothing.
        entry.cancel = reason
        ref = entry.ref
        if ref is None:
            return True
        try:
            ref.tell(ch.Cancel(reason, time.time()))
        except pykka.ActorDeadError:
            pass  # failed: its rebuilt actor applies entry.cancel
        return True

    def add_done_callback(self, fn: Callable[[ChainResult], None]) -> None:
        """Call ``fn(result)`` for every chain that ends from now on (on a runtime thread)."""
        self._callbacks.append(fn)

    # -- internals ---------------------------------------------------------------------------

    def _state_of(self, chain_id: str, timeout: float) -> ch.ChainState:
        core = self._core
        entry = core.chains.get(chain_id) if core else None
        if entry is None:
            raise KeyError(f"no live chain {chain_id!r}")
        return entry.state

    def _wait(self, handle: ChainHandle, timeout: float | None) -> ChainResult:
        with self._cond:
            ok = self._cond.wait_for(
                lambda: handle._result is not None or self._stopped_reason is not None, timeout
            )
            if handle._result is not None:
                return handle._result
            if not ok:
                raise TimeoutError(f"chain {handle.chain_id} did not end within {timeout} s")
            raise RuntimeStoppedError(self._stopped_reason or "runtime stopped")

    def _finish(self, handle: ChainHandle, result: ChainResult) -> None:
        with self._cond:
            handle._result = result
            callbacks = handle._callbacks
            handle._callbacks = None
            self._cond.notify_all()
        for fn in (*self._callbacks, *(callbacks or ())):
            try:
                fn(result)
            except Exception:
                logger.exception("chain %s: done callback %r raised", handle.chain_id, fn,
                                 extra={"chain_id": handle.chain_id, "pool": handle.pool})

    def _add_callback(self, handle: ChainHandle, fn: Callable[[ChainResult], None]) -> None:
        with self._cond:
            if handle._result is None:
                if handle._callbacks is None:
                    handle._callbacks = []
                handle._callbacks.append(fn)
                return
        fn(handle._result)



class _InterpreterSettings:
    """The process-wide settings running runtimes change (the collector's first threshold,
    the thread switch interval): saved when the first runtime starts, restored when the last
    one stops, whatever order they stop in."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._saved: tuple[tuple[int, int, int], float] | None = None
        self._gc_changed = False
        self._switch_changed = False

    def enter(self, options: RuntimeOptions) -> None:
        with self._lock:
            if self._users == 0:
                self._saved = (gc.get_threshold(), sys.getswitchinterval())
                self._gc_changed = self._switch_changed = False
            self._users += 1
            if options.gc_threshold is not None:
                threshold = gc.get_threshold()
                if threshold[0] < options.gc_threshold:
                    gc.set_threshold(options.gc_threshold, *threshold[1:])
                    self._gc_changed = True
            if options.switch_interval_s is not None:
                interval = options.switch_interval_s
                if self._switch_changed:
                    interval = min(interval, sys.getswitchinterval())
                sys.setswitchinterval(interval)
                self._switch_changed = True

    def leave(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0 and self._saved is not None:
                threshold, interval = self._saved
                if self._gc_changed:
                    gc.set_threshold(*threshold)
                if self._switch_changed:
                    sys.setswitchinterval(interval)
                self._saved = None


_interpreter = _InterpreterSettings()


def _retry_spm(call: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Call the SPM until it answers (failover, not-ready and connection errors are retried
    with backoff) or ``timeout_s`` passes; then raise the last error naming ``what``."""
    deadline = time.monotonic() + timeout_s
    delay = 0.05
    wait = threading.Event()
    while True:
        try:
            return call()
        except SpmError as exc:
            if time.monotonic() + delay > deadline:
                raise SpmError(f"recovery could not reach the SPM ({what}): {exc.message}",
                               code=exc.code) from exc
            logger.warning("recovery: %s failed (%s); retrying", what, exc)
            wait.wait(delay)
            delay = min(delay * 2, 2.0)
