"""The router's `tandem_router_workers{role,state}` as Prometheus scrapes it (the text exposition of
a registry holding the collector), from the router's own WorkerInfo records."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tandem_worker.server.metrics import WorkerPoolCollector
from tandem_worker.server.pb import worker_pb2 as wpb
from tandem_worker.server.worker_pool import WorkerInfo


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
