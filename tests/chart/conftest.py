"""The chart's tests render charts/tandem with the real Helm engine and check what comes out.

Helm: the `helm-python-sdk` package (import name `helm_python`), which binds Helm's own Go SDK (v4)
through a C library in its wheel: the same template engine, values coalescing, `values.schema.json`
check and linter as the `helm` binary, offline, with no binary and no cluster. Kubernetes schemas:
`kubernetes-validate`, which ships the API's JSON schemas per minor version (strict: unknown fields
fail too).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import helm_python as helm  # helm-python-sdk (requirements.txt)
import kubernetes_validate
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "charts" / "tandem"
RELEASE = "tandem"
NAMESPACE = "tandem-system"
# The chart's kubeVersion floor and the newest schemas kubernetes-validate ships.
KUBE_VERSIONS = ("1.27.0", kubernetes_validate.latest_version())


@functools.cache
def _chart() -> Any:
    return helm.Chart.load(str(CHART))


def render_files(
    values: dict[str, Any] | None = None, name: str = RELEASE, namespace: str = NAMESPACE
) -> dict[str, str]:
    """template path -> rendered text, as `helm install` would render it (schema checked first)."""
    return _chart().render(values, name=name, namespace=namespace, is_install=True)


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every object the chart renders with these values (NOTES.txt left out)."""
    # json round trip: values are plain data, and lru_cache needs a hashable key
    return [dict(o) for o in _render_cached(json.dumps(values, sort_keys=True) if values else "")]


@functools.cache
def _render_cached(key: str) -> tuple[dict[str, Any], ...]:
    values = json.loads(key) if key else None
    docs: list[dict[str, Any]] = []
    for path, text in sorted(render_files(values).items()):
        if path.endswith("NOTES.txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return tuple(docs)


def render_release(values: dict[str, Any] | None, name: str, namespace: str) -> list[dict[str, Any]]:
    """Like `render`, for another release name and namespace (not cached)."""
    files = render_files(values, name=name, namespace=namespace)
    return [
        d for p, t in sorted(files.items()) if not p.endswith("NOTES.txt") for d in yaml.safe_load_all(t) if d
    ]


def notes(values: dict[str, Any] | None = None) -> str:
    return render_files(values)[f"{CHART.name}/templates/NOTES.txt"]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = by_kind(docs, kind)
    return doc


def crds() -> list[dict[str, Any]]:
    return [
        d for p in sorted((CHART / "crds").glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d
    ]
