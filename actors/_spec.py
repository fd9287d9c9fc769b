"""Chain specs: what a user submits, validated before anything is accepted.

A chain runs on one storage pool. Its steps are either a declarative list of :class:`StepSpec`
or decided one at a time by a registered :class:`Command` class (oVirt's
``performNextOperation``), which also gets the end hooks.
"""

from __future__ import annotations

import abc
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeVar

__all__ = [
    "ChainSpec",
    "ChainSpecError",
    "Command",
    "StepListCommand",
    "StepResult",
    "StepSpec",
    "command_class",
    "register_command",
    "validate_spec",
]

_EMPTY: Mapping[str, Any] = MappingProxyType({})
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,127}")


class ChainSpecError(ValueError):
    """A chain spec was refused at submit. ``field`` names the bad field (``steps[2].verb``)."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}")


@dataclass(frozen=True, slots=True)
class StepSpec:
    """One step: an SPM verb, its parameters, how to revert it and the resources it declares.

    ``exclusive`` and ``shared`` name resources (an image, a volume) as strings; the pool's
    SpmTaskActor never runs two steps that declare the same exclusive resource at once, nor an
    exclusive and a shared declaration of the same resource. ``revert_verb`` is fired (with
    ``revert_params``) when a later step fails; a step without one is not reverted.
    """

    verb: str
    params: Mapping[str, Any] = field(default_factory=dict)
    revert_verb: str | None = None
    revert_params: Mapping[str, Any] | None = None
    exclusive: tuple[str, ...] = ()
    shared: tuple[str, ...] = ()
    name: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "verb": self.verb,
            "params": dict(self.params),
            "revert_verb": self.revert_verb,
            "revert_params": None if self.revert_params is None else dict(self.revert_params),
            "exclusive": list(self.exclusive),
            "shared": list(self.shared),
            "name": self.name,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "step") -> StepSpec:
        """Build from a mapping; raises ChainSpecError naming ``where.<field>`` when malformed."""
        if not isinstance(data, Mapping):
            raise ChainSpecError(where, f"must be a mapping, got {type(data).__name__}")
        unknown = set(data) - {
            "verb",
            "params",
            "revert_verb",
            "revert_params",
            "exclusive",
            "shared",
            "name",
        }
        if unknown:
            raise ChainSpecError(f"{where}.{sorted(unknown)[0]}", "unknown field")
        step = cls(
            verb=data.get("verb"),  # type: ignore[arg-type]
            params={} if data.get("params") is None else data["params"],
            revert_verb=data.get("revert_verb"),
            revert_params=data.get("revert_params"),
            exclusive=_as_tuple(data.get("exclusive", ()), f"{where}.exclusive"),
            shared=_as_tuple(data.get("shared", ()), f"{where}.shared"),
            name="" if data.get("name") is None else data["name"],
        )
        _validate_step(step, where)
        return step


def _as_tuple(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ChainSpecError(where, "must be a list of resource names")
    return tuple(value)


@dataclass(frozen=True, slots=True)
class StepResult:
    """What a succeeded step produced: its index, verb, parameters and the SPM task that ran it."""

    index: int
    verb: str
    params: Mapping[str, Any]
    task_id: str


class Command(abc.ABC):
    """A serial command that decides its next step from the results so far.

    Subclass, implement :meth:`next_step`, and register the class with :func:`register_command`
    under the name a :class:`ChainSpec` gives as ``command``. An instance is built from the
    chain's ``params`` whenever the chain needs one (at submit, and again after a restart), so it
    must keep no state of its own: :meth:`next_step` must be a deterministic function of
    ``params`` and ``results`` — it is what a rebuilt chain calls to decide the same step again.

    The hooks run on the chain's CommandActor, at least once each (a crash between a hook and
    the record that it ran makes it run again). They must be quick and must not block. A hook
    that raises fails the chain (``end_step`` and ``end_successfully``) and is logged
    (``end_with_failure``, which then goes on to revert).
    """

    def __init__(self, params: Mapping[str, Any]) -> None:
        self.params = params

    @abc.abstractmethod
    def next_step(self, results: Sequence[StepResult]) -> StepSpec | None:
        """The step to fire after ``results`` (the succeeded steps, in order), or None when done."""

    def end_step(self, result: StepResult) -> None:  # noqa: B027
        """Step ``result.index`` finished successfully (oVirt's per-step ``endSuccessfully``)."""

    def end_successfully(self, results: Sequence[StepResult]) -> None:  # noqa: B027
        """Every step succeeded. Runs once before the chain ends with ``ended_successfully``."""

    def end_with_failure(self, results: Sequence[StepResult], reason: str) -> None:  # noqa: B027
        """A step failed (or the chain was cancelled or ran past its deadline).

        Runs before the revert tasks of ``results`` (the steps that succeeded) are fired.
        """


class StepListCommand(Command):
    """The command behind a declarative chain: its steps, in order, from ``params['steps']``."""

    def __init__(self, params: Mapping[str, Any], steps: Sequence[StepSpec]) -> None:
        super().__init__(params)
        self.steps = steps

    def next_step(self, results: Sequence[StepResult]) -> StepSpec | None:
        n = len(results)
        return self.steps[n] if n < len(self.steps) else None


_C = TypeVar("_C", bound=type[Command])
_COMMANDS: dict[str, type[Command]] = {}


def register_command(name: str) -> Callable[[_C], _C]:
    """Class decorator: make a :class:`Command` subclass available to specs as ``command=name``.

    Registering a different class under a name already taken raises ValueError.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"command name {name!r} is not a valid name")

    def decorate(cls: _C) -> _C:
        if not (isinstance(cls, type) and issubclass(cls, Command)):
            raise TypeError(f"{cls!r} is not a Command subclass")
        old = _COMMANDS.get(name)
        if old is not None and old is not cls:
            raise ValueError(f"command {name!r} is already registered to {old.__qualname__}")
        _COMMANDS[name] = cls
        return cls

    return decorate


def command_class(name: str) -> type[Command]:
    """The class registered as ``name``; KeyError naming it when none is."""
    try:
        return _COMMANDS[name]
    except KeyError:
        raise KeyError(f"no command registered as {name!r}") from None


@dataclass(frozen=True, slots=True)
class ChainSpec:
    """What :meth:`Runtime.submit` takes.

    Exactly one of ``steps`` (a declarative list) and ``command`` (a registered Command name)
    is given. ``deadline_s`` bounds the whole chain (past it the chain is cancelled, reverted and
    ends with failure, saying why); ``task_timeout_s`` bounds one task (past it the task is a
    zombie and is stopped). None takes the runtime's defaults. ``chain_id`` None gets a new id.
    """

    pool: str
    command_type: str
    params: Mapping[str, Any] = field(default_factory=dict)
    steps: Sequence[StepSpec] | None = None
    command: str | None = None
    deadline_s: float | None = None
    task_timeout_s: float | None = None
    chain_id: str | None = None
    def packed(self) -> bytes:
        """The spec as msgpack, for the chain's snapshots. Not cached: a store keeps it once per
        chain, and holding it here would cost a few KiB for every live chain."""
        from actors._snapshot import pack_nested

        return pack_nested(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain data (a new dict every call)."""
        return {
            "pool": self.pool,
            "command_type": self.command_type,
            "params": dict(self.params),
            "steps": None if self.steps is None else [s.to_dict() for s in self.steps],
            "command": self.command,
            "deadline_s": self.deadline_s,
            "task_timeout_s": self.task_timeout_s,
            "chain_id": self.chain_id,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ChainSpec:
        """Build and validate a spec from a mapping (JSON-like); ChainSpecError names the field."""
        if not isinstance(data, Mapping):
            raise ChainSpecError("spec", f"must be a mapping, got {type(data).__name__}")
        known = {
            "pool",
            "command_type",
            "params",
            "steps",
            "command",
            "deadline_s",
            "task_timeout_s",
            "chain_id",
        }
        unknown = set(data) - known
        if unknown:
            raise ChainSpecError(sorted(unknown)[0], "unknown field")
        steps = data.get("steps")
        if steps is not None:
            if isinstance(steps, str | bytes) or not isinstance(steps, Sequence):
                raise ChainSpecError("steps", "must be a list of steps")
            steps = [StepSpec.from_dict(s, f"steps[{i}]") for i, s in enumerate(steps)]
        spec = cls(
            pool=data.get("pool"),  # type: ignore[arg-type]
            command_type=data.get("command_type"),  # type: ignore[arg-type]
            params={} if data.get("params") is None else data["params"],
            steps=steps,
            command=data.get("command"),
            deadline_s=data.get("deadline_s"),
            task_timeout_s=data.get("task_timeout_s"),
            chain_id=data.get("chain_id"),
        )
        return validate_spec(spec)

    def make_command(self) -> Command:
        """The Command that decides this chain's steps (a StepListCommand for a step list)."""
        if self.steps is not None:
            return StepListCommand(self.params, self.steps)
        assert self.command is not None
        return command_class(self.command)(self.params)


_GOOD_NAMES: set[str] = set()  # names already found valid (verbs, pools and types repeat)


def _check_name(value: Any, where: str) -> None:
    if type(value) is str and value in _GOOD_NAMES:
        return
    if not isinstance(value, str) or not value:
        raise ChainSpecError(where, f"must be a non-empty string, got {value!r}")
    if not _NAME.fullmatch(value):
        raise ChainSpecError(
            where, f"{value!r} is not a valid name (letters, digits, _ . : -, at most 128)"
        )
    if type(value) is str:
        if len(_GOOD_NAMES) >= 4096:
            _GOOD_NAMES.clear()
        _GOOD_NAMES.add(value)


# Bounds that keep every chain's snapshot within what the snapshot decoder accepts.
_MAX_ITEMS = 10_000
MAX_STEPS = 1_000


_ATOMS = frozenset({str, int, bool, bytes, type(None)})


def _plain(value: Any, depth: int) -> bool:
    """True when ``value`` is plain data of the common exact types (dict, list, tuple, str, int,
    finite float, bool, bytes, None) within the bounds. False says "look closer", not "bad":
    subclasses and other mappings go through :func:`_check_plain`, which names what is wrong."""
    if depth > 16:
        return False
    t = type(value)
    if t in _ATOMS:
        return True
    if t is float:
        return math.isfinite(value)
    if depth == 16 and (t is dict or t is list or t is tuple):
        return not value  # its items would be one level too deep
    if t is dict:
        if len(value) > _MAX_ITEMS:
            return False
        for k, v in value.items():
            if type(k) is not str:
                return False
            if type(v) not in _ATOMS and not _plain(v, depth + 1):
                return False
        return True
    if t is list or t is tuple:
        if len(value) > _MAX_ITEMS:
            return False
        return all(type(v) in _ATOMS or _plain(v, depth + 1) for v in value)
    return False


def _check_params(value: Any, where: str) -> None:
    if type(value) is dict and _plain(value, 0):
        return
    if not isinstance(value, Mapping):
        raise ChainSpecError(where, f"must be a mapping, got {type(value).__name__}")
    for key in value:
        if not isinstance(key, str):
            raise ChainSpecError(where, f"keys must be strings, got {key!r}")
    _check_plain(value, where, 0)


def _check_plain(value: Any, where: str, depth: int) -> None:
    # Params are stored in snapshots and sent over the wire: plain data only.
    if depth > 16:
        raise ChainSpecError(where, "is nested deeper than 16 levels")
    if value is None or isinstance(value, bool | int | str | bytes):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ChainSpecError(where, f"must be finite, got {value!r}")
        return
    if isinstance(value, Mapping):
        if len(value) > _MAX_ITEMS:
            raise ChainSpecError(where, f"has {len(value)} entries, more than {_MAX_ITEMS}")
        for k, v in value.items():
            if not isinstance(k, str):
                raise ChainSpecError(where, f"keys must be strings, got {k!r}")
            _check_plain(v, f"{where}.{k}", depth + 1)
        return
    if isinstance(value, list | tuple):
        if len(value) > _MAX_ITEMS:
            raise ChainSpecError(where, f"has {len(value)} items, more than {_MAX_ITEMS}")
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]", depth + 1)
        return
    raise ChainSpecError(
        where,
        f"must be plain data (str, int, float, bool, None, list, "
        f"mapping), got {type(value).__name__}",
    )


def _check_resources(value: Any, where: str) -> None:
    if type(value) is tuple or type(value) is list:
        for r in value:
            if type(r) is not str or not r:
                break
        else:
            return
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ChainSpecError(where, "must be a list of resource names")
    for i, r in enumerate(value):
        if not isinstance(r, str) or not r:
            raise ChainSpecError(f"{where}[{i}]", f"must be a non-empty string, got {r!r}")


def _resources_ok(value: Any) -> bool:
    return (type(value) is tuple or type(value) is list) and all(
        type(r) is str and r for r in value)


def _step_ok(step: Any) -> bool:
    """The common case of :func:`_validate_step` without building a message for every field:
    True when the step is certainly valid (names seen valid before, plain-data dicts)."""
    if type(step) is not StepSpec:
        return False
    rv = step.revert_verb
    rp = step.revert_params
    return (
        step.verb in _GOOD_NAMES
        and type(step.params) is dict and _plain(step.params, 0)
        and (rv is None or rv in _GOOD_NAMES)
        and (rp is None or (rv is not None and type(rp) is dict and _plain(rp, 0)))
        and _resources_ok(step.exclusive) and _resources_ok(step.shared)
        and (not step.shared or not set(step.exclusive) & set(step.shared))
        and type(step.name) is str
    )


def _validate_step(step: Any, where: str) -> None:
    if _step_ok(step):
        return
    if not isinstance(step, StepSpec):
        raise ChainSpecError(where, f"must be a StepSpec, got {type(step).__name__}")
    _check_name(step.verb, f"{where}.verb")
    _check_params(step.params, f"{where}.params")
    if step.revert_verb is not None:
        _check_name(step.revert_verb, f"{where}.revert_verb")
    if step.revert_params is not None:
        if step.revert_verb is None:
            raise ChainSpecError(f"{where}.revert_params", "given without revert_verb")
        _check_params(step.revert_params, f"{where}.revert_params")
    _check_resources(step.exclusive, f"{where}.exclusive")
    _check_resources(step.shared, f"{where}.shared")
    both = set(step.exclusive) & set(step.shared)
    if both:
        raise ChainSpecError(f"{where}.shared", f"{sorted(both)[0]!r} is also declared exclusive")
    if not isinstance(step.name, str):
        raise ChainSpecError(f"{where}.name", "must be a string")


def _check_positive(value: Any, where: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ChainSpecError(where, f"must be a positive number of seconds, got {value!r}")
    if not math.isfinite(value):
        raise ChainSpecError(where, f"must be finite, got {value!r}")


def validate_spec(spec: Any, pools: Sequence[str] | None = None) -> ChainSpec:
    """Check a spec and return it; raise ChainSpecError naming the first bad field.

    ``pools`` (when given) is the set of pools the runtime serves; a spec for another pool is
    refused. A ``command`` must be registered.
    """
    if not isinstance(spec, ChainSpec):
        raise ChainSpecError("spec", f"must be a ChainSpec or a mapping, got {type(spec).__name__}")
    _check_name(spec.pool, "pool")
    if pools is not None and spec.pool not in pools:
        raise ChainSpecError(
            "pool",
            f"unknown pool {spec.pool!r}; this runtime serves "
            f"{', '.join(sorted(pools)) or 'no pool'}",
        )
    _check_name(spec.command_type, "command_type")
    _check_params(spec.params, "params")
    if (spec.steps is None) == (spec.command is None):
        raise ChainSpecError("steps", "give exactly one of steps and command")
    if spec.steps is not None:
        if isinstance(spec.steps, str | bytes) or not isinstance(spec.steps, Sequence):
            raise ChainSpecError("steps", "must be a list of StepSpec")
        if not spec.steps:
            raise ChainSpecError("steps", "must not be empty")
        if len(spec.steps) > MAX_STEPS:
            raise ChainSpecError("steps", f"has {len(spec.steps)} steps, more than {MAX_STEPS}")
        for i, step in enumerate(spec.steps):
            if not _step_ok(step):
                _validate_step(step, f"steps[{i}]")
    else:
        _check_name(spec.command, "command")
        if spec.command not in _COMMANDS:
            raise ChainSpecError("command", f"no command registered as {spec.command!r}")
    _check_positive(spec.deadline_s, "deadline_s")
    _check_positive(spec.task_timeout_s, "task_timeout_s")
    if spec.chain_id is not None:
        _check_name(spec.chain_id, "chain_id")
    return spec
