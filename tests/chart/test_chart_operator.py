"""The chart's operator, run for real: the Deployment's arguments from a rendered chart, the real Kopf
operator against kmock's Kubernetes API emulator, and every request it makes checked against the RBAC the
chart rendered. Namespaced mode is the case manifests/ does not cover: Roles only (nothing cluster-wide),
and a KopfPeering per watched namespace, which Kopf requires before it acts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from ..operator.conftest import (
    TEST_AGENT,
    Cluster,
    RunningOperator,
    emulate_cluster,
    eventually,
    load_example,
)
from .conftest import by_kind, one, render

WATCHED = ["team-a", "team-b"]


@pytest_asyncio.fixture
async def cluster(kmock: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Cluster:
    # No default namespace: the chart's operator names every namespace it watches.
    return emulate_cluster(kmock, tmp_path, monkeypatch, namespace=None)


def _requests(cluster: Cluster) -> list[tuple[str | None, str, str, str]]:
    """(namespace or None, API group, resource, verb) of every request the operator (or Kopf) made."""
    out = []
    for req in list(cluster.kmock):
        if req.headers.get("User-Agent", "") == TEST_AGENT:
            continue
        parts = req.url.path.strip("/").split("/")
        if parts[0] == "api" and len(parts) > 2:
            group, rest = "", parts[2:]
        elif parts[0] == "apis" and len(parts) > 3:
            group, rest = parts[1], parts[3:]
        else:
            continue  # discovery: granted to every authenticated user by system:discovery
        namespace = None
        if rest[:1] == ["namespaces"] and len(rest) > 2:
            namespace, rest = rest[1], rest[2:]
        plural, name, sub = rest[0], (rest[1] if len(rest) > 1 else None), rest[2:]
        method = str(req.method).upper().rsplit(".", 1)[-1]
        verb = {
            "GET": "watch" if req.params.get("watch") == "true" else ("get" if name else "list"),
            "POST": "create",
            "PATCH": "patch",
            "PUT": "update",
            "DELETE": "delete",
        }[method]
        out.append((namespace, group, "/".join([plural, *sub]), verb))
    return out


async def test_namespaced_operator_runs_within_the_charts_roles(cluster: Cluster):
    docs = render({"watchNamespaces": WATCHED})
    # What `helm install` would create before the operator starts: the KopfPeerings.
    for peering in by_kind(docs, "KopfPeering"):
        ns = peering["metadata"]["namespace"]
        await cluster.call("POST", f"/apis/kopf.dev/v1/namespaces/{ns}/kopfpeerings", peering)
    (container,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    # The chart's arguments as they are, plus: no liveness port (tests run in parallel) and a fixed priority.
    op = RunningOperator(argv=[*container["args"], "--liveness", "", "--priority", "10"])
    await op.start()
    try:
        for ns in WATCHED:
            md = load_example("cpu-demo.yaml")
            md["metadata"]["namespace"] = ns
            await cluster.create_md(md)
        md = load_example("cpu-demo.yaml")
        md["metadata"]["namespace"] = "elsewhere"  # not watched: left alone
        await cluster.create_md(md)
        for ns in WATCHED:
            await eventually(lambda ns=ns: cluster.get("Deployment", "smollm2-demo-router", ns), timeout=20)
        assert cluster.children("elsewhere") == {}
        # The replica announced itself in each watched namespace's peering object.
        for ns in WATCHED:
            peering = cluster.kmock.objects["kopf.dev/v1/kopfpeerings", ns, "tandem-operator"].raw
            assert peering.get("status"), peering
    finally:
        await op.stop()

    role_rules = {
        (group, resource, verb)
        for rule in one([d for d in docs if d["kind"] == "Role"][:1], "Role")["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    bound = {b["metadata"]["namespace"] for b in by_kind(docs, "RoleBinding")}
    denied = sorted(
        {
            f"{verb} {group}/{resource} in {ns or 'the cluster scope'}"
            for ns, group, resource, verb in _requests(cluster)
            if ns not in bound or (group, resource, verb) not in role_rules
        }
    )
    assert denied == [], "requests the chart's namespaced RBAC does not grant"
    assert _requests(cluster), "the operator made no request at all?"
