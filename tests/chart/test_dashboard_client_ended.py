"""Requests their client ended before any SLO was missed (outcome `cancelled` or `timed_out`) are left
out of SLO attainment by the dashboard as by the autoscaler, against a real Prometheus that scrapes a
router's outcome counts: the client's choice says nothing of the service. The dashboard counted
them as misses, so its attainment disagreed with the autoscaler's (which reads named outcomes only)."""

from __future__ import annotations

import threading
import time

import pytest
from prometheus_client import CollectorRegistry, Counter, start_http_server

from tandem_operator.autoscaling.prometheus import fetch_window
from tandem_worker.server.metrics import CLIENT_ENDED_OUTCOMES

from ..prometheus_server import PROMETHEUS, prometheus_server
from .test_dashboard import _exprs
from .test_dashboard_prometheus import LABELS, _query, _substitute

pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="needs Debian's prometheus package")

# Per tick: 3 met, 1 missed its TTFT, 2 invalid, and 3 of each client-ended outcome.
PER_TICK = {"met": 3, "missed_ttft": 1, "invalid": 2, **dict.fromkeys(CLIENT_ENDED_OUTCOMES, 3)}


def test_attainment_leaves_out_requests_their_client_ended(tmp_path):
    registry = CollectorRegistry()
    requests = Counter("tandem_requests", "", ["outcome"], registry=registry)
    for outcome in PER_TICK:
        requests.labels(outcome=outcome)  # as the router: every series from its start
    server, _ = start_http_server(0, addr="127.0.0.1", registry=registry)
    stop = threading.Event()

    def traffic() -> None:
        while not stop.wait(0.05):
            for outcome, n in PER_TICK.items():
                requests.labels(outcome=outcome).inc(n)

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    target = {
        "targets": [f"127.0.0.1:{server.server_address[1]}"],
        "labels": {**LABELS, "component": "router"},
    }
    config = {
        "global": {"scrape_interval": "1s"},
        "scrape_configs": [{"job_name": "router", "scrape_interval": "1s", "static_configs": [target]}],
    }
    try:
        with prometheus_server(tmp_path, config) as url:
            expr = _substitute(dict(_exprs())["SLO attainment"])
            deadline = time.monotonic() + 30
            rows: list = []
            while not rows and time.monotonic() < deadline:
                try:
                    rows = _query(url, expr)
                except OSError:  # Prometheus still starting
                    pass
                time.sleep(0.5)
            assert rows, "no attainment from Prometheus"
            assert float(rows[0]["value"][1]) == pytest.approx(0.75, abs=0.02)  # 3 met of 4 judged
            selector = ",".join(f'{k}="{v}"' for k, v in LABELS.items())
            window = fetch_window(url, 10, selector=selector, scrape_interval_s=1)
            assert window.attainment == pytest.approx(0.75, abs=0.02)
    finally:
        stop.set()
        thread.join()
        server.shutdown()
        server.server_close()
