"""manifests/: least-privilege RBAC that still covers what the operator does, and a runnable Deployment."""

from __future__ import annotations

import yaml

from tandem_operator import api, handlers, k8s
from tandem_operator.builders import CHILD_KINDS

from .conftest import REPO_ROOT, parse_args

MANIFESTS = REPO_ROOT / "manifests"


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((MANIFESTS / name).read_text()) if d]


def _rules() -> dict[tuple[str, str], set[str]]:
    (role,) = [d for d in _docs("rbac.yaml") if d["kind"] == "ClusterRole"]
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}  # no resourceNames, no nonResourceURLs
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    return granted


def test_rbac_has_no_wildcards():
    (role,) = [d for d in _docs("rbac.yaml") if d["kind"] == "ClusterRole"]
    for rule in role["rules"]:
        for key in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[key], rule


def test_rbac_grants_exactly_what_the_operator_uses():
    granted = _rules()
    child_verbs = {"get", "list", "watch", "create", "patch", "delete"}
    want = {
        (api.GROUP, api.PLURAL): {"get", "list", "watch"},
        (api.GROUP, f"{api.PLURAL}/status"): {"patch"},
        # Children's owner references set blockOwnerDeletion: OwnerReferencesPermissionEnforcement
        # admits that only from whoever may update the owner's finalizers.
        (api.GROUP, f"{api.PLURAL}/finalizers"): {"update"},
        ("", "events"): {"create"},
        # Worker health: the reconciler lists each object's pods (by label), and writes none.
        ("", "pods"): {"list"},
        ("kopf.dev", "clusterkopfpeerings"): {"get", "list", "watch", "patch"},
    }
    # Every child kind the builders make is watched by a handler and written by the reconciler.
    watched = {(g, p) for g, _, p in handlers.CHILD_RESOURCES}
    for api_version, kind in CHILD_KINDS:
        prefix, plural = k8s.RESOURCES[(api_version, kind)]
        group = api_version.split("/")[0] if "/" in api_version else ""
        assert (group, plural) in watched
        want[(group, plural)] = child_verbs
    assert granted == want


def test_role_is_bound_to_the_operator_service_account():
    docs = {d["kind"]: d for d in _docs("rbac.yaml")}
    sa, binding = docs["ServiceAccount"], docs["ClusterRoleBinding"]
    assert binding["roleRef"]["name"] == docs["ClusterRole"]["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": sa["metadata"]["namespace"]}
    ]


def test_operator_deployment_runs_the_real_command():
    docs = _docs("operator.yaml")
    peering = next(d for d in docs if d["kind"] == "ClusterKopfPeering")
    dep = next(d for d in docs if d["kind"] == "Deployment")
    spec = dep["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == "tandem-operator"
    (c,) = spec["containers"]
    # The operator's own image (no torch), as the chart runs it.
    assert c["image"] == "ghcr.io/tandem-dev/tandem-operator:0.1.0" and c["command"] == ["tandem-operator"]
    args = parse_args(c["args"])  # the parser `tandem-operator` uses
    assert {"name": "POD_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in c["env"]
    assert args.all_namespaces and not args.standalone
    assert args.peering == peering["metadata"]["name"]
    assert dep["spec"]["replicas"] == 2  # peering keeps one of them passive
    # The liveness probe hits Kopf's liveness endpoint.
    port = int(args.liveness.rsplit(":", 1)[1].split("/")[0])
    path = "/" + args.liveness.rsplit(":", 1)[1].split("/", 1)[1]
    assert c["livenessProbe"]["httpGet"]["path"] == path
    assert {"name": "health", "containerPort": port, "protocol": "TCP"} in c["ports"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert dep["metadata"]["namespace"] == "tandem-system"


def test_operator_deployment_bounds_the_disk_it_may_fill():
    """Its one writable place, /tmp, has a sizeLimit, and the pod declares its ephemeral storage
    (the kubelet evicts it, not its neighbours, if it writes more)."""
    from tandem_operator.patching import _quantity

    dep = next(d for d in _docs("operator.yaml") if d["kind"] == "Deployment")
    spec = dep["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    for m in c["volumeMounts"]:
        assert _quantity(volumes[m["name"]]["emptyDir"]["sizeLimit"]) > 0
    storage = c["resources"]["limits"]["ephemeral-storage"]
    assert c["resources"]["requests"]["ephemeral-storage"] == storage
    tmp = sum(_quantity(volumes[m["name"]]["emptyDir"]["sizeLimit"]) for m in c["volumeMounts"])
    assert _quantity(storage) >= tmp + 50 * 2**20  # and the kubelet's default 5 x 10Mi of logs


def test_peering_crds_are_shipped():
    names = {
        d["metadata"]["name"]
        for d in yaml.safe_load_all((MANIFESTS / "crds" / "kopf-peering.yaml").read_text())
    }
    assert names == {"kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev"}


def test_namespace_scoping_options():
    one = parse_args(["--namespace", "a", "--namespace", "b"])
    assert one.namespace == ["a", "b"] and not one.all_namespaces
    settings = handlers.build_settings(one.namespace, False)
    assert settings.scanning.disabled is True  # exact names: no cluster-wide namespace watch needed
    assert handlers.build_settings(["team-*"], False).scanning.disabled is False
    assert parse_args(["-A"]).all_namespaces


def test_the_operator_imports_neither_the_worker_nor_the_kernels():
    """Layers point one way: the operator talks to workers only through Kubernetes objects."""
    import ast

    package = REPO_ROOT / "operator" / "src" / "tandem_operator"
    forbidden = ("tandem_worker", "tandem_kernels", "tandem_proto", "torch", "triton")
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert not name.startswith(forbidden), f"{path.name} imports {name}"


def test_the_operator_without_credentials_says_so_and_exits(tmp_path):
    # Kopf retried the login every minute for ever, with a traceback each time: a missing
    # KUBECONFIG looked like a crash loop.
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST")}
    done = subprocess.run(
        [sys.executable, "-m", "tandem_operator.main", "--namespace", "default", "--standalone"],
        env={**env, "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "no in-cluster service account and no kubeconfig found" in done.stderr
    assert "Traceback" not in done.stderr
