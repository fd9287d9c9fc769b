"""The chain state machine: pure code, no threads, no clock, no I/O.

``transition(state, event, command) -> (new_state, effects)`` is the whole behaviour of a chain.
The CommandActor is the shell: it receives a message, turns it into an event, calls
:func:`transition`, records the new state (write ahead) and then performs the effects. The old
state is never modified, so a caller can keep it, compare it, or throw the new one away.

Life of a chain::

    new ──start──▶ running: step k submitting ─TaskFired─▶ step k running ─TaskEnded ok─▶
        end_step hook ─HookDone─▶ step k+1 … ─no next step─▶ end_successfully hook ─▶ ENDED ok
    any failure (step failed, refused, hook raised, cancel, deadline) ─▶ failing:
        end_with_failure hook ─▶ reverting: revert tasks of the succeeded steps, newest first,
        one at a time ─▶ ENDED with failure (reason says why, and which reverts failed)

The chain ends exactly once. A step is fired at most once: a duplicate or stale event is
ignored (a duplicate TaskEnded is answered with another AckTask so the poller stops resending).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from actors._spec import (
    ChainSpec,
    Command,
    StepListCommand,
    StepResult,
    StepSpec,
    _validate_step,
)

__all__ = [
    "AckTask",
    "Cancel",
    "ChainEnded",
    "ChainState",
    "DiscardTask",
    "Effect",
    "Event",
    "FireRefused",
    "FireTask",
    "HookDone",
    "RunHook",
    "Start",
    "StepRecord",
    "StopTask",
    "TaskEnded",
    "TaskFired",
    "TaskLost",
    "Tick",
    "ZombieTask",
    "new_chain",
    "resume_effects",
    "transition",
]

ENDED_SUCCESSFULLY = "ended_successfully"
ENDED_WITH_FAILURE = "ended_with_failure"

Phase = Literal["new", "running", "failing", "reverting", "ended"]
StepStatus = Literal["submitting", "running", "succeeded", "failed", "unknown"]
RevertStatus = Literal["submitting", "running", "succeeded", "failed"]
RefKind = Literal["step", "revert"]

# Code used when a task the chain fired is no longer known to the SPM (VDSM's 401).
CODE_TASK_UNKNOWN = 401

# How many times a failed revert task is fired again before the chain gives it up.
REVERT_ATTEMPTS = 3


# --------------------------------------------------------------------------------------------
# State


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One fired step and, once a later step failed, its revert."""

    index: int
    verb: str
    params: Mapping[str, Any]
    revert_verb: str | None
    revert_params: Mapping[str, Any] | None
    exclusive: tuple[str, ...]
    shared: tuple[str, ...]
    status: StepStatus = "submitting"
    task_id: str | None = None
    code: int = 0
    message: str = ""
    submitted_at: float = 0.0
    fired_at: float | None = None
    ended_at: float | None = None
    stop_sent: bool = False
    revert_status: RevertStatus | None = None
    revert_task_id: str | None = None
    revert_attempts: int = 0
    revert_code: int = 0
    revert_message: str = ""
    old_revert_task_ids: tuple[str, ...] = ()  # earlier revert attempts' tasks
    revert_stop_sent: bool = False
    _as_dict: dict[str, Any] | None = field(
        default=None, init=False, repr=False, compare=False, hash=False
    )
    _as_slim: list[Any] | None = field(
        default=None, init=False, repr=False, compare=False, hash=False
    )

    def result(self) -> StepResult:
        assert self.task_id is not None
        return StepResult(self.index, self.verb, self.params, self.task_id)

    def to_dict(self) -> dict[str, Any]:
        """The record as plain data, every field (computed once: records never change)."""
        cached = self._as_dict
        if cached is None:
            cached = {f: _plain(getattr(self, f)) for f in _RECORD_FIELDS}
            object.__setattr__(self, "_as_dict", cached)
        return cached

    def to_slim(self) -> list[Any]:
        """The record as a list of the fields a declarative spec does not already say (verb,
        parameters, revert and resources are in the spec), in the order of ``SLIM_FIELDS``;
        a list, not a mapping, because every live chain keeps one per step. Computed once."""
        cached = self._as_slim
        if cached is None:
            # msgpack packs the tuple as an array; nothing here is a mapping.
            cached = [
                self.index, self.status, self.task_id, self.code, self.message,
                self.submitted_at, self.fired_at, self.ended_at, self.stop_sent,
                self.revert_status, self.revert_task_id, self.revert_attempts,
                self.revert_code, self.revert_message, self.old_revert_task_ids,
                self.revert_stop_sent,
            ]
            object.__setattr__(self, "_as_slim", cached)
        return cached

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any] | Sequence[Any], step: StepSpec | None = None
    ) -> StepRecord:
        """Rebuild from :meth:`to_dict` or :meth:`to_slim` (which needs its spec ``step``)."""
        data = step_fields(data)
        if "verb" not in data:
            if step is None:
                raise KeyError("verb")
            data = {
                **data, "verb": step.verb, "params": step.params,
                "revert_verb": step.revert_verb, "revert_params": step.revert_params,
                "exclusive": step.exclusive, "shared": step.shared,
            }
        kw = {f: data[f] for f in _RECORD_FIELDS if f in data}
        kw["exclusive"] = tuple(kw["exclusive"])
        kw["shared"] = tuple(kw["shared"])
        kw["old_revert_task_ids"] = tuple(kw.get("old_revert_task_ids", ()))
        return cls(**kw)


_RECORD_FIELDS = tuple(f for f in StepRecord.__dataclass_fields__ if not f.startswith("_"))
_SPEC_FIELDS = frozenset(
    ("verb", "params", "revert_verb", "revert_params", "exclusive", "shared")
)
SLIM_FIELDS = tuple(f for f in _RECORD_FIELDS if f not in _SPEC_FIELDS)
"""The fields of :meth:`StepRecord.to_slim`'s list, in order (part of the snapshot schema)."""
assert len(SLIM_FIELDS) == 16, "StepRecord.to_slim lists every slim field"


def step_fields(raw: Mapping[str, Any] | Sequence[Any]) -> dict[str, Any]:
    """A step record of a snapshot as a mapping, whether written whole (a mapping) or slim (a
    list in ``SLIM_FIELDS`` order). Raises ValueError for a list of the wrong length."""
    if isinstance(raw, Mapping):
        return dict(raw)
    if len(raw) != len(SLIM_FIELDS):
        raise ValueError(f"a slim step record has {len(SLIM_FIELDS)} fields, not {len(raw)}")
    return dict(zip(SLIM_FIELDS, raw, strict=True))


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Mapping):
        return dict(value)
    return value


@dataclass(frozen=True, slots=True)
class ChainState:
    """Everything a chain knows; what a snapshot stores. Never modified in place."""

    chain_id: str
    spec: ChainSpec
    created_at: float
    deadline_at: float
    task_timeout_s: float
    phase: Phase = "new"
    steps: tuple[StepRecord, ...] = ()
    hook: str | None = None  # the hook the shell is running: end_step / end_* / None
    hook_index: int = -1
    cancel_reason: str | None = None
    reason: str | None = None  # why the chain failed (set once, when it starts failing)
    revert_queue: tuple[int, ...] = ()  # step indices still to revert, next first
    outcome: str | None = None
    ended_at: float | None = None
    notes: tuple[str, ...] = field(default=())  # what went wrong while reverting

    @property
    def ended(self) -> bool:
        return self.phase == "ended"

    @property
    def current(self) -> StepRecord | None:
        """The last step fired (None before the first)."""
        return self.steps[-1] if self.steps else None

    def results(self) -> list[StepResult]:
        """The succeeded steps, in order (what a Command's next_step is given)."""
        return [s.result() for s in self.steps if s.status == "succeeded"]

    def in_flight(self) -> list[tuple[tuple[str, int, int], str | None, StepRecord]]:
        """Tasks fired or being fired and not yet ended: (ref, task id or None, record)."""
        out: list[tuple[tuple[str, int, int], str | None, StepRecord]] = []
        for s in self.steps:
            if s.status in ("submitting", "running"):
                out.append((("step", s.index, 0), s.task_id, s))
            if s.revert_status in ("submitting", "running"):
                out.append((("revert", s.index, s.revert_attempts), s.revert_task_id, s))
        return out

    def to_dict(self, with_spec: bool = True) -> dict[str, Any]:
        """Plain data for a snapshot. The steps of a declarative chain are written slim: their
        verbs and parameters are in the spec. ``with_spec=False`` leaves the spec out (None):
        a store that keeps it once per chain (``save(..., spec=spec.packed())``) gives it back
        to :meth:`from_dict`."""
        slim = self.spec.steps is not None
        return {
            "chain_id": self.chain_id,
            "spec": self.spec.packed() if with_spec else None,
            "created_at": self.created_at,
            "deadline_at": self.deadline_at,
            "task_timeout_s": self.task_timeout_s,
            "phase": self.phase,
            "steps": [s.to_slim() if slim else s.to_dict() for s in self.steps],
            "hook": self.hook,
            "hook_index": self.hook_index,
            "cancel_reason": self.cancel_reason,
            "reason": self.reason,
            "revert_queue": list(self.revert_queue),
            "outcome": self.outcome,
            "ended_at": self.ended_at,
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], spec: bytes | None = None) -> ChainState:
        """Rebuild from :meth:`to_dict`'s output (``spec``: the packed spec kept apart, for a
        snapshot written without it); KeyError/TypeError/ValueError when malformed."""
        raw_spec = data["spec"]
        if raw_spec is None:
            if spec is None:
                raise KeyError("spec")
            raw_spec = spec
        if isinstance(raw_spec, bytes):
            from actors._snapshot import unpack_nested

            raw_spec = unpack_nested(raw_spec)
        chain_spec = ChainSpec.from_dict(raw_spec)
        spec_steps = chain_spec.steps or ()

        def record(i: int, d: Mapping[str, Any]) -> StepRecord:
            return StepRecord.from_dict(d, spec_steps[i] if i < len(spec_steps) else None)

        return cls(
            chain_id=data["chain_id"],
            spec=chain_spec,
            created_at=float(data["created_at"]),
            deadline_at=float(data["deadline_at"]),
            task_timeout_s=float(data["task_timeout_s"]),
            phase=data["phase"],
            steps=tuple(record(i, s) for i, s in enumerate(data["steps"])),
            hook=data["hook"],
            hook_index=int(data["hook_index"]),
            cancel_reason=data["cancel_reason"],
            reason=data["reason"],
            revert_queue=tuple(data["revert_queue"]),
            outcome=data["outcome"],
            ended_at=data["ended_at"],
            notes=tuple(data["notes"]),
        )


_MISSING: Any = object()


def _make_replacer(cls: type) -> Any:
    """A ``dataclasses.replace`` for one frozen slots dataclass, several times faster: the
    chain model makes a new state (and a new step record) on every event. Fields that are not
    init fields (caches) start empty in the copy."""
    init = [f.name for f in fields(cls) if f.init]
    cache = [f.name for f in fields(cls) if not f.init]
    args = ", ".join(f"{n}=_M" for n in init)
    body = [f"def replace_{cls.__name__}(obj, *, {args}):", "    new = _new(_cls)"]
    # Each slot's own descriptor, bound once: setting through it skips the attribute lookup
    # (and the frozen check) that object.__setattr__ makes for every field.
    ns: dict[str, Any] = {"_new": object.__new__, "_cls": cls, "_M": _MISSING}
    for n in init:
        ns[f"_set_{n}"] = getattr(cls, n).__set__
        body.append(f"    _set_{n}(new, obj.{n} if {n} is _M else {n})")
    for n in cache:
        ns[f"_set_{n}"] = getattr(cls, n).__set__
        body.append(f"    _set_{n}(new, None)")
    body.append("    return new")
    exec("\n".join(body), ns)  # noqa: S102 - generated from the dataclass's own field names
    return ns[f"replace_{cls.__name__}"]


_REPLACERS: dict[type, Any] = {}


def replace(obj: Any, **changes: Any) -> Any:
    """``dataclasses.replace`` for the chain model's frozen dataclasses (see above)."""
    return _REPLACERS[type(obj)](obj, **changes)


def new_chain(
    spec: ChainSpec, chain_id: str, now: float, deadline_s: float, task_timeout_s: float
) -> ChainState:
    """A chain that has not started. ``deadline_s``/``task_timeout_s`` are the effective limits."""
    return ChainState(
        chain_id=chain_id,
        spec=spec,
        created_at=now,
        deadline_at=now + deadline_s,
        task_timeout_s=task_timeout_s,
    )


_REPLACERS[StepRecord] = _make_replacer(StepRecord)
_REPLACERS[ChainState] = _make_replacer(ChainState)


# --------------------------------------------------------------------------------------------
# Events (what happened) and effects (what the shell must do)


@dataclass(frozen=True, slots=True)
class Start:
    now: float


@dataclass(frozen=True, slots=True)
class TaskFired:
    """The SPM accepted the verb fired for ``ref`` and answered ``task_id``."""

    ref: tuple[str, int, int]
    task_id: str
    now: float


@dataclass(frozen=True, slots=True)
class FireRefused:
    """The SPM refused the verb fired for ``ref``: no task exists."""

    ref: tuple[str, int, int]
    code: int
    message: str
    now: float


@dataclass(frozen=True, slots=True)
class TaskEnded:
    """The poller saw ``task_id`` finished. ``succeeded``: finished + success."""

    task_id: str
    succeeded: bool
    code: int
    message: str
    now: float


@dataclass(frozen=True, slots=True)
class TaskLost:
    """The SPM no longer knows ``task_id`` (401): its outcome cannot be learnt."""

    task_id: str
    now: float


@dataclass(frozen=True, slots=True)
class ZombieTask:
    """``task_id`` has been running past the task timeout."""

    task_id: str
    now: float


@dataclass(frozen=True, slots=True)
class HookDone:
    """The shell ran ``hook`` (for step ``index``); ``error`` is the exception text if it raised."""

    hook: str
    index: int
    error: str | None
    now: float


@dataclass(frozen=True, slots=True)
class Cancel:
    reason: str
    now: float


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed: checks the chain's deadline."""

    now: float


Event = (
    Start | TaskFired | FireRefused | TaskEnded | TaskLost | ZombieTask | HookDone | Cancel | Tick
)


@dataclass(frozen=True, slots=True)
class FireTask:
    """Ask the pool's SpmTaskActor to fire ``verb`` for ``ref`` (step or revert)."""

    ref: tuple[str, int, int]
    verb: str
    params: Mapping[str, Any]
    exclusive: tuple[str, ...]
    shared: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class AckTask:
    """The outcome of ``task_id`` is recorded: stop reporting it, clear it on the SPM."""

    task_id: str


@dataclass(frozen=True, slots=True)
class StopTask:
    task_id: str


@dataclass(frozen=True, slots=True)
class DiscardTask:
    """``task_id`` is not (or no longer) this chain's: stop it, revert it if it succeeded,
    clear it."""

    task_id: str


@dataclass(frozen=True, slots=True)
class RunHook:
    """Run the Command's ``hook`` (``end_step`` for step ``index``, ``end_successfully`` or
    ``end_with_failure``), then feed back HookDone."""

    hook: str
    index: int


@dataclass(frozen=True, slots=True)
class ChainEnded:
    outcome: str
    reason: str | None


Effect = FireTask | AckTask | StopTask | DiscardTask | RunHook | ChainEnded

_NO_EFFECTS: list[Effect] = []


# --------------------------------------------------------------------------------------------
# The transition function


def transition(
    state: ChainState, event: Event, command: Command
) -> tuple[ChainState, list[Effect]]:
    """Apply ``event`` to ``state``; return the new state and the effects to perform, in order.

    ``command`` decides the next step (its ``next_step`` is called here and must be pure). An
    event that does not apply (stale, duplicate, after the end) returns ``state`` itself and no
    effect, except a duplicate TaskEnded, answered with AckTask. A ``next_step`` that raises or
    returns something that is not a valid StepSpec fails the chain with the error as reason.
    """
    if state.phase == "ended":
        return _after_end(state, event)
    if isinstance(event, TaskEnded):
        return _on_task_ended(state, event, command)
    if isinstance(event, TaskFired):
        return _on_fired(state, event)
    if isinstance(event, HookDone):
        return _on_hook_done(state, event, command)
    if isinstance(event, Tick):
        return _on_tick(state, event)
    if isinstance(event, Start):
        if state.phase != "new":
            return state, _NO_EFFECTS
        return _next_step(replace(state, phase="running"), command, event.now)
    if isinstance(event, FireRefused):
        return _on_refused(state, event)
    if isinstance(event, Cancel):
        return _on_cancel(state, event.reason, event.now)
    if isinstance(event, TaskLost):
        return _on_lost(state, event)
    if isinstance(event, ZombieTask):
        return _on_zombie(state, event)
    raise TypeError(f"not a chain event: {event!r}")


def _after_end(state: ChainState, event: Event) -> tuple[ChainState, list[Effect]]:
    """An ended chain changes no more. A task it hears of for the first time is discarded (not
    its to keep); a report of a task it knew is acknowledged so that it is cleared."""
    if isinstance(event, TaskFired):
        if event.task_id in _known_tasks(state):
            return state, _NO_EFFECTS
        return state, [DiscardTask(event.task_id)]
    if isinstance(event, TaskEnded) and event.task_id in _known_tasks(state):
        return state, [AckTask(event.task_id)]
    return state, _NO_EFFECTS


def _known_tasks(state: ChainState) -> set[str]:
    known: set[str] = set()
    for s in state.steps:
        if s.task_id:
            known.add(s.task_id)
        if s.revert_task_id:
            known.add(s.revert_task_id)
        known.update(s.old_revert_task_ids)
    return known


def _set_step(state: ChainState, rec: StepRecord, **changes: Any) -> tuple[ChainState, StepRecord]:
    new_rec = replace(rec, **changes)
    steps = list(state.steps)
    steps[rec.index] = new_rec
    return replace(state, steps=tuple(steps)), new_rec


def _next_step(state: ChainState, command: Command, now: float) -> tuple[ChainState, list[Effect]]:
    """Fire the step the command decides next, or run end_successfully when there is none."""
    try:
        if isinstance(command, StepListCommand):
            # Steps go in order and each fired one succeeded: the next is the one after them.
            n = len(state.steps)
            step = command.steps[n] if n < len(command.steps) else None
        else:
            step = command.next_step(state.results())
        if step is not None and not isinstance(step, StepSpec):
            raise TypeError(f"next_step returned {type(step).__name__}, not a StepSpec")
        if step is not None and not isinstance(command, StepListCommand):
            # A declarative chain's steps were validated at submit; a Command's are checked
            # as it decides them.
            _validate_step(step, f"step {len(state.steps)}")
    except Exception as exc:  # noqa: BLE001 - user code: the chain fails, the actor does not
        return _fail(state, f"next_step raised {type(exc).__name__}: {exc}", now)
    if step is None:
        return replace(state, hook="end_successfully", hook_index=-1), [
            RunHook("end_successfully", -1)
        ]
    index = len(state.steps)
    rec = StepRecord(
        index=index,
        verb=step.verb,
        params=step.params,
        revert_verb=step.revert_verb,
        revert_params=step.revert_params,
        exclusive=tuple(step.exclusive),
        shared=tuple(step.shared),
        submitted_at=now,
    )
    new = replace(state, steps=(*state.steps, rec), hook=None, hook_index=-1)
    return new, [FireTask(("step", index, 0), rec.verb, rec.params, rec.exclusive, rec.shared)]


def _fail(state: ChainState, reason: str, now: float) -> tuple[ChainState, list[Effect]]:
    """Start failing: run end_with_failure, then revert. Only from phase running."""
    new = replace(state, phase="failing", reason=reason, hook="end_with_failure", hook_index=-1)
    return new, [RunHook("end_with_failure", -1)]


def _find_ref(state: ChainState, ref: tuple[str, int, int]) -> StepRecord | None:
    kind, index, attempt = ref
    if not 0 <= index < len(state.steps):
        return None
    rec = state.steps[index]
    if kind == "step":
        return rec if rec.status == "submitting" else None
    if kind == "revert" and rec.revert_status == "submitting" and rec.revert_attempts == attempt:
        return rec
    return None


def _on_fired(state: ChainState, ev: TaskFired) -> tuple[ChainState, list[Effect]]:
    rec = _find_ref(state, ev.ref)
    if rec is None:
        # The verb was fired for something this chain no longer waits for (a duplicate
        # delivery after a restart): that task is not ours to keep.
        known = {s.task_id for s in state.steps} | {s.revert_task_id for s in state.steps}
        if ev.task_id in known:
            return state, _NO_EFFECTS
        return state, [DiscardTask(ev.task_id)]
    if ev.ref[0] == "step":
        new, rec = _set_step(state, rec, status="running", task_id=ev.task_id, fired_at=ev.now)
        if new.cancel_reason is not None and new.phase == "running":
            new, rec = _set_step(new, rec, stop_sent=True)
            return new, [StopTask(ev.task_id)]
        return new, _NO_EFFECTS
    new, rec = _set_step(state, rec, revert_status="running", revert_task_id=ev.task_id)
    return new, _NO_EFFECTS


def _on_refused(state: ChainState, ev: FireRefused) -> tuple[ChainState, list[Effect]]:
    rec = _find_ref(state, ev.ref)
    if rec is None:
        return state, _NO_EFFECTS
    if ev.ref[0] == "step":
        new, rec = _set_step(
            state, rec, status="failed", code=ev.code, message=ev.message, ended_at=ev.now
        )
        reason = state.cancel_reason or (
            f"step {rec.index} ({rec.verb}) was refused by the SPM: code {ev.code} {ev.message}"
        )
        return _fail(new, reason, ev.now)
    return _revert_failed(state, rec, ev.code, ev.message, ev.now)


def _find_task(state: ChainState, task_id: str) -> tuple[StepRecord | None, bool]:
    """The record whose step (False) or revert (True) task is ``task_id``."""
    for rec in reversed(state.steps):
        if rec.task_id == task_id:
            return rec, False
        if rec.revert_task_id == task_id:
            return rec, True
    return None, False


def _on_task_ended(
    state: ChainState, ev: TaskEnded, command: Command
) -> tuple[ChainState, list[Effect]]:
    rec, is_revert = _find_task(state, ev.task_id)
    if rec is None:
        if ev.task_id in _known_tasks(state):
            return state, [AckTask(ev.task_id)]  # an earlier revert attempt, reported again
        return state, _NO_EFFECTS
    ack: list[Effect] = [AckTask(ev.task_id)]
    if is_revert:
        if rec.revert_status != "running":
            return state, ack  # duplicate report: acknowledge again
        if ev.succeeded:
            new, rec = _set_step(
                state,
                rec,
                revert_status="succeeded",
                revert_code=ev.code,
                revert_message=ev.message,
            )
            new, effects = _revert_next(new, ev.now)
            return new, ack + effects
        new, effects = _revert_failed(state, rec, ev.code, ev.message, ev.now)
        return new, ack + effects
    if rec.status != "running":
        return state, ack
    if ev.succeeded:
        new, rec = _set_step(
            state, rec, status="succeeded", code=ev.code, message=ev.message, ended_at=ev.now
        )
        if new.phase != "running":
            return new, ack
        if new.cancel_reason is not None:
            new, effects = _fail(new, new.cancel_reason, ev.now)
            return new, ack + effects
        new = replace(new, hook="end_step", hook_index=rec.index)
        return new, [*ack, RunHook("end_step", rec.index)]
    new, rec = _set_step(
        state, rec, status="failed", code=ev.code, message=ev.message, ended_at=ev.now
    )
    reason = state.cancel_reason or (
        f"step {rec.index} ({rec.verb}) failed on the SPM: code {ev.code} {ev.message}"
    )
    new, effects = _fail(new, reason, ev.now)
    return new, ack + effects


def _on_lost(state: ChainState, ev: TaskLost) -> tuple[ChainState, list[Effect]]:
    """The SPM forgot the task: its outcome is unknown, so the step is reverted as well."""
    rec, is_revert = _find_task(state, ev.task_id)
    if rec is None:
        return state, _NO_EFFECTS
    msg = "task unknown to the SPM"
    if is_revert:
        if rec.revert_status != "running":
            return state, _NO_EFFECTS
        return _revert_failed(state, rec, CODE_TASK_UNKNOWN, msg, ev.now)
    if rec.status != "running":
        return state, _NO_EFFECTS
    new, rec = _set_step(
        state, rec, status="unknown", code=CODE_TASK_UNKNOWN, message=msg, ended_at=ev.now
    )
    reason = state.cancel_reason or (
        f"step {rec.index} ({rec.verb}): task {ev.task_id} is unknown to the SPM; "
        "its outcome cannot be learnt, so it is reverted too"
    )
    return _fail(new, reason, ev.now)


def _on_zombie(state: ChainState, ev: ZombieTask) -> tuple[ChainState, list[Effect]]:
    rec, is_revert = _find_task(state, ev.task_id)
    if rec is not None and is_revert and rec.revert_status == "running":
        # A revert stuck past the task timeout: stop it (once); it fails and is fired again.
        if rec.revert_stop_sent:
            return state, _NO_EFFECTS
        new, _ = _set_step(state, rec, revert_stop_sent=True)
        return new, [StopTask(ev.task_id)]
    if rec is None or is_revert or rec.status != "running" or rec.stop_sent:
        return state, _NO_EFFECTS
    new, rec = _set_step(state, rec, stop_sent=True)
    if new.cancel_reason is None:
        new = replace(
            new,
            cancel_reason=(
                f"step {rec.index} ({rec.verb}): task {ev.task_id} ran past its timeout of "
                f"{state.task_timeout_s:g} s (zombie) and was stopped"
            ),
        )
    return new, [StopTask(ev.task_id)]


def _on_hook_done(
    state: ChainState, ev: HookDone, command: Command
) -> tuple[ChainState, list[Effect]]:
    if state.hook != ev.hook or state.hook_index != ev.index:
        return state, _NO_EFFECTS
    if ev.hook == "end_step":
        if ev.error is not None:
            return _fail(state, f"end_step hook of step {ev.index} raised: {ev.error}", ev.now)
        if state.cancel_reason is not None:
            return _fail(state, state.cancel_reason, ev.now)
        return _next_step(state, command, ev.now)
    if ev.hook == "end_successfully":
        if ev.error is not None:
            return _fail(state, f"end_successfully hook raised: {ev.error}", ev.now)
        if state.cancel_reason is not None:
            return _fail(state, state.cancel_reason, ev.now)
        new = replace(state, phase="ended", hook=None, outcome=ENDED_SUCCESSFULLY, ended_at=ev.now)
        return new, [ChainEnded(ENDED_SUCCESSFULLY, None)]
    if ev.hook == "end_with_failure":
        notes = state.notes
        if ev.error is not None:
            notes = (*notes, f"end_with_failure hook raised: {ev.error}")
        to_revert = tuple(
            s.index
            for s in reversed(state.steps)
            if s.status in ("succeeded", "unknown") and s.revert_verb is not None
        )
        new = replace(state, phase="reverting", hook=None, revert_queue=to_revert, notes=notes)
        return _revert_next(new, ev.now)
    return state, _NO_EFFECTS


def _end_with_failure(state: ChainState, now: float) -> tuple[ChainState, list[Effect]]:
    reason = state.reason or "failed"
    if state.notes:
        reason = f"{reason}; " + "; ".join(state.notes)
    new = replace(
        state,
        phase="ended",
        outcome=ENDED_WITH_FAILURE,
        reason=reason,
        ended_at=now,
        hook=None,
        revert_queue=(),
    )
    return new, [ChainEnded(ENDED_WITH_FAILURE, reason)]


def _revert_next(state: ChainState, now: float) -> tuple[ChainState, list[Effect]]:
    """Fire the next revert in the queue, or end the chain with failure when none is left."""
    if not state.revert_queue:
        return _end_with_failure(state, now)
    index = state.revert_queue[0]
    rec = state.steps[index]
    return _fire_revert(replace(state, revert_queue=state.revert_queue[1:]), rec)


def _fire_revert(state: ChainState, rec: StepRecord) -> tuple[ChainState, list[Effect]]:
    verb = rec.revert_verb
    assert verb is not None
    attempt = rec.revert_attempts + 1
    old = rec.old_revert_task_ids
    if rec.revert_task_id is not None:
        old = (*old, rec.revert_task_id)
    new, rec = _set_step(
        state, rec, revert_status="submitting", revert_task_id=None, revert_attempts=attempt,
        old_revert_task_ids=old, revert_stop_sent=False,
    )
    params = rec.revert_params if rec.revert_params is not None else rec.params
    return new, [
        FireTask(("revert", rec.index, attempt), verb, params, rec.exclusive, rec.shared)
    ]


def _revert_failed(
    state: ChainState, rec: StepRecord, code: int, message: str, now: float
) -> tuple[ChainState, list[Effect]]:
    if rec.revert_attempts < REVERT_ATTEMPTS:
        new, rec = _set_step(state, rec, revert_code=code, revert_message=message)
        return _fire_revert(new, rec)
    new, rec = _set_step(
        state, rec, revert_status="failed", revert_code=code, revert_message=message
    )
    note = (
        f"revert of step {rec.index} ({rec.revert_verb}) failed {rec.revert_attempts} times, "
        f"last: code {code} {message}"
    )
    new = replace(new, notes=(*new.notes, note))
    return _revert_next(new, now)


def _on_cancel(state: ChainState, reason: str, now: float) -> tuple[ChainState, list[Effect]]:
    if state.phase in ("ended", "failing", "reverting") or state.cancel_reason is not None:
        return state, _NO_EFFECTS
    new = replace(state, cancel_reason=reason)
    if state.phase == "new":
        new = replace(new, phase="running")
        return _fail(new, reason, now)
    cur = new.current
    if new.hook is not None or cur is None:
        return new, _NO_EFFECTS  # the hook's HookDone turns the cancel into a failure
    if cur.status == "running" and cur.task_id is not None and not cur.stop_sent:
        new, _ = _set_step(new, cur, stop_sent=True)
        return new, [StopTask(cur.task_id)]
    return new, _NO_EFFECTS  # submitting: TaskFired sends the stop


def hard_deadline(state: ChainState) -> float:
    """When a chain that is still failing or reverting past its deadline is ended regardless."""
    return state.deadline_at + state.task_timeout_s


def _on_tick(state: ChainState, ev: Tick) -> tuple[ChainState, list[Effect]]:
    if state.phase == "ended" or ev.now < state.deadline_at:
        return state, _NO_EFFECTS
    limit = state.deadline_at - state.created_at
    if ev.now < hard_deadline(state):
        if state.phase in ("new", "running"):
            return _on_cancel(state, f"deadline of {limit:g} s exceeded", ev.now)
        return state, _NO_EFFECTS
    # Past the deadline and the grace after it: every chain ends. Tasks still in flight are
    # discarded (stopped, reverted if they succeeded, cleared) by the SpmTaskActor, and the
    # steps left unreverted are named in the reason.
    effects: list[Effect] = []
    new = state
    for _ref, task_id, _rec in state.in_flight():
        if task_id is not None:
            effects.append(DiscardTask(task_id))
    unreverted = [
        s.index
        for s in state.steps
        if s.status in ("succeeded", "unknown", "running", "submitting")
        and s.revert_verb is not None
        and s.revert_status != "succeeded"
    ]
    if new.reason is None:
        new = replace(new, reason=f"deadline of {limit:g} s exceeded")
    note = f"ended {state.task_timeout_s:g} s past the deadline while still {state.phase}"
    if unreverted:
        note += f"; steps not reverted: {unreverted}"
    new = replace(new, notes=(*new.notes, note))
    new, end = _end_with_failure(new, ev.now)
    return new, effects + end


def resume_effects(state: ChainState) -> list[Effect]:
    """What a rebuilt CommandActor must (re)do to move ``state`` on after a restart.

    Effects recorded before the restart may or may not have been performed; every effect here
    is safe to perform again. A pending hook runs again (hooks are at-least-once); a step or
    revert still being submitted is asked for again (the SpmTaskActor fires a (chain, ref) at
    most once, and recovery resolves the window between sending and recording the task id from
    the SPM before this runs); a stop that was decided (of a step or of a revert) is sent
    again; an ended chain reports its end. Running tasks are re-adopted by the caller from
    :meth:`ChainState.in_flight` (and reported again as zombies if they still run past the
    timeout)."""
    if state.phase == "ended":
        assert state.outcome is not None
        return [ChainEnded(state.outcome, state.reason)]
    if state.phase == "new":
        return []
    if state.hook is not None:
        return [RunHook(state.hook, state.hook_index)]
    effects: list[Effect] = []
    for ref, task_id, rec in state.in_flight():
        if task_id is None:
            if ref[0] == "step":
                effects.append(FireTask(ref, rec.verb, rec.params, rec.exclusive, rec.shared))
            else:
                assert rec.revert_verb is not None
                params = rec.revert_params if rec.revert_params is not None else rec.params
                effects.append(FireTask(ref, rec.revert_verb, params, rec.exclusive, rec.shared))
        elif rec.stop_sent if ref[0] == "step" else rec.revert_stop_sent:
            effects.append(StopTask(task_id))
    return effects


def steps_of(state: ChainState) -> Sequence[StepRecord]:
    return state.steps
