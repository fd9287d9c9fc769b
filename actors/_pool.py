"""Pooled actors: pykka actors whose inboxes are drained on a small shared worker pool.

A :class:`PooledActor` behaves like a pykka actor — ``start()``, ``tell``/``ask`` through its
:class:`pykka.ActorRef`, ``on_start``/``on_receive``/``on_failure``/``on_stop``, messages
handled one at a time in order, ``ActorDeadError`` once stopped — but owns no thread. When a
message arrives the actor is put on its :class:`WorkerPool`'s run queue; a worker takes it,
handles up to ``batch`` messages and puts it back at the end of the queue if more are waiting,
so one busy actor cannot starve the others. Pooled actors are not put in pykka's global
``ActorRegistry`` (a list, slow to search and to stop at tens of thousands of actors); whoever
starts them keeps their refs.

A pooled actor must never block its worker (no ``ask(...).get()`` on another actor, no I/O
without a short timeout), or the whole pool stalls.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Self

import pykka
from pykka import ActorDeadError, ActorRef
from pykka._envelope import Envelope
from pykka.messages import _ActorStop

from actors._ids import new_uuid

if TYPE_CHECKING:
    from types import TracebackType

__all__ = ["PooledActor", "ThreadActor", "WorkerPool"]

logger = logging.getLogger(__name__)


class _Flag:
    """A stopped flag with threading.Event's interface, light enough for 100,000 actors.

    Waiters (rare: ``ActorRef.stop(block=True)`` goes through futures instead) share one
    condition.
    """

    __slots__ = ("_set",)
    _cond = threading.Condition()

    def __init__(self) -> None:
        self._set = False

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        with self._cond:
            self._cond.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._set, timeout)


class _Start:
    __slots__ = ()


_START = _Start()
_STOP_WORKER = object()


class WorkerPool:
    """A fixed set of daemon threads draining the inboxes of pooled actors.

    ``workers`` threads share one run queue; ``batch`` bounds the messages one actor handles per
    turn. :meth:`shutdown` stops the threads after the queue is drained; actors scheduled after
    that are not run (their ``tell`` raises nothing, their ``ask`` futures get ActorDeadError
    when the actor is stopped by its owner).
    """

    def __init__(self, workers: int = 2, *, batch: int = 64, name: str = "spmchain-pool") -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        if batch < 1:
            raise ValueError(f"batch must be at least 1, got {batch}")
        self.batch = batch
        self._runq: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
            for i in range(workers)
        ]
        self._closed = False
        for t in self._threads:
            t.start()

    def schedule(self, actor: PooledActor) -> None:
        self._runq.put(actor)

    def _work(self) -> None:
        runq = self._runq
        while True:
            actor = runq.get()
            if actor is _STOP_WORKER:
                return
            try:
                actor._run_turn()
            except BaseException:  # pragma: no cover - _run_turn handles everything
                logger.exception("pooled actor %s escaped its turn", actor)

    def shutdown(self, timeout: float | None = 10.0) -> None:
        """Stop the workers once everything already queued has run. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for _ in self._threads:
            self._runq.put(_STOP_WORKER)
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout)

    @property
    def threads(self) -> int:
        return len(self._threads)


class _PooledInbox:
    """The inbox of one pooled actor: a list and a 'scheduled' bit, guarded by one lock.

    A list, not a deque: an empty deque costs ~600 bytes, and a hundred thousand actors spend
    nearly all their life with an empty inbox. A turn takes its messages in one slice.
    """

    __slots__ = ("_actor", "_lock", "_q", "_scheduled")

    def __init__(self) -> None:
        self._q: list[Envelope[Any]] = []
        self._lock = threading.Lock()
        self._scheduled = False
        self._actor: PooledActor | None = None

    def put(self, envelope: Envelope[Any], /) -> None:
        actor = self._actor
        if actor is None or actor._dead:
            _reject(actor, envelope)
            return
        with self._lock:
            self._q.append(envelope)
            if self._scheduled:
                return
            self._scheduled = True
        actor._pool.schedule(actor)

    def take(self, n: int) -> list[Envelope[Any]]:
        """Up to ``n`` messages, oldest first, removed from the inbox."""
        with self._lock:
            q = self._q
            if len(q) <= n:
                self._q = []
                return q
            taken = q[:n]
            del q[:n]
            return taken

    def get(self) -> Envelope[Any]:
        with self._lock:
            return self._q.pop(0)

    def empty(self) -> bool:
        return not self._q

    def _finish_turn(self) -> bool:
        """After a turn: True (and stays scheduled) if messages are waiting."""
        with self._lock:
            if self._q:
                return True
            self._scheduled = False
            return False


def _reject(actor: PooledActor | None, envelope: Envelope[Any]) -> None:
    if envelope.reply_to is None:
        return
    if isinstance(envelope.message, _ActorStop):
        envelope.reply_to.set(None)
        return
    what = actor.actor_ref if actor is not None else "the actor"
    err = ActorDeadError(f"{what} stopped before handling the message")
    envelope.reply_to.set_exception(exc_info=(ActorDeadError, err, None))


class PooledActor(pykka.Actor):
    """A pykka actor run on a :class:`WorkerPool` instead of a thread of its own.

    Start it with ``MyActor.start(pool, *args, **kwargs)``: the pool is the first argument and
    the rest go to ``__init__`` (which must call ``super().__init__(pool)``). The returned
    ActorRef works as for any pykka actor. An exception raised by ``on_receive`` for a ``tell``
    is logged, ``on_failure`` runs and the actor stops; for an ``ask`` the exception goes to the
    caller's future and the actor goes on (pykka's semantics).
    """

    _pool: WorkerPool
    _dead: bool

    @classmethod
    def start(cls, *args: Any, **kwargs: Any) -> ActorRef[Self]:
        """Create the actor, run ``on_start`` on the pool, and return its ref (not registered)."""
        return cls.start_with(None, *args, **kwargs)

    @classmethod
    def start_with(cls, before: Callable[[ActorRef[Self]], None] | None, *args: Any,
                   **kwargs: Any) -> ActorRef[Self]:
        """:meth:`start`, calling ``before(ref)`` once the actor exists and before its
        ``on_start`` can run (to publish the ref where ``on_start`` or others look for it)."""
        obj = cls(*args, **kwargs)
        assert getattr(obj, "_pool", None) is not None, (
            "PooledActor.__init__() was not called with the pool"
        )
        if before is None:
            obj._start_actor_loop()
            return obj.actor_ref
        # _START is first in the inbox before the ref is published: a message told as soon as
        # it is (a cancel, a redelivered task end) comes after on_start, never before.
        inbox: _PooledInbox = obj.actor_inbox  # type: ignore[assignment]
        with inbox._lock:
            inbox._q.append(Envelope(_START))
            inbox._scheduled = True
        before(obj.actor_ref)
        obj._pool.schedule(obj)
        return obj.actor_ref

    def __init__(self, pool: WorkerPool, *_args: Any, **_kwargs: Any) -> None:
        # pykka.Actor.__init__ builds the ref from the inbox, so do its work here in order.
        self._pool = pool
        self._dead = False
        self.actor_urn = new_uuid().urn
        inbox = _PooledInbox()
        inbox._actor = self
        self.actor_inbox = inbox
        self.actor_stopped = _Flag()  # type: ignore[assignment]
        self._actor_ref = ActorRef(self)

    @staticmethod
    def _create_actor_inbox() -> Any:  # pragma: no cover - __init__ builds the inbox
        return _PooledInbox()

    @staticmethod
    def _create_future() -> pykka.Future[Any]:
        return pykka.ThreadingFuture()

    def _start_actor_loop(self) -> None:
        inbox: _PooledInbox = self.actor_inbox  # type: ignore[assignment]
        inbox.put(Envelope(_START))

    # -- the turn: pykka's _actor_loop, cut into slices ------------------------------------

    def _run_turn(self) -> None:
        inbox: _PooledInbox = self.actor_inbox  # type: ignore[assignment]
        batch = inbox.take(self._pool.batch)
        for i, envelope in enumerate(batch):
            if self._dead:
                # Stopped mid-turn: what this turn took and did not handle is rejected too.
                for rest in batch[i:]:
                    _reject(self, rest)
                break
            self._handle_envelope(envelope)
        if self._dead:
            self._teardown()
            return
        if inbox._finish_turn():
            self._pool.schedule(self)

    def _handle_envelope(self, envelope: Envelope[Any]) -> None:
        message = envelope.message
        if message is _START:
            try:
                self.on_start()
            except Exception:
                # Unlike pykka, a failure here is reported like one in a message (on_failure:
                # supervised), not only logged: a chain whose actor died starting must be
                # rebuilt or escalated, not left live with no actor.
                self._failed()
            return
        try:
            response = self._handle_receive(message)
            if envelope.reply_to is not None:
                envelope.reply_to.set(response)
        except Exception:
            if envelope.reply_to is not None:
                logger.info("Exception returned from %s to caller:", self, exc_info=True)
                envelope.reply_to.set_exception()
            else:
                self._failed()
        except BaseException:
            # KeyboardInterrupt / SystemExit inside a handler: stop this actor and answer its
            # pending asks with ActorDeadError (the turn's teardown), as pykka does.
            logger.debug("%r in %s, stopping it", sys.exc_info()[1], self)
            self._stop()

    def _failed(self) -> None:
        """The exception being handled stops this actor: logged, then ``on_failure``."""
        exc_info = sys.exc_info()
        self._handle_failure(*exc_info)
        try:
            self.on_failure(*exc_info)
        except Exception:
            self._handle_failure(*sys.exc_info())

    def _stop(self) -> None:
        self._dead = True
        self.actor_stopped.set()
        logger.debug("Stopped %s", self)
        try:
            self.on_stop()
        except Exception:
            self._handle_failure(*sys.exc_info())

    def _handle_failure(
        self,
        exception_type: type[BaseException] | None,
        exception_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        logger.error(
            "Unhandled exception in %s:",
            self,
            exc_info=(exception_type, exception_value, traceback),  # type: ignore[arg-type]
            extra=self.log_extra(),
        )
        self._dead = True
        self.actor_stopped.set()

    def log_extra(self) -> dict[str, Any]:
        """Attributes for this actor's log records (a CommandActor names its chain and pool)."""
        return {}

    def _teardown(self) -> None:
        # Reject whatever is left; a put racing with the stop either sees _dead and rejects
        # itself, or finds the actor unscheduled and schedules this teardown again.
        inbox: _PooledInbox = self.actor_inbox  # type: ignore[assignment]
        while True:
            for envelope in inbox.take(len(inbox._q) or 1):
                _reject(self, envelope)
            if not inbox._finish_turn():
                break
        # The inbox (which refs hold) lets go of the actor: a stopped actor and what it holds
        # are freed as soon as nobody else refers to them, not at the next full collection.
        with inbox._lock:
            inbox._actor = None


class ThreadActor(pykka.ThreadingActor):
    """A pykka ThreadingActor on a daemon thread whose inbox is a ``queue.SimpleQueue``.

    For the few long-lived actors (supervisor, one SpmTaskActor and one PollerActor per pool):
    SimpleQueue's put/get are C calls without the Condition that ``queue.Queue`` takes, which
    matters at tens of thousands of messages a second.
    """

    use_daemon_thread = True

    @staticmethod
    def _create_actor_inbox() -> Any:
        return queue.SimpleQueue()
