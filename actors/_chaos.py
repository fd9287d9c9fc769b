"""``spmchain chaos``: kill the engine at random moments and check that no chain was harmed.

The run, all of it decided by ``--seed``:

1. ``spmchain spm serve`` starts as a subprocess on 127.0.0.1 (a free port) with a state
   directory, serving ``--pools`` simulated SPMs whose tasks take ``--task-ms``;
2. ``spmchain engine`` (:mod:`actors._engine`) starts as a subprocess on a snapshot store in the
   work directory, and is SIGKILLed ``--kills`` times, started again after each kill. The
   moments are spread over the run: the first kill lands while the engine submits the
   workload, the second soon after a start (imports, store, recovery), the rest either soon
   after a start or when the workload's progress (steps recorded as done in the store) passes
   a target drawn from the seed, the targets rising from kill to kill so that the kills land
   throughout the run. ``--failovers`` times, just before a kill, one pool (drawn from the
   seed) loses the SPM role (``StoragePool.spmStop``) and takes it back a moment later
   (``spmStart``: its unfinished tasks are aborted and rolled back, as VDSM does);
3. after the last kill the engine runs until every chain ended (``--timeout``); an engine that
   exits non-zero on its own (a supervisor escalation under ``--actor-fault-rate``) is counted
   and started again, a few times at most;
4. the checks (:func:`check_invariants`), from the store (read-only) and the simulator's ledger
   and task lists over the wire: every chain of the workload ended (``lost`` 0), no effect
   applied twice (``duplicated_effects``), no task left on any SPM (``uncleared_tasks``),
   nothing left on the storage by a chain that ended with failure (``leftover_effects``), and
   every volume of a chain that ended successfully still there (``missing_effects``).

The exit status is 0 only when every check holds. Every subprocess is stopped by its pid when
the run ends, however it ends (an error, Ctrl-C, SIGTERM); on Linux the subprocesses are also
told to die with this process. The work directory (logs, store, SPM state) is removed after a
clean run unless ``--keep``, and kept (its path printed) when a check failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any, TextIO

from actors._chain import ENDED_SUCCESSFULLY, ENDED_WITH_FAILURE, step_fields
from actors._cli import (
    _count,
    _positive_float,
    _positive_int,
    _rate,
    report_path_problem,
    write_json,
)
from actors._engine import workload
from actors._snapshot import SnapshotError, decode_snapshot
from actors._spec import ChainSpec
from actors._store import StoredSnapshot, StoreError
from actors._store_sqlite import open_readonly
from spm._errors import SpmError

__all__ = [
    "ChaosConfig",
    "ChaosError",
    "RoundPlan",
    "add_arguments",
    "check_invariants",
    "plan_rounds",
    "run",
    "run_chaos",
    "summary_table",
]

_REPO = Path(__file__).resolve().parent.parent

INVARIANTS = ("lost", "duplicated_effects", "uncleared_tasks", "leftover_effects",
              "missing_effects")
"""The report's counts that must all be 0 (and ``ended`` must equal ``chains``)."""

ENGINE_RETRIES = 3
"""How many times the last engine run is started again after it exited non-zero by itself."""

ROUND_ATTEMPTS = 3
"""How many engine starts a kill may take when the engine exits before its moment."""

STALL_S = 30.0
"""A kill waiting for progress that does not move for this long is delivered anyway."""


class ChaosError(Exception):
    """The chaos run could not be carried out (not: an invariant failed). Exit status 2."""


@dataclass(slots=True)
class ChaosConfig:
    chains: int = 500
    steps: int = 5
    pools: int = 4
    kills: int = 20
    failovers: int = 0
    seed: int = 1
    actor_fault_rate: float = 0.0
    fail_rate: float = 0.0
    task_ms: float = 2.0
    poll_min_ms: float = 20.0
    poll_max_ms: float = 1000.0
    max_outstanding: int = 100
    orphan_grace_ms: float = 2000.0
    timeout_s: float = 600.0
    workdir: str | None = None
    keep: bool = False
    verbose: bool = False


# ----------------------------------------------------------------------------------------------
# The checks


def _step_volumes(spec: ChainSpec) -> list[tuple[str, str, str]]:
    return [(str(s.params["sdUUID"]), str(s.params["imgUUID"]), str(s.params["volUUID"]))
            for s in spec.steps or ()]


def _describe_live(state: Mapping[str, Any]) -> str:
    steps = [step_fields(s) for s in state.get("steps") or []]
    where = ", ".join(
        f"step {s.get('index')} {s.get('status')}"
        + (f" revert {s.get('revert_status')}" if s.get("revert_status") else "")
        for s in steps[-2:]
    )
    return f"not ended: phase {state.get('phase')}" + (f" ({where})" if where else "")


def check_invariants(
    chains: Sequence[ChainSpec],
    rows: Iterable[StoredSnapshot],
    ledgers: Mapping[str, Mapping[str, Any]],
    task_lists: Mapping[str, Mapping[str, Any]],
    quarantined: Iterable[str] = (),
) -> dict[str, Any]:
    """Check a finished run: ``chains`` the workload, ``rows`` the store's snapshots,
    ``ledgers`` each pool's ``Simulator.getLedger`` answer, ``task_lists`` each pool's
    ``getAllTasksStatuses`` answer, ``quarantined`` the ids of quarantined snapshots.

    Returns the counts (``chains``, ``ended``, ``ended_successfully``, ``ended_with_failure``,
    ``lost``, ``duplicated_effects``, ``uncleared_tasks``, ``leftover_effects``,
    ``missing_effects``), a few examples of each violation (``lost_chains``, ``duplicates``,
    ``uncleared``, ``leftover``, ``missing``), ``violations`` (one sentence each) and ``ok``.
    A chain is lost when the store does not hold it, its snapshot does not decode or was
    quarantined, or it has not ended. An object is left over when it is in the image of a
    chain that ended with failure; an effect is missing when a volume a chain that ended
    successfully created is not on the storage.
    """
    by_id: dict[str, dict[str, Any] | str] = {}
    for row in rows:
        try:
            by_id[row.chain_id] = decode_snapshot(row.blob)
        except SnapshotError as exc:
            by_id[row.chain_id] = f"snapshot does not decode: {exc}"
    for chain_id in quarantined:
        by_id.setdefault(chain_id, "snapshot quarantined")
    lost: dict[str, str] = {}
    succeeded: list[ChainSpec] = []
    failed: list[ChainSpec] = []
    for spec in chains:
        assert spec.chain_id is not None
        state = by_id.get(spec.chain_id)
        if state is None:
            lost[spec.chain_id] = "missing from the store"
        elif isinstance(state, str):
            lost[spec.chain_id] = state
        elif state.get("phase") != "ended":
            lost[spec.chain_id] = _describe_live(state)
        elif state.get("outcome") == ENDED_SUCCESSFULLY:
            succeeded.append(spec)
        elif state.get("outcome") == ENDED_WITH_FAILURE:
            failed.append(spec)
        else:
            lost[spec.chain_id] = f"ended with an unknown outcome {state.get('outcome')!r}"
    duplicated = 0
    duplicates: list[Any] = []
    volumes: set[tuple[str, str, str]] = set()
    objects: list[Mapping[str, Any]] = []
    for pool in sorted(ledgers):
        ledger = ledgers[pool]
        duplicated += int(ledger.get("duplicated_effects", 0))
        duplicates.extend(ledger.get("duplicates", [])[:5])
        for obj in ledger.get("objects", []):
            objects.append(obj)
            if obj.get("kind") == "volume":
                volumes.add((obj["sd_uuid"], obj["img_uuid"], obj["vol_uuid"]))
    failed_images = {(str(s.params["sdUUID"]), str(s.params["imgUUID"])): s.chain_id
                     for s in failed}
    leftover = [
        {"chain_id": failed_images[(o["sd_uuid"], o["img_uuid"])], "kind": o.get("kind"),
         "vol_uuid": o.get("vol_uuid"), "task_id": o.get("task_id")}
        for o in objects if (o.get("sd_uuid"), o.get("img_uuid")) in failed_images
    ]
    missing = [
        {"chain_id": s.chain_id, "step": k, "vol_uuid": vol}
        for s in succeeded
        for k, (sd, img, vol) in enumerate(_step_volumes(s))
        if (sd, img, vol) not in volumes
    ]
    uncleared = [(pool, tid) for pool in sorted(task_lists) for tid in task_lists[pool]]
    report: dict[str, Any] = {
        "chains": len(chains),
        "ended": len(succeeded) + len(failed),
        "ended_successfully": len(succeeded),
        "ended_with_failure": len(failed),
        "lost": len(lost),
        "duplicated_effects": duplicated,
        "uncleared_tasks": len(uncleared),
        "leftover_effects": len(leftover),
        "missing_effects": len(missing),
        "lost_chains": dict(sorted(lost.items())[:20]),
        "duplicates": duplicates[:20],
        "uncleared": [{"pool": p, "task_id": t, "status": task_lists[p][t]}
                      for p, t in uncleared[:20]],
        "leftover": leftover[:20],
        "missing": missing[:20],
    }
    violations: list[str] = []
    if lost:
        violations.append(f"{len(lost)} chains lost (not ended, or not in the store)")
    if duplicated:
        violations.append(f"{duplicated} effects applied twice")
    if uncleared:
        violations.append(f"{len(uncleared)} tasks left uncleared on the SPMs")
    if leftover:
        violations.append(f"{len(leftover)} objects left by chains that ended with failure")
    if missing:
        violations.append(f"{len(missing)} volumes of chains that ended successfully are "
                          "missing from the storage")
    if report["ended"] != len(chains) and not lost:  # pragma: no cover - lost covers it
        violations.append(f"{report['ended']} of {len(chains)} chains ended")
    report["violations"] = violations
    report["ok"] = not violations
    return report


# ----------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True, slots=True)
class RoundPlan:
    """When one engine run is killed, and the failovers done just before.

    ``trigger``: ``submit`` (``delay_s`` after the engine said it recovered, i.e. while it
    submits), ``start`` (``delay_s`` times the time an engine takes to recover, after it was
    started) or ``progress`` (when the store shows this kill's share of the steps left done:
    the steps left split evenly between the progress kills left and the last run, times
    ``target``; then ``delay_s`` more); ``None`` for the last run, which is not killed.
    ``failovers``: (pool index, seconds without an SPM, seconds to wait before it) each, run
    one after the other from the kill's moment on, while the engine is killed and the next
    one starts.
    """

    trigger: str | None
    delay_s: float = 0.0
    target: float = 0.0
    failovers: tuple[tuple[int, float, float], ...] = ()


def plan_rounds(kills: int, failovers: int, pools: int, chains: int,
                seed: int) -> list[RoundPlan]:
    """``kills`` kill rounds and the last run, decided by ``seed`` alone."""
    rng = random.Random(f"chaos-{seed}")
    triggers: list[str] = []
    for i in range(kills):
        if i == 0:
            triggers.append("submit")
        elif i == 1:
            triggers.append("start")
        else:
            triggers.append("start" if rng.random() < 0.2 else "progress")
    factors = iter([rng.uniform(0.5, 1.5) for t in triggers if t == "progress"])
    per_round: list[list[tuple[int, float, float]]] = [[] for _ in range(kills + 1)]
    for _ in range(failovers):
        where = rng.randrange(kills) if kills else 0
        per_round[where].append(
            (rng.randrange(pools), rng.uniform(0.05, 0.5), rng.uniform(0.0, 0.5))
        )
    submit_s = max(0.05, 0.0006 * chains)  # about what submitting ``chains`` takes
    plans: list[RoundPlan] = []
    for i, trigger in enumerate(triggers):
        fo = tuple(per_round[i])
        if trigger == "submit":
            plans.append(RoundPlan("submit", rng.uniform(0.0, submit_s), 0.0, fo))
        elif trigger == "start":
            plans.append(RoundPlan("start", rng.uniform(0.0, 1.0), 0.0, fo))
        else:
            plans.append(RoundPlan("progress", rng.uniform(0.0, 0.05), next(factors), fo))
    plans.append(RoundPlan(None, rng.uniform(0.1, 1.0), 0.0, tuple(per_round[kills])))
    return plans


# ----------------------------------------------------------------------------------------------
# Subprocesses


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: SIGKILL this child when the process that started it dies."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001, S110 - best effort; the parent stops children anyway
        pass


class _Child:
    """A subprocess whose stdout lines are copied to its log with their time and watched."""

    def __init__(self, name: str, argv: list[str], log_path: Path, cwd: Path,
                 env: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.log_path = log_path
        environ = dict(os.environ)
        environ["PYTHONPATH"] = str(_REPO) + (os.pathsep + environ["PYTHONPATH"]
                                              if environ.get("PYTHONPATH") else "")
        environ.pop("SPMCHAIN_CRASH_AT", None)  # crash points are for the crash tests
        environ.update(env or {})
        self._log: IO[str] = open(log_path, "a", encoding="utf-8")  # noqa: SIM115
        self._log.write(f"--- {name}: {' '.join(argv)}\n")
        self._log.flush()
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._log,
            cwd=str(cwd), env=environ, text=True, start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        self.pid = self.proc.pid
        self.lines: list[tuple[float, str]] = []
        self.fired = 0  # the engine's latest "progress N steps fired" line
        self._cond = threading.Condition()
        self._eof = False
        self._reader = threading.Thread(target=self._read, name=f"chaos-{name}-stdout",
                                        daemon=True)
        self._reader.start()

    def _read(self) -> None:
        stdout = self.proc.stdout
        assert stdout is not None
        for line in stdout:
            at = time.monotonic() - self.started_at
            text = line.rstrip("\n")
            with self._cond:
                if text.startswith("progress "):
                    with contextlib.suppress(ValueError, IndexError):
                        self.fired = int(text.split()[1])
                    continue  # frequent; not kept, not logged
                self.lines.append((at, text))
                self._cond.notify_all()
            with contextlib.suppress(ValueError):
                self._log.write(f"[{at:8.3f}] {text}\n")
                self._log.flush()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def line_at(self, prefix: str) -> float | None:
        """When (seconds after the start) the child printed a line starting with ``prefix``."""
        with self._cond:
            for at, text in self.lines:
                if text.startswith(prefix):
                    return at
        return None

    def wait_line(self, prefix: str, timeout: float,
                  stop: threading.Event | None = None) -> float | None:
        """Wait for a line starting with ``prefix``; None at EOF, after ``timeout``, or as soon
        as ``stop`` is set."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for at, text in self.lines:
                    if text.startswith(prefix):
                        return at
                left = deadline - time.monotonic()
                if self._eof or left <= 0 or (stop is not None and stop.is_set()):
                    return None
                self._cond.wait(min(left, 0.1))

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL by pid (if still running) and reap."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(30)
        self._finish()

    def terminate(self, timeout: float = 10.0) -> None:
        """SIGTERM by pid, then SIGKILL after ``timeout``; reap."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                return
        self._finish()

    def wait(self, timeout: float) -> int | None:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self._finish()
        return code

    def _finish(self) -> None:
        self._reader.join(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if not self._log.closed:
            self._log.write(f"--- {self.name} exited: {self.proc.returncode}\n")
            self._log.close()

    def tail(self, n: int = 5) -> list[str]:
        """The last ``n`` lines of the child's log (its stderr and stdout)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        return [ln for ln in text.splitlines() if ln.strip()][-n:]


class _Children:
    """Every subprocess the run started; :meth:`stop_all` stops each by its pid."""

    def __init__(self) -> None:
        self.items: list[_Child] = []

    def start(self, name: str, argv: list[str], log_path: Path, cwd: Path) -> _Child:
        child = _Child(name, argv, log_path, cwd)
        self.items.append(child)
        return child

    def stop_all(self) -> None:
        # Engines first (SIGKILL is what they are built for), the SPM last and gently.
        for child in sorted(self.items, key=lambda c: c.name == "spm"):
            try:
                if child.name == "spm":
                    child.terminate()
                else:
                    child.kill()
            except Exception:  # noqa: BLE001 - go on stopping the others
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGKILL)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "actors._cli", *args]


# ----------------------------------------------------------------------------------------------
# The run


def _progress(store: Path, ids: set[str], steps: int) -> float:
    """The fraction of the workload's steps the store shows done (an ended chain counts all
    its steps); 0 while the store does not exist yet."""
    if not ids or not store.exists():
        return 0.0
    try:
        reader = open_readonly(store)
    except StoreError:
        return 0.0
    done = 0
    try:
        for row in reader.load_all():
            if row.chain_id not in ids:
                continue
            if row.ended:
                done += steps
                continue
            try:
                state = decode_snapshot(row.blob)
            except SnapshotError:
                continue
            done += sum(1 for s in state.get("steps", ())
                        if step_fields(s).get("status") == "succeeded")
    except StoreError:
        pass
    finally:
        reader.close()
    return done / (len(ids) * steps)


class _Run:
    """One chaos run's state: the work directory, the SPM, the engine runs, the log."""

    def __init__(self, cfg: ChaosConfig, out: TextIO, workdir: Path,
                 stop: threading.Event | None = None) -> None:
        self.cfg = cfg
        self.out = out
        self.workdir = workdir
        self.store = workdir / "snapshots.sqlite"
        self.children = _Children()
        self.stop = stop or threading.Event()
        self.url = ""
        self.pools: list[str] = []
        self.clients: dict[str, Any] = {}
        self.engine_runs = 0
        self.engine_failures: list[dict[str, Any]] = []
        self.kills: list[dict[str, Any]] = []
        self.failovers: list[dict[str, Any]] = []
        self.kills_missed = 0
        self.failover_errors: list[str] = []
        self.ids: set[str] = set()
        self.t0 = time.monotonic()
        self.startup_s = 1.0
        self.progress_at_start = 0.0

    def check_stop(self) -> None:
        """Raise KeyboardInterrupt here, at a safe point, when the run was told to stop."""
        if self.stop.is_set():
            raise KeyboardInterrupt

    def sleep(self, seconds: float) -> None:
        """Wait ``seconds``; KeyboardInterrupt at once when the run is told to stop."""
        self.stop.wait(seconds)
        self.check_stop()

    def wait_exit(self, child: _Child, timeout: float) -> int | None:
        """Wait for ``child`` to exit (None after ``timeout``), watching for a stop."""
        deadline = time.monotonic() + timeout
        while True:
            code = child.wait(max(0.0, min(0.1, deadline - time.monotonic())))
            if code is not None:
                return code
            self.check_stop()
            if time.monotonic() >= deadline:
                return None

    def say(self, text: str) -> None:
        self.out.write(f"chaos [{time.monotonic() - self.t0:7.2f}s] {text}\n")
        self.out.flush()

    # -- the SPM ---------------------------------------------------------------------------

    def start_spm(self) -> None:
        cfg = self.cfg
        spm = self.children.start("spm", _cli(
            "spm", "serve", "--listen", "127.0.0.1:0", "--pools", str(cfg.pools),
            "--state-dir", str(self.workdir / "spm-state"), "--task-ms", f"{cfg.task_ms:g}",
            "--fail-rate", f"{cfg.fail_rate:g}", "--seed", str(cfg.seed),
        ), self.workdir / "spm.log", self.workdir)
        if spm.wait_line("listening on", 60.0, self.stop) is None:
            self.check_stop()
            raise ChaosError("the simulated SPM did not start: " + " | ".join(spm.tail()))
        line = next(text for _, text in spm.lines if text.startswith("listening on"))
        match = re.search(r"(stomp://\S+) pools (\S+)", line)
        if match is None:
            raise ChaosError(f"the simulated SPM said {line!r}, not its address")
        self.url = match.group(1)
        self.pools = match.group(2).split(",")[: cfg.pools]
        from spm._stomp_client import client_for_url

        self.clients = {p: client_for_url(self.url, p) for p in self.pools}
        self.say(f"SPM (pid {spm.pid}) at {self.url}, pools {', '.join(self.pools)}")

    def failover(self, pool_index: int, down_s: float, round_no: int) -> None:
        """Take the SPM role of one pool away for ``down_s`` seconds, then give it back."""
        pool = self.pools[pool_index % len(self.pools)]
        client = self.clients[pool]
        at = time.monotonic() - self.t0
        client.spmStop()
        try:
            self.stop.wait(down_s)
        finally:
            client.spmStart()
        self.failovers.append({"round": round_no, "pool": pool, "at_s": round(at, 3),
                               "down_s": round(down_s, 3)})
        self.say(f"failover: pool {pool} without an SPM for {down_s:.2f} s")

    def start_failovers(self, plan: RoundPlan, round_no: int) -> threading.Thread | None:
        """Run the round's failovers on a thread of their own, from now on: each waits its gap,
        takes a pool's SPM role away, gives it back. The engine is killed meanwhile, as
        planned, so kills land while a pool has no SPM and recoveries meet one that has none.
        An error is recorded (and fails the run after the checks), never left pending."""
        if not plan.failovers:
            return None

        def run_them() -> None:
            try:
                for pool_index, down_s, gap_s in plan.failovers:
                    if self.stop.wait(gap_s):
                        return
                    self.failover(pool_index, down_s, round_no)
            except Exception as exc:  # noqa: BLE001 - reported by run_chaos
                self.failover_errors.append(f"{type(exc).__name__}: {exc}")

        thread = threading.Thread(target=run_them, name=f"chaos-failover-{round_no}",
                                  daemon=True)
        thread.start()
        return thread

    # -- the engine ------------------------------------------------------------------------

    def start_engine(self) -> _Child:
        cfg = self.cfg
        self.engine_runs += 1
        argv = _cli(
            "engine", "--spm", self.url, "--store", str(self.store),
            "--chains", str(cfg.chains), "--steps", str(cfg.steps), "--pools", str(cfg.pools),
            "--seed", str(cfg.seed), "--actor-fault-rate", f"{cfg.actor_fault_rate:g}",
            "--poll-min-ms", f"{cfg.poll_min_ms:g}", "--poll-max-ms", f"{cfg.poll_max_ms:g}",
            "--max-outstanding", str(cfg.max_outstanding), "--timeout", f"{cfg.timeout_s:g}",
            "--orphan-grace-ms", f"{cfg.orphan_grace_ms:g}", "--progress-ms", "20",
        )
        if cfg.verbose:
            argv.append("-v")
        return self.children.start(f"engine-{self.engine_runs}", argv,
                                   self.workdir / f"engine-{self.engine_runs:03d}.log",
                                   self.workdir)

    def _phase(self, engine: _Child) -> str:
        if engine.line_at("submitted") is not None:
            return "running"
        if engine.line_at("recovered") is not None:
            return "submitting"
        return "starting"

    def _wait_trigger(self, engine: _Child, plan: RoundPlan, progress_kills_left: int,
                      start_scale_s: float) -> str | None:
        """Wait for the plan's moment; the trigger that fired, or None if the engine exited.
        A ``start`` kill lands ``delay_s`` times ``start_scale_s`` after the start."""
        if plan.trigger == "start":
            deadline = engine.started_at + plan.delay_s * start_scale_s
            while time.monotonic() < deadline:
                if not engine.alive():
                    return None
                self.sleep(min(0.01, max(0.0, deadline - time.monotonic())))
            return "start"
        if plan.trigger == "submit":
            if engine.wait_line("recovered", 120.0, self.stop) is None:
                self.check_stop()
                return None
            self.sleep(plan.delay_s)
            return "submit" if engine.alive() else None
        # This kill's share of the work left: the work left split between the progress kills
        # left and the last run, times the plan's factor; so the kills spread over the whole
        # run whatever the pace, and the last run still has work to do. Progress is what the
        # store showed when this engine started plus the steps it fired since (its progress
        # lines: the store itself is too slow to read to catch a moment).
        p0 = self.progress_at_start
        share = (1.0 - p0) * plan.target / (progress_kills_left + 2)
        total = max(1, len(self.ids) * self.cfg.steps)
        last, last_change = -1, time.monotonic()
        while True:
            if not engine.alive():
                return None
            fired = engine.fired
            if p0 >= 1.0 or fired / total >= share:
                break
            if fired != last:
                last, last_change = fired, time.monotonic()
            elif time.monotonic() - last_change > STALL_S:
                self.say(f"no step fired for {STALL_S:g} s; killing anyway")
                return "stalled"
            self.sleep(0.01)
        self.sleep(plan.delay_s)
        return "progress"

    def kill_round(self, round_no: int, plan: RoundPlan, progress_kills_left: int) -> None:
        scale = self.startup_s
        failovers: threading.Thread | None = None
        for _ in range(ROUND_ATTEMPTS):
            self.progress_at_start = _progress(self.store, self.ids, self.cfg.steps)
            engine = self.start_engine()
            fired = self._wait_trigger(engine, plan, progress_kills_left, scale)
            if fired is not None and failovers is None:
                failovers = self.start_failovers(plan, round_no)
            if fired is not None and engine.alive():
                at = time.monotonic() - engine.started_at
                phase = self._phase(engine)
                engine.kill()
                progress = _progress(self.store, self.ids, self.cfg.steps)
                self.kills.append({"round": round_no, "pid": engine.pid, "trigger": fired,
                                   "phase": phase, "at_s": round(at, 3),
                                   "progress": round(progress, 3)})
                self.say(f"kill {len(self.kills)}/{self.cfg.kills}: engine pid {engine.pid} "
                         f"SIGKILLed {at:.2f} s after its start ({fired}, {phase}); "
                         f"{progress:.0%} of the steps done")
                recovered_at = engine.line_at("recovered")
                if recovered_at is not None:
                    self.startup_s = recovered_at
                self._join(failovers)
                return
            code = self.wait_exit(engine, 60.0)
            if code is None:
                engine.kill()
                code = engine.proc.returncode
            self._engine_exited(engine, code)
            # The engine ended before its moment (nothing left to do, or it failed): the next
            # one is killed at a moment within the life this one had.
            plan = RoundPlan("start", plan.delay_s, failovers=plan.failovers)  # still owed
            scale = 0.8 * (time.monotonic() - engine.started_at)
        self._join(failovers)
        self.kills_missed += 1
        self.say(f"round {round_no}: the engine never lived until its kill; kill not delivered")

    def _join(self, thread: threading.Thread | None) -> None:
        if thread is not None:
            thread.join(60.0)

    def _engine_exited(self, engine: _Child, code: int) -> None:
        if code == 0:
            self.say(f"engine pid {engine.pid} ended by itself (exit 0)")
            return
        tail = engine.tail(3)
        self.engine_failures.append({"pid": engine.pid, "exit": code, "log": tail})
        self.say(f"engine pid {engine.pid} exited {code}: {tail[-1] if tail else ''}")

    def last_round(self, plan: RoundPlan) -> bool:
        """Run the engine to the end; False when it did not finish within the timeout."""
        deadline = time.monotonic() + self.cfg.timeout_s
        failovers: threading.Thread | None = None
        for _ in range(ENGINE_RETRIES + 1):
            engine = self.start_engine()
            self.say(f"last run: engine pid {engine.pid}, until every chain ended")
            if failovers is None and plan.failovers:
                engine.wait_line("recovered", 120.0, self.stop)
                self.check_stop()
                failovers = self.start_failovers(plan, len(self.kills))
            code = self.wait_exit(engine, max(1.0, deadline - time.monotonic()))
            if code is None:
                engine.kill()
                self._join(failovers)
                self.say(f"the engine did not finish within --timeout {self.cfg.timeout_s:g} s")
                return False
            self._engine_exited(engine, code)
            if code == 0:
                final = [t for _, t in engine.lines if t.startswith("ended")]
                if final:
                    self.say(f"engine: {final[-1]}")
                self._join(failovers)
                return True
        self._join(failovers)
        return False

    def check(self) -> dict[str, Any]:
        reader = open_readonly(self.store) if self.store.exists() else None
        try:
            rows = list(reader.load_all()) if reader is not None else []
            quarantined = [q.chain_id for q in reader.quarantined()] if reader else []
        finally:
            if reader is not None:
                reader.close()
        ledgers: dict[str, Mapping[str, Any]] = {}
        tasks: dict[str, Mapping[str, Any]] = {}
        for pool, client in self.clients.items():
            ledgers[pool] = client.getLedger()
            tasks[pool] = client.getAllTasksStatuses()
        specs = workload(self.cfg.chains, self.cfg.steps, self.pools, self.cfg.seed)
        return check_invariants(specs, rows, ledgers, tasks, quarantined)

    def close(self) -> None:
        for client in self.clients.values():
            with contextlib.suppress(Exception):
                client.close()
        self.children.stop_all()


def run_chaos(cfg: ChaosConfig, out: TextIO | None = None,
              stop: threading.Event | None = None) -> dict[str, Any]:
    """Run the chaos test (see the module's docstring) and return its report.

    Raises ChaosError when the run itself cannot be carried out (the SPM does not start, the
    work directory is in use), and KeyboardInterrupt when interrupted: by Ctrl-C, or as soon as
    ``stop`` is set (what the command's SIGINT and SIGTERM handlers do). Every subprocess is
    stopped before this returns or raises.
    """
    out = out or sys.stdout
    workdir, owned = _workdir(cfg)
    run_ = _Run(cfg, out, workdir, stop)
    t0 = time.monotonic()
    finished = False
    report: dict[str, Any] = {}
    try:
        run_.start_spm()
        specs = workload(cfg.chains, cfg.steps, run_.pools, cfg.seed)
        run_.ids = {s.chain_id for s in specs if s.chain_id is not None}
        plans = plan_rounds(cfg.kills, cfg.failovers, cfg.pools, cfg.chains, cfg.seed)
        for i, plan in enumerate(plans[:-1]):
            left = sum(1 for p in plans[i + 1 : -1] if p.trigger == "progress")
            run_.kill_round(i, plan, left)
        finished = run_.last_round(plans[-1])
        report = run_.check()
    except SpmError as exc:
        raise ChaosError(f"talking to the simulated SPM failed: {exc}") from exc
    finally:
        run_.close()
    wall = time.monotonic() - t0
    if not finished:
        report["violations"].insert(0, "the last engine run did not finish")
        report["ok"] = False
    for error in run_.failover_errors:
        report["violations"].append(f"a failover failed: {error}")
        report["ok"] = False
    report.update({
        "seed": cfg.seed,
        "kills": len(run_.kills),
        "kills_missed": run_.kills_missed,
        "failovers": len(run_.failovers),
        "engine_runs": run_.engine_runs,
        "engine_failures": len(run_.engine_failures),
        "wall_s": round(wall, 2),
        "kill_log": run_.kills,
        "failover_log": run_.failovers,
        "engine_failure_log": run_.engine_failures,
        "pids": [c.pid for c in run_.children.items],
        "config": asdict(cfg) | {"workdir": None},
        "command": _command(cfg),
    })
    if report["ok"] and owned and not cfg.keep:
        shutil.rmtree(workdir, ignore_errors=True)
        report["workdir"] = None
    else:
        report["workdir"] = str(workdir)
    return report


def _workdir(cfg: ChaosConfig) -> tuple[Path, bool]:
    """The work directory and whether this run made it (then it may remove it)."""
    if cfg.workdir is None:
        return Path(tempfile.mkdtemp(prefix="spmchain-chaos-")), True
    path = Path(cfg.workdir)
    if path.exists() and any(path.iterdir()):
        raise ChaosError(f"--workdir {path} is not empty (a store or SPM state from another "
                         "run would mix with this one)")
    path.mkdir(parents=True, exist_ok=True)
    return path, False


def _command(cfg: ChaosConfig) -> str:
    parts = ["spmchain chaos", f"--chains {cfg.chains}", f"--steps {cfg.steps}",
             f"--pools {cfg.pools}", f"--kills {cfg.kills}", f"--failovers {cfg.failovers}",
             f"--seed {cfg.seed}", f"--task-ms {cfg.task_ms:g}",
             f"--orphan-grace-ms {cfg.orphan_grace_ms:g}"]
    if cfg.actor_fault_rate:
        parts.append(f"--actor-fault-rate {cfg.actor_fault_rate:g}")
    if cfg.fail_rate:
        parts.append(f"--fail-rate {cfg.fail_rate:g}")
    return " ".join(parts)


def summary_table(report: dict[str, Any]) -> str:
    """The report as the table ``spmchain chaos`` prints."""
    rows: list[tuple[str, Any]] = [
        ("seed", report["seed"]),
        ("chains", report["chains"]),
        ("ended", report["ended"]),
        ("ended_successfully", report["ended_successfully"]),
        ("ended_with_failure", report["ended_with_failure"]),
        ("kills", report["kills"]),
        ("failovers", report["failovers"]),
        ("engine runs", report["engine_runs"]),
        ("engine failures", report["engine_failures"]),
        ("wall", f"{report['wall_s']:.1f} s"),
        ("lost", report["lost"]),
        ("duplicated_effects", report["duplicated_effects"]),
        ("uncleared_tasks", report["uncleared_tasks"]),
        ("leftover_effects", report["leftover_effects"]),
        ("missing_effects", report["missing_effects"]),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"  {k:<{width}}  {v}" for k, v in rows]
    if report["ok"]:
        lines.append("  every invariant holds")
    else:
        lines.extend(f"  VIOLATION: {v}" for v in report["violations"])
        for key in ("lost_chains", "duplicates", "uncleared", "leftover", "missing"):
            if report.get(key):
                lines.append(f"  {key}: {json.dumps(report[key])[:2000]}")
    if report.get("workdir"):
        lines.append(f"  logs, store and SPM state kept in {report['workdir']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The command


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``spmchain chaos``'s options."""
    p.add_argument("--chains", type=_count, default=500, help="chains of the workload "
                   "(default 500)")
    p.add_argument("--steps", type=_positive_int, default=5, help="steps a chain (default 5)")
    p.add_argument("--pools", type=_positive_int, default=4, help="simulated pools (default 4)")
    p.add_argument("--kills", type=_count, default=20,
                   help="times the engine is SIGKILLed and started again (default 20)")
    p.add_argument("--failovers", type=_count, default=0,
                   help="times a pool loses the SPM role for a moment (default 0)")
    p.add_argument("--seed", type=int, default=1, help="seed of everything random (default 1)")
    p.add_argument("--actor-fault-rate", type=_rate, default=0.0, metavar="R",
                   help="fraction of messages on which the engine's actors raise (default 0)")
    p.add_argument("--fail-rate", type=_rate, default=0.0, metavar="F",
                   help="fraction of SPM tasks whose job fails (any verb, reverts included: a "
                        "revert failing every attempt leaves its effect behind; default 0)")
    p.add_argument("--task-ms", type=_non_negative_float, default=2.0,
                   help="how long each SPM task runs, ms (default 2: long enough that the "
                        "chains are still running while the kills land)")
    p.add_argument("--poll-min-ms", type=_positive_float, default=20.0,
                   help="the engine's shortest poll interval (default 20)")
    p.add_argument("--poll-max-ms", type=_positive_float, default=1000.0,
                   help="the engine's longest poll interval (default 1000)")
    p.add_argument("--max-outstanding", type=_positive_int, default=100,
                   help="the engine's tasks fired and not finished per pool (default 100)")
    p.add_argument("--orphan-grace-ms", type=_positive_float, default=2000.0,
                   help="the engine's grace before it discards a task no chain owns (default "
                        "2000, not the runtime's 30000: short, so that the orphan handling "
                        "acts, rightly or wrongly, within the run and the checks see it)")
    p.add_argument("--timeout", type=_positive_float, default=600.0,
                   help="how long the last engine run may take to end every chain, s "
                        "(default 600)")
    p.add_argument("--json", metavar="FILE", default=None, help="write the report as JSON")
    p.add_argument("--workdir", metavar="DIR", default=None,
                   help="put the store, the SPM state and the logs here (must be empty; kept); "
                        "default: a temporary directory, removed after a clean run")
    p.add_argument("--keep", action="store_true",
                   help="keep the temporary work directory even after a clean run")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="the engine logs at INFO (every chain's end) into its log")


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


@contextlib.contextmanager
def _signals_stop(stop: threading.Event) -> Iterator[None]:
    """SIGINT and SIGTERM set ``stop`` (the run then stops at its next safe point, stopping
    every subprocess) instead of raising wherever the main thread happens to be: an exception
    raised inside a fork or a finaliser would be swallowed and the run would go on."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run(args: argparse.Namespace) -> int:
    """``spmchain chaos``: 0 when every invariant holds, 1 when one fails, 2 when the run could
    not be carried out (bad options, a ``--json`` file that cannot be written, the SPM did not
    start) or its report could not be written at the end (after the summary), 130 when
    interrupted."""
    if args.poll_max_ms < args.poll_min_ms:
        print(f"spmchain chaos: --poll-max-ms ({args.poll_max_ms:g}) is below --poll-min-ms "
              f"({args.poll_min_ms:g})", file=sys.stderr)
        return 2
    if args.kills and not args.chains:
        print("spmchain chaos: --kills needs chains to run (--chains 0)", file=sys.stderr)
        return 2
    if args.json:
        problem = report_path_problem(args.json)
        if problem is not None:
            print(f"spmchain chaos: --json {args.json}: {problem}", file=sys.stderr)
            return 2
    cfg = ChaosConfig(
        chains=args.chains, steps=args.steps, pools=args.pools, kills=args.kills,
        failovers=args.failovers, seed=args.seed, actor_fault_rate=args.actor_fault_rate,
        fail_rate=args.fail_rate, task_ms=args.task_ms, poll_min_ms=args.poll_min_ms,
        poll_max_ms=args.poll_max_ms, max_outstanding=args.max_outstanding,
        orphan_grace_ms=args.orphan_grace_ms, timeout_s=args.timeout, workdir=args.workdir,
        keep=args.keep, verbose=args.verbose,
    )
    print(f"spmchain chaos: {_command(cfg)}", flush=True)
    try:
        stop = threading.Event()
        with _signals_stop(stop):
            report = run_chaos(cfg, stop=stop)
    except ChaosError as exc:
        print(f"spmchain chaos: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("spmchain chaos: interrupted; every subprocess was stopped", file=sys.stderr)
        return 130
    print(summary_table(report))
    if args.json:
        try:
            write_json(report, args.json)
        except OSError as exc:  # the directory went away or filled up during the run
            print(f"spmchain chaos: --json {args.json}: the report could not be written: "
                  f"{exc.strerror or exc}", file=sys.stderr)
            return 2
        print(f"report written to {args.json}")
    return 0 if report["ok"] else 1

