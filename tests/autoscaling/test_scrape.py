"""MetricsWindow straight from /metrics text: real prometheus_client expositions of Tandem's metrics."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from tandem_operator.autoscaling.policy import AutoscalingSpec, PolicyState, Replicas, decide
from tandem_operator.autoscaling.scrape import DirectScraper, histogram_quantile, parse_text
from tandem_worker.server.metrics import LATENCY_BUCKETS, TOKEN_BUCKETS, EngineCollector

from .conftest import idle_engine_stats


class Deployment:
    """A router registry and worker registries that export what Tandem's processes export."""

    def __init__(self) -> None:
        self.router = CollectorRegistry()
        self.requests = Counter("tandem_requests", "", ["outcome"], registry=self.router)
        self.router_rejected = Counter("tandem_router_rejected_requests", "", registry=self.router)
        self.pool_rejected = Counter("tandem_pool_rejected_requests", "", ["pool"], registry=self.router)
        self.ttft = Histogram(
            "tandem_time_to_first_token_seconds", "", buckets=LATENCY_BUCKETS, registry=self.router
        )
        self.tpot = Histogram(
            "tandem_time_per_output_token_seconds", "", buckets=TOKEN_BUCKETS, registry=self.router
        )
        self.stats = {role: idle_engine_stats(num_blocks=100) for role in ("prefill", "decode")}
        self.workers = {}
        for role in ("prefill", "decode"):
            reg = CollectorRegistry()
            reg.register(EngineCollector(role, lambda role=role: self.stats[role]))
            self.workers[f"http://{role}/metrics"] = reg
        self.busy = Counter(
            "tandem_engine_busy_seconds", "", ["role"], registry=self.workers["http://prefill/metrics"]
        )
        self.busy.labels(role="prefill")  # the series exists from the start, at 0

    def get(self, url: str) -> str:
        if url == "http://router/metrics":
            return generate_latest(self.router).decode()
        if url in self.workers:
            return generate_latest(self.workers[url]).decode()
        raise OSError("connection refused")


def test_window_from_the_processes_metrics():
    dep = Deployment()
    s = DirectScraper(
        "http://router/metrics",
        {"http://prefill/metrics": "prefill", "http://decode/metrics": "decode"},
        window_s=60,
        sub_window_s=15,
        get=dep.get,
    )
    dep.requests.labels(outcome="met").inc(5)  # before the window: not counted
    s.scrape(0.0)
    for _ in range(30):
        dep.requests.labels(outcome="met").inc()
        dep.ttft.observe(0.3)
        dep.tpot.observe(0.015)
    for _ in range(10):
        dep.requests.labels(outcome="missed_ttft").inc()
        dep.ttft.observe(3.0)
    dep.stats["prefill"]["prefill_tokens_computed"] = 75_000
    dep.stats["prefill"]["queued_prompt_tokens"] = 0
    dep.stats["decode"]["used_blocks"] = 20
    dep.busy.labels(role="prefill").inc(6.0)
    s.scrape(15.0)
    dep.stats["prefill"]["prefill_tokens_computed"] = 90_000
    dep.stats["prefill"]["queued_prompt_tokens"] = 30_000
    dep.stats["decode"]["used_blocks"] = 40
    dep.busy.labels(role="prefill").inc(3.0)
    s.scrape(30.0)
    w = s.window(30.0)
    assert (w.met, w.missed_ttft, w.missed_tpot, w.failed, w.rejected) == (30, 10, 0, 0, 0)
    assert 0.25 < w.ttft_p50_s <= 0.5  # inside the (0.25, 0.5] bucket
    assert 2.5 < w.ttft_p90_s <= 5.0
    assert 0.01 < w.tpot_p90_s <= 0.02
    assert w.prefill_backlog_tokens == pytest.approx(10_000) and w.prefill_backlog_tokens_max == 30_000
    assert w.decode_kv_usage == pytest.approx(0.2) and w.decode_kv_usage_max == pytest.approx(0.4)
    assert w.prompt_tokens_per_s == pytest.approx((90_000 + 30_000) / 30)
    assert w.prompt_tokens_per_s_peak == pytest.approx(75_000 / 15)  # the first 15 s were the busiest
    assert w.prefill_tokens_per_busy_s == pytest.approx(90_000 / 9.0)
    d = decide(
        w,
        Replicas(1, 1),
        AutoscalingSpec(prefill_max_replicas=4, decode_max_replicas=4, max_step=2),
        PolicyState(),
        now=30.0,
    )
    assert d.desired_prefill == 2 and d.desired_decode == 1 and "TTFT misses 25%" in d.reason


def test_requests_turned_away_at_the_routers_own_limit_are_told_apart():
    dep = Deployment()
    s = DirectScraper("http://router/metrics", {"http://decode/metrics": "decode"}, get=dep.get)
    s.scrape(0.0)
    dep.requests.labels(outcome="met").inc(30)
    dep.requests.labels(outcome="rejected").inc(5)
    dep.router_rejected.inc(3)  # of those 5, at the router's own limit
    s.scrape(15.0)
    w = s.window(15.0)
    assert (w.rejected, w.router_rejected, w.pool_rejected, w.served) == (5, 3, 2, 32)
    assert (w.rejected_by_prefill, w.rejected_by_decode) == (0, 2)  # no pool named: decode's


def test_rejections_are_told_apart_by_the_pool_that_turned_them_away():
    dep = Deployment()
    s = DirectScraper("http://router/metrics", {"http://decode/metrics": "decode"}, get=dep.get)
    s.scrape(0.0)
    dep.requests.labels(outcome="met").inc(30)
    dep.requests.labels(outcome="rejected").inc(9)
    dep.router_rejected.inc(2)
    dep.pool_rejected.labels(pool="prefill").inc(4)  # its series born in the window: it was 0
    dep.pool_rejected.labels(pool="decode").inc(3)
    s.scrape(15.0)
    w = s.window(15.0)
    assert (w.router_limited, w.rejected_by_prefill, w.rejected_by_decode) == (2, 4, 3)


def test_too_few_scrapes_or_processes_down_is_missing_data():
    dep = Deployment()
    s = DirectScraper("http://gone/metrics", {"http://gone2/metrics": "prefill"}, get=dep.get)
    s.scrape(0.0)
    s.scrape(15.0)
    w = s.window(15.0)
    assert w.finished is None and not w.has_pool_data()
    s2 = DirectScraper("http://router/metrics", {}, get=dep.get)
    s2.scrape(0.0)
    assert s2.window(0.0).finished is None  # one scrape: no increase to compute


def test_a_worker_that_starts_in_the_window_counts_from_its_first_scrape():
    dep = Deployment()
    s = DirectScraper(None, {"http://prefill/metrics": "prefill"}, get=dep.get)
    dep.stats["prefill"]["prefill_tokens_computed"] = 1_000_000  # earlier life of the process
    s.scrape(0.0)
    dep.stats["prefill"]["prefill_tokens_computed"] = 1_030_000
    s.scrape(30.0)
    assert s.window(30.0).prompt_tokens_per_s == pytest.approx(1000)


def prefill_page(computed: float, backlog: float, busy: float) -> str:
    return (
        f'tandem_prefill_tokens_computed_total{{role="prefill"}} {computed}\n'
        f'tandem_prefill_backlog_tokens{{role="prefill"}} {backlog}\n'
        f'tandem_engine_busy_seconds_total{{role="prefill"}} {busy}\n'
    )


def scrape_pages(s: DirectScraper, pages: dict[float, dict[str, str]]) -> None:
    """Scrape at each time what `pages[time]` holds (a URL it does not hold is down)."""
    for t, at in pages.items():

        def get(url: str, at: dict[str, str] = at) -> str:
            if url not in at:
                raise OSError("connection refused")
            return at[url]

        s.get = get
        s.scrape(t)


def test_counters_that_restart_in_the_window_count_what_was_counted_since():
    # A prefill worker at 1000 tok/s restarts at 30 s (its counters from 0) and a router at 30 s
    # too: each drop between two scrapes is a restart, as Prometheus' increase() reads it.
    p = "http://prefill/metrics"
    computed = {0: 30_000, 15: 45_000, 30: 0, 45: 15_000, 60: 31_000}
    met = {0: 100, 15: 150, 30: 10, 45: 40, 60: 60}
    s = DirectScraper("http://router/metrics", {p: "prefill"}, window_s=60, sub_window_s=15)
    scrape_pages(
        s,
        {
            float(t): {
                p: prefill_page(c, 0, c / 1000),
                "http://router/metrics": f'tandem_requests_total{{outcome="met"}} {met[t]}\n',
            }
            for t, c in computed.items()
        },
    )
    w = s.window(60.0)
    assert w.prompt_tokens_per_s == pytest.approx((15_000 + 0 + 15_000 + 16_000) / 60)
    assert w.prompt_tokens_per_s_peak == pytest.approx(16_000 / 15)
    assert w.prefill_tokens_per_busy_s == pytest.approx(1000)
    assert w.met == 50 + 10 + 30 + 20


def test_a_worker_that_leaves_takes_its_backlog_along():
    # Two prefill workers; the second, with 8000 tokens queued, is removed at 30 s: its queue left
    # with it, arrivals did not fall (the other computes 500 tok/s throughout).
    a, b = "http://a/metrics", "http://b/metrics"
    s = DirectScraper(None, {a: "prefill", b: "prefill"}, window_s=60, sub_window_s=15)
    pages = {float(t): {a: prefill_page(500 * t, 0, t / 2), b: prefill_page(0, 8000, 0)} for t in (0, 15)}
    pages.update({float(t): {a: prefill_page(500 * t, 0, t / 2)} for t in (30, 45, 60)})
    scrape_pages(s, pages)
    w = s.window(60.0)
    assert w.prompt_tokens_per_s == pytest.approx(500)
    assert w.prompt_tokens_per_s_peak == pytest.approx(500)


def test_parse_and_quantile():
    text = '# HELP x y\nfoo_total{a="1",b="q\\"x"} 3.5\nbar 2\nbad line\n'
    assert parse_text(text) == {
        ("foo_total", frozenset({("a", "1"), ("b", 'q\\"x')})): 3.5,
        ("bar", frozenset()): 2.0,
    }
    buckets = [(0.1, 0.0), (0.5, 50.0), (1.0, 100.0), (float("inf"), 100.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.5)
    assert histogram_quantile(0.75, buckets) == pytest.approx(0.75)
    assert histogram_quantile(0.5, [(float("inf"), 0.0)]) is None
