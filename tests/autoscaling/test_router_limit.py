"""The router's own in-flight limit is told apart from full or busy workers in its metrics: the
autoscaler scales no pool up for it; and the workers' rejections are counted by the pool that
turned them away, which the autoscaler grows (policy: test_policy.py; through a real Prometheus:
test_prometheus_server.py)."""

from __future__ import annotations

import grpc
import pytest
from prometheus_client import REGISTRY

from tandem_proto.v1 import worker_pb2_grpc as wgrpc
from tandem_worker.server import metrics

from ..test_worker_pool import _BusyPrefills, _refused, _router_over_fake_decode

POOLS = ("prefill", "decode")


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


def pool_counts() -> tuple[float, float, float]:
    """(outcome="rejected", of which the prefill workers', of which the decode workers')."""
    rejected = REGISTRY.get_sample_value("tandem_requests_total", {"outcome": "rejected"}) or 0.0
    by = [REGISTRY.get_sample_value("tandem_pool_rejected_requests_total", {"pool": p}) for p in POOLS]
    return (rejected, *by)


class _Refuses(wgrpc.WorkerServicer):
    """A decode worker answering its calls, in turn, RESOURCE_EXHAUSTED with these details (as a
    real one words them: its own limit, or its prefill partner's relayed)."""

    def __init__(self, *details: str) -> None:
        self.details = list(details)

    def Generate(self, request, context):  # noqa: N802
        context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED, self.details.pop(0).format(request.prefill_endpoint)
        )
        yield


OWN_LIMIT = "256 requests in flight (the limit is 256)"
PREFILL_BUSY = "prefill worker {} is busy: 256 requests in flight (the limit is 256)"


def delta(before: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(b - a for a, b in zip(before, pool_counts()))


@pytest.mark.parametrize(
    ("refusals", "pool"),
    [
        ((PREFILL_BUSY, PREFILL_BUSY), "prefill"),  # every prefill worker at its limit
        ((OWN_LIMIT,), "decode"),  # the decode worker at its own limit
        # Prefill busy, then the decode worker too: more prefill alone would not have served it.
        ((PREFILL_BUSY, OWN_LIMIT), "decode"),
    ],
)
def test_rejections_are_counted_by_the_pool_whose_workers_turned_them_away(model_dir, refusals, pool):
    metrics.start_request_outcomes()
    with _router_over_fake_decode(model_dir, lambda _: _Refuses(*refusals)) as (router, _, fake):
        before = pool_counts()
        code, details = _refused(router)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "at their limit" in details
        assert not fake.details  # each refusal was an attempt
    expected = {"prefill": (1, 1, 0), "decode": (1, 0, 1)}[pool]
    assert delta(before) == expected


def test_a_request_no_decode_worker_has_kv_room_for_is_decodes_rejection(model_dir):
    metrics.start_request_outcomes()
    with _router_over_fake_decode(model_dir, lambda _: _Refuses()) as (router, pool, _):
        decode = pool._workers["decode"]
        decode.stats.free_blocks = 0
        decode.stats_asked_at = 1.0  # the stats are fresh: no recheck before the refusal
        before = pool_counts()
        code, details = _refused(router)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "KV cache is full" in details
    assert delta(before) == (1, 0, 1)
