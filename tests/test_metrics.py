"""RuntimeMetrics: names, types, labels, values, isolation, thread safety, exposition."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from typing import Any
from wsgiref.util import setup_testing_defaults

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from metrics._exposition import MetricsServer, make_wsgi_app, start_metrics_server
from metrics._metrics import (
    ENDED_SUCCESSFULLY,
    ENDED_WITH_FAILURE,
    REACTION_LATENCY_BUCKETS,
    TASK_DURATION_BUCKETS,
    RuntimeMetrics,
)

# name (as exposed, counters with _total) -> (type, label names)
SPECIFIED: dict[str, tuple[str, frozenset[str]]] = {
    "spmchain_chains_started_total": ("counter", frozenset({"command_type"})),
    "spmchain_chains_resumed_total": ("counter", frozenset({"command_type"})),
    "spmchain_chains_ended_total": ("counter", frozenset({"outcome", "command_type"})),
    "spmchain_chains_in_flight": ("gauge", frozenset()),
    "spmchain_steps_fired_total": ("counter", frozenset({"verb"})),
    "spmchain_reverts_fired_total": ("counter", frozenset({"verb"})),
    "spmchain_task_duration_seconds": ("histogram", frozenset({"verb"})),
    "spmchain_reaction_latency_seconds": ("histogram", frozenset()),
    "spmchain_poll_duration_seconds": ("histogram", frozenset({"pool"})),
    "spmchain_poll_errors_total": ("counter", frozenset({"pool"})),
    "spmchain_spm_tasks_outstanding": ("gauge", frozenset({"pool"})),
    "spmchain_spm_tasks_queued": ("gauge", frozenset({"pool"})),
    "spmchain_chains_waiting": ("gauge", frozenset({"pool"})),
    "spmchain_chains_running": ("gauge", frozenset({"pool"})),
    "spmchain_chains_running_limit": ("gauge", frozenset({"pool"})),
    "spmchain_zombie_tasks_total": ("counter", frozenset({"pool"})),
    "spmchain_orphan_tasks_total": ("counter", frozenset({"pool"})),
    "spmchain_actor_restarts_total": ("counter", frozenset({"kind"})),
    "spmchain_supervisor_escalations_total": ("counter", frozenset()),
    "spmchain_snapshot_commit_seconds": ("histogram", frozenset()),
    "spmchain_snapshot_commit_batch_size": ("histogram", frozenset()),
    "spmchain_snapshots_quarantined_total": ("counter", frozenset()),
}
ALLOWED_LABELS = {"pool", "verb", "command_type", "outcome", "kind", "le"}


def record_one_of_everything(m: RuntimeMetrics) -> None:
    """One call of every recording method, so every labelled series exists."""
    m.chain_started("LiveMigrateDisk")
    m.chain_resumed("LiveMigrateDisk")
    m.chain_ended(ENDED_SUCCESSFULLY, "LiveMigrateDisk")
    m.step_fired("copyImage")
    m.revert_fired("deleteImage")
    m.task_ended("copyImage", 42.0)
    m.reaction(0.002)
    m.declare_pool("pool-a")
    m.poll("pool-a", 0.004)
    m.poll_error("pool-a")
    m.set_pool_slots("pool-a", 10, 3)
    m.set_admission("pool-a", 7, 32, 32.5)
    m.zombie_task("pool-a")
    m.orphan_task("pool-a")
    m.actor_restarted("poller")
    m.supervisor_escalated()
    m.snapshot_commit(64, 0.003)
    m.snapshot_quarantined()


def families(registry: CollectorRegistry) -> dict[str, Metric]:
    """The exposition of ``registry`` parsed back, by sample-name family (counters keep _total)."""
    text = generate_latest(registry).decode()
    out: dict[str, Metric] = {}
    for family in text_string_to_metric_families(text):
        name = family.name + "_total" if family.type == "counter" else family.name
        out[name] = family
    return out


def value(m: RuntimeMetrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


@pytest.fixture
def metrics() -> RuntimeMetrics:
    return RuntimeMetrics()


def test_every_specified_metric_is_exposed_with_its_type_and_labels(
    metrics: RuntimeMetrics,
) -> None:
    record_one_of_everything(metrics)
    exposed = families(metrics.registry)
    assert set(exposed) == set(SPECIFIED)
    for name, (kind, labels) in SPECIFIED.items():
        family = exposed[name]
        assert family.type == kind, name
        assert family.samples, f"{name} has no sample"
        for sample in family.samples:
            assert set(sample.labels) - {"le"} == labels, (name, sample)


def test_labels_have_bounded_cardinality_only(metrics: RuntimeMetrics) -> None:
    record_one_of_everything(metrics)
    for family in families(metrics.registry).values():
        for sample in family.samples:
            assert set(sample.labels) <= ALLOWED_LABELS, (family.name, sample.labels)


def test_two_runtime_metrics_do_not_collide_nor_touch_the_global_registry() -> None:
    global_before = generate_latest(REGISTRY)
    first, second = RuntimeMetrics(), RuntimeMetrics()
    assert first.registry is not second.registry
    assert first.registry is not REGISTRY
    first.step_fired("copyImage")
    first.step_fired("copyImage")
    second.step_fired("copyImage")
    assert value(first, "spmchain_steps_fired_total", verb="copyImage") == 2
    assert value(second, "spmchain_steps_fired_total", verb="copyImage") == 1
    assert REGISTRY.get_sample_value("spmchain_steps_fired_total", {"verb": "copyImage"}) is None
    assert b"spmchain_" not in generate_latest(REGISTRY)
    assert generate_latest(REGISTRY).count(b"\n# TYPE") == global_before.count(b"\n# TYPE")


def test_metrics_register_on_a_given_registry_and_refuse_a_second_set_there() -> None:
    shared = CollectorRegistry()
    m = RuntimeMetrics(shared)
    assert m.registry is shared
    m.chain_started("X")
    assert shared.get_sample_value("spmchain_chains_started_total", {"command_type": "X"}) == 1
    with pytest.raises(ValueError, match="Duplicated"):
        RuntimeMetrics(shared)


def test_chain_events_count_by_command_type_and_outcome_and_give_in_flight(
    metrics: RuntimeMetrics,
) -> None:
    for _ in range(5):
        metrics.chain_started("LiveMigrateDisk")
    metrics.chain_started("RemoveImage")
    metrics.chain_resumed("LiveMigrateDisk")
    metrics.chain_ended(ENDED_SUCCESSFULLY, "LiveMigrateDisk")
    metrics.chain_ended(ENDED_SUCCESSFULLY, "LiveMigrateDisk")
    metrics.chain_ended(ENDED_WITH_FAILURE, "RemoveImage")

    assert value(metrics, "spmchain_chains_started_total", command_type="LiveMigrateDisk") == 5
    assert value(metrics, "spmchain_chains_started_total", command_type="RemoveImage") == 1
    assert value(metrics, "spmchain_chains_resumed_total", command_type="LiveMigrateDisk") == 1
    ended = "spmchain_chains_ended_total"
    assert value(metrics, ended, outcome=ENDED_SUCCESSFULLY, command_type="LiveMigrateDisk") == 2
    assert value(metrics, ended, outcome=ENDED_WITH_FAILURE, command_type="RemoveImage") == 1
    assert value(metrics, "spmchain_chains_in_flight") == 5 + 1 + 1 - 3


def test_both_outcomes_exist_at_zero_once_a_command_type_is_seen(
    metrics: RuntimeMetrics,
) -> None:
    metrics.chain_started("LiveMigrateDisk")
    ended = "spmchain_chains_ended_total"
    for outcome in (ENDED_SUCCESSFULLY, ENDED_WITH_FAILURE):
        assert value(metrics, ended, outcome=outcome, command_type="LiveMigrateDisk") == 0


def test_chain_ended_refuses_an_unknown_outcome_and_counts_nothing(
    metrics: RuntimeMetrics,
) -> None:
    metrics.chain_started("X")
    with pytest.raises(ValueError, match="unknown chain outcome 'done'"):
        metrics.chain_ended("done", "X")  # type: ignore[arg-type]
    assert value(metrics, "spmchain_chains_in_flight") == 1
    assert value(metrics, "spmchain_chains_ended_total", outcome="done", command_type="X") is None


def test_steps_reverts_and_task_durations_count_by_verb(metrics: RuntimeMetrics) -> None:
    metrics.step_fired("createVolume")
    metrics.step_fired("copyImage")
    metrics.step_fired("copyImage")
    metrics.revert_fired("deleteVolume")
    metrics.task_ended("copyImage", 3600.0)
    metrics.task_ended("copyImage", 0.02)
    assert value(metrics, "spmchain_steps_fired_total", verb="copyImage") == 2
    assert value(metrics, "spmchain_steps_fired_total", verb="createVolume") == 1
    assert value(metrics, "spmchain_reverts_fired_total", verb="deleteVolume") == 1
    duration = "spmchain_task_duration_seconds"
    assert value(metrics, duration + "_count", verb="copyImage") == 2
    assert value(metrics, duration + "_sum", verb="copyImage") == pytest.approx(3600.02)
    assert value(metrics, duration + "_bucket", verb="copyImage", le="0.025") == 1
    assert value(metrics, duration + "_bucket", verb="copyImage", le="3600.0") == 2


def test_task_duration_buckets_span_10ms_to_hours_and_reaction_buckets_half_ms_to_10s() -> None:
    assert TASK_DURATION_BUCKETS[0] == 0.01
    assert TASK_DURATION_BUCKETS[-1] >= 4 * 3600
    assert REACTION_LATENCY_BUCKETS[0] == 0.0005
    assert REACTION_LATENCY_BUCKETS[-1] == 10.0
    assert sum(1 for b in REACTION_LATENCY_BUCKETS if b <= 0.01) >= 6  # fine at the low end
    for buckets in (TASK_DURATION_BUCKETS, REACTION_LATENCY_BUCKETS):
        assert list(buckets) == sorted(set(buckets))


@pytest.mark.parametrize(
    ("observed", "first_bucket_holding_it"),
    [(0.0001, "0.0005"), (0.0005, "0.0005"), (0.0006, "0.001"), (10.0, "10.0"), (11.0, "+Inf")],
)
def test_an_observation_falls_in_the_first_bucket_whose_bound_is_not_below_it(
    metrics: RuntimeMetrics, observed: float, first_bucket_holding_it: str
) -> None:
    metrics.reaction(observed)
    buckets = {
        s.labels["le"]: s.value
        for s in families(metrics.registry)["spmchain_reaction_latency_seconds"].samples
        if s.name.endswith("_bucket")
    }
    les = list(buckets)
    holding = les.index(first_bucket_holding_it)
    assert all(buckets[le] == 0 for le in les[:holding])
    assert all(buckets[le] == 1 for le in les[holding:])
    assert value(metrics, "spmchain_reaction_latency_seconds_count") == 1


def test_pool_events_poll_slots_zombies_and_orphans(metrics: RuntimeMetrics) -> None:
    metrics.poll("pool-a", 0.004)
    metrics.poll("pool-a", 0.5)
    metrics.poll_error("pool-a")
    metrics.set_pool_slots("pool-a", 12, 40)
    metrics.set_pool_slots("pool-a", 11, 39)
    metrics.set_pool_slots("pool-b", 1, 0)
    metrics.zombie_task("pool-b")
    metrics.orphan_task("pool-b")
    metrics.orphan_task("pool-b")
    assert value(metrics, "spmchain_poll_duration_seconds_count", pool="pool-a") == 2
    assert value(metrics, "spmchain_poll_errors_total", pool="pool-a") == 1
    assert value(metrics, "spmchain_spm_tasks_outstanding", pool="pool-a") == 11
    assert value(metrics, "spmchain_spm_tasks_queued", pool="pool-a") == 39
    assert value(metrics, "spmchain_spm_tasks_outstanding", pool="pool-b") == 1
    assert value(metrics, "spmchain_zombie_tasks_total", pool="pool-b") == 1
    assert value(metrics, "spmchain_orphan_tasks_total", pool="pool-b") == 2


def test_admission_gauges_per_pool_with_no_limit_exposed_as_inf(metrics: RuntimeMetrics) -> None:
    metrics.set_admission("pool-a", 120, 40, 40.7)
    metrics.set_admission("pool-b", 0, 3, float("inf"))
    assert value(metrics, "spmchain_chains_waiting", pool="pool-a") == 120
    assert value(metrics, "spmchain_chains_running", pool="pool-a") == 40
    assert value(metrics, "spmchain_chains_running_limit", pool="pool-a") == 40.7
    assert value(metrics, "spmchain_chains_running_limit", pool="pool-b") == float("inf")
    assert 'spmchain_chains_running_limit{pool="pool-b"} +Inf' in (
        generate_latest(metrics.registry).decode())
    metrics.forget_pool("pool-b")
    assert value(metrics, "spmchain_chains_running", pool="pool-b") is None


def test_declare_pool_creates_its_series_at_zero_and_forget_pool_drops_them(
    metrics: RuntimeMetrics,
) -> None:
    metrics.declare_pool("pool-a")
    for name in ("spmchain_poll_errors_total", "spmchain_zombie_tasks_total",
                 "spmchain_orphan_tasks_total", "spmchain_spm_tasks_outstanding",
                 "spmchain_spm_tasks_queued", "spmchain_poll_duration_seconds_count"):  # fmt: skip
        assert value(metrics, name, pool="pool-a") == 0, name
    metrics.poll_error("pool-a")
    metrics.forget_pool("pool-a")
    assert "pool-a" not in generate_latest(metrics.registry).decode()
    metrics.poll_error("pool-a")
    assert value(metrics, "spmchain_poll_errors_total", pool="pool-a") == 1


def test_supervision_and_snapshot_events(metrics: RuntimeMetrics) -> None:
    metrics.actor_restarted("poller")
    metrics.actor_restarted("poller")
    metrics.actor_restarted("spm_task")
    metrics.supervisor_escalated()
    metrics.snapshot_commit(100, 0.004)
    metrics.snapshot_commit(1, 0.001)
    metrics.snapshot_quarantined()
    assert value(metrics, "spmchain_actor_restarts_total", kind="poller") == 2
    assert value(metrics, "spmchain_actor_restarts_total", kind="spm_task") == 1
    assert value(metrics, "spmchain_supervisor_escalations_total") == 1
    assert value(metrics, "spmchain_snapshot_commit_seconds_count") == 2
    assert value(metrics, "spmchain_snapshot_commit_seconds_sum") == pytest.approx(0.005)
    assert value(metrics, "spmchain_snapshot_commit_batch_size_sum") == 101
    assert value(metrics, "spmchain_snapshot_commit_batch_size_bucket", le="1.0") == 1
    assert value(metrics, "spmchain_snapshots_quarantined_total") == 1


def test_concurrent_recording_loses_no_event(metrics: RuntimeMetrics) -> None:
    threads_n, per_thread = 8, 5000
    start = threading.Barrier(threads_n + 1, timeout=10)

    def record(i: int) -> None:
        start.wait()
        verb = f"verb{i % 2}"  # threads race to create the same label values
        for _ in range(per_thread):
            metrics.chain_started("X")
            metrics.step_fired(verb)
            metrics.reaction(0.001)
            metrics.task_ended(verb, 1.0)
            metrics.chain_ended(ENDED_SUCCESSFULLY, "X")

    threads = [threading.Thread(target=record, args=(i,)) for i in range(threads_n)]
    for t in threads:
        t.start()
    start.wait()
    for t in threads:
        t.join(timeout=60)
        assert not t.is_alive()

    total = threads_n * per_thread
    assert value(metrics, "spmchain_chains_started_total", command_type="X") == total
    steps = sum(value(metrics, "spmchain_steps_fired_total", verb=f"verb{i}") or 0 for i in (0, 1))
    assert steps == total
    assert value(metrics, "spmchain_reaction_latency_seconds_count") == total
    assert value(metrics, "spmchain_reaction_latency_seconds_sum") == pytest.approx(total * 0.001)
    assert value(metrics, "spmchain_task_duration_seconds_count", verb="verb0") == total / 2
    assert value(metrics, "spmchain_chains_in_flight") == 0


def test_scrapes_while_recording_see_consistent_histograms(metrics: RuntimeMetrics) -> None:
    stop = threading.Event()

    def record() -> None:
        while not stop.is_set():
            metrics.reaction(0.002)
            metrics.step_fired("copyImage")

    recorder = threading.Thread(target=record)
    recorder.start()
    try:
        for _ in range(20):
            family = families(metrics.registry)["spmchain_reaction_latency_seconds"]
            samples = {s.name + s.labels.get("le", ""): s.value for s in family.samples}
            buckets = [s.value for s in family.samples if s.name.endswith("_bucket")]
            assert buckets == sorted(buckets)  # cumulative
            count = samples["spmchain_reaction_latency_seconds_count"]
            assert samples["spmchain_reaction_latency_seconds_bucket+Inf"] == count
    finally:
        stop.set()
        recorder.join(timeout=10)
    assert not recorder.is_alive()


@pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool is not installed (Debian package 'prometheus'; .ci/run installs it)",
)
def test_promtool_check_metrics_reports_nothing(metrics: RuntimeMetrics) -> None:
    record_one_of_everything(metrics)
    metrics.chain_started("LiveMigrateDisk")
    exposition = generate_latest(metrics.registry)
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=exposition, capture_output=True, timeout=30
    )
    assert result.returncode == 0, result
    assert result.stdout == b"", result.stdout.decode()
    assert result.stderr == b"", result.stderr.decode()


@pytest.fixture
def metrics_server(metrics: RuntimeMetrics) -> Iterator[MetricsServer]:
    server = start_metrics_server(metrics)
    try:
        yield server
    finally:
        server.stop()


def test_http_server_binds_localhost_on_a_free_port_and_serves_metrics(
    metrics: RuntimeMetrics, metrics_server: MetricsServer
) -> None:
    metrics.step_fired("copyImage")
    assert metrics_server.addr == "127.0.0.1"
    assert metrics_server.port > 0
    assert metrics_server.url == f"http://127.0.0.1:{metrics_server.port}/metrics"
    with urllib.request.urlopen(metrics_server.url, timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        body = response.read().decode()
    assert 'spmchain_steps_fired_total{verb="copyImage"} 1.0' in body


def test_http_server_frees_its_port_when_stopped(metrics: RuntimeMetrics) -> None:
    server = start_metrics_server(metrics)
    port = server.port
    server.stop()
    server.stop()  # idempotent
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_http_server_accepts_a_plain_registry_and_refuses_other_things() -> None:
    registry = RuntimeMetrics().registry
    with (
        start_metrics_server(registry) as server,
        urllib.request.urlopen(server.url, timeout=10) as response,
    ):
        assert b"spmchain_chains_in_flight 0.0" in response.read()
    with pytest.raises(TypeError, match="RuntimeMetrics or CollectorRegistry"):
        start_metrics_server("registry")  # type: ignore[arg-type]


def test_http_server_on_a_taken_port_raises_and_leaves_nothing_running(
    metrics: RuntimeMetrics, metrics_server: MetricsServer
) -> None:
    before = threading.active_count()
    with pytest.raises(OSError):
        start_metrics_server(metrics, port=metrics_server.port)
    assert threading.active_count() == before


def test_wsgi_app_serves_the_exposition(metrics: RuntimeMetrics) -> None:
    metrics.chain_started("LiveMigrateDisk")
    app = make_wsgi_app(metrics)
    environ: dict[str, Any] = {"PATH_INFO": "/metrics"}
    setup_testing_defaults(environ)
    started: list[tuple[str, list[tuple[str, str]]]] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        started.append((status, headers))
        return lambda _: None

    body = b"".join(app(environ, start_response)).decode()
    assert started[0][0] == "200 OK"
    assert 'spmchain_chains_started_total{command_type="LiveMigrateDisk"} 1.0' in body
    assert "spmchain_chains_in_flight 1.0" in body


def test_actor_restarts_exist_at_zero_for_every_kind_from_the_start(
    metrics: RuntimeMetrics,
) -> None:
    # increase() over a counter that appears at its first restart misses that restart.
    for kind in ("command", "spm_task", "poller"):
        assert value(metrics, "spmchain_actor_restarts_total", kind=kind) == 0
    metrics.actor_restarted("poller")
    assert value(metrics, "spmchain_actor_restarts_total", kind="poller") == 1


def test_reaction_buckets_tell_apart_the_reactions_the_project_targets() -> None:
    # A reaction within the minimum poll interval (20 ms) plus 20 ms: 20, 30 and 40 ms.
    for edge in (0.02, 0.03, 0.04):
        assert edge in REACTION_LATENCY_BUCKETS


def test_chains_a_runtime_stopped_with_leave_the_in_flight(metrics: RuntimeMetrics) -> None:
    for _ in range(3):
        metrics.chain_started("t")
    metrics.chain_ended(ENDED_SUCCESSFULLY, "t")
    metrics.chains_left(2)  # stopped with two live
    assert value(metrics, "spmchain_chains_in_flight") == 0
    metrics.chain_resumed("t")  # resumed by the next runtime on these metrics
    metrics.chain_resumed("t")
    assert value(metrics, "spmchain_chains_in_flight") == 2
