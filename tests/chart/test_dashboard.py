"""The Grafana dashboard (manifests/dashboards/tandem.json): every metric its PromQL names is one that
Tandem's processes export (read from their Prometheus registry, not a copied list) or a known
kube-state-metrics series, and it has the panels the install-and-use issue asks for."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from typing import Any

import pytest
from prometheus_client import REGISTRY

from tandem_worker.server import metrics

from .conftest import REPO_ROOT

DASHBOARD = REPO_ROOT / "manifests" / "dashboards" / "tandem.json"
KUBE_STATE_METRICS = {
    "kube_deployment_status_replicas_available",
    "kube_deployment_spec_replicas",
    "kube_deployment_labels",
}
PROMQL_WORDS = {
    "sum", "max", "min", "avg", "count", "rate", "irate", "increase", "histogram_quantile", "by", "without",
    "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset", "clamp_min",
    "clamp_max", "topk", "bottomk", "label_values", "le",
}  # fmt: skip
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def _exported() -> set[str]:
    """Every series name Tandem's router and workers expose: the module-level metrics, and the engine
    collector's families (fed a stats snapshot with every key, including the adapter ones)."""
    stats: dict[str, Any] = {
        key: 1
        for key in (
            "used_blocks", "free_blocks", "cached_blocks", "running", "waiting", "queued_prompt_tokens",
            "num_blocks", "prefill_tokens_computed", "prefix_cached_tokens", "decode_tokens", "preemptions",
            "busy_seconds",
            "adapter_loads", "adapter_load_failures", "adapter_load_seconds", "adapter_device_loads",
            "adapter_blocks",
        )
    }  # fmt: skip
    stats.update(
        adapter_hits={"device": 1, "host": 1, "store": 1},
        adapter_evictions={"device": 1, "host": 1},
        adapters_device=["a"],
        adapters_host=["b"],
    )
    families = list(metrics.EngineCollector("decode", lambda: stats).collect())
    families += [f for f in REGISTRY.collect() if f.name.startswith("tandem_")]
    names = {f.name + suffix for f in families for suffix in SUFFIXES[f.type]}
    assert len(names) > 20, names  # the collector really produced its families
    return names


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _exprs() -> list[tuple[str, str]]:
    """(panel title, expression) of every target, plus the template variables' queries."""
    out = []
    for panel in _dashboard()["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    for var in _dashboard()["templating"]["list"]:
        if var["type"] == "query":
            out.append((f"${var['name']}", var["query"]["query"]))
    return out


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers that are neither functions, keywords,
    label names (inside {...} or by/on/group_left(...)), strings nor durations."""
    expr = re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", expr.strip())  # Grafana: (series, label)
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    e = re.sub(r"\{[^}]*\}", "", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)  # range selectors
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    e = re.sub(r"\$\w+", "", e)  # Grafana variables
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        word = m.group(0)
        following = e[m.end() :].lstrip()
        if word in PROMQL_WORDS or following.startswith("("):
            continue
        names.add(word)
    return names


def test_metric_name_parser():
    assert metric_names(
        'histogram_quantile(0.9, sum by (le) (rate(tandem_x_bucket{a=~"$ns",b="c"}[$__rate_interval])))'
    ) == {"tandem_x_bucket"}
    assert metric_names('label_values(tandem_y{n=~"$ns"}, model_deployment)') == {"tandem_y"}
    assert metric_names('a * on (namespace, deployment) group_left (l) max by (x) (b{y="z"})') == {"a", "b"}


def test_every_metric_is_exported_by_tandem_or_kube_state_metrics():
    exported = _exported()
    used: set[str] = set()
    for title, expr in _exprs():
        names = metric_names(expr)
        assert names, (title, expr)
        unknown = {n for n in names if n not in exported and n not in KUBE_STATE_METRICS}
        assert not unknown, f"panel {title!r} reads metrics nobody exports: {unknown}"
        used |= names
    # The list: TTFT and TPOT percentiles, goodput and attainment, replicas per pool, KV usage,
    # KV transfer throughput, adapter hits and loads.
    for name in (
        "tandem_time_to_first_token_seconds_bucket",
        "tandem_time_per_output_token_seconds_bucket",
        "tandem_requests_total",
        "kube_deployment_status_replicas_available",
        "tandem_kv_usage_ratio",
        "tandem_kv_transfer_bytes_total",
        "tandem_adapter_requests_total",
        "tandem_adapter_loads_total",
    ):
        assert name in used, name


def test_percentiles_come_from_histogram_buckets():
    for title, expr in _exprs():
        for m in re.finditer(r"histogram_quantile\(\s*([0-9.]+)\s*,(.*)", expr):
            assert 0 < float(m.group(1)) < 1
            assert "_bucket" in m.group(2) and re.search(r"by \((?:[^)]*, *)?le\b", m.group(2)), title


def test_attainment_is_met_over_all_counted_outcomes():
    (expr,) = {e for t, e in _exprs() if t == "SLO attainment"}
    met, total = expr.split(" / ")
    assert 'outcome="met"' in met and "tandem_requests_total" in total and 'outcome="met"' not in total


@pytest.mark.parametrize("key", ["title", "uid", "panels", "templating", "schemaVersion"])
def test_dashboard_is_importable(key):
    dash = _dashboard()
    assert key in dash
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]) and panel["gridPos"]["x"] + panel["gridPos"][
            "w"
        ] <= 24
        assert panel["targets"] and all(t["expr"] and t["refId"] for t in panel["targets"])
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert variables == {"datasource", "namespace", "model_deployment"}


def grafana_to_promql(expr: str) -> str:
    """Substitute Grafana's variables the way Grafana would for one concrete query."""
    expr = expr.replace("$__rate_interval", "1m")
    return re.sub(r"\$\{?(namespace|model_deployment)\}?", ".*", expr)


def test_every_expression_parses_with_prometheus_own_parser(tmp_path):
    """promtool (from Debian's `prometheus` package, which the autoscaling tests also use) parses each
    panel query as a recording rule: a PromQL syntax error fails here, not in a user's Grafana."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus)")
    rules = [
        {"record": f"tandem:dashboard_query_{i}", "expr": grafana_to_promql(expr)}
        for i, (_, expr) in enumerate(_exprs())
        if not expr.startswith("label_values(")
    ]
    path = tmp_path / "rules.yaml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules)} rules found" in done.stdout + done.stderr
