"""The Grafana dashboard: well formed, every panel queries, every query uses exposed metrics."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from metrics._metrics import ENDED_SUCCESSFULLY, RuntimeMetrics

METRIC_NAME = re.compile(r"\bspmchain_[a-zA-Z0-9_]+")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$instance": ".*",
    "$pool": ".*",
}


def load_dashboard() -> dict[str, Any]:
    text = files("metrics").joinpath("dashboard.json").read_text()
    dashboard: dict[str, Any] = json.loads(text)
    return dashboard


def all_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def query_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in all_panels(dashboard) if p["type"] != "row"]


def dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression: panel targets and templating variable queries."""
    queries = [t["expr"] for p in query_panels(dashboard) for t in p.get("targets", [])]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        queries.append(query["query"] if isinstance(query, dict) else query)
    return queries


def as_plain_promql(query: str) -> str:
    """Grafana's variables replaced by values, so the query is PromQL a server would run."""
    for variable, replacement in GRAFANA_VARIABLES.items():
        query = query.replace(variable, replacement)
    return query


def exposed_metric_names() -> set[str]:
    """Sample names RuntimeMetrics exposes (counters with _total; histograms by family name)."""
    m = RuntimeMetrics()
    m.chain_started("X")
    m.chain_ended(ENDED_SUCCESSFULLY, "X")
    m.declare_pool("pool-a")
    text = generate_latest(m.registry).decode()
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name + "_total" if family.type == "counter" else family.name)
    return names


def base_name(name: str) -> str:
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name


def test_dashboard_is_an_importable_grafana_dashboard_with_a_prometheus_input() -> None:
    dashboard = load_dashboard()
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["uid"] and dashboard["title"]
    inputs = {i["name"]: i for i in dashboard["__inputs"]}
    assert inputs["DS_PROMETHEUS"]["type"] == "datasource"
    assert inputs["DS_PROMETHEUS"]["pluginId"] == "prometheus"
    for panel in query_panels(dashboard):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}"


def test_every_panel_has_at_least_one_query() -> None:
    panels = query_panels(load_dashboard())
    assert panels
    for panel in panels:
        exprs = [t.get("expr", "").strip() for t in panel.get("targets", [])]
        assert exprs and all(exprs), f"panel {panel['title']!r} has no query"


def test_panel_ids_are_unique_and_panels_do_not_overlap() -> None:
    panels = list(all_panels(load_dashboard()))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        g = panel["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, panel["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]


def test_every_metric_used_by_the_dashboard_is_exposed_by_runtime_metrics() -> None:
    exposed = exposed_metric_names()
    used = {name for q in dashboard_queries(load_dashboard()) for name in METRIC_NAME.findall(q)}
    assert used
    missing = sorted(n for n in used if n not in exposed and base_name(n) not in exposed)
    assert not missing, f"dashboard uses metrics RuntimeMetrics does not expose: {missing}"


def test_dashboard_covers_the_operators_questions() -> None:
    used = {
        base_name(name)
        for q in dashboard_queries(load_dashboard())
        for name in METRIC_NAME.findall(q)
    }
    for name in (
        "spmchain_chains_in_flight",
        "spmchain_chains_started_total",
        "spmchain_chains_ended_total",
        "spmchain_steps_fired_total",
        "spmchain_reaction_latency_seconds",
        "spmchain_spm_tasks_outstanding",
        "spmchain_spm_tasks_queued",
        "spmchain_chains_waiting",
        "spmchain_chains_running_limit",
        "spmchain_poll_duration_seconds",
        "spmchain_poll_errors_total",
        "spmchain_actor_restarts_total",
        "spmchain_zombie_tasks_total",
        "spmchain_orphan_tasks_total",
        "spmchain_snapshots_quarantined_total",
        "spmchain_snapshot_commit_seconds",
    ):
        assert name in used, f"no panel shows {name}"
    text = json.dumps(load_dashboard())
    assert "histogram_quantile(0.5, sum by (le) (rate(spmchain_reaction_latency_seconds" in text
    assert "histogram_quantile(0.99, sum by (le) (rate(spmchain_reaction_latency_seconds" in text


@pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool is not installed (Debian package 'prometheus'; .ci/run installs it)",
)
def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    panel_queries = dashboard_queries(load_dashboard())
    # label_values(...) is Grafana's, not PromQL: check the selector inside it.
    exprs = [
        re.sub(r"^label_values\((.*), *\w+\)$", r"\1", as_plain_promql(q)) for q in panel_queries
    ]
    records = [{"record": f"dashboard:query{i}", "expr": e} for i, e in enumerate(exprs)]
    rules = {"groups": [{"name": "dashboard", "rules": records}]}
    rules_file = tmp_path / "dashboard_rules.yml"
    rules_file.write_text(json.dumps(rules))  # JSON is YAML
    result = subprocess.run(
        ["promtool", "check", "rules", str(rules_file)], capture_output=True, timeout=30
    )
    assert result.returncode == 0, (result.stdout.decode(), result.stderr.decode())
