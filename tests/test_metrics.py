"""The router's `tandem_router_workers{role,state}` as Prometheus scrapes it (the text exposition of
a registry holding the collector), from the router's own WorkerInfo records; and its count of
worker ejections (`tandem_router_worker_ejections_total{role}`)."""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tandem_worker.server import metrics
from tandem_worker.server.metrics import WorkerPoolCollector
from tandem_worker.server.pb import worker_pb2 as wpb
from tandem_worker.server.worker_pool import WorkerInfo, WorkerPool


def _scrape(workers: list[WorkerInfo]) -> dict[tuple[str, str], float]:
    registry = CollectorRegistry()
    registry.register(WorkerPoolCollector(lambda: workers))
    text = generate_latest(registry).decode()
    return {
        (s.labels["role"], s.labels["state"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "tandem_router_workers"
    }


def _worker(address: str, role: str, healthy: bool, draining: bool = False) -> WorkerInfo:
    return WorkerInfo(
        address, channel=None, healthy=healthy, stats=wpb.StatsResponse(role=role, draining=draining)
    )


def test_a_role_without_serving_workers_reads_zero_not_absent():
    """Both decode workers failed: "no decode worker serving" must be a 0 that an alert or a panel
    can see, not a series that vanished (which `== 0` never matches)."""
    prefill = _worker("p:1", "prefill", healthy=True)
    decodes = [_worker("d:1", "decode", healthy=False), _worker("d:2", "decode", healthy=False)]
    assert _scrape([prefill, *decodes]) == {
        ("prefill", "serving"): 1,
        ("decode", "serving"): 0,
        ("decode", "unavailable"): 2,
    }
    draining = _worker("d:1", "decode", healthy=True, draining=True)
    assert _scrape([prefill, draining])[("decode", "serving")] == 0
    # Not reached yet: no role to report as serving nothing.
    never = WorkerInfo("d:3", channel=None)
    assert _scrape([prefill, never]) == {("prefill", "serving"): 1, ("unknown", "unavailable"): 1}


class _Clock:
    """The pool's clock for its backoffs, moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _checked(address: str, role: str) -> WorkerInfo:
    """A worker as a passed health check leaves it."""
    w = _worker(address, role, healthy=True)
    w.checked_healthy = True
    return w


def _pool(*workers: WorkerInfo) -> WorkerPool:
    pool = WorkerPool(decode_targets=[], clock=_Clock())
    pool._workers = {w.address: w for w in workers}
    pool._decode = [w.address for w in workers if w.role != "prefill"]
    pool._prefill = [w.address for w in workers if w.role == "prefill"]
    return pool


def _scrape_pool(pool: WorkerPool) -> dict[tuple[str, str], float]:
    registry = CollectorRegistry()
    registry.register(WorkerPoolCollector(pool.snapshot, pool.clock))
    text = generate_latest(registry).decode()
    return {
        (s.labels["role"], s.labels["state"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "tandem_router_workers" and s.value
    }


def test_a_worker_backing_off_after_a_failed_request_is_not_serving():
    """It passes its health checks, but gets no new work until its backoff is over: it read as
    serving then (and as unavailable until its next check), so a dashboard never showed that a
    failing worker had been taken out."""
    prefill, decode = _checked("p:1", "prefill"), _checked("d:1", "decode")
    pool = _pool(prefill, decode)
    pool.mark_failed(prefill, "prefill worker p:1 stalled: no KV for 30 s")
    assert _scrape_pool(pool) == {("prefill", "backoff"): 1, ("decode", "serving"): 1}
    prefill.healthy = True  # its next health check passes
    assert _scrape_pool(pool) == {("prefill", "backoff"): 1, ("decode", "serving"): 1}
    pool.clock.now += pool.backoff_base  # the backoff is over: back in rotation
    assert _scrape_pool(pool) == {("prefill", "serving"): 1, ("decode", "serving"): 1}
    # The other states keep their meaning whatever the backoff: a failing health check is
    # unavailable, a drain is draining.
    pool.mark_failed(prefill, "prefill worker p:1 stalled: no KV for 30 s")
    prefill.healthy = prefill.checked_healthy = False
    pool.mark_failed(decode, "worker stream ended early")
    decode.stats.draining = True
    assert _scrape_pool(pool) == {("prefill", "unavailable"): 1, ("decode", "draining"): 1}


def test_each_backoff_a_failed_request_starts_counts_once_as_an_ejection():
    metrics.start_request_outcomes()
    for role in ("prefill", "decode", "colocated"):  # at 0 from the first scrape, as the outcomes
        assert REGISTRY.get_sample_value("tandem_router_worker_ejections_total", {"role": role}) is not None

    def ejections() -> float:
        return REGISTRY.get_sample_value("tandem_router_worker_ejections_total", {"role": "prefill"})

    p1, p2 = _checked("p:1", "prefill"), _checked("p:2", "prefill")
    pool = _pool(p1, p2, _checked("d:1", "decode"))
    before = ejections()
    for _ in range(5):  # one stall failing every request it held: one incident
        pool.mark_failed(p1, "prefill worker p:1 stalled: no KV for 30 s")
    assert ejections() == before + 1
    pool.mark_failed(p2, "prefill worker p:2 failed: Socket closed")
    assert ejections() == before + 2
    pool.clock.now += pool.backoff_max  # past both backoffs: a new failure is a new ejection
    pool.mark_failed(p1, "prefill worker p:1 stalled: no KV for 30 s")
    assert ejections() == before + 3
