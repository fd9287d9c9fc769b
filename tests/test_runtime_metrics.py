"""The metrics of a real runtime: what its HTTP server exposes after chains ran, read by
promtool, a real Prometheus and the dashboard; and the same during ``spmchain loadtest``."""

from __future__ import annotations

import functools
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from _prometheus import PROMETHEUS, SKIP_REASON, PrometheusLauncher, Sample, free_port
from conftest import FAST, WAIT, EndLog
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from test_dashboard import METRIC_NAME, dashboard_queries, load_dashboard

from actors._loadtest import chain_spec, pool_ids
from actors._runtime import ChainResult, Runtime, RuntimeOptions
from spm._client import TaskStatus
from spm._errors import NotSpmError
from spm._simulator import SimulatedSpm

REPO = Path(__file__).resolve().parents[1]
PROMTOOL = shutil.which("promtool")
NO_PROMTOOL = "promtool is not installed (Debian package 'prometheus'; .ci/run installs it)"

SEED = 5
CHAINS = 60
STEPS = 3
FAILING_POLLS = 3
"""Polls of each pool's SPM that fail before it answers: every pool shows poll errors."""


class FlakyPollSpm(SimulatedSpm):
    """A simulated SPM whose first ``failing_polls`` calls of getAllTasksStatuses raise
    NotSpmError (654), as VDSM answers on a host that lost the SPM role."""

    def __init__(self, pool: str, *, failing_polls: int, **kwargs: Any) -> None:
        super().__init__(pool, **kwargs)
        self._poll_failures_left = failing_polls
        self._poll_failures_lock = threading.Lock()

    def getAllTasksStatuses(self) -> dict[str, TaskStatus]:  # noqa: N802
        with self._poll_failures_lock:
            fail = self._poll_failures_left > 0
            if fail:
                self._poll_failures_left -= 1
        if fail:
            raise NotSpmError("this host is not the SPM (injected by the test)")
        return super().getAllTasksStatuses()


def scrape(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        text: str = response.read().decode()
        return text


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Every sample of an exposition: (sample name, labels, value)."""
    return [
        (s.name, dict(s.labels), float(s.value))
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def total(text: str, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``; -1 if none."""
    found = [v for n, lbl, v in samples(text) if n == name
             and all(lbl.get(k) == want for k, want in labels.items())]
    return sum(found) if found else -1.0


def has_values(result: list[Sample], want: list[float]) -> bool:
    """A Prometheus instant vector holds exactly the values ``want``."""
    return [float(sample["value"][1]) for sample in result] == want


def family_types(text: str) -> dict[str, str]:
    """Metric family name (counters without ``_total``) -> type, as a scraper parses them."""
    return {family.name: family.type for family in text_string_to_metric_families(text)}


def promtool_check(text: str) -> subprocess.CompletedProcess[bytes]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, "check", "metrics"], input=text.encode(),
                          capture_output=True, timeout=30, check=False)


@dataclass
class FinishedRun:
    """A runtime that ran CHAINS chains to their end and still serves its metrics."""

    rt: Runtime
    pools: list[str]
    results: list[ChainResult]
    exposition: str

    def outcomes(self, outcome: str) -> int:
        return sum(1 for r in self.results if r.outcome == outcome)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FinishedRun]:
    """One workload for the module: CHAINS chains over 2 pools with a durable store, a fifth of
    the createVolume tasks failing (chains reverted), the first polls of each pool failing and
    command actors crashing on 2 % of their messages (rebuilt by the supervisor)."""
    pools = pool_ids(2, SEED)
    spms = {
        p: FlakyPollSpm(p, failing_polls=FAILING_POLLS, durations=0.002,
                        failure_rates={"createVolume": 0.2}, seed=SEED * 10 + i)
        for i, p in enumerate(pools)
    }
    options = RuntimeOptions(**{**FAST, "fault_rates": {"command": 0.02}, "fault_seed": SEED})
    store = tmp_path_factory.mktemp("runtime-metrics") / "snapshots.sqlite"
    rt = Runtime(spms, options, store=store, metrics_port=0).start()
    try:
        ends = EndLog(rt)
        rng = random.Random(SEED)
        for i in range(CHAINS):
            rt.submit(chain_spec(i, pools[i % len(pools)], STEPS, rng))
        results = ends.wait(CHAINS, timeout=60.0)
        assert rt.metrics_server is not None
        yield FinishedRun(rt, pools, results, scrape(rt.metrics_server.url))
    finally:
        rt.stop()
        for spm in spms.values():
            spm.close()


def test_a_runtime_exposes_what_its_chains_did_with_nonzero_values(
    finished_run: FinishedRun,
) -> None:
    text, pools = finished_run.exposition, finished_run.pools
    ok = finished_run.outcomes("ended_successfully")
    failed = finished_run.outcomes("ended_with_failure")
    assert ok > 0 and failed > 0, "the workload should end chains both ways"

    assert total(text, "spmchain_chains_started_total") == CHAINS
    assert total(text, "spmchain_chains_started_total",
                 command_type="loadtest_volume_chain") == CHAINS
    assert total(text, "spmchain_chains_ended_total", outcome="ended_successfully") == ok
    assert total(text, "spmchain_chains_ended_total", outcome="ended_with_failure") == failed
    assert total(text, "spmchain_chains_in_flight") == 0
    assert total(text, "spmchain_steps_fired_total", verb="createVolume") >= CHAINS
    assert total(text, "spmchain_reverts_fired_total", verb="deleteVolume") > 0
    assert total(text, "spmchain_task_duration_seconds_count", verb="createVolume") >= CHAINS
    assert total(text, "spmchain_task_duration_seconds_sum", verb="createVolume") > 0
    assert total(text, "spmchain_task_duration_seconds_bucket", verb="createVolume",
                 le="+Inf") >= CHAINS
    assert total(text, "spmchain_reaction_latency_seconds_count") > 0
    for pool in pools:
        assert total(text, "spmchain_poll_duration_seconds_count", pool=pool) > 0, pool
        assert total(text, "spmchain_poll_errors_total", pool=pool) == FAILING_POLLS, pool
    assert total(text, "spmchain_actor_restarts_total", kind="command") > 0
    assert total(text, "spmchain_snapshot_commit_seconds_count") > 0
    assert total(text, "spmchain_snapshot_commit_batch_size_sum") > 0


def test_no_chain_or_task_id_appears_in_any_label(finished_run: FinishedRun) -> None:
    ids = {r.chain_id for r in finished_run.results}
    ids |= {s.task_id for r in finished_run.results for s in r.state.steps if s.task_id}
    for name, labels, _ in samples(finished_run.exposition):
        leaked = ids & set(labels.values())
        assert not leaked, (name, labels)


@pytest.mark.skipif(PROMTOOL is None, reason=NO_PROMTOOL)
def test_promtool_check_metrics_reports_nothing_on_a_runtime_exposition(
    finished_run: FinishedRun,
) -> None:
    result = promtool_check(finished_run.exposition)
    assert result.returncode == 0, result
    assert result.stdout == b"", result.stdout.decode()
    assert result.stderr == b"", result.stderr.decode()


def test_every_metric_the_dashboard_queries_is_in_a_real_runtime_exposition(
    finished_run: FinishedRun,
) -> None:
    exposed = {name for name, _, _ in samples(finished_run.exposition)}
    queried = {m for q in dashboard_queries(load_dashboard()) for m in METRIC_NAME.findall(q)}
    assert queried, "the dashboard queries no spmchain metric"
    assert sorted(queried - exposed) == []


@pytest.mark.skipif(PROMETHEUS is None, reason=SKIP_REASON)
def test_a_real_prometheus_reads_chains_ended_back_from_a_running_runtime(
    finished_run: FinishedRun, tmp_path: Path
) -> None:
    server = finished_run.rt.metrics_server
    assert server is not None
    with PrometheusLauncher(tmp_path) as launch:
        prom = launch(f"127.0.0.1:{server.port}")
        for outcome in ("ended_successfully", "ended_with_failure"):
            want = float(finished_run.outcomes(outcome))
            result = prom.wait_for(
                f'sum(spmchain_chains_ended_total{{outcome="{outcome}"}})',
                until=functools.partial(has_values, want=[want]),
            )
            assert result
        (up,) = prom.query('up{job="spmchain"}')
        assert up["value"][1] == "1"


@pytest.fixture
def long_task_spms() -> Iterator[dict[str, SimulatedSpm]]:
    made = {p: SimulatedSpm(p, durations=10.0) for p in pool_ids(2, SEED)}
    yield made
    for spm in made.values():
        spm.close()


def wait_for_metric(url: str, name: str, want: float, timeout: float = WAIT, **labels: str) -> str:
    """Scrape ``url`` every 10 ms until ``name`` (summed over ``labels``) is ``want``."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while True:
        text = scrape(url)
        if total(text, name, **labels) == want:
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"{name}{labels} is {total(text, name, **labels)}, not {want}, "
                                 f"after {timeout} s")
        pause.wait(0.01)


def test_chains_in_flight_and_spm_slots_show_live_chains_while_their_tasks_run(
    long_task_spms: dict[str, SimulatedSpm],
) -> None:
    pools = sorted(long_task_spms)
    rng = random.Random(SEED)
    with Runtime(long_task_spms, RuntimeOptions(**FAST), metrics_port=0) as rt:
        assert rt.metrics_server is not None
        url = rt.metrics_server.url
        for i in range(6):
            rt.submit(chain_spec(i, pools[i % 2], 2, rng))
        text = wait_for_metric(url, "spmchain_spm_tasks_outstanding", 6)
        assert total(text, "spmchain_chains_in_flight") == 6
        for pool in pools:
            assert total(text, "spmchain_spm_tasks_outstanding", pool=pool) == 3
        assert total(text, "spmchain_steps_fired_total", verb="createVolume") == 6
        assert total(text, "spmchain_chains_ended_total") == 0


def test_the_metrics_server_binds_loopback_and_is_gone_after_stop(
    long_task_spms: dict[str, SimulatedSpm],
) -> None:
    rt = Runtime(long_task_spms, RuntimeOptions(**FAST), metrics_port=0).start()
    try:
        server = rt.metrics_server
        assert server is not None
        assert server.addr == "127.0.0.1"
        assert server.url == f"http://127.0.0.1:{server.port}/metrics"
        text = scrape(server.url)
        assert family_types(text)["spmchain_chains_started"] == "counter"
    finally:
        rt.stop()
    with pytest.raises(urllib.error.URLError):
        scrape(server.url, timeout=2.0)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # SO_REUSEADDR lets the scrape's connection linger in TIME_WAIT; a listener still on
        # the port would make bind fail.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", server.port))
        s.listen()


def test_a_runtime_without_metrics_port_serves_nothing(
    long_task_spms: dict[str, SimulatedSpm],
) -> None:
    with Runtime(long_task_spms, RuntimeOptions(**FAST)) as rt:
        assert rt.metrics_server is None


def test_two_runtimes_in_one_process_have_separate_registries() -> None:
    pools_a = pool_ids(1, SEED)
    pools_b = pool_ids(1, SEED + 1)
    spms_a = {p: SimulatedSpm(p) for p in pools_a}
    spms_b = {p: SimulatedSpm(p) for p in pools_b}
    rng = random.Random(SEED)
    with Runtime(spms_a, RuntimeOptions(**FAST), metrics_port=0) as a, \
            Runtime(spms_b, RuntimeOptions(**FAST), metrics_port=0) as b:
        assert a.metrics.registry is not b.metrics.registry
        assert a.metrics_server is not None and b.metrics_server is not None
        assert a.metrics_server.port != b.metrics_server.port
        done_a = [a.submit(chain_spec(i, pools_a[0], 2, rng)) for i in range(3)]
        done_b = [b.submit(chain_spec(3, pools_b[0], 2, rng))]
        for handle in (*done_a, *done_b):
            assert handle.result(WAIT).succeeded
        text_a = scrape(a.metrics_server.url)
        text_b = scrape(b.metrics_server.url)
    assert total(text_a, "spmchain_chains_ended_total", outcome="ended_successfully") == 3
    assert total(text_b, "spmchain_chains_ended_total", outcome="ended_successfully") == 1
    assert total(text_a, "spmchain_poll_errors_total", pool=pools_b[0]) == -1
    assert total(text_b, "spmchain_poll_errors_total", pool=pools_a[0]) == -1
    assert not [n for n in REGISTRY._names_to_collectors if n.startswith("spmchain_")]


# --------------------------------------------------------------------------------------------
# spmchain loadtest --metrics-port


LOADTEST_ACTIVITY: Sequence[tuple[str, dict[str, str]]] = (
    ("spmchain_chains_started_total", {}),
    ("spmchain_chains_ended_total", {"outcome": "ended_successfully"}),
    ("spmchain_chains_ended_total", {"outcome": "ended_with_failure"}),
    ("spmchain_chains_in_flight", {}),
    ("spmchain_steps_fired_total", {"verb": "createVolume"}),
    ("spmchain_task_duration_seconds_count", {"verb": "createVolume"}),
    ("spmchain_reaction_latency_seconds_count", {}),
    ("spmchain_poll_duration_seconds_count", {}),
    ("spmchain_snapshot_commit_seconds_count", {}),
)
"""What must be above zero in one scrape taken while the loadtest runs."""

LOADTEST_DECLARED = ("spmchain_poll_errors", "spmchain_actor_restarts")
"""Metric families that must be exposed even when nothing happened (no sample needed for
restarts: a kind's series appears with its first restart)."""


def test_loadtest_serves_its_metrics_with_nonzero_values_while_it_runs() -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "actors._cli", "loadtest", "--chains", "2000",
           "--task-ms", "5", "--fail-rate", "0.05", "--seed", str(SEED),
           "--metrics-port", str(port), "--timeout", "60"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    url = f"http://127.0.0.1:{port}/metrics"
    deadline = time.monotonic() + 30.0
    pause = threading.Event()
    busy: str | None = None
    last = ""
    try:
        while busy is None and proc.poll() is None and time.monotonic() < deadline:
            try:
                last = scrape(url, timeout=2.0)
            except (urllib.error.URLError, ConnectionError):
                pause.wait(0.02)  # not serving yet
                continue
            if all(total(last, name, **labels) > 0 for name, labels in LOADTEST_ACTIVITY):
                busy = last
            else:
                pause.wait(0.02)
        assert busy is not None, (
            f"no scrape showed every metric above zero before the loadtest ended or 30 s "
            f"passed (exit status {proc.poll()}); last scrape:\n{last[:3000]}"
        )
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)
    assert proc.returncode == 0, (out, err)
    assert f"metrics at {url}" in out
    types = family_types(busy)
    for name in LOADTEST_DECLARED:
        assert types.get(name) == "counter", name
    if PROMTOOL is not None:
        result = promtool_check(busy)
        assert result.returncode == 0 and result.stdout == b"" and result.stderr == b"", result
    # The server is stopped with the loadtest.
    with pytest.raises(urllib.error.URLError):
        scrape(url, timeout=2.0)
