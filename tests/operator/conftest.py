"""The operator's test tiers share these fixtures.

`cluster` is kmock's Kubernetes API emulator (an aiohttp server on loopback that stores objects,
serves list/watch/get/create/patch/delete, and records every request) with the resources the
operator uses declared, and $KUBECONFIG pointing at it, so the operator logs in exactly as it does
against a real cluster. `operator` runs the real Kopf operator in-process against it.

kmock is an emulator, not an API server: it does not default fields, bump metadata.generation, run
the Deployment controller or garbage-collect by owner references. Tests play those parts explicitly
(`Cluster.create_md`, `Cluster.set_deployment_ready`), and the real-cluster tier checks the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml

from tandem_operator import api

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = REPO_ROOT / "manifests" / "examples"
NAMESPACE = "default"

CHILD_RESOURCES = {
    "apps/v1/deployments": ("Deployment", {"status", "scale"}),
    "v1/services": ("Service", {"status"}),
    "v1/configmaps": ("ConfigMap", set()),
    "v1/serviceaccounts": ("ServiceAccount", set()),
    "policy/v1/poddisruptionbudgets": ("PodDisruptionBudget", {"status"}),
}
CHILD_KEYS = {
    "Deployment": "apps/v1/deployments",
    "Service": "v1/services",
    "ConfigMap": "v1/configmaps",
    "ServiceAccount": "v1/serviceaccounts",
    "PodDisruptionBudget": "policy/v1/poddisruptionbudgets",
}
MD_RESOURCE = f"{api.GROUP}/{api.VERSION}/{api.PLURAL}"
TEST_AGENT = "tandem-tests"
VERBS = {"list", "watch", "get", "create", "patch", "delete"}


def load_example(name: str) -> dict[str, Any]:
    return yaml.safe_load((EXAMPLES / name).read_text())


async def eventually(check: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05) -> Any:
    """Poll `check` until it returns a truthy value (AssertionError/KeyError count as "not yet")."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
        except (AssertionError, KeyError):
            if asyncio.get_running_loop().time() > deadline:
                raise
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not true within {timeout}s: {check}")
        await asyncio.sleep(interval)


class Cluster:
    """kmock plus the API-server and controller behaviour the tests need, done by hand."""

    def __init__(self, kmock: Any) -> None:
        self.kmock = kmock
        self.url = str(kmock.url).rstrip("/")

    async def call(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> Any:
        import aiohttp

        async with aiohttp.ClientSession(headers={"User-Agent": TEST_AGENT}) as s:
            async with s.request(
                method, self.url + path, json=body, headers={"Content-Type": content_type}
            ) as resp:
                assert resp.status < 300, f"{method} {path}: {resp.status} {await resp.text()}"
                return await resp.json()

    # ---- ModelDeployment, as the API server would store it

    async def create_md(self, manifest: dict[str, Any]) -> dict[str, Any]:
        obj = copy.deepcopy(manifest)
        obj["metadata"].setdefault("namespace", NAMESPACE)
        obj["metadata"]["uid"] = str(uuid.uuid4())
        obj["metadata"]["generation"] = 1
        obj["metadata"]["creationTimestamp"] = "2026-01-01T00:00:00Z"
        ns = obj["metadata"]["namespace"]
        return await self.call("POST", f"/apis/{api.API_VERSION}/namespaces/{ns}/{api.PLURAL}", obj)

    async def update_md_spec(self, name: str, spec_patch: dict[str, Any], ns: str = NAMESPACE) -> None:
        md = self.md(name, ns)
        generation = int(md["metadata"]["generation"]) + 1
        await self.call(
            "PATCH",
            f"/apis/{api.API_VERSION}/namespaces/{ns}/{api.PLURAL}/{name}",
            {"metadata": {"generation": generation}, "spec": spec_patch},
            "application/merge-patch+json",
        )

    async def delete(self, key: str, name: str, ns: str = NAMESPACE) -> None:
        group_version, plural = key.rsplit("/", 1)
        prefix = "/api/v1" if group_version == "v1" else f"/apis/{group_version}"
        await self.call("DELETE", f"{prefix}/namespaces/{ns}/{plural}/{name}")

    async def patch(
        self, key: str, name: str, patch: dict[str, Any], ns: str = NAMESPACE, sub: str = ""
    ) -> None:
        group_version, plural = key.rsplit("/", 1)
        prefix = "/api/v1" if group_version == "v1" else f"/apis/{group_version}"
        path = f"{prefix}/namespaces/{ns}/{plural}/{name}" + (f"/{sub}" if sub else "")
        await self.call("PATCH", path, patch, "application/merge-patch+json")

    def md(self, name: str, ns: str = NAMESPACE) -> dict[str, Any]:
        return self.kmock.objects[MD_RESOURCE, ns, name].raw

    def condition(self, name: str, type_: str) -> dict[str, Any]:
        conds = self.md(name).get("status", {}).get("conditions", [])
        found = [c for c in conds if c["type"] == type_]
        assert found, f"no {type_} condition yet"
        return found[0]

    def get(self, kind: str, name: str, ns: str = NAMESPACE) -> dict[str, Any] | None:
        try:
            obj = self.kmock.objects[CHILD_KEYS[kind], ns, name]
        except KeyError:
            return None
        return None if obj.deleted else obj.raw

    def children(self, ns: str = NAMESPACE) -> dict[tuple[str, str], dict[str, Any]]:
        """(kind, name) -> object, for every live object of a child kind in `ns`."""
        out = {}
        for (_, namespace, name), obj in self.kmock.objects.items():
            if namespace != ns or obj.deleted:
                continue
            kind = obj.raw.get("kind")
            if kind in CHILD_KEYS:
                out[(kind, name)] = obj.raw
        return out

    def events(self, ns: str = NAMESPACE) -> list[dict[str, Any]]:
        """Every Event posted in `ns`, from the recorded requests (kmock stores only one per generateName)."""
        out = []
        for req in list(self.kmock):
            if str(req.method).upper().endswith("POST") and req.url.path == f"/api/v1/namespaces/{ns}/events":
                out.append(req.data)
        return out

    # ---- the Deployment controller's part

    async def set_deployment_ready(self, name: str, ready: int | None = None, ns: str = NAMESPACE) -> None:
        dep = self.get("Deployment", name, ns)
        assert dep is not None, f"no Deployment {name}"
        want = dep["spec"]["replicas"]
        ready = want if ready is None else ready
        await self.patch(
            "apps/v1/deployments", name,
            {"status": {"observedGeneration": dep["metadata"].get("generation", 0), "replicas": want,
                        "updatedReplicas": want, "readyReplicas": ready, "availableReplicas": ready,
                        "conditions": [{"type": "Progressing", "status": "True",
                                        "reason": "NewReplicaSetAvailable"}]}},
            ns, sub="status",
        )  # fmt: skip

    # ---- recorded requests

    def writes(self, since: int = 0) -> list[tuple[str, str, Any]]:
        """Mutating requests from anyone but the test (operator and Kopf), except Events.

        `since`: skip the first `since` recorded requests (see `mark`).
        """
        out = []
        for req in list(self.kmock)[since:]:
            method = str(req.method).upper().rsplit(".", 1)[-1]
            if method not in ("POST", "PATCH", "PUT", "DELETE"):
                continue
            if req.headers.get("User-Agent", "") == TEST_AGENT or "/events" in req.url.path:
                continue
            out.append((method, req.url.path, req.data))
        return out

    def rbac_violations(self) -> list[str]:
        """Requests by the operator (or Kopf) that manifests/rbac.yaml's ClusterRole does not grant."""
        role = next(d for d in yaml.safe_load_all((REPO_ROOT / "manifests" / "rbac.yaml").read_text())
                    if d and d["kind"] == "ClusterRole")  # fmt: skip
        granted = {
            (group, resource, verb)
            for rule in role["rules"]
            for group in rule["apiGroups"]
            for resource in rule["resources"]
            for verb in rule["verbs"]
        }
        out = []
        for req in list(self.kmock):
            if req.headers.get("User-Agent", "") == TEST_AGENT:
                continue
            parts = req.url.path.strip("/").split("/")
            if parts[0] == "api" and len(parts) > 2:
                group, rest = "", parts[2:]
            elif parts[0] == "apis" and len(parts) > 3:
                group, rest = parts[1], parts[3:]
            else:
                continue  # discovery: allowed to every authenticated user
            if rest[:1] == ["namespaces"] and len(rest) > 2:
                rest = rest[2:]
            plural, name, sub = rest[0], (rest[1] if len(rest) > 1 else None), rest[2:]
            resource = "/".join([plural, *sub])
            method = str(req.method).upper().rsplit(".", 1)[-1]
            verb = {
                "GET": "watch" if req.params.get("watch") == "true" else ("get" if name else "list"),
                "POST": "create",
                "PATCH": "patch",
                "PUT": "update",
                "DELETE": "delete",
            }[method]
            if (group, resource, verb) not in granted:
                out.append(f"{verb} {group}/{resource} ({method} {req.url.path})")
        return sorted(set(out))

    def mark(self) -> int:
        """The number of requests recorded so far (for `writes(since=...)`)."""
        return len(list(self.kmock))


def emulate_cluster(
    kmock: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, namespace: str | None = NAMESPACE
) -> Cluster:
    """Teach kmock Tandem's and Kopf's resources and point KUBECONFIG at it (default namespace:
    `namespace`, or none)."""
    kmock.resources[MD_RESOURCE] = kmock.ResourceInfo(
        kind=api.KIND, namespaced=True, subresources={"status"}, verbs=VERBS, shortnames=set(api.SHORT_NAMES)
    )
    for key, (kind, subresources) in CHILD_RESOURCES.items():
        kmock.resources[key] = kmock.ResourceInfo(
            kind=kind, namespaced=True, subresources=subresources, verbs=VERBS
        )
    for plural, kind, namespaced in (
        ("kopfpeerings", "KopfPeering", True),
        ("clusterkopfpeerings", "ClusterKopfPeering", False),
    ):
        kmock.resources[f"kopf.dev/v1/{plural}"] = kmock.ResourceInfo(
            kind=kind, namespaced=namespaced, verbs=VERBS
        )
    kmock.resources["v1/events"] = kmock.ResourceInfo(kind="Event", namespaced=True, verbs=VERBS)
    # Kopf waits for these to be discoverable (it does not list them: scanning is off for exact namespaces).
    kmock.resources["v1/namespaces"] = kmock.ResourceInfo(kind="Namespace", namespaced=False, verbs=VERBS)
    kmock.resources["apiextensions.k8s.io/v1/customresourcedefinitions"] = kmock.ResourceInfo(
        kind="CustomResourceDefinition", namespaced=False, verbs=VERBS
    )
    context = {"cluster": "kmock", "user": "test"}
    if namespace is not None:
        context["namespace"] = namespace
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kmock", "cluster": {"server": str(kmock.url).rstrip("/")}}],
        "users": [{"name": "test", "user": {"token": "test-token"}}],
        "contexts": [{"name": "kmock", "context": context}],
        "current-context": "kmock",
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(kubeconfig))
    monkeypatch.setenv("KUBECONFIG", str(path))
    return Cluster(kmock)


@pytest_asyncio.fixture
async def cluster(kmock: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Cluster]:
    cluster = emulate_cluster(kmock, tmp_path, monkeypatch)
    yield cluster
    # Whatever the test did, the operator used only what its ClusterRole grants.
    assert cluster.rbac_violations() == []


class RunningOperator:
    """The real operator (`tandem_operator.main.operate`) in a thread with its own event loop.

    A thread, as `kopf.testing.KopfRunner` does it: when Kopf stops, it cancels every task left in
    its loop, which must not be the test's own tasks.
    """

    def __init__(
        self, resync_seconds: float = 0, argv: list[str] | None = None, autoscale_interval: float = 0
    ) -> None:
        self.argv = argv or ["--namespace", NAMESPACE, "--standalone", "--liveness", ""]
        self.resync_seconds = resync_seconds
        # Off unless a test wants it: a Kopf timer spawned while the operator stops (the first
        # pass over a new object still running) holds the stop for Kopf's 5-second grace.
        self.autoscale_interval = autoscale_interval
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.error: BaseException | None = None

    def _run(self, args: argparse.Namespace, ready: threading.Event) -> None:
        from tandem_operator.main import operate

        try:
            asyncio.run(operate(args, stop_flag=self._stop, ready_flag=ready))
        except BaseException as e:  # surfaced by stop()
            self.error = e

    async def start(self) -> None:
        args = parse_args(
            [
                *self.argv,
                "--resync-seconds",
                str(self.resync_seconds),
                "--autoscale-interval",
                str(self.autoscale_interval),
            ]
        )
        self._stop.clear()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(args, ready), name="operator", daemon=True)
        self._thread.start()
        await eventually(ready.is_set, timeout=15)

    async def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        await eventually(lambda: not self._thread.is_alive(), timeout=15)
        self._thread = None
        if self.error is not None:
            raise self.error


@pytest_asyncio.fixture
async def operator(cluster: Cluster) -> AsyncIterator[RunningOperator]:
    # Event-driven only: the periodic pass has its own tests (and Kopf takes 5 s to stop a timer).
    op = RunningOperator(resync_seconds=0)
    await op.start()
    try:
        yield op
    finally:
        await op.stop()


def parse_args(argv: list[str]) -> argparse.Namespace:
    from tandem_operator.main import build_parser

    return build_parser().parse_args(argv)
