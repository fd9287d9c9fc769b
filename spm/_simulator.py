"""An in-process SPM for one storage pool, reproducing VDSM's task model without threads.

:class:`SimulatedSpm` answers the :class:`~spm._client.SpmClient` calls the way VDSM's task
manager does (``lib/vdsm/storage/task.py``, ``taskManager.py``, ``threadPool.py``,
``resourceManager.py``), on a simulated storage (:mod:`spm._ledger`) changed by the verbs of
:mod:`spm._verbs`.

Time and workers are simulated, not run: there is no thread per task and no thread at all. Every
public call first advances the simulation to ``clock()`` under one lock, popping due events from a
heap in time order — a job ends (its effect is applied, its worker freed and the next queued task
started *at that event's time*), a lock wait times out, a rollback ends. The SPM therefore behaves
exactly as if its workers had run continuously, whenever it is observed. A queued task costs
memory only. Pass a fake ``clock`` to make a test deterministic without sleeping.

How a task moves (every move checked against VDSM's table, :mod:`spm._simstate`):

* ``fire``: parameters checked (an error raises and creates no task), then init → preparing →
  acquiring → queued. If a worker is free the task starts at once, otherwise it waits in the FIFO
  queue; a full queue refuses the verb (405, VDSM's ``AddTaskError``). What VDSM changes in the
  API call itself happens here, once the task is accepted (``deleteImage`` removes the image;
  its job only purges).
* start: queued → running, holding a worker. The job takes its image locks in VDSM's sorted order;
  a lock held by another task makes it wait, still holding its worker, until the lock frees (FIFO
  per resource) or ``resource_timeout`` passes (the job fails with 851). The internal state stays
  ``running`` while it waits (:meth:`SimulatedSpm.lock_wait` tells what for): VDSM's jobs take
  these locks inside the job (``sp.py``), and its table has no move from queued back to
  acquiring.
* end: the verb's preconditions are checked on the storage and its effect applied: running →
  finished (``finished``/``success``, code 0, "1 jobs completed successfully"). A failed
  precondition, an injected failure, a resource timeout or ``stopTask`` instead abort the job:
  running → aborting → racquiring → recovering, the locks are released, the rollback takes
  ``rollback_duration`` on the same worker, and the task ends recovered (``finished``/
  ``cleanSuccess``) with the error's code and ``"value=<error> abortedcode=<code>"``.
* ``revertTask`` on a finished task: finished → racquiring → recovering → (``rollback_duration``,
  no worker) → recovered; its effect is undone in the ledger. A verb whose job registers no
  rollback in VDSM (``deleteImage``) has nothing to undo: a revert, a stop or a failed job leave
  the storage as it is, and the task still ends recovered.

The SPM role: :meth:`SimulatedSpm.spm_stop` makes ``fire`` and the task-list calls raise
``NotSpmError`` (654) and the calls on one task ``UnknownTaskError`` (401: VDSM unloads the
SPM's tasks), and freezes the tasks; :meth:`SimulatedSpm.spm_start` takes the role back and
reloads the tasks as VDSM does on SPM start — finished ones stay to be polled and cleared,
unfinished ones are aborted and rolled back (ending ``finished``/``cleanSuccess``, no effect
left), never resumed.
With ``state_dir`` the tasks and the storage are persisted (:mod:`spm._simlog`) before each call
returns, and a new simulator on the same directory recovers the same way, whatever moment the old
process was killed at.
"""

from __future__ import annotations

import heapq
import math
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Final, Literal, TypeAlias

from spm._client import SpmClient, TaskInfo, TaskStatus
from spm._errors import (
    GenericError,
    NotSpmError,
    SpmError,
    TaskNotFinishedError,
    TaskStateError,
    UnknownTaskError,
)
from spm._ledger import (
    DuplicateEffect,
    Ledger,
    LedgerEvent,
    LedgerObject,
    Op,
)
from spm._simlog import SimLog, encode
from spm._simstate import (
    ABORTABLE,
    ABORTING,
    ACQUIRING,
    ALL_STATES,
    DONE,
    FAILED,
    FINISHED,
    INIT,
    PREPARING,
    QUEUED,
    RABORTING,
    RACQUIRING,
    RECOVERED,
    RECOVERING,
    RUNNING,
    WAITRECOVER,
    WIRE_RESULT,
    WIRE_STATE,
    InternalState,
    move,
)
from spm._verbs import (
    ADD_TASK_ERROR,
    RESOURCE_TIMEOUT,
    VERBS,
    LockSpec,
    ResourceKey,
    StorageFailure,
    VerbCall,
    invalid_parameter,
    verb_for,
)

DurationSpec: TypeAlias = float | tuple[str, float] | tuple[str, float, float]
"""How long a job takes, in (virtual) seconds: a number (fixed), ``("uniform", lo, hi)``,
``("exponential", mean)`` or ``("normal", mean, sd)`` (clipped at 0)."""

DEFAULT_KEY: Final = "*"
"""In a per-verb ``durations`` / ``failure_rates`` mapping, the entry for verbs not named."""

INITIAL_MESSAGE: Final = "Task is initializing"
RUNNING_MESSAGE: Final = "running job 1 of 1"
SUCCESS_MESSAGE: Final = "1 jobs completed successfully"
ABORTED_CODE: Final = 411
ABORTED_MESSAGE: Final = "value=shutting down abortedcode=411"
"""The message of a task stopped (``stopTask``) or aborted by an SPM restart: VDSM's
``TaskAborted("shutting down")`` value."""

_FORMAT_VERSION: Final = 1

_JOB_END: Final = 0
_LOCK_TIMEOUT: Final = 1
_ROLLBACK_END: Final = 2


class TaskQueueFullError(SpmError):
    """VDSM code 405 (``AddTaskError``): the SPM's task queue is full; the verb was refused and
    no task exists. Raised by ``fire`` when every worker is busy and ``queue_size`` tasks wait."""

    code = 405
    default_message = "TaskManager error, unable to add task"


# ------------------------------------------------------------------------------------------------
# Durations and failure rates
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Duration:
    kind: Literal["fixed", "uniform", "exponential", "normal"]
    a: float
    b: float = 0.0

    def sample(self, rng: random.Random) -> float:
        if self.kind == "fixed":
            return self.a
        if self.kind == "uniform":
            return rng.uniform(self.a, self.b)
        if self.kind == "exponential":
            return rng.expovariate(1.0 / self.a) if self.a > 0 else 0.0
        return max(0.0, rng.gauss(self.a, self.b))


def _number(value: object, where: str, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: {what} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{where}: {what} must be finite, got {value!r}")
    return number


def parse_duration(spec: object, where: str = "durations") -> _Duration:
    """Check a :data:`DurationSpec`; raises ValueError naming ``where`` and what is wrong."""
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        seconds = _number(spec, where, "seconds")
        if seconds < 0:
            raise ValueError(f"{where}: seconds must be >= 0, got {spec!r}")
        return _Duration("fixed", seconds)
    if isinstance(spec, (tuple, list)) and spec:
        kind = spec[0]
        args = spec[1:]
        if kind == "uniform":
            if len(args) != 2:
                raise ValueError(f"{where}: ('uniform', lo, hi) takes 2 numbers, got {spec!r}")
            lo = _number(args[0], where, "uniform lo")
            hi = _number(args[1], where, "uniform hi")
            if lo < 0 or hi < lo:
                raise ValueError(f"{where}: uniform needs 0 <= lo <= hi, got {spec!r}")
            return _Duration("uniform", lo, hi)
        if kind == "exponential":
            if len(args) != 1:
                raise ValueError(f"{where}: ('exponential', mean) takes 1 number, got {spec!r}")
            mean = _number(args[0], where, "exponential mean")
            if mean < 0:
                raise ValueError(f"{where}: exponential mean must be >= 0, got {spec!r}")
            return _Duration("exponential", mean)
        if kind == "normal":
            if len(args) != 2:
                raise ValueError(f"{where}: ('normal', mean, sd) takes 2 numbers, got {spec!r}")
            mean = _number(args[0], where, "normal mean")
            sd = _number(args[1], where, "normal sd")
            if sd < 0:
                raise ValueError(f"{where}: normal sd must be >= 0, got {spec!r}")
            return _Duration("normal", mean, sd)
        raise ValueError(f"{where}: unknown distribution {kind!r}; use 'uniform', "
                         f"'exponential' or 'normal'")
    raise ValueError(f"{where}: expected seconds or ('uniform', lo, hi) / ('exponential', mean) "
                     f"/ ('normal', mean, sd), got {spec!r}")


def _parse_rate(value: object, where: str) -> float:
    rate = _number(value, where, "failure rate")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"{where}: failure rate must be within [0, 1], got {value!r}")
    return rate


def _per_verb(value: object, name: str, parse: Callable[[object, str], Any],
              default: Any) -> dict[str, Any]:
    """One parsed value per verb from a single value or a mapping by verb (``"*"``: the rest)."""
    if isinstance(value, Mapping):
        unknown = sorted(str(k) for k in value if k != DEFAULT_KEY and k not in VERBS)
        if unknown:
            raise ValueError(f"{name}: unknown verb(s) {', '.join(unknown)}; known: "
                             f"{', '.join(sorted(VERBS))} (or {DEFAULT_KEY!r} for the rest)")
        fallback = (parse(value[DEFAULT_KEY], f"{name}[{DEFAULT_KEY!r}]")
                    if DEFAULT_KEY in value else default)
        return {verb: parse(value[verb], f"{name}[{verb!r}]") if verb in value else fallback
                for verb in VERBS}
    parsed = parse(value, name)
    return dict.fromkeys(VERBS, parsed)


# ------------------------------------------------------------------------------------------------
# Observation
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SimulatorStats:
    """What a simulated SPM did since it was made (counters) and what it holds now (gauges).

    Times are virtual seconds of the simulator's clock.
    """

    tasks_fired: int
    """Verbs accepted as tasks."""
    tasks_refused_queue_full: int
    """Verbs refused because the queue was full (405)."""
    tasks_succeeded: int
    """Jobs that finished successfully."""
    tasks_failed: int
    """Jobs that failed (precondition, injected failure, resource timeout) and rolled back."""
    tasks_stopped: int
    """Tasks aborted by ``stopTask``."""
    tasks_reverted: int
    """Finished tasks rolled back by ``revertTask``."""
    tasks_aborted_by_spm_start: int
    """Unfinished tasks aborted and rolled back when the SPM role was taken (or a state
    directory reloaded)."""
    tasks_cleared: int
    """Tasks forgotten by ``clearTask``."""
    tasks_known: int
    """Tasks the SPM reports now (finished or not)."""
    unfinished: int
    """Tasks whose state is not done now (fired or being reverted)."""
    running: int
    """Tasks holding a worker now (running, waiting for a lock, or rolling back a failed job)."""
    queued: int
    """Tasks waiting for a worker now."""
    max_unfinished: int
    """The most tasks unfinished at once."""
    max_running: int
    """The most workers busy at once."""
    max_queued: int
    """The longest the queue has been."""
    worker_busy_seconds: float
    """Worker time used (jobs, lock waits and rollbacks on a worker), summed over workers."""
    elapsed_seconds: float
    """Virtual time since the simulator was made."""
    workers: int
    utilization: float
    """``worker_busy_seconds / (workers * elapsed_seconds)`` (0 before any time passed)."""
    exclusive_overlaps: int
    """How often a fired task declared a lock on a resource that another unfinished task also
    declared, one of the two exclusively — steps the caller did not serialise."""
    lock_waits: int
    """How often a job had to wait for a lock."""
    lock_timeouts: int
    """Lock waits that ended in a resource timeout (851)."""
    duplicated_effects: int
    """Effects applied or attempted a second time (see :meth:`SimulatedSpm.duplicated_effects`)."""

    def as_dict(self) -> dict[str, Any]:
        """The same numbers as a plain dict."""
        return asdict(self)


# ------------------------------------------------------------------------------------------------
# Tasks, locks
# ------------------------------------------------------------------------------------------------


class _Task:
    __slots__ = (
        "call", "code", "declared", "duration", "effect", "gen", "id", "in_queue", "inject",
        "lock_idx", "locks", "message", "params", "state", "status", "verb", "waiting",
        "worker_since",
    )

    def __init__(self, task_id: str, verb: str, call: VerbCall | None,
                 locks: tuple[LockSpec, ...], duration: float, inject: bool) -> None:
        self.id = task_id
        self.verb = verb
        self.call = call
        self.locks = locks
        self.duration = duration
        self.inject = inject
        self.state: InternalState = INIT
        self.code = 0
        self.message = INITIAL_MESSAGE
        self.status: TaskStatus | None = None
        self.gen = 0
        self.lock_idx = 0
        self.waiting: tuple[ResourceKey, _LockRequest] | None = None
        self.worker_since: float | None = None
        self.effect: list[Op] = []
        self.declared = False
        self.in_queue = False
        self.params: dict[str, Any] | None = None


class _LockRequest:
    __slots__ = ("exclusive", "task")

    def __init__(self, task: _Task, exclusive: bool) -> None:
        self.task = task
        self.exclusive = exclusive


class _Resource:
    __slots__ = ("exclusive", "shared", "waiters")

    def __init__(self) -> None:
        self.shared = 0
        self.exclusive = False
        self.waiters: deque[_LockRequest] = deque()

    def grantable(self, exclusive: bool) -> bool:
        if exclusive:
            return not self.exclusive and self.shared == 0
        return not self.exclusive

    def idle(self) -> bool:
        return not self.exclusive and self.shared == 0 and not self.waiters


def _check_state(state: object) -> None:
    if state not in ALL_STATES:
        raise ValueError(f"state_dir: {state!r} is not a task state")


def _op_record(action: str, op: Op) -> list[Any]:
    kind, obj = op
    return [action, "c" if kind == "create" else "r", *obj.to_list()]


def _op_from_record(data: list[Any]) -> tuple[str, Op]:
    if len(data) != 9 or data[0] not in ("a", "u") or data[1] not in ("c", "r"):
        raise ValueError(f"not a ledger change: {data!r}")
    kind: Literal["create", "remove"] = "create" if data[1] == "c" else "remove"
    return data[0], (kind, LedgerObject.from_list(data[2:]))


# ------------------------------------------------------------------------------------------------
# The simulator
# ------------------------------------------------------------------------------------------------


def _info(task: _Task) -> TaskInfo:
    """VDSM's ``{"id", "verb"}``, plus (a simulator extension) the parameters the task was
    fired with, so that a caller recovering from a crash can prove which task is its own."""
    info: TaskInfo = {"id": task.id, "verb": task.verb}
    if task.params is not None:
        info["params"] = task.params
    return info


class SimulatedSpm(SpmClient):
    """The SPM of one storage pool, simulated in-process (see the module docs for the model).

    Thread-safe: one lock serialises every call. Status dicts returned by
    :meth:`getAllTasksStatuses` and :meth:`getTaskStatus` are shared with the simulator's cache
    and must not be mutated (each call returns a new outer dict).

    With ``state_dir``, every call writes its changes to the directory's log before it returns
    (one ``write``: they survive ``kill -9`` of the process at any moment). ``fsync=True`` also
    waits for them to reach the disk (group-committed ``fsync``: survives a power loss too, at
    the disk's flush latency per call); the default leaves that to the kernel.

    One simulator at a time uses a ``state_dir``: it holds the directory's lock until
    :meth:`close` (or until it is dropped, or its process dies).

    Raises ValueError from the constructor when an argument is wrong (the message names it), and
    OSError when ``state_dir`` cannot be used: :class:`~spm._simlog.StateDirInUseError` (naming
    the directory) while another simulator, in this process or another, has it open.
    """

    def __init__(
        self,
        pool: str = "pool-1",
        *,
        workers: int = 10,
        queue_size: int = 500,
        durations: DurationSpec | Mapping[str, DurationSpec] = 0.0,
        failure_rates: float | Mapping[str, float] = 0.0,
        seed: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        resource_timeout: float = 120.0,
        rollback_duration: float = 0.0,
        state_dir: str | os.PathLike[str] | None = None,
        fsync: bool = False,
    ) -> None:
        if not isinstance(pool, str) or not pool:
            raise ValueError(f"pool must be a non-empty string, got {pool!r}")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
        if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 0:
            raise ValueError(f"queue_size must be an integer >= 0, got {queue_size!r}")
        if not callable(clock):
            raise ValueError(f"clock must be callable, got {clock!r}")
        timeout = _number(resource_timeout, "resource_timeout", "seconds")
        if timeout < 0:
            raise ValueError(f"resource_timeout must be >= 0, got {resource_timeout!r}")
        rollback = _number(rollback_duration, "rollback_duration", "seconds")
        if rollback < 0:
            raise ValueError(f"rollback_duration must be >= 0, got {rollback_duration!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an integer or None, got {seed!r}")

        self.pool = pool
        self._workers = workers
        self._queue_size = queue_size
        self._durations: dict[str, _Duration] = _per_verb(
            durations, "durations", parse_duration, _Duration("fixed", 0.0))
        self._failure_rates: dict[str, float] = _per_verb(
            failure_rates, "failure_rates", _parse_rate, 0.0)
        self._seed = seed
        self._clock = clock
        self._resource_timeout = timeout
        self._rollback_duration = rollback

        self._lock = threading.Lock()
        self._closed = False
        self._is_spm = True
        self._now = float(clock())
        self._started_at = self._now
        self._stopped_at = self._now

        self._tasks: dict[str, _Task] = {}
        self._statuses: dict[str, TaskStatus] = {}
        self._infos: dict[str, TaskInfo] = {}
        self._events: list[tuple[float, int, int, _Task, int]] = []
        self._seq = 0
        self._queue: deque[_Task] = deque()
        self._queued = 0
        self._busy = 0
        self._busy_since_sum = 0.0
        self._busy_seconds = 0.0
        self._resources: dict[ResourceKey, _Resource] = {}
        self._declared: dict[ResourceKey, list[int]] = {}
        self._unfinished = 0
        self._ledger = Ledger()

        self._fired = 0
        self._refused = 0
        self._succeeded = 0
        self._failed = 0
        self._stopped = 0
        self._reverted = 0
        self._aborted_on_start = 0
        self._cleared = 0
        self._max_unfinished = 0
        self._max_running = 0
        self._max_queued = 0
        self._overlaps = 0
        self._lock_waits = 0
        self._lock_timeouts = 0

        self._log: SimLog | None = None
        self._fsync = bool(fsync)
        self._pending: list[bytes] = []
        epoch = 0
        if state_dir is not None:
            self._log = SimLog(state_dir)
            try:
                epoch = self._load(self._log.read())
            except BaseException:
                self._log.close()  # a simulator that is not made lets go of the directory
                raise
        self._epoch = epoch
        if seed is None:
            self._rng = random.Random()
            self._id_rng = random.Random()
        elif epoch == 0:
            self._rng = random.Random(seed)
            self._id_rng = random.Random(f"{seed}/ids")
        else:
            # A restarted simulator must not hand out the task ids of its previous run again.
            self._rng = random.Random(f"{seed}/{epoch}")
            self._id_rng = random.Random(f"{seed}/ids/{epoch}")
        if self._log is not None:
            try:
                self._recover_unfinished(self._now)
                self._pending.clear()
                self._log.rewrite(self._snapshot())
            except BaseException:
                self._log.close()
                raise

    # ---- SpmClient ----------------------------------------------------------------------------

    def fire(self, verb: str, params: Mapping[str, Any]) -> str:
        """Start ``verb`` as a task; return the task id the SPM generated (a uuid4 string).

        Raises, creating no task: GenericError (100) for an unknown verb; SpmError 1000 naming an
        unknown, missing or ill-typed parameter; 309 for another pool's ``spUUID``; a storage
        error VDSM raises in the API call itself (``deleteImage`` of a missing image: 268);
        :class:`TaskQueueFullError` (405) when every worker is busy and the queue is full;
        NotSpmError (654) when this host is not the SPM.
        """
        with self._lock:
            try:
                self._enter(spm=True)
                tid = self._fire(verb, params)
            finally:
                seq = self._leave()
        if seq:
            self._sync(seq)
        return tid

    def _fire(self, verb: str, params: Mapping[str, Any]) -> str:
        v = verb_for(verb)
        call = v.parse(params, self.pool)
        try:
            v.prepare(call, self._ledger)
        except StorageFailure as failure:
            if failure.duplicate_of is not None:
                # Refused as VDSM refuses it, but a second attempt at an effect all the same
                # (no task was made: the duplicate names none).
                key, first = failure.duplicate_of
                self._log_duplicate(self._ledger.note_duplicate(key, first, task_id="",
                                                                verb=v.name, at=self._now))
            raise failure.to_spm_error() from None
        if self._busy >= self._workers and self._queued >= self._queue_size:
            self._refused += 1
            raise TaskQueueFullError(
                f"{ADD_TASK_ERROR.message}: the task queue is full ({self._queued} tasks "
                f"wait for {self._workers} busy workers)")
        now = self._now
        duration = self._durations[v.name]
        rate = self._failure_rates[v.name]
        task = _Task(
            self._new_id(), v.name, call, v.locks(call),
            duration.a if duration.kind == "fixed" else duration.sample(self._rng),
            rate > 0.0 and self._rng.random() < rate,
        )
        task.state = move(task.state, PREPARING)
        task.state = move(task.state, ACQUIRING)
        task.state = move(task.state, QUEUED)
        self._declare(task)
        tid = task.id
        task.params = dict(params)
        self._tasks[tid] = task
        self._infos[tid] = _info(task)
        self._fired += 1
        self._unfinished += 1
        if self._unfinished > self._max_unfinished:
            self._max_unfinished = self._unfinished
        if self._log is not None:
            self._pending.append(encode(["F", tid, task.verb, task.params]))
        ops = v.fire_effect(call, self._ledger, tid, now)
        if ops:
            # What the API call itself changes (deleteImage: the removal); no rollback undoes it.
            applied = self._ledger.apply_ops(ops, task_id=tid, verb=v.name, at=now)
            self._log_state(task, [("a", op) for op in applied])
        if self._busy < self._workers:
            self._start(task, now)
        else:
            task.in_queue = True
            self._queue.append(task)
            self._queued += 1
            if self._queued > self._max_queued:
                self._max_queued = self._queued
            self._publish(task)
        return tid

    def getAllTasksStatuses(self) -> dict[str, TaskStatus]:  # noqa: N802
        """Every task the SPM knows, by id, in VDSM's wire shape. Raises NotSpmError (654) when
        this host is not the SPM. The inner dicts are cached: do not mutate them."""
        with self._lock:
            try:
                self._enter(spm=True)
                statuses = self._statuses.copy()
            finally:
                seq = self._leave()
        if seq:
            self._sync(seq)
        return statuses

    def getAllTasksInfo(self) -> dict[str, TaskInfo]:  # noqa: N802
        """``{task id: {"id", "verb", "params"}}`` for every task (``params``, what the task
        was fired with, is a simulator extension: VDSM tells only the verb). Raises NotSpmError
        (654) when this host is not the SPM. The inner dicts are shared: do not mutate them."""
        with self._session(spm=True):
            return self._infos.copy()

    def getTaskStatus(self, task_id: str) -> TaskStatus:  # noqa: N802
        """One task's status (cached: do not mutate). Raises UnknownTaskError (401) for an id the
        SPM does not know, and for every id while this host is not the SPM (as VDSM: its tasks
        are unloaded), SpmError 1000 for a malformed id."""
        with self._lock:
            try:
                self._enter(spm=True, task=True)
                status = self._get(task_id).status
            finally:
                seq = self._leave()
        if seq:
            self._sync(seq)
        assert status is not None
        return status

    def clearTask(self, task_id: str) -> None:  # noqa: N802
        """Forget a task that is done. Raises TaskStateError (410) while it is not, and
        UnknownTaskError (401) as :meth:`getTaskStatus` does.
        """
        with self._lock:
            try:
                self._enter(spm=True, task=True)
                self._clear(task_id)
            finally:
                seq = self._leave()
        if seq:
            self._sync(seq)

    def _clear(self, task_id: str) -> None:
        task = self._get(task_id)
        if task.state not in DONE:
            raise TaskStateError(
                f"{TaskStateError.default_message}: (\"can't clean in state "
                f"{task.state}\",)")
        del self._tasks[task_id]
        del self._statuses[task_id]
        del self._infos[task_id]
        self._cleared += 1
        if self._log is not None:
            self._pending.append(encode(["C", task_id]))

    def stopTask(self, task_id: str) -> None:  # noqa: N802
        """Abort a task, as VDSM's ``Task.stop`` does.

        A queued task, or a running one (job in progress or waiting for a lock), is aborted: its
        locks are released, its job's effect never happens, it rolls back and ends recovered
        (``finished``/``cleanSuccess``) with code 411; what the API call itself did stays done
        (a stopped ``deleteImage`` leaves the image removed). A task that is done, or already
        aborting or rolling back, is left alone (a no-op, as in VDSM). Raises UnknownTaskError
        (401) as :meth:`getTaskStatus` does.
        """
        with self._session(spm=True, task=True):
            task = self._get(task_id)
            if task.state == QUEUED or task.state == RUNNING:
                self._stopped += 1
                self._abort(task, self._now, ABORTED_CODE, ABORTED_MESSAGE)

    def revertTask(self, task_id: str) -> None:  # noqa: N802
        """Roll back a finished task, as VDSM's ``Task.rollback`` does.

        A task that ended successfully moves finished → racquiring → recovering and, after
        ``rollback_duration``, ends recovered (``finished``/``cleanSuccess``, code 0) with its
        effect undone in the ledger (``deleteImage`` registers no rollback, as in VDSM: its
        revert ends recovered with nothing undone). Raises TaskNotFinishedError (403) while the
        task is not done, IllegalTransitionError (441) for a task that ended recovered or failed
        (VDSM's table has no move from there), UnknownTaskError (401) as :meth:`getTaskStatus`
        does.
        """
        with self._session(spm=True, task=True):
            task = self._get(task_id)
            if task.state not in DONE:
                raise TaskNotFinishedError(
                    f"{TaskNotFinishedError.default_message}: (\"can't rollback in state "
                    f"{task.state}\",)")
            task.state = move(task.state, RACQUIRING)
            task.state = move(task.state, RECOVERING)
            self._reverted += 1
            self._unfinished += 1
            if self._unfinished > self._max_unfinished:
                self._max_unfinished = self._unfinished
            self._log_state(task)
            self._begin_rollback(task, self._now)

    def close(self) -> None:
        """Stop the simulator: later calls raise GenericError. With ``state_dir`` the log is
        synced and closed and the directory's lock released; what the log holds is what a new
        simulator on the directory recovers."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._log is not None:
                self._log.close()

    # ---- the SPM role -------------------------------------------------------------------------

    @property
    def is_spm(self) -> bool:
        """Whether this host holds the SPM role."""
        return self._is_spm

    def spm_stop(self) -> None:
        """Lose the SPM role (fencing, a lost lease): until :meth:`spm_start` every SpmClient
        call raises NotSpmError (654), UnknownTaskError (401) for a call on one task, and the
        tasks freeze where they are. A no-op when the role
        is already lost."""
        with self._session(spm=False):
            if self._is_spm:
                self._is_spm = False
                self._stopped_at = self._now

    def spm_start(self) -> None:
        """Take the SPM role (again) and reload the tasks as VDSM does on SPM start.

        Finished tasks stay, to be polled and cleared. Unfinished ones are aborted and rolled
        back at once, never resumed: queued and running tasks end recovered with code 411 and no
        effect; a task caught rolling back (a failed job, a revert) completes its rollback. A
        no-op while this host is the SPM.
        """
        with self._session(spm=False):
            if not self._is_spm:
                self._recover_unfinished(self._now)
                self._is_spm = True

    # ---- observation --------------------------------------------------------------------------

    def advance(self) -> None:
        """Advance the simulation to ``clock()`` (every call does this first; this does only
        that)."""
        with self._session(spm=False):
            pass

    def internal_state(self, task_id: str) -> InternalState:
        """A task's internal VDSM state (``queued``, ``running``, ``recovering`` ...). Raises
        UnknownTaskError (401) for an unknown id; works whether or not this host is the SPM."""
        with self._session(spm=False):
            return self._get(task_id).state

    def lock_wait(self, task_id: str) -> ResourceKey | None:
        """The resource a running task's job waits for, or None when it waits for none."""
        with self._session(spm=False):
            waiting = self._get(task_id).waiting
            return None if waiting is None else waiting[0]

    def objects(self) -> list[LedgerObject]:
        """Every object on the simulated storage now, with the task (id, verb) whose effect
        made it and its engine-chosen UUIDs; ``obj.key`` is its identity in the ledger."""
        with self._session(spm=False):
            return self._ledger.objects()

    def ledger_history(self) -> list[LedgerEvent]:
        """Every change of the storage (effects applied, rollbacks undoing them), oldest first.
        After a reload from ``state_dir`` it starts with the reloaded objects."""
        with self._session(spm=False):
            return self._ledger.history()

    def duplicated_effects(self) -> int:
        """How many effects were applied (or attempted) more than once: a second task creating
        what another task's effect created and is still there (createVolume/copyImage/
        cloneImageStructure failing with 212, a second syncImageData), or deleting what another
        task's effect already deleted (201/268; also a ``deleteImage`` refused at fire with 268,
        which makes no task). Zero when every step's effect happened once."""
        with self._session(spm=False):
            return self._ledger.duplicate_count

    def duplicates(self) -> list[DuplicateEffect]:
        """The duplicated effects counted by :meth:`duplicated_effects`, oldest first."""
        with self._session(spm=False):
            return self._ledger.duplicates()

    def stats(self) -> SimulatorStats:
        """Counters and gauges of the simulation, advanced to ``clock()`` first."""
        with self._session(spm=False):
            now = self._now
            busy_until = now if self._is_spm else self._stopped_at
            busy = self._busy_seconds + self._busy * busy_until - self._busy_since_sum
            elapsed = now - self._started_at
            return SimulatorStats(
                tasks_fired=self._fired,
                tasks_refused_queue_full=self._refused,
                tasks_succeeded=self._succeeded,
                tasks_failed=self._failed,
                tasks_stopped=self._stopped,
                tasks_reverted=self._reverted,
                tasks_aborted_by_spm_start=self._aborted_on_start,
                tasks_cleared=self._cleared,
                tasks_known=len(self._tasks),
                unfinished=self._unfinished,
                running=self._busy,
                queued=self._queued,
                max_unfinished=self._max_unfinished,
                max_running=self._max_running,
                max_queued=self._max_queued,
                worker_busy_seconds=busy,
                elapsed_seconds=elapsed,
                workers=self._workers,
                utilization=busy / (self._workers * elapsed) if elapsed > 0 else 0.0,
                exclusive_overlaps=self._overlaps,
                lock_waits=self._lock_waits,
                lock_timeouts=self._lock_timeouts,
                duplicated_effects=self._ledger.duplicate_count,
            )

    # ---- plumbing -----------------------------------------------------------------------------

    def _enter(self, *, spm: bool, task: bool = False) -> None:
        """With the lock held: refuse when closed (or not SPM, for an SpmClient call), then
        advance to ``clock()``. ``task``: a call on one task, which VDSM answers 401 while the
        host is not the SPM (it unloads the SPM's tasks at spmStop; they are back at spmStart)
        where the task-list calls answer 654."""
        if self._closed:
            raise GenericError("the simulated SPM is closed")
        if spm and not self._is_spm:
            if task:
                raise UnknownTaskError(f"{UnknownTaskError.default_message}: the SPM role of "
                                       f"pool {self.pool} is lost, its tasks are unloaded")
            raise NotSpmError(f"{NotSpmError.default_message}: the SPM role of pool "
                              f"{self.pool} is lost")
        self._advance()

    def _leave(self) -> int:
        """With the lock held: write this call's records; return the sequence to sync (0 when
        there is no log or no ``fsync``)."""
        log = self._log
        if log is None:
            return 0
        if self._pending:
            log.append(self._pending)
            self._pending = []
        return log.written if self._fsync else 0

    def _sync(self, seq: int) -> None:
        """Without the lock: wait until the records up to ``seq`` are on disk."""
        if self._log is not None:
            self._log.sync_to(seq)

    @contextmanager
    def _session(self, *, spm: bool, task: bool = False) -> Iterator[None]:
        """Lock, check, advance to ``clock()``; on the way out write this call's records and
        make them durable (outside the lock) before the caller sees the answer."""
        seq = 0
        try:
            with self._lock:
                try:
                    self._enter(spm=spm, task=task)
                    yield
                finally:
                    seq = self._leave()
        finally:
            if seq:
                self._sync(seq)

    def _advance(self) -> None:
        now = float(self._clock())
        if now < self._now:
            now = self._now
        if self._is_spm:
            events = self._events
            while events and events[0][0] <= now:
                at, _, kind, task, gen = heapq.heappop(events)
                if gen != task.gen:
                    continue
                self._now = at
                if kind == _JOB_END:
                    self._on_job_end(task, at)
                elif kind == _LOCK_TIMEOUT:
                    self._on_lock_timeout(task, at)
                else:
                    self._end_rollback(task, at)
        self._now = now

    def _schedule(self, task: _Task, at: float, kind: int) -> None:
        task.gen += 1
        self._seq += 1
        heapq.heappush(self._events, (at, self._seq, kind, task, task.gen))

    def _new_id(self) -> str:
        while True:
            bits = self._id_rng.getrandbits(128)
            bits = (bits & ~(0xF000 << 64)) | (0x4000 << 64)
            bits = (bits & ~(0xC000 << 48)) | (0x8000 << 48)
            h = f"{bits:032x}"
            tid = f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
            if tid not in self._tasks:
                return tid

    def _get(self, task_id: str) -> _Task:
        if not isinstance(task_id, str) or not task_id or "." in task_id:
            raise invalid_parameter("taskID", task_id, "not a task id")
        task = self._tasks.get(task_id)
        if task is None:
            raise UnknownTaskError(f"{UnknownTaskError.default_message}: ({task_id!r},)")
        return task

    def _publish(self, task: _Task) -> None:
        state = task.state
        status: TaskStatus = {
            "taskID": task.id,
            "taskState": WIRE_STATE[state],
            "taskResult": WIRE_RESULT[state],
            "code": task.code,
            "message": task.message,
        }
        task.status = status
        self._statuses[task.id] = status

    def _log_state(self, task: _Task, applied: list[tuple[str, Op]] | None = None,
                   effect: int = 0) -> None:
        """Record a task's state (and the ledger changes made with it). ``effect``: 0 keeps the
        task's effect, 1 makes the applied changes its effect, 2 clears it."""
        if self._log is None:
            return
        ops = [_op_record(action, op) for action, op in applied] if applied else []
        self._pending.append(encode(["S", task.id, task.state, task.code, task.message, ops,
                                     effect]))

    def _log_duplicate(self, dup: DuplicateEffect) -> None:
        if self._log is not None:
            self._pending.append(encode(["D", list(dup.key), dup.first_task_id, dup.task_id,
                                         dup.verb, dup.at]))

    # ---- task life ----------------------------------------------------------------------------

    def _declare(self, task: _Task) -> None:
        declared = self._declared
        for key, exclusive in task.locks:
            counts = declared.get(key)
            if counts is None:
                declared[key] = [0, 1] if exclusive else [1, 0]
                continue
            if counts[1] or (exclusive and counts[0]):
                self._overlaps += 1
            counts[1 if exclusive else 0] += 1
        task.declared = True

    def _undeclare(self, task: _Task) -> None:
        if not task.declared:
            return
        task.declared = False
        declared = self._declared
        for key, exclusive in task.locks:
            counts = declared[key]
            counts[1 if exclusive else 0] -= 1
            if not counts[0] and not counts[1]:
                del declared[key]

    def _reach_done(self, task: _Task) -> None:
        self._unfinished -= 1
        self._undeclare(task)

    def _start(self, task: _Task, at: float) -> None:
        task.state = move(task.state, RUNNING)
        task.message = RUNNING_MESSAGE
        task.worker_since = at
        self._busy += 1
        self._busy_since_sum += at
        if self._busy > self._max_running:
            self._max_running = self._busy
        self._publish(task)
        self._acquire(task, at)

    def _free_worker(self, task: _Task, at: float) -> None:
        since = task.worker_since
        if since is None:
            return
        task.worker_since = None
        self._busy -= 1
        self._busy_since_sum -= since
        self._busy_seconds += at - since
        queue = self._queue
        while queue and self._busy < self._workers:
            nxt = queue.popleft()
            if nxt.in_queue:
                nxt.in_queue = False
                self._queued -= 1
                self._start(nxt, at)

    def _acquire(self, task: _Task, at: float) -> None:
        """Take the job's locks in order from where it stopped; wait at the first one held by
        another task; begin the job once all are held."""
        locks = task.locks
        resources = self._resources
        while task.lock_idx < len(locks):
            key, exclusive = locks[task.lock_idx]
            res = resources.get(key)
            if res is None:
                res = resources[key] = _Resource()
            if not res.waiters and res.grantable(exclusive):
                if exclusive:
                    res.exclusive = True
                else:
                    res.shared += 1
                task.lock_idx += 1
                continue
            request = _LockRequest(task, exclusive)
            res.waiters.append(request)
            task.waiting = (key, request)
            self._lock_waits += 1
            self._schedule(task, at + self._resource_timeout, _LOCK_TIMEOUT)
            return
        end = at
        if task.duration > 0:
            assert task.call is not None
            try:
                VERBS[task.verb].plan(task.call, self._ledger, task.id, at)
            except StorageFailure:
                pass  # a precondition that does not hold fails the job at once
            else:
                end = at + task.duration
        self._schedule(task, end, _JOB_END)

    def _grant(self, key: ResourceKey, res: _Resource, at: float) -> None:
        waiters = res.waiters
        while waiters:
            request = waiters[0]
            if not res.grantable(request.exclusive):
                break
            waiters.popleft()
            if request.exclusive:
                res.exclusive = True
            else:
                res.shared += 1
            task = request.task
            task.waiting = None
            task.lock_idx += 1
            self._acquire(task, at)
        if res.idle():
            del self._resources[key]

    def _release_locks(self, task: _Task, at: float) -> None:
        waiting = task.waiting
        if waiting is not None:
            task.waiting = None
            key, request = waiting
            res = self._resources[key]
            res.waiters.remove(request)
            self._grant(key, res, at)
        held = task.lock_idx
        task.lock_idx = 0
        for key, exclusive in task.locks[:held]:
            res = self._resources[key]
            if exclusive:
                res.exclusive = False
            else:
                res.shared -= 1
            self._grant(key, res, at)

    def _on_job_end(self, task: _Task, at: float) -> None:
        verb = VERBS[task.verb]
        assert task.call is not None
        ledger = self._ledger
        try:
            ops, duplicates = verb.plan(task.call, ledger, task.id, at)
        except StorageFailure as failure:
            if failure.duplicate_of is not None:
                key, first = failure.duplicate_of
                self._log_duplicate(ledger.note_duplicate(key, first, task_id=task.id,
                                                          verb=task.verb, at=at))
            self._failed += 1
            self._abort(task, at, failure.code, failure.task_message())
            return
        if task.inject:
            injected = StorageFailure(verb.failure, verb.failure_value(task.call))
            self._failed += 1
            self._abort(task, at, injected.code, injected.task_message())
            return
        for key, first in duplicates:
            self._log_duplicate(ledger.note_duplicate(key, first, task_id=task.id,
                                                      verb=task.verb, at=at))
        applied = ledger.apply_ops(ops, task_id=task.id, verb=task.verb, at=at)
        # A job that registers no rollback leaves its task nothing to undo.
        task.effect = applied if verb.registers_rollback else []
        self._release_locks(task, at)
        task.state = move(task.state, FINISHED)
        task.message = SUCCESS_MESSAGE
        self._succeeded += 1
        self._reach_done(task)
        self._publish(task)
        self._log_state(task, [("a", op) for op in applied],
                        effect=1 if verb.registers_rollback else 2)
        self._free_worker(task, at)

    def _on_lock_timeout(self, task: _Task, at: float) -> None:
        waiting = task.waiting
        if waiting is None:
            return
        self._lock_timeouts += 1
        self._failed += 1
        key = waiting[0]
        failure = StorageFailure(RESOURCE_TIMEOUT, (f"{key[0]}.{key[1]}",))
        self._abort(task, at, failure.code, failure.task_message())

    def _abort(self, task: _Task, at: float, code: int, message: str) -> None:
        """Abort a queued or running task: release its locks, cancel its pending event, record
        the error, and roll back (on its worker, when it holds one)."""
        task.gen += 1
        if task.in_queue:
            task.in_queue = False
            self._queued -= 1
        self._release_locks(task, at)
        task.code = code
        task.message = message
        task.state = move(task.state, ABORTING)
        task.state = move(task.state, RACQUIRING)
        task.state = move(task.state, RECOVERING)
        self._log_state(task)
        self._begin_rollback(task, at)

    def _begin_rollback(self, task: _Task, at: float) -> None:
        if self._rollback_duration > 0:
            self._schedule(task, at + self._rollback_duration, _ROLLBACK_END)
            self._publish(task)
        else:
            self._end_rollback(task, at)

    def _end_rollback(self, task: _Task, at: float) -> None:
        """Undo the task's effect (if it had one), end it recovered and free its worker."""
        undone: list[Op] = []
        if task.effect:
            undone = self._ledger.undo_ops(task.effect, task_id=task.id, verb=task.verb, at=at)
            task.effect = []
        task.state = move(task.state, RECOVERED)
        self._reach_done(task)
        self._publish(task)
        self._log_state(task, [("u", op) for op in undone], effect=2)
        self._free_worker(task, at)

    def _recover_unfinished(self, at: float) -> None:
        """What VDSM does with the tasks it loads when it becomes SPM: abort what was not done,
        finish rollbacks in progress; never resume a job."""
        self._events.clear()
        self._queue.clear()
        self._queued = 0
        self._resources.clear()
        self._busy_seconds += self._busy * self._stopped_at - self._busy_since_sum
        self._busy = 0
        self._busy_since_sum = 0.0
        for task in list(self._tasks.values()):
            state = task.state
            if state in DONE:
                continue
            task.gen += 1
            task.waiting = None
            task.lock_idx = 0
            task.in_queue = False
            task.worker_since = None
            self._aborted_on_start += 1
            if state in ABORTABLE:
                task.code = ABORTED_CODE
                task.message = ABORTED_MESSAGE
                state = move(state, ABORTING)
            if state in (ABORTING, WAITRECOVER):
                state = move(state, RACQUIRING)
            if state == RABORTING:
                state = move(state, FAILED)
                task.state = state
                self._reach_done(task)
                self._publish(task)
                self._log_state(task)
                continue
            if state == RACQUIRING:
                state = move(state, RECOVERING)
            task.state = state
            self._end_rollback(task, at)

    # ---- persistence --------------------------------------------------------------------------

    def _load(self, records: list[Any]) -> int:
        """Rebuild tasks and ledger from the log's records; return the next epoch.

        Raises ValueError when the log belongs to another pool or is not a simulator log.
        """
        epoch = 0
        ledger = self._ledger
        tasks = self._tasks
        for record in records:
            if not isinstance(record, list) or not record:
                raise ValueError(f"state_dir: not a simulator record: {record!r}")
            kind = record[0]
            if kind == "H":
                _, version, pool, epoch = record
                if version != _FORMAT_VERSION:
                    raise ValueError(f"state_dir: log format {version!r} is not "
                                     f"{_FORMAT_VERSION}")
                if pool != self.pool:
                    raise ValueError(f"state_dir holds pool {pool!r}, not {self.pool!r}")
            elif kind == "F":
                tid, verb = record[1], record[2]
                task = _Task(tid, verb, None, (), 0.0, False)
                task.params = record[3] if len(record) > 3 else None
                task.state = QUEUED
                tasks[tid] = task
            elif kind == "S":
                _, tid, state, code, message, ops, effect = record
                _check_state(state)
                known = tasks.get(tid)
                if known is None:
                    continue
                task = known
                task.state, task.code, task.message = state, code, message
                applied: list[Op] = []
                for data in ops:
                    action, op = _op_from_record(data)
                    changed = ledger.perform(op[0], op[1],
                                             action="apply" if action == "a" else "undo",
                                             task_id=tid, verb=task.verb, at=op[1].created_at)
                    if changed is not None:
                        applied.append((op[0], changed))
                if effect == 1:
                    task.effect = applied
                elif effect == 2:
                    task.effect = []
            elif kind == "C":
                tasks.pop(record[1], None)
            elif kind == "D":
                _, key, first, tid, verb, at = record
                ledger.restore_duplicate(DuplicateEffect(at, tuple(key), first, tid, verb))
            elif kind == "O":
                obj = LedgerObject.from_list(record[1])
                ledger.perform("create", obj, action="apply", task_id=obj.task_id,
                               verb=obj.verb, at=obj.created_at)
            elif kind == "X":
                ledger.restore_removal(tuple(record[1]), record[2])
            elif kind == "T":
                _, tid, verb, state, code, message, effect_ops = record[:7]
                _check_state(state)
                task = tasks[tid] = _Task(tid, verb, None, (), 0.0, False)
                task.params = record[7] if len(record) > 7 else None
                task.state, task.code, task.message = state, code, message
                task.effect = [_op_from_record(data)[1] for data in effect_ops]
            else:
                raise ValueError(f"state_dir: unknown record kind {kind!r}")
        for task in tasks.values():
            self._infos[task.id] = _info(task)
            if task.state not in DONE:
                self._unfinished += 1
            self._publish(task)
        return epoch + 1 if records else 0

    def _snapshot(self) -> Iterator[Any]:
        """The records that rebuild the current state (the compacted log)."""
        yield ["H", _FORMAT_VERSION, self.pool, self._epoch]
        for obj in self._ledger.objects():
            yield ["O", obj.to_list()]
        for key, tid in self._ledger.removals():
            yield ["X", list(key), tid]
        for dup in self._ledger.duplicates():
            yield ["D", list(dup.key), dup.first_task_id, dup.task_id, dup.verb, dup.at]
        for task in self._tasks.values():
            yield ["T", task.id, task.verb, task.state, task.code, task.message,
                   [_op_record("a", op) for op in task.effect], task.params]

