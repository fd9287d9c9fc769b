"""PooledActor and WorkerPool: pykka's actor semantics without a thread per actor."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pykka
import pytest

from actors._pool import PooledActor, WorkerPool

WAIT = 10.0

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def pool() -> Iterator[WorkerPool]:
    p = WorkerPool(2)
    yield p
    p.shutdown(timeout=5.0)


def start_recorder(pool: WorkerPool) -> tuple[pykka.ActorRef[Recorder], Recorder]:
    """Start a Recorder; return its ref and the actor itself (to inspect after it stopped)."""
    made: list[Recorder] = []
    ref = Recorder.start(pool, None, made)
    return ref, made[0]


class Recorder(PooledActor):
    """Records what it handles. Messages: ("echo", x) -> x, ("raise", exc), anything else is
    appended to ``seen``; "seen" (asked) answers the list."""

    def __init__(
        self,
        pool: WorkerPool,
        start_gate: threading.Event | None = None,
        made: list[Recorder] | None = None,
    ) -> None:
        super().__init__(pool)
        if made is not None:
            made.append(self)
        self.start_gate = start_gate
        self.seen: list[Any] = []
        self.stopped = threading.Event()
        self.failed = threading.Event()
        self.failure: BaseException | None = None

    def on_start(self) -> None:
        if self.start_gate is not None:
            assert self.start_gate.wait(WAIT)
        self.seen.append("on_start")

    def on_receive(self, message: Any) -> Any:
        if message == "seen":
            return list(self.seen)
        if isinstance(message, tuple) and message[0] == "echo":
            return message[1]
        if isinstance(message, tuple) and message[0] == "raise":
            raise message[1]
        if isinstance(message, tuple) and message[0] == "wait":
            assert message[1].wait(WAIT)
            return "waited"
        self.seen.append(message)
        return None

    def on_stop(self) -> None:
        self.stopped.set()

    def on_failure(self, exc_type: Any, exc_value: Any, tb: Any) -> None:
        self.failure = exc_value
        self.failed.set()


def test_on_start_runs_before_the_first_message(pool: WorkerPool) -> None:
    gate = threading.Event()
    ref = Recorder.start(pool, gate)
    ref.tell("one")
    ref.tell("two")
    answer = ref.ask("seen", block=False)
    gate.set()
    assert answer.get(timeout=WAIT) == ["on_start", "one", "two"]


def test_messages_are_handled_one_at_a_time_in_order_per_sender() -> None:
    # Four workers and batch=1: the actor goes back on the run queue after every message, so
    # a second worker would pick it up at once if the pool let one actor run twice at a time.
    pool = WorkerPool(4, batch=1)

    class Checker(PooledActor):
        def __init__(self, pool: WorkerPool) -> None:
            super().__init__(pool)
            self.busy = False
            self.overlaps = 0
            self.seen: list[tuple[int, int]] = []

        def on_receive(self, message: Any) -> Any:
            if message == "report":
                return self.overlaps, list(self.seen)
            if self.busy:
                self.overlaps += 1
            self.busy = True
            self.seen.append(message)
            sum(range(50))  # a little work while "busy"
            self.busy = False
            return None

    try:
        ref = Checker.start(pool)
        senders, per_sender = 4, 2000

        def send(sender: int) -> None:
            for i in range(per_sender):
                ref.tell((sender, i))

        threads = [threading.Thread(target=send, args=(s,)) for s in range(senders)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
        report: tuple[int, list[tuple[int, int]]] = ref.ask("report", block=True, timeout=WAIT)
        overlaps, seen = report
        assert overlaps == 0
        assert len(seen) == senders * per_sender
        for s in range(senders):
            assert [i for sender, i in seen if sender == s] == list(range(per_sender))
    finally:
        pool.shutdown(timeout=5.0)


def test_ask_returns_the_value_or_raises_the_handlers_exception_and_the_actor_goes_on(
    pool: WorkerPool,
) -> None:
    ref, actor = start_recorder(pool)
    assert ref.ask(("echo", 42), timeout=WAIT) == 42
    with pytest.raises(ValueError, match="bad input"):
        ref.ask(("raise", ValueError("bad input")), timeout=WAIT)
    assert ref.is_alive()
    assert ref.ask(("echo", "still here"), timeout=WAIT) == "still here"
    assert not actor.failed.is_set()


def test_exception_on_a_tell_calls_on_failure_and_stops_the_actor(pool: WorkerPool) -> None:
    ref, actor = start_recorder(pool)
    gate = threading.Event()
    ref.tell(("wait", gate))  # hold the actor so the next two messages queue behind the failure
    ref.tell(("raise", RuntimeError("boom")))
    pending = ref.ask(("echo", 1), block=False)
    gate.set()
    assert actor.failed.wait(WAIT)
    assert isinstance(actor.failure, RuntimeError)
    assert str(actor.failure) == "boom"
    assert not ref.is_alive()
    with pytest.raises(pykka.ActorDeadError):
        pending.get(timeout=WAIT)
    # pykka calls on_failure instead of on_stop when an actor dies of an exception.
    assert not actor.stopped.is_set()


def test_tell_and_ask_after_stop_raise_actor_dead_error(pool: WorkerPool) -> None:
    ref = Recorder.start(pool)
    assert ref.stop(block=True, timeout=WAIT) is True
    with pytest.raises(pykka.ActorDeadError):
        ref.tell("late")
    with pytest.raises(pykka.ActorDeadError):
        ref.ask(("echo", 1), timeout=WAIT)
    assert ref.stop(block=True, timeout=WAIT) is False  # already stopped


def test_stop_block_runs_on_stop_before_returning(pool: WorkerPool) -> None:
    ref, actor = start_recorder(pool)
    ref.tell("work")
    assert ref.stop(block=True, timeout=WAIT) is True
    assert actor.stopped.is_set()
    assert actor.seen == ["on_start", "work"]  # messages before the stop were handled


def test_pending_asks_of_a_stopped_actor_get_actor_dead_error(pool: WorkerPool) -> None:
    ref = Recorder.start(pool)
    gate = threading.Event()
    first = ref.ask(("wait", gate), block=False)
    stopping = ref.stop(block=False)
    pending = [ref.ask(("echo", i), block=False) for i in range(3)]
    gate.set()
    assert first.get(timeout=WAIT) == "waited"
    assert stopping.get(timeout=WAIT) is True
    for future in pending:
        with pytest.raises(pykka.ActorDeadError):
            future.get(timeout=WAIT)


def test_on_start_that_raises_stops_the_actor_and_fails_pending_asks(pool: WorkerPool) -> None:
    class BadStart(Recorder):
        def on_start(self) -> None:
            raise RuntimeError("cannot start")

    ref = BadStart.start(pool)
    pending = ref.ask(("echo", 1), block=False)
    with pytest.raises(pykka.ActorDeadError):
        pending.get(timeout=WAIT)
    assert not ref.is_alive()


def test_base_exception_in_a_handler_stops_the_actor_and_fails_pending_asks(
    pool: WorkerPool,
) -> None:
    # pykka: a BaseException (SystemExit, KeyboardInterrupt) in a handler stops the actor and
    # its teardown answers every pending ask with ActorDeadError; no caller waits forever.
    ref, actor = start_recorder(pool)
    gate = threading.Event()
    ref.tell(("wait", gate))
    ref.tell(("raise", SystemExit("exit in a handler")))
    pending = ref.ask(("echo", 1), block=False)
    gate.set()
    assert actor.stopped.wait(WAIT)
    with pytest.raises(pykka.ActorDeadError):
        pending.get(timeout=2.0)
    # The pool's workers survive it.
    other = Recorder.start(pool)
    assert other.ask(("echo", "alive"), timeout=WAIT) == "alive"


def test_pooled_actors_are_not_in_pykkas_registry(pool: WorkerPool) -> None:
    ref = Recorder.start(pool)
    assert ref.ask(("echo", 1), timeout=WAIT) == 1
    assert ref not in pykka.ActorRegistry.get_all()
    assert pykka.ActorRegistry.get_by_urn(ref.actor_urn) is None
    assert pykka.ActorRegistry.get_by_class(Recorder) == []


@pytest.mark.timeout(120)
def test_twenty_thousand_actors_on_two_workers_start_no_thread() -> None:
    pool = WorkerPool(2)
    try:
        threads_with_pool = threading.active_count()

        class Tiny(PooledActor):
            def on_receive(self, message: Any) -> Any:
                return message

        refs = [Tiny.start(pool) for _ in range(20_000)]
        futures = [ref.ask(i, block=False) for i, ref in enumerate(refs)]
        assert [f.get(timeout=WAIT) for f in futures] == list(range(20_000))
        assert threading.active_count() <= threads_with_pool
        assert pool.threads == 2
        stops = [ref.stop(block=False) for ref in refs]
        assert all(s.get(timeout=WAIT) for s in stops)
    finally:
        pool.shutdown(timeout=5.0)


def test_a_flooded_actor_does_not_starve_another() -> None:
    # One worker: the flooded actor and the other one must share it. A blocker holds the
    # worker until the flood is queued, so the whole flood is waiting when the other actor's
    # ask arrives; batch fairness lets the ask through after one batch of the flood.
    batch, flood = 64, 20_000
    pool = WorkerPool(1, batch=batch)

    class Counter(PooledActor):
        def __init__(self, pool: WorkerPool, made: list[Counter]) -> None:
            super().__init__(pool)
            made.append(self)
            self.handled = 0

        def on_receive(self, message: Any) -> Any:
            if message == "count":
                return self.handled
            self.handled += 1
            return None

    class Other(PooledActor):
        def __init__(self, pool: WorkerPool, flooded: Counter) -> None:
            super().__init__(pool)
            self.flooded = flooded

        def on_receive(self, message: Any) -> Any:
            return self.flooded.handled  # how far the flood got when this ran

    try:
        blocker = Recorder.start(pool)
        made: list[Counter] = []
        flooded_ref = Counter.start(pool, made)
        flooded = made[0]
        other = Other.start(pool, flooded)
        # Let all three finish on_start, then hold the only worker.
        assert other.ask("x", timeout=WAIT) == 0
        assert flooded_ref.ask("count", timeout=WAIT) == 0
        gate = threading.Event()
        held = blocker.ask(("wait", gate), block=False)
        for i in range(flood):
            flooded_ref.tell(i)
        answer = other.ask("how far", block=False)
        gate.set()
        assert held.get(timeout=WAIT) == "waited"
        progress = answer.get(timeout=WAIT)
        assert progress < flood, "the other actor waited for the whole flood"
        assert progress <= 2 * batch
        assert flooded_ref.ask("count", timeout=WAIT) == flood
    finally:
        pool.shutdown(timeout=5.0)


def test_worker_pool_refuses_bad_sizes() -> None:
    with pytest.raises(ValueError, match="workers"):
        WorkerPool(0)
    with pytest.raises(ValueError, match="batch"):
        WorkerPool(1, batch=0)


def test_a_stopped_actor_is_freed_without_waiting_for_the_garbage_collector() -> None:
    import gc
    import weakref

    pool = WorkerPool(1)  # one worker: a later turn of another actor runs after the stop's
    gc.disable()
    try:
        ref, actor = start_recorder(pool)
        alive = weakref.ref(actor)
        del actor
        assert ref.stop(block=True, timeout=WAIT) is True
        other = Recorder.start(pool)
        assert other.ask(("echo", 1), timeout=WAIT) == 1
        # The ref (as a caller keeps it) no longer keeps the actor: refcounting freed it.
        assert alive() is None
        with pytest.raises(pykka.ActorDeadError):
            ref.tell("late")
        other.stop(block=True, timeout=WAIT)
    finally:
        gc.enable()
        pool.shutdown(timeout=5.0)


def test_start_with_publishes_the_ref_before_on_start_can_run(pool: WorkerPool) -> None:
    published: list[Any] = []
    seen_at_start: list[bool] = []

    class Checker(PooledActor):
        def on_start(self) -> None:
            seen_at_start.append(bool(published) and published[0] == self.actor_ref)

    ref = Checker.start_with(published.append, pool)
    assert ref.ask("anything", timeout=WAIT) is None  # on_start has run by now
    assert published == [ref]
    assert seen_at_start == [True]
    ref.stop(block=True, timeout=WAIT)
