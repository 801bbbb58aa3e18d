"""The autoscaler's queries against a real Prometheus (Debian's `prometheus` package) scraping live
exporters on loopback: the real router's metrics (its `RouterService`, in-process) and workers'
`EngineCollector`s, with the labels the chart's monitors attach.

What is checked: the simulator's pool gauges mean what the operator's PromQL reads from the same
scrapes (the busiest replica's highest KV usage, on a rising and uneven pool), and requests the
router turns away at its own limit reach the policy told apart, so decode is not grown for them."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY, CollectorRegistry, start_http_server

from tandem_operator.autoscaler import selector
from tandem_operator.autoscaling import (
    AutoscalingSpec,
    MetricsWindow,
    PolicyState,
    Replicas,
    decide,
    fetch_window,
)
from tandem_proto.v1 import inference_pb2 as pb
from tandem_proto.v1 import worker_pb2 as wpb
from tandem_proto.v1 import worker_pb2_grpc as wgrpc
from tandem_worker.server import metrics
from tandem_worker.server.metrics import EngineCollector

from ..chart.test_dashboard_prometheus import LABELS, _query
from ..prometheus_server import PROMETHEUS, prometheus_server
from ..test_worker_pool import _Context, _refused, _router_over_fake_decode
from .conftest import idle_engine_stats
from .test_simulator import scraped

pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="needs Debian's prometheus package")
SELECTOR = selector(LABELS["namespace"], LABELS["model_deployment"])
SCRAPE_S = 1
SPEC = AutoscalingSpec(prefill_max_replicas=8, decode_max_replicas=8, max_step=4)


@dataclass
class Deployment:
    """The router (the process-wide registry the real router records into), one prefill worker and
    two decode workers, each on its own loopback port, scraped by a real Prometheus at `url`."""

    url: str
    stats: dict[str, dict[str, Any]]

    def eventually(self, expr: str, ok: Callable[[float], bool]) -> None:
        """Wait until `expr` (one series) has a value `ok` accepts: Prometheus scrapes on its clock."""
        deadline, last = time.monotonic() + 60, None
        while time.monotonic() < deadline:
            try:
                rows = _query(self.url, expr)
            except OSError:  # still starting
                rows = []
            last = float(rows[0]["value"][1]) if rows else None
            if last is not None and ok(last):
                return
            time.sleep(0.2)
        raise AssertionError(f"{expr}: still {last}")

    def scraped_twice(self, metric: str, pod: str) -> None:
        """Wait for two more scrapes of `pod`: what was set before them is in Prometheus."""
        expr = f'count_over_time({metric}{{{SELECTOR},pod="{pod}"}}[10m])'
        rows = _query(self.url, expr) if self._up() else []
        seen = float(rows[0]["value"][1]) if rows else 0.0
        self.eventually(expr, lambda n: n >= seen + 2)

    def _up(self) -> bool:
        try:
            _query(self.url, "up")
        except OSError:
            return False
        return True


@contextlib.contextmanager
def deployment(tmp_path: Path, **initial: dict[str, Any]) -> Iterator[Deployment]:
    """`initial`: stats by pod (decode_0=...) to export from the first scrape on."""
    metrics.start_request_outcomes()  # as the router does at its start
    stats = {pod: idle_engine_stats(num_blocks=100) for pod in ("prefill-0", "decode-0", "decode-1")}
    for pod, st in initial.items():
        stats[pod.replace("_", "-")].update(st)
    registries: dict[str, CollectorRegistry] = {"router-0": REGISTRY}
    for pod in stats:
        registries[pod] = reg = CollectorRegistry()
        reg.register(EngineCollector(pod.split("-")[0], lambda pod=pod: stats[pod]))
    servers = {pod: start_http_server(0, "127.0.0.1", registry=reg)[0] for pod, reg in registries.items()}
    scrape = [
        {
            "job_name": pod,
            "scrape_interval": f"{SCRAPE_S}s",
            "static_configs": [
                {"targets": [f"127.0.0.1:{srv.server_address[1]}"], "labels": {**LABELS, "pod": pod}}
            ],
        }
        for pod, srv in servers.items()
    ]
    config = {"global": {"scrape_interval": f"{SCRAPE_S}s"}, "scrape_configs": scrape}
    try:
        with prometheus_server(tmp_path, config) as url:
            yield Deployment(url, stats)
    finally:
        for srv in servers.values():
            srv.shutdown()
            srv.server_close()


def window(url: str) -> MetricsWindow:
    """What the operator's autoscaler reads (`Autoscaler.step`), over everything scraped so far."""
    return fetch_window(url, 120, SELECTOR, scrape_interval_s=SCRAPE_S)


def test_kv_usage_max_is_the_busiest_replicas_in_the_simulator_and_in_prometheus(tmp_path):
    """KV usage rising on one decode replica (a long context pinned there, requests waiting behind
    it) and not on the other: the pool's mean stays below the target, the busiest replica crosses
    `kv_usage_high`. The operator's PromQL reads the busiest replica's highest scrape; the simulator
    must read the same, or it predicts a hold where the operator adds a replica."""
    phases = [([0.5, 0.2], [0, 0]), ([0.9, 0.2], [2, 0])]
    with deployment(tmp_path, decode_0={"used_blocks": 50}, decode_1={"used_blocks": 20}) as dep:
        dep.scraped_twice("tandem_kv_usage_ratio", "decode-0")
        dep.stats["decode-0"].update(used_blocks=90, waiting=2)
        dep.scraped_twice("tandem_kv_usage_ratio", "decode-0")
        real = window(dep.url)
    sim = scraped(phases)
    assert real.decode_kv_usage_max == sim.decode_kv_usage_max == pytest.approx(0.9)
    # The means (over replicas and scrapes) differ only in how many scrapes each phase had.
    assert 0.35 <= real.decode_kv_usage <= 0.55 and 0.35 <= sim.decode_kv_usage <= 0.55
    for w in (real, sim):
        d = decide(w, Replicas(2, 2), SPEC, PolicyState(started=-10_000.0), now=0)
        assert d.desired_decode == 3, d.reason
        assert "decode 2->3: busiest decode KV usage 90%" in d.reason


class _Answers(wgrpc.WorkerServicer):
    """A decode worker that answers every request with one token at once (the SLOs met)."""

    def Generate(self, request, context):  # noqa: N802
        yield wpb.WorkerGenerateResponse(token_ids=[42], finish_reason=pb.FINISH_REASON_LENGTH)


def test_requests_the_router_turns_away_at_its_limit_do_not_grow_decode(tmp_path, model_dir):
    """Through the real router's metrics and a real Prometheus: 60 requests served within the SLOs,
    40 turned away at the router's in-flight limit. Read as decode misses (as every rejection was),
    they grew decode while the router itself was the bottleneck."""
    with (
        deployment(tmp_path) as dep,
        _router_over_fake_decode(model_dir, lambda pool: _Answers()) as (
            router,
            _,
            _,
        ),
    ):
        dep.scraped_twice("tandem_requests_total", "router-0")  # the counters' baseline is in
        request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2, 3]), sampling=pb.SamplingParams())
        for _ in range(60):
            assert list(router.Generate(request, _Context()))[-1].token_ids == [42]
        router.max_in_flight = 0
        for _ in range(40):
            _refused(router)
        total = REGISTRY.get_sample_value("tandem_router_rejected_requests_total")
        dep.eventually(
            f"tandem_router_rejected_requests_total{{{SELECTOR}}}", lambda v: v == pytest.approx(total)
        )
        w = window(dep.url)
    # increase() extrapolates to the window's edges (less so for a counter that starts at 0, as
    # the router's limit counter may where the outcomes do not): the counts, roughly.
    assert w.router_limited == pytest.approx(w.rejected, rel=0.1) and w.router_limited > 0
    assert w.met / w.rejected == pytest.approx(60 / 40, rel=0.1)
    d = decide(w, Replicas(2, 2), SPEC, PolicyState(started=-10_000.0), now=0)
    assert d.desired_decode == 2, d.reason
    assert "turned away at the router's in-flight limit: holding" in d.reason


class _PrefillBusyOnDemand(_Answers):
    """`_Answers`, until `busy`: then every prefill partner is at its request limit."""

    busy = False

    def Generate(self, request, context):  # noqa: N802
        if self.busy:
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"prefill worker {request.prefill_endpoint} is busy: 256 requests in flight"
                " (the limit is 256)",
            )
        yield from super().Generate(request, context)


def test_requests_the_prefill_workers_turn_away_grow_prefill_not_decode(tmp_path, model_dir):
    """Through the real router's metrics and a real Prometheus: 60 requests served within the SLOs,
    40 turned away because every prefill worker was at its limit. Read as decode misses (as every
    rejection was), they grew decode and left prefill, the bottleneck, as it was."""
    with (
        deployment(tmp_path) as dep,
        _router_over_fake_decode(model_dir, lambda pool: _PrefillBusyOnDemand()) as (router, _, fake),
    ):
        dep.scraped_twice("tandem_pool_rejected_requests_total", "router-0")  # the baseline is in
        request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2, 3]), sampling=pb.SamplingParams())
        for _ in range(60):
            assert list(router.Generate(request, _Context()))[-1].token_ids == [42]
        fake.busy = True
        for _ in range(40):
            assert _refused(router)[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
        total = REGISTRY.get_sample_value("tandem_pool_rejected_requests_total", {"pool": "prefill"})
        dep.eventually(
            f'tandem_pool_rejected_requests_total{{{SELECTOR},pool="prefill"}}',
            lambda v: v == pytest.approx(total),
        )
        w = window(dep.url)
    # increase() extrapolates each series on its own (the outcome's from where earlier tests left the
    # process's counters, the pool's from 0): the prefill count is most of the rejections'.
    assert 0.5 * w.rejected <= w.rejected_by_prefill <= w.rejected and w.rejected_by_prefill > 0
    assert (w.rejected_by_decode, w.router_limited) == (0, 0)
    d = decide(w, Replicas(2, 2), SPEC, PolicyState(started=-10_000.0), now=0)
    assert d.desired_prefill > 2 and d.desired_decode == 2, d.reason
    assert "prefill rejections" in d.reason and "rejected by prefill: holding" in d.reason
