"""The runtime's Prometheus metrics: one :class:`RuntimeMetrics` per runtime, on its own registry.

The runtime records an event by calling one small method (``step_fired``, ``task_ended``,
``reaction``, ...). Those calls sit on the hot path — tens of thousands a second — so they do
not go through ``prometheus_client``'s metric objects (``.labels()`` costs about 1 µs and every
``inc`` takes a lock). Instead:

- a counter is an :func:`itertools.count` per label value: ``next()`` on it is a single C call,
  atomic under the GIL, so an increment takes no lock;
- a histogram keeps its bucket counts and sum in a small object behind one lock, and finds the
  bucket by bisection;
- a gauge of SPM slots is a tuple stored in a dict (one atomic store);
- the number of chains in flight is not stored at all: it is derived at scrape time from the
  started, resumed and ended counters.

Per-label-value state is created on first use and kept, so after the first call with a value the
method is one dict lookup and one increment. :class:`RuntimeMetrics` is itself the
``Collector`` registered on the registry: a scrape (``generate_latest``, the HTTP server, the WSGI
app) calls :meth:`RuntimeMetrics.collect`, which turns that state into metric families.

Label values must have bounded cardinality: pool ids, verbs, command types, actor kinds and the two
outcomes. Never pass a chain id or a task id as a label value.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from itertools import count
from typing import Final, Literal

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

ENDED_SUCCESSFULLY: Final = "ended_successfully"
"""``outcome`` of a chain whose every step succeeded and whose end hooks ran."""

ENDED_WITH_FAILURE: Final = "ended_with_failure"
"""``outcome`` of a chain that failed (a step failed, its deadline passed, ...) and was reverted."""

Outcome = Literal["ended_successfully", "ended_with_failure"]
OUTCOMES: Final[tuple[Outcome, Outcome]] = (ENDED_SUCCESSFULLY, ENDED_WITH_FAILURE)

TASK_DURATION_BUCKETS: Final[tuple[float, ...]] = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0,
)  # fmt: skip
"""SPM task duration, 10 ms to 8 h: storage tasks (copying an image) run for hours."""

REACTION_LATENCY_BUCKETS: Final[tuple[float, ...]] = (
    0.0005, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03,
    0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
"""From a task's end seen by the poller to the chain's next task fired (the runtime's own share
of a reaction; the wait for the poll comes on top): 0.5 ms to 10 s, fine up to 50 ms."""

ACTOR_KINDS: Final[tuple[str, ...]] = ("command", "spm_task", "poller")
"""The supervised actor kinds, whose restart counters exist from the start (at 0)."""

POLL_DURATION_BUCKETS: Final[tuple[float, ...]] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
"""One ``getAllTasksStatuses`` call, 1 ms to the SPM call's timeout range."""

SNAPSHOT_COMMIT_BUCKETS: Final[tuple[float, ...]] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0,
)  # fmt: skip
"""One group commit of the snapshot store, 0.1 ms to 5 s."""

SNAPSHOT_BATCH_BUCKETS: Final[tuple[float, ...]] = (
    1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192,
)  # fmt: skip
"""Snapshots written by one group commit."""


def _count_value(counter: count[int]) -> int:
    """The number of times ``next`` was called on an ``itertools.count()`` started at 0.

    ``itertools.count`` has no public accessor; its repr is ``count(N)`` with N the next value.
    """
    return int(repr(counter)[6:-1])


class _Histogram:
    """Bucket counts and sum of one histogram series; thread-safe.

    ``observe`` finds the bucket by bisection (``le`` semantics: a value equal to a bound falls in
    that bound's bucket; above the last bound, in ``+Inf``) and updates the bucket and the sum
    under one lock.
    """

    __slots__ = ("_bounds", "_counts", "_les", "_lock", "_sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self._les = (*(repr(float(b)) for b in bounds), "+Inf")
        self._counts = [0] * (len(bounds) + 1)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        """Count one observation of ``value`` (seconds, or a batch size); must be a number."""
        i = bisect_left(self._bounds, value)
        lock = self._lock
        lock.acquire()  # acquire/release in try/finally: cheaper than `with` on CPython 3.11
        try:
            self._counts[i] += 1
            self._sum += value
        finally:
            lock.release()

    def cumulative(self) -> tuple[list[tuple[str, float]], float]:
        """A consistent copy: ``([(le, cumulative count), ..., ("+Inf", total)], sum)``."""
        with self._lock:
            counts = list(self._counts)
            total = self._sum
        buckets: list[tuple[str, float]] = []
        running = 0
        for le, n in zip(self._les, counts, strict=True):
            running += n
            buckets.append((le, running))
        return buckets, total


class RuntimeMetrics(Collector):
    """Every metric of one runtime, registered on one ``CollectorRegistry``.

    ``RuntimeMetrics()`` makes a new registry of its own (:attr:`registry`); it never touches
    ``prometheus_client``'s global ``REGISTRY``, so two runtimes in one process, or a host
    application's own metrics, never collide. Pass a registry to share one with the host; if that
    registry already has a metric of one of these names, registering raises ``ValueError``
    (``Duplicated timeseries``) and nothing is registered.

    Every method is thread-safe and cheap enough for the hot path: after the first call with a
    given label value, tens of nanoseconds for a counter and a few hundred for a histogram.
    Values are never reset; counters only go up for the life of this object.

    Metrics (all prefixed ``spmchain_``):

    ========================================  =========  ==========================
    name                                      type       labels
    ========================================  =========  ==========================
    chains_started_total                      counter    command_type
    chains_resumed_total                      counter    command_type
    chains_ended_total                        counter    outcome, command_type
    chains_in_flight                          gauge
    steps_fired_total                         counter    verb
    reverts_fired_total                       counter    verb
    task_duration_seconds                     histogram  verb
    reaction_latency_seconds                  histogram
    poll_duration_seconds                     histogram  pool
    poll_errors_total                         counter    pool
    spm_tasks_outstanding                     gauge      pool
    spm_tasks_queued                          gauge      pool
    chains_waiting                            gauge      pool
    chains_running                            gauge      pool
    chains_running_limit                      gauge      pool
    zombie_tasks_total                        counter    pool
    orphan_tasks_total                        counter    pool
    actor_restarts_total                      counter    kind
    supervisor_escalations_total              counter
    snapshot_commit_seconds                   histogram
    snapshot_commit_batch_size                histogram
    snapshots_quarantined_total               counter
    ========================================  =========  ==========================
    """

    registry: CollectorRegistry
    """The registry these metrics are exposed on; hand it to the exposition server."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = CollectorRegistry() if registry is None else registry
        self._chains_started: dict[str, count[int]] = {}
        self._chains_resumed: dict[str, count[int]] = {}
        self._chains_ended: dict[str, dict[str, count[int]]] = {o: {} for o in OUTCOMES}
        self._steps_fired: dict[str, count[int]] = {}
        self._reverts_fired: dict[str, count[int]] = {}
        self._task_duration: dict[str, _Histogram] = {}
        self._reaction_latency = _Histogram(REACTION_LATENCY_BUCKETS)
        self._poll_duration: dict[str, _Histogram] = {}
        self._poll_errors: dict[str, count[int]] = {}
        self._pool_slots: dict[str, tuple[int, int]] = {}
        self._admission: dict[str, tuple[int, int, float]] = {}
        self._zombie_tasks: dict[str, count[int]] = {}
        self._orphan_tasks: dict[str, count[int]] = {}
        # At 0 from the start: increase() sees the first restart of each kind.
        self._actor_restarts: dict[str, count[int]] = {kind: count() for kind in ACTOR_KINDS}
        # Chains a runtime stopped with (live, to be resumed: counted again by chain_resumed).
        self._chains_left: count[int] = count()
        self._supervisor_escalations: count[int] = count()
        self._snapshot_commit = _Histogram(SNAPSHOT_COMMIT_BUCKETS)
        self._snapshot_batch = _Histogram(SNAPSHOT_BATCH_BUCKETS)
        self._snapshots_quarantined: count[int] = count()
        self.registry.register(self)

    # -- chains ------------------------------------------------------------------------------

    def chain_started(self, command_type: str) -> None:
        """A chain of ``command_type`` was submitted: counts it and adds it to the in-flight."""
        try:
            next(self._chains_started[command_type])
        except KeyError:
            self._declare_command_type(command_type)
            next(self._chains_started[command_type])

    def chain_resumed(self, command_type: str) -> None:
        """A chain was rebuilt from its snapshot after a restart: adds it to the in-flight.

        Call this (not :meth:`chain_started`) for each unfinished chain recovered at start-up, so
        that its later :meth:`chain_ended` keeps ``spmchain_chains_in_flight`` right.
        """
        try:
            next(self._chains_resumed[command_type])
        except KeyError:
            self._declare_command_type(command_type)
            next(self._chains_resumed[command_type])

    def chains_left(self, n: int) -> None:
        """A runtime stopped with ``n`` chains still live: they leave the in-flight (a runtime
        that resumes them with these metrics counts them again, by :meth:`chain_resumed`)."""
        for _ in range(n):
            next(self._chains_left)

    def chain_ended(self, outcome: Outcome, command_type: str) -> None:
        """A chain ended (``ENDED_SUCCESSFULLY`` or ``ENDED_WITH_FAILURE``): counts it by outcome
        and removes it from the in-flight. Call it exactly once per chain.

        Raises ``ValueError`` for any other outcome, and counts nothing then.
        """
        try:
            next(self._chains_ended[outcome][command_type])
        except KeyError:
            if outcome not in self._chains_ended:
                raise ValueError(
                    f"unknown chain outcome {outcome!r}; expected one of {OUTCOMES}"
                ) from None
            self._declare_command_type(command_type)
            next(self._chains_ended[outcome][command_type])

    def _declare_command_type(self, command_type: str) -> None:
        """Create every series of ``command_type`` at 0, so both outcomes show from the start."""
        self._chains_started.setdefault(command_type, count())
        self._chains_resumed.setdefault(command_type, count())
        for by_type in self._chains_ended.values():
            by_type.setdefault(command_type, count())

    # -- steps and tasks ---------------------------------------------------------------------

    def step_fired(self, verb: str) -> None:
        """A chain's step fired an SPM task of ``verb`` (a forward step, not a revert)."""
        try:
            next(self._steps_fired[verb])
        except KeyError:
            next(self._steps_fired.setdefault(verb, count()))

    def revert_fired(self, verb: str) -> None:
        """A revert task of ``verb`` was fired to undo a step of a failed chain."""
        try:
            next(self._reverts_fired[verb])
        except KeyError:
            next(self._reverts_fired.setdefault(verb, count()))

    def task_ended(self, verb: str, seconds: float) -> None:
        """An SPM task of ``verb`` was seen finished, ``seconds`` after it was fired.

        Call it for every task (steps and reverts, succeeded or failed).
        """
        try:
            self._task_duration[verb].observe(seconds)
        except KeyError:
            self._task_duration.setdefault(verb, _Histogram(TASK_DURATION_BUCKETS)).observe(seconds)

    def reaction(self, seconds: float) -> None:
        """The chain's next task was fired ``seconds`` after its previous task's end was seen."""
        self._reaction_latency.observe(seconds)

    # -- pools: polling and SPM slots ---------------------------------------------------------

    def declare_pool(self, pool: str) -> None:
        """Create every per-pool series of ``pool`` at 0; call it when the pool's actors start.

        Optional (the first event of a pool creates its series too), but a counter that exists at
        0 before its first increment lets ``rate``/``increase`` and alerts see that increment.
        """
        self._poll_errors.setdefault(pool, count())
        self._zombie_tasks.setdefault(pool, count())
        self._orphan_tasks.setdefault(pool, count())
        self._pool_slots.setdefault(pool, (0, 0))
        self._poll_duration.setdefault(pool, _Histogram(POLL_DURATION_BUCKETS))

    def forget_pool(self, pool: str) -> None:
        """Drop every series of ``pool`` (the pool was removed from the runtime).

        An event for ``pool`` recorded after this creates its series again, from 0.
        """
        for series in (
            self._poll_errors,
            self._zombie_tasks,
            self._orphan_tasks,
            self._pool_slots,
            self._admission,
            self._poll_duration,
        ):
            series.pop(pool, None)

    def poll(self, pool: str, seconds: float) -> None:
        """One ``getAllTasksStatuses`` of ``pool`` took ``seconds``.

        Call it for every poll, failed ones too (with the time until the failure).
        """
        try:
            self._poll_duration[pool].observe(seconds)
        except KeyError:
            self._poll_duration.setdefault(pool, _Histogram(POLL_DURATION_BUCKETS)).observe(seconds)

    def poll_error(self, pool: str) -> None:
        """A poll of ``pool`` failed (SPM error, timeout, answer of the wrong shape)."""
        try:
            next(self._poll_errors[pool])
        except KeyError:
            next(self._poll_errors.setdefault(pool, count()))

    def set_pool_slots(self, pool: str, outstanding: int, queued: int) -> None:
        """``pool``'s SpmTaskActor has ``outstanding`` tasks at the SPM (fired, not finished) and
        ``queued`` waiting for a slot; sets both gauges."""
        self._pool_slots[pool] = (outstanding, queued)

    def set_admission(self, pool: str, waiting: int, running: int, limit: float) -> None:
        """``pool`` has ``waiting`` chains accepted and not started, ``running`` started and not
        ended, and admits up to ``limit`` at once (inf: no limit); sets the three gauges."""
        self._admission[pool] = (waiting, running, limit)

    def zombie_task(self, pool: str) -> None:
        """A task of ``pool`` ran past its deadline and was declared a zombie."""
        try:
            next(self._zombie_tasks[pool])
        except KeyError:
            next(self._zombie_tasks.setdefault(pool, count()))

    def orphan_task(self, pool: str) -> None:
        """A task was found on ``pool``'s SPM that no chain owns."""
        try:
            next(self._orphan_tasks[pool])
        except KeyError:
            next(self._orphan_tasks.setdefault(pool, count()))

    # -- supervision and snapshots ------------------------------------------------------------

    def actor_restarted(self, kind: str) -> None:
        """The supervisor restarted an actor of ``kind`` (e.g. ``command``, ``spm_task``,
        ``poller``) after it failed."""
        try:
            next(self._actor_restarts[kind])
        except KeyError:
            next(self._actor_restarts.setdefault(kind, count()))

    def supervisor_escalated(self) -> None:
        """Restarts passed the supervisor's intensity and it escalated instead of restarting."""
        next(self._supervisor_escalations)

    def snapshot_commit(self, batch_size: int, seconds: float) -> None:
        """One group commit wrote ``batch_size`` snapshots and took ``seconds``."""
        self._snapshot_commit.observe(seconds)
        self._snapshot_batch.observe(batch_size)

    def snapshot_quarantined(self) -> None:
        """A snapshot that did not decode was quarantined (kept aside, not loaded)."""
        next(self._snapshots_quarantined)

    # -- exposition ---------------------------------------------------------------------------

    def describe(self) -> Iterable[Metric]:
        """The metric families without samples (the registry checks names with this)."""
        return self._families(with_samples=False)

    def collect(self) -> Iterable[Metric]:
        """Every metric family with its current samples; called by each scrape."""
        return self._families(with_samples=True)

    def _families(self, *, with_samples: bool) -> Iterator[Metric]:
        # Copy the dicts first: events on other threads may add label values while we read.
        # Ended is read before started and resumed, so in-flight never reads below zero.
        ended = {o: _counts(d) for o, d in self._chains_ended.items()} if with_samples else {}
        started = _counts(self._chains_started) if with_samples else {}
        resumed = _counts(self._chains_resumed) if with_samples else {}

        family = CounterMetricFamily(
            "spmchain_chains_started", "Chains submitted, by command type.",
            labels=["command_type"],
        )  # fmt: skip
        for command_type, n in started.items():
            family.add_metric([command_type], n)
        yield family

        family = CounterMetricFamily(
            "spmchain_chains_resumed",
            "Unfinished chains rebuilt from their snapshots after a restart, by command type.",
            labels=["command_type"],
        )
        for command_type, n in resumed.items():
            family.add_metric([command_type], n)
        yield family

        family = CounterMetricFamily(
            "spmchain_chains_ended",
            "Chains ended, by outcome (ended_successfully, ended_with_failure) and command type.",
            labels=["outcome", "command_type"],
        )
        for outcome, by_type in ended.items():
            for command_type, n in by_type.items():
                family.add_metric([outcome, command_type], n)
        yield family

        gauge = GaugeMetricFamily(
            "spmchain_chains_in_flight", "Chains started or resumed and not yet ended."
        )
        if with_samples:
            gauge.add_metric(
                [],
                sum(started.values())
                + sum(resumed.values())
                - sum(sum(d.values()) for d in ended.values())
                - _count_value(self._chains_left),
            )
        yield gauge

        yield _counter_family(
            "spmchain_steps_fired",
            "SPM tasks fired by chains' forward steps, by verb.",
            "verb",
            self._steps_fired,
            with_samples,
        )
        yield _counter_family(
            "spmchain_reverts_fired",
            "Revert tasks fired to undo steps of failed chains, by verb.",
            "verb",
            self._reverts_fired,
            with_samples,
        )
        yield _histogram_family(
            "spmchain_task_duration_seconds",
            "Time from an SPM task fired to its end seen by the poller, by verb.",
            "verb",
            self._task_duration,
            with_samples,
        )
        yield _histogram_family(
            "spmchain_reaction_latency_seconds",
            "Time from a task's end seen by the poller to the next task of its chain fired.",
            None,
            {"": self._reaction_latency},
            with_samples,
        )
        yield _histogram_family(
            "spmchain_poll_duration_seconds",
            "Duration of one getAllTasksStatuses poll, by pool (failed polls included).",
            "pool",
            self._poll_duration,
            with_samples,
        )
        yield _counter_family(
            "spmchain_poll_errors",
            "Polls that failed, by pool.",
            "pool",
            self._poll_errors,
            with_samples,
        )

        slots = dict(self._pool_slots) if with_samples else {}
        outstanding = GaugeMetricFamily(
            "spmchain_spm_tasks_outstanding",
            "Tasks fired at the pool's SPM and not yet finished, by pool.",
            labels=["pool"],
        )
        queued = GaugeMetricFamily(
            "spmchain_spm_tasks_queued",
            "Tasks waiting in the pool's SpmTaskActor for a free SPM slot, by pool.",
            labels=["pool"],
        )
        for pool, (n_outstanding, n_queued) in slots.items():
            outstanding.add_metric([pool], n_outstanding)
            queued.add_metric([pool], n_queued)
        yield outstanding
        yield queued

        admission = dict(self._admission) if with_samples else {}
        waiting = GaugeMetricFamily(
            "spmchain_chains_waiting",
            "Chains accepted and not yet started, waiting for their pool to admit them, by pool.",
            labels=["pool"],
        )
        running = GaugeMetricFamily(
            "spmchain_chains_running",
            "Chains started and not yet ended, by pool.",
            labels=["pool"],
        )
        limit = GaugeMetricFamily(
            "spmchain_chains_running_limit",
            "How many chains the pool runs at once (adapted to keep the runtime's own reaction "
            "delay under its target; +Inf: no limit), by pool.",
            labels=["pool"],
        )
        for pool, (n_waiting, n_running, n_limit) in admission.items():
            waiting.add_metric([pool], n_waiting)
            running.add_metric([pool], n_running)
            limit.add_metric([pool], n_limit)
        yield waiting
        yield running
        yield limit

        yield _counter_family(
            "spmchain_zombie_tasks",
            "Tasks that ran past their deadline, by pool.",
            "pool",
            self._zombie_tasks,
            with_samples,
        )
        yield _counter_family(
            "spmchain_orphan_tasks",
            "Tasks found on the SPM that no chain owns, by pool.",
            "pool",
            self._orphan_tasks,
            with_samples,
        )
        yield _counter_family(
            "spmchain_actor_restarts",
            "Actors restarted by the supervisor after a failure, by actor kind.",
            "kind",
            self._actor_restarts,
            with_samples,
        )
        yield _counter_family(
            "spmchain_supervisor_escalations",
            "Times restarts passed the supervisor's intensity and it escalated.",
            None,
            {"": self._supervisor_escalations},
            with_samples,
        )
        yield _histogram_family(
            "spmchain_snapshot_commit_seconds",
            "Duration of one group commit of the snapshot store.",
            None,
            {"": self._snapshot_commit},
            with_samples,
        )
        yield _histogram_family(
            "spmchain_snapshot_commit_batch_size",
            "Snapshots written by one group commit of the snapshot store.",
            None,
            {"": self._snapshot_batch},
            with_samples,
        )
        yield _counter_family(
            "spmchain_snapshots_quarantined",
            "Snapshots that did not decode and were quarantined.",
            None,
            {"": self._snapshots_quarantined},
            with_samples,
        )


def _counts(series: dict[str, count[int]]) -> dict[str, int]:
    """Current values of a label value -> counter dict (copied first: it may grow meanwhile)."""
    return {label: _count_value(c) for label, c in list(series.items())}


def _counter_family(
    name: str,
    documentation: str,
    label: str | None,
    series: dict[str, count[int]],
    with_samples: bool,
) -> CounterMetricFamily:
    """A counter family with one label (or none: ``series`` then has the single key ``""``)."""
    family = CounterMetricFamily(name, documentation, labels=_label_names(label))
    if with_samples:
        for value, n in _counts(series).items():
            family.add_metric(_label_values(label, value), n)
    return family


def _histogram_family(
    name: str,
    documentation: str,
    label: str | None,
    series: dict[str, _Histogram],
    with_samples: bool,
) -> HistogramMetricFamily:
    """A histogram family with one label (or none: ``series`` then has the single key ``""``)."""
    family = HistogramMetricFamily(name, documentation, labels=_label_names(label))
    if with_samples:
        for value, histogram in list(series.items()):
            buckets, total = histogram.cumulative()
            family.add_metric(_label_values(label, value), buckets, total)
    return family


def _label_names(label: str | None) -> Sequence[str]:
    return [] if label is None else [label]


def _label_values(label: str | None, value: str) -> list[str]:
    return [] if label is None else [value]
