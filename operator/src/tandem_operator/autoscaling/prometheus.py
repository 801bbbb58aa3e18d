"""A `MetricsWindow` from Prometheus' HTTP API (instant queries), standard library only.

The operator's autoscaler and `tandem up --autoscale` call `fetch_window` once per decision and
pass the result to `policy.decide`. Each field is one PromQL instant query over the metrics the
router and workers export (tandem_worker/server/metrics.py); `selector` adds the label matchers
that pick one deployment's series (e.g. `namespace="ml",deployment="llama"`: whatever labels the
scrape configuration attaches). A query that returns nothing leaves its field None (the policy
then holds on what it cannot see); Prometheus unreachable or a query failing raises
`PrometheusError`, and the caller holds the current size and reports it
(`AutoscalerHealthy=False`).

Notes on the mapping:
* Request outcomes: `increase(tandem_requests_total[window])` by `outcome` (met, missed_ttft,
  missed_tpot, failed, rejected; invalid requests are the caller's fault, and cancelled and
  timed_out ones ended by their client before any SLO was missed: all left out),
  rounded. No series at all while the pools report: zero requests (idle), not missing data. Of the
  rejected ones, `increase(ROUTER_REJECTED_METRIC)` are those the router turned away at its own
  in-flight limit and `increase(POOL_REJECTED_METRIC)` by `pool` those each pool's workers turned
  away (a router without these counters: none told apart, the rest read as decode's, as before
  they existed).
* Pool gauges: `avg(avg_over_time(...))` is the mean over replicas and the window, and the `*_max`
  fields `max(max_over_time(...))` the busiest replica's highest scrape (the simulator and
  `scrape.py` compute the same).
* Prompt-token arrival rate: what prefill computed plus what its backlog grew by,
  `rate(tandem_prefill_tokens_computed_total) + deriv(tandem_prefill_backlog_tokens)` on the
  prefill pool; the peak is a subquery, the highest such rate over `sub_window_s` at `step_s`
  resolution in the window.
* Prefill throughput per replica (`prefill_tokens_per_busy_s`): computed tokens over engine-busy
  seconds, `tandem_engine_busy_seconds_total` (each step from its launch until its tokens are
  processed). With no such series (workers older than it), the policy uses
  `prefill_tokens_per_second` from the spec or, without it, steps down one at a time.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

from .policy import MetricsWindow

OUTCOMES = ("met", "missed_ttft", "missed_tpot", "failed", "rejected")
# Seconds a worker's engine spent computing (a counter the workers do not export yet): with it the
# policy learns a prefill replica's throughput; without it, that query returns nothing.
BUSY_METRIC = "tandem_engine_busy_seconds_total"
# Requests the router turned away at its own in-flight limit (also counted as outcome="rejected").
ROUTER_REJECTED_METRIC = "tandem_router_rejected_requests_total"
# Requests a pool's workers turned away, by `pool` (prefill, decode; also outcome="rejected").
POOL_REJECTED_METRIC = "tandem_pool_rejected_requests_total"


# What Tandem's monitors scrape at by default (charts/tandem: monitoring.*.interval); the operator's
# --scrape-interval tells it another.
DEFAULT_SCRAPE_INTERVAL_S = 15.0
# Queries of request counts, read only when the outcomes are (rejections split by who turned them away).
COUNT_QUERIES = ("outcomes", "router_rejected", "pool_rejected")
MIN_SAMPLES_PER_RANGE = 4


def read_window_s(window_s: float, scrape_interval_s: float = DEFAULT_SCRAPE_INTERVAL_S) -> float:
    """The window the queries really read: at least `MIN_SAMPLES_PER_RANGE` scrapes, since rate(),
    increase() and deriv() need two samples in their range (Prometheus' own advice is four)."""
    return max(window_s, MIN_SAMPLES_PER_RANGE * scrape_interval_s)


class PrometheusError(RuntimeError):
    """Prometheus could not be asked (unreachable, HTTP error, query error)."""


def _sel(selector: str, *extra: str) -> str:
    parts = [p for p in (selector.strip(), *extra) if p]
    return "{" + ",".join(parts) + "}"


def queries(
    window_s: float,
    selector: str = "",
    prefill_role: str = "prefill",
    decode_role: str = "decode",
    sub_window_s: float | None = None,
    step_s: float | None = None,
    scrape_interval_s: float = DEFAULT_SCRAPE_INTERVAL_S,
) -> dict[str, str]:
    """The PromQL of each MetricsWindow field (plus `outcomes`, a vector by outcome).

    Every range spans at least `MIN_SAMPLES_PER_RANGE` scrape intervals (`read_window_s`): at the
    chart's 15 s a range of 15 s held one sample, and the burst peak (or a short window) always
    read as no data. The peak's sub-windows default to that length, sampled once a scrape interval."""
    window_s = read_window_s(window_s, scrape_interval_s)
    sub_window_s = read_window_s(sub_window_s or 0.0, scrape_interval_s)
    step_s = step_s or scrape_interval_s
    w, sub, step = f"{int(window_s)}s", f"{int(sub_window_s)}s", f"{max(1, int(step_s))}s"
    pre, dec = f'role="{prefill_role}"', f'role="{decode_role}"'
    q: dict[str, str] = {
        "outcomes": f"sum by (outcome) (increase(tandem_requests_total{_sel(selector)}[{w}]))",
        "router_rejected": f"sum(increase({ROUTER_REJECTED_METRIC}{_sel(selector)}[{w}]))",
        "pool_rejected": f"sum by (pool) (increase({POOL_REJECTED_METRIC}{_sel(selector)}[{w}]))",
    }
    for name, metric in (
        ("ttft", "tandem_time_to_first_token_seconds"),
        ("tpot", "tandem_time_per_output_token_seconds"),
    ):
        for p in (50, 90, 99):
            q[f"{name}_p{p}_s"] = (
                f"histogram_quantile({p / 100}, sum by (le) (rate({metric}_bucket{_sel(selector)}[{w}])))"
            )
    gauge = lambda metric, role, agg: f"{agg}({agg}_over_time({metric}{_sel(selector, role)}[{w}]))"
    q["prefill_backlog_tokens"] = gauge("tandem_prefill_backlog_tokens", pre, "avg")
    q["prefill_backlog_tokens_max"] = gauge("tandem_prefill_backlog_tokens", pre, "max")
    q["prefill_running"] = gauge("tandem_requests_running", pre, "avg")
    q["prefill_waiting"] = gauge("tandem_requests_waiting", pre, "avg")
    q["decode_kv_usage"] = gauge("tandem_kv_usage_ratio", dec, "avg")
    q["decode_kv_usage_max"] = gauge("tandem_kv_usage_ratio", dec, "max")
    q["decode_running"] = gauge("tandem_requests_running", dec, "avg")
    q["decode_waiting"] = gauge("tandem_requests_waiting", dec, "avg")
    computed = f"tandem_prefill_tokens_computed_total{_sel(selector, pre)}"
    backlog = f"tandem_prefill_backlog_tokens{_sel(selector, pre)}"
    arrivals = lambda r: f"(sum(rate({computed}[{r}])) + sum(deriv({backlog}[{r}])))"
    q["prompt_tokens_per_s"] = arrivals(w)
    q["prompt_tokens_per_s_peak"] = f"max_over_time({arrivals(sub)}[{w}:{step}])"
    busy = f"{BUSY_METRIC}{_sel(selector, pre)}"
    q["prefill_tokens_per_busy_s"] = f"sum(increase({computed}[{w}])) / sum(increase({busy}[{w}]))"
    return q


def http_query(base_url: str, timeout_s: float = 5.0) -> Callable[[str, float | None], list[dict[str, Any]]]:
    """A function (query, time) -> the result vector, over Prometheus' /api/v1/query."""

    def run(query: str, at: float | None = None) -> list[dict[str, Any]]:
        params = {"query": query}
        if at is not None:
            params["time"] = f"{at:.3f}"
        url = base_url.rstrip("/") + "/api/v1/query?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - operator config
                body = json.loads(resp.read().decode("utf-8"))
        except urllib.error.HTTPError as e:
            detail = ""
            try:
                detail = json.loads(e.read().decode("utf-8")).get("error", "")
            except (ValueError, OSError):
                pass
            raise PrometheusError(f"{base_url}: HTTP {e.code} {detail or e.reason}") from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise PrometheusError(f"{base_url}: {getattr(e, 'reason', e)}") from None
        if body.get("status") != "success":
            raise PrometheusError(f"{base_url}: query failed: {body.get('error', body)}")
        data = body.get("data", {})
        if data.get("resultType") == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return list(data.get("result", []))

    return run


def _value(sample: dict[str, Any]) -> float | None:
    try:
        v = float(sample["value"][1])
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    return None if math.isnan(v) or math.isinf(v) else v


def fetch_window(
    query: Callable[[str, float | None], list[dict[str, Any]]] | str,
    window_s: float,
    selector: str = "",
    at: float | None = None,
    **kw: Any,
) -> MetricsWindow:
    """One MetricsWindow; `query` is a Prometheus base URL or a function made by `http_query`."""
    run = http_query(query) if isinstance(query, str) else query
    # Rates are over the span queries() really reads.
    window_s = read_window_s(window_s, kw.get("scrape_interval_s", DEFAULT_SCRAPE_INTERVAL_S))
    q = queries(window_s, selector, **kw)
    fields: dict[str, Any] = {}
    for name, promql in q.items():
        if name in COUNT_QUERIES:
            continue
        result = run(promql, at)
        fields[name] = _value(result[0]) if result else None
    counts = {o: 0 for o in OUTCOMES}
    outcome_rows = run(q["outcomes"], at)
    for row in outcome_rows:
        o = row.get("metric", {}).get("outcome")
        v = _value(row)
        if o in counts and v is not None:
            counts[o] = int(round(v))
    if not outcome_rows:
        # The router exports every outcome from its start (at 0): no rows is no router scraped, or
        # too few scrapes in the window, never "no requests", which would read as idle.
        return MetricsWindow(duration_s=window_s, **fields)
    # Rounded (and extrapolated) apart from the outcome they are part of, they could exceed it: the
    # window clamps them.
    limited = run(q["router_rejected"], at)
    parts: dict[str, Any] = {"router_rejected": int(round((_value(limited[0]) if limited else None) or 0))}
    by_pool = {row.get("metric", {}).get("pool"): _value(row) for row in run(q["pool_rejected"], at)}
    if by_pool:  # a router that tells the pools apart (its series exist from its start, at 0)
        parts["prefill_rejected"] = int(round(by_pool.get("prefill") or 0))
        parts["decode_rejected"] = int(round(by_pool.get("decode") or 0))
    return MetricsWindow(
        duration_s=window_s,
        met=counts["met"],
        missed_ttft=counts["missed_ttft"],
        missed_tpot=counts["missed_tpot"],
        failed=counts["failed"],
        rejected=counts["rejected"],
        **parts,
        **fields,
    )
