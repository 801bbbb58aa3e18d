"""The end-to-end scenarios against a real Kubernetes API server; skipped unless $KUBECONFIG is set.

Needs `kubectl` and a cluster where the caller may create CRDs and namespaces (kind or k3d is enough:
nothing here needs a pod to run). It applies manifests/crds/, checks the rest of manifests/ with
`--dry-run=server`, runs the operator in-process against the cluster in a fresh namespace, and
deletes that namespace at the end (the CRDs stay: other users of the cluster may rely on them).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid

import pytest
import yaml

from .conftest import REPO_ROOT, RunningOperator, eventually, load_example

pytestmark = [
    pytest.mark.skipif(
        not os.environ.get("KUBECONFIG"), reason="set KUBECONFIG to run against a real cluster"
    ),
    pytest.mark.skipif(shutil.which("kubectl") is None, reason="needs kubectl"),
    pytest.mark.slow,
]

MANIFESTS = REPO_ROOT / "manifests"


def kubectl(*args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["kubectl", *args], input=stdin, capture_output=True, text=True, check=check, timeout=120
    )


def get(kind: str, name: str, ns: str) -> dict | None:
    out = kubectl("get", kind, name, "-n", ns, "-o", "json", check=False)
    return json.loads(out.stdout) if out.returncode == 0 else None


@pytest.fixture(scope="module")
def namespace():
    kubectl("apply", "--dry-run=server", "-f", str(MANIFESTS / "crds"))
    kubectl("apply", "-f", str(MANIFESTS / "crds"))
    kubectl("wait", "--for=condition=Established", "crd/modeldeployments.tandem.dev", "--timeout=60s")
    kubectl("apply", "-f", str(MANIFESTS / "namespace.yaml"))
    ns = f"tandem-e2e-{uuid.uuid4().hex[:8]}"
    kubectl("create", "namespace", ns)
    yield ns
    kubectl("delete", "namespace", ns, "--wait=false", check=False)


def apply_md(manifest: dict, ns: str, check: bool = True) -> subprocess.CompletedProcess:
    manifest = {**manifest, "metadata": {**manifest["metadata"], "namespace": ns}}
    return kubectl("apply", "-f", "-", stdin=yaml.safe_dump(manifest), check=check)


def test_manifests_are_accepted_by_the_api_server(namespace):
    for name in ("rbac.yaml", "user-roles.yaml", "operator.yaml"):
        kubectl("apply", "--dry-run=server", "-f", str(MANIFESTS / name))
    for example in sorted((MANIFESTS / "examples").glob("*.yaml")):
        doc = yaml.safe_load(example.read_text())
        doc["metadata"]["namespace"] = namespace
        kubectl("apply", "--dry-run=server", "-f", "-", stdin=yaml.safe_dump(doc))


def test_cel_rules_run_on_the_server(namespace):
    bad = load_example("cpu-demo.yaml")
    bad["metadata"]["name"] = "cel-check"
    bad["spec"]["prefill"]["maxReplicas"] = 1
    bad["spec"]["prefill"]["replicas"] = 3
    out = apply_md(bad, namespace, check=False)
    assert out.returncode != 0 and "replicas must be <= maxReplicas" in out.stderr


async def test_operator_end_to_end(namespace):
    op = RunningOperator(argv=["--namespace", namespace, "--standalone", "--liveness", ""])
    await op.start()
    try:
        md = load_example("cpu-demo.yaml")
        apply_md(md, namespace)
        name = md["metadata"]["name"]
        for component in ("prefill", "decode", "router"):
            await eventually(lambda c=component: get("deployment", f"{name}-{c}", namespace) is not None, 60)
            await eventually(lambda c=component: get("service", f"{name}-{c}", namespace) is not None, 60)

        def condition(type_: str) -> dict:
            body = get("modeldeployment", name, namespace)
            return next(c for c in body["status"]["conditions"] if c["type"] == type_)

        await eventually(lambda: condition("SpecValid")["status"] == "True", 60)
        owner = get("deployment", f"{name}-decode", namespace)["metadata"]["ownerReferences"][0]
        assert owner["kind"] == "ModelDeployment" and owner["controller"] is True

        # Drift: a hand edit is undone.
        kubectl("scale", "deployment", f"{name}-decode", "-n", namespace, "--replicas=3")
        await eventually(lambda: get("deployment", f"{name}-decode", namespace)["spec"]["replicas"] == 1, 60)

        # Bad spec: reported, nothing changed.
        bad = load_example("cpu-demo.yaml")
        bad["spec"]["adapters"] = [{"name": "a", "source": "x"}, {"name": "a", "source": "y"}]
        apply_md(bad, namespace)
        await eventually(lambda: condition("SpecValid")["reason"] == "DuplicateAdapterName", 60)

        # Delete: the garbage collector removes the children through their owner references.
        kubectl("delete", "modeldeployment", name, "-n", namespace)
        await eventually(lambda: get("deployment", f"{name}-router", namespace) is None, 120)
    finally:
        await op.stop()
