"""The autoscaler in the operator: the real operator (Kopf, in a thread) against kmock, reading a fake
Prometheus on loopback that answers canned instant-query results.

What is checked: decisions land in the Deployments' replicas, in status and in Events; Prometheus
down holds the size and reports `AutoscalerHealthy=False`, and recovery reports True; the
reconciler does not fight the autoscaler (and takes the replica counts back when autoscaling is
disabled); with autoscaling disabled nothing is queried or changed.
"""

from __future__ import annotations

import asyncio
import copy
import json
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import pytest_asyncio

from tandem_operator import api
from tandem_operator.autoscaler import Autoscaler
from tandem_operator.builders import Owner, build_children
from tandem_operator.reconciler import Reconciler
from tandem_operator.status import plan_autoscaler_status
from tandem_worker.server.local import free_port

from .conftest import NAMESPACE, Cluster, RunningOperator, eventually, load_example

DEMO = "smollm2-demo"
PREFILL, DECODE = f"{DEMO}-prefill", f"{DEMO}-decode"
INTERVAL = 0.2  # seconds between autoscaler steps
SELECTOR = f'namespace="{NAMESPACE}",model_deployment="{DEMO}"'


def vector(*rows: tuple[dict[str, str], float]) -> dict[str, Any]:
    return {
        "status": "success",
        "data": {"resultType": "vector", "result": [{"metric": m, "value": [1.0, str(v)]} for m, v in rows]},
    }


# Half of 100 requests missed the TTFT SLO; the pools are reporting, nothing is queued, KV is low.
TTFT_MISSES = {
    "increase(tandem_requests_total": vector(({"outcome": "met"}, 50), ({"outcome": "missed_ttft"}, 50)),
    "histogram_quantile(0.9, sum by (le) (rate(tandem_time_to_first_token": vector(({}, 2.5)),
    "tandem_prefill_backlog_tokens": vector(({}, 0)),
    "tandem_kv_usage_ratio": vector(({}, 0.2)),
}
# A prefill backlog far above the per-replica target (8192 tokens): prefill is added whatever the
# readiness history (backlog is not an SLO statistic, so it needs no settled window).
BACKLOG = {
    "tandem_prefill_backlog_tokens": vector(({}, 30000)),
    "tandem_kv_usage_ratio": vector(({}, 0.2)),
}


class FakePrometheus:
    """/api/v1/query on a fixed loopback port; `stop()` leaves the port closed (connection refused)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.answers: dict[str, dict[str, Any]] = {}
        self.seen: list[str] = []
        self.delay = 0.0  # seconds each answer takes
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                query = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)["query"][0]
                fake.seen.append(query)
                time.sleep(fake.delay)
                body = next((a for k, a in fake.answers.items() if k in query), vector())
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


@pytest.fixture
def prom() -> Iterator[FakePrometheus]:
    fake = FakePrometheus()  # not started: each test decides when Prometheus is up
    yield fake
    fake.stop()


@pytest_asyncio.fixture
async def autoscaling_operator(cluster: Cluster, prom: FakePrometheus) -> AsyncIterator[RunningOperator]:
    argv = ["--namespace", NAMESPACE, "--standalone", "--liveness", "", "--prometheus-url", prom.url]
    op = RunningOperator(argv=argv, autoscale_interval=INTERVAL)
    await op.start()
    try:
        yield op
    finally:
        await op.stop()


def manifest(enabled: bool = True) -> dict[str, Any]:
    md = load_example("cpu-demo.yaml")
    md["spec"]["prefill"]["maxReplicas"] = 3
    md["spec"]["decode"]["maxReplicas"] = 3
    md["spec"]["autoscaling"] = {"enabled": enabled, "windowSeconds": 90}
    return md


async def create_ready(cluster: Cluster, md: dict[str, Any]) -> None:
    await cluster.create_md(md)
    for w in ("prefill", "decode", "router"):
        await eventually(lambda w=w: cluster.get("Deployment", f"{DEMO}-{w}") is not None)
    for w in ("prefill", "decode", "router"):
        await cluster.set_deployment_ready(f"{DEMO}-{w}")
    await eventually(lambda: cluster.condition(DEMO, "Ready")["status"] == "True")


def replicas(cluster: Cluster, name: str) -> int:
    dep = cluster.get("Deployment", name)
    assert dep is not None
    return dep["spec"]["replicas"]


def events(cluster: Cluster, reason: str) -> list[dict[str, Any]]:
    return [e for e in cluster.events() if e.get("reason") == reason]


def autoscaler_status(cluster: Cluster) -> dict[str, Any]:
    return cluster.md(DEMO).get("status", {}).get("autoscaler", {})


def has_condition(cluster: Cluster, type_: str) -> bool:
    return any(c["type"] == type_ for c in cluster.md(DEMO).get("status", {}).get("conditions", []))


async def test_a_ttft_miss_window_adds_prefill_and_records_the_decision(
    cluster: Cluster, prom: FakePrometheus, autoscaling_operator: RunningOperator
):
    # Prometheus is down until the pools are ready (a window taken while replicas start does not
    # judge the SLOs): meanwhile the autoscaler holds and says why.
    await create_ready(cluster, manifest())
    await eventually(lambda: cluster.condition(DEMO, "AutoscalerHealthy")["status"] == "False")
    prom.answers = TTFT_MISSES
    prom.start()

    await eventually(lambda: replicas(cluster, PREFILL) == 2)
    assert replicas(cluster, DECODE) == 1  # TTFT misses are prefill's
    await eventually(lambda: autoscaler_status(cluster).get("prefill") == 2)
    st = autoscaler_status(cluster)
    assert st["decode"] == 1
    assert st["lastDecisionTime"].endswith("Z")
    assert "prefill 1->2: TTFT misses 50% of 100 requests" in st["reason"]
    inputs = st["inputs"]
    assert (inputs["requests"], inputs["met"], inputs["missedTtft"], inputs["attainment"]) == (
        100,
        50,
        50,
        0.5,
    )
    assert inputs["ttftP90Seconds"] == 2.5 and inputs["windowSeconds"] == 90
    assert (inputs["prefillReplicas"], inputs["prefillReady"], inputs["decodeReplicas"]) == (1, 1, 1)
    assert "holding" not in st
    healthy = cluster.condition(DEMO, "AutoscalerHealthy")
    assert (healthy["status"], healthy["reason"]) == ("True", "PrometheusReachable")

    await eventually(lambda: events(cluster, "ScaledUp"))
    (event,) = events(cluster, "ScaledUp")
    assert event["type"] == "Normal"
    assert event["involvedObject"]["name"] == DEMO
    assert event["message"].startswith("prefill 1 -> 2: ")
    # The reconciler's own status reports the autoscaler's size as the desired one.
    await eventually(lambda: cluster.md(DEMO)["status"]["prefill"]["desired"] == 2)
    # Only this deployment's series, over the spec's window.
    assert prom.seen and all(SELECTOR in q for q in prom.seen if "{" in q)
    assert any("[90s]" in q for q in prom.seen)

    # The cooldown (60 s by default) holds prefill at 2 while the misses go on.
    await asyncio.sleep(5 * INTERVAL)
    assert replicas(cluster, PREFILL) == 2 and len(events(cluster, "ScaledUp")) == 1


async def test_prometheus_down_holds_the_size_and_recovery_is_reported(
    cluster: Cluster, prom: FakePrometheus, autoscaling_operator: RunningOperator
):
    prom.start()  # up, but nothing scraped for this deployment: no data, hold
    await create_ready(cluster, manifest())
    await eventually(lambda: "no metrics" in autoscaler_status(cluster).get("holding", ""))
    assert "prefill, decode" in autoscaler_status(cluster)["holding"]
    assert cluster.condition(DEMO, "AutoscalerHealthy")["status"] == "True"
    since = cluster.condition(DEMO, "AutoscalerHealthy")["lastTransitionTime"]

    prom.stop()
    prom.answers = BACKLOG  # would scale prefill up, if only it could be read
    await eventually(lambda: cluster.condition(DEMO, "AutoscalerHealthy")["status"] == "False")
    cond = cluster.condition(DEMO, "AutoscalerHealthy")
    assert cond["reason"] == "PrometheusUnavailable"
    assert prom.url in cond["message"] and "holding every pool at its size" in cond["message"]
    assert cond["observedGeneration"] == 1
    await asyncio.sleep(5 * INTERVAL)
    assert (replicas(cluster, PREFILL), replicas(cluster, DECODE)) == (1, 1)  # held
    warnings = events(cluster, "PrometheusUnavailable")
    assert len(warnings) == 1 and warnings[0]["type"] == "Warning"  # once, not once per step
    # The reconciler's passes keep the autoscaler's condition.
    await cluster.patch(f"{api.GROUP}/{api.VERSION}/{api.PLURAL}", DEMO, {"metadata": {"labels": {"x": "y"}}})
    await asyncio.sleep(3 * INTERVAL)
    assert cluster.condition(DEMO, "AutoscalerHealthy")["status"] == "False"

    prom.start()
    await eventually(lambda: cluster.condition(DEMO, "AutoscalerHealthy")["status"] == "True")
    assert cluster.condition(DEMO, "AutoscalerHealthy")["lastTransitionTime"] >= since
    await eventually(lambda: replicas(cluster, PREFILL) == 2)
    assert "prefill backlog" in autoscaler_status(cluster)["reason"]
    # Prefill has its signal; decode has no finished requests to judge, and says so.
    assert autoscaler_status(cluster)["holding"].endswith("holding decode")


async def test_the_reconciler_does_not_fight_the_autoscaler_and_takes_over_when_disabled(
    cluster: Cluster, prom: FakePrometheus, autoscaling_operator: RunningOperator
):
    prom.answers = BACKLOG
    prom.start()
    await create_ready(cluster, manifest())
    await eventually(lambda: replicas(cluster, PREFILL) == 2)
    await cluster.set_deployment_ready(PREFILL)
    await eventually(lambda: cluster.md(DEMO)["status"]["prefill"]["summary"] == "2/2")

    # A reconcile pass (woken by an edit of the ModelDeployment) leaves the autoscaler's count,
    # and writes nothing to the Deployments (the autoscaler's write kept last-applied in step).
    mark = cluster.mark()
    await cluster.patch(f"{api.GROUP}/{api.VERSION}/{api.PLURAL}", DEMO, {"metadata": {"labels": {"x": "y"}}})
    await eventually(
        lambda: any(
            str(r.method).upper().endswith("GET") and r.url.path.endswith(f"/deployments/{DEMO}-router")
            for r in list(cluster.kmock)[mark:]
        )
    )
    await asyncio.sleep(3 * INTERVAL)
    assert replicas(cluster, PREFILL) == 2
    assert [w for w in cluster.writes(since=mark) if "/deployments/" in w[1]] == []

    # Out of bounds by hand: clamped into [minReplicas, maxReplicas], the rest still the pass's.
    await cluster.patch("apps/v1/deployments", PREFILL, {"spec": {"replicas": 10}})
    await eventually(lambda: replicas(cluster, PREFILL) == 3)

    # Autoscaling off: the spec's replicas win again, and the autoscaler's status goes.
    template = cluster.get("Deployment", DECODE)["spec"]["template"]
    await cluster.update_md_spec(DEMO, {"autoscaling": {"enabled": False}})
    await eventually(lambda: replicas(cluster, PREFILL) == 1)
    await eventually(lambda: not has_condition(cluster, "AutoscalerHealthy"))
    assert "autoscaler" not in cluster.md(DEMO)["status"]
    await asyncio.sleep(3 * INTERVAL)  # a step in flight when it was disabled may finish its queries
    settled = len(prom.seen)
    await asyncio.sleep(3 * INTERVAL)
    assert len(prom.seen) == settled
    assert replicas(cluster, PREFILL) == 1
    # No pod reads the autoscaling policy: toggling it rolls no pod.
    assert cluster.get("Deployment", DECODE)["spec"]["template"] == template


async def test_disabled_autoscaling_queries_nothing_and_changes_nothing(
    cluster: Cluster, prom: FakePrometheus, autoscaling_operator: RunningOperator
):
    prom.answers = BACKLOG
    prom.start()
    md = manifest(enabled=False)
    await create_ready(cluster, copy.deepcopy(md))
    await eventually(lambda: cluster.condition(DEMO, "Progressing")["status"] == "False")
    await asyncio.sleep(0.3)  # passes woken by the last status write
    mark = cluster.mark()
    await asyncio.sleep(6 * INTERVAL)
    assert prom.seen == []
    assert (replicas(cluster, PREFILL), replicas(cluster, DECODE)) == (1, 1)
    assert not has_condition(cluster, "AutoscalerHealthy")
    assert "autoscaler" not in cluster.md(DEMO)["status"]
    assert cluster.writes(since=mark) == []
    # A hand edit of the replicas is undone: the spec owns them.
    await cluster.patch("apps/v1/deployments", PREFILL, {"spec": {"replicas": 2}})
    await eventually(lambda: replicas(cluster, PREFILL) == 1)


async def test_a_step_cut_short_by_the_closing_client_ends_quietly(cluster: Cluster, prom: FakePrometheus):
    # Kopf, on exit, re-raises whatever any task still pending at that point ends with, even an
    # error its handler already read: a step that the cleanup's closing of the client cuts short
    # (here: while it waits for a slow Prometheus) would fail the operator's exit (seen once in CI).
    import kopf

    from tandem_operator.handlers import _autoscale_step, login, post_event
    from tandem_operator.k8s import KubeClient

    await cluster.create_md(manifest())
    client = KubeClient(lambda: login(kopf.OperatorSettings()))
    autoscaler = Autoscaler(client, Reconciler(client, post_event, autoscaler=True), post_event, prom.url)
    prom.delay = 0.2
    prom.start()
    step = asyncio.ensure_future(_autoscale_step(autoscaler, NAMESPACE, DEMO))
    await eventually(lambda: prom.seen)  # the step has read the object and is in Prometheus
    await client.close()
    await asyncio.wait_for(step, timeout=30)
    assert step.exception() is None
    # Nothing was written after the close.
    assert "autoscaler" not in cluster.md(DEMO).get("status", {})


# ---- without Kopf: the autoscaler and the reconciler on the in-memory API of test_reconciler.py


def memory_setup(
    prometheus_url: str, clock: Any = None
) -> tuple[Any, Reconciler, Autoscaler, list[tuple[str, str]]]:
    from .test_reconciler import MemoryApi

    memory = MemoryApi()
    md = manifest()
    md["metadata"].update({"namespace": "ns", "uid": "uid-1", "generation": 1})
    memory.objects[(api.KIND, "ns", DEMO)] = md
    events: list[tuple[str, str]] = []

    def post(body: dict[str, Any], type_: str, reason: str, message: str) -> None:
        events.append((type_, reason))

    reconciler = Reconciler(memory, post, autoscaler=True)
    kw = {} if clock is None else {"clock": clock}
    return memory, reconciler, Autoscaler(memory, reconciler, post, prometheus_url, **kw), events


async def pass_and_step(memory: Any, reconciler: Reconciler, autoscaler: Autoscaler) -> None:
    """A reconcile pass, every pool's pods ready at their size (as the Deployments would report), then
    an autoscaler step."""
    await reconciler.reconcile("ns", DEMO)
    for name in (PREFILL, DECODE):
        dep = memory.objects[("Deployment", "ns", name)]
        dep["status"] = {"readyReplicas": dep["spec"]["replicas"]}
    await autoscaler.step("ns", DEMO)


async def test_no_prometheus_configured_holds_and_says_so():
    memory, reconciler, autoscaler, events = memory_setup("")

    await reconciler.reconcile("ns", DEMO)
    await autoscaler.step("ns", DEMO)
    memory.calls.clear()
    await autoscaler.step("ns", DEMO)  # unchanged: reads only
    assert memory.writes() == []
    await reconciler.reconcile("ns", DEMO)  # keeps the autoscaler's condition, writes nothing
    assert memory.writes() == []

    status = memory.objects[(api.KIND, "ns", DEMO)]["status"]
    (cond,) = [c for c in status["conditions"] if c["type"] == "AutoscalerHealthy"]
    assert (cond["status"], cond["reason"]) == ("False", "NoPrometheus")
    assert "--prometheus-url" in cond["message"]
    assert events == [("Warning", "NoPrometheus")]
    assert memory.objects[("Deployment", "ns", PREFILL)]["spec"]["replicas"] == 1


async def test_a_bad_spec_holds_and_keeps_the_autoscalers_status():
    memory, reconciler, autoscaler, _ = memory_setup("")

    await reconciler.reconcile("ns", DEMO)
    await autoscaler.step("ns", DEMO)
    memory.objects[(api.KIND, "ns", DEMO)]["spec"]["model"] = {"builtin": "gpt-17"}
    await reconciler.reconcile("ns", DEMO)
    memory.calls.clear()
    await autoscaler.step("ns", DEMO)
    assert memory.writes() == []

    status = memory.objects[(api.KIND, "ns", DEMO)]["status"]
    assert [c["type"] for c in status["conditions"]][-1] == "AutoscalerHealthy"


async def test_autoscaler_status_patch_is_minimal():
    now = "2026-01-01T00:00:00Z"
    kw = dict(healthy=True, reason="PrometheusReachable", message="m", generation=1, now=now)
    first = plan_autoscaler_status({}, autoscaler={"reason": "r", "inputs": {"met": 1, "failed": 0}}, **kw)
    assert first is not None
    status = first["status"]
    assert status["conditions"][0]["type"] == "AutoscalerHealthy"
    assert plan_autoscaler_status(status, autoscaler={"reason": "r"}, **kw) is None
    assert (
        plan_autoscaler_status({**status, "observedGeneration": 2}, autoscaler={}, **{**kw, "generation": 2})
        is None
    )
    changed = plan_autoscaler_status(status, autoscaler={"inputs": {"met": 2}, "holding": None}, **kw)
    assert changed == {"status": {"autoscaler": {"inputs": {"met": 2, "failed": None}}}}
    down = plan_autoscaler_status(status, autoscaler={}, **{**kw, "healthy": False, "reason": "X"})
    assert down is not None and down["status"]["conditions"][0]["status"] == "False"
    assert "autoscaler" not in down["status"]


async def test_the_autoscaling_policy_does_not_change_the_pod_templates():
    def hashes(autoscaling: dict[str, Any]) -> set[str]:
        spec = api.parse_spec({**manifest()["spec"], "autoscaling": autoscaling})
        owner = Owner(name=DEMO, namespace="ns", uid="u")
        return {
            o["spec"]["template"]["metadata"]["annotations"]["tandem.dev/config-hash"]
            for o in build_children(owner, spec)
            if o["kind"] == "Deployment"
        }

    assert hashes({"enabled": True, "maxStep": 3}) == hashes({"enabled": False})


async def test_a_restarted_operator_carries_on_from_the_policy_memory_in_status(prom: FakePrometheus, caplog):
    # A backlog adds prefill at once (it needs no settled window); the cooldown (60 s) then holds
    # the size. An operator restarted within the cooldown must hold too: it reads the memory the
    # last one saved in status. Without it (or with one it cannot read) it would add another.
    prom.answers = BACKLOG
    prom.start()
    now = [1_000_000.0]
    memory, reconciler, autoscaler, events = memory_setup(prom.url, clock=lambda: now[0])
    md_key = (api.KIND, "ns", DEMO)

    def prefill() -> int:
        return memory.objects[("Deployment", "ns", PREFILL)]["spec"]["replicas"]

    def set_ready() -> None:
        for name in (PREFILL, DECODE):
            dep = memory.objects[("Deployment", "ns", name)]
            dep["status"] = {"readyReplicas": dep["spec"]["replicas"]}

    await reconciler.reconcile("ns", DEMO)
    set_ready()
    await autoscaler.step("ns", DEMO)
    assert prefill() == 2 and events == [("Normal", "ScaledUp")]
    saved = memory.objects[md_key]["status"]["autoscaler"]["memory"]
    assert json.loads(saved)["lastChange"]["prefill"] == now[0]

    async def restart_and_step(at: float) -> Autoscaler:
        now[0] = at
        fresh = Autoscaler(
            memory, reconciler, lambda *a: events.append((a[1], a[2])), prom.url, clock=lambda: now[0]
        )
        await reconciler.reconcile("ns", DEMO)
        set_ready()
        await fresh.step("ns", DEMO)
        return fresh

    second = await restart_and_step(1_000_020.0)  # 20 s later: within the cooldown
    assert prefill() == 2 and len(events) == 1
    # Held. Its memory is written at its first step, then at most once a minute while nothing changes.
    saved = memory.objects[md_key]["status"]["autoscaler"]["memory"]
    assert json.loads(saved)["started"] == 1_000_000.0  # carried on, not restarted
    now[0] = 1_000_035.0
    await second.step("ns", DEMO)
    assert prefill() == 2 and memory.objects[md_key]["status"]["autoscaler"]["memory"] == saved
    later = await restart_and_step(1_000_070.0)  # after the cooldown: the backlog adds one more
    assert prefill() == 3
    assert (
        json.loads(memory.objects[md_key]["status"]["autoscaler"]["memory"])["lastChange"]["prefill"]
        == now[0]
    )
    assert later._states  # noqa: SLF001 - it now keeps the memory in process

    # The control: a memory of another layout is ignored, with a warning, and the step acts afresh.
    memory.objects[md_key]["status"]["autoscaler"]["memory"] = '{"v": 99}'
    memory.objects[("Deployment", "ns", PREFILL)]["spec"]["replicas"] = 2
    await restart_and_step(1_000_075.0)
    assert prefill() == 3  # no cooldown remembered: the backlog scales at once
    assert "unreadable" in caplog.text


async def test_a_replica_that_leads_again_carries_on_from_the_other_ones_memory(prom: FakePrometheus):
    # Peering hands the object from A to B and back. B scaled in between: A's own memory, older,
    # knows nothing of that change and would skip its cooldown; the memory in status is B's.
    prom.answers = BACKLOG
    prom.start()
    now = [1_000_000.0]
    memory, reconciler, a, events = memory_setup(prom.url, clock=lambda: now[0])
    memory.objects[(api.KIND, "ns", DEMO)]["spec"]["prefill"]["maxReplicas"] = 5

    def prefill() -> int:
        return memory.objects[("Deployment", "ns", PREFILL)]["spec"]["replicas"]

    async def step(autoscaler: Autoscaler, at: float) -> None:
        now[0] = at
        await pass_and_step(memory, reconciler, autoscaler)

    await step(a, 1_000_000.0)
    assert prefill() == 2
    b = Autoscaler(memory, reconciler, lambda *x: events.append((x[1], x[2])), prom.url, clock=lambda: now[0])
    await step(b, 1_000_070.0)  # after A's cooldown: the backlog adds one
    assert prefill() == 3
    await step(a, 1_000_080.0)  # within B's cooldown, which A's own memory does not know of
    assert prefill() == 3
    await step(a, 1_000_140.0)  # B's cooldown over: A scales on
    assert prefill() == 4


async def test_the_router_at_its_own_limit_is_reported_once_and_grows_no_pool(prom: FakePrometheus, caplog):
    # 40 of 100 requests turned away at the router's in-flight limit; the pools meet their SLOs with
    # room to spare. Read as decode misses (as every rejection was), decode grew; the router is the
    # bottleneck, and an operator is told so once, not once per step.
    limited = {
        "increase(tandem_requests_total": vector(({"outcome": "met"}, 60), ({"outcome": "rejected"}, 40)),
        "tandem_router_rejected_requests_total": vector(({}, 40)),
        "tandem_prefill_backlog_tokens": vector(({}, 0)),
        "tandem_kv_usage_ratio": vector(({}, 0.2)),
    }
    prom.answers = limited
    prom.start()
    now = [1_000_000.0]
    memory, reconciler, autoscaler, events = memory_setup(prom.url, clock=lambda: now[0])

    async def step(at: float) -> None:
        now[0] = at
        await pass_and_step(memory, reconciler, autoscaler)

    for t in range(0, 600, 15):
        await step(1_000_000.0 + t)
    assert memory.objects[("Deployment", "ns", DECODE)]["spec"]["replicas"] == 1
    assert events == [("Warning", "RouterAtLimit")]
    assert "40 of 100 requests in the last 90s were turned away at the router's own" in caplog.text
    assert "raise spec.router.maxInFlight" in caplog.text
    # Over, then back: a new episode, a new Event.
    prom.answers = {**limited, "tandem_router_rejected_requests_total": vector(({}, 0))}
    prom.answers["increase(tandem_requests_total"] = vector(({"outcome": "met"}, 100))
    await step(1_000_600.0)
    prom.answers = limited
    await step(1_000_615.0)
    assert events == [("Warning", "RouterAtLimit")] * 2
    assert memory.objects[("Deployment", "ns", DECODE)]["spec"]["replicas"] == 1


async def test_the_router_at_its_limit_is_reported_once_across_refused_patches_and_restarts(
    prom: FakePrometheus,
):
    # The router at its limit while a prefill backlog asks for more prefill. Each Event kopf posts
    # is a new object (nothing aggregates them): the episode must not be reported again at each
    # step whose replicas patch is refused (which drops the policy's memory), nor by a restarted
    # operator, which reads it from status.
    from tandem_operator.k8s import ApiError

    prom.answers = {
        "increase(tandem_requests_total": vector(({"outcome": "met"}, 60), ({"outcome": "rejected"}, 40)),
        "tandem_router_rejected_requests_total": vector(({}, 40)),
        "tandem_pool_rejected_requests_total": vector(({"pool": "prefill"}, 0), ({"pool": "decode"}, 0)),
        **BACKLOG,
    }
    prom.start()
    now = [1_000_000.0]
    memory, reconciler, autoscaler, events = memory_setup(prom.url, clock=lambda: now[0])
    md_key = (api.KIND, "ns", DEMO)
    await reconciler.reconcile("ns", DEMO)
    for name in (PREFILL, DECODE):
        memory.objects[("Deployment", "ns", name)]["status"] = {"readyReplicas": 1}

    memory.refuse[("patch", "Deployment")] = ApiError(422, "Invalid", "refused by an admission webhook")
    for t in (0, 15, 30):
        now[0] = 1_000_000.0 + t
        await autoscaler.step("ns", DEMO)
    assert memory.objects[("Deployment", "ns", PREFILL)]["spec"]["replicas"] == 1  # refused each time
    assert events == [("Warning", "RouterAtLimit")]

    del memory.refuse[("patch", "Deployment")]
    now[0] += 15
    await autoscaler.step("ns", DEMO)
    assert memory.objects[("Deployment", "ns", PREFILL)]["spec"]["replicas"] == 2
    status = memory.objects[md_key]["status"]["autoscaler"]
    assert status["routerAtLimitSince"].endswith("Z")
    assert (status["inputs"]["rejected"], status["inputs"]["routerRejected"]) == (40, 40)
    assert (status["inputs"]["prefillRejected"], status["inputs"]["decodeRejected"]) == (0, 0)

    restarted = Autoscaler(
        memory, reconciler, lambda *a: events.append((a[1], a[2])), prom.url, clock=lambda: now[0]
    )

    async def step() -> None:  # within the cooldown of that scale-up: no other Event
        now[0] += 5
        await restarted.step("ns", DEMO)

    await step()
    assert events == [("Warning", "RouterAtLimit"), ("Normal", "ScaledUp")]
    # Over: cleared from status, and the next episode is reported.
    limited = prom.answers["increase(tandem_requests_total"]
    prom.answers["tandem_router_rejected_requests_total"] = vector(({}, 0))
    prom.answers["increase(tandem_requests_total"] = vector(({"outcome": "met"}, 100))
    await step()
    assert "routerAtLimitSince" not in memory.objects[md_key]["status"]["autoscaler"]
    prom.answers["tandem_router_rejected_requests_total"] = vector(({}, 40))
    prom.answers["increase(tandem_requests_total"] = limited
    await step()
    assert events[-1] == ("Warning", "RouterAtLimit") and len(events) == 3
