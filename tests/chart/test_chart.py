"""charts/tandem: lint, render (default and non-default values), Kubernetes schemas, the values schema,
and agreement with manifests/ and with what the operator's builders create."""

from __future__ import annotations

import copy
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
        {"networkPolicy": {"modelDeployments": [{"name": "x"}]}},
        {"networkPolicy": {"router": {"from": [{"podSelectr": {}}]}}},
        {"dashboards": {"enabled": "yes"}},
        {"runAsUser": 0},
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
    ],
)
def test_contradictory_values_fail_with_a_reason(values, message):
    with pytest.raises(helm.HelmError, match=message):
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
        ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ClusterKopfPeering", "Deployment",
         "PodDisruptionBudget"]
    )  # fmt: skip
    manifests = {
        d["kind"]: d
        for f in ("rbac.yaml", "operator.yaml")
        for d in yaml.safe_load_all((REPO_ROOT / "manifests" / f).read_text())
        if d
    }
    # The same names as the plain-YAML install for a release called "tandem".
    for kind in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ClusterKopfPeering", "Deployment"):
        assert one(docs, kind)["metadata"]["name"] == manifests[kind]["metadata"]["name"]
    assert _rules(one(docs, "ClusterRole")) == _manifest_rules()
    binding = one(docs, "ClusterRoleBinding")
    sa = one(docs, "ServiceAccount")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": one(docs, "ClusterRole")["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": NAMESPACE}
    ]

    dep = one(docs, "Deployment")
    assert dep["spec"]["replicas"] == 2
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]
    args = _operator_args(docs)
    assert args.all_namespaces and not args.namespace and not args.standalone
    assert args.peering == one(docs, "ClusterKopfPeering")["metadata"]["name"]
    assert args.resync_seconds == 60
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["image"] == "ghcr.io/tandem-dev/tandem-operator:0.1.0"
    # The liveness probe asks Kopf's liveness endpoint.
    port = int(args.liveness.split(":")[2].split("/")[0])
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert c["ports"] == [{"name": "health", "containerPort": port, "protocol": "TCP"}]
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["TANDEM_PROMETHEUS_URL"]["value"] == ""
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]


@pytest.mark.parametrize("name", VALUE_SETS)
def test_pods_are_locked_down(name):
    for dep in by_kind(render(VALUE_SETS[name]), "Deployment"):
        pod = dep["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] > 0 and pod["securityContext"]["runAsGroup"] > 0
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
    assert not by_kind(docs, "ClusterRole") and not by_kind(docs, "ClusterRoleBinding")
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
    assert one(docs, "Deployment")["spec"]["replicas"] == 1
    assert not by_kind(docs, "ClusterKopfPeering") and not by_kind(docs, "PodDisruptionBudget")


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
    assert args.verbose and args.resync_seconds == 30
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
