"""``spmchain loadtest``: bad options refused before anything runs, small real runs through
``main`` and their JSON report (counts, failures and reverts, the ledger checks, admission), the
progress output on a pipe and on a terminal, the summary table, and the report's pure parts
(``bounded_by``, ``reaction_latency``, ``spm_utilization``, ``check_ledgers``) on made-up inputs."""

from __future__ import annotations

import io
import itertools
import json
import os
import platform
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from _spm_server import ServedSpm, served_spm

from actors import _loadtest
from actors._cli import main
from actors._loadtest import (
    LoadtestConfig,
    _Progress,
    bounded_by,
    chain_spec,
    check_ledgers,
    pool_ids,
    reaction_latency,
    reaction_sampled,
    run_loadtest,
    spm_utilization,
    summary_table,
)
from spm._errors import SpmError

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parent.parent

PROGRESS_LINE = re.compile(
    r"^loadtest: (\d+)/(\d+) chains ended, [\d,]+ steps/s, (\d+) failed, \d+\.\ds$"
)
STEP_FAILED = re.compile(r"^step (\d+) \(createVolume\) failed")


class FakeTerminal(io.StringIO):
    """An output stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def screen_line(written: str) -> str:
    """What a terminal shows after ``written`` (one line: ``\\r`` returns to column 0 and the
    text after it overwrites, leaving whatever was further right)."""
    cells: list[str] = []
    col = 0
    for c in written.rstrip("\n"):
        if c == "\r":
            col = 0
            continue
        if col < len(cells):
            cells[col] = c
        else:
            cells.append(c)
        col += 1
    return "".join(cells)


def loadtest(tmp_path: Path, *args: str) -> tuple[int, dict[str, Any]]:
    """``spmchain loadtest ARGS --json FILE``: the exit code and the JSON report."""
    path = tmp_path / "report.json"
    code = main(["loadtest", *args, "--json", str(path)])
    return code, json.loads(path.read_text())


def capture_simulator_stats(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Make run_loadtest's simulators leave their final stats (taken just before the run
    closes them) in the returned dict, by pool."""
    stats: dict[str, Any] = {}
    build = _loadtest.build_spms

    def build_and_watch(cfg: LoadtestConfig, pools: Any) -> Any:
        spms = build(cfg, pools)
        for pool, client in spms.items():
            close = client.close

            def close_after_stats(pool: str = pool, client: Any = client,
                                  close: Callable[[], None] = close) -> None:
                stats[pool] = client.stats()
                close()

            setattr(client, "close", close_after_stats)  # noqa: B010
        return spms

    monkeypatch.setattr(_loadtest, "build_spms", build_and_watch)
    return stats


# ----------------------------------------------------------------------------------------------
# Bad options: argparse refuses them, naming the option and the value, and nothing runs


@pytest.fixture
def nothing_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("run_loadtest was called despite a bad option")

    monkeypatch.setattr(_loadtest, "run_loadtest", refuse)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--chains", "x"], "'x' is not a whole number"),
        (["--chains", "1.5"], "'1.5' is not a whole number"),
        (["--chains", "-1"], "must not be negative, got -1"),
        (["--steps", "0"], "must be at least 1, got 0"),
        (["--pools", "0"], "must be at least 1, got 0"),
        (["--fail-rate", "1.5"], "must be within [0, 1], got 1.5"),
        (["--fail-rate", "-0.1"], "must be within [0, 1], got -0.1"),
        (["--fail-rate", "nan"], "got nan"),
        (["--task-ms", "uniform:9:3"], "'uniform:9:3': LO is above HI"),
        (["--task-ms", "bogus"], "'bogus': expected N, uniform:LO:HI"),
        (["--task-ms", "-5"], "'-5': durations must not be negative"),
        (["--task-ms", "exponential:1:2"], "'exponential:1:2': expected uniform:LO:HI"),
        (["--task-ms", "gamma:1"], "'gamma:1': expected uniform:LO:HI"),
        (["--admission-target-ms", "-1"], "got -1.0"),
        (["--admission-target-ms", "inf"], "got inf"),
        (["--max-running", "0"], "must be at least 1, got 0"),
        (["--poll-min-ms", "0"], "must be a positive, finite number, got 0.0"),
        (["--poll-max-ms", "inf"], "must be a positive, finite number, got inf"),
        (["--timeout", "-3"], "must be a positive, finite number, got -3.0"),
        (["--spm-workers", "0"], "must be at least 1, got 0"),
        (["--max-outstanding", "0"], "must be at least 1, got 0"),
        (["--seed", "x"], "invalid int value: 'x'"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_a_bad_option_exits_2_naming_the_option_and_the_value_and_runs_nothing(
    args: list[str], fragment: str, nothing_runs: None, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["loadtest", "--chains", "5", *args])
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    assert f"argument {args[0]}: " in err
    assert fragment in err
    assert "loadtest:" not in out  # no progress line: nothing ran


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--task-ms", "nan"], "--task-ms"),
        (["--task-ms", "inf"], "--task-ms"),
        (["--task-ms", "exponential:inf"], "--task-ms"),
        (["--metrics-port", "70000"], "--metrics-port"),
        (["--metrics-port", "-1"], "--metrics-port"),
        (["--poll-min-ms", "500", "--poll-max-ms", "100"], "--poll-max-ms"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_an_option_the_runtime_cannot_take_is_refused_by_the_parser(
    args: list[str], option: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["loadtest", "--chains", "0", "--store", "none", *args])
    assert exc.value.code == 2
    assert option in capsys.readouterr().err


def test_poll_max_below_poll_min_is_refused_with_the_loadtest_usage(
    nothing_runs: None, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["loadtest", "--poll-min-ms", "500", "--poll-max-ms", "100"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: spmchain loadtest ")
    assert ("spmchain loadtest: error: argument --poll-max-ms: must not be below --poll-min-ms "
            "(100 < 500)") in err


def test_an_spm_url_with_nothing_listening_raises_an_spm_error_before_any_chain(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import spm._stomp_client as stomp_client

    connected_pools = stomp_client.connected_pools
    # The loadtest waits up to 10 s for the connection; 0.5 s is enough to be refused.
    monkeypatch.setattr(stomp_client, "connected_pools",
                        lambda url, **kw: connected_pools(url, timeout=0.5))
    started: list[Any] = []
    out = io.StringIO()
    with socket.socket() as bound:  # bound, never listening: connecting is refused
        bound.bind(("127.0.0.1", 0))
        port = bound.getsockname()[1]
        cfg = LoadtestConfig(chains=5, steps=2, pools=1, spm_url=f"stomp://127.0.0.1:{port}",
                             store="memory")
        with pytest.raises(SpmError, match=f"127.0.0.1:{port}"):
            run_loadtest(cfg, out=out, on_runtime=started.append)
    assert started == []
    assert out.getvalue() == ""


def test_errors_the_parser_cannot_see_end_the_command_with_one_line_and_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import spm._stomp_client as stomp_client

    connected_pools = stomp_client.connected_pools
    monkeypatch.setattr(stomp_client, "connected_pools",
                        lambda url, **kw: connected_pools(url, timeout=0.5))
    with socket.socket() as bound:  # bound, never listening: connecting is refused
        bound.bind(("127.0.0.1", 0))
        port = bound.getsockname()[1]
        assert main(["loadtest", "--chains", "3", "--spm", f"stomp://127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spmchain loadtest: error: ") and f"127.0.0.1:{port}" in err
    assert "Traceback" not in err
    missing = tmp_path / "no-such-dir" / "x.sqlite"
    assert main(["loadtest", "--chains", "3", "--store", str(missing)]) == 2
    captured = capsys.readouterr()
    assert str(missing) in captured.err and "Traceback" not in captured.err
    assert "steps/s" not in captured.out  # nothing ran


@pytest.mark.parametrize(
    ("where", "problem"),
    [
        ("missing/x.json", "directory {tmp}/missing does not exist"),
        (".", "is a directory"),
        ("a-file/x.json", "{tmp}/a-file is not a directory"),
    ],
)
def test_a_json_file_that_cannot_be_written_is_refused_before_the_run(
    where: str, problem: str, tmp_path: Path, nothing_runs: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "a-file").write_text("")
    path = os.path.normpath(tmp_path / where)
    assert main(["loadtest", "--chains", "5", "--json", path]) == 2
    out, err = capsys.readouterr()
    assert err == f"spmchain loadtest: error: --json {path}: {problem.format(tmp=tmp_path)}\n"
    assert out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # nothing left behind


def test_a_report_that_cannot_be_written_after_the_run_exits_2_after_the_summary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    reports = tmp_path / "reports"
    reports.mkdir()
    run = _loadtest.run_loadtest

    def run_then_remove_the_directory(cfg: LoadtestConfig, **kwargs: Any) -> dict[str, Any]:
        report = run(cfg, **kwargs)
        reports.rmdir()
        return report

    monkeypatch.setattr(_loadtest, "run_loadtest", run_then_remove_the_directory)
    path = reports / "x.json"
    assert main(["loadtest", "--chains", "5", "--store", "none", "--json", str(path)]) == 2
    out, err = capsys.readouterr()
    assert re.search(r"^  ended_successfully +5$", out, re.M)  # the summary is there
    assert "report written" not in out
    assert err == (f"spmchain loadtest: error: --json {path}: the report could not be "
                   "written: No such file or directory\n")


def test_a_metrics_address_that_cannot_be_served_is_one_line_naming_both_options(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # 192.0.2.1 (TEST-NET-1) is on no host: binding it fails at once, without asking DNS.
    assert main(["loadtest", "--chains", "3", "--store", "none", "--metrics-port", "0",
                 "--metrics-addr", "192.0.2.1"]) == 2
    out, err = capsys.readouterr()
    assert err == ("spmchain loadtest: error: --metrics-addr 192.0.2.1 --metrics-port 0: "
                   "cannot serve metrics there: Cannot assign requested address\n")
    assert "steps/s" not in out  # nothing ran
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["loadtest", "--chains", "3", "--store", "none",
                     "--metrics-port", str(port)]) == 2
    assert capsys.readouterr().err == (
        f"spmchain loadtest: error: --metrics-addr 127.0.0.1 --metrics-port {port}: "
        "cannot serve metrics there: Address already in use\n")


@pytest.fixture
def served() -> Iterator[ServedSpm]:
    with served_spm("--pools", "2") as s:
        yield s


def test_more_pools_than_the_served_spm_has_is_refused_naming_both_options(
    served: ServedSpm,
) -> None:
    started: list[Any] = []
    cfg = LoadtestConfig(chains=5, steps=2, pools=3, spm_url=served.url, store="memory")
    with pytest.raises(ValueError, match=r"serves 2 pools \(pool-0, pool-1\); --pools asks "
                                         r"for 3") as exc:
        run_loadtest(cfg, out=io.StringIO(), on_runtime=started.append)
    assert f"--spm {served.url}" in str(exc.value)
    assert started == []


def test_a_run_against_the_served_spm_checks_its_ledger_and_reports_no_reaction_latency(
    served: ServedSpm,
) -> None:
    cfg = LoadtestConfig(chains=50, steps=2, pools=2, spm_url=served.url, store="memory",
                         poll_min_ms=5)
    report = run_loadtest(cfg, out=io.StringIO())
    assert (report["ended_successfully"], report["not_ended"]) == (50, 0)
    assert report["steps_fired"] == 100
    # The served ledger was read (None would mean it could not be checked).
    assert report["duplicated_effects"] == 0
    assert report["leftover_effects"] == 0
    # A remote SPM tells neither task end times nor worker time.
    assert report["reaction_latency_ms"] is None
    assert report["spm_utilization"] is None
    assert report["config"]["spm"] == served.url


# ----------------------------------------------------------------------------------------------
# Real runs through main


def test_a_small_durable_run_exits_0_and_writes_every_field_of_the_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the temporary store goes
    # 360 tasks of 5 ms on 2 x 2 workers: at least 0.45 s, so admission is sampled.
    code, r = loadtest(tmp_path, "--chains", "120", "--steps", "3", "--pools", "2",
                       "--task-ms", "5", "--spm-workers", "2", "--seed", "3")
    assert code == 0
    for key in ("chains", "ended_successfully", "ended_with_failure", "not_ended",
                "steps_fired", "wall_s", "steps_per_s", "peak_rss_mib", "duplicated_effects",
                "leftover_effects", "reaction_latency_ms", "spm_utilization",
                "cpu_utilization", "store_commits", "bounded_by", "machine", "config",
                "admission"):
        assert key in r, key
    assert (r["chains"], r["steps"], r["pools"]) == (120, 3, 2)
    assert (r["ended_successfully"], r["ended_with_failure"], r["not_ended"]) == (120, 0, 0)
    assert r["timed_out"] is False
    assert r["stopped_reason"] is None
    assert r["live_chains_at_end"] == 0
    assert r["steps_fired"] == 120 * 3
    assert r["reverts_fired"] == 0
    assert r["failure_reasons"] == {}
    assert (r["duplicated_effects"], r["leftover_effects"]) == (0, 0)
    assert r["wall_s"] > 0
    assert r["steps_per_s"] * r["wall_s"] == pytest.approx(r["steps_fired"], rel=0.02)
    assert r["peak_rss_mib"] > 1

    lat = r["reaction_latency_ms"]
    assert 0 <= lat["p50"] <= lat["p99"] <= lat["max"]
    # One sample per step after the first of each chain that ended successfully.
    assert lat["samples"] == 120 * (3 - 1)

    assert isinstance(r["spm_utilization"], float)
    assert 0 < r["spm_utilization"] <= 1
    assert 0 < r["cpu_utilization"] <= (os.cpu_count() or 1) + 0.5
    assert r["store"] == "sqlite (temporary file)"
    assert r["store_commits"] > 0
    assert isinstance(r["bounded_by"], str) and r["bounded_by"]

    assert r["machine"]["cores"] == os.cpu_count()
    assert r["machine"]["python"] == platform.python_version()
    cfg = r["config"]
    assert cfg["task_ms"] == 5.0
    assert cfg["seed"] == 3
    assert cfg["admission_target_ms"] == 12.0
    assert cfg["max_running"] is None
    assert cfg["spm"] == "in-process simulator"
    adm = r["admission"]
    assert adm["target_ms"] == 12.0
    assert adm["max_running"] is None
    assert adm["running_mean"] is not None and adm["running_max"] is not None
    assert 0 < adm["running_mean"] <= adm["running_max"] <= 120
    assert 0 <= adm["waiting_share"] <= 1

    # The temporary SQLite store is gone after the run.
    assert list(scratch.iterdir()) == []
    out = capsys.readouterr().out
    assert f"report written to {tmp_path / 'report.json'}" in out
    assert "120/120 chains ended" in out
    assert "runtime stopped" not in out
    assert re.search(r"^  bounded by +" + re.escape(r["bounded_by"]) + "$", out, re.M)


def test_instant_tasks_without_a_store_report_no_spm_utilization_and_no_commits(
    tmp_path: Path,
) -> None:
    code, r = loadtest(tmp_path, "--chains", "100", "--steps", "2", "--pools", "2",
                       "--store", "none")
    assert code == 0
    assert (r["ended_successfully"], r["not_ended"], r["steps_fired"]) == (100, 0, 200)
    assert r["spm_utilization"] is None  # no worker time is spent on 0 ms tasks
    assert r["store"] is None
    assert r["store_commits"] == 0
    assert r["store_busy"] == 0.0
    assert r["reaction_latency_ms"]["samples"] == 100


def test_failing_tasks_end_chains_with_failure_reverted_and_nothing_left_behind(
    tmp_path: Path, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    stats = capture_simulator_stats(monkeypatch)
    code, r = loadtest(tmp_path, "--chains", "200", "--steps", "3", "--pools", "2",
                       "--fail-rate", "0.3", "--seed", str(seed), "--store", "memory")
    assert code == 0
    assert r["not_ended"] == 0
    assert r["ended_with_failure"] > 0
    assert r["ended_successfully"] > 0
    assert r["ended_successfully"] + r["ended_with_failure"] == 200
    assert r["reverts_fired"] > 0
    assert r["leftover_effects"] == 0
    assert r["duplicated_effects"] == 0
    assert r["config"]["fail_rate"] == 0.3
    # A chain that failed at step k fired k + 1 steps and reverted the k before.
    at_step: dict[int, int] = {}
    for reason, n in r["failure_reasons"].items():
        m = STEP_FAILED.match(reason)
        assert m, f"unexpected failure reason {reason!r}"
        at_step[int(m.group(1))] = at_step.get(int(m.group(1)), 0) + n
    assert sum(at_step.values()) == r["ended_with_failure"]
    assert r["reverts_fired"] == sum(k * n for k, n in at_step.items())
    assert r["steps_fired"] == 3 * r["ended_successfully"] + sum(
        (k + 1) * n for k, n in at_step.items())
    # Each chain that ended with failure had exactly one task fail on the SPM.
    assert sum(s.tasks_failed for s in stats.values()) == r["ended_with_failure"]


def test_max_running_caps_the_chains_running_at_once_on_each_pool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stats = capture_simulator_stats(monkeypatch)
    pools = 3
    code, r = loadtest(tmp_path, "--chains", "60", "--steps", "2", "--pools", str(pools),
                       "--task-ms", "5", "--max-running", "2", "--admission-target-ms", "0",
                       "--store", "memory")
    assert code == 0
    assert (r["ended_successfully"], r["not_ended"]) == (60, 0)
    assert r["config"]["max_running"] == 2
    assert r["config"]["admission_target_ms"] is None  # 0: no adaptive limit
    adm = r["admission"]
    assert adm["max_running"] == 2 and adm["target_ms"] is None
    assert adm["running_max"] is not None
    assert 1 <= adm["running_max"] <= 2 * pools
    assert adm["waiting_share"] > 0  # 20 chains a pool, 2 let run: the others waited
    # On each simulated SPM, never more than 2 tasks (one a chain) unfinished at once.
    assert len(stats) == pools
    assert all(1 <= s.max_unfinished <= 2 for s in stats.values()), stats
    assert "--max-running 2" in r["bounded_by"]


def test_a_run_that_times_out_reports_the_chains_not_ended_and_exits_1(
    tmp_path: Path,
) -> None:
    code, r = loadtest(tmp_path, "--chains", "40", "--steps", "2", "--pools", "1",
                       "--task-ms", "2000", "--timeout", "0.1", "--store", "memory")
    assert code == 1
    assert r["timed_out"] is True
    assert r["not_ended"] > 0
    assert r["ended_successfully"] + r["ended_with_failure"] + r["not_ended"] == 40
    assert r["live_chains_at_end"] == r["not_ended"]


def test_a_run_whose_runtime_stops_ends_at_once_says_why_and_exits_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _loadtest.LoadtestConfig

    def with_failing_spm_task_actors(**kwargs: Any) -> LoadtestConfig:
        return config(**kwargs, options={"fault_rates": {"spm_task": 1.0}, "fault_seed": 1})

    monkeypatch.setattr(_loadtest, "LoadtestConfig", with_failing_spm_task_actors)
    code, r = loadtest(tmp_path, "--chains", "40", "--steps", "2", "--pools", "1",
                       "--store", "memory", "--timeout", "30")
    assert code == 1
    assert r["stopped_reason"].startswith("supervisor escalated: spm_task actors failed")
    assert r["timed_out"] is False  # it did not wait out --timeout
    assert r["wall_s"] < 15
    assert r["not_ended"] > 0
    out = capsys.readouterr().out
    assert re.search(r"^  runtime stopped +supervisor escalated: spm_task actors failed", out,
                     re.M)


def test_zero_chains_is_a_valid_empty_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                          ) -> None:
    code, r = loadtest(tmp_path, "--chains", "0", "--store", "none")
    assert code == 0
    assert (r["chains"], r["steps_fired"], r["not_ended"]) == (0, 0, 0)
    assert r["reaction_latency_ms"] is None
    assert r["admission"]["running_mean"] is None
    out = capsys.readouterr().out
    assert re.search(r"^  reaction p50/p99/max +n/a$", out, re.M)
    assert re.search(r"^  running at once +n/a$", out, re.M)


# ----------------------------------------------------------------------------------------------
# Progress and the summary table


def test_on_a_pipe_progress_is_plain_periodic_lines_then_the_summary_table() -> None:
    out = io.StringIO()
    # 160 tasks of 10 ms on 2 x 2 workers: at least 0.4 s, checked every 0.1 s.
    cfg = LoadtestConfig(chains=80, steps=2, pools=2, task_ms=10.0, spm_workers=2,
                         store="memory")
    report = run_loadtest(cfg, out=out, progress_every_s=0.05)
    assert report["wall_s"] >= 0.4
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) >= 4, text  # 3 periodic lines at least, then the final one
    done = []
    for line in lines:
        m = PROGRESS_LINE.match(line)
        assert m, f"not a progress line: {line!r}"
        assert m.group(2) == "80"
        done.append(int(m.group(1)))
    assert done == sorted(done)
    assert done[-1] == 80
    assert done[0] < 80  # the first line came while chains were still running

    table = summary_table(report)
    for label in ("bounded by", "steps/s", "reaction p50/p99/max", "running at once",
                  "duplicated effects", "leftover effects", "store commits"):
        assert re.search(rf"^  {re.escape(label)} +\S", table, re.M), label
    lat = report["reaction_latency_ms"]
    assert (f"{lat['p50']:.1f} / {lat['p99']:.1f} / {lat['max']:.1f} ms") in table
    assert f"{report['admission']['running_max']} at most" in table


def test_on_a_terminal_progress_is_one_line_rewritten_with_carriage_returns() -> None:
    out = FakeTerminal()
    cfg = LoadtestConfig(chains=150, steps=3, pools=2, store=None)
    run_loadtest(cfg, out=out, progress_every_s=0.01)
    text = out.getvalue()
    assert text.startswith("\r[")
    assert text.count("\n") == 1 and text.endswith("\n")
    last = text.rstrip("\n").rsplit("\r", 1)[1]
    assert last.startswith("[" + "#" * 30 + "] 150/150 chains  ")


def test_progress_on_a_terminal_updates_a_bar_and_ends_the_line_only_at_the_end() -> None:
    out = FakeTerminal()
    progress = _Progress(10, out, every_s=5.0)
    assert progress.every_s == 0.2  # a terminal is updated often whatever was asked
    progress.t0 = time.monotonic() - 10.0  # rates of a few steps/s, whatever the machine
    progress.show(3, 1, 30)
    assert out.getvalue().startswith("\r[" + "#" * 9 + "-" * 21 + "] 3/10 chains  ")
    assert "1 failed" in out.getvalue()
    assert "\n" not in out.getvalue()
    progress.show(10, 2, 100, final=True)
    segments = out.getvalue().split("\r")
    assert segments[0] == "" and len(segments) == 3
    assert segments[2].startswith("[" + "#" * 30 + "] 10/10 chains  ")
    # The line may be padded with spaces to cover a longer one before it.
    assert segments[2].endswith("\n") and segments[2].rstrip(" \n").endswith("s")
    assert "2 failed" in segments[2]


def test_progress_on_a_pipe_is_one_line_a_call_and_keeps_the_asked_interval() -> None:
    out = io.StringIO()
    progress = _Progress(10, out, every_s=5.0)
    assert progress.every_s == 5.0
    progress.show(3, 1, 30)
    progress.show(10, 2, 100, final=True)
    lines = out.getvalue().splitlines()
    assert [PROGRESS_LINE.match(line) is not None for line in lines] == [True, True]
    assert lines[0].startswith("loadtest: 3/10 chains ended, ")
    assert ", 2 failed, " in lines[1]


def test_a_live_line_that_gets_shorter_leaves_nothing_of_the_previous_one() -> None:
    out = FakeTerminal()
    progress = _Progress(10, out, every_s=0.2)
    progress.t0 = time.monotonic() - 1.0
    progress.show(1, 0, 12_000)  # ~12,000 steps/s
    progress.show(2, 0, 9_000)   # ~9,000 steps/s: one character shorter
    last = out.getvalue().rsplit("\r", 1)[1]
    assert screen_line(out.getvalue()).rstrip() == last.rstrip()


# ----------------------------------------------------------------------------------------------
# bounded_by on made-up reports: the first check that holds names the bound


CFG = LoadtestConfig(poll_min_ms=20.0)


def report_with(**overrides: Any) -> dict[str, Any]:
    """A report where every check holds: SPM busy, chains waited, CPU and store busy, slow
    reactions. Tests switch them off one at a time."""
    report: dict[str, Any] = {
        "spm_utilization": 0.95,
        "cpu_utilization": 1.5,
        "store_busy": 0.7,
        "reaction_latency_ms": {"p50": 15.0, "p99": 30.0, "max": 40.0, "samples": 10},
        "admission": {"target_ms": 12.0, "max_running": None, "running_mean": 37.4,
                      "running_max": 50, "waiting_share": 0.8},
    }
    report.update(overrides)
    return report


QUIET_ADMISSION = {"target_ms": 12.0, "max_running": None, "running_mean": 10.0,
                   "running_max": 12, "waiting_share": 0.1}


def test_bounded_by_checks_spm_then_admission_then_cpu_then_store_then_polling() -> None:
    r = report_with()
    assert bounded_by(r, CFG) == "SPM workers (95% busy)"
    r["spm_utilization"] = 0.5
    assert bounded_by(r, CFG).startswith("admission (about 37 chains running at once")
    r["admission"] = QUIET_ADMISSION
    assert bounded_by(r, CFG).startswith("CPU (the process used 1.50 cores of ")
    r["cpu_utilization"] = 0.3
    assert bounded_by(r, CFG) == "snapshot store (committing 70% of the wall time)"
    r["store_busy"] = 0.1
    assert bounded_by(r, CFG) == ("polling (reaction p50 15.0 ms against a 20 ms minimum poll "
                                  "interval)")
    r["reaction_latency_ms"] = {"p50": 2.0, "p99": 3.0, "max": 4.0, "samples": 10}
    assert bounded_by(r, CFG) == "outstanding limit or latency (CPU 0.30 cores, SPM 50% busy)"


@pytest.mark.parametrize(
    ("overrides", "starts"),
    [
        ({"spm_utilization": 0.9}, "SPM workers (90% busy)"),
        ({"spm_utilization": 0.899}, "admission"),
        ({"spm_utilization": None}, "admission"),
        ({"spm_utilization": None, "admission": {**QUIET_ADMISSION, "waiting_share": 0.5}},
         "admission"),
        ({"spm_utilization": None, "admission": {**QUIET_ADMISSION, "waiting_share": 0.49}},
         "CPU"),
        # waiting without any running sample is not evidence of admission
        ({"spm_utilization": None,
          "admission": {**QUIET_ADMISSION, "waiting_share": 0.9, "running_mean": None}}, "CPU"),
        ({"spm_utilization": None, "admission": None, "cpu_utilization": 0.85}, "CPU"),
        ({"spm_utilization": None, "admission": None, "cpu_utilization": 0.84},
         "snapshot store"),
        ({"spm_utilization": None, "admission": None, "cpu_utilization": None,
          "store_busy": 0.5}, "snapshot store"),
        ({"spm_utilization": None, "admission": None, "cpu_utilization": None,
          "store_busy": 0.49}, "polling"),
        ({"spm_utilization": None, "admission": None, "cpu_utilization": None,
          "store_busy": None, "reaction_latency_ms": {"p50": 10.0}}, "polling"),
        ({"spm_utilization": None, "admission": None, "cpu_utilization": None,
          "store_busy": None, "reaction_latency_ms": {"p50": 9.99}}, "outstanding limit"),
        ({"spm_utilization": None, "admission": None, "cpu_utilization": None,
          "store_busy": None, "reaction_latency_ms": None}, "outstanding limit"),
    ],
)
def test_bounded_by_thresholds(overrides: dict[str, Any], starts: str) -> None:
    assert bounded_by(report_with(**overrides), CFG).startswith(starts)


def test_bounded_by_admission_names_the_target_or_the_fixed_limit_and_the_polling() -> None:
    r = report_with(spm_utilization=None)
    text = bounded_by(r, CFG)
    assert "keeping the runtime's own reaction delay under 12 ms" in text
    assert "CPU 1.50 cores" in text
    assert "reaction p50 15.0 ms against a 20 ms minimum poll interval" in text
    r["admission"] = {**r["admission"], "target_ms": None, "max_running": 3}
    r["reaction_latency_ms"] = None
    text = bounded_by(r, CFG)
    assert "--max-running 3" in text
    assert "reaction delay" not in text
    assert "poll" not in text


def test_bounded_by_cpu_mentions_the_store_only_when_it_committed() -> None:
    r = report_with(spm_utilization=None, admission=None, store_busy=0.25)
    assert bounded_by(r, CFG) == (f"CPU (the process used 1.50 cores of {os.cpu_count()}; "
                                  "the store's commits took 25% of the wall time)")
    r["store_busy"] = 0.0
    assert bounded_by(r, CFG) == f"CPU (the process used 1.50 cores of {os.cpu_count()})"


# ----------------------------------------------------------------------------------------------
# reaction_latency, spm_utilization, check_ledgers on fake SPMs


def created(task_id: str, at: float, verb: str = "createVolume", action: str = "apply",
            op: str = "create") -> SimpleNamespace:
    return SimpleNamespace(at=at, task_id=task_id, verb=verb, action=action, op=op)


def with_history(*events: SimpleNamespace) -> Any:
    return SimpleNamespace(ledger_history=lambda: list(events))


def test_reaction_latency_percentiles_from_task_ends_to_next_steps_fired() -> None:
    # 101 tasks ending at t=1000 on two pools, the next step fired 0..100 ms later.
    events = [created(f"t{i}", 1000.0) for i in range(101)]
    spms: dict[str, Any] = {"a": with_history(*events[:50]), "b": with_history(*events[50:])}
    pairs = [(f"t{i}", 1000.0 + i / 1000.0) for i in reversed(range(101))]
    assert reaction_latency(spms, pairs) == {"p50": 50.0, "p99": 99.0, "max": 100.0,
                                             "samples": 101}


def test_reaction_latency_uses_each_tasks_first_create_and_ignores_other_events() -> None:
    spm = with_history(
        created("t1", 10.000),                    # the image, then the volume, of task t1
        created("t1", 10.500),
        created("t2", 20.000, action="rollback"),  # not an effect applied
        created("t3", 30.000, op="remove"),
        created("t4", 40.000, verb="deleteVolume"),
        created("t5", 50.000),
    )
    pairs = [("t1", 10.020), ("t2", 20.5), ("t3", 30.5), ("t4", 40.5), ("t5", 49.0),
             ("unknown", 1.0)]
    # t1: 20 ms from its first create; t5 fired "before" its end (clocks): 0, not negative.
    # Of the 2 samples [0, 20], p50 is the lower one.
    assert reaction_latency({"p": spm}, pairs) == {"p50": 0.0, "p99": 20.0, "max": 20.0,
                                                   "samples": 2}


def test_reaction_latency_is_none_without_ledger_history_or_without_matching_samples() -> None:
    remote: Any = SimpleNamespace()
    local = with_history(created("t1", 1.0))
    assert reaction_latency({"a": local, "b": remote}, [("t1", 1.01)]) is None
    assert reaction_latency({"a": local}, [("other", 1.01)]) is None
    assert reaction_latency({"a": local}, []) is None


def with_stats(busy: float, workers: int) -> Any:
    return SimpleNamespace(stats=lambda: SimpleNamespace(worker_busy_seconds=busy,
                                                         workers=workers))


def test_spm_utilization_is_busy_worker_time_over_capacity_of_all_pools() -> None:
    spms: dict[str, Any] = {"a": with_stats(3.0, 2), "b": with_stats(1.0, 2)}
    assert spm_utilization(spms, 2.0) == 0.5  # 4 busy seconds of 2 x 2 workers x 2 s
    assert spm_utilization({"a": with_stats(1.0, 3)}, 1.0) == pytest.approx(0.3333, abs=1e-4)
    assert spm_utilization({"a": with_stats(50.0, 2)}, 1.0) == 1.0  # capped


def test_spm_utilization_is_none_without_stats_or_busy_time_or_wall_time() -> None:
    no_stats: Any = SimpleNamespace()
    assert spm_utilization({"a": with_stats(1.0, 2), "b": no_stats}, 1.0) is None
    assert spm_utilization({"a": with_stats(0.0, 2)}, 1.0) is None
    assert spm_utilization({"a": with_stats(1.0, 2)}, 0.0) is None


def test_check_ledgers_counts_duplicates_and_objects_of_failed_chains_only() -> None:
    pools = pool_ids(2, 5)
    rng = random.Random(5)
    specs = [chain_spec(i, pools[i % 2], 2, rng) for i in range(3)]

    def obj(spec: Any) -> SimpleNamespace:
        return SimpleNamespace(sd_uuid=spec.params["sdUUID"], img_uuid=spec.params["imgUUID"])

    local = SimpleNamespace(objects=lambda: [obj(specs[0]), obj(specs[1]), obj(specs[1])],
                            duplicated_effects=lambda: 2)
    served = SimpleNamespace(ledger_summary=lambda: {
        "duplicated_effects": 1,
        "objects": [{"sd_uuid": specs[2].params["sdUUID"],
                     "img_uuid": specs[2].params["imgUUID"]}],
    })
    spms: dict[str, Any] = {"a": local, "b": served}
    assert check_ledgers(spms, [specs[1], specs[2]]) == {"duplicated_effects": 3,
                                                         "leftover_effects": 3}
    assert check_ledgers(spms, []) == {"duplicated_effects": 3, "leftover_effects": 0}
    spms["c"] = SimpleNamespace()
    assert check_ledgers(spms, [specs[1]]) == {"duplicated_effects": None,
                                               "leftover_effects": None}


def test_the_chains_sampled_for_reaction_latency_are_the_same_in_every_process() -> None:
    ids = [f"lt-{i:07d}" for i in range(2000)]
    here = [c for c in ids if reaction_sampled(c, 7)]
    assert 2000 / 7 * 0.8 < len(here) < 2000 / 7 * 1.2  # about one in 7
    program = ("from actors._loadtest import reaction_sampled\n"
               "print(' '.join(f'lt-{i:07d}' for i in range(2000) "
               "if reaction_sampled(f'lt-{i:07d}', 7)))")
    for hash_seed in ("1", "2"):  # str hashes differ between these two processes
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        child = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                               env=env, cwd=REPO, timeout=30, check=True)
        assert child.stdout.split() == here, hash_seed


def test_a_run_samples_the_reaction_latency_of_the_chains_reaction_sampled_picks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_loadtest, "REACTION_PAIRS", 40)  # 60 chains x 2 pairs: one in 3
    cfg = LoadtestConfig(chains=60, steps=3, pools=2, store=None, seed=5)
    report = run_loadtest(cfg, out=io.StringIO())
    assert report["ended_successfully"] == 60
    picked = [i for i in range(60) if reaction_sampled(f"lt-{i:07d}", 3)]
    assert 0 < len(picked) < 60
    assert report["reaction_latency_ms"]["samples"] == 2 * len(picked)


def test_the_workload_builds_each_volume_on_the_previous_one_in_an_image_of_its_own() -> None:
    pools = pool_ids(2, 9)
    assert pools == pool_ids(2, 9) and len(set(pools)) == 2
    rng = random.Random(9)
    a, b = chain_spec(0, pools[0], 3, rng), chain_spec(1, pools[1], 3, rng)
    assert a.chain_id == "lt-0000000" and b.chain_id == "lt-0000001"
    assert a.params["imgUUID"] != b.params["imgUUID"]
    assert [s.verb for s in a.steps or ()] == ["createVolume"] * 3
    steps = list(a.steps or ())
    assert "srcVolUUID" not in steps[0].params
    for prev, step in itertools.pairwise(steps):
        assert step.params["srcVolUUID"] == prev.params["volUUID"]
        assert step.params["srcImgUUID"] == a.params["imgUUID"]
    for step in steps:
        assert step.params["spUUID"] == pools[0]
        assert step.revert_verb == "deleteVolume"
        assert step.revert_params == {k: step.params[k]
                                      for k in ("sdUUID", "spUUID", "imgUUID", "volUUID")}
        assert step.exclusive == (f"image:{a.params['sdUUID']}/{a.params['imgUUID']}",)
