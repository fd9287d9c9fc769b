"""Durable chains survive crashes: kill -9 of the engine at each write-ahead point, then restart.

Every crash test runs ``tests/_engine_proc.py`` (a durable Runtime over simulated SPMs kept in a
state directory) with ``SPMCHAIN_CRASH_AT`` so that it SIGKILLs itself at a write-ahead point,
then runs it again without the crash point until every chain ended and every SPM is empty, and
checks what a user would check afterwards:

- the store holds every chain, every one ended, none quarantined (none lost);
- every chain live in the store at a restart was recovered by it, and the others were submitted;
- the simulated storage saw no effect twice (``duplicated_effects() == 0``), no step's verb was
  accepted by the SPM twice (the fire journal), and a chain that had ended before a restart is
  never fired again after it;
- no task is left on any SPM;
- a chain that ended with failure left nothing on the storage (its steps were reverted), and a
  chain that ended successfully left exactly its volumes.

The engine's SPMs live in its own process, so each restart is also an SPM restart: unfinished
tasks are aborted and rolled back as VDSM does at SPM start, and the chains that owned them end
with failure after reverting their earlier steps.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from _engine_proc import JOURNAL, chain_specs, pools_for, state_dir_of

from actors._chain import ENDED_SUCCESSFULLY, ENDED_WITH_FAILURE, ChainState
from actors._runtime import Runtime, RuntimeOptions
from actors._snapshot import decode_snapshot
from actors._spec import ChainSpec, StepSpec
from actors._store_sqlite import open_readonly
from spm._simulator import SimulatedSpm

REPO = Path(__file__).resolve().parents[1]
ENGINE = REPO / "tests" / "_engine_proc.py"
RUN_TIMEOUT = 60.0
"""Longest an engine process may take (it fails the test rather than hang)."""
CHAINS = 30
STEPS = 4


@dataclass(frozen=True, slots=True)
class Fire:
    """One line of the fire journal: a task an SPM accepted."""

    run: str
    pool: str
    task_id: str
    verb: str
    img: str
    vol: str


@dataclass(slots=True)
class Run:
    """One engine process: how it ended, what it printed, and the store as it found it."""

    label: str
    returncode: int
    stdout: str
    stderr: str
    live_before: set[str]
    ended_before: set[str]

    def said(self, word: str) -> int:
        """The number the engine printed after ``word`` (KeyError if it printed none)."""
        for line in self.stdout.splitlines():
            key, _, value = line.partition(" ")
            if key == word:
                return int(value)
        raise KeyError(f"the engine printed no {word!r}: {self.stdout!r}")

    def describe(self) -> str:
        return (f"run {self.label} exited {self.returncode}\n--- stdout\n{self.stdout}"
                f"--- stderr (tail)\n{self.stderr[-3000:]}")


@dataclass(slots=True)
class Engine:
    """An engine's durable state (store, SPM state directories) and the processes run on it."""

    root: Path
    seed: int
    chains: int = CHAINS
    steps: int = STEPS
    pools: int = 2
    fail_rate: float = 0.0
    task_ms: float = 5.0
    vdsm_task_info: bool = False  # getAllTasksInfo without parameters, as VDSM
    runs: list[Run] = field(default_factory=list)

    @property
    def store(self) -> Path:
        return self.root / "snapshots.sqlite"

    @property
    def state_dir(self) -> Path:
        return self.root / "spm"

    def pool_ids(self) -> list[str]:
        return pools_for(self.pools, self.seed)

    def specs(self) -> list[ChainSpec]:
        return chain_specs(self.chains, self.steps, self.seed, self.pool_ids())

    def states(self) -> dict[str, ChainState]:
        """Every chain the store holds, decoded (empty before the first run)."""
        if not self.store.exists():
            return {}
        reader = open_readonly(self.store)
        try:
            return {row.chain_id: ChainState.from_dict(decode_snapshot(row.blob), row.spec)
                    for row in reader.load_all()}
        finally:
            reader.close()

    def run(self, crash_at: str | None) -> Run:
        """Run the engine once (to the end, or until it kills itself at ``crash_at``)."""
        label = str(len(self.runs) + 1)
        states = self.states()
        env = dict(os.environ)
        env.pop("SPMCHAIN_CRASH_AT", None)
        if crash_at is not None:
            env["SPMCHAIN_CRASH_AT"] = crash_at
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        cmd = [sys.executable, str(ENGINE), "--store", str(self.store),
               "--state-dir", str(self.state_dir), "--chains", str(self.chains),
               "--steps", str(self.steps), "--seed", str(self.seed), "--pools", str(self.pools),
               "--fail-rate", str(self.fail_rate), "--task-ms", str(self.task_ms),
               "--run", label, "--timeout", str(RUN_TIMEOUT - 10),
               *(["--vdsm-task-info"] if self.vdsm_task_info else [])]
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            out, err = proc.communicate(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate(timeout=10)
            pytest.fail(f"engine run {label} (crash at {crash_at}) did not exit within "
                        f"{RUN_TIMEOUT} s\n{out}\n{err[-3000:]}")
        run = Run(label, proc.returncode, out, err,
                  {cid for cid, s in states.items() if not s.ended},
                  {cid for cid, s in states.items() if s.ended})
        self.runs.append(run)
        return run

    def crash(self, point: str) -> Run:
        """Run the engine with ``SPMCHAIN_CRASH_AT=point``; it must die by SIGKILL."""
        run = self.run(point)
        assert run.returncode == -signal.SIGKILL, (
            f"the engine was to kill itself at {point}\n{run.describe()}")
        return run

    def finish(self) -> Run:
        """Run the engine without a crash point; it must end every chain and exit 0."""
        run = self.run(None)
        assert run.returncode == 0, run.describe()
        assert run.said("recovered") == len(run.live_before), run.describe()
        assert run.said("submitted") == self.chains - len(run.live_before) - len(
            run.ended_before), run.describe()
        assert run.said("uncleared") == 0, run.describe()
        return run

    def journal(self) -> list[Fire]:
        path = self.state_dir / JOURNAL
        if not path.exists():
            return []
        return [Fire(*line.split()) for line in path.read_text().splitlines()]

    @property
    def spms(self) -> Iterator[SimulatedSpm]:
        """The engine's SPMs, restarted in this process (only once no engine runs)."""
        for i, pool in enumerate(self.pool_ids()):
            spm = SimulatedSpm(pool, state_dir=state_dir_of(self.state_dir, i))
            try:
                yield spm
            finally:
                spm.close()


def assert_invariants(engine: Engine, fired_again: bool = False) -> dict[str, ChainState]:
    """Check every crash-test invariant after the engine's last run; return the final states.
    ``fired_again``: a step may have been accepted twice (against an SPM that does not tell a
    task's parameters, a task fired but not recorded is discarded and the step fired again);
    its effect must still be there once."""
    specs = {str(s.chain_id): s for s in engine.specs()}
    states = engine.states()
    # No chain lost, every chain ended, nothing quarantined.
    assert set(states) == set(specs), f"lost: {sorted(set(specs) - set(states))}"
    live = [cid for cid, s in states.items() if not s.ended]
    assert not live, f"chains not ended: {live}"
    reader = open_readonly(engine.store)
    try:
        assert reader.quarantined() == []
    finally:
        reader.close()

    # No step accepted twice by the SPM; an ended chain never fired again after a restart.
    fires = engine.journal()
    chain_of_img = {s.params["imgUUID"]: cid for cid, s in specs.items()}
    twice = {vol: n for vol, n in Counter(f.vol for f in fires if f.verb == "createVolume")
             .items() if n > 1}
    assert fired_again or not twice, f"steps fired twice: {twice}"
    for run in engine.runs:
        again = [f for f in fires if f.run == run.label and chain_of_img[f.img] in run.ended_before]
        assert not again, f"chains ended before run {run.label} fired in it: {again}"

    # The storage: no effect twice, no task left, failed chains reverted, succeeded ones whole.
    objects: dict[tuple[str, str], set[str]] = {}
    for spm in engine.spms:
        assert spm.getAllTasksStatuses() == {}, f"tasks left on pool {spm.pool}"
        assert spm.duplicated_effects() == 0, spm.duplicates()
        for obj in spm.objects():
            # The image itself is an object too (no volume): kept as "" next to its volumes.
            objects.setdefault((obj.sd_uuid, obj.img_uuid), set()).add(obj.vol_uuid or "")
    for cid, state in states.items():
        spec = specs[cid]
        left = objects.get((spec.params["sdUUID"], spec.params["imgUUID"]), set())
        if state.outcome == ENDED_WITH_FAILURE:
            assert not left, f"chain {cid} ended with failure ({state.reason}) but left {left}"
        else:
            assert state.outcome == ENDED_SUCCESSFULLY
            assert spec.steps is not None
            made = {"", *(s.params["volUUID"] for s in spec.steps)}
            assert left == made, (
                f"chain {cid} ended successfully but the storage lacks {sorted(made - left)} "
                f"(\"\" is its image) and holds extra {sorted(left - made)}")
    return states


POINTS = ("before_send", "after_send", "after_outcome")


@pytest.mark.parametrize("count", [1, 7, 40])
@pytest.mark.parametrize("point", POINTS)
def test_kill_at_a_write_ahead_point_then_restart_ends_every_chain_once(
    tmp_path: Path, seed: int, point: str, count: int
) -> None:
    engine = Engine(tmp_path, seed % 1_000_000)
    engine.crash(f"{point}:{count}")
    assert engine.states(), "the crashed engine recorded no chain"
    final = engine.finish()
    assert final.said("recovered") > 0, "no chain was caught live by the crash"
    assert final.said("ended") == len(final.live_before) + final.said("submitted")
    assert_invariants(engine)


@pytest.mark.parametrize("point", POINTS)
def test_kill_at_a_write_ahead_point_with_failing_steps_reverts_survive(
    tmp_path: Path, seed: int, point: str
) -> None:
    engine = Engine(tmp_path, seed % 1_000_000, fail_rate=0.3)
    engine.crash(f"{point}:9")
    final = engine.finish()
    assert final.said("recovered") > 0
    states = assert_invariants(engine)
    failed = [s for s in states.values() if s.outcome == ENDED_WITH_FAILURE]
    reverted = [s for s in failed if any(r.revert_status == "succeeded" for r in s.steps)]
    assert reverted, "no chain failed after a succeeded step: the reverts were not exercised"


def test_kill_after_send_adopts_the_task_the_spm_accepted_instead_of_firing_again(
    tmp_path: Path, seed: int
) -> None:
    # One pool: the last journal line of the crashed run is the task fired at the crash.
    engine = Engine(tmp_path, seed % 1_000_000, pools=1, task_ms=0.0)
    engine.crash("after_send:12")
    last = engine.journal()[-1]
    chain_id = next(str(s.chain_id) for s in engine.specs() if s.params["imgUUID"] == last.img)
    before = engine.states()[chain_id]
    rec = next(r for r in before.steps if r.params["volUUID"] == last.vol)
    # The crash window: the step is recorded as being fired, its task id is not.
    assert (rec.status, rec.task_id) == ("submitting", None), rec

    final = engine.finish()
    assert final.said("recovered") > 0
    states = assert_invariants(engine)
    after = next(r for r in states[chain_id].steps if r.params["volUUID"] == last.vol)
    assert after.task_id == last.task_id, "the chain did not adopt the task it had fired"
    assert [f.task_id for f in engine.journal() if f.vol == last.vol
            and f.verb == "createVolume"] == [last.task_id]


def test_kill_after_send_against_an_spm_that_does_not_tell_parameters_fires_again_once(
    tmp_path: Path, seed: int
) -> None:
    """As VDSM, the SPM does not say what a task was fired with: the task fired at the crash
    cannot be proved the chain's. It is discarded as an orphan (stopped, reverted, cleared)
    before the pool fires anything, and the step is fired again: its effect is there once."""
    engine = Engine(tmp_path, seed % 1_000_000, pools=1, task_ms=0.0, vdsm_task_info=True)
    engine.crash("after_send:12")
    last = engine.journal()[-1]
    chain_id = next(str(s.chain_id) for s in engine.specs() if s.params["imgUUID"] == last.img)
    crashed = engine.states()
    rec = next(r for r in crashed[chain_id].steps if r.params["volUUID"] == last.vol)
    assert (rec.status, rec.task_id) == ("submitting", None), rec
    # Every step recorded as being fired without its task id (the crash's, and any other whose
    # answer was not yet recorded) may be fired again; no other.
    unrecorded = {r.params["volUUID"] for s in crashed.values() for r in s.steps
                  if r.status == "submitting" and r.task_id is None}

    final = engine.finish()
    assert final.said("recovered") > 0
    states = assert_invariants(engine, fired_again=True)
    fired = [f.task_id for f in engine.journal() if f.vol == last.vol and f.verb == "createVolume"]
    assert len(fired) == 2 and fired[0] == last.task_id, fired
    after = next(r for r in states[chain_id].steps if r.params["volUUID"] == last.vol)
    assert after.task_id == fired[1], "the chain did not take the task fired again"
    twice = {v for v, n in Counter(f.vol for f in engine.journal()
                                    if f.verb == "createVolume").items() if n > 1}
    assert last.vol in twice and twice <= unrecorded, (twice, unrecorded)


def test_several_crashes_in_a_row_then_a_clean_restart_ends_every_chain_once(
    tmp_path: Path, seed: int
) -> None:
    engine = Engine(tmp_path, seed % 1_000_000, fail_rate=0.1)
    engine.crash("before_send:5")
    engine.crash("after_send:9")
    engine.crash("after_outcome:11")
    engine.crash("before_send:3")
    for run in engine.runs[1:]:
        # A run may die while it still recovers (clearing what the previous run left), before
        # it says how many chains it recovered.
        if "recovered" in run.stdout:
            assert run.said("recovered") == len(run.live_before), run.describe()
    final = engine.finish()
    assert final.said("recovered") > 0
    assert_invariants(engine)


def test_a_chain_that_ended_is_never_fired_again_after_restarts(
    tmp_path: Path, seed: int
) -> None:
    engine = Engine(tmp_path, seed % 1_000_000)
    engine.crash("after_outcome:105")
    ended = {cid for cid, s in engine.states().items() if s.ended}
    assert ended, "no chain had ended before the crash"
    engine.finish()
    assert_invariants(engine)
    objects = sorted(o.key for spm in engine.spms for o in spm.objects())

    again = engine.finish()  # everything has ended: nothing is recovered, submitted or fired
    assert (again.said("recovered"), again.said("submitted"), again.said("spm_fired")) == (
        0, 0, 0), again.describe()
    assert [f for f in engine.journal() if f.run == again.label] == []
    assert sorted(o.key for spm in engine.spms for o in spm.objects()) == objects
    assert_invariants(engine)


def _wait_until_no_task(spm: SimulatedSpm, timeout: float) -> dict[str, object]:
    """Poll the SPM until it lists no task or ``timeout`` passes; return what it lists."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while True:
        tasks: dict[str, object] = dict(spm.getAllTasksStatuses())
        if not tasks or time.monotonic() > deadline:
            return tasks
        pause.wait(0.02)


def test_a_chain_past_its_deadline_ends_with_failure_and_its_steps_are_reverted(
    tmp_path: Path,
) -> None:
    pool, sd, img, vol, copy_img, copy_vol = (
        f"{n:08d}-0000-4000-8000-000000000000" for n in range(1, 7))
    spm = SimulatedSpm(pool, durations={"createVolume": 0.0, "copyImage": 600.0})
    created = {"sdUUID": sd, "spUUID": pool, "imgUUID": img, "volUUID": vol}
    spec = ChainSpec(
        pool=pool, command_type="deadline", chain_id="deadline-1", deadline_s=0.5,
        steps=[
            StepSpec("createVolume", {**created, "size": 1 << 30},
                     revert_verb="deleteVolume", revert_params=created),
            StepSpec("copyImage", {"sdUUID": sd, "spUUID": pool, "srcImgUUID": img,
                                   "srcVolUUID": vol, "dstImgUUID": copy_img,
                                   "dstVolUUID": copy_vol},
                     revert_verb="deleteImage",
                     revert_params={"sdUUID": sd, "spUUID": pool, "imgUUID": copy_img}),
        ],
    )
    options = RuntimeOptions(poll_min_s=0.005, poll_max_s=0.05, redeliver_s=0.1)
    store = tmp_path / "snapshots.sqlite"
    with Runtime({pool: spm}, options, store=store) as rt:
        result = rt.submit(spec).result(timeout=15.0)
        assert result.outcome == ENDED_WITH_FAILURE
        assert result.reason is not None and "deadline of 0.5 s exceeded" in result.reason
        steps = result.state.steps
        assert [(r.verb, r.status) for r in steps] == [
            ("createVolume", "succeeded"), ("copyImage", "failed")]
        assert steps[0].revert_status == "succeeded"
        assert steps[1].revert_status is None  # stopped before its effect: nothing to revert
        assert _wait_until_no_task(spm, 10.0) == {}
    assert spm.objects() == []
    # createVolume made the image and its volume; the revert removed both; the copy never ran.
    history = [(e.verb, e.op, e.key[0]) for e in spm.ledger_history()]
    assert history == [("createVolume", "create", "image"), ("createVolume", "create", "volume"),
                       ("deleteVolume", "remove", "volume"), ("deleteVolume", "remove", "image")]
    assert spm.duplicated_effects() == 0
    reader = open_readonly(store)
    try:
        row = next(r for r in reader.load_all() if r.chain_id == "deadline-1")
        assert row.ended
    finally:
        reader.close()
