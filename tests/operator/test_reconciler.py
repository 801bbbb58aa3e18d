"""The Reconciler against an in-memory API (no Kopf, no HTTP): failure paths kmock cannot produce."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest

from tandem_operator import api
from tandem_operator.k8s import ApiError
from tandem_operator.reconciler import Reconciler

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

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        kind, meta = obj["kind"], obj["metadata"]
        self._check("create", kind, meta["name"])
        key = (kind, meta["namespace"], meta["name"])
        if key in self.objects:
            raise ApiError(409, "AlreadyExists", "exists")
        self.objects[key] = copy.deepcopy(obj)
        return copy.deepcopy(obj)

    async def patch(self, api_version, kind, namespace, name, patch, subresource=None) -> dict[str, Any]:
        self._check("patch", kind, name)
        key = (kind, namespace, name)
        self.objects[key] = merge_patch(self.objects[key], patch)
        return copy.deepcopy(self.objects[key])

    async def delete(self, api_version, kind, namespace, name) -> None:
        self._check("delete", kind, name)
        self.objects.pop((kind, namespace, name), None)

    def writes(self) -> list[tuple[str, str, str]]:
        return [c for c in self.calls if c[0] != "get"]


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
    assert memory.calls and all(verb == "get" for verb, _, _ in memory.calls)


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
