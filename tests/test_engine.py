"""``spmchain engine``: the killable engine process ``spmchain chaos`` drives.

Every test runs the engine as a subprocess against the served simulator (``spmchain spm
serve`` with a state directory), kills it by its pid where the test says so, and judges the
outcome the way chaos does: from the store (read-only) and the simulator's ledger and task
lists over the wire (:func:`actors._chaos.check_invariants`).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _spm_server import ServedSpm, served_spm

from actors._chaos import _Child, check_invariants
from actors._cli import main
from actors._engine import workload
from actors._store_sqlite import open_readonly
from spm._stomp_client import client_for_url, connected_pools

WAIT = 60.0
"""How long a test waits for an engine run (it fails rather than hangs)."""


@pytest.fixture
def spm(tmp_path: Path, seed: int) -> Iterator[ServedSpm]:
    """Two served pools whose tasks take 300 ms: chains are still running right after the
    engine says ``submitted``."""
    with served_spm("--pools", "2", "--state-dir", str(tmp_path / "spm"), "--task-ms", "300",
                    "--seed", str(seed)) as served:
        yield served


def engine(tmp_path: Path, url: str, name: str, *extra: str,
           env: dict[str, str] | None = None) -> _Child:
    """Start ``spmchain engine`` on ``tmp_path/store.sqlite`` (stdout and stderr in a log)."""
    argv = [sys.executable, "-m", "actors._cli", "engine", "--spm", url,
            "--store", str(tmp_path / "store.sqlite"), *extra]
    return _Child(name, argv, tmp_path / f"{name}.log", tmp_path, env=env)


def finish(child: _Child) -> int:
    code = child.wait(WAIT)
    if code is None:
        child.kill()
        raise AssertionError(f"{child.name} did not end within {WAIT} s: {child.tail(10)}")
    return code


def printed(child: _Child, prefix: str) -> str:
    lines = [text for _, text in child.lines if text.startswith(prefix)]
    assert lines, f"{child.name} printed no {prefix!r} line: {child.tail(10)}"
    return lines[-1]


def invariants(url: str, store: Path, chains: int, steps: int, pools: int,
               seed: int) -> dict[str, Any]:
    served = connected_pools(url)[:pools]
    reader = open_readonly(store)
    try:
        rows = list(reader.load_all())
        quarantined = [q.chain_id for q in reader.quarantined()]
    finally:
        reader.close()
    ledgers: dict[str, Any] = {}
    tasks: dict[str, Any] = {}
    for pool in served:
        client = client_for_url(url, pool)
        try:
            ledgers[pool] = client.getLedger()  # type: ignore[attr-defined]
            tasks[pool] = client.getAllTasksStatuses()
        finally:
            client.close()
    return check_invariants(workload(chains, steps, served, seed), rows, ledgers, tasks,
                            quarantined)


def test_engine_killed_after_submitting_resumes_and_every_chain_ends_once(
    tmp_path: Path, spm: ServedSpm, seed: int
) -> None:
    opts = ("--chains", "40", "--steps", "3", "--pools", "2", "--seed", str(seed),
            "--poll-min-ms", "10", "--poll-max-ms", "100")
    first = engine(tmp_path, spm.url, "engine-1", *opts)
    try:
        assert first.wait_line("submitted", WAIT) is not None, first.tail(10)
    finally:
        first.kill()
    assert first.proc.returncode == -9
    assert printed(first, "submitted").startswith("submitted 40 chains (0 already in the store")

    second = engine(tmp_path, spm.url, "engine-2", *opts)
    assert finish(second) == 0, second.tail(10)
    assert printed(second, "submitted").startswith("submitted 0 chains (40 already in the store")
    assert printed(second, "ended").startswith("ended 40 of 40 chains")

    third = engine(tmp_path, spm.url, "engine-3", *opts)
    assert finish(third) == 0, third.tail(10)
    assert printed(third, "recovered").startswith("recovered 0 chains")
    assert printed(third, "submitted").startswith("submitted 0 chains (40 already in the store")

    report = invariants(spm.url, tmp_path / "store.sqlite", 40, 3, 2, seed)
    assert report["violations"] == [], report
    assert report["ended"] == 40


def test_task_whose_outcome_was_recorded_before_the_kill_is_cleared_not_reverted(
    tmp_path: Path, spm: ServedSpm, seed: int
) -> None:
    # A short orphan grace: a task left to the poller would be reverted within the run.
    opts = ("--chains", "1", "--steps", "3", "--pools", "1", "--seed", str(seed),
            "--poll-min-ms", "10", "--poll-max-ms", "100", "--orphan-grace-ms", "300",
            "--drain-timeout", "20")
    crashed = engine(tmp_path, spm.url, "engine-1", *opts,
                     env={"SPMCHAIN_CRASH_AT": "after_outcome"})
    assert finish(crashed) == -9, crashed.tail(10)
    again = engine(tmp_path, spm.url, "engine-2", *opts)
    assert finish(again) == 0, again.tail(10)
    report = invariants(spm.url, tmp_path / "store.sqlite", 1, 3, 1, seed)
    assert report["ended_successfully"] == 1, report
    assert report["violations"] == [], report


def test_engine_exits_nonzero_naming_the_escalation_when_actors_keep_failing(
    tmp_path: Path, spm: ServedSpm, seed: int
) -> None:
    child = engine(tmp_path, spm.url, "engine", "--chains", "10", "--steps", "2", "--pools",
                   "2", "--seed", str(seed), "--actor-fault-rate", "1")
    assert finish(child) == 1
    log = child.log_path.read_text()
    assert "spmchain engine: the runtime stopped: supervisor escalated:" in log


def test_engine_refuses_more_pools_than_the_spm_serves(
    tmp_path: Path, spm: ServedSpm, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["engine", "--spm", spm.url, "--store", str(tmp_path / "s.sqlite"),
                 "--pools", "3", "--chains", "1"])
    assert code == 2  # could not run, as spmchain loadtest says it
    assert "serves 2 pools (pool-0, pool-1); --pools asks for 3" in capsys.readouterr().err


def test_engine_says_when_nothing_answers_at_the_spm_address(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code = main(["engine", "--spm", f"stomp://127.0.0.1:{port}", "--store",
                 str(tmp_path / "s.sqlite"), "--connect-timeout", "0.3"])
    assert code == 2  # could not run, as spmchain loadtest says it
    assert f"the SPM at stomp://127.0.0.1:{port} does not answer" in capsys.readouterr().err


def test_engine_exits_2_when_its_store_cannot_be_opened(
    tmp_path: Path, spm: ServedSpm, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "missing" / "s.sqlite"
    code = main(["engine", "--spm", spm.url, "--store", str(store), "--pools", "1",
                 "--chains", "1"])
    assert code == 2  # could not run, as spmchain loadtest says it
    err = capsys.readouterr().err
    assert err.startswith("spmchain engine: recovery failed: ") and str(store) in err
    assert err.count("\n") == 1


def test_engine_says_which_option_when_the_metrics_address_cannot_be_served(
    tmp_path: Path, spm: ServedSpm, capsys: pytest.CaptureFixture[str]
) -> None:
    # 192.0.2.1 (TEST-NET-1) is on no host: binding it fails at once, without asking DNS.
    code = main(["engine", "--spm", spm.url, "--store", str(tmp_path / "s.sqlite"),
                 "--pools", "1", "--chains", "1", "--metrics-port", "0",
                 "--metrics-addr", "192.0.2.1"])
    assert code == 2
    assert capsys.readouterr().err == (
        "spmchain engine: --metrics-addr 192.0.2.1 --metrics-port 0: cannot serve metrics "
        "there: Cannot assign requested address\n")


@pytest.mark.parametrize(
    ("argv", "status", "message"),
    [
        (["--store", "s.sqlite"], 2, "the following arguments are required: --spm"),
        (["--spm", "stomp://127.0.0.1:1"], 2, "the following arguments are required: --store"),
        (["--spm", "stomp://127.0.0.1:1", "--store", "s", "--chains", "-1"], 2,
         "--chains: must not be negative, got -1"),
        (["--spm", "stomp://127.0.0.1:1", "--store", "s", "--actor-fault-rate", "2"], 2,
         "--actor-fault-rate: must be within [0, 1], got 2.0"),
        (["--spm", "stomp://127.0.0.1:1", "--store", "s", "--poll-min-ms", "50",
          "--poll-max-ms", "10"], 2, "--poll-max-ms (10) is below --poll-min-ms (50)"),
        (["--spm", "http://127.0.0.1:1", "--store", "s"], 2,
         "not a stomp:// or stomp+tls:// URL"),
    ],
)
def test_engine_bad_options_get_a_clear_error(
    argv: list[str], status: int, message: str, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    try:
        code = main(["engine", *argv])
    except SystemExit as exc:
        code = int(exc.code or 0)
    assert code == status
    assert message in capsys.readouterr().err
