"""`Reconciler`: one level-based pass per ModelDeployment, from whatever woke it up.

A pass reads the ModelDeployment, checks the spec, applies each desired child (create when missing,
merge-patch only when a field we own differs), deletes children this spec no longer wants, and
writes status only when it changed. Because every step compares first, a pass over an unchanged
resource makes no write call. Passes of one object never overlap: a request that arrives during a
pass marks it dirty and the pass runs once more.

A bad spec writes nothing but status and one Warning Event (when the error is new); the children of
the last valid spec keep running untouched.

Replica counts: the pools' `replicas` from the spec, unless the autoscaler is active for the object
(`autoscaling_active`): then it owns the prefill and decode Deployments' `spec.replicas`, and a pass
only clamps the live count into the pool's [minReplicas, maxReplicas] (a Deployment that has to be
created starts at the pool's `replicas`). Everything else in those Deployments stays the pass's.
A pass and an autoscaler step over one object never interleave (`lock`).

Mode switch (colocated <-> disaggregated): the old mode's pools (Deployment, headless Service, PDB)
are not pruned, and the router keeps its old worker targets (`--decode`/`--prefill`), until every
new pool's Deployment has all its replicas ready; then the router gets the new targets, and the old
pools go once the router has rolled out. Loading a model takes minutes, and pruning at once would
leave nothing to serve meanwhile. Whether a switch is under way is read from the live objects
alone (an old-mode Deployment this object controls still exists), so a restarted operator decides
the same. Everything else the spec no longer wants is pruned at once.

Worker health: each pass lists the object's pods once (its namespace, its instance label: never
the cluster's pods) and reports crashed containers in the condition `WorkersHealthy` (see
`status.observe_pods`), with one Warning Event per component when it starts crashing (and again if
it turns OOMKilled, GPUOutOfMemory or Evicted), not one per pass: the episode is read back from
status, so a restarted operator does not repeat it. No pod is watched: a crash makes the pod unready, and the
Deployment's status change wakes a pass; restarts counted while it stays unready, and the return to
stable, wait for the periodic pass.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import logging
from collections.abc import Callable
from typing import Any

from . import api
from .builders import (
    MANAGED_BY,
    ROLES,
    Owner,
    build_children,
    child_name,
    possible_children,
    selector_labels,
)
from .k8s import ApiError, KubeClient
from .patching import plan_patch, with_last_applied
from .status import (
    DEGRADED,
    EVICTED,
    GPU_OOM,
    OOM_KILLED,
    SPEC_VALID,
    ModeSwitch,
    PoolPods,
    Workload,
    observe_deployment,
    observe_pods,
    plan_status,
    plan_status_patch,
    unhealthy_components,
    unhealthy_parts,
)
from .validation import plan_spec_errors

log = logging.getLogger(__name__)

EVENT_MESSAGE_LIMIT = 1000

# API answers that retrying the same object cannot fix: reported in status instead of retried.
REFUSED = (400, 403, 422)

# (body, type, reason, message) -> None: posts a Kubernetes Event about the ModelDeployment.
EventPoster = Callable[[dict[str, Any], str, str, str], None]


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _controller_uid(obj: dict[str, Any]) -> str | None:
    for ref in obj.get("metadata", {}).get("ownerReferences", []) or []:
        if ref.get("controller"):
            return ref.get("uid")
    return None


def is_ours(live: dict[str, Any], owner: Owner) -> bool:
    """Controlled by this ModelDeployment, or an orphan it made earlier (our labels, no controller)."""
    uid = _controller_uid(live)
    if uid is not None:
        return uid == owner.uid
    labels = live.get("metadata", {}).get("labels", {}) or {}
    return (
        labels.get("app.kubernetes.io/managed-by") == MANAGED_BY
        and labels.get("app.kubernetes.io/instance") == owner.name
    )


def _ident(obj: dict[str, Any]) -> tuple[str, str, str]:
    return obj["apiVersion"], obj["kind"], obj["metadata"]["name"]


AUTOSCALED_ROLES = ("prefill", "decode")

# The router arguments that name its workers (each followed by a `dns:` target).
ROUTE_FLAGS = ("--decode", "--prefill")


def _router_args(deployment: dict[str, Any]) -> list[str] | None:
    containers = deployment.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []) or []
    return next((c.get("args") for c in containers if c.get("name") == "router"), None)


def split_route(args: list[str]) -> tuple[list[str], list[str]]:
    """(the arguments without the worker targets, the worker targets as flag/value pairs)."""
    rest: list[str] = []
    route: list[str] = []
    i = 0
    while i < len(args):
        if args[i] in ROUTE_FLAGS:
            route += args[i : i + 2]
            i += 2
        else:
            rest.append(args[i])
            i += 1
    return rest, route


def with_live_route(desired: dict[str, Any], live: dict[str, Any] | None) -> dict[str, Any]:
    """The desired router Deployment, but still routing to the workers the live one routes to."""
    live_args = _router_args(live) if live is not None else None
    live_route = split_route(live_args)[1] if live_args else []
    if not live_route:
        return desired  # nothing to keep routing to
    out = copy.deepcopy(desired)
    for c in out["spec"]["template"]["spec"]["containers"]:
        if c.get("name") == "router":
            c["args"] = split_route(c["args"])[0] + live_route
    return out


def fully_ready(deployment: dict[str, Any] | None) -> bool:
    """Rolled out to its current template with every replica ready (as status reports it)."""
    if deployment is None:
        return False
    w = observe_deployment(deployment)
    return w.rolled_out and w.ready >= w.desired


COMPONENT_LABEL = "app.kubernetes.io/component"


def pod_labels(owner: Owner) -> dict[str, str]:
    """The labels every pod of the object's workloads carries (each component's selector, less the
    component)."""
    return {k: v for k, v in selector_labels(owner, "router").items() if k != COMPONENT_LABEL}


def pods_selector(owner: Owner) -> str:
    """Label selector of the object's pods: the API server filters, so a pass reads only those."""
    return ",".join(f"{k}={v}" for k, v in sorted(pod_labels(owner).items()))


def autoscaling_active(spec: api.ModelDeploymentSpec) -> bool:
    """The spec asks for autoscaling and its mode has pools the autoscaler sizes."""
    return spec.autoscaling.enabled and spec.mode == api.Mode.disaggregated


def replica_bounds(pool: api.Pool) -> tuple[int, int]:
    """[minReplicas, maxReplicas] of a pool; each defaults to `replicas` (as the CRD documents)."""
    lo = pool.replicas if pool.min_replicas is None else pool.min_replicas
    hi = pool.replicas if pool.max_replicas is None else pool.max_replicas
    return lo, hi


class Reconciler:
    def __init__(
        self,
        client: KubeClient,
        post_event: EventPoster,
        now: Callable[[], str] = utc_now,
        autoscaler: bool = False,
    ) -> None:
        """`autoscaler`: this operator runs the autoscaler, so specs with autoscaling enabled hand
        it their replica counts (without it, the spec's replicas stay in force)."""
        self._client = client
        self._post_event = post_event
        self._now = now
        self._autoscaler = autoscaler
        self._running: set[tuple[str, str]] = set()
        self._dirty: set[tuple[str, str]] = set()
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    def lock(self, namespace: str, name: str) -> asyncio.Lock:
        """Held by each pass over the object and by each autoscaler step over it."""
        return self._locks.setdefault((namespace, name), asyncio.Lock())

    def forget(self, namespace: str, name: str) -> None:
        """The object is deleted: drop its lock, unless a pass or an autoscaler step holds it."""
        key = (namespace, name)
        lock = self._locks.get(key)
        if lock is not None and not lock.locked() and key not in self._running:
            del self._locks[key]

    def autoscaled(self, spec: api.ModelDeploymentSpec) -> bool:
        return self._autoscaler and autoscaling_active(spec)

    async def reconcile(self, namespace: str, name: str) -> None:
        key = (namespace, name)
        if key in self._running:
            self._dirty.add(key)
            return
        self._running.add(key)
        try:
            while True:
                self._dirty.discard(key)
                try:
                    async with self.lock(namespace, name):
                        await self._pass(namespace, name)
                except Exception:
                    # A change that arrived during a failed pass only marked the object dirty; it
                    # gets its own pass now, or it would wait for the next resync (event handlers
                    # are not retried).
                    if key in self._dirty:
                        log.warning("pass over %s/%s failed; a newer change gets its own pass", *key)
                        continue
                    raise
                if key not in self._dirty:
                    return
        finally:
            self._running.discard(key)

    async def _pass(self, namespace: str, name: str) -> None:
        c = self._client
        body = await c.get(api.API_VERSION, api.KIND, namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return  # gone or going: the garbage collector removes the children through owner references
        owner = Owner.from_body(body)
        generation = int(body["metadata"].get("generation", 0))
        spec, errors = plan_spec_errors(name, body.get("spec") or {})

        live: dict[tuple[str, str, str], dict[str, Any] | None] = {}
        conflicts: list[str] = []
        failures: list[str] = []
        autoscaled = spec is not None and not errors and self.autoscaled(spec)
        # Role -> (min, max) of the pools whose replica count the autoscaler owns.
        bounds: dict[str, tuple[int, int]] = {}
        if autoscaled:
            assert spec is not None
            bounds = {
                role: replica_bounds(pool) for role, pool in spec.pools().items() if role in AUTOSCALED_ROLES
            }
        mode_switch: ModeSwitch | None = None
        if not errors:
            assert spec is not None
            desired = build_children(owner, spec)
            wanted = {_ident(obj) for obj in desired}
            # Worker Deployments of another mode that this object controls: a mode switch under way.
            old_pools: dict[str, dict[str, Any]] = {}
            read: dict[tuple[str, str, str], dict[str, Any] | None] = {}  # for pruning below
            for role in ROLES:
                if role not in spec.pools():
                    ident = ("apps/v1", "Deployment", child_name(owner, role))
                    dep = read[ident] = await c.get(ident[0], ident[1], namespace, ident[2])
                    # Ours also when orphaned (`kubectl delete --cascade=orphan`, then the object
                    # recreated in the other mode): wanted children are adopted, so these must be
                    # switched from and pruned, not left holding GPUs for ever.
                    if dep is not None and is_ours(dep, owner):
                        old_pools[role] = dep
            router_ident = ("apps/v1", "Deployment", child_name(owner, "router"))
            new_pools_ready = False
            for obj in desired:
                role = obj["metadata"].get("labels", {}).get("app.kubernetes.io/component")
                if _ident(obj) == router_ident and old_pools:
                    # The worker Deployments come before the router's in apply order.
                    new_pools_ready = all(
                        fully_ready(live.get(("apps/v1", "Deployment", child_name(owner, r))))
                        for r in spec.pools()
                    )
                try:
                    applied = await self._apply(
                        owner,
                        obj,
                        bounds.get(role) if obj["kind"] == "Deployment" else None,
                        keep_route=_ident(obj) == router_ident and bool(old_pools) and not new_pools_ready,
                    )
                except ApiError as e:
                    if e.status not in REFUSED:
                        raise  # transient: the next pass (or Kopf's retry) tries again
                    # Refused for good (invalid object, forbidden): report it, apply the rest.
                    failures.append(f"{obj['kind']}/{obj['metadata']['name']}: {e}")
                    applied = await c.get(obj["apiVersion"], obj["kind"], namespace, obj["metadata"]["name"])
                if applied is not None and not is_ours(applied, owner):
                    conflicts.append(f"{obj['kind']}/{obj['metadata']['name']}")
                    applied = None  # someone else's object under our name: not ours to report
                live[_ident(obj)] = applied
            router = live.get(router_ident)
            # Old router pods still route to the old pools until the router has rolled out.
            if old_pools and not (
                new_pools_ready and router is not None and observe_deployment(router).rolled_out
            ):
                mode_switch = ModeSwitch(
                    kept=tuple(old_pools), new=tuple(spec.pools()), pools_ready=new_pools_ready
                )
                for role, dep in old_pools.items():
                    live[("apps/v1", "Deployment", child_name(owner, role))] = dep
            kept = {child_name(owner, role) for role in mode_switch.kept} if mode_switch else set()
            for ident in possible_children(owner):
                if ident not in wanted and ident[2] not in kept:
                    await self._prune(owner, ident, read)
        else:
            for component in (*ROLES, "router"):
                ident = ("apps/v1", "Deployment", child_name(owner, component))
                live[ident] = await c.get(ident[0], ident[1], namespace, ident[2])
            ident = ("v1", "Service", child_name(owner, "router"))
            live[ident] = await c.get(ident[0], ident[1], namespace, ident[2])

        # Desired replicas come from the spec when it is valid (a missing Deployment still wants them).
        wanted_replicas: dict[str, int] = {}
        if spec is not None and not errors:
            wanted_replicas = {role: pool.replicas for role, pool in spec.pools().items()}
            wanted_replicas["router"] = spec.router.replicas
            for role in bounds:  # the autoscaler's count (as the pass left it), not the spec's
                dep = live.get(("apps/v1", "Deployment", child_name(owner, role)))
                if dep is not None:
                    wanted_replicas[role] = int(dep.get("spec", {}).get("replicas", wanted_replicas[role]))
        workloads: dict[str, Workload] = {}
        ours: list[str] = []  # components whose Deployment (and so whose pods) are ours
        for component in (*ROLES, "router"):
            ident = ("apps/v1", "Deployment", child_name(owner, component))
            if ident not in live:
                continue
            obj = live[ident]
            if obj is None and errors:
                continue  # no such workload and none wanted by a spec we can read
            if obj is not None and not is_ours(obj, owner):
                obj = None  # someone else's object under our name: not ours to report
            if obj is not None:
                ours.append(component)
            workloads[component] = observe_deployment(obj, wanted_replicas.get(component))
        now = self._now()
        pods: dict[str, PoolPods] | None = None
        pods_unreadable = ""
        pods_transient = False
        if workloads:
            try:
                listed = await c.list_objects("v1", "Pod", namespace, pods_selector(owner))
                want = pod_labels(owner).items()
                # Checked here too: a server (or emulator) that ignores the selector must not
                # report another deployment's crashes as this one's.
                mine = [p for p in listed if want <= ((p.get("metadata") or {}).get("labels") or {}).items()]
                pods = observe_pods(mine, ours, now)
            except ApiError as e:
                # Forbidden (a role from before pods were listed) or a transient error: said in
                # status, and the rest of the pass goes on.
                log.warning("%s/%s: cannot list its pods: %s", namespace, name, e)
                pods_unreadable = str(e)
                # Not a refusal (an API server error, throttling): the last view stands, so a crash
                # episode is neither warned again nor its autoscaler hold lifted for one failed list.
                pods_transient = e.status not in (401, 403)
        router_service = live.get(("v1", "Service", child_name(owner, "router")))
        if router_service is not None and not is_ours(router_service, owner):
            router_service = None

        previous = body.get("status") or {}
        new_status = plan_status(
            generation=generation,
            spec_errors=[(e.reason, e.message) for e in errors],
            conflicts=conflicts,
            failures=failures,
            workloads=workloads,
            router_service=router_service,
            previous=previous,
            now=now,
            # A bad spec leaves the autoscaler's status alone (the autoscaler holds meanwhile).
            autoscaling=autoscaled or bool(errors),
            mode_switch=mode_switch,
            # Asked for, but this operator runs no autoscaler: said in status, not left silent.
            autoscaler_off=(
                spec is not None and not errors and not self._autoscaler and autoscaling_active(spec)
            ),
            pods=pods,
            pods_unreadable=pods_unreadable,
            pods_transient=pods_transient,
        )
        patch = plan_status_patch(previous, new_status)
        if patch is not None:
            await c.patch(api.API_VERSION, api.KIND, namespace, name, patch, subresource="status")
        self._warn_once(body, previous, new_status, SPEC_VALID, "False")
        if conflicts or failures:
            self._warn_once(body, previous, new_status, DEGRADED, "True")
        self._warn_crashes(body, previous, new_status)

    async def _apply(
        self,
        owner: Owner,
        desired: dict[str, Any],
        bounds: tuple[int, int] | None = None,
        keep_route: bool = False,
    ) -> dict[str, Any] | None:
        """Create or patch one child. `bounds`: the autoscaler owns this Deployment's replicas, so
        the live count is kept, clamped into [min, max]. `keep_route`: the router Deployment keeps
        the worker targets it has (a mode switch whose new pools are not ready yet)."""
        c = self._client
        api_version, kind, name = _ident(desired)
        live = await c.get(api_version, kind, owner.namespace, name)
        if keep_route and live is not None and is_ours(live, owner):
            desired = with_live_route(desired, live)
        if live is not None and bounds is not None and is_ours(live, owner):
            have = live.get("spec", {}).get("replicas")
            if isinstance(have, int):
                desired = copy.deepcopy(desired)
                desired["spec"]["replicas"] = min(max(have, bounds[0]), bounds[1])
        if live is None:
            log.info("creating %s %s/%s", kind, owner.namespace, name)
            try:
                return await c.create(with_last_applied(desired))
            except ApiError as e:
                if e.status != 409:
                    raise
                live = await c.get(api_version, kind, owner.namespace, name)  # created meanwhile
                if live is None:
                    raise
        if not is_ours(live, owner):
            log.warning("%s %s/%s is not ours; leaving it alone", kind, owner.namespace, name)
            return live
        patch = plan_patch(desired, live)
        if patch is None:
            return live
        log.info("updating %s %s/%s", kind, owner.namespace, name)
        return await c.patch(api_version, kind, owner.namespace, name, patch)

    async def _prune(
        self, owner: Owner, ident: tuple[str, str, str], read: dict[tuple[str, str, str], Any]
    ) -> None:
        """Delete the child if it is ours (controlled, or an orphan of ours). `read`: children this
        pass has already read (the other mode's Deployments, absent ones as None), not read again."""
        api_version, kind, name = ident
        if ident in read:
            live = read[ident]
        else:
            live = await self._client.get(api_version, kind, owner.namespace, name)
        if live is not None and is_ours(live, owner):
            log.info("deleting %s %s/%s (no longer wanted)", kind, owner.namespace, name)
            await self._client.delete(api_version, kind, owner.namespace, name)

    def _warn_once(
        self, body: dict[str, Any], previous: dict[str, Any], new: dict[str, Any], type_: str, bad: str
    ) -> None:
        """A Warning Event when condition `type_` turns (or stays, with a new message) `bad`: one per
        distinct problem, not one per pass."""

        def find(status: dict[str, Any]) -> dict[str, Any]:
            return next((c for c in status.get("conditions", []) or [] if c.get("type") == type_), {})

        old, cur = find(previous), find(new)
        if cur.get("status") != bad:
            return
        if (old.get("status"), old.get("reason"), old.get("message")) != (
            cur["status"],
            cur["reason"],
            cur["message"],
        ):
            self._post_event(body, "Warning", cur["reason"], cur["message"])

    def _warn_crashes(self, body: dict[str, Any], previous: dict[str, Any], new: dict[str, Any]) -> None:
        """A Warning Event per component that starts crashing, or whose crashes turn out of memory:
        one per episode (as `WorkersHealthy` in `previous` and `new` tells), not one per restart."""
        before = unhealthy_components(previous)
        for component, (reason, message) in unhealthy_parts(new).items():
            was = before.get(component)
            if was is None or (reason in (OOM_KILLED, GPU_OOM, EVICTED) and was != reason):
                self._post_event(body, "Warning", reason, message[:EVENT_MESSAGE_LIMIT])
