"""A real Prometheus server scrapes the metrics and answers queries about them."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
from _prometheus import PROMETHEUS, SKIP_REASON, PrometheusLauncher, Sample
from test_dashboard import as_plain_promql, dashboard_queries, load_dashboard

from metrics._exposition import MetricsServer, start_metrics_server
from metrics._metrics import ENDED_SUCCESSFULLY, ENDED_WITH_FAILURE, RuntimeMetrics

pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason=SKIP_REASON)


@pytest.fixture
def prometheus_scraping(tmp_path: Path) -> Iterator[PrometheusLauncher]:
    """``prometheus_scraping("127.0.0.1:PORT")`` starts a Prometheus scraping that target;
    every one started is stopped when the test ends."""
    with PrometheusLauncher(tmp_path) as launch:
        yield launch


@pytest.fixture
def metrics() -> RuntimeMetrics:
    return RuntimeMetrics()


@pytest.fixture
def metrics_server(metrics: RuntimeMetrics) -> Iterator[MetricsServer]:
    with start_metrics_server(metrics) as server:
        yield server


def values(result: list[Sample]) -> list[float]:
    return [float(sample["value"][1]) for sample in result]


def test_prometheus_reads_chains_ended_back_through_its_query_api(
    metrics: RuntimeMetrics,
    metrics_server: MetricsServer,
    prometheus_scraping: PrometheusLauncher,
) -> None:
    # One Prometheus per test costs ~5 s (its service discovery hands targets to the scraper on
    # a 5 s tick), so this test also checks that later scrapes pick up new events.
    for _ in range(5):
        metrics.chain_started("LiveMigrateDisk")
    for _ in range(3):
        metrics.chain_ended(ENDED_SUCCESSFULLY, "LiveMigrateDisk")
    metrics.chain_ended(ENDED_WITH_FAILURE, "LiveMigrateDisk")

    prom = prometheus_scraping(f"127.0.0.1:{metrics_server.port}")

    succeeded = prom.wait_for(
        'spmchain_chains_ended_total{outcome="ended_successfully"}',
        until=lambda r: values(r) == [3.0],
    )
    assert succeeded[0]["metric"]["command_type"] == "LiveMigrateDisk"
    assert succeeded[0]["metric"]["job"] == "spmchain"
    failed = prom.query('spmchain_chains_ended_total{outcome="ended_with_failure"}')
    assert values(failed) == [1.0]
    assert values(prom.query("spmchain_chains_in_flight")) == [1.0]
    assert values(prom.query('up{job="spmchain"}')) == [1.0]

    metrics.chain_started("RemoveImage")
    metrics.chain_ended(ENDED_WITH_FAILURE, "RemoveImage")
    prom.wait_for(
        'sum(spmchain_chains_ended_total{outcome="ended_with_failure"})',
        until=lambda r: values(r) == [2.0],
    )


def test_every_dashboard_query_runs_on_prometheus_and_latency_percentiles_have_values(
    metrics: RuntimeMetrics,
    metrics_server: MetricsServer,
    prometheus_scraping: PrometheusLauncher,
) -> None:
    metrics.declare_pool("pool-a")
    prom = prometheus_scraping(f"127.0.0.1:{metrics_server.port}")

    def keep_busy() -> None:
        # Events between scrapes, so rates and quantiles have two different samples to use.
        for _ in range(50):
            metrics.chain_started("LiveMigrateDisk")
            metrics.step_fired("copyImage")
            metrics.reaction(0.002)
            metrics.task_ended("copyImage", 30.0)
            metrics.chain_ended(ENDED_SUCCESSFULLY, "LiveMigrateDisk")
        metrics.poll("pool-a", 0.004)
        metrics.set_pool_slots("pool-a", 10, 5)
        metrics.snapshot_commit(50, 0.002)

    p99 = prom.wait_for(
        as_plain_promql(
            "histogram_quantile(0.99, sum by (le) "
            "(rate(spmchain_reaction_latency_seconds_bucket[$__rate_interval])))"
        ),
        until=lambda r: bool(r) and not math.isnan(values(r)[0]),
        between=keep_busy,
    )
    assert 0.001 < values(p99)[0] <= 0.002  # the bucket (0.0015, 0.002] holds every observation

    (steps_per_s,) = [
        q for q in dashboard_queries(load_dashboard()) if q.startswith("sum(rate(spmchain_steps")
    ]
    steps = prom.query(as_plain_promql(steps_per_s))
    assert steps and values(steps)[0] > 0, steps

    for query in dashboard_queries(load_dashboard()):
        if query.startswith("label_values("):
            continue  # Grafana's own function, checked in test_dashboard
        prom.query(as_plain_promql(query))  # raises on a query Prometheus refuses
    outstanding = prom.query(
        as_plain_promql('sum by (pool) (spmchain_spm_tasks_outstanding{pool=~"$pool"})')
    )
    assert values(outstanding) == [10.0]
