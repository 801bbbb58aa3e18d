"""The router's own in-flight limit is told apart from full or busy workers in its metrics: the
autoscaler scales no pool up for it (policy: test_policy.py; through a real Prometheus:
test_prometheus_server.py)."""

from __future__ import annotations

import grpc
from prometheus_client import REGISTRY

from tandem_worker.server import metrics

from ..test_worker_pool import _BusyPrefills, _refused, _router_over_fake_decode


def counts() -> tuple[float, float]:
    """(outcome="rejected", of which at the router's own limit) as the router exports them."""
    rejected = REGISTRY.get_sample_value("tandem_requests_total", {"outcome": "rejected"}) or 0.0
    return rejected, REGISTRY.get_sample_value("tandem_router_rejected_requests_total") or 0.0


def test_the_routers_own_limit_is_counted_apart_from_busy_workers(model_dir):
    metrics.start_request_outcomes()
    with _router_over_fake_decode(model_dir, lambda pool: _BusyPrefills()) as (router, _, fake):
        before = counts()
        code, details = _refused(router)  # every prefill worker at its limit
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "at their limit" in details
        busy = counts()
        assert (busy[0] - before[0], busy[1] - before[1]) == (1, 0)
        router.max_in_flight = 0  # the router at its own limit: no worker is asked
        calls = len(fake.prefills)
        code, details = _refused(router)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "router queue is full" in details
        assert len(fake.prefills) == calls
        limited = counts()
        assert (limited[0] - busy[0], limited[1] - busy[1]) == (1, 1)
