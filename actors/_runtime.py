"""The embedding API: :class:`Runtime`, :class:`ChainHandle`, :class:`ChainResult`."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Self

import pykka

from actors import _chain as ch
from actors import _messages as m
from actors._command import CommandActor
from actors._faults import FaultInjector
from actors._poller import PollerActor
from actors._pool import WorkerPool
from actors._spec import ChainSpec, ChainSpecError, validate_spec
from actors._spm_task import SpmTaskActor
from actors._supervisor import DEFAULT_SUPERVISION, ChildSpec, SupervisorActor
from actors._timer import Scheduler
from metrics._metrics import RuntimeMetrics
from spm._client import SpmClient

if TYPE_CHECKING:
    from types import TracebackType

__all__ = [
    "ChainHandle",
    "ChainResult",
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
    that runs every CommandActor.
    """

    max_outstanding: int = 100
    poll_min_s: float = 0.02
    poll_max_s: float = 1.0
    redeliver_s: float = 1.0
    orphan_grace_s: float = 30.0
    deadline_s: float = 6 * 3600.0
    task_timeout_s: float = 3600.0
    command_workers: int = 2
    retry_min_s: float = 0.05
    retry_max_s: float = 2.0
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
                     "deadline_s", "task_timeout_s", "retry_min_s", "retry_max_s"):
            positive(name, getattr(self, name))
        if self.poll_max_s < self.poll_min_s:
            raise ValueError(
                f"RuntimeOptions.poll_max_s ({self.poll_max_s}) is below poll_min_s "
                f"({self.poll_min_s})"
            )


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

    __slots__ = ("actor", "chain_id", "handle", "pool", "ref", "state")

    def __init__(self, chain_id: str, pool: str, state: ch.ChainState, handle: ChainHandle):
        self.chain_id = chain_id
        self.pool = pool
        self.state = state
        self.handle = handle
        self.ref: pykka.ActorRef[Any] | None = None
        self.actor: CommandActor | None = None


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


class _Core:
    """What the actors share: the directory of actors, the clock, metrics, options."""

    def __init__(self, rt: Runtime, spms: dict[str, SpmClient], options: RuntimeOptions,
                 metrics: RuntimeMetrics) -> None:
        self.rt = rt
        self.spms = spms
        self.options = options
        self.metrics = metrics
        self.faults = FaultInjector(options.fault_rates, options.fault_seed)
        self.scheduler = Scheduler()
        self.workers = WorkerPool(options.command_workers)
        self.chains: dict[str, _Entry] = {}
        self.task_actors: dict[str, pykka.ActorRef[Any]] = {}
        self.pollers: dict[str, pykka.ActorRef[Any]] = {}
        self.supervisor: pykka.ActorRef[Any] | None = None
        self.stopping = False

    # -- telling -----------------------------------------------------------------------------

    def tell_chain(self, chain_id: str, event: Any, seen_at: float | None = None) -> None:
        entry = self.chains.get(chain_id)
        if entry is None or entry.ref is None:
            return  # ended, or being rebuilt: the rebuilt actor asks again
        try:
            entry.ref.tell(event)
        except pykka.ActorDeadError:
            pass

    def tell_task_actor(self, pool: str, message: Any) -> None:
        ref = self.task_actors.get(pool)
        if ref is None:
            return
        try:
            ref.tell(message)
        except pykka.ActorDeadError:
            pass  # being restarted: the new actor asks every chain again (reannounce)

    def tell_poller(self, pool: str, message: Any) -> None:
        ref = self.pollers.get(pool)
        if ref is None:
            return
        try:
            ref.tell(message)
        except pykka.ActorDeadError:
            pass

    def reannounce(self, pool: str) -> None:
        for entry in list(self.chains.values()):
            if entry.pool == pool and entry.ref is not None:
                try:
                    entry.ref.tell(m.Reannounce())
                except pykka.ActorDeadError:
                    pass

    # -- recording and ending ----------------------------------------------------------------

    def record(self, entry: _Entry, state: ch.ChainState, effects: list[ch.Effect],
               seen_at: float | None, actor: CommandActor) -> bool:
        """Record ``state``. True when the effects were handed on to be performed once the
        record is durable; False when the caller performs them now."""
        entry.state = state
        return False

    def chain_ended(self, entry: _Entry, state: ch.ChainState) -> None:
        self.chains.pop(entry.chain_id, None)
        assert state.outcome is not None
        self.metrics.chain_ended(state.outcome, state.spec.command_type)  # type: ignore[arg-type]
        log = logger.info if state.outcome == ch.ENDED_SUCCESSFULLY else logger.warning
        log("chain %s %s%s", entry.chain_id, state.outcome,
            f": {state.reason}" if state.reason else "",
            extra={"chain_id": entry.chain_id, "pool": entry.pool})
        self.rt._finish(entry.handle, ChainResult(entry.chain_id, state.outcome, state.reason,
                                                  state))

    # -- supervision -------------------------------------------------------------------------

    def child_failed(self, kind: str, key: str, error: BaseException | None) -> None:
        if self.stopping or self.supervisor is None:
            return
        try:
            self.supervisor.tell(m.ChildFailed(kind, key, repr(error)))
        except pykka.ActorDeadError:
            pass

    def start_pool_actors(self, pool: str, restarted: bool) -> None:
        self.task_actors[pool] = SpmTaskActor.start(self, pool, restarted)
        self.pollers[pool] = PollerActor.start(self, pool, restarted)

    def restart(self, kind: str, key: str, strategy: str) -> None:
        self.metrics.actor_restarted(kind)
        if kind == "command":
            self._restart_chain(key)
            return
        pool = key
        if kind == "spm_task" or strategy == "one_for_pool":
            _stop_quietly(self.task_actors.get(pool))
            self.task_actors[pool] = SpmTaskActor.start(self, pool, True)
        if kind == "poller" or strategy == "one_for_pool":
            _stop_quietly(self.pollers.get(pool))
            self.pollers[pool] = PollerActor.start(self, pool, True)

    def _restart_chain(self, chain_id: str) -> None:
        entry = self.chains.get(chain_id)
        if entry is None:
            return
        self.start_chain_actor(entry, entry.state)

    def start_chain_actor(self, entry: _Entry, state: ch.ChainState) -> None:
        command = state.spec.make_command()
        entry.ref = CommandActor.start(self.workers, self, entry, state, command)

    def escalate(self, reason: str) -> None:
        threading.Thread(target=self.rt._escalate, args=(reason,), daemon=True,
                         name="spmchain-escalate").start()


def _stop_quietly(ref: pykka.ActorRef[Any] | None) -> None:
    if ref is None:
        return
    try:
        ref.stop(block=False)
    except pykka.ActorDeadError:
        pass


class Runtime:
    """Runs chains on the SPMs of a set of storage pools.

    ``spms`` gives one :class:`~spm.SpmClient` per pool (a mapping pool → client, or clients
    whose ``pool`` attribute names it). Use it as a context manager, or call :meth:`start` and
    :meth:`stop`. ``metrics`` defaults to a new :class:`~metrics.RuntimeMetrics` on a registry of
    its own.
    """

    def __init__(
        self,
        spms: Mapping[str, SpmClient] | Iterable[SpmClient],
        options: RuntimeOptions | None = None,
        *,
        metrics: RuntimeMetrics | None = None,
    ) -> None:
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

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Self:
        """Start the supervisor, one SpmTaskActor and one PollerActor per pool."""
        if self._started:
            raise RuntimeError("this Runtime was already started")
        self._started = True
        core = _Core(self, self._spms, self.options, self.metrics)
        self._core = core
        core.supervisor = SupervisorActor.start(core, self.options.supervision)
        for pool in self.pools:
            self.metrics.declare_pool(pool)
            core.start_pool_actors(pool, restarted=False)
        return self

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
        chain_id = spec.chain_id or uuid.uuid4().hex
        opts = self.options
        state = ch.new_chain(
            spec, chain_id, time.time(),
            spec.deadline_s if spec.deadline_s is not None else opts.deadline_s,
            spec.task_timeout_s if spec.task_timeout_s is not None else opts.task_timeout_s,
        )
        handle = ChainHandle(self, chain_id, spec.pool)
        entry = _Entry(chain_id, spec.pool, state, handle)
        with self._submit_lock:
            if chain_id in core.chains:
                raise ChainSpecError("chain_id", f"a chain {chain_id!r} is already live")
            core.chains[chain_id] = entry
        self.metrics.chain_started(spec.command_type)
        core.start_chain_actor(entry, state)
        return handle

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
        if entry is None or entry.ref is None:
            return False
        try:
            entry.ref.tell(ch.Cancel(reason, time.time()))
        except pykka.ActorDeadError:
            return False
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
                logger.exception("chain %s: done callback %r raised", handle.chain_id, fn)

    def _add_callback(self, handle: ChainHandle, fn: Callable[[ChainResult], None]) -> None:
        with self._cond:
            if handle._result is None:
                if handle._callbacks is None:
                    handle._callbacks = []
                handle._callbacks.append(fn)
                return
        fn(handle._result)

