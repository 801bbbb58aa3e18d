"""`Autoscaler`: the goodput policy (`autoscaling.policy.decide`) on a timer, per ModelDeployment.

One step (`step`), every `--autoscale-interval` seconds for each ModelDeployment whose spec is valid,
has `autoscaling.enabled` and runs `mode: disaggregated`:

1. read the prefill and decode Deployments: `spec.replicas` is the current size, `readyReplicas`
   how many of them are ready;
2. read one metrics window from Prometheus (`autoscaling.prometheus.fetch_window`, the series of
   this deployment only: `namespace` and `model_deployment`, the labels the chart's monitors
   attach);
3. `decide(window, current, spec, state, now)`;
4. when a pool's desired size differs, merge-patch that Deployment's `spec.replicas`, record the
   decision in `status.autoscaler` (time, sizes, reason, the key inputs) and post a Normal Event.

While autoscaling is active the autoscaler owns the two Deployments' replica counts; the
reconciler only clamps them into [minReplicas, maxReplicas] (see `reconciler.py`).

Prometheus unreachable, a query failing, or no Prometheus configured: every pool holds its size,
the condition `AutoscalerHealthy` turns False (reason `PrometheusUnavailable` or `NoPrometheus`,
the error as message) with one Warning Event per distinct error, and it turns True again on the
first window read. No data for this deployment (or too few finished requests): hold, and
`status.autoscaler.holding` says which pools and why.

Requests the router turns away at its own in-flight limit scale no pool up (more replicas behind a
router at its limit would not be sent more work): when they start, one Warning Event
`RouterAtLimit` says how many and what to raise, and the decision's reason counts them. The episode
is kept in `status.autoscaler.routerAtLimitSince` until a window without them: a restarted operator,
or one whose replicas patch was refused (which drops the policy's memory), posts no second Event.
Requests a pool's workers turn away count as that pool's misses (see `policy`).

A pool whose pods crash is not scaled up: while the reconciler's `WorkersHealthy` condition (in the
status this step reads) names the pool `OOMKilled`, `GPUOutOfMemory`, `Evicted`, `ImagePullBackOff`,
`CreateContainerConfigError` or `CrashLoopBackOff`, its size is the policy's maximum for the step
(it may still shrink), and `status.autoscaler.holding` says so.
Each replica holds a GPU, and one more would crash as its peers do: an OOM kill comes from what each
pod holds (its memory limit against its own in-flight load, which `maxPending` and the engine's
budgets bound, not the pool's size), and under the overload that triggers scale-up every replica
reaches those bounds; a pod evicted for its disk limits is evicted again in any replica (the same
download); a pod that cannot start (its image, a missing Secret) holds its GPU and serves nothing,
as would the next; a crash loop is a broken pod, not too few of them. A single crash that is
running again (`ContainerRestarted`) holds nothing: one fault is no evidence that more replicas
would fail.

The policy's memory (recent recommendations for the scale-down stabilization, the last change per
pool for the cooldown, the burst and outcome history, learned prefill throughput) is kept per
object in this process and saved to `status.autoscaler.memory` with every change and at least every
`MEMORY_SAVE_SECONDS`: a restarted (or newly elected) operator carries on from it, so a restart
neither skips a cooldown nor forgets the bursts it sized prefill for. Its times are wall-clock
seconds (`clock`), which is what lets another process read them (one whose clock differs: see
`PolicyState.rebase`). A memory that cannot be read
(another layout) is ignored with a warning; disabling autoscaling drops it with the rest of
`status.autoscaler`, so a later enable starts afresh.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from . import api
from .autoscaling.policy import (
    AutoscalingSpec,
    MetricsWindow,
    PolicyState,
    Replicas,
    decide,
    holding_reason,
)
from .autoscaling.prometheus import DEFAULT_SCRAPE_INTERVAL_S, PrometheusError, fetch_window, http_query
from .builders import Owner, child_name
from .k8s import ApiError, KubeClient
from .patching import replicas_patch
from .reconciler import AUTOSCALED_ROLES, EventPoster, Reconciler, is_ours, utc_now
from .status import (
    AUTOSCALER_HEALTHY,
    CONFIG_ERROR,
    CRASH_LOOP,
    EVICTED,
    GPU_OOM,
    IMAGE_PULL,
    OOM_KILLED,
    plan_autoscaler_status,
    unhealthy_components,
)
from .validation import plan_spec_errors

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_SECONDS = 15.0
DEFAULT_QUERY_TIMEOUT_SECONDS = 5.0
EVENT_MESSAGE_LIMIT = 1000
MEMORY_SAVE_SECONDS = 60.0  # the policy's memory goes to status at least this often (and at each change)

HEALTHY = "PrometheusReachable"
UNAVAILABLE = "PrometheusUnavailable"
NOT_CONFIGURED = "NoPrometheus"
ROUTER_AT_LIMIT = "RouterAtLimit"
# A pool whose pods crash for one of these is not scaled up (see the module docstring).
NO_SCALE_UP = (OOM_KILLED, GPU_OOM, EVICTED, IMAGE_PULL, CONFIG_ERROR, CRASH_LOOP)


def selector(namespace: str, name: str) -> str:
    """PromQL label matchers of one ModelDeployment's series: the Prometheus Operator sets
    `namespace` from the target, and the chart's monitors relabel app.kubernetes.io/instance to
    `model_deployment` (charts/tandem/templates/_monitoring.tpl)."""

    def quote(v: str) -> str:
        return v.replace("\\", "\\\\").replace('"', '\\"')

    return f'namespace="{quote(namespace)}",model_deployment="{quote(name)}"'


def _round(v: float | None) -> float | None:
    return None if v is None else round(float(v), 4)


def plan_inputs(window: MetricsWindow, current: Replicas) -> dict[str, Any]:
    """The key inputs of a decision, as `status.autoscaler.inputs` (camelCase; unmeasured left out)."""
    counted = window.finished is not None
    inputs = {
        "windowSeconds": _round(window.duration_s),
        "requests": window.finished,
        "met": window.met,
        "missedTtft": window.missed_ttft,
        "missedTpot": window.missed_tpot,
        "failed": window.failed,
        "rejected": window.rejected if counted else None,
        "routerRejected": window.router_limited if counted else None,
        "prefillRejected": window.rejected_by_prefill if counted else None,
        "decodeRejected": window.rejected_by_decode if counted else None,
        "attainment": _round(window.attainment),
        "ttftP90Seconds": _round(window.ttft_p90_s),
        "tpotP90Seconds": _round(window.tpot_p90_s),
        "prefillBacklogTokens": _round(window.prefill_backlog_tokens),
        "decodeKvUsage": _round(window.decode_kv_usage),
        "prefillReplicas": current.prefill,
        "prefillReady": current.ready("prefill"),
        "decodeReplicas": current.decode,
        "decodeReady": current.ready("decode"),
    }
    return {k: v for k, v in inputs.items() if v is not None}


def event_reason(changes: dict[str, tuple[int, int]]) -> str:
    ups = [new > old for old, new in changes.values()]
    if all(ups):
        return "ScaledUp"
    if not any(ups):
        return "ScaledDown"
    return "Scaled"


def hold_crashing(
    aspec: AutoscalingSpec, current: Replicas, status: dict[str, Any]
) -> tuple[AutoscalingSpec, str]:
    """`aspec` with the maximum of each pool whose pods crash (`NO_SCALE_UP`, as `WorkersHealthy`
    in `status` says) lowered to its current size, and what that holds ("" when nothing)."""
    held: list[str] = []
    for role, reason in unhealthy_components(status).items():
        if role not in AUTOSCALED_ROLES or reason not in NO_SCALE_UP:
            continue
        lo, hi = aspec.bounds(role)
        cap = min(hi, max(current.get(role), lo))
        if cap < hi:
            aspec = dataclasses.replace(aspec, **{f"{role}_max_replicas": cap})
        held.append(f"{role} is not scaled up while its pods crash ({reason}, see WorkersHealthy)")
    return aspec, "; ".join(held)


class Autoscaler:
    """Runs one policy step per call of `step`; keeps a `PolicyState` per object (by uid) in memory."""

    def __init__(
        self,
        client: KubeClient,
        reconciler: Reconciler,
        post_event: EventPoster,
        prometheus_url: str,
        now: Callable[[], str] = utc_now,
        clock: Callable[[], float] = time.time,
        query_timeout_s: float = DEFAULT_QUERY_TIMEOUT_SECONDS,
        scrape_interval_s: float = DEFAULT_SCRAPE_INTERVAL_S,
    ) -> None:
        self._client = client
        self._reconciler = reconciler
        self._post_event = post_event
        self._url = prometheus_url.strip()
        self._now = now
        self._clock = clock
        self._timeout = query_timeout_s
        self._scrape_interval = scrape_interval_s
        self._states: dict[str, PolicyState] = {}
        self._saved: dict[str, float] = {}  # uid -> clock time the memory was last written to status
        self._written: dict[str, str] = {}  # uid -> the memory this process last put in a status patch
        # uid -> since when the router turns requests away at its own limit (as in status): kept
        # here too for a step whose status write does not happen (a refused replicas patch).
        self._router_limited: dict[str, str] = {}

    def forget(self, uid: str) -> None:
        """Drop all this process keeps of the object (deleted, or autoscaling disabled)."""
        self._forget_policy(uid)
        self._router_limited.pop(uid, None)

    def _forget_policy(self, uid: str) -> None:
        self._states.pop(uid, None)
        self._saved.pop(uid, None)
        self._written.pop(uid, None)

    def _state(self, body: dict[str, Any], uid: str) -> PolicyState:
        """This object's policy memory: in this process, unless another operator saved one since
        (peering handed the object to another replica and back: its memory is the newer, and ours
        would skip the cooldown of its changes); else as the last operator saved it."""
        saved = ((body.get("status") or {}).get("autoscaler") or {}).get("memory")
        state = self._states.get(uid)
        if state is not None and (not saved or saved == self._written.get(uid)):
            return state
        state = PolicyState()
        if saved:
            meta = body["metadata"]
            try:
                state = PolicyState.from_json(saved)
                log.info(
                    "%s/%s: carrying on from the autoscaler memory in status", meta["namespace"], meta["name"]
                )
            except ValueError as e:
                log.warning(
                    "%s/%s: autoscaler memory in status unreadable (%s): starting afresh",
                    meta["namespace"],
                    meta["name"],
                    e,
                )
        self._states[uid] = state
        return state

    async def step(self, namespace: str, name: str) -> None:
        """One step. Prometheus is read outside the object's lock (a slow or hanging Prometheus
        does not hold up reconcile passes); the decision and its writes happen under it, from a
        fresh read of the object and its Deployments."""
        c = self._client
        body = await c.get(api.API_VERSION, api.KIND, namespace, name)
        aspec = self._autoscaling_spec(body)
        if body is None or aspec is None:
            return
        window: MetricsWindow | None = None
        failure = ""
        if self._url:
            try:
                window = await asyncio.to_thread(
                    fetch_window,
                    http_query(self._url, timeout_s=self._timeout),
                    aspec.window_seconds,
                    selector(namespace, name),
                    scrape_interval_s=self._scrape_interval,
                )
            except PrometheusError as e:
                failure = str(e)
                log.warning("%s/%s: Prometheus: %s: holding", namespace, name, e)
        async with self._reconciler.lock(namespace, name):
            body = await c.get(api.API_VERSION, api.KIND, namespace, name)
            aspec = self._autoscaling_spec(body)
            if body is None or aspec is None:
                return
            if not self._url:
                message = "the operator has no --prometheus-url (TANDEM_PROMETHEUS_URL): holding every pool"
                await self._report(body, False, NOT_CONFIGURED, message, {})
            elif window is None:
                await self._report(body, False, UNAVAILABLE, f"holding every pool at its size: {failure}", {})
            else:
                await self._decide(body, aspec, window)

    def _autoscaling_spec(self, body: dict[str, Any] | None) -> AutoscalingSpec | None:
        """The policy's spec when the autoscaler acts on this object now, else None."""
        if body is None or body["metadata"].get("deletionTimestamp"):
            return None
        meta = body["metadata"]
        spec, errors = plan_spec_errors(meta["name"], body.get("spec") or {})
        if errors or spec is None:
            log.debug("%s/%s: the spec is invalid: holding", meta["namespace"], meta["name"])
            return None
        if not self._reconciler.autoscaled(spec):
            self.forget(meta.get("uid", ""))  # disabled: a later enable starts afresh
            return None
        try:
            return AutoscalingSpec.from_spec(spec.model_dump(by_alias=True, mode="json"))
        except ValueError as e:  # the schema's rules make this unreachable; hold if it is not
            log.warning(
                "%s/%s: autoscaling spec refused by the policy: %s", meta["namespace"], meta["name"], e
            )
            return None

    async def _decide(self, body: dict[str, Any], aspec: AutoscalingSpec, window: MetricsWindow) -> None:
        c = self._client
        owner = Owner.from_body(body)
        namespace, name = owner.namespace, owner.name
        deployments: dict[str, dict[str, Any]] = {}
        for role in AUTOSCALED_ROLES:
            dep = await c.get("apps/v1", "Deployment", namespace, child_name(owner, role))
            if dep is None or not is_ours(dep, owner):
                log.debug("%s/%s: no %s Deployment of ours yet: holding", namespace, name, role)
                return
            deployments[role] = dep

        def size(role: str) -> tuple[int, int]:
            dep = deployments[role]
            ready = (dep.get("status") or {}).get("readyReplicas", 0) or 0
            return int(dep.get("spec", {}).get("replicas", 1)), int(ready)

        (p, p_ready), (d, d_ready) = size("prefill"), size("decode")
        current = Replicas(prefill=p, decode=d, prefill_ready=p_ready, decode_ready=d_ready)
        aspec, held = hold_crashing(aspec, current, body.get("status") or {})
        state = self._state(body, owner.uid)
        now = self._clock()
        decision = decide(window, current, aspec, state, now)
        changes = {
            role: (current.get(role), decision.desired(role))
            for role in AUTOSCALED_ROLES
            if decision.desired(role) != current.get(role)
        }
        holding = "; ".join(x for x in (holding_reason(decision, window), held) if x) or None
        record: dict[str, Any] = {
            "holding": holding,
            "routerAtLimitSince": self._warn_router_limit(body, owner.uid, window),
        }
        if changes:
            for role, (old, new) in changes.items():
                log.info("%s/%s: scaling %s %d -> %d: %s", namespace, name, role, old, new, decision.reason)
                try:
                    await c.patch(
                        "apps/v1",
                        "Deployment",
                        namespace,
                        child_name(owner, role),
                        replicas_patch(deployments[role], new),
                    )
                except ApiError as e:
                    log.warning("%s/%s: scaling %s refused: %s", namespace, name, role, e)
                    # The policy believes it changed: let the next step see the real size afresh.
                    self._forget_policy(owner.uid)
                    return
            reason = f"{decision.reason}; {held}" if held else decision.reason
            record.update(
                lastDecisionTime=self._now(),
                prefill=decision.desired_prefill,
                decode=decision.desired_decode,
                reason=reason,
                inputs=plan_inputs(window, current),
            )
            message = ", ".join(f"{role} {old} -> {new}" for role, (old, new) in changes.items())
            self._post_event(
                body, "Normal", event_reason(changes), f"{message}: {reason}"[:EVENT_MESSAGE_LIMIT]
            )
        if changes or now - self._saved.get(owner.uid, -math.inf) >= MEMORY_SAVE_SECONDS:
            memory = state.to_json()
            if len(memory) <= api.MAX_AUTOSCALER_MEMORY_BYTES:
                record["memory"] = memory
                self._written[owner.uid] = memory
            else:  # the API server would refuse the whole status patch: carry on without saving it
                log.warning(
                    "%s/%s: autoscaler memory of %d bytes is over the %d status can hold: not saved "
                    "(a restarted operator starts afresh); a longer --autoscale-interval keeps it smaller",
                    namespace, name, len(memory), api.MAX_AUTOSCALER_MEMORY_BYTES,
                )  # fmt: skip
            self._saved[owner.uid] = now
        await self._report(body, True, HEALTHY, f"reading metrics from {self._url}", record)

    def _warn_router_limit(self, body: dict[str, Any], uid: str, window: MetricsWindow) -> str | None:
        """One Warning Event when the router starts turning requests away at its own limit (not one
        per step while it goes on): the policy scales no pool up for them, so without it a router
        that is the bottleneck would show only as misses in the dashboard's outcomes. Returns since
        when it has (`status.autoscaler.routerAtLimitSince`), None when it does not.

        The episode is read back from status: kopf posts every Event as a new object (the API server
        aggregates nothing), so an Event per operator restart, or per step while the replicas patch
        is refused, would each be another Warning."""
        saved = ((body.get("status") or {}).get("autoscaler") or {}).get("routerAtLimitSince")
        since = self._router_limited.get(uid) or saved
        if window.finished is None:  # no outcome counts: nothing known either way
            return since
        n = window.router_limited
        if not n:
            self._router_limited.pop(uid, None)
            return None
        if since is not None:
            self._router_limited[uid] = since
            return since
        since = self._router_limited[uid] = self._now()
        meta = body["metadata"]
        message = (
            f"{n} of {window.finished} requests in the last {window.duration_s:.0f}s were turned away at "
            "the router's own in-flight limit: no pool is scaled up for them. If the pools have room, the "
            "router is the bottleneck: raise spec.router.maxInFlight (per router pod) or spec.router.replicas"
        )
        log.warning("%s/%s: %s", meta["namespace"], meta["name"], message)
        self._post_event(body, "Warning", ROUTER_AT_LIMIT, message[:EVENT_MESSAGE_LIMIT])
        return since

    async def _report(
        self, body: dict[str, Any], healthy: bool, reason: str, message: str, record: dict[str, Any]
    ) -> None:
        """Write the condition and `record` into status when they changed; warn once per new problem."""
        meta = body["metadata"]
        previous = body.get("status") or {}
        patch = plan_autoscaler_status(
            previous,
            healthy=healthy,
            reason=reason,
            message=message,
            autoscaler=record,
            generation=int(meta.get("generation", 0)),
            now=self._now(),
        )
        if patch is None:
            return
        await self._client.patch(
            api.API_VERSION, api.KIND, meta["namespace"], meta["name"], patch, subresource="status"
        )
        if healthy:
            return
        old = next(
            (x for x in previous.get("conditions", []) or [] if x.get("type") == AUTOSCALER_HEALTHY), {}
        )
        if (old.get("status"), old.get("reason"), old.get("message")) != ("False", reason, message):
            self._post_event(body, "Warning", reason, message)
