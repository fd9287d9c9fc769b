"""``spmchain inspect``: what a store left by a running or interrupted engine says, read-only."""

from __future__ import annotations

import hashlib
import json
import random
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from conftest import FAST, WAIT, wait_until

from actors._chain import ChainState
from actors._cli import main as cli_main
from actors._loadtest import chain_spec, pool_ids
from actors._runtime import Runtime, RuntimeOptions
from actors._snapshot import encode_snapshot
from actors._spec import ChainSpec, Command, StepResult, StepSpec, register_command
from actors._store_sqlite import SqliteStore
from spm._simulator import SimulatedSpm

REPO = Path(__file__).resolve().parents[1]
LONG_TASK_S = 10.0
"""Task duration on the simulated SPM: long enough that every chain is still in flight when the
test inspects it, whatever the machine's speed."""


def spmchain_inspect(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run ``spmchain inspect ARGS`` in a process of its own, as an operator would."""
    return subprocess.run(
        [sys.executable, "-m", "actors._cli", "inspect", *map(str, args)],
        capture_output=True, text=True, timeout=60, cwd=REPO, check=False,
    )


def inspect_json(*args: str | Path) -> dict[str, Any]:
    done = spmchain_inspect(*args, "--json")
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def all_fired(rt: Runtime, n: int) -> bool:
    """Each of the ``n`` live chains has recorded the task id of its first step."""
    states = rt.chains()
    return len(states) == n and all(
        s.current is not None and s.current.task_id is not None for s in states
    )


def in_flight_by_pool(report: dict[str, Any]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for phase, chains in report["chains"].items():
        if phase == "ended":
            continue
        for c in chains:
            out.setdefault(c["pool"], set()).update(t["task_id"] for t in c["in_flight"])
    return out


@pytest.fixture
def pools(seed: int) -> list[str]:
    return pool_ids(2, seed)


@pytest.fixture
def spms(pools: Sequence[str]) -> Iterator[dict[str, SimulatedSpm]]:
    made = {p: SimulatedSpm(p, durations=LONG_TASK_S) for p in pools}
    yield made
    for spm in made.values():
        spm.close()


def test_inspect_on_a_store_left_by_an_interrupted_run_lists_unfinished_chains_and_task_ids(
    tmp_path: Path, pools: list[str], spms: dict[str, SimulatedSpm], seed: int
) -> None:
    path = tmp_path / "snapshots.sqlite"
    rng = random.Random(seed)
    specs = [chain_spec(i, pools[i % len(pools)], 3, rng) for i in range(6)]
    rt = Runtime(spms, RuntimeOptions(**FAST), store=path).start()
    try:
        for spec in specs:
            rt.submit(spec)
        wait_until(lambda: all_fired(rt, len(specs)), "every chain's first task fired")
        rt.flush()
        # While the engine runs on the store: inspect must read it without disturbing it.
        running = inspect_json("--store", path)
        assert rt.stopped_reason is None
    finally:
        rt.stop()
    on_spm = {pool: set(spm.getAllTasksInfo()) for pool, spm in spms.items()}
    assert sum(map(len, on_spm.values())) == len(specs)

    before = file_digest(path)
    interrupted = inspect_json("--store", path)
    text = spmchain_inspect("--store", path)
    assert file_digest(path) == before, "inspect changed the store file"

    for report in (running, interrupted):
        assert report["counts"] == {"live": 6, "ended_successfully": 0, "ended_with_failure": 0,
                                    "quarantined": 0, "undecodable": 0}
        listed = report["chains"]["running"]
        assert sorted(c["chain_id"] for c in listed) == sorted(str(s.chain_id) for s in specs)
        assert in_flight_by_pool(report) == on_spm
        for c in listed:
            spec = next(s for s in specs if s.chain_id == c["chain_id"])
            assert c["pool"] == spec.pool
            assert c["command_type"] == "loadtest_volume_chain"
            assert c["current_step"]["index"] == 0
            assert c["current_step"]["verb"] == "createVolume"
            assert c["current_step"]["status"] == "running"
            assert [t["task_id"] for t in c["in_flight"]] == [c["current_step"]["task_id"]]
            assert c["steps_total"] == 3
            assert c["age_s"] >= 0
        assert report["chains"]["ended"] == []
    assert text.returncode == 0, text.stderr
    assert "6 live" in text.stdout
    for pool_tasks in on_spm.values():
        for task_id in pool_tasks:
            assert task_id in text.stdout


def test_inspect_state_filters_the_listing_but_counts_cover_the_whole_store(
    tmp_path: Path, pools: list[str], spms: dict[str, SimulatedSpm], seed: int
) -> None:
    path = tmp_path / "snapshots.sqlite"
    rng = random.Random(seed)
    with Runtime(spms, RuntimeOptions(**FAST), store=path) as rt:
        long = rt.submit(chain_spec(0, pools[0], 2, rng))
        cancelled = rt.submit(chain_spec(1, pools[1], 2, rng))
        wait_until(lambda: all_fired(rt, 2), "both chains' first task fired")
        cancelled.cancel("operator asked")
        assert cancelled.result(WAIT).outcome == "ended_with_failure"
        rt.flush()
        live = inspect_json("--store", path, "--state", "live")
        ended = inspect_json("--store", path, "--state", "ended")
    counts = {"live": 1, "ended_successfully": 0, "ended_with_failure": 1, "quarantined": 0,
              "undecodable": 0}
    assert live["counts"] == ended["counts"] == counts
    assert set(live["chains"]) == {"new", "running", "failing", "reverting"}
    assert [c["chain_id"] for c in live["chains"]["running"]] == [long.chain_id]
    assert set(ended["chains"]) == {"ended"}
    (c,) = ended["chains"]["ended"]
    assert c["chain_id"] == cancelled.chain_id and "operator asked" in c["reason"]


def failing_chain(pool: str, rng: random.Random) -> ChainSpec:
    """Step 0 creates a volume; step 1 creates one on a parent that does not exist, so its
    task fails on the SPM (201) and step 0 is reverted by deleteVolume."""
    sd, img, vol, ghost, vol2 = (str(uuid.UUID(int=rng.getrandbits(128), version=4))
                                 for _ in range(5))
    base = {"sdUUID": sd, "spUUID": pool, "imgUUID": img}
    return ChainSpec(
        pool=pool, command_type="failing_volume_chain", chain_id="failing-1",
        steps=[
            StepSpec("createVolume", {**base, "volUUID": vol, "size": 1 << 30},
                     revert_verb="deleteVolume", revert_params={**base, "volUUID": vol}),
            StepSpec("createVolume", {**base, "volUUID": vol2, "srcImgUUID": img,
                                      "srcVolUUID": ghost},
                     revert_verb="deleteVolume", revert_params={**base, "volUUID": vol2}),
        ],
    )


def test_inspect_chain_shows_each_step_with_task_ids_codes_timestamps_and_the_revert(
    tmp_path: Path, pools: list[str], seed: int
) -> None:
    path = tmp_path / "snapshots.sqlite"
    spm = SimulatedSpm(pools[0])
    with Runtime({pools[0]: spm}, RuntimeOptions(**FAST), store=path) as rt:
        result = rt.submit(failing_chain(pools[0], random.Random(seed))).result(WAIT)
        rt.flush()
    assert result.outcome == "ended_with_failure"
    final = result.state

    detail = inspect_json("--store", path, "--chain", "failing-1")
    assert detail["error"] is None
    st = detail["state"]
    assert st["phase"] == "ended"
    assert st["outcome"] == "ended_with_failure"
    assert st["reason"] == final.reason and st["reason"]
    assert st["spec"]["pool"] == pools[0]
    assert st["spec"]["command_type"] == "failing_volume_chain"
    assert st["spec"]["steps_total"] == 2
    assert st["ended_at"] == final.ended_at
    step0, step1 = st["steps"]
    assert (step0["index"], step0["verb"], step0["status"]) == (0, "createVolume", "succeeded")
    assert step0["task_id"] == final.steps[0].task_id
    assert step0["revert_status"] == "succeeded"
    assert step0["revert_task_id"] == final.steps[0].revert_task_id
    assert step0["revert_verb"] == "deleteVolume"
    assert (step1["index"], step1["status"], step1["code"]) == (1, "failed", 201)
    assert step1["task_id"] == final.steps[1].task_id
    assert step1["message"]
    for s in (step0, step1):
        assert s["submitted_at"] <= s["fired_at"] <= s["ended_at"]

    text = spmchain_inspect("--store", path, "--chain", "failing-1")
    assert text.returncode == 0, text.stderr
    for needle in ("ended_with_failure", "createVolume", "deleteVolume", "code 201",
                   str(final.steps[0].task_id), str(final.steps[1].task_id),
                   str(final.steps[0].revert_task_id)):
        assert needle in text.stdout

    listing = inspect_json("--store", path)
    assert listing["counts"]["ended_with_failure"] == 1
    (ended,) = listing["chains"]["ended"]
    assert ended["chain_id"] == "failing-1" and ended["reason"] == final.reason


def test_inspect_chain_of_an_unknown_id_exits_1_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "snapshots.sqlite"
    SqliteStore(path).close()
    done = spmchain_inspect("--store", path, "--chain", "no-such-chain")
    assert done.returncode == 1
    assert "no-such-chain" in done.stderr


def test_inspect_quarantined_lists_a_snapshot_the_runtime_refused_with_reason_and_time(
    tmp_path: Path, pools: list[str], spms: dict[str, SimulatedSpm]
) -> None:
    path = tmp_path / "snapshots.sqlite"
    corrupt = b"SPCH" + b"\x00\x01" + b"not a snapshot at all"
    store = SqliteStore(path)
    store.save_sync("corrupt-1", corrupt, timeout=WAIT)
    store.close()
    t0 = time.time()
    with Runtime(spms, RuntimeOptions(**FAST), store=path) as rt:
        assert rt.quarantined == 1

    listing = inspect_json("--store", path, "--quarantined")
    assert listing["count"] == 1
    (q,) = listing["quarantined"]
    assert q["chain_id"] == "corrupt-1"
    assert "does not decode" in q["reason"]
    assert t0 - 1 <= q["quarantined_at"] <= time.time() + 1
    assert q["size"] == len(corrupt)

    counts = inspect_json("--store", path)["counts"]
    assert counts["quarantined"] == 1 and counts["live"] == 0
    text = spmchain_inspect("--store", path, "--quarantined")
    assert text.returncode == 0 and "corrupt-1" in text.stdout and "does not decode" in text.stdout
    detail = inspect_json("--store", path, "--chain", "corrupt-1")
    assert detail["state"] is None and detail["quarantined"][0]["reason"] == q["reason"]


def test_a_snapshot_that_does_not_decode_is_reported_and_the_listing_goes_on(
    tmp_path: Path, pools: list[str], seed: int
) -> None:
    path = tmp_path / "snapshots.sqlite"
    rng = random.Random(seed)
    good = ChainState(chain_id="lt-0000000", spec=chain_spec(0, pools[0], 2, rng),
                      created_at=time.time(), deadline_at=time.time() + 60, task_timeout_s=30)
    store = SqliteStore(path)
    store.save("lt-0000000", encode_snapshot(good.to_dict()))
    store.save("bad-magic", b"XXXX" + bytes(40))
    truncated = encode_snapshot(good.to_dict())[:-5]
    store.save("truncated", truncated, ended=True)
    bad_state = {k: v for k, v in good.to_dict().items() if k != "spec"}
    store.save("bad-state", encode_snapshot(bad_state))
    store.flush(WAIT)
    store.close()

    report = inspect_json("--store", path)
    assert report["counts"]["live"] == 1 and report["counts"]["undecodable"] == 3
    assert [c["chain_id"] for c in report["chains"]["new"]] == ["lt-0000000"]
    errors = {u["chain_id"]: u["error"] for u in report["undecodable"]}
    assert set(errors) == {"bad-magic", "truncated", "bad-state"}
    assert "bad_magic" in errors["bad-magic"]
    assert "truncated" in errors["truncated"]
    text = spmchain_inspect("--store", path)
    assert text.returncode == 0 and "undecodable" in text.stdout and "bad-magic" in text.stdout
    detail = inspect_json("--store", path, "--chain", "bad-state")
    assert detail["state"] is None and detail["error"]


@register_command("tests.inspect.one_step")
class _OneStep(Command):
    def next_step(self, results: Sequence[StepResult]) -> StepSpec | None:
        if results:
            return None
        return StepSpec("createVolume", dict(self.params["step"]))


def test_a_chain_run_by_a_command_registered_only_in_the_engine_is_listed_not_undecodable(
    tmp_path: Path, pools: list[str], spms: dict[str, SimulatedSpm], seed: int
) -> None:
    path = tmp_path / "snapshots.sqlite"
    rng = random.Random(seed)
    params = dict(chain_spec(0, pools[0], 1, rng).steps[0].params)  # type: ignore[index]
    with Runtime(spms, RuntimeOptions(**FAST), store=path) as rt:
        rt.submit({"pool": pools[0], "command_type": "one_step", "chain_id": "cmd-1",
                   "command": "tests.inspect.one_step", "params": {"step": params}})
        wait_until(lambda: all_fired(rt, 1), "the command's first task fired")
        rt.flush()
    report = inspect_json("--store", path)
    assert report["counts"]["undecodable"] == 0
    (c,) = report["chains"]["running"]
    assert c["chain_id"] == "cmd-1" and c["steps_total"] is None
    detail = inspect_json("--store", path, "--chain", "cmd-1")
    assert detail["state"]["spec"]["command"] == "tests.inspect.one_step"


@pytest.mark.parametrize("kind", ["missing", "directory", "text file", "other sqlite"])
def test_a_path_that_is_not_a_store_exits_2_with_a_clear_error_and_creates_nothing(
    tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "store.sqlite"
    if kind == "directory":
        path.mkdir()
    elif kind == "text file":
        path.write_text("these are not the snapshots you are looking for\n")
    elif kind == "other sqlite":
        with sqlite3.connect(path) as conn:
            conn.execute("CREATE TABLE t (x INTEGER)")
        conn.close()
    before = sorted(p.name for p in tmp_path.iterdir())
    for extra in ((), ("--json",), ("--quarantined",), ("--chain", "x")):
        status = cli_main(["inspect", "--store", str(path), *extra])
        out, err = capsys.readouterr()
        assert status == 2, (kind, extra, out, err)
        assert err.startswith("spmchain inspect: ") and str(path) in err
        assert out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_the_command_exits_2_on_a_missing_store(tmp_path: Path) -> None:
    done = spmchain_inspect("--store", tmp_path / "nowhere.sqlite")
    assert done.returncode == 2
    assert "nowhere.sqlite" in done.stderr and "does not exist" in done.stderr
    assert not (tmp_path / "nowhere.sqlite").exists()


def test_inspect_without_store_is_a_usage_error() -> None:
    done = spmchain_inspect()
    assert done.returncode == 2
    assert "--store" in done.stderr
