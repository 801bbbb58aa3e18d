"""The real operator (Kopf, in a thread) against kmock's Kubernetes API emulator.

Each test drives the API as a user or controller would (create, patch, delete over HTTP) and checks
what the operator did through the stored objects and the recorded requests.
"""

from __future__ import annotations

import asyncio
import copy

from tandem_operator import api

from .conftest import NAMESPACE, Cluster, RunningOperator, eventually, load_example

DEMO = "smollm2-demo"
DEMO_CHILDREN = {
    ("ServiceAccount", DEMO),
    ("ConfigMap", f"{DEMO}-config"),
    *{(kind, f"{DEMO}-{c}") for kind in ("Service", "Deployment", "PodDisruptionBudget")
      for c in ("prefill", "decode", "router")},
}  # fmt: skip
WORKLOADS = ("prefill", "decode", "router")


async def converge_demo(cluster: Cluster) -> dict:
    md = await cluster.create_md(load_example("cpu-demo.yaml"))
    await eventually(lambda: set(cluster.children()) == DEMO_CHILDREN)
    await eventually(lambda: cluster.condition(DEMO, "SpecValid")["status"] == "True")
    return md


async def all_ready(cluster: Cluster, name: str = DEMO, workloads=WORKLOADS) -> None:
    for w in workloads:
        await cluster.set_deployment_ready(f"{name}-{w}")
    await eventually(lambda: cluster.condition(name, "Ready")["status"] == "True")


def container(dep: dict) -> dict:
    return dep["spec"]["template"]["spec"]["containers"][0]


def operator_gets(cluster: Cluster, since: int, path_part: str) -> int:
    return sum(
        1
        for req in list(cluster.kmock)[since:]
        if str(req.method).upper().endswith("GET")
        and req.headers.get("User-Agent", "").startswith("tandem-operator")
        and path_part in req.url.path
    )


async def test_create_builds_every_child_owned_by_the_deployment(cluster: Cluster, operator: RunningOperator):
    md = await converge_demo(cluster)
    uid = md["metadata"]["uid"]
    children = cluster.children()
    assert set(children) == DEMO_CHILDREN
    for (kind, name), obj in children.items():
        refs = obj["metadata"]["ownerReferences"]
        assert refs == [
            {"apiVersion": api.API_VERSION, "kind": api.KIND, "name": DEMO, "uid": uid,
             "controller": True, "blockOwnerDeletion": True}
        ], (kind, name)  # fmt: skip
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == DEMO
        assert labels["app.kubernetes.io/managed-by"] == "tandem-operator"
    router = cluster.get("Deployment", f"{DEMO}-router")
    args = container(router)["args"]
    assert args[args.index("--decode") + 1] == f"dns:{DEMO}-decode.{NAMESPACE}.svc:50061"
    assert args[args.index("--prefill") + 1] == f"dns:{DEMO}-prefill.{NAMESPACE}.svc:50061"

    # Created is not ready: the Deployments report no ready pods yet.
    status = cluster.md(DEMO)["status"]
    assert status["observedGeneration"] == 1
    assert status["prefill"] == {"desired": 1, "ready": 0, "updated": 0, "summary": "0/1"}
    assert status["endpoint"] == f"{DEMO}-router.{NAMESPACE}.svc:50051"
    assert cluster.condition(DEMO, "Ready")["status"] == "False"
    assert cluster.condition(DEMO, "Ready")["reason"] == "NotServing"
    assert cluster.condition(DEMO, "Progressing")["status"] == "True"
    # No finalizer: deletion is the garbage collector's job (owner references).
    assert not cluster.md(DEMO)["metadata"].get("finalizers")


async def test_conditions_follow_the_workloads_and_keep_transition_times(
    cluster: Cluster, operator: RunningOperator
):
    await converge_demo(cluster)
    spec_valid_since = cluster.condition(DEMO, "SpecValid")["lastTransitionTime"]
    not_ready = cluster.condition(DEMO, "Ready")
    await asyncio.sleep(1.1)  # transition times have one-second resolution

    await all_ready(cluster)
    ready = cluster.condition(DEMO, "Ready")
    assert ready["reason"] == "Serving"
    assert ready["lastTransitionTime"] > not_ready["lastTransitionTime"]
    await eventually(lambda: cluster.condition(DEMO, "Progressing")["status"] == "False")
    assert cluster.condition(DEMO, "Progressing")["reason"] == "RolloutComplete"
    assert cluster.condition(DEMO, "Degraded")["status"] == "False"
    assert cluster.condition(DEMO, "SpecValid")["lastTransitionTime"] == spec_valid_since  # no transition
    assert cluster.md(DEMO)["status"]["decode"]["summary"] == "1/1"
    for c in cluster.md(DEMO)["status"]["conditions"]:
        assert c["observedGeneration"] == 1

    # A rolled-out pool that loses its pods: Degraded, and not Ready (no decode pod can serve).
    await cluster.set_deployment_ready(f"{DEMO}-decode", ready=0)
    await eventually(lambda: cluster.condition(DEMO, "Degraded")["status"] == "True")
    assert cluster.condition(DEMO, "Degraded")["reason"] == "ReplicasUnavailable"
    assert "decode 0/1" in cluster.condition(DEMO, "Degraded")["message"]
    assert cluster.condition(DEMO, "Ready")["status"] == "False"


async def test_a_second_pass_over_an_unchanged_resource_writes_nothing(cluster: Cluster):
    op = RunningOperator(resync_seconds=0.3)  # the periodic pass fires several times below
    await op.start()
    try:
        await converge_demo(cluster)
        await all_ready(cluster)
        await eventually(lambda: cluster.condition(DEMO, "Progressing")["status"] == "False")
        await asyncio.sleep(0.5)  # let passes woken by the last status write finish
        mark = cluster.mark()
        # Passes happen (periodic timer, plus an event on the object from an unrelated edit) ...
        await cluster.patch(api_key(), DEMO, {"metadata": {"annotations": {"note": "hello"}}})
        await eventually(lambda: operator_gets(cluster, mark, f"/deployments/{DEMO}-router") >= 3, timeout=10)
        # ... and none of them writes anything.
        assert cluster.writes(since=mark) == []
        # Kopf adds a finalizer for timers; ours is removed on purpose (owner references suffice).
        assert not cluster.md(DEMO)["metadata"].get("finalizers")
    finally:
        await op.stop()


def api_key() -> str:
    return f"{api.GROUP}/{api.VERSION}/{api.PLURAL}"


async def test_spec_change_rolls_the_workloads(cluster: Cluster, operator: RunningOperator):
    await converge_demo(cluster)
    await all_ready(cluster)
    old_hash = cluster.get("Deployment", f"{DEMO}-decode")["spec"]["template"]["metadata"]["annotations"]
    mark = cluster.mark()

    await cluster.update_md_spec(
        DEMO,
        {"image": "ghcr.io/tandem-dev/tandem:0.2.0", "prefill": {"replicas": 2, "maxReplicas": 4},
         "decode": {"maxNumBatchedTokens": 4096}},
    )  # fmt: skip
    await eventually(
        lambda: container(cluster.get("Deployment", f"{DEMO}-router"))["image"].endswith("0.2.0")
    )
    prefill = cluster.get("Deployment", f"{DEMO}-prefill")
    decode = cluster.get("Deployment", f"{DEMO}-decode")
    assert prefill["spec"]["replicas"] == 2
    assert container(prefill)["image"] == "ghcr.io/tandem-dev/tandem:0.2.0"
    args = container(decode)["args"]
    assert args[args.index("--max-num-batched-tokens") + 1] == "4096"
    # The new image and args roll the pods; the config hash stays, as no pod reads the changed
    # engine.json settings from the file (they reach the workers as flags).
    new_hash = decode["spec"]["template"]["metadata"]["annotations"]
    assert new_hash == old_hash
    assert '"maxNumBatchedTokens": 4096' in cluster.get("ConfigMap", f"{DEMO}-config")["data"]["engine.json"]
    await eventually(lambda: cluster.md(DEMO)["status"]["observedGeneration"] == 2)
    await eventually(lambda: cluster.md(DEMO)["status"]["prefill"]["desired"] == 2)
    # Updates are patches of existing objects, never re-creations.
    methods = {(m, p.rsplit("/", 1)[-1]) for m, p, _ in cluster.writes(since=mark)}
    assert ("PATCH", f"{DEMO}-prefill") in methods
    assert not any(m in ("POST", "DELETE") for m, _ in methods)


async def test_a_deleted_child_is_recreated_and_an_edited_field_restored(
    cluster: Cluster, operator: RunningOperator
):
    await converge_demo(cluster)
    want_args = container(cluster.get("Deployment", f"{DEMO}-prefill"))["args"]

    await cluster.delete("apps/v1/deployments", f"{DEMO}-decode")
    await cluster.delete("v1/services", f"{DEMO}-router")
    await eventually(lambda: cluster.get("Deployment", f"{DEMO}-decode") is not None)
    await eventually(lambda: cluster.get("Service", f"{DEMO}-router") is not None)

    # A hand edit of fields we own is undone; a label someone else adds is left alone.
    evil_template = {"spec": {"containers": [{"name": "worker", "image": "evil:1"}]}}
    await cluster.patch(
        "apps/v1/deployments",
        f"{DEMO}-prefill",
        {"metadata": {"labels": {"team": "ml"}}, "spec": {"replicas": 5, "template": evil_template}},
    )
    await eventually(lambda: cluster.get("Deployment", f"{DEMO}-prefill")["spec"]["replicas"] == 1)
    prefill = cluster.get("Deployment", f"{DEMO}-prefill")
    assert container(prefill)["image"] == "ghcr.io/tandem-dev/tandem:0.1.0"
    assert container(prefill)["args"] == want_args
    assert prefill["metadata"]["labels"]["team"] == "ml"


async def test_bad_spec_reports_and_creates_nothing(cluster: Cluster, operator: RunningOperator):
    bad = load_example("cpu-demo.yaml")
    bad["spec"]["model"] = {"builtin": "gpt-17"}
    await cluster.create_md(bad)
    await eventually(lambda: cluster.condition(DEMO, "SpecValid")["status"] == "False")
    cond = cluster.condition(DEMO, "SpecValid")
    assert cond["reason"] == "UnknownBuiltinModel"
    assert "gpt-17" in cond["message"]
    await eventually(lambda: any(e.get("reason") == "UnknownBuiltinModel" for e in cluster.events()))
    event = next(e for e in cluster.events() if e.get("reason") == "UnknownBuiltinModel")
    assert event["type"] == "Warning"
    assert event["involvedObject"]["name"] == DEMO
    assert cluster.children() == {}
    assert cluster.condition(DEMO, "Ready")["status"] == "False"


async def test_bad_update_leaves_the_running_children_untouched(cluster: Cluster, operator: RunningOperator):
    await converge_demo(cluster)
    await all_ready(cluster)
    before = copy.deepcopy(cluster.children())
    valid_since = cluster.condition(DEMO, "SpecValid")["lastTransitionTime"]
    mark = cluster.mark()

    await cluster.update_md_spec(
        DEMO,
        {
            "adapters": [
                {"name": "a", "source": "https://e.x/a.tgz"},
                {"name": "a", "source": "https://e.x/b.tgz"},
            ],
            "image": "new:1",
        },
    )
    await eventually(lambda: cluster.condition(DEMO, "SpecValid")["status"] == "False")
    assert cluster.condition(DEMO, "SpecValid")["reason"] == "DuplicateAdapterName"
    assert cluster.condition(DEMO, "SpecValid")["observedGeneration"] == 2
    # The earlier valid spec keeps serving: children unchanged, still Ready.
    assert cluster.children() == before
    assert cluster.condition(DEMO, "Ready")["status"] == "True"
    child_writes = [w for w in cluster.writes(since=mark) if f"/{api.PLURAL}/" not in w[1]]
    assert child_writes == []

    def warnings() -> list:
        return [e for e in cluster.events() if e.get("reason") == "DuplicateAdapterName"]

    await eventually(lambda: len(warnings()) == 1)
    assert warnings()[0]["type"] == "Warning"

    # Fixing the spec applies it, and SpecValid transitions back (a new transition time).
    await cluster.update_md_spec(DEMO, {"adapters": [{"name": "a", "source": "https://e.x/a.tgz"}]})
    await eventually(lambda: container(cluster.get("Deployment", f"{DEMO}-router"))["image"] == "new:1")
    await eventually(lambda: cluster.condition(DEMO, "SpecValid")["status"] == "True")
    assert cluster.condition(DEMO, "SpecValid")["lastTransitionTime"] >= valid_since
    await asyncio.sleep(0.3)
    assert len(warnings()) == 1  # one Event per distinct error, not one per pass


async def test_restart_converges_without_duplicates(cluster: Cluster):
    op = RunningOperator(resync_seconds=0)
    await op.start()
    try:
        await converge_demo(cluster)
    finally:
        await op.stop()

    # While the operator is down: a child is deleted and another is edited.
    await cluster.delete("apps/v1/deployments", f"{DEMO}-router")
    await cluster.patch("v1/services", f"{DEMO}-decode", {"spec": {"ports": []}})
    mark = cluster.mark()

    op = RunningOperator(resync_seconds=0)
    await op.start()
    try:
        await eventually(lambda: cluster.get("Deployment", f"{DEMO}-router") is not None)
        await eventually(lambda: len(cluster.get("Service", f"{DEMO}-decode")["spec"]["ports"]) == 2)
        await asyncio.sleep(0.5)
        creates = [p for m, p, _ in cluster.writes(since=mark) if m == "POST"]
        assert creates == [f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments"]  # only the missing one
        assert set(cluster.children()) == DEMO_CHILDREN
    finally:
        await op.stop()


def routes_to_ready_workers(cluster: Cluster) -> bool:
    """Every worker target of the router names a headless Service whose Deployment has ready pods."""
    args = container(cluster.get("Deployment", f"{DEMO}-router"))["args"]
    targets = [args[i + 1] for i, a in enumerate(args) if a in ("--decode", "--prefill")]
    for target in targets:
        name = target.removeprefix("dns:").split(".", 1)[0]
        dep = cluster.get("Deployment", name)
        assert cluster.get("Service", name) is not None, target
        assert dep is not None and dep.get("status", {}).get("readyReplicas", 0) >= 1, target
    return bool(targets)


async def test_a_mode_switch_keeps_the_old_pools_until_the_new_ones_are_ready(
    cluster: Cluster, operator: RunningOperator
):
    await converge_demo(cluster)
    await all_ready(cluster)
    old_args = container(cluster.get("Deployment", f"{DEMO}-router"))["args"]
    await cluster.update_md_spec(
        DEMO, {"mode": "colocated", "prefill": None, "decode": None, "colocated": {"replicas": 2, "gpus": 0}}
    )
    await eventually(lambda: cluster.condition(DEMO, "Progressing")["reason"] == "ModeSwitch")
    new_children = {(kind, f"{DEMO}-colocated") for kind in ("Service", "Deployment", "PodDisruptionBudget")}
    assert set(cluster.children()) == DEMO_CHILDREN | new_children
    assert container(cluster.get("Deployment", f"{DEMO}-router"))["args"] == old_args
    assert routes_to_ready_workers(cluster)
    assert cluster.condition(DEMO, "Ready")["status"] == "True"
    assert cluster.condition(DEMO, "Progressing")["message"] == (
        "mode switch: keeping prefill, decode until colocated are ready"
    )

    # The API server's part on the router's coming template change (kmock moves no generation),
    # so the router is seen rolling out until the controller catches up.
    await cluster.patch("apps/v1/deployments", f"{DEMO}-router", {"metadata": {"generation": 2}})
    await cluster.set_deployment_ready(f"{DEMO}-colocated", ready=1)  # 1 of 2: not yet
    await asyncio.sleep(0.5)
    assert set(cluster.children()) == DEMO_CHILDREN | new_children
    assert routes_to_ready_workers(cluster)

    await cluster.set_deployment_ready(f"{DEMO}-colocated")

    def router_args() -> list[str]:
        return container(cluster.get("Deployment", f"{DEMO}-router"))["args"]

    await eventually(lambda: "--prefill" not in router_args())
    args = router_args()
    assert args[args.index("--decode") + 1] == f"dns:{DEMO}-colocated.{NAMESPACE}.svc:50061"
    assert routes_to_ready_workers(cluster)
    await asyncio.sleep(0.3)
    assert cluster.get("Deployment", f"{DEMO}-prefill") is not None  # the old router pods still use it

    await cluster.set_deployment_ready(f"{DEMO}-router")
    want = {
        ("ServiceAccount", DEMO), ("ConfigMap", f"{DEMO}-config"),
        *{(kind, f"{DEMO}-{c}") for kind in ("Service", "Deployment", "PodDisruptionBudget")
          for c in ("colocated", "router")},
    }  # fmt: skip
    await eventually(lambda: set(cluster.children()) == want)
    assert routes_to_ready_workers(cluster)
    await eventually(lambda: "prefill" not in cluster.md(DEMO)["status"])
    assert cluster.md(DEMO)["status"]["colocated"]["desired"] == 2
    await eventually(lambda: cluster.condition(DEMO, "Progressing")["reason"] == "RolloutComplete")


async def test_delete_leaves_cleanup_to_owner_references(cluster: Cluster, operator: RunningOperator):
    await converge_demo(cluster)
    mark = cluster.mark()
    await cluster.call("DELETE", f"/apis/{api.API_VERSION}/namespaces/{NAMESPACE}/{api.PLURAL}/{DEMO}")
    await asyncio.sleep(0.5)
    # No finalizer was ever set, so the object is gone at once, and the operator wrote nothing:
    # the API server's garbage collector deletes the children through their owner references.
    assert cluster.kmock.objects[api_key(), NAMESPACE, DEMO].deleted
    assert cluster.writes(since=mark) == []


async def test_a_name_taken_by_someone_else_is_left_alone_and_reported(
    cluster: Cluster, operator: RunningOperator
):
    theirs = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"{DEMO}-config"},
        "data": {"x": "1"},
    }
    await cluster.call("POST", f"/api/v1/namespaces/{NAMESPACE}/configmaps", theirs)
    await cluster.create_md(load_example("cpu-demo.yaml"))
    await eventually(lambda: cluster.condition(DEMO, "Degraded")["reason"] == "NameConflict")
    assert "ConfigMap/smollm2-demo-config" in cluster.condition(DEMO, "Degraded")["message"]
    assert cluster.get("ConfigMap", f"{DEMO}-config")["data"] == {"x": "1"}  # untouched
    assert "ownerReferences" not in cluster.get("ConfigMap", f"{DEMO}-config")["metadata"]
    assert cluster.get("Deployment", f"{DEMO}-router") is not None  # the rest is applied
    await eventually(lambda: any(e.get("reason") == "NameConflict" for e in cluster.events()))


async def test_a_field_removed_from_the_spec_is_removed_from_the_child(
    cluster: Cluster, operator: RunningOperator
):
    await converge_demo(cluster)
    await cluster.update_md_spec(DEMO, {"decode": {"nodeSelector": {"disk": "ssd"}}})
    decode = f"{DEMO}-decode"
    await eventually(
        lambda: cluster.get("Deployment", decode)["spec"]["template"]["spec"].get("nodeSelector")
    )
    assert cluster.get("Deployment", decode)["spec"]["template"]["spec"]["nodeSelector"] == {"disk": "ssd"}
    await cluster.update_md_spec(DEMO, {"decode": {"nodeSelector": None}})
    await eventually(
        lambda: "nodeSelector" not in cluster.get("Deployment", decode)["spec"]["template"]["spec"]
    )
    assert cluster.get("Deployment", decode)["spec"]["replicas"] == 1  # the rest is intact
