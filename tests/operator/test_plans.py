"""Pure planning: what to write (`plan_patch`) and what to report (`plan_status`)."""

from __future__ import annotations

import copy
import json

from tandem_operator.patching import LAST_APPLIED_ANNOTATION, is_subset, plan_patch, with_last_applied
from tandem_operator.status import (
    ModeSwitch,
    Workload,
    observe_deployment,
    plan_condition,
    plan_endpoint,
    plan_status,
    plan_status_patch,
)

DESIRED = {
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": {"name": "s", "namespace": "ns", "labels": {"a": "1"}},
    "spec": {"selector": {"app": "x"}, "ports": [{"name": "grpc", "port": 1}], "type": "ClusterIP"},
}


def server_view(obj: dict) -> dict:
    """What an API server returns: our fields plus defaults and bookkeeping."""
    out = copy.deepcopy(obj)
    out["metadata"].update({"uid": "u", "resourceVersion": "7", "creationTimestamp": "t"})
    out["metadata"]["labels"]["added-by-someone"] = "yes"
    out["spec"]["ports"][0]["protocol"] = "TCP"
    out["spec"]["ports"][0]["targetPort"] = 1
    out["spec"]["sessionAffinity"] = "None"
    out["status"] = {"loadBalancer": {}}
    return out


def test_unchanged_object_needs_no_write():
    live = server_view(with_last_applied(DESIRED))
    assert plan_patch(DESIRED, live) is None


def test_a_changed_owned_field_is_patched_and_others_are_kept():
    live = server_view(with_last_applied(DESIRED))
    live["spec"]["type"] = "NodePort"
    patch = plan_patch(DESIRED, live)
    assert patch is not None and patch["spec"]["type"] == "ClusterIP"
    assert "added-by-someone" not in patch["metadata"]["labels"]  # merge patch: untouched
    assert "apiVersion" not in patch and "kind" not in patch


def test_a_field_we_no_longer_set_is_removed():
    old = copy.deepcopy(DESIRED)
    old["spec"]["selector"]["tier"] = "gold"
    old["metadata"]["labels"]["old"] = "1"
    live = server_view(with_last_applied(old))
    patch = plan_patch(DESIRED, live)
    assert patch["spec"]["selector"]["tier"] is None
    assert patch["metadata"]["labels"]["old"] is None
    assert "added-by-someone" not in patch["metadata"]["labels"]  # never ours: never removed
    recorded = json.loads(patch["metadata"]["annotations"][LAST_APPLIED_ANNOTATION])
    assert "tier" not in recorded["spec"]["selector"]


def test_lists_compare_whole_and_quantities_by_value():
    desired = {"spec": {"resources": {"requests": {"cpu": "0.5", "memory": "1024Mi"}}, "args": ["a", "b"]}}
    assert is_subset(
        desired, {"spec": {"resources": {"requests": {"cpu": "500m", "memory": "1Gi"}}, "args": ["a", "b"]}}
    )
    assert not is_subset(
        desired, {"spec": {"resources": {"requests": {"cpu": "1", "memory": "1Gi"}}, "args": ["a", "b"]}}
    )
    assert not is_subset(
        desired, {"spec": {"resources": {"requests": {"cpu": "500m", "memory": "1Gi"}}, "args": ["a"]}}
    )
    # Finer than 1m, the API server writes cpu back in u or n: the same value, no patch every pass.
    assert is_subset({"cpu": "0.0001"}, {"cpu": "100u"}) and is_subset({"cpu": "0.0000005"}, {"cpu": "500n"})
    assert not is_subset({"cpu": "0.0001"}, {"cpu": "101u"})
    # Omitted-when-empty on the server side counts as equal; False does not.
    assert is_subset({"a": [], "b": {}, "c": ""}, {})  # an env var's empty value is dropped on storage
    assert not is_subset({"c": ""}, {"c": "x"})  # but not equal to another value
    assert not is_subset({"a": False}, {})
    assert not is_subset({"a": "1"}, {"a": 1})


def test_observe_deployment_follows_rollout_semantics():
    assert observe_deployment(None, desired=2) == Workload(2, 0, 0, False, None)
    rolling = {
        "metadata": {"generation": 3},
        "spec": {"replicas": 2},
        "status": {"observedGeneration": 3, "replicas": 3, "updatedReplicas": 2, "readyReplicas": 2,
                   "availableReplicas": 2},
    }  # fmt: skip
    assert observe_deployment(rolling).rolled_out is False  # an old pod is still there
    done = copy.deepcopy(rolling)
    done["status"]["replicas"] = 2
    assert observe_deployment(done).rolled_out is True
    stale = copy.deepcopy(done)
    stale["metadata"]["generation"] = 4  # the controller has not seen the new template yet
    assert observe_deployment(stale).rolled_out is False
    stuck = copy.deepcopy(rolling)
    stuck["status"]["conditions"] = [
        {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}
    ]
    assert observe_deployment(stuck).stuck_reason == "ProgressDeadlineExceeded"


def test_condition_transition_time_moves_only_on_status_change():
    old = [{"type": "Ready", "status": "False", "reason": "NotServing", "lastTransitionTime": "T0"}]
    same = plan_condition(old, "Ready", False, "NotServing", "still", 2, "T1")
    assert same["lastTransitionTime"] == "T0" and same["observedGeneration"] == 2
    flipped = plan_condition(old, "Ready", True, "Serving", "", 2, "T1")
    assert flipped["lastTransitionTime"] == "T1"
    assert plan_condition([], "Ready", True, "Serving", "", 1, "T2")["lastTransitionTime"] == "T2"


ROUTER_SERVICE = {"metadata": {"name": "m-router", "namespace": "ns"}, "spec": {"ports": []}}


def _status(workloads, errors=(), previous=None, router_service=ROUTER_SERVICE, mode_switch=None):
    return plan_status(
        generation=3,
        spec_errors=list(errors),
        workloads=workloads,
        router_service=router_service,
        previous=previous or {},
        now="T",
        mode_switch=mode_switch,
    )


def _conds(status):
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def test_status_conditions():
    ready = Workload(1, 1, 1, True, None)
    serving = {"prefill": ready, "decode": ready, "router": ready}
    assert _conds(_status(serving)) == {
        "Ready": ("True", "Serving"),
        "Progressing": ("False", "RolloutComplete"),
        "Degraded": ("False", "AsExpected"),
        "SpecValid": ("True", "Valid"),
    }
    starting = {**serving, "decode": Workload(2, 0, 0, False, None)}
    assert _conds(_status(starting))["Ready"] == ("False", "NotServing")
    assert _conds(_status(starting))["Progressing"] == ("True", "RollingOut")
    assert _conds(_status(starting))["Degraded"] == ("False", "AsExpected")  # starting is not degraded
    lost = {**serving, "decode": Workload(2, 1, 2, True, None)}
    assert _conds(_status(lost))["Degraded"] == ("True", "ReplicasUnavailable")
    assert _conds(_status(lost))["Ready"] == ("True", "Serving")  # one decode pod still serves
    stuck = {**serving, "prefill": Workload(1, 0, 0, False, "ProgressDeadlineExceeded")}
    assert _conds(_status(stuck))["Degraded"] == ("True", "ProgressDeadlineExceeded")
    bad = _status(serving, errors=[("DuplicateAdapterName", "adapter name 'a' is used twice")])
    assert _conds(bad)["SpecValid"] == ("False", "DuplicateAdapterName")
    assert _conds(bad)["Ready"] == ("True", "Serving")  # the earlier spec's children still serve
    # ... but they run the last valid spec, not this generation's (it said RolloutComplete).
    assert _conds(bad)["Progressing"] == ("False", "SpecInvalid")
    # No router Service of ours (someone else's holds the name): clients reach nothing.
    assert _conds(_status(serving, router_service=None))["Ready"] == ("False", "EndpointUnavailable")
    assert _status(serving)["decode"] == {"desired": 1, "ready": 1, "updated": 1, "summary": "1/1"}
    assert _conds(_status({}))["Ready"] == ("False", "NoWorkloads")


def test_ready_during_a_mode_switch_follows_the_pools_the_router_routes_to():
    up, down, half = (
        Workload(2, 2, 2, True, None),
        Workload(1, 0, 1, True, None),
        Workload(2, 1, 2, False, None),
    )
    to_colocated = dict(kept=("prefill", "decode"), new=("colocated",))
    # New pools not all ready: the router still routes to the old ones, which must serve. It said
    # Serving when the new pool had one pod up and the old pools none.
    workloads = {"prefill": down, "decode": down, "colocated": half, "router": up}
    st = _status(workloads, mode_switch=ModeSwitch(**to_colocated, pools_ready=False))
    assert _conds(st)["Ready"] == ("False", "NotServing")
    workloads = {"prefill": up, "decode": up, "colocated": half, "router": up}
    st = _status(workloads, mode_switch=ModeSwitch(**to_colocated, pools_ready=False))
    assert _conds(st)["Ready"] == ("True", "Serving")
    # New pools ready, the router rolling out to them: either side serving is enough.
    workloads = {"prefill": down, "decode": down, "colocated": up, "router": up}
    st = _status(workloads, mode_switch=ModeSwitch(**to_colocated, pools_ready=True))
    assert _conds(st)["Ready"] == ("True", "Serving")


def test_status_patch_only_when_changed_and_removes_stale_pools():
    ready = Workload(1, 1, 1, True, None)
    current = _status({"prefill": ready, "decode": ready, "router": ready})
    assert plan_status_patch(current, copy.deepcopy(current)) is None
    colocated = _status({"colocated": ready, "router": ready}, previous=current)
    patch = plan_status_patch(current, colocated)
    assert patch["status"]["prefill"] is None and patch["status"]["decode"] is None
    assert patch["status"]["colocated"]["summary"] == "1/1"


def test_endpoint_prefers_the_load_balancer_address():
    svc = {
        "metadata": {"name": "m-router", "namespace": "ns"},
        "spec": {"ports": [{"name": "grpc", "port": 50051}]},
    }
    assert plan_endpoint(svc) == "m-router.ns.svc:50051"
    svc["status"] = {"loadBalancer": {"ingress": [{"ip": "203.0.113.7"}]}}
    assert plan_endpoint(svc) == "203.0.113.7:50051"
    assert plan_endpoint(None) == ""
