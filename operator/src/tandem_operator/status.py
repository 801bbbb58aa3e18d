"""`plan_status`: the ModelDeployment's status from what its children really report. Pure.

Status parts:
- `observedGeneration`: the metadata.generation this status was computed for.
- `conditions` (each with reason, message, observedGeneration and lastTransitionTime, which moves
  only when the condition's status changes):
  - `SpecValid`: True when the spec passed every check; False names the first failed check's reason
    (the children of an earlier valid spec are left running).
  - `Ready`: True when requests can be served: the router Service is ours and the router and
    every worker role have a ready pod (during a mode switch: the pools the router routes to, the
    old mode's until the new mode's are all ready, then either while the router rolls out).
  - `Progressing`: True while a workload is being created or rolled to its current template, or
    while a mode switch keeps the old mode's pools (reason `ModeSwitch`, see `ModeSwitch`); False
    with `SpecInvalid` when this generation is invalid (the workloads run the last valid spec).
  - `Degraded`: True when the API server refused a child (`ApplyFailed`: invalid or forbidden),
    a child's name is taken by an object this deployment does not own (`NameConflict`), a
    rolled-out workload has fewer ready pods than desired (`ReplicasUnavailable`), or Kubernetes
    reports it stuck (`ReplicaFailure`, `ProgressDeadlineExceeded`).
- `prefill`/`decode`/`colocated`/`router`: desired, ready and updated replicas of each Deployment
  (`summary` is "ready/desired" for `kubectl get`). Created is not ready: readiness comes from the
  Deployment's own status, which the pods' readiness probes drive.
- `endpoint`: host:port of the router Service's gRPC port (the load balancer's address once it has one).
- `WorkersHealthy` (per component, from a labelled list of the object's pods, see `observe_pods`):
  False while a container of a pool's (or the router's) pods has crashed and not yet run
  `STABLE_SECONDS` since, with the worst reason of all of them: `OOMKilled` (the kernel killed it
  at its memory limit), `GPUOutOfMemory`, `Evicted` (a pod the kubelet evicted that long ago or
  less: see `EVICTED`), `CrashLoopBackOff` (the kubelet holds it back, or it crashed again before
  running `STABLE_SECONDS` since a restart), `ContainerRestarted` (one crash, running again); and
  containers that cannot start: `ImagePullBackOff` (the image cannot be pulled: also ErrImagePull,
  InvalidImageName) and `CreateContainerConfigError` (a Secret or ConfigMap it names is missing); the
  message has one `<component>: <reason>: ...` part per such component (how many of its pods, their
  restarts, the last termination, what to change). True (`Stable`) once every container has run
  that long since its last crash; Unknown (`PodsUnreadable`) when the pods cannot be listed (a list
  that failed for a passing reason keeps the last view: `plan_status`'s `pods_transient`).
  Kubernetes' own status of the pods says this only pod by pod; the Deployment's says only that
  fewer are ready.
- `autoscaler` and the condition `AutoscalerHealthy` (False: Prometheus cannot be queried, so every
  pool holds its size): written by the autoscaler (`plan_autoscaler_status`), carried over
  unchanged by the reconciler's passes while autoscaling is active, and removed by them when it
  is not; False with reason `AutoscalerOff`, by the reconciler, when the spec enables autoscaling
  but the operator runs without an autoscaler.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

READY = "Ready"
PROGRESSING = "Progressing"
DEGRADED = "Degraded"
SPEC_VALID = "SpecValid"
AUTOSCALER_HEALTHY = "AutoscalerHealthy"
WORKERS_HEALTHY = "WorkersHealthy"
CONDITION_TYPES = (READY, PROGRESSING, DEGRADED, SPEC_VALID, WORKERS_HEALTHY)

WORKER_ROLES = ("prefill", "decode", "colocated")

# A container that has run this long since its last crash is stable again: the kubelet resets its
# crash back-off after the same 10 minutes.
STABLE_SECONDS = 600.0
STABLE_MINUTES = f"{STABLE_SECONDS / 60:.0f}"
OOM_KILLED = "OOMKilled"
# A container that died of a CUDA out-of-memory error (torch raises it; the engine loop dies and the
# worker exits 1): read from its termination message, its log's tail (FallbackToLogsOnError). The
# caching allocator says "CUDA out of memory" (torch.OutOfMemoryError); a cudaMalloc outside it (a
# library's workspace, a CUDA context) fails as "CUDA error: out of memory" (a plain RuntimeError).
GPU_OOM = "GPUOutOfMemory"
GPU_OOM_MARKERS = ("CUDA out of memory", "OutOfMemoryError", "CUDA error: out of memory")
# A pod the kubelet evicted: over its ephemeral-storage limit or an emptyDir's sizeLimit (the model's
# download and conversion outgrew `model.storageSize`), or its node ran short. The pod is Failed, no
# container restarts, and the ReplicaSet's replacement downloads again, to be evicted alike.
EVICTED = "Evicted"
CRASH_LOOP = "CrashLoopBackOff"
RESTARTED = "ContainerRestarted"
# Containers that cannot start at all, whatever the pool's size: the image cannot be pulled (a wrong
# `image`, a private registry without `imagePullSecrets`), or what the container references is
# missing (a Secret or ConfigMap of its env). The kubelet's waiting reasons, as `kubectl get pods`
# shows them; each group is reported under its first.
IMAGE_PULL = "ImagePullBackOff"
IMAGE_PULL_WAITING = (IMAGE_PULL, "ErrImagePull", "InvalidImageName", "ErrImageNeverPull")
CONFIG_ERROR = "CreateContainerConfigError"
CONFIG_ERROR_WAITING = (CONFIG_ERROR, "CreateContainerError")
# Worst first: the condition's reason is the worst of its components'.
CRASH_REASONS = (OOM_KILLED, GPU_OOM, EVICTED, IMAGE_PULL, CONFIG_ERROR, CRASH_LOOP, RESTARTED)
CANNOT_START_WAITING = IMAGE_PULL_WAITING + CONFIG_ERROR_WAITING  # containers that never start


@dataclass(frozen=True)
class Workload:
    """What one Deployment reports (None fields: not created yet)."""

    desired: int
    ready: int
    updated: int
    rolled_out: bool
    stuck_reason: str | None  # ReplicaFailure / ProgressDeadlineExceeded
    # Its rollout starts a new pod before stopping an old one (maxSurge above 0): only then does a
    # rollout wait for a spare GPU.
    surges: bool = True


@dataclass(frozen=True)
class ModeSwitch:
    """A mode switch in progress: the old mode's pools (`kept`) still run, and the router still routes
    to them, until the new mode's pools (`new`) have all their replicas ready (`pools_ready`) and the
    router has rolled out to them."""

    kept: tuple[str, ...]
    new: tuple[str, ...]
    pools_ready: bool

    def message(self) -> str:
        kept, new = ", ".join(self.kept), ", ".join(self.new)
        if not self.pools_ready:
            return f"mode switch: keeping {kept} until {new} are ready"
        return f"mode switch: keeping {kept} until the router has rolled out to {new}"


@dataclass(frozen=True)
class Crash:
    """One container of a pod that has crashed and not yet run `STABLE_SECONDS` since."""

    pod: str
    container: str
    restarts: int
    reason: str  # of its last termination (OOMKilled, Error, ...); "" when the kubelet no longer says
    exit_code: int | None
    finished_at: str  # when it last terminated (RFC 3339); "" when unknown
    waiting: str  # why it is not running now (CrashLoopBackOff, ...); "" when it runs
    gpu_oom: bool = False  # its termination message shows a CUDA out-of-memory error
    # It crashed more than once in this episode: restarted more than once, and the run that ended
    # did not last `STABLE_SECONDS` (`restarts` counts the pod's whole life, weeks of it).
    repeated: bool = False
    # The kubelet's message when the whole pod was evicted (`container` is then ""), else None.
    eviction: str | None = None
    # The kubelet's message for a container that cannot start (IMAGE_PULL_WAITING,
    # CONFIG_ERROR_WAITING), else "".
    cannot_start: str = ""


@dataclass(frozen=True)
class PoolPods:
    """The pods of one component (a pool or the router) and those of their containers that crashed."""

    pods: int
    crashes: tuple[Crash, ...] = ()
    # Pods the scheduler cannot place: (pod, the scheduler's message: "0/3 nodes are available: 3
    # Insufficient nvidia.com/gpu. ..."), which says why a rollout or a scale-up waits.
    unschedulable: tuple[tuple[str, str], ...] = ()

    def pending_detail(self, component: str, rolling_out: bool) -> str:
        """ " (pod x unschedulable: <why>)" for the first such pod, with what to set when a rollout
        waits for a GPU no node has spare; "" when every pod is placed."""
        if not self.unschedulable:
            return ""
        pod, why = self.unschedulable[0]
        more = f" and {len(self.unschedulable) - 1} more" if len(self.unschedulable) > 1 else ""
        hint = ""
        if rolling_out and component != "router" and "nvidia.com/gpu" in why:
            hint = f": with no spare GPU, set spec.{component}.rollout.maxSurge: 0"
        return f" (pod {pod}{more} unschedulable: {why.strip().rstrip('.')}{hint})"

    @property
    def reason(self) -> str | None:
        """OOMKilled, GPUOutOfMemory, Evicted, ImagePullBackOff, CreateContainerConfigError,
        CrashLoopBackOff or ContainerRestarted (None: every container is stable and runs, and no pod
        was evicted)."""
        if not self.crashes:
            return None
        if any(c.reason == OOM_KILLED for c in self.crashes):
            return OOM_KILLED
        if any(c.gpu_oom for c in self.crashes):
            return GPU_OOM
        if any(c.eviction is not None for c in self.crashes):
            return EVICTED
        if any(c.waiting in IMAGE_PULL_WAITING for c in self.crashes):
            return IMAGE_PULL
        if any(c.waiting in CONFIG_ERROR_WAITING for c in self.crashes):
            return CONFIG_ERROR
        if any(c.waiting == CRASH_LOOP or c.repeated for c in self.crashes):
            return CRASH_LOOP
        return RESTARTED

    def message(self, component: str) -> str:
        """`<component>: <reason>: ...`, free of "; " (the condition joins components with it)."""
        reason = self.reason
        if reason in (IMAGE_PULL, CONFIG_ERROR):
            return self._cannot_start_message(component, reason)
        # A container that never ran and cannot start, beside worse ones, is named as such, not
        # counted among those that crashed nor taken for the last crash.
        stuck = [
            c
            for c in self.crashes
            if c.eviction is None
            and c.waiting in CANNOT_START_WAITING
            and not c.reason
            and c.exit_code is None
        ]
        ran = [c for c in self.crashes if c not in stuck]
        crashed = {c.pod for c in ran if c.eviction is None}
        evicted = {c.pod for c in ran if c.eviction is not None}
        restarts = sum(c.restarts for c in ran)
        last = max(ran, key=lambda c: c.finished_at)
        at = f" at {last.finished_at}" if last.finished_at else ""
        counts = [f"{len(crashed)} of {self.pods} pods crashed"] if crashed else []
        if evicted:
            counts.append(f"{len(evicted)} pod{'' if len(evicted) == 1 else 's'} evicted")
        if stuck:
            n = len({c.pod for c in stuck} - crashed - evicted)
            if n:
                its = "its" if n == 1 else "their"
                counts.append(f"{n} cannot start {its} containers ({stuck[0].waiting})")
        text = f"{component}: {reason}: {' and '.join(counts)} in the last {STABLE_MINUTES} minutes"
        if crashed:
            text += f" ({restarts} restarts in all)"
        if last.eviction is not None:
            text += f", the last: pod {last.pod} evicted{at}: {last.eviction}"
        else:
            how = last.reason or "terminated"
            if last.exit_code is not None:
                how += f" (exit code {last.exit_code})"
            now = f", now {last.waiting}" if last.waiting else ""
            text += f", the last: pod {last.pod} container {last.container} {how}{at}{now}"
        if reason == OOM_KILLED:
            if component == "router":
                hint = "raise spec.router.memory (each pod's memory limit) or lower spec.router.maxInFlight"
            else:
                hint = (
                    f"raise spec.{component}.memory (each pod's memory limit) or lower each pod's load: "
                    f"spec.{component}.maxPending, maxNumBatchedTokens (and kvCacheBytes where the KV "
                    "cache is in host memory, gpus: 0)"
                )
        elif reason == GPU_OOM:
            hint = (
                f"lower spec.{component}.kvCacheBytes (the KV cache's share of GPU memory) or "
                f"maxNumBatchedTokens (a step's activations), or use a GPU with more memory"
            )
        elif reason == EVICTED:
            if any(_over_disk_limit(c.eviction) for c in self.crashes):
                hint = (
                    "raise spec.model.storageSize (each pod's disk: the model's download and its "
                    "conversion, the URI adapters), or use nodes with more free disk"
                )
            else:
                hint = f"its node ran short: see kubectl describe pod {last.pod}"
        else:
            hint = f"see kubectl logs {last.pod} -c {last.container} --previous"
        return f"{text}: {hint}".replace(";", ",")

    def _cannot_start_message(self, component: str, reason: str) -> str:
        waiting = IMAGE_PULL_WAITING if reason == IMAGE_PULL else CONFIG_ERROR_WAITING
        stuck = [c for c in self.crashes if c.waiting in waiting]
        pods = len({c.pod for c in stuck})
        first = stuck[0]
        why = " ".join(first.cannot_start.split()).rstrip(".")
        text = (
            f"{component}: {reason}: {pods} of {self.pods} pods cannot start their containers, the first:"
            f" pod {first.pod} container {first.container} {first.waiting}" + (f": {why}" if why else "")
        )
        if reason == IMAGE_PULL:
            hint = "check spec.image (spec.model.fetchImage: the download's) and spec.imagePullSecrets"
        else:
            hint = f"a Secret or ConfigMap its env names is missing: see kubectl describe pod {first.pod}"
        return f"{text}: {hint}".replace(";", ",")


# The kubelet's words when it evicts a pod for its own disk limits: "Usage of EmptyDir volume "model"
# exceeds the limit "40Gi"", "Pod ephemeral local storage usage exceeds the total limit of containers
# 42Gi", "Container worker exceeded its local ephemeral storage limit "42Gi"" (a node short of disk
# for other reasons says "The node was low on resource: ephemeral-storage").
_DISK_LIMIT_MARKERS = ("emptydir volume", "ephemeral local storage", "local ephemeral storage")


def _over_disk_limit(eviction: str | None) -> bool:
    return eviction is not None and any(m in eviction.lower() for m in _DISK_LIMIT_MARKERS)


def _time(value: str | None) -> datetime.datetime | None:
    if not value:
        return None
    try:
        return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _crash(pod: str, cs: dict[str, Any], now: datetime.datetime | None) -> Crash | None:
    """The container's crash if it has not run stably since, else None."""
    state = cs.get("state") or {}
    restarts = int(cs.get("restartCount") or 0)
    waiting = state.get("waiting") or {}
    if waiting.get("reason") in CANNOT_START_WAITING:
        return Crash(
            pod=pod,
            container=str(cs.get("name", "")),
            restarts=restarts,
            reason="",
            exit_code=None,
            finished_at="",
            waiting=str(waiting["reason"]),
            cannot_start=str(waiting.get("message") or ""),
        )
    terminated = state.get("terminated")
    if terminated:
        if terminated.get("exitCode") == 0:
            return None  # finished (an init container that completed)
        last = terminated  # dead, not restarted yet
    else:
        if restarts == 0:
            return None
        started = _time((state.get("running") or {}).get("startedAt"))
        if started is not None and now is not None and (now - started).total_seconds() >= STABLE_SECONDS:
            return None
        last = (cs.get("lastState") or {}).get("terminated") or {}
    code = last.get("exitCode")
    began, ended = _time(last.get("startedAt")), _time(last.get("finishedAt"))
    # A run of STABLE_SECONDS before this crash ended any earlier episode (the kubelet resets its
    # back-off then too): one crash of a pod that also crashed last week is no crash loop.
    ran_stably = began is not None and ended is not None and (ended - began).total_seconds() >= STABLE_SECONDS
    return Crash(
        pod=pod,
        container=str(cs.get("name", "")),
        restarts=restarts,
        reason=str(last.get("reason") or ""),
        exit_code=code if isinstance(code, int) else None,
        finished_at=str(last.get("finishedAt") or ""),
        waiting=str((state.get("waiting") or {}).get("reason") or ""),
        gpu_oom=any(m in str(last.get("message") or "") for m in GPU_OOM_MARKERS),
        repeated=restarts > 1 and not ran_stably,
    )


def _eviction(pod: str, st: dict[str, Any], now: datetime.datetime | None) -> Crash | None:
    """The pod's eviction by the kubelet if it came less than `STABLE_SECONDS` before `now`, else None.
    When: the latest of its conditions' transitions and its containers' terminations (a pod's status
    has no time of its own for it)."""
    if st.get("phase") != "Failed" or st.get("reason") != EVICTED or now is None:
        return None
    stamps = [c.get("lastTransitionTime") for c in st.get("conditions") or []]
    for cs in (st.get("initContainerStatuses") or []) + (st.get("containerStatuses") or []):
        stamps.append(((cs.get("state") or {}).get("terminated") or {}).get("finishedAt"))
    known = [(t, str(raw)) for raw in stamps if (t := _time(raw)) is not None]
    if not known:
        return None  # when is unknown: most likely long ago (evicted pods stay until deleted)
    when, raw = max(known)
    if (now - when).total_seconds() >= STABLE_SECONDS:
        return None
    message = " ".join(str(st.get("message") or "").split()).rstrip(".")
    return Crash(
        pod=pod,
        container="",
        restarts=0,
        reason=EVICTED,
        exit_code=None,
        finished_at=raw,
        waiting="",
        eviction=message or "evicted",
    )


def observe_pods(pods: list[dict[str, Any]], components: Any, now: str) -> dict[str, PoolPods]:
    """Each of `components` (by the pods' `app.kubernetes.io/component` label; others are ignored):
    how many pods it has, which of their containers crashed less than `STABLE_SECONDS` before `now`,
    and which of its pods the kubelet evicted in that time. Pods being deleted, or done
    (Succeeded/Failed), are not counted among its pods (their replacements are); a recent eviction
    is reported, though: the replacement of a pod evicted for its disk limits is evicted alike."""
    at = _time(now)
    found: dict[str, list[Crash]] = {c: [] for c in components}
    pending: dict[str, list[tuple[str, str]]] = {c: [] for c in components}
    counts = dict.fromkeys(components, 0)
    for p in pods:
        meta = p.get("metadata") or {}
        component = (meta.get("labels") or {}).get("app.kubernetes.io/component")
        st = p.get("status") or {}
        if component not in found or meta.get("deletionTimestamp"):
            continue
        if st.get("phase") in ("Succeeded", "Failed"):
            eviction = _eviction(str(meta.get("name", "")), st, at)
            if eviction is not None:
                found[component].append(eviction)
            continue
        counts[component] += 1
        for c in st.get("conditions") or []:
            if (
                c.get("type") == "PodScheduled"
                and c.get("status") == "False"
                and c.get("reason") == "Unschedulable"
            ):
                pending[component].append((str(meta.get("name", "")), str(c.get("message") or "")))
        for cs in (st.get("initContainerStatuses") or []) + (st.get("containerStatuses") or []):
            crash = _crash(str(meta.get("name", "")), cs, at)
            if crash is not None:
                found[component].append(crash)
    return {
        c: PoolPods(pods=counts[c], crashes=tuple(found[c]), unschedulable=tuple(sorted(pending[c])))
        for c in found
    }


def unhealthy_parts(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Component -> (crash reason, its part of the message), as the `WorkersHealthy` condition in
    `status` reports them (one `<component>: <reason>: ...` part per component, joined by "; ")."""
    cond = next((c for c in status.get("conditions", []) or [] if c.get("type") == WORKERS_HEALTHY), None)
    if cond is None or cond.get("status") != "False":
        return {}
    out: dict[str, tuple[str, str]] = {}
    for part in str(cond.get("message", "")).split("; "):
        component, _, rest = part.partition(": ")
        reason = rest.partition(": ")[0]
        if reason in CRASH_REASONS:
            out[component] = (reason, part)
    return out


def unhealthy_components(status: dict[str, Any]) -> dict[str, str]:
    """Component -> crash reason, as the `WorkersHealthy` condition in `status` reports them."""
    return {component: reason for component, (reason, _) in unhealthy_parts(status).items()}


def plan_workers_condition(
    pods: dict[str, PoolPods] | None, unreadable: str, cond: Any, kept: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """The `WorkersHealthy` condition (None: the pods were not read). `cond(ok, reason, message)`.
    `kept`: the previous condition, which stands when the pods could not be read this time."""
    if unreadable:
        if kept is not None:
            return kept
        return cond(None, "PodsUnreadable", f"cannot list the pods: {unreadable}")
    if pods is None:
        return None
    bad = {c: p for c, p in pods.items() if p.reason is not None}
    if not bad:
        names = ", ".join(pods) or "no component"
        message = f"no container of {names} has crashed in the last {STABLE_MINUTES} minutes"
        return cond(True, "Stable", message)
    worst = min((p.reason for p in bad.values()), key=lambda r: CRASH_REASONS.index(r or ""))
    return cond(False, worst, "; ".join(p.message(c) for c, p in bad.items()))


def observe_deployment(live: dict[str, Any] | None, desired: int | None = None) -> Workload:
    """Read a live Deployment (None: missing) the way `kubectl rollout status` does."""
    if live is None:
        return Workload(desired=desired or 0, ready=0, updated=0, rolled_out=False, stuck_reason=None)
    spec_replicas = int(live.get("spec", {}).get("replicas", 1))
    want = spec_replicas if desired is None else desired
    st = live.get("status", {}) or {}
    generation = int(live.get("metadata", {}).get("generation", 0))
    observed = int(st.get("observedGeneration", 0))
    updated = int(st.get("updatedReplicas", 0))
    total = int(st.get("replicas", 0))
    available = int(st.get("availableReplicas", 0))
    conditions = st.get("conditions", []) or []
    # The Deployment controller says "NewReplicaSetAvailable" once a rollout completed; pods that
    # fail later do not reopen the rollout (that is Degraded, not Progressing).
    completed = any(
        c.get("type") == "Progressing" and c.get("reason") == "NewReplicaSetAvailable" for c in conditions
    )
    rolled_out = (
        observed >= generation
        and spec_replicas == want
        and updated >= want
        and total == updated
        and (available >= updated or completed)
    )
    stuck = None
    for c in conditions:
        if c.get("type") == "ReplicaFailure" and c.get("status") == "True":
            stuck = "ReplicaFailure"
        if c.get("type") == "Progressing" and c.get("reason") == "ProgressDeadlineExceeded":
            stuck = "ProgressDeadlineExceeded"
    strategy = (live.get("spec") or {}).get("strategy") or {}
    rolling = strategy.get("rollingUpdate") or {}
    return Workload(
        desired=want,
        ready=int(st.get("readyReplicas", 0)),
        updated=updated,
        rolled_out=rolled_out,
        stuck_reason=stuck,
        surges=strategy.get("type") != "Recreate" and str(rolling.get("maxSurge", "25%")) not in ("0", "0%"),
    )


def plan_condition(
    previous: list[dict[str, Any]],
    type_: str,
    status: bool | None,
    reason: str,
    message: str,
    generation: int,
    now: str,
) -> dict[str, Any]:
    """A condition whose lastTransitionTime moves only when its status changes (None: Unknown)."""
    value = "Unknown" if status is None else "True" if status else "False"
    old = next((c for c in previous if c.get("type") == type_), None)
    since = (
        old["lastTransitionTime"]
        if old and old.get("status") == value and old.get("lastTransitionTime")
        else now
    )
    return {
        "type": type_,
        "status": value,
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": since,
    }


def plan_endpoint(router_service: dict[str, Any] | None) -> str:
    if router_service is None:
        return ""
    meta, spec = router_service["metadata"], router_service.get("spec", {})
    port = next((p["port"] for p in spec.get("ports", []) if p.get("name") == "grpc"), None)
    if port is None:
        return ""
    for ingress in (router_service.get("status", {}).get("loadBalancer", {}) or {}).get("ingress", []) or []:
        host = ingress.get("ip") or ingress.get("hostname")
        if host:
            return f"{host}:{port}"
    return f"{meta['name']}.{meta['namespace']}.svc:{port}"


def plan_status(
    *,
    generation: int,
    spec_errors: list[tuple[str, str]],
    workloads: dict[str, Workload],
    conflicts: list[str] | None = None,
    failures: list[str] | None = None,
    router_service: dict[str, Any] | None,
    previous: dict[str, Any],
    now: str,
    autoscaling: bool = False,
    mode_switch: ModeSwitch | None = None,
    autoscaler_off: bool = False,
    pods: dict[str, PoolPods] | None = None,
    pods_unreadable: str = "",
    pods_transient: bool = False,
) -> dict[str, Any]:
    """The full status. `workloads`: component (role or "router") -> what its Deployment reports
    (during a mode switch, the kept pools too).

    `autoscaling`: the autoscaler is active for this object, so its part of `previous` (the
    `autoscaler` entry and the `AutoscalerHealthy` condition) is kept; otherwise it is dropped.
    `autoscaler_off`: the spec enables autoscaling but this operator runs no autoscaler
    (`--autoscale-interval 0`): `AutoscalerHealthy` is False with reason `AutoscalerOff`.
    `pods`: component -> its pods (`observe_pods`), for `WorkersHealthy` (None: not read, no such
    condition); `pods_unreadable`: why they could not be listed (`WorkersHealthy` Unknown), unless
    `pods_transient` (an API server error or throttling, not a refusal): then a known `WorkersHealthy`
    in `previous` stands, a view one pass old. Unknown would end a crash episode: its Warning would
    be posted again at the next list, and the autoscaler would scale up the crashing pool meanwhile."""
    old = previous.get("conditions", []) or []

    def cond(type_: str, ok: bool | None, reason: str, message: str) -> dict[str, Any]:
        return plan_condition(old, type_, ok, reason, message, generation, now)

    if spec_errors:
        reason = spec_errors[0][0]
        message = "; ".join(m for _, m in spec_errors)
        spec_valid = cond(SPEC_VALID, False, reason, message)
    else:
        spec_valid = cond(SPEC_VALID, True, "Valid", "the spec passed every check")

    def pending(component: str, rolling_out: bool) -> str:
        p = (pods or {}).get(component)
        return p.pending_detail(component, rolling_out) if p is not None else ""

    rolling = sorted(c + pending(c, w.surges) for c, w in workloads.items() if not w.rolled_out)
    if not workloads:
        progressing = cond(PROGRESSING, False, "NoWorkloads", "nothing is deployed")
    elif mode_switch is not None:
        progressing = cond(PROGRESSING, True, "ModeSwitch", mode_switch.message())
    elif rolling:
        progressing = cond(PROGRESSING, True, "RollingOut", f"rolling out: {', '.join(rolling)}")
    elif spec_errors:
        # Nothing of this generation was applied: the workloads run the last valid spec.
        progressing = cond(PROGRESSING, False, "SpecInvalid", "the workloads run the last valid spec")
    else:
        progressing = cond(PROGRESSING, False, "RolloutComplete", "every workload runs the current spec")

    stuck = sorted(
        f"{c} ({w.stuck_reason}){pending(c, w.surges)}" for c, w in workloads.items() if w.stuck_reason
    )
    short = sorted(
        f"{c} {w.ready}/{w.desired}{pending(c, False)}"
        for c, w in workloads.items()
        if w.rolled_out and w.ready < w.desired
    )
    if failures:
        degraded = cond(DEGRADED, True, "ApplyFailed", "; ".join(failures))
    elif conflicts:
        degraded = cond(
            DEGRADED, True, "NameConflict", f"not ours, left alone: {', '.join(sorted(conflicts))}"
        )
    elif stuck:
        first = next(w.stuck_reason for w in workloads.values() if w.stuck_reason)
        degraded = cond(DEGRADED, True, first or "Stuck", f"stuck: {', '.join(stuck)}")
    elif short:
        degraded = cond(
            DEGRADED, True, "ReplicasUnavailable", f"fewer ready pods than desired: {', '.join(short)}"
        )
    else:
        degraded = cond(DEGRADED, False, "AsExpected", "every rolled-out workload has all its pods ready")

    def unready(components: Any) -> list[str]:
        return sorted(c for c in components if workloads.get(c) is None or workloads[c].ready < 1)

    if mode_switch is None:
        missing = unready([*(c for c in workloads if c in WORKER_ROLES), "router"])
    elif not mode_switch.pools_ready:
        # The router still routes to the old pools only: they must serve.
        missing = sorted(unready(mode_switch.kept) + unready(["router"]))
    else:
        # The router is rolling out from the old pools to the new: either set up is enough.
        kept, new = unready(mode_switch.kept), unready(mode_switch.new)
        missing = sorted((kept + new if kept and new else []) + unready(["router"]))
    if not workloads:
        ready = cond(READY, False, "NoWorkloads", "nothing is deployed")
    elif missing:
        ready = cond(READY, False, "NotServing", f"no ready pod in: {', '.join(missing)}")
    elif router_service is None:
        # Missing, or someone else's Service of that name: clients reach no router of ours.
        ready = cond(READY, False, "EndpointUnavailable", "the router has no Service of ours")
    else:
        ready = cond(READY, True, "Serving", "the router and every worker pool have ready pods")

    conditions = [ready, progressing, degraded, spec_valid]
    kept = next((c for c in old if c.get("type") == WORKERS_HEALTHY), None) if pods_transient else None
    if kept is not None and kept.get("status") not in ("True", "False"):
        kept = None
    workers = plan_workers_condition(
        pods, pods_unreadable, lambda ok, reason, message: cond(WORKERS_HEALTHY, ok, reason, message), kept
    )
    if workers is not None:
        conditions.append(workers)
    status: dict[str, Any] = {
        "observedGeneration": generation,
        "conditions": conditions,
        "endpoint": plan_endpoint(router_service),
    }
    if autoscaling:
        conditions.extend(c for c in old if c.get("type") == AUTOSCALER_HEALTHY)
        if previous.get("autoscaler"):
            status["autoscaler"] = previous["autoscaler"]
    elif autoscaler_off:
        conditions.append(
            cond(
                AUTOSCALER_HEALTHY,
                False,
                "AutoscalerOff",
                "autoscaling is enabled but the operator runs no autoscaler (--autoscale-interval 0): "
                "every pool keeps its spec's replicas",
            )
        )
    for component, w in workloads.items():
        status[component] = {
            "desired": w.desired,
            "ready": w.ready,
            "updated": w.updated,
            "summary": f"{w.ready}/{w.desired}",
        }
    return status


def plan_status_patch(current: dict[str, Any], new: dict[str, Any]) -> dict[str, Any] | None:
    """Merge patch for .status (None: nothing changed). Stale pool entries are removed with null."""
    if all(current.get(k) == v for k, v in new.items()) and set(current) <= set(new) | {"kopf"}:
        return None
    patch: dict[str, Any] = dict(new)
    for key in current:
        if key not in new and key != "kopf":
            patch[key] = None
    return {"status": patch}


def plan_autoscaler_status(
    previous: dict[str, Any],
    *,
    healthy: bool,
    reason: str,
    message: str,
    autoscaler: dict[str, Any],
    generation: int,
    now: str,
) -> dict[str, Any] | None:
    """The autoscaler's merge patch for .status (None: nothing changed).

    Sets the `AutoscalerHealthy` condition (in place, or after the reconciler's conditions) and
    `autoscaler`, whose keys are merged into what is there (a None value removes that key). The
    condition's observedGeneration only moves with a transition, so a new generation alone does
    not make the autoscaler write."""
    old = previous.get("conditions", []) or []
    current = next((c for c in old if c.get("type") == AUTOSCALER_HEALTHY), None)
    if (
        current is not None
        and current.get("status") == ("True" if healthy else "False")
        and (current.get("reason"), current.get("message")) == (reason, message)
    ):
        cond = current
    else:
        cond = plan_condition(old, AUTOSCALER_HEALTHY, healthy, reason, message, generation, now)
    conditions = [cond if c.get("type") == AUTOSCALER_HEALTHY else c for c in old]
    if current is None:
        conditions.append(cond)
    before = previous.get("autoscaler") or {}
    after = {k: v for k, v in {**before, **autoscaler}.items() if v is not None}
    if conditions == old and after == before:
        return None
    patch: dict[str, Any] = {}
    if conditions != old:
        patch["conditions"] = conditions
    if after != before:
        patch["autoscaler"] = _diff(before, after) if after else None
    return {"status": patch}


def _diff(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The merge patch (RFC 7386) that turns `before` into `after`."""
    out: dict[str, Any] = {k: None for k in before if k not in after}
    for k, v in after.items():
        if isinstance(v, dict) and isinstance(before.get(k), dict):
            sub = _diff(before[k], v)
            if sub:
                out[k] = sub
        elif before.get(k) != v:
            out[k] = v
    return out
