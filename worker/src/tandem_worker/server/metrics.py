"""Prometheus metrics of Tandem's processes: names prefixed `tandem_`, units in the names.

Workers export KV and queue state (read from the engine at scrape time) and KV transfer volume
(of completed transfers; aborted ones are counted apart, so a transfer cut off halfway never shows
as a fast small one); the router exports per-request latency against the SLOs and how many of its
workers serve and how often a failed request took one out of rotation.
Labels stay bounded.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import REGISTRY, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120)
TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5)

KV_TRANSFER_BYTES = Counter(
    "tandem_kv_transfer_bytes",
    "KV cache payload bytes of completed transfers between prefill and decode workers",
    ["direction"],
)
KV_TRANSFER_SECONDS = Histogram(
    "tandem_kv_transfer_seconds",
    "Duration of one request's completed KV transfer",
    ["direction"],
    buckets=LATENCY_BUCKETS,
)
KV_TRANSFERS = Counter(
    "tandem_kv_transfers",
    "KV transfers by outcome: completed (the last message went out, or came in), or aborted"
    " (cancelled, failed or stalled before that)",
    ["direction", "outcome"],
)
KV_TRANSFER_ABORTED_BYTES = Counter(
    "tandem_kv_transfer_aborted_bytes",
    "KV cache payload bytes that aborted transfers moved before they ended",
    ["direction"],
)
KV_TRANSFER_OUTCOMES = ("completed", "aborted")
TTFT_SECONDS = Histogram(
    "tandem_time_to_first_token_seconds", "Arrival to first token", buckets=LATENCY_BUCKETS
)
TPOT_SECONDS = Histogram(
    "tandem_time_per_output_token_seconds",
    "Mean time per output token after the first",
    buckets=TOKEN_BUCKETS,
)
E2E_SECONDS = Histogram(
    "tandem_e2e_request_latency_seconds", "Arrival to last token", buckets=LATENCY_BUCKETS
)
QUEUE_SECONDS = Histogram(
    "tandem_request_queue_seconds",
    "The serving decode (or colocated) worker's wait: its arrival there to first scheduling (the KV "
    "reservation when disaggregated); not the router's, the prefill queue's or the KV transfer's time",
    buckets=LATENCY_BUCKETS,
)
REQUESTS = Counter("tandem_requests", "Finished requests by outcome", ["outcome"])
# Ended by their client with no SLO missed yet (see router.py): attainment leaves them out, as it
# does invalid requests.
CLIENT_ENDED_OUTCOMES = ("cancelled", "timed_out")
REQUEST_OUTCOMES = (
    "met",
    "missed_ttft",
    "missed_tpot",
    "failed",
    "rejected",
    "invalid",
    *CLIENT_ENDED_OUTCOMES,
)
RETRIES = Counter("tandem_request_retries", "Requests retried on another worker pair before any token")
# A subset of outcome="rejected" (which a dashboard's totals keep counting): the autoscaler tells the
# router's own limit apart from full or busy workers, and scales no pool up for it.
ROUTER_REJECTED = Counter(
    "tandem_router_rejected_requests",
    'Requests the router turned away at its own in-flight limit (also counted as outcome="rejected")',
)
# The rest of outcome="rejected", by the pool whose workers turned the request away: the autoscaler
# reads prefill's as TTFT-side pressure and decode's as decode's. "decode" is the router's decode
# targets (decode or colocated workers), and also takes a request no decode worker had KV room for.
POOL_REJECTED = Counter(
    "tandem_pool_rejected_requests",
    "Requests turned away because the workers of a pool were at their request limit or, for decode,"
    ' out of KV room, by pool (also counted as outcome="rejected")',
    ["pool"],
)
REJECTING_POOLS = ("prefill", "decode")
# A worker's state as `tandem_router_workers` reads it shows an ejection only while it lasts (a
# second or so, often between two scrapes); the count keeps every one: a worker failing now and then.
WORKER_EJECTIONS = Counter(
    "tandem_router_worker_ejections",
    "Times the router took a worker out of rotation for a backoff after a failed request (further"
    " failures of the same incident not counted), by role",
    ["role"],
)
WORKER_ROLES = ("prefill", "decode", "colocated")


class EngineCollector(Collector):
    """Reads the engine's stats at scrape time, so gauges are never stale. `kv_unsent` (a prefill
    worker's): bytes of KV queued for its readers and not yet sent."""

    def __init__(
        self, role: str, stats: Callable[[], dict[str, Any]], kv_unsent: Callable[[], int] | None = None
    ) -> None:
        self.role = role
        self.stats = stats
        self.kv_unsent = kv_unsent

    def collect(self) -> Iterator[Any]:
        try:
            st = self.stats()
        except Exception:  # noqa: BLE001 - a busy or dying engine must not break the scrape
            return
        labels = ["role"]
        for name, key, doc in (
            ("tandem_kv_blocks_used", "used_blocks", "KV blocks held by requests"),
            ("tandem_kv_blocks_free", "free_blocks", "KV blocks allocatable now (incl. cached prefixes)"),
            ("tandem_kv_blocks_cached", "cached_blocks", "Free KV blocks that still hold a reusable prefix"),
            ("tandem_requests_running", "running", "Requests in the running batch"),
            ("tandem_requests_waiting", "waiting", "Requests waiting for admission"),
            ("tandem_prefill_backlog_tokens", "queued_prompt_tokens", "Prompt tokens not yet computed"),
        ):
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric([self.role], st[key])
            yield g
        usage = GaugeMetricFamily(
            "tandem_kv_usage_ratio", "Used fraction of the KV block pool", labels=labels
        )
        usage.add_metric([self.role], st["used_blocks"] / max(st["num_blocks"], 1))
        yield usage
        if self.kv_unsent is not None:
            # Read live, not from the stats snapshot: readers drain it between engine steps.
            unsent = GaugeMetricFamily(
                "tandem_kv_send_backlog_bytes",
                "KV computed for readers (decode workers) and not sent to them yet; past"
                " --kv-send-backlog-total-bytes new KV pulls are refused as busy",
                labels=labels,
            )
            unsent.add_metric([self.role], self.kv_unsent())
            yield unsent
        for name, key, doc in (
            ("tandem_prefill_tokens_computed", "prefill_tokens_computed", "Prompt tokens computed"),
            (
                "tandem_prefill_tokens_cached",
                "prefix_cached_tokens",
                "Prompt tokens served from the prefix cache",
            ),
            ("tandem_decode_tokens", "decode_tokens", "Tokens generated by decode steps"),
            ("tandem_preemptions", "preemptions", "Sequences preempted for lack of KV blocks"),
            ("tandem_engine_busy_seconds", "busy_seconds", "Time the engine spent computing steps"),
        ):
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric([self.role], st[key])
            yield c
        yield from self._adapters(st)

    def _adapters(self, st: dict[str, Any]) -> Iterator[Any]:
        """LoRA paging: where requests found their adapter, loads, evictions, residency per tier."""
        if "adapter_hits" not in st:
            return
        hits = CounterMetricFamily(
            "tandem_adapter_requests",
            "Requests by the tier their LoRA adapter was found in (store: a miss, read from disk)",
            labels=["role", "tier"],
        )
        for tier, n in st["adapter_hits"].items():
            hits.add_metric([self.role, tier], n)
        yield hits
        for name, key, doc in (
            ("tandem_adapter_loads", "adapter_loads", "Adapters read from the store into host memory"),
            ("tandem_adapter_load_failures", "adapter_load_failures", "Adapter reads that failed"),
            ("tandem_adapter_load_seconds", "adapter_load_seconds", "Time spent reading adapters"),
            ("tandem_adapter_device_loads", "adapter_device_loads", "Adapter copies into the KV pool"),
        ):
            c = CounterMetricFamily(name, doc, labels=["role"])
            c.add_metric([self.role], st[key])
            yield c
        ev = CounterMetricFamily(
            "tandem_adapter_evictions", "Adapters evicted, per tier", labels=["role", "tier"]
        )
        for tier, n in st["adapter_evictions"].items():
            ev.add_metric([self.role, tier], n)
        yield ev
        res = GaugeMetricFamily(
            "tandem_adapters_resident", "Adapters held, per tier", labels=["role", "tier"]
        )
        res.add_metric([self.role, "device"], len(st["adapters_device"]))
        res.add_metric([self.role, "host"], len(st["adapters_host"]))
        yield res
        blocks = GaugeMetricFamily(
            "tandem_kv_blocks_adapter", "KV pool blocks holding LoRA adapter weights", labels=["role"]
        )
        blocks.add_metric([self.role], st["adapter_blocks"])
        yield blocks


class WorkerPoolCollector(Collector):
    """The router's view of its workers at scrape time: which ones get new work.

    `snapshot`: `WorkerPool.snapshot` (WorkerInfo objects); `clock`: the pool's (`WorkerPool.clock`),
    which its backoffs are timed on."""

    def __init__(
        self, snapshot: Callable[[], list[Any]], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.snapshot = snapshot
        self.clock = clock

    def collect(self) -> Iterator[Any]:
        counts: dict[tuple[str, str], int] = {}
        now = self.clock()
        for w in self.snapshot():
            key = (w.role or "unknown", w.state(now))
            counts[key] = counts.get(key, 0) + 1
        # A role's "serving" series reads 0 when none of its workers serves, rather than vanishing:
        # absent, `tandem_router_workers{state="serving"} == 0` (no decode worker in rotation: all
        # down, draining or backing off) finds nothing exactly when it matters. A worker keeps its
        # role once reached, also after it fails.
        for role, _ in list(counts):
            if role != "unknown":
                counts.setdefault((role, "serving"), 0)
        g = GaugeMetricFamily(
            "tandem_router_workers",
            "Workers the router knows, by role and state: serving (gets new work), backoff (out of"
            " rotation for a while after a failed request), draining, unavailable (fails its health"
            " checks)",
            labels=["role", "state"],
        )
        for (role, state), n in sorted(counts.items()):
            g.add_metric([role, state], n)
        yield g


def serve_metrics(port: int, host: str = "127.0.0.1") -> None:
    """Expose /metrics over HTTP (port 0 disables it)."""
    if port:
        start_http_server(port, addr=host)


def register_engine(
    role: str, stats: Callable[[], dict[str, Any]], kv_unsent: Callable[[], int] | None = None
) -> EngineCollector:
    collector = EngineCollector(role, stats, kv_unsent)
    REGISTRY.register(collector)
    return collector


def kv_transfer_ended(direction: str, completed: bool, nbytes: int, seconds: float) -> None:
    """One KV transfer's end, on either side (`direction` "sent" or "received"): the byte and
    duration metrics take completed transfers only, alike on both sides, so sent and received
    bytes agree and the duration histogram is of whole transfers."""
    if completed:
        KV_TRANSFER_BYTES.labels(direction=direction).inc(nbytes)
        KV_TRANSFER_SECONDS.labels(direction=direction).observe(seconds)
    else:
        KV_TRANSFER_ABORTED_BYTES.labels(direction=direction).inc(nbytes)
    KV_TRANSFERS.labels(direction=direction, outcome="completed" if completed else "aborted").inc()


def start_kv_transfers(direction: str) -> None:
    """A worker's KV transfer series, at 0, from its first scrape (see `start_request_outcomes`)."""
    KV_TRANSFER_BYTES.labels(direction=direction)
    KV_TRANSFER_SECONDS.labels(direction=direction)
    KV_TRANSFER_ABORTED_BYTES.labels(direction=direction)
    for outcome in KV_TRANSFER_OUTCOMES:
        KV_TRANSFERS.labels(direction=direction, outcome=outcome)


def unregister(collector: Any) -> None:
    """Take a collector out of the registry (a worker served in-process, then stopped)."""
    REGISTRY.unregister(collector)


def register_worker_pool(
    snapshot: Callable[[], list[Any]], clock: Callable[[], float] = time.monotonic
) -> None:
    REGISTRY.register(WorkerPoolCollector(snapshot, clock))


def start_request_outcomes() -> None:
    """Every outcome's series (and each pool's rejections, each role's worker ejections), at 0, from
    the router's first scrape.
    Prometheus' increase() takes a series' first sample as its baseline: a series born at its
    first failure would lose the failures counted before that scrape (the autoscaler's "failures
    hold scale-down" guard), and no series at all could not tell "no requests" from "not scraped
    yet"."""
    for outcome in REQUEST_OUTCOMES:
        REQUESTS.labels(outcome=outcome)
    for pool in REJECTING_POOLS:
        POOL_REJECTED.labels(pool=pool)
    for role in WORKER_ROLES:
        WORKER_EJECTIONS.labels(role=role)
