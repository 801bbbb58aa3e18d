"""Worker pods that crash (OOMKilled, CrashLoopBackOff) show in the ModelDeployment's status.

The Deployment's own status says only that fewer pods are ready; the reason is in each pod's
container statuses. The reconciler lists the object's pods (by label, in its namespace) and reports
crashes in the condition `WorkersHealthy`, with one Warning Event per episode; the autoscaler does
not add replicas to a pool whose pods are OOMKilled or crash-looping.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from typing import Any

import kopf
import pytest

from tandem_operator import api
from tandem_operator.autoscaler import Autoscaler
from tandem_operator.handlers import login
from tandem_operator.k8s import ApiError, KubeClient
from tandem_operator.reconciler import Reconciler
from tandem_operator.status import observe_pods

from .conftest import NAMESPACE, Cluster, RunningOperator, eventually, load_example
from .test_autoscaler import BACKLOG, FakePrometheus, manifest
from .test_reconciler import MemoryApi

DEMO = "smollm2-demo"
POD_VERBS = {"list", "watch", "get", "create", "patch", "delete"}


@pytest.fixture
def prom() -> Iterator[FakePrometheus]:
    fake = FakePrometheus()
    yield fake
    fake.stop()


def at(minute: float) -> str:
    """A time of the tests' fixed clock: `minute` minutes after 2026-01-01T01:00:00Z."""
    t = datetime.datetime(2026, 1, 1, 1, tzinfo=datetime.timezone.utc) + datetime.timedelta(minutes=minute)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def pod(
    name: str,
    component: str,
    containers: list[dict[str, Any]],
    instance: str = DEMO,
    init: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A pod as the kubelet reports it, with the labels the builders give a workload's pods."""
    status: dict[str, Any] = {"phase": "Running", "containerStatuses": containers}
    if init is not None:
        status["initContainerStatuses"] = init
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "labels": {
                "app.kubernetes.io/name": "tandem",
                "app.kubernetes.io/instance": instance,
                "app.kubernetes.io/component": component,
                "app.kubernetes.io/managed-by": "tandem-operator",
            },
        },
        "spec": {"containers": [{"name": c["name"], "image": "x"} for c in containers]},
        "status": status,
    }


def running(restarts: int = 0, since: str = "2026-01-01T00:00:00Z", name: str = "worker") -> dict[str, Any]:
    return {"name": name, "ready": True, "restartCount": restarts, "state": {"running": {"startedAt": since}}}


def crashed(
    reason: str,
    restarts: int,
    finished: str,
    *,
    exit_code: int = 137,
    since: str | None = None,
    name: str = "worker",
) -> dict[str, Any]:
    """A container whose last run ended with `reason` at `finished`: running again since `since`,
    or (None) held back by the kubelet in CrashLoopBackOff."""
    state = {"running": {"startedAt": since}} if since else {"waiting": {"reason": "CrashLoopBackOff"}}
    return {
        "name": name,
        "ready": bool(since),
        "restartCount": restarts,
        "state": state,
        "lastState": {"terminated": {"reason": reason, "exitCode": exit_code, "finishedAt": finished}},
    }


def workers(status: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == "WorkersHealthy")


# ---- the reconciler against kmock (real HTTP, no Kopf): what it reads and what status says


async def test_oom_killed_pods_are_reported_once_per_episode_from_a_labelled_list(cluster: Cluster):
    cluster.kmock.resources["v1/pods"] = cluster.kmock.ResourceInfo(
        kind="Pod", namespaced=True, subresources={"status"}, verbs=POD_VERBS
    )
    now = [at(0)]
    events: list[tuple[str, str, str]] = []
    client = KubeClient(lambda: login(kopf.OperatorSettings()))
    reconciler = Reconciler(client, lambda body, t, r, m: events.append((t, r, m)), now=lambda: now[0])

    async def add_pod(obj: dict[str, Any]) -> None:
        await cluster.call("POST", f"/api/v1/namespaces/{NAMESPACE}/pods", obj)

    async def set_containers(name: str, containers: list[dict[str, Any]]) -> None:
        await cluster.patch("v1/pods", name, {"status": {"containerStatuses": containers}})

    await cluster.create_md(load_example("cpu-demo.yaml"))
    try:
        await reconciler.reconcile(NAMESPACE, DEMO)
        for w in ("prefill", "decode", "router"):
            await cluster.set_deployment_ready(f"{DEMO}-{w}")
        await add_pod(pod(f"{DEMO}-prefill-a", "prefill", [running()]))
        await add_pod(pod(f"{DEMO}-decode-a", "decode", [running()]))
        await add_pod(pod(f"{DEMO}-decode-b", "decode", [running()]))
        # Another deployment's pods in the same namespace are not this one's business.
        await add_pod(pod("other-decode-a", "decode", [crashed("OOMKilled", 9, at(-1))], instance="other"))
        await reconciler.reconcile(NAMESPACE, DEMO)
        cond = workers(cluster.md(DEMO)["status"])
        assert (cond["status"], cond["reason"]) == ("True", "Stable")
        assert events == []

        # A decode pod killed at its memory limit three times, running again for half a minute.
        mark = cluster.mark()
        await set_containers(f"{DEMO}-decode-a", [crashed("OOMKilled", 3, at(-0.6), since=at(-0.5))])
        await reconciler.reconcile(NAMESPACE, DEMO)
        cond = workers(cluster.md(DEMO)["status"])
        assert (cond["status"], cond["reason"]) == ("False", "OOMKilled")
        message = cond["message"]
        assert message.startswith("decode: OOMKilled: 1 of 2 pods crashed in the last 10 minutes (3 restarts")
        assert f"pod {DEMO}-decode-a container worker OOMKilled (exit code 137) at {at(-0.6)}" in message
        assert "raise spec.decode.memory" in message and "spec.decode.maxPending" in message
        assert "other" not in message  # the other deployment's pod
        assert events == [("Warning", "OOMKilled", message)]
        # One list per pass, of this namespace's pods by this deployment's labels, served from the
        # API server's cache; never the cluster's pods.
        lists = [r for r in list(cluster.kmock)[mark:] if r.url.path.endswith("/pods")]
        assert [r.url.path for r in lists] == [f"/api/v1/namespaces/{NAMESPACE}/pods"]
        assert lists[0].params["labelSelector"] == (
            f"app.kubernetes.io/instance={DEMO},app.kubernetes.io/name=tandem"
        )
        assert lists[0].params["resourceVersion"] == "0"

        # It goes on crashing: the message follows, but the episode had its Event.
        now[0] = at(2)
        await set_containers(f"{DEMO}-decode-a", [crashed("OOMKilled", 4, at(1.9))])
        await reconciler.reconcile(NAMESPACE, DEMO)
        cond = workers(cluster.md(DEMO)["status"])
        assert "(4 restarts" in cond["message"] and "now CrashLoopBackOff" in cond["message"]
        assert len(events) == 1
        # Running again, but not yet for 10 minutes: still reported.
        await set_containers(f"{DEMO}-decode-a", [crashed("OOMKilled", 4, at(1.9), since=at(2))])
        now[0] = at(11.9)
        await reconciler.reconcile(NAMESPACE, DEMO)
        assert workers(cluster.md(DEMO)["status"])["status"] == "False"

        # Ten minutes without a crash: stable again, though the pod keeps its restart count.
        now[0] = at(12)
        await reconciler.reconcile(NAMESPACE, DEMO)
        cond = workers(cluster.md(DEMO)["status"])
        assert (cond["status"], cond["reason"]) == ("True", "Stable")
        assert cond["lastTransitionTime"] == at(12)
        assert len(events) == 1

        # A new crash is a new episode.
        now[0] = at(20)
        await set_containers(f"{DEMO}-decode-a", [crashed("OOMKilled", 5, at(19.9), since=at(20))])
        await reconciler.reconcile(NAMESPACE, DEMO)
        assert workers(cluster.md(DEMO)["status"])["reason"] == "OOMKilled"
        assert [e[1] for e in events] == ["OOMKilled", "OOMKilled"]
    finally:
        await client.close()


# ---- the real operator: a crash wakes a pass through the Deployment, and RBAC allows the read


async def test_the_operator_reports_a_crash_its_deployment_shows(cluster: Cluster, operator: RunningOperator):
    cluster.kmock.resources["v1/pods"] = cluster.kmock.ResourceInfo(
        kind="Pod", namespaced=True, subresources={"status"}, verbs=POD_VERBS
    )
    await cluster.create_md(load_example("cpu-demo.yaml"))
    for w in ("prefill", "decode", "router"):
        await eventually(lambda w=w: cluster.get("Deployment", f"{DEMO}-{w}") is not None)
        await cluster.set_deployment_ready(f"{DEMO}-{w}")
    await eventually(lambda: cluster.condition(DEMO, "WorkersHealthy")["status"] == "True")

    # The operator's clock is the wall clock: the crash happened just now.
    just_now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    bad = pod(f"{DEMO}-prefill-a", "prefill", [crashed("OOMKilled", 1, just_now)])
    await cluster.call("POST", f"/api/v1/namespaces/{NAMESPACE}/pods", bad)
    # What the Deployment controller reports when its pod dies: that (not the pod) wakes a pass.
    await cluster.set_deployment_ready(f"{DEMO}-prefill", ready=0)
    await eventually(lambda: cluster.condition(DEMO, "WorkersHealthy")["reason"] == "OOMKilled")
    assert cluster.condition(DEMO, "WorkersHealthy")["message"].startswith("prefill: OOMKilled: 1 of 1 pods")
    await eventually(lambda: [e for e in cluster.events() if e.get("reason") == "OOMKilled"])
    (event,) = [e for e in cluster.events() if e.get("reason") == "OOMKilled"]
    assert event["type"] == "Warning" and "raise spec.prefill.memory" in event["message"]
    # (The `cluster` fixture checks on teardown that manifests/rbac.yaml granted every request.)


# ---- the reconciler on the in-memory API: reasons, events per component, unreadable pods


def memory_demo(now: list[str]) -> tuple[MemoryApi, Reconciler, list[tuple[str, str, str]]]:
    memory = MemoryApi()
    md = load_example("cpu-demo.yaml")
    md["metadata"].update({"namespace": NAMESPACE, "uid": "uid-1", "generation": 1})
    memory.objects[(api.KIND, NAMESPACE, DEMO)] = md
    events: list[tuple[str, str, str]] = []
    reconciler = Reconciler(memory, lambda body, t, r, m: events.append((t, r, m)), now=lambda: now[0])
    return memory, reconciler, events


def put_pod(memory: MemoryApi, obj: dict[str, Any]) -> None:
    memory.objects[("Pod", NAMESPACE, obj["metadata"]["name"])] = obj


async def test_each_crashing_component_is_named_with_its_reason_and_warned_once():
    now = [at(0)]
    memory, reconciler, events = memory_demo(now)
    await reconciler.reconcile(NAMESPACE, DEMO)
    status = lambda: memory.objects[(api.KIND, NAMESPACE, DEMO)]["status"]  # noqa: E731

    # prefill exits with an error and the kubelet holds it back; a single router crash, running again.
    prefill = f"{DEMO}-prefill-a"
    put_pod(memory, pod(prefill, "prefill", [crashed("Error", 5, at(-0.2), exit_code=1)]))
    put_pod(
        memory, pod(f"{DEMO}-router-a", "router", [crashed("Error", 1, at(-3), exit_code=2, since=at(-3))])
    )
    await reconciler.reconcile(NAMESPACE, DEMO)
    cond = workers(status())
    assert (cond["status"], cond["reason"]) == ("False", "CrashLoopBackOff")
    prefill_part, router_part = cond["message"].split("; ")
    assert prefill_part.startswith("prefill: CrashLoopBackOff: 1 of 1 pods crashed")
    assert "Error (exit code 1)" in prefill_part and "now CrashLoopBackOff" in prefill_part
    assert prefill_part.endswith(f"see kubectl logs {prefill} -c worker --previous")
    assert router_part.startswith("router: ContainerRestarted: 1 of 1 pods")
    assert [(t, r) for t, r, _ in events] == [
        ("Warning", "CrashLoopBackOff"),
        ("Warning", "ContainerRestarted"),
    ]
    assert events[0][2] == prefill_part

    # The prefill crashes turn out to be OOM kills: the condition's worst reason, and worth an Event.
    put_pod(memory, pod(prefill, "prefill", [crashed("OOMKilled", 6, at(-0.1))]))
    await reconciler.reconcile(NAMESPACE, DEMO)
    assert workers(status())["reason"] == "OOMKilled"
    assert [r for _, r, _ in events] == ["CrashLoopBackOff", "ContainerRestarted", "OOMKilled"]
    memory.calls.clear()
    await reconciler.reconcile(NAMESPACE, DEMO)  # nothing new: no write, no Event
    assert memory.writes() == [] and len(events) == 3

    # A decode pod joins: its own Event; the pool of an old mode's pods would be named the same.
    put_pod(memory, pod(f"{DEMO}-decode-a", "decode", [crashed("OOMKilled", 1, at(-0.1), since=at(0))]))
    await reconciler.reconcile(NAMESPACE, DEMO)
    assert [p.partition(":")[0] for p in workers(status())["message"].split("; ")] == [
        "prefill",
        "decode",
        "router",
    ]
    assert [r for _, r, _ in events][-1] == "OOMKilled" and len(events) == 4


async def test_pods_that_cannot_be_listed_leave_the_condition_unknown_and_the_rest_of_status():
    now = [at(0)]
    memory, reconciler, events = memory_demo(now)
    memory.refuse[("list", "Pod")] = ApiError(
        403, "Forbidden", 'pods is forbidden: cannot list resource "pods"'
    )
    await reconciler.reconcile(NAMESPACE, DEMO)
    status = memory.objects[(api.KIND, NAMESPACE, DEMO)]["status"]
    cond = workers(status)
    assert (cond["status"], cond["reason"]) == ("Unknown", "PodsUnreadable")
    assert "403 Forbidden" in cond["message"]
    assert {c["type"] for c in status["conditions"]} >= {"Ready", "Progressing", "Degraded", "SpecValid"}
    assert status["prefill"]["summary"] == "0/1"
    assert events == []


async def test_which_containers_count_as_crashed():
    now = at(0)
    pods = [
        # An init container (the model fetch) that failed twice, then completed: the pod is fine.
        pod("p-a", "prefill", [running()], init=[{"name": "fetch", "restartCount": 2,
            "state": {"terminated": {"reason": "Completed", "exitCode": 0, "finishedAt": at(-30)}}}]),
        # One crash-looping before the worker even starts.
        pod("p-b", "prefill",
            [{"name": "worker", "restartCount": 0, "state": {"waiting": {"reason": "PodInitializing"}}}],
            init=[crashed("Error", 3, at(-1), exit_code=1, name="fetch")]),
        # Killed just now, not restarted yet.
        pod("d-a", "decode", [{"name": "worker", "restartCount": 0,
            "state": {"terminated": {"reason": "OOMKilled", "exitCode": 137, "finishedAt": at(0)}}}]),
        # Restarted long ago, running for an hour since.
        pod("d-b", "decode", [crashed("OOMKilled", 2, at(-61), since=at(-60))]),
        # Being deleted (a rollout), or evicted: their replacements count, not they.
        {**pod("d-c", "decode", [crashed("Error", 1, at(-1), exit_code=143)]),
         "metadata": {**pod("d-c", "decode", [])["metadata"], "deletionTimestamp": at(-1)}},
        {**pod("d-d", "decode", []), "status": {"phase": "Failed", "reason": "Evicted"}},
        # Not a component asked about.
        pod("x-a", "colocated", [crashed("OOMKilled", 1, at(-1))]),
    ]  # fmt: skip
    seen = observe_pods(pods, ["prefill", "decode"], now)
    assert set(seen) == {"prefill", "decode"}
    assert (seen["prefill"].pods, seen["prefill"].reason) == (2, "CrashLoopBackOff")
    assert [(c.pod, c.container) for c in seen["prefill"].crashes] == [("p-b", "fetch")]
    assert (seen["decode"].pods, seen["decode"].reason) == (2, "OOMKilled")
    assert [(c.pod, c.restarts, c.exit_code) for c in seen["decode"].crashes] == [("d-a", 0, 137)]


# ---- the autoscaler: no replicas added to a pool whose pods are OOM-killed


async def test_the_autoscaler_adds_no_replica_to_a_pool_whose_pods_are_oom_killed(prom: FakePrometheus):
    # A prefill backlog far above target adds prefill at once (see test_autoscaler.py) - unless the
    # prefill pods are being OOM-killed: each new replica would hold a GPU and be killed as well.
    prom.answers = BACKLOG
    prom.start()
    now = [at(0)]
    clock = [1_000_000.0]
    memory = MemoryApi()
    md = manifest()
    md["metadata"].update({"namespace": NAMESPACE, "uid": "uid-1", "generation": 1})
    memory.objects[(api.KIND, NAMESPACE, DEMO)] = md
    events: list[tuple[str, str]] = []

    def post(body: dict[str, Any], type_: str, reason: str, message: str) -> None:
        events.append((type_, reason))

    reconciler = Reconciler(memory, post, now=lambda: now[0], autoscaler=True)
    autoscaler = Autoscaler(memory, reconciler, post, prom.url, now=lambda: now[0], clock=lambda: clock[0])
    prefill = lambda: memory.objects[("Deployment", NAMESPACE, f"{DEMO}-prefill")]["spec"]["replicas"]  # noqa: E731

    async def pass_and_step() -> None:
        await reconciler.reconcile(NAMESPACE, DEMO)
        for role in ("prefill", "decode"):
            dep = memory.objects[("Deployment", NAMESPACE, f"{DEMO}-{role}")]
            dep["status"] = {"readyReplicas": dep["spec"]["replicas"]}
        await autoscaler.step(NAMESPACE, DEMO)

    put_pod(memory, pod(f"{DEMO}-prefill-a", "prefill", [crashed("OOMKilled", 2, at(-0.5), since=at(-0.4))]))
    await pass_and_step()
    assert prefill() == 1
    holding = memory.objects[(api.KIND, NAMESPACE, DEMO)]["status"]["autoscaler"]["holding"]
    # (decode holds too, for want of finished requests: a backlog is no SLO statistic)
    assert holding.endswith("; prefill is not scaled up while its pods crash (OOMKilled, see WorkersHealthy)")
    assert ("Normal", "ScaledUp") not in events

    # Stable for 10 minutes: the backlog adds prefill, and the hold is gone from status.
    now[0], clock[0] = at(10), clock[0] + 600
    await pass_and_step()
    assert prefill() == 2 and ("Normal", "ScaledUp") in events
    assert "prefill" not in memory.objects[(api.KIND, NAMESPACE, DEMO)]["status"]["autoscaler"]["holding"]


async def test_a_cuda_out_of_memory_crash_is_named_from_the_containers_last_log_lines():
    """A CUDA OOM is exit code 1 to the kubelet ("Error"): the worker's last log lines, its
    termination message under FallbackToLogsOnError, tell it from any other crash, and the hint
    names what bounds GPU memory, not the pod's memory limit."""
    from tandem_operator.builders import Owner, build_children

    log_tail = (
        "ERROR engine loop failed\nTraceback (most recent call last):\n"
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB."
    )
    oom = crashed("Error", 2, at(-1), exit_code=1)
    oom["lastState"]["terminated"]["message"] = log_tail
    other = crashed("Error", 2, at(-1), exit_code=1)
    other["lastState"]["terminated"]["message"] = "ValueError: model folder /models has no config.json"
    seen = observe_pods(
        [pod("d-a", "decode", [oom]), pod("p-a", "prefill", [other])], ["prefill", "decode"], at(0)
    )
    assert seen["decode"].reason == "GPUOutOfMemory" and seen["prefill"].reason == "CrashLoopBackOff"
    message = seen["decode"].message("decode")
    assert message.startswith("decode: GPUOutOfMemory: 1 of 1 pods") and "spec.decode.kvCacheBytes" in message
    # The pods the operator builds keep those lines: worker and router containers alike.
    spec = api.ModelDeploymentSpec.model_validate(load_example("cpu-demo.yaml")["spec"])
    children = build_children(Owner(name=DEMO, namespace=NAMESPACE, uid="u"), spec)
    containers = [
        c
        for child in children
        if child["kind"] == "Deployment"
        for c in child["spec"]["template"]["spec"]["containers"]
    ]
    assert {c["name"] for c in containers} == {"worker", "router"}
    assert {c.get("terminationMessagePolicy") for c in containers} == {"FallbackToLogsOnError"}


def test_a_pod_the_scheduler_cannot_place_is_named_where_its_rollout_or_scale_up_waits():
    """A surge pod Pending for want of a spare GPU held a rollout until ProgressDeadlineExceeded,
    and status said only "stuck: prefill": now the pod, the scheduler's reason, and (a rollout
    waiting for a GPU) the setting that replaces pods in place."""
    from tandem_operator.status import Workload, observe_deployment, plan_status

    unplaced = pod("p-new", "prefill", [])
    unplaced["status"] = {
        "phase": "Pending",
        "conditions": [
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
             "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."},
        ],
    }  # fmt: skip
    waiting = pod("d-new", "decode", [])
    waiting["status"] = {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "True"}]}
    seen = observe_pods(
        [unplaced, pod("p-old", "prefill", [running()]), waiting], ["prefill", "decode"], at(0)
    )
    assert seen["prefill"].unschedulable == (
        ("p-new", "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."),
    )
    assert seen["decode"].unschedulable == ()

    def status(prefill: Workload) -> dict[str, tuple[str, str]]:
        ok = Workload(1, 1, 1, True, None)
        out = plan_status(
            generation=2,
            spec_errors=[],
            workloads={"prefill": prefill, "decode": ok, "router": ok},
            router_service=None,
            previous={},
            now=at(0),
            pods=seen,
        )
        return {c["type"]: c["message"] for c in out["conditions"]}

    hint = (
        "(pod p-new unschedulable: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu: "
        "with no spare GPU, set spec.prefill.rollout.maxSurge: 0)"
    )
    assert status(Workload(1, 1, 0, False, None))["Progressing"] == f"rolling out: prefill {hint}"
    stuck = status(Workload(1, 1, 0, False, "ProgressDeadlineExceeded"))["Degraded"]
    assert stuck == f"stuck: prefill (ProgressDeadlineExceeded) {hint}"
    # A pool that already replaces pods in place: the reason, and no setting to change.
    in_place = status(Workload(1, 1, 0, False, None, surges=False))["Progressing"]
    assert in_place == (
        "rolling out: prefill "
        "(pod p-new unschedulable: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu)"
    )
    live = {"spec": {"replicas": 1, "strategy": {"type": "RollingUpdate"}}, "status": {}}
    for surge, surges in ((1, True), (0, False), ("0%", False), ("25%", True)):
        live["spec"]["strategy"]["rollingUpdate"] = {"maxSurge": surge, "maxUnavailable": 1}
        assert observe_deployment(live).surges is surges
    # A scale-up the cluster has no GPU for: the reason, but no rollout to change.
    short = status(Workload(2, 1, 2, True, None))["Degraded"]
    assert short == (
        "fewer ready pods than desired: prefill 1/2 "
        "(pod p-new unschedulable: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu)"
    )
