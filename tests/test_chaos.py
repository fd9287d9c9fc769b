"""``spmchain chaos``: the checks on crafted stores and ledgers, the kill plan, a small real run,
the exit status, bad options, and that no subprocess outlives the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from actors import _chain as ch
from actors import _chaos
from actors._chaos import check_invariants, plan_rounds
from actors._cli import main
from actors._engine import workload
from actors._snapshot import encode_snapshot
from actors._spec import ChainSpec
from actors._store import StoredSnapshot

REPO = Path(__file__).resolve().parent.parent
POOLS = ["pool-0", "pool-1"]


# ----------------------------------------------------------------------------------------------
# The checks, on crafted inputs


def ended(spec: ChainSpec, outcome: str = ch.ENDED_SUCCESSFULLY) -> StoredSnapshot:
    assert spec.chain_id is not None
    state = ch.new_chain(spec, spec.chain_id, 1000.0, 3600.0, 600.0)
    state = replace(state, phase="ended", outcome=outcome, ended_at=1001.0)
    return StoredSnapshot(spec.chain_id, encode_snapshot(state.to_dict()), True, 1001.0)


def live(spec: ChainSpec) -> StoredSnapshot:
    assert spec.chain_id is not None
    state = replace(ch.new_chain(spec, spec.chain_id, 1000.0, 3600.0, 600.0), phase="running")
    return StoredSnapshot(spec.chain_id, encode_snapshot(state.to_dict()), False, 1000.5)


def volumes_of(spec: ChainSpec) -> list[dict[str, Any]]:
    """The ledger objects a successful chain of the workload leaves: its image and volumes."""
    sd, img = spec.params["sdUUID"], spec.params["imgUUID"]
    objs: list[dict[str, Any]] = [{"kind": "image", "sd_uuid": sd, "img_uuid": img,
                                   "vol_uuid": None, "task_id": "t-img"}]
    for k, step in enumerate(spec.steps or ()):
        objs.append({"kind": "volume", "sd_uuid": sd, "img_uuid": img,
                     "vol_uuid": step.params["volUUID"], "task_id": f"t-{k}"})
    return objs


def ledgers_for(succeeded: list[ChainSpec], extra: list[dict[str, Any]] | None = None,
                duplicated: int = 0) -> dict[str, dict[str, Any]]:
    objects = [o for s in succeeded for o in volumes_of(s)] + list(extra or [])
    return {"pool-0": {"objects": objects, "duplicated_effects": duplicated, "duplicates": []},
            "pool-1": {"objects": [], "duplicated_effects": 0, "duplicates": []}}


NO_TASKS: dict[str, dict[str, Any]] = {"pool-0": {}, "pool-1": {}}


def test_checks_hold_when_every_chain_ended_and_the_storage_matches() -> None:
    specs = workload(6, 3, POOLS, 7)
    failed = specs[5]
    rows = [ended(s) for s in specs[:5]] + [ended(failed, ch.ENDED_WITH_FAILURE)]
    report = check_invariants(specs, rows, ledgers_for(specs[:5]), NO_TASKS)
    assert report["ok"], report["violations"]
    assert (report["chains"], report["ended"], report["ended_successfully"],
            report["ended_with_failure"]) == (6, 6, 5, 1)
    for name in _chaos.INVARIANTS:
        assert report[name] == 0


def test_a_chain_missing_from_the_store_is_lost() -> None:
    specs = workload(4, 2, POOLS, 7)
    report = check_invariants(specs, [ended(s) for s in specs[1:]], ledgers_for(specs[1:]),
                              NO_TASKS)
    assert not report["ok"]
    assert report["lost"] == 1
    assert report["lost_chains"] == {specs[0].chain_id: "missing from the store"}
    assert report["ended"] == 3
    assert "1 chains lost (not ended, or not in the store)" in report["violations"]


def test_a_chain_that_has_not_ended_or_does_not_decode_or_was_quarantined_is_lost() -> None:
    specs = workload(4, 2, POOLS, 7)
    broken = StoredSnapshot(specs[1].chain_id or "", b"SPCH\x00\x01garbage", True, 1.0)
    rows = [live(specs[0]), broken, ended(specs[3])]
    report = check_invariants(specs, rows, ledgers_for([specs[3]]), NO_TASKS,
                              quarantined=[specs[2].chain_id or ""])
    assert report["lost"] == 3
    lost = report["lost_chains"]
    assert lost[specs[0].chain_id].startswith("not ended: phase running")
    assert lost[specs[1].chain_id].startswith("snapshot does not decode")
    assert lost[specs[2].chain_id] == "snapshot quarantined"


def test_a_duplicated_effect_in_the_ledger_is_a_violation() -> None:
    specs = workload(2, 2, POOLS, 7)
    report = check_invariants(specs, [ended(s) for s in specs], ledgers_for(specs, duplicated=1),
                              NO_TASKS)
    assert report["duplicated_effects"] == 1
    assert report["violations"] == ["1 effects applied twice"]


def test_a_task_still_listed_by_an_spm_is_uncleared() -> None:
    specs = workload(2, 2, POOLS, 7)
    tasks = {"pool-0": {}, "pool-1": {"t-9": {"taskState": "finished"}}}
    report = check_invariants(specs, [ended(s) for s in specs], ledgers_for(specs), tasks)
    assert report["uncleared_tasks"] == 1
    assert report["uncleared"] == [{"pool": "pool-1", "task_id": "t-9",
                                    "status": {"taskState": "finished"}}]
    assert not report["ok"]


def test_an_object_in_the_image_of_a_chain_that_ended_with_failure_is_left_over() -> None:
    specs = workload(2, 2, POOLS, 7)
    failed = specs[1]
    rows = [ended(specs[0]), ended(failed, ch.ENDED_WITH_FAILURE)]
    report = check_invariants(specs, rows, ledgers_for([specs[0]], volumes_of(failed)[:2]),
                              NO_TASKS)
    assert report["leftover_effects"] == 2
    assert {o["chain_id"] for o in report["leftover"]} == {failed.chain_id}
    assert not report["ok"]


def test_a_volume_of_a_chain_that_ended_successfully_missing_from_the_storage_is_missing() -> None:
    specs = workload(2, 3, POOLS, 7)
    objects = [o for o in volumes_of(specs[0]) if o["task_id"] != "t-1"]
    ledgers = ledgers_for([specs[1]], objects)
    report = check_invariants(specs, [ended(s) for s in specs], ledgers, NO_TASKS)
    assert report["missing_effects"] == 1
    assert report["missing"] == [{"chain_id": specs[0].chain_id, "step": 1,
                                  "vol_uuid": specs[0].steps[1].params["volUUID"]}]  # type: ignore[index]
    assert not report["ok"]


# ----------------------------------------------------------------------------------------------
# The plan


def test_the_kill_plan_is_decided_by_the_seed_and_spreads_the_kills(seed: int) -> None:
    plans = plan_rounds(20, 5, 4, 500, seed)
    assert plans == plan_rounds(20, 5, 4, 500, seed)
    assert len(plans) == 21
    assert plans[-1].trigger is None
    assert [p.trigger for p in plans[:2]] == ["submit", "start"]
    assert {p.trigger for p in plans[2:-1]} <= {"start", "progress"}
    assert sum(len(p.failovers) for p in plans) == 5
    assert all(0 <= pool < 4 for p in plans for pool, _, _ in p.failovers)
    assert all(0.5 <= p.target <= 1.5 for p in plans if p.trigger == "progress")
    without_kills = plan_rounds(0, 2, 4, 10, seed)
    assert len(without_kills) == 1 and len(without_kills[0].failovers) == 2


# ----------------------------------------------------------------------------------------------
# Real runs


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _processes_mentioning(text: str) -> list[int]:
    """Pids of running processes whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().split(") ", 1)[1][:1]
        except (OSError, IndexError):
            continue
        if text in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def test_a_small_chaos_run_holds_every_invariant_and_leaves_no_process(
    tmp_path: Path, seed: int
) -> None:
    out = tmp_path / "chaos.json"
    workdir = tmp_path / "work"
    code = main(["chaos", "--chains", "60", "--steps", "3", "--kills", "4", "--failovers", "1",
                 "--seed", str(seed), "--task-ms", "500", "--json", str(out),
                 "--workdir", str(workdir), "--timeout", "120"])
    report = json.loads(out.read_text())
    assert report["pids"] and not [p for p in report["pids"] if _alive(p)]
    assert not _processes_mentioning(str(workdir))
    assert report["seed"] == seed
    assert report["kills"] == 4 and report["failovers"] == 1
    assert report["kill_log"][0]["trigger"] == "submit"
    assert code == 0, report["violations"]
    assert report["ok"]
    for name in _chaos.INVARIANTS:
        assert report[name] == 0, (name, report)
    assert report["ended"] == report["chains"] == 60


def test_chaos_exits_1_when_an_invariant_fails(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    specs = workload(3, 2, POOLS, 1)
    failing = check_invariants(specs, [ended(s) for s in specs[1:]], ledgers_for(specs[1:]),
                               NO_TASKS)
    failing.update({"seed": 1, "kills": 0, "failovers": 0, "engine_runs": 1,
                    "engine_failures": 0, "wall_s": 1.0, "workdir": None})
    monkeypatch.setattr(_chaos, "run_chaos", lambda cfg, out=None, stop=None: failing)
    out = tmp_path / "report.json"
    assert main(["chaos", "--chains", "3", "--steps", "2", "--kills", "0", "--json",
                 str(out)]) == 1
    printed = capsys.readouterr().out
    assert "VIOLATION: 1 chains lost" in printed
    assert json.loads(out.read_text())["lost"] == 1


def holding_report() -> dict[str, Any]:
    """What run_chaos returns for a run where every check holds (3 chains of 2 steps)."""
    specs = workload(3, 2, POOLS, 1)
    report = check_invariants(specs, [ended(s) for s in specs], ledgers_for(specs), NO_TASKS)
    report.update({"seed": 1, "kills": 0, "failovers": 0, "engine_runs": 1,
                   "engine_failures": 0, "wall_s": 1.0, "workdir": None})
    return report


def test_chaos_refuses_a_json_file_that_cannot_be_written_before_the_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("run_chaos was called despite a --json it cannot write")

    monkeypatch.setattr(_chaos, "run_chaos", refuse)
    path = tmp_path / "missing" / "chaos.json"
    assert main(["chaos", "--chains", "3", "--kills", "0", "--json", str(path)]) == 2
    assert capsys.readouterr().err == (f"spmchain chaos: --json {path}: directory "
                                       f"{tmp_path / 'missing'} does not exist\n")
    assert main(["chaos", "--chains", "3", "--kills", "0", "--json", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"spmchain chaos: --json {tmp_path}: is a directory\n"


def test_chaos_exits_2_after_the_summary_when_the_report_cannot_be_written_at_the_end(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reports = tmp_path / "reports"
    reports.mkdir()

    def run_then_remove_the_directory(cfg: Any, out: Any = None, stop: Any = None
                                      ) -> dict[str, Any]:
        reports.rmdir()
        return holding_report()

    monkeypatch.setattr(_chaos, "run_chaos", run_then_remove_the_directory)
    path = reports / "chaos.json"
    assert main(["chaos", "--chains", "3", "--steps", "2", "--kills", "0", "--json",
                 str(path)]) == 2
    out, err = capsys.readouterr()
    assert "every invariant holds" in out
    assert "report written" not in out
    assert err == (f"spmchain chaos: --json {path}: the report could not be written: "
                   "No such file or directory\n")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--kills", "-1"], "--kills: must not be negative, got -1"),
        (["--chains", "x"], "--chains: 'x' is not a whole number"),
        (["--task-ms", "-2"], "--task-ms: must not be negative"),
        (["--actor-fault-rate", "1.5"], "--actor-fault-rate: must be within [0, 1], got 1.5"),
        (["--steps", "0"], "--steps: must be at least 1, got 0"),
    ],
)
def test_chaos_bad_options_get_a_clear_error(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["chaos", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_chaos_refuses_options_that_cannot_make_a_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["chaos", "--chains", "0", "--kills", "3"]) == 2
    assert "--kills needs chains to run" in capsys.readouterr().err
    assert main(["chaos", "--poll-min-ms", "50", "--poll-max-ms", "5"]) == 2
    assert "--poll-max-ms (5) is below --poll-min-ms (50)" in capsys.readouterr().err
    used = tmp_path / "used"
    used.mkdir()
    (used / "snapshots.sqlite").write_bytes(b"")
    assert main(["chaos", "--workdir", str(used), "--chains", "1", "--kills", "0"]) == 2
    assert f"--workdir {used} is not empty" in capsys.readouterr().err


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_chaos_stops_every_subprocess(
    tmp_path: Path, seed: int, signum: signal.Signals
) -> None:
    workdir = tmp_path / "work"
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen(
        [sys.executable, "-m", "actors._cli", "chaos", "--chains", "40", "--steps", "3",
         "--kills", "50", "--seed", str(seed), "--task-ms", "500", "--workdir", str(workdir)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
        cwd=str(tmp_path), env=env,
    )
    try:
        assert proc.stdout is not None
        seen: list[str] = []
        deadline = time.monotonic() + 60.0
        for line in proc.stdout:  # ends when chaos exits
            seen.append(line)
            if "kill 2/50" in line or time.monotonic() > deadline:
                break
        assert any("kill 2/50" in line for line in seen), "".join(seen)
        assert _processes_mentioning(str(workdir)), "the SPM and an engine should be running"
        os.kill(proc.pid, signum)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 130, "".join(seen) + rest
    assert "interrupted; every subprocess was stopped" in rest
    assert not _processes_mentioning(str(workdir))
