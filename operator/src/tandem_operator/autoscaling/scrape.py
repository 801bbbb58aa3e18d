"""A `MetricsWindow` straight from the processes' /metrics endpoints, without a Prometheus server.

For `tandem up --autoscale` on one machine: call `scrape(now)` every few seconds (it reads the
router's and every worker's Prometheus text exposition), then `window(now)` before each decision.
The window is computed the way the PromQL in `prometheus.py` computes it: counter increases
over the scrapes in the window, a drop between two scrapes read as a restart from 0 as Prometheus
reads it (summed over processes; a process that appeared during the window counts from its first
scrape), histogram quantiles from the router's bucket increases (linear within a bucket, as
`histogram_quantile`), gauges averaged over scrapes and replicas (and their maximum), arrival
rate = prefill tokens computed + each worker's backlog growth while it was scraped.
Standard library only.
"""

from __future__ import annotations

import math
import re
import urllib.request
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from .policy import MetricsWindow
from .prometheus import BUSY_METRIC, OUTCOMES, POOL_REJECTED_METRIC, ROUTER_REJECTED_METRIC

Samples = dict[tuple[str, frozenset], float]

_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_text(text: str) -> Samples:
    """Prometheus text exposition -> {(name, frozenset(labels)): value}."""
    out: Samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if not m:
            continue
        labels = frozenset(_LABEL.findall(m.group(2) or ""))
        try:
            out[(m.group(1), labels)] = float(m.group(3))
        except ValueError:
            continue
    return out


def http_get(timeout_s: float = 2.0) -> Callable[[str], str]:
    def get(url: str) -> str:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - local processes
            return resp.read().decode("utf-8")

    return get


def _sum(samples: Samples, name: str, **labels: str) -> float | None:
    want = set(labels.items())
    vals = [v for (n, ls), v in samples.items() if n == name and want <= ls]
    return sum(vals) if vals else None


def _counter_increase(values: list[float]) -> float:
    """A counter's increase over consecutive scrapes: a drop is a restart, which counted from 0."""
    return sum(b - a if b >= a else b for a, b in zip(values, values[1:]))


@dataclass
class _Scrape:
    t: float
    router: Samples | None
    workers: dict[str, tuple[str, Samples]]  # url -> (role, samples)


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile over cumulative (upper bound, count) pairs."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    prev_le, prev_c = 0.0, 0.0
    for le, c in buckets:
        if c >= rank:
            if math.isinf(le):
                return prev_le  # in the +Inf bucket: the highest finite bound
            if c == prev_c:
                return le
            return prev_le + (le - prev_le) * (rank - prev_c) / (c - prev_c)
        prev_le, prev_c = le, c
    return prev_le


class DirectScraper:
    """Scrapes a local deployment's /metrics endpoints and builds MetricsWindows from them."""

    def __init__(
        self,
        router_url: str | None,
        workers: dict[str, str] | None = None,  # url -> role ("prefill" / "decode")
        window_s: float = 60.0,
        sub_window_s: float = 15.0,
        get: Callable[[str], str] | None = None,
    ) -> None:
        self.router_url = router_url
        self.workers = dict(workers or {})
        self.window_s = window_s
        self.sub_window_s = sub_window_s
        self.get = get or http_get()
        self.scrapes: deque[_Scrape] = deque()

    def set_workers(self, workers: dict[str, str]) -> None:
        """The worker endpoints now (workers come and go as the deployment scales)."""
        self.workers = dict(workers)

    def scrape(self, now: float) -> None:
        """Read every endpoint once; an unreachable one is left out of this scrape."""
        router = None
        if self.router_url:
            try:
                router = parse_text(self.get(self.router_url))
            except OSError:
                router = None
        workers: dict[str, tuple[str, Samples]] = {}
        for url, role in self.workers.items():
            try:
                workers[url] = (role, parse_text(self.get(url)))
            except OSError:
                continue
        self.scrapes.append(_Scrape(now, router, workers))
        while self.scrapes and self.scrapes[0].t < now - 2 * self.window_s:
            self.scrapes.popleft()

    def _in_window(self, now: float) -> list[_Scrape]:
        return [s for s in self.scrapes if now - self.window_s <= s.t <= now]

    @staticmethod
    def _series(scrapes: list[_Scrape], name: str, role: str) -> dict[str, list[float]]:
        """Per worker of `role`, the values of `name` in the scrapes where it was there."""
        series: dict[str, list[float]] = {}
        for s in scrapes:
            for url, (r, samples) in s.workers.items():
                v = _sum(samples, name) if r == role else None
                if v is not None:
                    series.setdefault(url, []).append(v)
        return series

    def _increase(self, scrapes: list[_Scrape], name: str, role: str) -> float | None:
        """Sum over workers of a counter's increase within the scrapes (`_counter_increase`)."""
        series = self._series(scrapes, name, role)
        if not series:
            return None
        return sum(_counter_increase(vals) for vals in series.values())

    def _gauge(self, scrapes: list[_Scrape], name: str, role: str) -> tuple[float | None, float | None]:
        """(mean over scrapes of the mean over replicas, max over scrapes and replicas)."""
        means, peak = [], None
        for s in scrapes:
            vals = [
                v for r, smp in s.workers.values() if r == role for v in [_sum(smp, name)] if v is not None
            ]
            if vals:
                means.append(sum(vals) / len(vals))
                peak = max(vals) if peak is None else max(peak, max(vals))
        return (sum(means) / len(means) if means else None), peak

    def _arrival_rate(self, scrapes: list[_Scrape]) -> float | None:
        """Prompt tokens computed plus backlog growth, per second, from the first scrape to the last."""
        span = scrapes[-1].t - scrapes[0].t
        if span <= 0:
            return None
        inc = self._increase(scrapes, "tandem_prefill_tokens_computed_total", "prefill")
        if inc is None:
            return None
        # Each worker's backlog growth while it was scraped (as `deriv` per series): one that left
        # (scaled away, crashed) took its queue along, which is no fall in arrivals.
        backlogs = self._series(scrapes, "tandem_prefill_backlog_tokens", "prefill")
        growth = sum(vals[-1] - vals[0] for vals in backlogs.values())
        return max(0.0, (inc + growth) / span)

    def window(self, now: float) -> MetricsWindow:
        scrapes = self._in_window(now)
        w = MetricsWindow(duration_s=self.window_s)
        if len(scrapes) < 2:
            return w  # not enough scrapes: missing data
        routers = [s.router for s in scrapes if s.router is not None]
        if len(routers) >= 2:
            last = routers[-1]

            def inc(name: str, **labels: str) -> float:
                # A labelled series appears on its first use: absent, it was 0.
                return _counter_increase([_sum(r, name, **labels) or 0.0 for r in routers])

            counts = {o: int(round(inc("tandem_requests_total", outcome=o))) for o in OUTCOMES}
            w.met, w.missed_ttft, w.missed_tpot = counts["met"], counts["missed_ttft"], counts["missed_tpot"]
            w.failed, w.rejected = counts["failed"], counts["rejected"]
            w.router_rejected = int(round(inc(ROUTER_REJECTED_METRIC)))
            if any(n == POOL_REJECTED_METRIC for n, _ in last):  # a router that tells the pools apart
                w.prefill_rejected = int(round(inc(POOL_REJECTED_METRIC, pool="prefill")))
                w.decode_rejected = int(round(inc(POOL_REJECTED_METRIC, pool="decode")))
            for field_name, metric in (
                ("ttft", "tandem_time_to_first_token_seconds"),
                ("tpot", "tandem_time_per_output_token_seconds"),
            ):
                les = {dict(ls)["le"] for (n, ls) in last if n == metric + "_bucket"}
                buckets = [(float(le), inc(metric + "_bucket", le=le)) for le in les]
                for p in (50, 90, 99):
                    setattr(w, f"{field_name}_p{p}_s", histogram_quantile(p / 100, buckets))
        w.prefill_backlog_tokens, w.prefill_backlog_tokens_max = self._gauge(
            scrapes, "tandem_prefill_backlog_tokens", "prefill"
        )
        w.prefill_running, _ = self._gauge(scrapes, "tandem_requests_running", "prefill")
        w.prefill_waiting, _ = self._gauge(scrapes, "tandem_requests_waiting", "prefill")
        w.decode_kv_usage, w.decode_kv_usage_max = self._gauge(scrapes, "tandem_kv_usage_ratio", "decode")
        w.decode_running, _ = self._gauge(scrapes, "tandem_requests_running", "decode")
        w.decode_waiting, _ = self._gauge(scrapes, "tandem_requests_waiting", "decode")
        w.prompt_tokens_per_s = self._arrival_rate(scrapes)
        rates = []
        for i, a in enumerate(scrapes):
            for j in range(i + 1, len(scrapes)):
                if scrapes[j].t - a.t >= self.sub_window_s - 1e-9:
                    r = self._arrival_rate(scrapes[i : j + 1])
                    if r is not None:
                        rates.append(r)
                    break
        w.prompt_tokens_per_s_peak = max(rates) if rates else w.prompt_tokens_per_s
        computed = self._increase(scrapes, "tandem_prefill_tokens_computed_total", "prefill")
        busy = self._increase(scrapes, BUSY_METRIC, "prefill")
        if computed is not None and busy:
            w.prefill_tokens_per_busy_s = computed / busy
        return w
