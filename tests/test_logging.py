"""Logging: every record about a chain names its chain, pool and task as record attributes
(so a log pipeline can filter on them without parsing text), and no module prints outside the
command-line entry points."""

from __future__ import annotations

import ast
import logging
import random
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import FAST, WAIT, EndLog, wait_until

from actors._chain import ChainState
from actors._faults import InjectedFault
from actors._loadtest import pool_ids
from actors._runtime import ChainResult, Runtime, RuntimeOptions
from actors._spec import ChainSpec, Command, StepResult, StepSpec, register_command
from spm._simulator import SimulatedSpm

REPO = Path(__file__).resolve().parents[1]
RUNTIME_LOGGERS = ("actors.", "spmchain.")
"""Loggers of the runtime (module loggers of ``actors``, and the store's ``spmchain.store``)."""

CLI_MODULES = {
    "actors/_cli.py", "actors/_loadtest.py", "actors/_chaos.py", "actors/_engine.py",
    "actors/_inspect.py", "spm/_serve.py",
}
"""The command-line entry points: the only modules that may print."""


def uuid_from(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


@dataclass
class Known:
    """What the records are checked against: each chain's pool and the tasks it fired."""

    pools: dict[str, str] = field(default_factory=dict)  # chain id -> pool
    tasks: dict[str, tuple[str, str]] = field(default_factory=dict)  # task id -> (chain, pool)

    def add_state(self, state: ChainState) -> None:
        self.pools[state.chain_id] = state.spec.pool
        for rec in state.steps:
            for tid in (rec.task_id, rec.revert_task_id, *rec.old_revert_task_ids):
                if tid:
                    self.tasks[tid] = (state.chain_id, state.spec.pool)

    def add_results(self, results: Iterable[ChainResult]) -> None:
        for r in results:
            self.add_state(r.state)


def where(record: logging.LogRecord) -> str:
    try:
        path = Path(record.pathname).resolve().relative_to(REPO)
    except ValueError:
        path = Path(record.pathname)
    return f"{path}:{record.lineno}"


def runtime_records(records: Sequence[logging.LogRecord]) -> list[logging.LogRecord]:
    return [r for r in records if r.name.startswith(RUNTIME_LOGGERS)]


def problems_with(records: Sequence[logging.LogRecord], known: Known) -> tuple[list[str], int]:
    """Records that mention a known chain or task but do not carry it as attributes.

    Returns one line per offending log call (``file:line level message: what is missing``) and
    how many records mentioned a known chain or task at all.
    """
    found: dict[str, str] = {}
    about = 0
    for record in runtime_records(records):
        text = record.getMessage()
        want: dict[str, str] = {}
        for chain_id, pool in known.pools.items():
            if chain_id in text:
                want.update(chain_id=chain_id, pool=pool)
        args = record.args if isinstance(record.args, tuple) else ()
        for task_id, (_chain_id, pool) in known.tasks.items():
            # A task the call names (an argument of its own, or in a message built beforehand),
            # not one quoted inside another argument such as a chain's failure reason.
            if task_id in args or (not args and task_id in text):
                want.update(task_id=task_id, pool=pool)
        if not want:
            continue
        about += 1
        wrong = [f"{k}={getattr(record, k, None)!r} (want {v!r})" for k, v in want.items()
                 if getattr(record, k, None) != v]
        if wrong:
            found.setdefault(where(record),
                             f"{where(record)} {record.levelname} {text!r}: {', '.join(wrong)}")
    return sorted(found.values()), about


def assert_records_carry_their_chain(records: Sequence[logging.LogRecord], known: Known,
                                     at_least: int) -> None:
    problems, about = problems_with(records, known)
    assert about >= at_least, (
        f"only {about} runtime log records mention the test's chains or tasks; expected at least "
        f"{at_least}"
    )
    assert not problems, (
        "log records about a chain without chain_id/pool/task_id attributes (extra=):\n  "
        + "\n  ".join(problems)
    )


@pytest.fixture
def caplog_debug(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.DEBUG)
    yield caplog


def failing_chain(chain_id: str, pool: str, rng: random.Random) -> ChainSpec:
    """Step 0 creates a volume, step 1 one on a missing parent: its task fails (201) on the SPM
    and step 0 is reverted."""
    sd, img, vol, ghost, vol2 = (uuid_from(rng) for _ in range(5))
    base = {"sdUUID": sd, "spUUID": pool, "imgUUID": img}
    return ChainSpec(
        pool=pool, command_type="log_failing", chain_id=chain_id,
        steps=[
            StepSpec("createVolume", {**base, "volUUID": vol, "size": 1 << 30},
                     revert_verb="deleteVolume", revert_params={**base, "volUUID": vol}),
            StepSpec("createVolume", {**base, "volUUID": vol2, "srcImgUUID": img,
                                      "srcVolUUID": ghost},
                     revert_verb="deleteVolume", revert_params={**base, "volUUID": vol2}),
        ],
    )


def volume_chain(chain_id: str, pool: str, rng: random.Random, steps: int = 2) -> ChainSpec:
    sd, img = uuid_from(rng), uuid_from(rng)
    specs = []
    prev = None
    for _ in range(steps):
        vol = uuid_from(rng)
        params = {"sdUUID": sd, "spUUID": pool, "imgUUID": img, "volUUID": vol}
        if prev is not None:
            params.update(srcImgUUID=img, srcVolUUID=prev)
        specs.append(StepSpec("createVolume", params, revert_verb="deleteVolume",
                              revert_params={"sdUUID": sd, "spUUID": pool, "imgUUID": img,
                                             "volUUID": vol}))
        prev = vol
    return ChainSpec(pool=pool, command_type="log_volumes", chain_id=chain_id, steps=specs)


@register_command("tests.logging.end_step_raises")
class _EndStepRaises(Command):
    """One createVolume step whose end_step hook raises: the chain fails and reverts it."""

    def next_step(self, results: Sequence[StepResult]) -> StepSpec | None:
        if results:
            return None
        return StepSpec("createVolume", dict(self.params["step"]),
                        revert_verb="deleteVolume", revert_params=dict(self.params["revert"]))

    def end_step(self, result: StepResult) -> None:
        raise RuntimeError("end_step refused by the test")


def test_records_about_a_failing_chain_carry_chain_id_pool_and_task_id(
    caplog_debug: pytest.LogCaptureFixture, seed: int
) -> None:
    rng = random.Random(seed)
    (pool,) = pool_ids(1, seed)
    spm = SimulatedSpm(pool)
    with Runtime({pool: spm}, RuntimeOptions(**FAST), store="memory") as rt:
        ends = EndLog(rt)
        rt.submit(failing_chain("logtest-failing", pool, rng))
        step = dict(volume_chain("x", pool, rng, 1).steps[0].params)  # type: ignore[index]
        revert = {k: step[k] for k in ("sdUUID", "spUUID", "imgUUID", "volUUID")}
        rt.submit({"pool": pool, "command_type": "log_hook", "chain_id": "logtest-hook",
                   "command": "tests.logging.end_step_raises",
                   "params": {"step": step, "revert": revert}})
        results = ends.wait(2)
    assert {r.outcome for r in results} == {"ended_with_failure"}
    known = Known()
    known.add_results(results)
    # At least: each chain's end, the hook that raised, each task fired (DEBUG).
    assert_records_carry_their_chain(caplog_debug.records, known, at_least=3)


def test_records_about_a_cancelled_chain_and_its_stopped_task_carry_their_ids(
    caplog_debug: pytest.LogCaptureFixture, seed: int
) -> None:
    rng = random.Random(seed)
    (pool,) = pool_ids(1, seed)
    spm = SimulatedSpm(pool, durations={"createVolume": 10.0})
    with Runtime({pool: spm}, RuntimeOptions(**FAST), store="memory") as rt:
        handle = rt.submit(volume_chain("logtest-cancelled", pool, rng))
        wait_until(lambda: any(s.current and s.current.task_id for s in rt.chains()),
                   "the first task fired")
        handle.cancel("the operator cancelled it")
        result = handle.result(WAIT)
    assert result.outcome == "ended_with_failure"
    known = Known()
    known.add_state(result.state)
    # At least: the task fired, its stop, the chain's end.
    assert_records_carry_their_chain(caplog_debug.records, known, at_least=3)


def test_records_about_chains_recovered_after_an_interrupted_run_carry_their_ids(
    caplog_debug: pytest.LogCaptureFixture, tmp_path: Path, seed: int
) -> None:
    """The SPM restarted without its tasks (they are lost): recovery says so for each chain."""
    rng = random.Random(seed)
    (pool,) = pool_ids(1, seed)
    path = tmp_path / "snapshots.sqlite"
    first = SimulatedSpm(pool, durations=10.0)
    rt = Runtime({pool: first}, RuntimeOptions(**FAST), store=path).start()
    try:
        for i in range(3):
            rt.submit(volume_chain(f"logtest-recovered-{i}", pool, rng))
        wait_until(lambda: len(rt.chains()) == 3 and all(
            s.current is not None and s.current.task_id for s in rt.chains()),
            "every chain's first task fired")
        known = Known()
        for state in rt.chains():
            known.add_state(state)
        rt.flush()
    finally:
        rt.stop()
    caplog_debug.clear()
    with Runtime({pool: SimulatedSpm(pool)}, RuntimeOptions(**FAST), store=path) as rt2:
        results = [h.result(WAIT) for h in rt2.recovered]
    assert len(results) == 3
    known.add_results(results)
    # At least: each chain's task unknown to the SPM, and its end.
    assert_records_carry_their_chain(caplog_debug.records, known, at_least=6)


def test_records_about_a_crashed_and_restarted_chain_actor_carry_its_chain(
    caplog_debug: pytest.LogCaptureFixture, seed: int
) -> None:
    rng = random.Random(seed)
    (pool,) = pool_ids(1, seed)
    options = RuntimeOptions(**{**FAST, "fault_rates": {"command": 0.2}, "fault_seed": seed})
    with Runtime({pool: SimulatedSpm(pool)}, options, store="memory") as rt:
        ends = EndLog(rt)
        for i in range(5):
            rt.submit(volume_chain(f"logtest-crash-{i}", pool, rng, 3))
        results = ends.wait(5)
    known = Known()
    known.add_results(results)
    crashes = [r for r in runtime_records(caplog_debug.records)
               if r.exc_info and isinstance(r.exc_info[1], InjectedFault)]
    assert crashes, "no command actor crashed; raise the fault rate"
    by_call = {
        where(r): f"{where(r)} {r.levelname} {r.getMessage()!r}: chain_id="
                  f"{getattr(r, 'chain_id', None)!r}, pool={getattr(r, 'pool', None)!r}"
        for r in crashes
        if getattr(r, "chain_id", None) not in known.pools or getattr(r, "pool", None) != pool
    }
    problems = sorted(by_call.values())
    mentioned, about = problems_with(caplog_debug.records, known)
    assert about >= 5
    problems += mentioned
    assert not problems, (
        "records about a crashed and restarted chain actor without the chain's "
        "chain_id/pool (extra=):\n  " + "\n  ".join(problems)
    )


LOG_METHODS = {"debug", "info", "warning", "error", "exception", "critical"}
NEEDS = {"chain %s": "chain_id", "task %s": "task_id"}
"""What a message naming a chain or a task must carry as record attributes (and ``pool`` too
when the message names the pool; a chain whose snapshot does not decode has no known pool)."""


def log_calls_missing_extra(path: Path) -> list[str]:
    """Log calls of ``path`` whose message names a chain (``chain %s``) or a task (``task %s``)
    and whose literal ``extra=`` lacks the matching keys (or that pass no ``extra`` at all).
    A non-literal ``extra`` is trusted."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in LOG_METHODS and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)):
            continue
        text = node.args[0].value
        needed = {key for marker, key in NEEDS.items() if marker in text}
        if not needed:
            continue
        if "pool %s" in text:
            needed.add("pool")
        extra = next((k.value for k in node.keywords if k.arg == "extra"), None)
        if extra is not None and not isinstance(extra, ast.Dict):
            continue
        given = set() if extra is None else {
            k.value for k in extra.keys if isinstance(k, ast.Constant)
        }
        missing = sorted(needed - given)
        if missing:
            out.append(f"{path.relative_to(REPO).as_posix()}:{node.lineno} {text!r} "
                       f"lacks {', '.join(missing)}")
    return out


def test_every_log_call_naming_a_chain_or_task_passes_them_as_extra() -> None:
    """The static side of the checks above: also the log calls no test run reaches."""
    offenders = [line for path in sorted((REPO / "actors").rglob("*.py"))
                 for line in log_calls_missing_extra(path)]
    assert offenders == [], "log calls without extra= for their chain/task:\n  " + \
        "\n  ".join(offenders)


def prints_in(path: Path) -> list[int]:
    """Lines of ``path`` that call the builtin ``print``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return sorted(
        node.lineno for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
        and node.func.id == "print"
    )


def test_no_print_outside_the_command_line_modules() -> None:
    offenders = []
    checked = 0
    for package in ("actors", "spm", "metrics"):
        for path in sorted((REPO / package).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            if rel in CLI_MODULES:
                continue
            checked += 1
            offenders += [f"{rel}:{line}" for line in prints_in(path)]
    assert checked > 10, "found too few modules to check"
    assert offenders == [], f"print() outside the CLI modules: {offenders}"


def test_the_print_check_finds_a_print(tmp_path: Path) -> None:
    sample = tmp_path / "m.py"
    sample.write_text("import sys\n\ndef f():\n    print('x', file=sys.stderr)\n")
    assert prints_in(sample) == [4]


def test_runtime_modules_log_through_named_loggers_not_the_root_logger() -> None:
    """``logging.info(...)`` goes to the root logger and loses the module's name."""
    offenders = []
    for package in ("actors", "spm", "metrics"):
        for path in sorted((REPO / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and isinstance(node.func.value, ast.Name)
                        and node.func.value.id == "logging"
                        and node.func.attr in {"debug", "info", "warning", "error",
                                               "exception", "critical", "log"}):
                    offenders.append(f"{path.relative_to(REPO).as_posix()}:{node.lineno}")
    assert offenders == [], offenders

