"""charts/tandem: lint, render (default and non-default values), Kubernetes schemas, the values schema,
and agreement with manifests/ and with what the operator's builders create."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
import yaml

from tandem_operator.builders import Owner, build_children
from tandem_operator.main import build_parser
from tandem_operator.validation import plan_spec_errors

from .conftest import (
    CHART,
    KUBE_VERSIONS,
    NAMESPACE,
    REPO_ROOT,
    by_kind,
    crds,
    helm,
    kubernetes_validate,
    notes,
    one,
    render,
    render_files,
    render_release,
)

# Non-default value sets: each renders, lints and validates like the defaults.
NAMESPACED = {"watchNamespaces": ["team-a", "team-b"]}
MONITORING = {
    "monitoring": {"serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}}},
    "prometheus": {"url": "http://prometheus-operated.monitoring.svc:9090"},
}
POD_MONITORING = {"monitoring": {"podMonitor": {"enabled": True}}, "watchNamespaces": ["ml"]}
NETWORK_POLICY = {
    "networkPolicy": {
        "enabled": True,
        "modelDeployments": [
            {"name": "smollm2-demo", "namespace": "default"},
            {"name": "llama", "namespace": "ml"},
        ],
        "router": {
            "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gateway"}}}]
        },
        "metrics": {
            "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
        },
    }
}
DASHBOARDS = {
    "dashboards": {"enabled": True, "namespace": "monitoring", "annotations": {"grafana_folder": "Tandem"}}
}
STANDALONE = {"replicaCount": 1, "peering": {"enabled": False}}
TUNED = {
    "image": {"digest": "sha256:" + "ab" * 32, "tag": "0.1.0"},
    "imagePullSecrets": [{"name": "ghcr"}],
    "extraEnv": [{"name": "TZ", "value": "UTC"}],
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "system", "effect": "NoSchedule"}],
    "priorityClassName": "system-cluster-critical",
    "verbose": True,
    "resyncSeconds": 30,
    "autoscaleIntervalSeconds": 60,
    "podLabels": {"team": "ml"},
    "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/x"}},
}
VALUE_SETS = {
    "default": None,
    "namespaced": NAMESPACED,
    "monitoring": MONITORING,
    "pod-monitoring": POD_MONITORING,
    "network-policy": NETWORK_POLICY,
    "dashboards": DASHBOARDS,
    "standalone": STANDALONE,
    "tuned": TUNED,
    # OpenShift's restricted SCC assigns the UID from the namespace's range: the chart must not name one.
    "openshift": {"runAsUser": None, "runAsGroup": None},
    "bring-your-own-rbac": {"rbac": {"create": False}, "serviceAccount": {"create": False, "name": "ops-sa"}},
    "everything": {**NAMESPACED, **MONITORING, **NETWORK_POLICY, **DASHBOARDS},
}
# Kinds kubernetes-validate has no schema for (custom resources): their shape is checked below instead.
CUSTOM_KINDS = {"ServiceMonitor", "PodMonitor", "ClusterKopfPeering", "KopfPeering"}


def _rules(role: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, rule  # no resourceNames, no URLs
        for key in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[key], rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    return granted


def _is_user_role(role: dict[str, Any]) -> bool:
    return any(k.startswith("rbac.authorization.k8s.io/aggregate-to-") for k in role["metadata"]["labels"])


def _operator_role(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (role,) = [d for d in by_kind(docs, "ClusterRole") if not _is_user_role(d)]
    return role


def _manifest_rules() -> dict[tuple[str, str], set[str]]:
    docs = yaml.safe_load_all((REPO_ROOT / "manifests" / "rbac.yaml").read_text())
    (role,) = [d for d in docs if d and d["kind"] == "ClusterRole"]
    return _rules(role)


def _operator_args(docs: list[dict[str, Any]]):
    dep = one(docs, "Deployment")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["tandem-operator"]
    return build_parser().parse_args(c["args"])  # the operator's own parser accepts them


# ------------------------------------------------------------------------------ lint and schemas


@pytest.mark.parametrize("name", VALUE_SETS)
def test_lint_is_clean(name):
    report = helm.lint(str(CHART), VALUE_SETS[name], strict=True, namespace=NAMESPACE)
    assert report["errors"] == []
    # Severity 1 is info ("icon is recommended": the project has no icon); warnings and errors fail.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_object_validates_against_the_kubernetes_schemas(name):
    docs = render(VALUE_SETS[name])
    assert docs
    for doc in docs:
        assert doc["metadata"]["name"]
        if doc["kind"] in CUSTOM_KINDS:
            continue
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


def test_crds_validate_and_match_manifests_byte_for_byte():
    chart_files = sorted(p.name for p in (CHART / "crds").iterdir())
    manifest_files = sorted(p.name for p in (REPO_ROOT / "manifests" / "crds").iterdir())
    assert chart_files == manifest_files
    for name in chart_files:
        assert (CHART / "crds" / name).read_bytes() == (REPO_ROOT / "manifests" / "crds" / name).read_bytes()
    loaded = helm.Chart.load(str(CHART))
    assert sorted(c["filename"] for c in loaded.crds) == [f"tandem/crds/{n}" for n in chart_files]
    for crd in crds():
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(crd, version, strict=True)


@pytest.mark.parametrize(
    "values",
    [
        {"bogus": 1},
        {"replicaCount": "2"},
        {"replicaCount": 0},
        {"image": {"pullPolicy": "Sometimes"}},
        {"image": {"digest": "sha256:nothex"}},
        {"image": {"registry": "docker.io"}},
        {"watchNamespaces": ["Team_A"]},
        {"watchNamespaces": ["team-*"]},  # globs would need cluster-wide RBAC on Namespaces
        {"prometheus": {"url": "prometheus:9090"}},
        {"monitoring": {"serviceMonitor": {"interval": "often"}}},
        # The Prometheus Operator's Duration: each unit at most once, largest first.
        {"monitoring": {"serviceMonitor": {"interval": "30s1m"}}},
        {"monitoring": {"podMonitor": {"scrapeTimeout": "15s15s"}}},
        {"monitoring": {"podMonitor": {"interval": ""}}},
        {"autoscaleIntervalSeconds": -1},
        {"autoscaleIntervalSeconds": "15s"},
        {"networkPolicy": {"modelDeployments": [{"name": "x"}]}},
        {"networkPolicy": {"router": {"from": [{"podSelectr": {}}]}}},
        {"dashboards": {"enabled": "yes"}},
        {"runAsUser": 0},
        {"runAsGroup": "1000"},
    ],
    ids=lambda v: str(v)[:60],
)
def test_values_outside_the_schema_are_refused(values):
    with pytest.raises(helm.HelmValuesError):
        render(values)
    report = helm.lint(str(CHART), values, namespace=NAMESPACE)
    assert report["errors"] or any(m["severity"] == 3 for m in report["messages"])


@pytest.mark.parametrize(
    "values, message",
    [
        ({"replicaCount": 2, "peering": {"enabled": False}}, "peering"),
        ({"networkPolicy": {"enabled": True}}, "modelDeployments"),
        (
            {"monitoring": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}}},
            "not both",
        ),
        # The binding would grant the operator's role to every pod running as the namespace's default account.
        ({"serviceAccount": {"create": False}}, "serviceAccount.name"),
        ({"serviceAccount": {"create": False}, "watchNamespaces": ["ml"]}, "serviceAccount.name"),
        # The selector is immutable and the chart's own: a pod label may not replace one of them.
        ({"podLabels": {"app.kubernetes.io/name": "custom"}}, "podLabels.*app.kubernetes.io/name"),
        ({"podLabels": {"team": "ml", "app.kubernetes.io/instance": "x"}}, "app.kubernetes.io/instance"),
        ({"podLabels": {"app.kubernetes.io/component": "x"}}, "app.kubernetes.io/component"),
        (
            {"monitoring": {"serviceMonitor": {"enabled": True, "interval": "30s", "scrapeTimeout": "1m"}}},
            "monitoring.serviceMonitor.scrapeTimeout",
        ),
    ],
)
def test_contradictory_values_fail_with_a_reason(values, message):
    with pytest.raises(helm.HelmError, match=message):
        render(values)


@pytest.mark.parametrize(
    "interval, timeout, accepted",
    [
        ("15s", "10s", True),
        ("1m", "60s", True),  # equal is allowed
        ("1d", "1h30m", True),
        ("1w", "1d", True),
        ("1s", "100ms", True),
        ("100ms", "1s", False),  # ms is not m
        ("1h", "59m60s1ms", False),
        ("1y", "53w", False),
        ("0", "10s", True),  # 0: Prometheus' global interval, which the chart cannot know
    ],
)
def test_scrape_timeout_longer_than_the_interval_is_refused(interval, timeout, accepted):
    for kind in ("serviceMonitor", "podMonitor"):
        values = {"monitoring": {kind: {"enabled": True, "interval": interval, "scrapeTimeout": timeout}}}
        if accepted:
            spec = one(render(values), kind[0].upper() + kind[1:])["spec"]
            (endpoint,) = spec.get("endpoints") or spec["podMetricsEndpoints"]
            assert (endpoint["interval"], endpoint["scrapeTimeout"]) == (interval, timeout)
        else:
            with pytest.raises(
                helm.HelmError, match=re.escape(f"{kind}.scrapeTimeout ({timeout}) is longer")
            ):
                render(values)


def test_schema_describes_every_default_value():
    schema = helm.Chart.load(str(CHART)).schema
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def walk(value: Any, node: dict[str, Any], path: str) -> None:
        assert "description" in node or node.get("type") == "object", path
        if isinstance(value, dict) and "properties" in node:
            assert node.get("additionalProperties") is False, path
            for key, sub in value.items():
                assert key in node["properties"], f"{path}.{key} is not in values.schema.json"
                walk(sub, node["properties"][key], f"{path}.{key}")

    walk(values, schema, "")
    # ... and the schema has nothing values.yaml leaves out (so `helm show values` shows every knob).
    assert set(schema["properties"]) == set(values)


def test_readme_documents_every_value():
    readme = (REPO_ROOT / "charts" / "README.md").read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def keys(v: Any, prefix: str = "") -> list[str]:
        out = []
        for k, sub in v.items():
            if isinstance(sub, dict) and sub and k not in {"resources", "labels", "annotations"}:
                out += keys(sub, prefix + k + ".")
            else:
                out.append(prefix + k)  # a leaf value
        return out

    missing = [k for k in keys(values) if f"`{k}`" not in readme]
    assert missing == [], "charts/README.md lacks these values"


# ------------------------------------------------------------------------------------ operator


def test_default_install_matches_manifests():
    docs = render()
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        ["ServiceAccount", "ClusterRole", "ClusterRole", "ClusterRole", "ClusterRoleBinding",
         "ClusterKopfPeering", "Deployment", "PodDisruptionBudget"]
    )  # fmt: skip
    manifests = {
        d["kind"]: d
        for f in ("rbac.yaml", "operator.yaml")
        for d in yaml.safe_load_all((REPO_ROOT / "manifests" / f).read_text())
        if d
    }
    # The same names as the plain-YAML install for a release called "tandem".
    for kind in ("ServiceAccount", "ClusterRoleBinding", "ClusterKopfPeering", "Deployment"):
        assert one(docs, kind)["metadata"]["name"] == manifests[kind]["metadata"]["name"]
    role = _operator_role(docs)
    assert role["metadata"]["name"] == manifests["ClusterRole"]["metadata"]["name"]
    assert _rules(role) == _manifest_rules()
    binding = one(docs, "ClusterRoleBinding")
    sa = one(docs, "ServiceAccount")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": NAMESPACE}
    ]

    dep = one(docs, "Deployment")
    assert dep["spec"]["replicas"] == 2
    # A new replica joins the peering before an old one leaves, so one is always able to act.
    assert dep["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]
    args = _operator_args(docs)
    assert args.all_namespaces and not args.namespace and not args.standalone
    assert args.peering == one(docs, "ClusterKopfPeering")["metadata"]["name"]
    assert args.resync_seconds == 60
    assert args.autoscale_interval == build_parser().parse_args(["-A"]).autoscale_interval == 15
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["image"] == "ghcr.io/tandem-dev/tandem-operator:0.1.0"
    # The liveness probe asks Kopf's liveness endpoint.
    port = int(args.liveness.split(":")[2].split("/")[0])
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert c["ports"] == [{"name": "health", "containerPort": port, "protocol": "TCP"}]
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["TANDEM_PROMETHEUS_URL"]["value"] == ""
    # The same bounds on memory and on the disk it may fill as the plain-YAML install.
    (plain,) = manifests["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert c["resources"] == plain["resources"]
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]


@pytest.mark.parametrize("name", VALUE_SETS)
def test_pods_are_locked_down(name):
    for dep in by_kind(render(VALUE_SETS[name]), "Deployment"):
        pod = dep["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        # Absent (null values): the platform assigns them, and runAsNonRoot still holds it to a non-root one.
        assert pod["securityContext"].get("runAsUser", 1) > 0
        assert pod["securityContext"].get("runAsGroup", 1) > 0
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for c in pod["containers"] + pod.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"] == {"drop": ["ALL"]}
            assert "privileged" not in sc
        assert not pod.get("hostNetwork") and not pod.get("hostPID")


def test_namespaced_mode_grants_nothing_cluster_wide():
    docs = render(NAMESPACED)
    # Nothing for the operator: only the user roles' aggregated rules, bound to no one here.
    assert all(_is_user_role(r) for r in by_kind(docs, "ClusterRole"))
    assert not by_kind(docs, "ClusterRoleBinding")
    assert not by_kind(docs, "ClusterKopfPeering")
    args = _operator_args(docs)
    assert args.namespace == ["team-a", "team-b"] and not args.all_namespaces
    want = {
        (("kopf.dev", "kopfpeerings") if key == ("kopf.dev", "clusterkopfpeerings") else key): verbs
        for key, verbs in _manifest_rules().items()
    }
    roles = by_kind(docs, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    for role in roles:
        assert _rules(role) == want
    bindings = by_kind(docs, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for b in bindings:
        assert b["roleRef"]["kind"] == "Role"
        assert b["subjects"][0]["namespace"] == NAMESPACE
    # Kopf requires the named peering object in every watched namespace.
    peerings = by_kind(docs, "KopfPeering")
    assert sorted(p["metadata"]["namespace"] for p in peerings) == ["team-a", "team-b"]
    assert {p["metadata"]["name"] for p in peerings} == {args.peering}
    assert "--namespace team-a" not in notes(NAMESPACED)
    assert "namespace: team-a" in notes(NAMESPACED)


def test_bring_your_own_rbac_renders_none_and_uses_the_named_account():
    docs = render(VALUE_SETS["bring-your-own-rbac"])
    assert sorted(d["kind"] for d in docs) == ["ClusterKopfPeering", "Deployment", "PodDisruptionBudget"]
    assert one(docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "ops-sa"


def test_standalone_runs_one_replica_without_peering():
    docs = render(STANDALONE)
    args = _operator_args(docs)
    assert args.standalone
    dep = one(docs, "Deployment")
    assert dep["spec"]["replicas"] == 1
    # Without peering nothing stops two replicas from both acting, so an upgrade must not overlap them.
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    assert not by_kind(docs, "ClusterKopfPeering") and not by_kind(docs, "PodDisruptionBudget")


def test_a_node_drain_may_evict_crash_looping_operator_replicas():
    """minAvailable 1 under the default IfHealthyBudget: with both replicas unready (crash-looping on a
    bad upgrade, say), neither may be evicted and every node drain waits on them."""
    pdb = one(render(), "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


def test_run_as_user_and_group_can_be_left_to_the_platform():
    pod = one(render(VALUE_SETS["openshift"]), "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"] == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    pod = one(render({"runAsGroup": None}), "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == 65532 and "runAsGroup" not in pod["securityContext"]


def test_large_ids_render_as_integers():
    # An OpenShift namespace's range starts around 1000680000, which Go prints as 1.00068e+09 by default.
    uid = 1000680000
    files = render_files({"runAsUser": uid, "runAsGroup": uid + 1})
    text = files[f"{CHART.name}/templates/deployment.yaml"]
    assert f"runAsUser: {uid}\n" in text and f"runAsGroup: {uid + 1}\n" in text
    sc = one(render({"runAsUser": uid, "runAsGroup": uid + 1}), "Deployment")["spec"]["template"]["spec"]
    assert sc["securityContext"]["runAsUser"] == uid and sc["securityContext"]["runAsGroup"] == uid + 1


def _assert_names_are_strings(docs: list[dict[str, Any]]) -> None:
    """Every metadata name, namespace, label and annotation value (the object's and its pod template's)
    is a string, and the objects pass the API schemas, which want strings wherever a name goes."""
    for doc in docs:
        for meta in (doc["metadata"], doc.get("spec", {}).get("template", {}).get("metadata", {})):
            values = [meta[k] for k in ("name", "namespace") if k in meta]
            values += [*meta.get("labels", {}).values(), *meta.get("annotations", {}).values()]
            for value in values:
                assert isinstance(value, str), (doc["kind"], value)
        if doc["kind"] not in CUSTOM_KINDS:
            for version in KUBE_VERSIONS:
                kubernetes_validate.validate(doc, version, strict=True)


def test_names_that_look_like_numbers_or_booleans_stay_strings():
    values = {
        "watchNamespaces": ["2024", "no"],
        "priorityClassName": "1000",
        "monitoring": {"podMonitor": {"enabled": True}},
        "networkPolicy": {"enabled": True, "modelDeployments": [{"name": "llama", "namespace": "2024"}]},
        "dashboards": {"enabled": True, "namespace": "0755"},
    }
    docs = render_release(values, "2024", "1234")
    _assert_names_are_strings(docs)
    for kind in ("Role", "RoleBinding", "KopfPeering"):
        assert sorted(d["metadata"]["namespace"] for d in by_kind(docs, kind)) == ["2024", "no"]
    assert one(docs, "PodMonitor")["spec"]["namespaceSelector"] == {"matchNames": ["2024", "no"]}
    assert one(docs, "ConfigMap")["metadata"]["namespace"] == "0755"
    assert {d["metadata"]["namespace"] for d in by_kind(docs, "NetworkPolicy")} == {"2024"}
    dep = one(docs, "Deployment")
    assert dep["metadata"]["namespace"] == "1234"
    assert dep["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"] == "2024"
    assert dep["spec"]["template"]["spec"]["priorityClassName"] == "1000"
    for binding in by_kind(docs, "RoleBinding"):
        assert binding["subjects"][0]["namespace"] == "1234"
    assert _operator_args(docs).namespace == ["2024", "no"]
    # Every name the values can set on its own.
    values = {
        "fullnameOverride": "1234",
        "nameOverride": "5678",
        "serviceAccount": {"name": "0"},
        "peering": {"enabled": True, "name": "1e3"},
        "priorityClassName": "yes",
    }
    docs = render_release(values, "true", "null")
    _assert_names_are_strings(docs)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert (pod["serviceAccountName"], pod["priorityClassName"]) == ("0", "yes")
    assert one(docs, "ClusterRoleBinding")["subjects"] == [
        {"kind": "ServiceAccount", "name": "0", "namespace": "null"}
    ]
    assert one(docs, "ClusterKopfPeering")["metadata"]["name"] == "1e3"


def test_autoscale_interval_reaches_the_operator():
    assert _operator_args(render({"autoscaleIntervalSeconds": 45})).autoscale_interval == 45
    assert _operator_args(render({"autoscaleIntervalSeconds": 2.5})).autoscale_interval == 2.5
    # 0: no autoscaler at all (the spec's replicas stay in force), so NOTES say nothing about Prometheus.
    assert _operator_args(render({"autoscaleIntervalSeconds": 0})).autoscale_interval == 0
    assert "prometheus.url is empty" not in notes({"autoscaleIntervalSeconds": 0})
    assert "Autoscaling: off" in notes({"autoscaleIntervalSeconds": 0})


def test_the_monitors_scrape_interval_reaches_the_autoscaler():
    # Its rate windows must span 4 scrapes of the monitor the chart made; without one, the default.
    assert _operator_args(render()).scrape_interval == 15
    on = lambda kind, interval: {  # noqa: E731
        "monitoring": {kind: {"enabled": True, "interval": interval, "scrapeTimeout": "0"}}
    }
    assert _operator_args(render(on("serviceMonitor", "30s"))).scrape_interval == 30
    assert _operator_args(render(on("podMonitor", "1m30s"))).scrape_interval == 90
    assert _operator_args(render(on("podMonitor", "500ms"))).scrape_interval == 0.5
    assert _operator_args(render(on("serviceMonitor", "0"))).scrape_interval == 15  # Prometheus' global one


def test_values_reach_the_operator():
    docs = render({**TUNED, **MONITORING})
    dep = one(docs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == "ghcr.io/tandem-dev/tandem-operator:0.1.0@sha256:" + "ab" * 32
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["TANDEM_PROMETHEUS_URL"] == "http://prometheus-operated.monitoring.svc:9090"
    assert env["TZ"] == "UTC"
    args = _operator_args(docs)
    assert args.verbose and args.resync_seconds == 30 and args.autoscale_interval == 60
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert labels["team"] == "ml"
    assert _matches(dep["spec"]["selector"]["matchLabels"], labels)
    assert pod["imagePullSecrets"] == [{"name": "ghcr"}]
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert pod["priorityClassName"] == "system-cluster-critical"
    assert one(docs, "ServiceAccount")["metadata"]["annotations"] == TUNED["serviceAccount"]["annotations"]


def test_notes_say_what_to_do_next():
    text = notes()
    assert "kubectl apply -f manifests/examples/cpu-demo.yaml" in text
    assert "port-forward svc/smollm2-demo-router 50051:50051" in text
    assert "tandem generate --endpoint localhost:50051" in text
    example = yaml.safe_load((REPO_ROOT / "manifests" / "examples" / "cpu-demo.yaml").read_text())
    assert f"port-forward svc/smollm2-demo-router {example['spec']['router']['httpPort']}:" in text
    assert "prometheus.url" in text
    assert "prometheus.url is empty" not in notes(MONITORING)


def test_notes_warn_when_no_monitor_attaches_the_autoscalers_labels():
    values = {"prometheus": {"url": "http://prometheus.monitoring.svc:9090"}}
    text = notes(values)
    assert "neither monitoring.serviceMonitor nor monitoring.podMonitor" in text
    # What another scrape configuration must attach (autoscaler.selector in the operator).
    assert "model_deployment" in text and "app.kubernetes.io/instance" in text and "namespace" in text
    for monitored in (MONITORING, POD_MONITORING | values, values | {"autoscaleIntervalSeconds": 0}, {}):
        assert "neither monitoring.serviceMonitor" not in notes(monitored)


# ------------------------------------------------- monitoring and policies vs. the operator's children


def _children(namespace: str = "default", name: str = "smollm2-demo", example: str = "cpu-demo"):
    doc = yaml.safe_load((REPO_ROOT / "manifests" / "examples" / f"{example}.yaml").read_text())
    # Every client API on, so the router pods carry every port the operator can give them.
    doc["spec"]["router"].update(httpPort=8000, kservePort=8001)
    spec, errors = plan_spec_errors(name, doc["spec"])
    assert errors == [] and spec is not None
    return build_children(Owner(name, namespace, "uid-1"), spec)


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _pods(children) -> dict[str, dict[str, Any]]:
    """component -> pod template of every Deployment the operator builds."""
    return {
        d["metadata"]["labels"]["app.kubernetes.io/component"]: d["spec"]["template"]
        for d in children
        if d["kind"] == "Deployment"
    }


def test_service_monitor_scrapes_every_tandem_service_and_only_those():
    monitor = one(render(MONITORING), "ServiceMonitor")
    spec = monitor["spec"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert set(spec) == {"selector", "namespaceSelector", "endpoints"}
    assert spec["namespaceSelector"] == {"any": True}
    (endpoint,) = spec["endpoints"]
    assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "relabelings"}
    services = [c for c in _children() if c["kind"] == "Service"]
    assert services
    for svc in services:
        assert _matches(spec["selector"]["matchLabels"], svc["metadata"]["labels"])
        assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}
    assert not _matches(spec["selector"]["matchLabels"], one(render(), "Deployment")["metadata"]["labels"])
    for r in endpoint["relabelings"]:
        assert set(r) == {"sourceLabels", "targetLabel"}
        (src,) = r["sourceLabels"]
        assert src.startswith("__meta_kubernetes_pod_label_")
    assert {r["targetLabel"] for r in endpoint["relabelings"]} == {"model_deployment", "component"}


def test_pod_monitor_scrapes_every_tandem_pod():
    monitor = one(render(POD_MONITORING), "PodMonitor")
    spec = monitor["spec"]
    assert set(spec) == {"selector", "namespaceSelector", "podMetricsEndpoints"}
    assert spec["namespaceSelector"] == {"matchNames": ["ml"]}
    (endpoint,) = spec["podMetricsEndpoints"]
    pods = _pods(_children("ml"))
    assert set(pods) == {"prefill", "decode", "router"}
    for template in pods.values():
        assert _matches(spec["selector"]["matchLabels"], template["metadata"]["labels"])
        (c,) = template["spec"]["containers"]
        assert endpoint["port"] in {p["name"] for p in c["ports"]}


def _admits(policy: dict[str, Any], source_labels: dict[str, str], port_name: str) -> bool:
    for rule in policy["spec"]["ingress"]:
        if port_name not in {p["port"] for p in rule["ports"]}:
            continue
        peers = rule.get("from")
        if not peers:
            return True  # no `from`: any source
        for peer in peers:
            if "podSelector" in peer and "namespaceSelector" not in peer:
                if _matches(peer["podSelector"]["matchLabels"], source_labels):
                    return True
    return False


def test_network_policy_admits_kv_only_from_the_same_deployments_decode_pods():
    docs = render(NETWORK_POLICY)
    policies = {
        (p["metadata"]["namespace"], p["metadata"]["name"]): p for p in by_kind(docs, "NetworkPolicy")
    }
    assert len(policies) == 8  # prefill, decode, colocated, router for each listed deployment
    pods = _pods(_children("default", "smollm2-demo"))
    other = _pods(_children("default", "other"))
    ports = {comp: {p["name"] for p in t["spec"]["containers"][0]["ports"]} for comp, t in pods.items()}

    def guarding(component: str) -> dict[str, Any]:
        (policy,) = [
            p
            for (ns, _), p in policies.items()
            if ns == "default"
            and _matches(p["spec"]["podSelector"]["matchLabels"], pods[component]["metadata"]["labels"])
        ]
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        # Every port a policy names is a port of the pods it guards (named ports match nothing otherwise),
        # and every port of those pods is admitted from somewhere (nothing is cut off by accident).
        named = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
        assert named == ports[component], (component, named)
        return policy

    labels = lambda pods_, c: pods_[c]["metadata"]["labels"]  # noqa: E731
    prefill, decode, router = guarding("prefill"), guarding("decode"), guarding("router")
    # KV: the decode worker dials the prefill worker's gRPC port; the router checks its health.
    assert _admits(prefill, labels(pods, "decode"), "grpc")
    assert _admits(prefill, labels(pods, "router"), "grpc")
    assert not _admits(prefill, labels(other, "decode"), "grpc")  # another deployment's decode
    assert not _admits(prefill, labels(pods, "prefill"), "grpc")
    assert not _admits(prefill, {"app": "anything"}, "grpc")
    # Decode serves Generate to its own router only.
    assert _admits(decode, labels(pods, "router"), "grpc")
    assert not _admits(decode, labels(pods, "prefill"), "grpc")
    assert not _admits(decode, labels(other, "router"), "grpc")
    # The router and metrics ports: only the configured peers.
    (router_rule,) = [
        r for r in router["spec"]["ingress"] if {"port": "grpc", "protocol": "TCP"} in r["ports"]
    ]
    assert router_rule["from"] == NETWORK_POLICY["networkPolicy"]["router"]["from"]
    for policy in (prefill, decode, router):
        (metrics_rule,) = [r for r in policy["spec"]["ingress"] if r["ports"][0]["port"] == "metrics"]
        assert metrics_rule["from"] == NETWORK_POLICY["networkPolicy"]["metrics"]["from"]
    assert {ns for ns, _ in policies} == {"default", "ml"}


def test_network_policy_without_peers_leaves_router_and_metrics_open():
    values = copy.deepcopy(NETWORK_POLICY)
    values["networkPolicy"]["router"]["from"] = []
    values["networkPolicy"]["metrics"]["from"] = []
    router = next(
        p for p in by_kind(render(values), "NetworkPolicy") if p["metadata"]["name"] == "llama-router"
    )
    assert all("from" not in rule for rule in router["spec"]["ingress"])


def test_dashboard_config_map_carries_the_shared_json():
    shared = (REPO_ROOT / "manifests" / "dashboards" / "tandem.json").read_text()
    assert (CHART / "dashboards" / "tandem.json").read_text() == shared
    cm = one(render(DASHBOARDS), "ConfigMap")
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "Tandem"}
    assert cm["data"]["tandem.json"] == shared.rstrip("\n")
    assert not by_kind(render(), "ConfigMap")


def test_packaged_chart_renders_the_same(tmp_path):
    """`helm package`: what a user installs from a repository or OCI registry carries the CRDs, the schema
    and the dashboard file (nothing the templates read is left out of the archive)."""
    archive = helm.package(str(CHART), destination=str(tmp_path))
    assert archive.endswith("tandem-0.1.0.tgz")
    with helm.Chart.load(archive) as packaged:
        assert len(packaged.crds) == len(list((CHART / "crds").glob("*.yaml")))
        assert packaged.schema is not None
        values = {**DASHBOARDS, **MONITORING}
        rendered = packaged.render(values, name="tandem", namespace=NAMESPACE, is_install=True)
        docs = [d for path, text in sorted(rendered.items()) if not path.endswith("NOTES.txt")
                for d in yaml.safe_load_all(text) if d]  # fmt: skip
        assert docs == render(values)


def test_users_get_modeldeployments_through_their_own_roles():
    """Aggregated into the built-in roles: edit and admin may write ModelDeployments, view may read
    them (status too), no one is bound here, and the plain-YAML install ships the same roles."""
    user_roles = [r for r in by_kind(render(), "ClusterRole") if _is_user_role(r)]
    by_aggregate = {
        tuple(sorted(k.rsplit("-", 1)[1] for k in r["metadata"]["labels"] if "aggregate-to-" in k)): r
        for r in user_roles
    }
    assert set(by_aggregate) == {("admin", "edit"), ("view",)}
    write, read = by_aggregate[("admin", "edit")], by_aggregate[("view",)]
    assert _rules(write) == {
        ("tandem.dev", "modeldeployments"): {
            "get", "list", "watch", "create", "update", "patch", "delete", "deletecollection",
        }
    }  # fmt: skip
    assert _rules(read) == {
        ("tandem.dev", "modeldeployments"): {"get", "list", "watch"},
        ("tandem.dev", "modeldeployments/status"): {"get", "list", "watch"},
    }
    assert all(
        r["metadata"]["labels"][k] == "true"
        for r in user_roles
        for k in r["metadata"]["labels"]
        if "aggregate-to-" in k
    )
    shipped = list(yaml.safe_load_all((REPO_ROOT / "manifests" / "user-roles.yaml").read_text()))
    assert [(d["metadata"]["name"], _rules(d)) for d in shipped] == [
        (r["metadata"]["name"], _rules(r)) for r in user_roles
    ]
    assert [{k: v for k, v in d["metadata"]["labels"].items() if "aggregate-to-" in k} for d in shipped] == [
        {k: v for k, v in r["metadata"]["labels"].items() if "aggregate-to-" in k} for r in user_roles
    ]
    assert not [
        r
        for r in by_kind(render({"rbac": {"aggregateToUserRoles": False}}), "ClusterRole")
        if _is_user_role(r)
    ]
