"""The Reconciler against an in-memory API (no Kopf, no HTTP): failure paths kmock cannot produce."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest

from tandem_operator import api
from tandem_operator.k8s import ApiError
from tandem_operator.reconciler import Reconciler, split_route

from .conftest import load_example


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386, as the API server applies application/merge-patch+json."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


class MemoryApi:
    """Stores objects by (kind, namespace, name), records every call, refuses what `refuse` says."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.calls: list[tuple[str, str, str]] = []
        self.refuse: dict[tuple[str, str], ApiError] = {}  # (verb, kind) -> error

    def _check(self, verb: str, kind: str, name: str) -> None:
        self.calls.append((verb, kind, name))
        if (verb, kind) in self.refuse:
            raise self.refuse[(verb, kind)]

    async def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        self._check("get", kind, name)
        obj = self.objects.get((kind, namespace, name))
        return copy.deepcopy(obj)

    async def list_objects(
        self, api_version: str, kind: str, namespace: str, label_selector: str
    ) -> list[dict[str, Any]]:
        self._check("list", kind, "")
        want = dict(term.split("=", 1) for term in label_selector.split(","))
        return [
            copy.deepcopy(obj)
            for (k, ns, _), obj in self.objects.items()
            if k == kind
            and ns == namespace
            and all((obj["metadata"].get("labels") or {}).get(key) == v for key, v in want.items())
        ]

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        kind, meta = obj["kind"], obj["metadata"]
        self._check("create", kind, meta["name"])
        key = (kind, meta["namespace"], meta["name"])
        if key in self.objects:
            raise ApiError(409, "AlreadyExists", "exists")
        self.objects[key] = copy.deepcopy(obj)
        if kind != api.KIND:
            self.objects[key]["metadata"].setdefault("generation", 1)
        return copy.deepcopy(self.objects[key])

    async def patch(self, api_version, kind, namespace, name, patch, subresource=None) -> dict[str, Any]:
        self._check("patch", kind, name)
        key = (kind, namespace, name)
        before = self.objects[key]
        after = merge_patch(before, patch)
        # As the API server does for a child: a spec change moves metadata.generation (the tests set
        # the ModelDeployment's themselves).
        if kind != api.KIND and subresource is None and after.get("spec") != before.get("spec"):
            after["metadata"]["generation"] = int(before["metadata"].get("generation", 1)) + 1
        self.objects[key] = after
        return copy.deepcopy(after)

    async def delete(self, api_version, kind, namespace, name) -> None:
        self._check("delete", kind, name)
        self.objects.pop((kind, namespace, name), None)

    def writes(self) -> list[tuple[str, str, str]]:
        return [c for c in self.calls if c[0] not in ("get", "list")]


def make(name: str = "demo") -> tuple[MemoryApi, Reconciler, list[tuple[str, str]]]:
    memory = MemoryApi()
    md = load_example("cpu-demo.yaml")
    md["metadata"].update({"name": name, "namespace": "ns", "uid": "uid-1", "generation": 1})
    memory.objects[(api.KIND, "ns", name)] = md
    events: list[tuple[str, str]] = []
    reconciler = Reconciler(memory, lambda body, type_, reason, message: events.append((type_, reason)))
    return memory, reconciler, events


def condition(memory: MemoryApi, type_: str, name: str = "demo") -> dict[str, Any]:
    status = memory.objects[(api.KIND, "ns", name)]["status"]
    return next(c for c in status["conditions"] if c["type"] == type_)


def run(coro):
    return asyncio.run(coro)


def test_second_pass_only_reads():
    memory, reconciler, _ = make()
    run(reconciler.reconcile("ns", "demo"))
    assert len([w for w in memory.writes() if w[0] == "create"]) == 11
    memory.calls.clear()
    run(reconciler.reconcile("ns", "demo"))
    assert memory.writes() == []
    assert memory.calls and all(verb in ("get", "list") for verb, _, _ in memory.calls)


def test_a_refused_child_is_reported_and_the_rest_applied():
    memory, reconciler, events = make()
    memory.refuse[("create", "Deployment")] = ApiError(422, "Invalid", "spec.template: bad")
    run(reconciler.reconcile("ns", "demo"))
    degraded = condition(memory, "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "ApplyFailed"
    assert "Deployment/demo-prefill: 422 Invalid" in degraded["message"]
    assert ("Service", "ns", "demo-router") in memory.objects  # everything else was applied
    assert ("PodDisruptionBudget", "ns", "demo-router") in memory.objects
    assert events == [("Warning", "ApplyFailed")]
    status = memory.objects[(api.KIND, "ns", "demo")]["status"]
    assert status["prefill"]["summary"] == "0/1"  # missing, but still wanted
    assert condition(memory, "Ready")["status"] == "False"
    run(reconciler.reconcile("ns", "demo"))
    assert events == [("Warning", "ApplyFailed")]  # once per distinct problem
    # Once the API server accepts it, the condition clears.
    del memory.refuse[("create", "Deployment")]
    run(reconciler.reconcile("ns", "demo"))
    assert condition(memory, "Degraded")["reason"] != "ApplyFailed"
    assert ("Deployment", "ns", "demo-prefill") in memory.objects


def test_a_transient_error_fails_the_pass_without_touching_status():
    memory, reconciler, _ = make()
    memory.refuse[("create", "ConfigMap")] = ApiError(503, "ServiceUnavailable", "etcd")
    with pytest.raises(ApiError):
        run(reconciler.reconcile("ns", "demo"))
    assert "status" not in memory.objects[(api.KIND, "ns", "demo")]
    del memory.refuse[("create", "ConfigMap")]
    run(reconciler.reconcile("ns", "demo"))  # the retry converges
    assert condition(memory, "SpecValid")["status"] == "True"


def test_passes_of_one_object_never_overlap():
    memory, reconciler, _ = make()
    active, peak = 0, 0
    original = memory.get

    async def slow_get(*args):
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0)
        active -= 1
        return await original(*args)

    memory.get = slow_get

    async def burst():
        await asyncio.gather(*(reconciler.reconcile("ns", "demo") for _ in range(5)))

    run(burst())
    assert peak == 1
    # The burst coalesced into the first pass plus one rerun, not five passes.
    md_reads = [c for c in memory.calls if c == ("get", api.KIND, "demo")]
    assert len(md_reads) == 2


# ---- mode switch: the old pools serve until the new ones are ready


def set_ready(memory: MemoryApi, name: str, ready: int | None = None) -> None:
    """The Deployment controller's part: the current template rolled out, `ready` pods ready."""
    dep = memory.objects[("Deployment", "ns", name)]
    want = dep["spec"]["replicas"]
    ready = want if ready is None else ready
    dep["status"] = {
        "observedGeneration": dep["metadata"]["generation"],
        "replicas": want,
        "updatedReplicas": want,
        "readyReplicas": ready,
        "availableReplicas": ready,
    }


def switch_mode(memory: MemoryApi, mode: str, name: str = "demo") -> None:
    md = memory.objects[(api.KIND, "ns", name)]
    spec = md["spec"]
    pool = {"gpus": 0, "cpu": "1", "memory": "2Gi"}
    for role in ("prefill", "decode", "colocated"):
        spec.pop(role, None)
    if mode == "colocated":
        spec["colocated"] = {**pool, "replicas": 2}
    else:
        spec["prefill"], spec["decode"] = dict(pool), dict(pool)
    spec["mode"] = mode
    md["metadata"]["generation"] += 1


def pool_objects(memory: MemoryApi, role: str) -> set[str]:
    return {kind for kind, _, name in memory.objects if name == f"demo-{role}"}


def route(memory: MemoryApi) -> list[str]:
    router = memory.objects[("Deployment", "ns", "demo-router")]
    return split_route(router["spec"]["template"]["spec"]["containers"][0]["args"])[1]


def assert_routes_to_ready_workers(memory: MemoryApi) -> None:
    """Every worker target of the router is a headless Service whose Deployment has ready pods."""
    targets = route(memory)[1::2]
    assert targets
    for target in targets:
        role = target.removeprefix("dns:demo-").split(".", 1)[0]
        assert ("Service", "ns", f"demo-{role}") in memory.objects, target
        dep = memory.objects.get(("Deployment", "ns", f"demo-{role}"))
        assert dep is not None and dep.get("status", {}).get("readyReplicas", 0) >= 1, target


def test_a_mode_switch_keeps_the_old_pools_until_the_new_ones_are_ready():
    memory, reconciler, _ = make()
    run(reconciler.reconcile("ns", "demo"))
    for w in ("prefill", "decode", "router"):
        set_ready(memory, f"demo-{w}")
    run(reconciler.reconcile("ns", "demo"))
    assert condition(memory, "Ready")["status"] == "True"
    old_route = route(memory)

    switch_mode(memory, "colocated")
    run(reconciler.reconcile("ns", "demo"))
    pool_kinds = {"Deployment", "Service", "PodDisruptionBudget"}
    assert pool_objects(memory, "colocated") == pool_kinds
    assert pool_objects(memory, "prefill") == pool_objects(memory, "decode") == pool_kinds
    assert route(memory) == old_route  # still the old pools
    assert_routes_to_ready_workers(memory)
    progressing = condition(memory, "Progressing")
    assert (progressing["status"], progressing["reason"]) == ("True", "ModeSwitch")
    assert progressing["message"] == "mode switch: keeping prefill, decode until colocated are ready"
    assert condition(memory, "Ready")["status"] == "True"  # served through the old pools
    status = memory.objects[(api.KIND, "ns", "demo")]["status"]
    assert status["colocated"]["summary"] == "0/2" and status["prefill"]["summary"] == "1/1"

    # An operator started afresh decides the same from the live objects; a pass over an unchanged
    # switch writes nothing.
    reconciler = Reconciler(memory, lambda *a: None)
    memory.calls.clear()
    run(reconciler.reconcile("ns", "demo"))
    assert memory.writes() == []

    set_ready(memory, "demo-colocated", ready=1)  # one of two: not ready yet
    run(reconciler.reconcile("ns", "demo"))
    assert pool_objects(memory, "prefill") == pool_kinds and route(memory) == old_route

    # All new replicas ready: the router moves to them, the old pools stay while it rolls out.
    set_ready(memory, "demo-colocated")
    run(reconciler.reconcile("ns", "demo"))
    assert route(memory) == ["--decode", "dns:demo-colocated.ns.svc:50061"]
    assert_routes_to_ready_workers(memory)
    assert pool_objects(memory, "prefill") == pool_objects(memory, "decode") == pool_kinds
    assert condition(memory, "Progressing")["message"] == (
        "mode switch: keeping prefill, decode until the router has rolled out to colocated"
    )

    set_ready(memory, "demo-router")
    memory.calls.clear()
    run(reconciler.reconcile("ns", "demo"))
    assert pool_objects(memory, "prefill") == pool_objects(memory, "decode") == set()
    deleted = {(kind, name) for verb, kind, name in memory.writes() if verb == "delete"}
    assert deleted == {(k, f"demo-{r}") for k in pool_kinds for r in ("prefill", "decode")}
    assert_routes_to_ready_workers(memory)
    status = memory.objects[(api.KIND, "ns", "demo")]["status"]
    assert "prefill" not in status and "decode" not in status
    assert condition(memory, "Progressing")["reason"] == "RolloutComplete"
    assert condition(memory, "Ready")["status"] == "True"


def serving_colocated() -> tuple[MemoryApi, Reconciler]:
    """A colocated deployment after one pass, its pool and router ready."""
    memory, reconciler, _ = make()
    switch_mode(memory, "colocated")
    run(reconciler.reconcile("ns", "demo"))
    for w in ("colocated", "router"):
        set_ready(memory, f"demo-{w}")
    return memory, reconciler


def test_switching_back_mid_switch_and_objects_without_a_pool_deployment():
    memory, reconciler = serving_colocated()
    run(reconciler.reconcile("ns", "demo"))
    colocated_route = route(memory)

    switch_mode(memory, "disaggregated")
    run(reconciler.reconcile("ns", "demo"))
    set_ready(memory, "demo-prefill")  # decode never gets ready
    run(reconciler.reconcile("ns", "demo"))
    assert route(memory) == colocated_route
    assert pool_objects(memory, "colocated") == {"Deployment", "Service", "PodDisruptionBudget"}
    assert condition(memory, "Progressing")["message"] == (
        "mode switch: keeping colocated until prefill, decode are ready"
    )
    # The pools the router still routes to have no ready pod: not serving (whatever the new do).
    set_ready(memory, "demo-colocated", ready=0)
    run(reconciler.reconcile("ns", "demo"))
    ready = condition(memory, "Ready")
    assert ready["status"] == "False" and ready["message"] == "no ready pod in: colocated"
    set_ready(memory, "demo-colocated")

    # Back to colocated: its pool is ready and the router never left it, so the half-started pools
    # go once the router has rolled out (at once, unless its pod template changed meanwhile).
    switch_mode(memory, "colocated")
    run(reconciler.reconcile("ns", "demo"))
    assert route(memory) == colocated_route
    set_ready(memory, "demo-router")
    run(reconciler.reconcile("ns", "demo"))
    assert pool_objects(memory, "prefill") == pool_objects(memory, "decode") == set()
    assert condition(memory, "Progressing")["reason"] == "RolloutComplete"

    # A leftover Service of a pool whose Deployment is gone routes nothing: pruned at once.
    switch_mode(memory, "disaggregated")
    run(reconciler.reconcile("ns", "demo"))
    del memory.objects[("Deployment", "ns", "demo-colocated")]
    run(reconciler.reconcile("ns", "demo"))
    assert pool_objects(memory, "colocated") == set()


def test_a_change_that_arrives_during_a_failed_pass_gets_its_own_pass():
    # A call during a pass only marks the object dirty; when that pass failed (a 503), the rerun
    # was lost and the change waited for the next resync (event handlers are not retried).
    memory, reconciler, _ = make()
    run(reconciler.reconcile("ns", "demo"))
    get, failed = memory.get, []

    async def flaky_get(api_version, kind, namespace, name):
        if kind == "ConfigMap" and not failed:
            failed.append(1)
            md = memory.objects[(api.KIND, "ns", "demo")]
            md["spec"]["prefill"]["replicas"] = 3
            md["metadata"]["generation"] += 1
            await reconciler.reconcile("ns", "demo")  # the update's event, mid-pass
            raise ApiError(503, "ServiceUnavailable", "etcd")
        return await get(api_version, kind, namespace, name)

    memory.get = flaky_get
    run(reconciler.reconcile("ns", "demo"))
    assert failed and memory.objects[("Deployment", "ns", "demo-prefill")]["spec"]["replicas"] == 3


def test_a_model_uri_that_does_not_parse_is_an_invalid_spec_not_a_crash():
    # The schema's pattern lets it through; urlparse raised, and every pass died before any status.
    memory, reconciler, events = make()
    md = memory.objects[(api.KIND, "ns", "demo")]
    md["spec"]["model"] = {"uri": "https://[bad/model.gguf"}
    run(reconciler.reconcile("ns", "demo"))
    spec_valid = condition(memory, "SpecValid")
    assert spec_valid["status"] == "False" and spec_valid["reason"] == "InvalidModelURI"
    assert ("Warning", "InvalidModelURI") in events


@pytest.mark.parametrize(
    "mutate",
    [
        lambda s: s["prefill"].update(nodeSelector={"pool type": "fast"}),
        lambda s: s["decode"].update(nodeSelector={"pool": "fast lane"}),
        lambda s: s["prefill"].update(tolerations=[{"key": "gpu type", "operator": "Exists"}]),
        lambda s: s.update(placement={"spreadTopologyKey": "host name"}),
        lambda s: s.update(image=" tandem:0.2.0"),
    ],
)
def test_label_keys_and_values_kubernetes_refuses_make_the_whole_update_invalid(mutate):
    # Only the Deployment using one got a 422; the rest of the update (a new image) went out, so
    # pools ran different versions.
    memory, reconciler, _ = make()
    run(reconciler.reconcile("ns", "demo"))
    before = copy.deepcopy(memory.objects)
    md = memory.objects[(api.KIND, "ns", "demo")]
    md["spec"]["image"] = "tandem:0.2.0"
    mutate(md["spec"])
    md["metadata"]["generation"] += 1
    memory.calls.clear()
    run(reconciler.reconcile("ns", "demo"))
    assert condition(memory, "SpecValid")["status"] == "False"
    assert [w for w in memory.writes() if w[1] != api.KIND] == []  # nothing but the status
    assert {k: v for k, v in memory.objects.items() if k[0] != api.KIND} == {
        k: v for k, v in before.items() if k[0] != api.KIND
    }


def test_an_orphaned_pool_of_the_other_mode_is_switched_from_and_pruned():
    # `kubectl delete --cascade=orphan`, then the object recreated in the other mode: its wanted
    # children were adopted, but the old mode's pool (no controller, our labels) ran for ever.
    memory, reconciler = serving_colocated()
    md = memory.objects[(api.KIND, "ns", "demo")]
    for key, obj in memory.objects.items():
        if key[0] != api.KIND:
            obj["metadata"].pop("ownerReferences", None)
    md["metadata"].update(uid="uid-2", generation=1)
    md.pop("status", None)
    switch_mode(memory, "disaggregated")
    for _ in range(3):
        run(reconciler.reconcile("ns", "demo"))
        for w in ("prefill", "decode", "router"):
            set_ready(memory, f"demo-{w}")
    run(reconciler.reconcile("ns", "demo"))
    assert pool_objects(memory, "colocated") == set()
    assert condition(memory, "Progressing")["reason"] == "RolloutComplete"


def test_a_deleted_object_leaves_no_lock_behind():
    memory, reconciler, _ = make()
    run(reconciler.reconcile("ns", "demo"))
    assert ("ns", "demo") in reconciler._locks
    reconciler.forget("ns", "demo")
    assert ("ns", "demo") not in reconciler._locks
    reconciler.forget("ns", "never-seen")  # nothing to drop: no error


def test_autoscaling_asked_of_an_operator_without_an_autoscaler_is_said_in_status():
    """`--autoscale-interval 0` with `autoscaling.enabled`: the pools silently kept their spec sizes."""
    memory, reconciler, _ = make()
    md = memory.objects[(api.KIND, "ns", "demo")]
    md["spec"]["autoscaling"] = {"enabled": True}
    run(reconciler.reconcile("ns", "demo"))
    off = condition(memory, "AutoscalerHealthy")
    assert (off["status"], off["reason"]) == ("False", "AutoscalerOff")
    assert "--autoscale-interval 0" in off["message"]
    md = memory.objects[(api.KIND, "ns", "demo")]
    md["spec"]["autoscaling"] = {"enabled": False}
    md["metadata"]["generation"] = 2
    run(reconciler.reconcile("ns", "demo"))
    status = memory.objects[(api.KIND, "ns", "demo")]["status"]
    assert all(c["type"] != "AutoscalerHealthy" for c in status["conditions"])
