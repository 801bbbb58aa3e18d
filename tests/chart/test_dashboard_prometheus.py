"""The dashboard's queries against a real Prometheus (Debian's `prometheus` package) that scrapes Tandem's
metrics from live exporters on loopback: every panel returns data, and attainment comes out as the
router's outcome counts say. The exporters serve the same families as the router and the workers
(EngineCollector itself for the workers), with the labels the chart's monitors attach, plus
kube-state-metrics' Deployment series."""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
import urllib.request
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from tandem_worker.server.metrics import LATENCY_BUCKETS, TOKEN_BUCKETS, EngineCollector

from ..prometheus_server import PROMETHEUS, prometheus_server
from .test_dashboard import _exprs

pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="needs Debian's prometheus package")
LABELS = {"namespace": "default", "model_deployment": "smollm2-demo"}
STAT_KEYS = (
    "used_blocks", "free_blocks", "cached_blocks", "running", "waiting", "queued_prompt_tokens",
    "prefill_tokens_computed", "prefix_cached_tokens", "decode_tokens", "preemptions", "busy_seconds",
    "adapter_loads",
    "adapter_load_failures", "adapter_load_seconds", "adapter_device_loads", "adapter_blocks",
)  # fmt: skip
KSM_LABELS = (
    "namespace", "deployment", "label_app_kubernetes_io_instance", "label_app_kubernetes_io_component",
    "label_app_kubernetes_io_managed_by",
)  # fmt: skip


class Exporters:
    """A router, a prefill and a decode worker, and kube-state-metrics, each on its own loopback port."""

    def __init__(self) -> None:
        self.router = CollectorRegistry()
        self.requests = Counter("tandem_requests", "", ["outcome"], registry=self.router)
        self.router_rejected = Counter("tandem_router_rejected_requests", "", registry=self.router)
        self.pool_rejected = Counter("tandem_pool_rejected_requests", "", ["pool"], registry=self.router)
        for pool in ("prefill", "decode"):
            self.pool_rejected.labels(pool=pool)  # as the router: every series from its start
        self.ttft = Histogram(
            "tandem_time_to_first_token_seconds", "", buckets=LATENCY_BUCKETS, registry=self.router
        )
        self.tpot = Histogram(
            "tandem_time_per_output_token_seconds", "", buckets=TOKEN_BUCKETS, registry=self.router
        )
        self.e2e = Histogram(
            "tandem_e2e_request_latency_seconds", "", buckets=LATENCY_BUCKETS, registry=self.router
        )
        self.queue = Histogram(
            "tandem_request_queue_seconds", "", buckets=LATENCY_BUCKETS, registry=self.router
        )
        self.stats: dict[str, dict[str, Any]] = {}
        self.workers: dict[str, CollectorRegistry] = {}
        self.kv_bytes: dict[str, Counter] = {}
        self.kv_seconds: dict[str, Histogram] = {}
        for role, direction in (("prefill", "sent"), ("decode", "received")):
            self.stats[role] = {
                **dict.fromkeys(STAT_KEYS, 0),
                "num_blocks": 100,
                "adapter_hits": {"device": 0, "host": 0, "store": 0},
                "adapter_evictions": {"device": 0, "host": 0},
                "adapters_device": ["a"],
                "adapters_host": ["a", "b"],
            }  # fmt: skip
            reg = CollectorRegistry()
            reg.register(EngineCollector(role, lambda role=role: self.stats[role]))
            self.kv_bytes[role] = Counter("tandem_kv_transfer_bytes", "", ["direction"], registry=reg)
            self.kv_seconds[role] = Histogram(
                "tandem_kv_transfer_seconds", "", ["direction"], buckets=LATENCY_BUCKETS, registry=reg
            )
            self.kv_bytes[role].labels(direction=direction)
            self.workers[role] = reg
        self.ksm = CollectorRegistry()
        available = Gauge(
            "kube_deployment_status_replicas_available", "", ["namespace", "deployment"], registry=self.ksm
        )
        desired = Gauge("kube_deployment_spec_replicas", "", ["namespace", "deployment"], registry=self.ksm)
        labels = Gauge("kube_deployment_labels", "", KSM_LABELS, registry=self.ksm)
        for component in ("prefill", "decode", "router"):
            name = f"smollm2-demo-{component}"
            available.labels("default", name).set(1)
            desired.labels("default", name).set(2)
            labels.labels("default", name, "smollm2-demo", component, "tandem-operator").set(1)
        self.servers = []
        self.ports: dict[str, int] = {}
        for job, reg in (("router", self.router), *self.workers.items(), ("ksm", self.ksm)):
            server, _thread = start_http_server(0, addr="127.0.0.1", registry=reg)
            self.servers.append(server)
            self.ports[job] = server.server_address[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._traffic, daemon=True)
        self._thread.start()

    def _traffic(self) -> None:
        """Per tick: 3 requests met every SLO, 1 missed TTFT, 1 was turned away by the prefill
        workers, 2 were the caller's fault (invalid)."""
        while not self._stop.wait(0.05):
            self.requests.labels(outcome="met").inc(3)
            self.requests.labels(outcome="missed_ttft").inc(1)
            self.requests.labels(outcome="rejected").inc(1)
            self.pool_rejected.labels(pool="prefill").inc(1)
            self.requests.labels(outcome="invalid").inc(2)
            for _ in range(4):
                self.ttft.observe(0.2)
                self.tpot.observe(0.03)
                self.e2e.observe(1.5)
                self.queue.observe(0.01)
            self.kv_bytes["prefill"].labels(direction="sent").inc(1_000_000)
            self.kv_bytes["decode"].labels(direction="received").inc(1_000_000)
            self.kv_seconds["decode"].labels(direction="received").observe(0.02)
            for st in self.stats.values():
                st["used_blocks"] = 40
                st["running"] = 2
                st["queued_prompt_tokens"] = 100
                st["preemptions"] += 1
                st["adapter_hits"]["device"] += 3
                st["adapter_hits"]["store"] += 1
                st["adapter_loads"] += 1
                st["adapter_device_loads"] += 1
                st["adapter_evictions"]["host"] += 1
                st["adapter_blocks"] = 4

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        for server in self.servers:
            server.shutdown()
            server.server_close()


@pytest.fixture
def prometheus(tmp_path):
    exporters = Exporters()
    scrape = []
    for job in ("router", "prefill", "decode"):
        target = {
            "targets": [f"127.0.0.1:{exporters.ports[job]}"],
            "labels": {**LABELS, "component": job, "pod": f"smollm2-demo-{job}-0"},
        }
        scrape.append({"job_name": job, "scrape_interval": "1s", "static_configs": [target]})
    scrape.append(
        {
            "job_name": "kube-state-metrics",
            "scrape_interval": "1s",
            "honor_labels": True,
            "static_configs": [{"targets": [f"127.0.0.1:{exporters.ports['ksm']}"]}],
        }
    )
    config = {"global": {"scrape_interval": "1s"}, "scrape_configs": scrape}
    try:
        with prometheus_server(tmp_path, config) as url:
            yield url
    finally:
        exporters.close()


def _query(base: str, expr: str) -> list[dict[str, Any]]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def _substitute(expr: str) -> str:
    """What Grafana sends for this dashboard with both filters on the one deployment."""
    return (
        expr.replace("$__rate_interval", "5s")
        .replace("$namespace", LABELS["namespace"])
        .replace("$model_deployment", LABELS["model_deployment"])
    )


def test_every_panel_returns_data_from_a_real_prometheus(prometheus):
    queries = [(title, _substitute(e)) for title, e in _exprs() if not e.startswith("label_values(")]
    deadline = time.monotonic() + 30
    empty: list[str] = []
    while time.monotonic() < deadline:
        try:
            empty = [f"{title}: {expr}" for title, expr in queries if not _query(prometheus, expr)]
        except OSError:  # Prometheus still starting
            empty = ["(Prometheus not up yet)"]
        if not empty:
            break
        time.sleep(0.5)
    assert empty == [], "panels without data"

    (attainment,) = _query(prometheus, _substitute(dict(_exprs())["SLO attainment"]))
    assert float(attainment["value"][1]) == pytest.approx(0.6, abs=0.02)  # 3 met of 5 counted requests
    # The rejections by cause are a breakdown of the outcome's, not more requests: here all prefill's.
    (by_pool,) = [e for t, e in _exprs() if t == "Rejected requests by cause" and "tandem_pool_" in e]
    causes = _query(prometheus, _substitute(by_pool))
    by_outcome = _query(prometheus, _substitute(dict(_exprs())["Requests by outcome"]))
    rejected = {float(r["value"][1]) for r in by_outcome if r["metric"]["outcome"] == "rejected"}
    ((prefill,),) = [{float(r["value"][1]) for r in causes if r["metric"].get("pool") == "prefill"}]
    assert prefill == pytest.approx(rejected.pop(), rel=0.1) and prefill > 0
    replicas = _query(prometheus, _substitute(dict(_exprs())["Replicas per pool"]))
    assert {r["metric"]["label_app_kubernetes_io_component"] for r in replicas} == {
        "prefill",
        "decode",
        "router",
    }
    # The template variables find the deployment.
    url = f"{prometheus}/api/v1/label/model_deployment/values?" + urllib.parse.urlencode(
        {"match[]": "tandem_requests_total"}
    )
    with urllib.request.urlopen(url, timeout=5) as resp:
        assert json.loads(resp.read())["data"] == ["smollm2-demo"]
