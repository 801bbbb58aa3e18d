"""MetricsWindow from Prometheus' HTTP API: a fake Prometheus on loopback answers canned vectors.

(The test against a real Prometheus scraping a real deployment is issue 6's end-to-end test.)
"""

from __future__ import annotations

import json
import re
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tandem_operator.autoscaling.policy import AutoscalingSpec, PolicyState, Replicas, decide
from tandem_operator.autoscaling.prometheus import BUSY_METRIC, PrometheusError, fetch_window, queries

from .conftest import idle_engine_stats


def vector(*rows):
    return {
        "status": "success",
        "data": {
            "resultType": "vector",
            "result": [{"metric": m, "value": [1700000000.0, str(v)]} for m, v in rows],
        },
    }


class FakePrometheus(BaseHTTPRequestHandler):
    answers: dict[str, dict] = {}
    seen: list[dict] = []
    status = 200

    def do_GET(self):  # noqa: N802
        qs = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
        FakePrometheus.seen.append({k: v[0] for k, v in qs.items()})
        query = qs["query"][0]
        body = vector()
        for needle, answer in self.answers.items():
            if needle in query:
                body = answer
                break
        if self.status != 200:
            body = {"status": "error", "errorType": "bad_data", "error": "parse error at char 3"}
        data = json.dumps(body).encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def prom():
    FakePrometheus.answers, FakePrometheus.seen, FakePrometheus.status = {}, [], 200
    srv = ThreadingHTTPServer(("127.0.0.1", 0), FakePrometheus)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_window_from_prometheus_feeds_the_policy(prom):
    FakePrometheus.answers = {
        "increase(tandem_requests_total": vector(
            ({"outcome": "met"}, 59.6), ({"outcome": "missed_ttft"}, 40.2), ({"outcome": "invalid"}, 7)
        ),
        "histogram_quantile(0.9, sum by (le) (rate(tandem_time_to_first_token": vector(({}, 2.5)),
        "histogram_quantile(0.9, sum by (le) (rate(tandem_time_per_output_token": vector(({}, "NaN")),
        'avg(avg_over_time(tandem_prefill_backlog_tokens{namespace="ml",role="prefill"}': vector(({}, 30000)),
        'avg(avg_over_time(tandem_kv_usage_ratio{namespace="ml",role="decode"}': vector(({}, 0.2)),
    }
    w = fetch_window(prom, 60, selector='namespace="ml"', at=1700000000.0)
    assert (w.met, w.missed_ttft, w.missed_tpot, w.failed) == (60, 40, 0, 0)
    assert w.ttft_p90_s == 2.5 and w.tpot_p90_s is None  # NaN: no data
    assert w.prefill_backlog_tokens == 30000 and w.decode_kv_usage == 0.2
    assert all(s["time"] == "1700000000.000" for s in FakePrometheus.seen)
    spec = AutoscalingSpec(prefill_max_replicas=8, decode_max_replicas=8, max_step=2)
    d = decide(w, Replicas(2, 2), spec, PolicyState(), now=1000)
    assert d.desired_prefill == 4 and d.desired_decode == 2


def test_nothing_scraped_is_missing_data_and_the_policy_holds(prom):
    w = fetch_window(prom, 60)
    assert w.finished is None and not w.has_pool_data()
    d = decide(
        w, Replicas(3, 2), AutoscalingSpec(prefill_max_replicas=8, decode_max_replicas=8), PolicyState(), 0
    )
    assert (d.desired_prefill, d.desired_decode) == (3, 2) and "no metrics" in d.reason


def test_pools_reporting_but_no_requests_is_idle(prom):
    FakePrometheus.answers = {
        # The router exports every outcome from its start: idle is outcomes at 0, not none.
        "increase(tandem_requests_total": vector(({"outcome": "met"}, 0), ({"outcome": "failed"}, 0)),
        "tandem_prefill_backlog_tokens": vector(({}, 0)),
        "tandem_kv_usage_ratio": vector(({}, 0)),
        "tandem_requests_running": vector(({}, 0)),
        "tandem_requests_waiting": vector(({}, 0)),
    }
    w = fetch_window(prom, 60)
    assert w.finished == 0 and w.is_idle()


def test_pools_reporting_without_outcomes_is_missing_data_not_idle(prom):
    # No outcome rows: the router is not scraped yet, or the window holds too few of its scrapes
    # for increase(). Read as 0 requests, it was "idle" and scaled both pools to their minimum.
    FakePrometheus.answers = {
        "tandem_prefill_backlog_tokens": vector(({}, 0)),
        "tandem_kv_usage_ratio": vector(({}, 0)),
        "tandem_requests_running": vector(({}, 0)),
        "tandem_requests_waiting": vector(({}, 0)),
    }
    w = fetch_window(prom, 60)
    assert w.finished is None and not w.is_idle()
    spec = AutoscalingSpec(prefill_max_replicas=8, decode_max_replicas=8)
    d = decide(w, Replicas(4, 4), spec, PolicyState(), now=0)
    assert (d.desired_prefill, d.desired_decode) == (4, 4), d.reason


def test_every_range_spans_four_scrapes():
    # rate() and deriv() need two samples in their range: at the chart's 15 s scrapes, the 15 s
    # peak sub-window held one and always read as no data, and so did a window under ~30 s.
    q = queries(10, 'ns="x"')
    assert 'increase(tandem_requests_total{ns="x"}[60s])' in q["outcomes"]
    assert q["prompt_tokens_per_s_peak"].endswith("[60s])))[60s:15s])")
    fast = queries(120, 'ns="x"', scrape_interval_s=1, sub_window_s=2, step_s=1)
    # The window's rates divide by the span really read.
    assert fetch_window(lambda query, at: [], 10).duration_s == 60
    assert "[120s]" in fast["outcomes"] and fast["prompt_tokens_per_s_peak"].endswith("[4s])))[120s:1s])")


def test_errors_raise(prom):
    FakePrometheus.status = 400
    with pytest.raises(PrometheusError, match="parse error"):
        fetch_window(prom, 60)
    with pytest.raises(PrometheusError):
        fetch_window("http://127.0.0.1:1", 60)


def test_queries_use_the_exported_metric_names():
    q = queries(60, 'ns="x"')
    assert q["outcomes"] == 'sum by (outcome) (increase(tandem_requests_total{ns="x"}[60s]))'
    assert q["prompt_tokens_per_s_peak"] == (
        'max_over_time((sum(rate(tandem_prefill_tokens_computed_total{ns="x",role="prefill"}[60s]))'
        ' + sum(deriv(tandem_prefill_backlog_tokens{ns="x",role="prefill"}[60s])))[60s:15s])'
    )
    names = " ".join(q.values())
    for metric in (
        "tandem_prefill_backlog_tokens",
        "tandem_kv_usage_ratio",
        "tandem_requests_running",
        "tandem_requests_waiting",
        "tandem_time_to_first_token_seconds_bucket",
        "tandem_time_per_output_token_seconds_bucket",
    ):
        assert metric in names
    # Every series the queries read is one the router or a worker exports.
    from prometheus_client import REGISTRY

    from tandem_worker.server import metrics

    stats = idle_engine_stats(num_blocks=1)
    families = list(REGISTRY.collect()) + list(metrics.EngineCollector("prefill", lambda: stats).collect())
    exported = set()
    for fam in families:
        exported.add(fam.name + {"counter": "_total", "histogram": "_bucket"}.get(fam.type, ""))
    read = set(re.findall(r"(tandem_[a-z_]+)\{", " ".join(q.values())))
    assert read and BUSY_METRIC in read and read <= exported, read - exported


def test_the_router_exports_every_outcome_the_autoscaler_reads_from_its_start():
    # A series born at its first failure loses what was counted before its first scrape (increase()
    # takes the first sample as its baseline), and no series reads as "not scraped", not "idle".
    from prometheus_client import REGISTRY

    from tandem_operator.autoscaling.prometheus import OUTCOMES
    from tandem_worker.server import metrics

    assert set(OUTCOMES) <= set(metrics.REQUEST_OUTCOMES)
    metrics.start_request_outcomes()
    for outcome in OUTCOMES:
        assert REGISTRY.get_sample_value("tandem_requests_total", {"outcome": outcome}) is not None, outcome
    # So is each pool's share of the rejections: increase() from its first prefill rejection on
    # would lose that one.
    for pool in ("prefill", "decode"):
        assert REGISTRY.get_sample_value("tandem_pool_rejected_requests_total", {"pool": pool}) is not None


def test_requests_turned_away_at_the_routers_own_limit_are_told_apart(prom):
    outcomes = vector(({"outcome": "met"}, 60), ({"outcome": "rejected"}, 40.4))
    FakePrometheus.answers = {
        "increase(tandem_requests_total": outcomes,
        'sum(increase(tandem_router_rejected_requests_total{namespace="ml"}[60s]))': vector(({}, 30.2)),
    }
    w = fetch_window(prom, 60, selector='namespace="ml"')
    assert (w.rejected, w.router_rejected, w.pool_rejected, w.served) == (40, 30, 10, 70)
    # A router without the counter: every rejection is read as the pools'.
    FakePrometheus.answers = {"increase(tandem_requests_total": outcomes}
    w = fetch_window(prom, 60, selector='namespace="ml"')
    assert (w.rejected, w.router_rejected, w.pool_rejected, w.served) == (40, 0, 40, 100)
    assert (w.rejected_by_prefill, w.rejected_by_decode) == (0, 40)  # decode's, as before the split


def test_rejections_are_told_apart_by_the_pool_that_turned_them_away(prom):
    FakePrometheus.answers = {
        "increase(tandem_requests_total": vector(({"outcome": "met"}, 60), ({"outcome": "rejected"}, 40)),
        'sum(increase(tandem_router_rejected_requests_total{namespace="ml"}[60s]))': vector(({}, 10)),
        'sum by (pool) (increase(tandem_pool_rejected_requests_total{namespace="ml"}[60s]))': vector(
            ({"pool": "prefill"}, 24.6), ({"pool": "decode"}, 3.2)
        ),
    }
    w = fetch_window(prom, 60, selector='namespace="ml"')
    # increase() extrapolates each series on its own: the 2 left over are no pool's.
    assert (w.router_limited, w.rejected_by_prefill, w.rejected_by_decode) == (10, 25, 3)
