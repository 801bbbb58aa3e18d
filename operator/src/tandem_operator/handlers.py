"""Kopf wiring: thin handlers that hand (namespace, name) to the `Reconciler`.

What wakes a ModelDeployment's pass:
- any event on it (the initial listing at start-up, which is the resume; creation; every change);
- any event on a child it controls (a deleted or hand-edited child, a Deployment's readiness);
- a periodic timer (`resync_seconds`), the level-based safety net.

A second timer (`autoscale_interval`, when > 0) runs the autoscaler's step on each ModelDeployment
(it acts only on those with `spec.autoscaling.enabled`; see `autoscaler.py`).

No handler stores progress on the object and no finalizer is added: deletion is the garbage
collector's job through owner references. (Kopf timers normally add a finalizer so they can be
stopped before deletion; ours is level-based and harmless to stop late, so `register` drops it.)
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

import kopf

from . import api
from .autoscaler import Autoscaler
from .autoscaling.prometheus import DEFAULT_SCRAPE_INTERVAL_S
from .builders import MANAGED_BY
from .k8s import ClientClosedError, KubeClient
from .reconciler import Reconciler

log = logging.getLogger(__name__)

CHILD_RESOURCES = (
    ("apps", "v1", "deployments"),
    ("", "v1", "services"),
    ("", "v1", "configmaps"),
    ("", "v1", "serviceaccounts"),
    ("policy", "v1", "poddisruptionbudgets"),
)
CHILD_LABELS = {"app.kubernetes.io/managed-by": MANAGED_BY}
DEFAULT_RESYNC_SECONDS = 60.0


def login(settings: kopf.OperatorSettings) -> kopf.ConnectionInfo:
    """In-cluster service account first, else $KUBECONFIG / ~/.kube/config."""
    info = kopf.login_with_service_account(settings=settings) or kopf.login_with_kubeconfig(settings=settings)
    if info is None:
        raise kopf.LoginError("no in-cluster service account and no kubeconfig found")
    return info


def post_event(body: dict[str, Any], type_: str, reason: str, message: str) -> None:
    kopf.event(body, type=type_, reason=reason, message=message)


def build_settings(namespaces: list[str], clusterwide: bool) -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    # Only explicit Events (kopf.event) reach the API; handler log lines stay in the logs.
    settings.posting.level = logging.WARNING
    # No handler here stores state; should one ever do, it goes into our own annotations and
    # finalizer name, never into status.kopf.
    settings.persistence.finalizer = f"{api.GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=api.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=api.GROUP)
    settings.watching.server_timeout = 300
    # Exact namespace names (or all of them) need no watch on Namespace objects, and so no
    # cluster-wide RBAC; glob patterns do (Kopf then lists and watches namespaces).
    settings.scanning.disabled = clusterwide or not any(set("*?[!") & set(n) for n in namespaces)
    return settings


def _parent_name(body: kopf.Body) -> str | None:
    for ref in body.get("metadata", {}).get("ownerReferences", []) or []:
        if ref.get("kind") == api.KIND and ref.get("apiVersion") == api.API_VERSION and ref.get("controller"):
            return ref.get("name")
    return None


async def _reconcile(memo: kopf.Memo, namespace: str, name: str) -> None:
    try:
        await memo.reconciler.reconcile(namespace, name)
    except ClientClosedError:
        log.debug("shutting down: pass over %s/%s dropped", namespace, name)


async def _autoscale_step(autoscaler: Autoscaler, namespace: str, name: str) -> None:
    # The step runs as a task of its own. On exit Kopf waits for every task still pending and
    # re-raises whatever they end with, even an error the handler already read: so a step that
    # the closing client cuts short must end quietly here, not in the handler.
    try:
        await autoscaler.step(namespace, name)
    except ClientClosedError:
        log.debug("shutting down: autoscaler step over %s/%s dropped", namespace, name)


def register(
    registry: kopf.OperatorRegistry,
    resync_seconds: float = DEFAULT_RESYNC_SECONDS,
    autoscale_interval: float = 0.0,
    prometheus_url: str = "",
    scrape_interval: float = DEFAULT_SCRAPE_INTERVAL_S,
) -> None:
    """Register every handler on `registry` (a fresh one per operator run, so tests stay isolated).

    `autoscale_interval` > 0 runs the autoscaler every that many seconds per ModelDeployment,
    reading Prometheus at `prometheus_url` (which scrapes the pods every `scrape_interval` seconds);
    0 leaves the replica counts to the spec."""
    autoscaling = autoscale_interval > 0

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
        memo.client = KubeClient(lambda: login(settings))
        memo.reconciler = Reconciler(memo.client, post_event, autoscaler=autoscaling)
        if autoscaling:
            memo.autoscaler = Autoscaler(
                memo.client, memo.reconciler, post_event, prometheus_url, scrape_interval_s=scrape_interval
            )

    @kopf.on.cleanup(registry=registry)
    async def cleanup(memo: kopf.Memo, **_: Any) -> None:
        client = getattr(memo, "client", None)
        if client is not None:
            await client.close()

    @kopf.on.login(registry=registry)
    def on_login(settings: kopf.OperatorSettings, **_: Any) -> kopf.ConnectionInfo:
        return login(settings)

    @kopf.on.event(api.GROUP, api.VERSION, api.PLURAL, registry=registry)
    async def model_deployment_event(
        event: kopf.RawEvent, namespace: str, name: str, memo: kopf.Memo, **_: Any
    ) -> None:
        if event.get("type") == "DELETED":
            # What this process kept for the object (its lock, the autoscaler's state) would
            # otherwise stay for the operator's lifetime, one set per object ever deleted.
            memo.reconciler.forget(namespace, name)
            if "autoscaler" in memo:
                uid = ((event.get("object") or {}).get("metadata") or {}).get("uid", "")
                memo.autoscaler.forget(uid)
            return
        await _reconcile(memo, namespace, name)

    for group, version, plural in CHILD_RESOURCES:

        @kopf.on.event(group, version, plural, labels=CHILD_LABELS, registry=registry, id=f"child-{plural}")
        async def child_event(body: kopf.Body, namespace: str, memo: kopf.Memo, **_: Any) -> None:
            parent = _parent_name(body)
            if parent is not None:
                await _reconcile(memo, namespace, parent)

    if resync_seconds > 0:  # else no periodic pass (tests of the event paths)

        @kopf.timer(
            api.GROUP, api.VERSION, api.PLURAL, interval=resync_seconds, registry=registry, id="resync"
        )
        async def resync(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
            await _reconcile(memo, namespace, name)

    if autoscaling:

        @kopf.timer(
            api.GROUP,
            api.VERSION,
            api.PLURAL,
            interval=autoscale_interval,
            registry=registry,
            id="autoscale",
        )
        async def autoscale(
            spec: kopf.Spec,
            namespace: str,
            name: str,
            uid: str,
            memo: kopf.Memo,
            stopped: kopf.DaemonStopped,
            **_: Any,
        ) -> None:
            if not (spec.get("autoscaling") or {}).get("enabled"):
                memo.autoscaler.forget(uid)
                return  # disabled: no query, no API call
            # A step in flight when the timer is stopped (operator exit, object deleted) is
            # abandoned at once: Kopf waits only a few loop cycles before it orphans a timer.
            step = asyncio.ensure_future(_autoscale_step(memo.autoscaler, namespace, name))
            stop = asyncio.ensure_future(stopped.wait())
            try:
                await asyncio.wait({step, stop}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop.cancel()
                if not step.done():  # stopped, or this handler cancelled: the step goes with it
                    step.cancel()
                    log.debug("stopping: autoscaler step over %s/%s abandoned", namespace, name)
            if step.done() and not step.cancelled():
                step.result()  # any other error: Kopf logs it and the timer goes on

    # Kopf adds a finalizer for every timer; these do not need one (see the module docstring).
    spawning = registry._spawning  # kopf pins: requirements.txt; a test checks no finalizer appears
    spawning._handlers[:] = [
        dataclasses.replace(h, requires_finalizer=False) if h.id in ("resync", "autoscale") else h
        for h in spawning._handlers
    ]
