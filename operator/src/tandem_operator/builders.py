"""Pure builders: a `ModelDeployment` (its metadata and typed spec) -> the child objects as dicts.

Children of a deployment NAME (namespace NS):

| object | name | what |
|---|---|---|
| ServiceAccount | NAME | pods' identity; no API token mounted (workers never call the API) |
| ConfigMap | NAME-config | engine.json: the settings every pod runs with; adapter-uris.txt: URIs to fetch |
| Deployment + headless Service | NAME-prefill, NAME-decode (or NAME-colocated) | a worker pool |
| PodDisruptionBudget | NAME-<role>, NAME-router | at most one pod of a pool down at a time |
| Deployment + Service | NAME-router | the gRPC endpoint; finds workers through the headless Services |

Every child carries the same labels (`app.kubernetes.io/*`, component = role) and a controller owner
reference to the ModelDeployment, so deleting it deletes them (Kubernetes' garbage collector).
"""

from __future__ import annotations

import hashlib
import json
import shlex
from dataclasses import dataclass
from typing import Any

from . import api
from .placement import PEER_ROLE, build_affinity, build_resources, build_tolerations, build_topology_spread
from .validation import ARCHIVE_SUFFIXES, model_file_name, quantity_bytes

MANAGED_BY = "tandem-operator"
APP_NAME = "tandem"
CONFIG_HASH_ANNOTATION = "tandem.dev/config-hash"
MODEL_MOUNT = "/models"
CACHE_MOUNT = "/var/cache/tandem"
CONFIG_MOUNT = "/etc/tandem"
ADAPTER_MOUNT = "/adapters"  # adapters fetched from URIs by an init container (an emptyDir)
# The root filesystem is read-only: /tmp is an emptyDir (Triton compiles its kernels' C launchers
# there, and the C++ op builds there, both through tempfile), and HOME is the cache volume, so what
# defaults to ~ (Triton's ~/.triton, the CUDA driver's JIT cache ~/.nv, ~/.cache) is written there
# instead of failing on the image's read-only /home/tandem.
TMP_MOUNT = "/tmp"
TMP_SIZE_BYTES = 1 << 30
_TMP_MOUNT = {"name": "tmp", "mountPath": TMP_MOUNT}
# What the cache volume holds beside the model's conversion: compiled kernels (Triton's, the C++
# op's, the CUDA driver's JIT cache of PTX it had to compile: little, torch ships machine code).
KERNEL_CACHE_BYTES = 1 << 30
# `model.storageSize` unset: a model downloaded or converted in the pod (an 8B model takes about 35 GB:
# a 16 GB archive beside its unpacked folder, or a 4.9 GB 4-bit GGUF file and its float32 conversion),
# or one that is not (the built-in model converts to 0.5 GB; a PVC's folder is read in place).
LARGE_MODEL_STORAGE = "40Gi"
SMALL_MODEL_STORAGE = "1Gi"
# A Deployment is reported stuck (ProgressDeadlineExceeded) this long after a worker's startup
# budget: the model's download by the init container comes before the startup probe starts.
PROGRESS_MARGIN_SECONDS = 300
STARTUP_PROBE_PERIOD_SECONDS = 5
# A deleted pod leaves its Service's endpoints asynchronously: kube-proxy on every node and any cloud
# load balancer keep sending new connections to it for a few seconds after the kubelet's SIGTERM. The
# router closes its listeners at SIGTERM, so it first sleeps this long (preStop) while still serving.
ROUTER_PRESTOP_SECONDS = 5
# How long the router's in-flight streams get after SIGTERM (router_main.DRAIN_SECONDS; a test compares).
ROUTER_DRAIN_SECONDS = 25
# The grace period runs from the start of preStop: the sleep, then the drain, then a margin.
ROUTER_TERMINATION_GRACE_SECONDS = ROUTER_PRESTOP_SECONDS + ROUTER_DRAIN_SECONDS + 5
# What a worker's grace period keeps beyond its drain: closing the server and the engine.
WORKER_DRAIN_MARGIN_SECONDS = 5
# Set on containers that ask for no GPU. Tandem's CUDA image sets NVIDIA_VISIBLE_DEVICES=all, and on a
# GPU node whose NVIDIA container runtime reads it (the device plugin's default "envvar" strategy) a
# container that requests no nvidia.com/gpu would see every GPU of the node, those allocated to other
# pods included (NVIDIA/k8s-device-plugin#61). "void": the runtime then adds no GPU at all.
NO_GPU_ENV = {"name": "NVIDIA_VISIBLE_DEVICES", "value": "void"}

# (apiVersion, kind) of every child kind, in creation order (identity before config before workloads).
CHILD_KINDS = (
    ("v1", "ServiceAccount"),
    ("v1", "ConfigMap"),
    ("v1", "Service"),
    ("apps/v1", "Deployment"),
    ("policy/v1", "PodDisruptionBudget"),
)
ROLES = ("prefill", "decode", "colocated")


@dataclass(frozen=True)
class Owner:
    """The parts of the ModelDeployment's metadata the builders need."""

    name: str
    namespace: str
    uid: str

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Owner:
        meta = body["metadata"]
        return cls(name=meta["name"], namespace=meta["namespace"], uid=meta.get("uid", ""))


def selector_labels(owner: Owner, component: str) -> dict[str, str]:
    """The labels a workload selects its pods by: never change them (selectors are immutable)."""
    return {
        "app.kubernetes.io/name": APP_NAME,
        "app.kubernetes.io/instance": owner.name,
        "app.kubernetes.io/component": component,
    }


def build_labels(owner: Owner, component: str) -> dict[str, str]:
    return {
        **selector_labels(owner, component),
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "app.kubernetes.io/part-of": APP_NAME,
    }


def build_owner_reference(owner: Owner) -> dict[str, Any]:
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "name": owner.name,
        "uid": owner.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _meta(owner: Owner, name: str, component: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": owner.namespace,
        "labels": build_labels(owner, component),
        "ownerReferences": [build_owner_reference(owner)],
    }


def child_name(owner: Owner, component: str) -> str:
    return f"{owner.name}-{component}"


def config_map_name(owner: Owner) -> str:
    return f"{owner.name}-config"


def service_host(owner: Owner, component: str) -> str:
    return f"{child_name(owner, component)}.{owner.namespace}.svc"


# ------------------------------------------------------------------------------------------ model


def model_argument(spec: api.ModelDeploymentSpec) -> str:
    """What `--model` says inside the pod."""
    m = spec.model
    if m.builtin is not None:
        return m.builtin
    if m.pvc is not None:
        return f"{MODEL_MOUNT}/{m.pvc.path}"
    assert m.uri is not None
    file_name = model_file_name(m.uri)
    if file_name.endswith(ARCHIVE_SUFFIXES):
        return f"{MODEL_MOUNT}/model"
    return f"{MODEL_MOUNT}/{file_name}"


def adapter_path(spec: api.ModelDeploymentSpec, adapter: api.Adapter) -> str:
    """Where a worker finds an adapter's PEFT folder: fetched from a URI, or in the model volume."""
    if "://" in adapter.source:
        return f"{ADAPTER_MOUNT}/{adapter.name}"
    return f"{MODEL_MOUNT}/{adapter.source.lstrip('/')}"


ADAPTER_LIST_KEY = "adapter-uris.txt"  # ConfigMap key: one `NAME URI` line per adapter fetched from a URI

# The fetch-adapters init container's program. It reads the adapter list from the mounted ConfigMap
# rather than having one step per adapter inlined: an inlined script grows with the adapter count and
# passes Linux's 128 KiB limit on one argument (MAX_ARG_STRLEN) at about 400 adapters, and bloats
# every Deployment. Names and URIs are only ever expanded inside double quotes, never evaluated; the
# case checks repeat the operator's validation so a hand-edited list cannot smuggle in a curl option
# or a path outside the volume. Each adapter is downloaded and unpacked under temporary names (which
# no adapter name can take: names start with a letter or digit) and moved into place, so a pod
# restarted mid-fetch never sees a partial adapter and skips those already fetched (an emptyDir
# survives init restarts). The list comes on fd 3 so nothing in the loop can consume it as stdin.
_FETCH_ADAPTERS_SCRIPT = """set -eu
dir={dir}
while read -r name uri <&3; do
  case "$name" in ''|.*|-*|*/*) echo "fetch-adapters: bad adapter name: $name" >&2; exit 1;; esac
  case "$uri" in http://*|https://*) ;; *) echo "fetch-adapters: $name: bad URI: $uri" >&2; exit 1;; esac
  if [ -d "$dir/$name" ]; then continue; fi
  case "$uri" in *.tar.gz|*.tgz|*.tar.gz[?#]*|*.tgz[?#]*) flags=-xzf;; *) flags=-xf;; esac
  curl -fsSL --globoff --retry 5 --retry-delay 2 -o "$dir/.download" "$uri"
  rm -rf "$dir/.unpack"
  mkdir -p "$dir/.unpack"
  tar "$flags" "$dir/.download" -C "$dir/.unpack"
  mv "$dir/.unpack" "$dir/$name"
  rm -f "$dir/.download"
done 3< {list_path}
"""


def fetch_adapters_script(
    adapter_dir: str = ADAPTER_MOUNT, list_path: str = f"{CONFIG_MOUNT}/{ADAPTER_LIST_KEY}"
) -> str:
    """The fetch-adapters init container's `sh -c` program: the same few hundred bytes for any number
    of adapters (the list is `adapter_list(spec)`, read from `list_path`)."""
    return _FETCH_ADAPTERS_SCRIPT.format(dir=shlex.quote(adapter_dir), list_path=shlex.quote(list_path))


def _uri_for_list(uri: str) -> str:
    # The list is split on whitespace, one adapter a line: percent-encode whitespace and control
    # characters, which RFC 3986 does not allow unencoded in a URI anyway (the server sees the same URI).
    return "".join(f"%{ord(c):02X}" if ord(c) <= 0x20 or ord(c) == 0x7F else c for c in uri)


def adapter_list(spec: api.ModelDeploymentSpec) -> str:
    """The `NAME URI` lines (ConfigMap key `ADAPTER_LIST_KEY`) the fetch-adapters init container reads."""
    return "".join(f"{a.name} {_uri_for_list(a.source)}\n" for a in spec.adapters if "://" in a.source)


def _fetches_adapters(spec: api.ModelDeploymentSpec) -> bool:
    return any("://" in a.source for a in spec.adapters)


def fetch_model_script(uri: str, model_dir: str = MODEL_MOUNT) -> str:
    """The fetch-model init container's `sh -c` program. It downloads to a temporary name and moves
    into place, so a pod restarted mid-download never sees a truncated model, and exits at once when
    an earlier init of the same pod (emptyDir kept) already finished."""
    file_name = model_file_name(uri)
    q_uri, q_dir = shlex.quote(uri), shlex.quote(model_dir)
    if file_name.endswith(ARCHIVE_SUFFIXES):
        flags = "-xzf" if file_name.endswith((".tar.gz", ".tgz")) else "-xf"
        return (
            f"set -eu; cd {q_dir}; test -d model && exit 0; "
            f"curl -fsSL --globoff --retry 5 --retry-delay 2 -o .download {q_uri}; "
            f"rm -rf .unpack; mkdir -p .unpack; tar {flags} .download -C .unpack; "
            "mv .unpack model; rm -f .download"
        )
    target = shlex.quote(f"./{file_name}")  # "./": a name like "-x.gguf" is no option to test or mv
    return (
        f"set -eu; cd {q_dir}; test -f {target} && exit 0; "
        f"curl -fsSL --globoff --retry 5 --retry-delay 2 -o .download {q_uri}; mv .download {target}"
    )


def model_storage_bytes(spec: api.ModelDeploymentSpec, component: str) -> int:
    """Local disk for the model in a pod of `component` (a pool's role, or "router"):
    `model.storageSize` (default `LARGE_MODEL_STORAGE`) where the pod downloads or converts the
    model, else `SMALL_MODEL_STORAGE`. The router converts only a GGUF file's config and tokenizer, so
    it keeps a copy only of a `uri` model (its download)."""
    m = spec.model
    if component == "router" and m.uri is None:
        return quantity_bytes(SMALL_MODEL_STORAGE)
    if m.storage_size is not None:
        return quantity_bytes(m.storage_size)
    large = m.uri is not None or (m.pvc is not None and m.pvc.path.lower().endswith(".gguf"))
    return quantity_bytes(LARGE_MODEL_STORAGE if large else SMALL_MODEL_STORAGE)


def pod_storage_bytes(spec: api.ModelDeploymentSpec, component: str) -> int:
    """A pod's ephemeral-storage request and limit: the model, the kernel caches and /tmp (with a
    read-only root filesystem, the containers write nowhere else but their logs)."""
    return model_storage_bytes(spec, component) + KERNEL_CACHE_BYTES + TMP_SIZE_BYTES


def _bytes_quantity(n: int) -> str:
    # Whole GiB or MiB read better in `kubectl describe` than bytes; rounded up, never below the need.
    if n % (1 << 30) == 0:
        return f"{n >> 30}Gi"
    return f"{-(-n // (1 << 20))}Mi"


def _empty_dir(size_bytes: int) -> dict[str, Any]:
    # A sizeLimit gets the pod evicted when the volume outgrows it, before the node's disk fills.
    return {"emptyDir": {"sizeLimit": _bytes_quantity(size_bytes)}}


def _model_volumes(spec: api.ModelDeploymentSpec, adapters: bool, storage: int) -> list[dict[str, Any]]:
    vols: list[dict[str, Any]] = []
    if spec.model.pvc is not None:
        vols.append(
            {
                "name": "model",
                "persistentVolumeClaim": {"claimName": spec.model.pvc.claim_name, "readOnly": True},
            }
        )
    elif spec.model.uri is not None:
        vols.append({"name": "model", **_empty_dir(storage)})
    if adapters and _fetches_adapters(spec):
        vols.append({"name": "adapters", **_empty_dir(storage)})
    return vols


def _model_mounts(spec: api.ModelDeploymentSpec, adapters: bool) -> list[dict[str, Any]]:
    mounts = []
    if spec.model.builtin is None:
        mounts.append({"name": "model", "mountPath": MODEL_MOUNT, "readOnly": True})
    if adapters and _fetches_adapters(spec):
        mounts.append({"name": "adapters", "mountPath": ADAPTER_MOUNT, "readOnly": True})
    return mounts


def _init_env(pod_env: list[api.EnvVar]) -> list[dict[str, Any]]:
    # A download needs the pod's proxy and CA settings (HTTPS_PROXY, NO_PROXY, SSL_CERT_FILE...), so
    # it gets the pod's whole env: a subset would miss the next such variable (CURL_CA_BUNDLE,
    # no_proxy). Only NVIDIA_VISIBLE_DEVICES is ours: an init container never has a GPU allocated.
    own = [{"name": e.name, "value": e.value} for e in pod_env if e.name != NO_GPU_ENV["name"]]
    return [dict(NO_GPU_ENV), *own]


def _fetch_container(
    spec: api.ModelDeploymentSpec,
    name: str,
    what: list[str],
    script: str,
    pod_env: list[api.EnvVar],
    storage: int,
) -> dict[str, Any]:
    """An init container downloading into the pod: by default in the deployment's own image (Python:
    `python -m tandem_worker.fetch WHAT...`), else the `sh` program `script` in `model.fetchImage`.
    `pod_env` is the pod's own env (`pool.env`, `router.env`), `storage` the pod's ephemeral storage
    (the download counts against it: the init's request adds nothing to the pod's)."""
    if spec.model.fetch_image is None:
        image = {"image": spec.image, "imagePullPolicy": spec.image_pull_policy.value}
        command = ["python", "-m", "tandem_worker.fetch", *what]
    else:
        image = {"image": spec.model.fetch_image}
        command = ["sh", "-c", script]
    return {
        "name": name,
        **image,
        "command": command,
        "env": _init_env(pod_env),
        "securityContext": _container_security(),
        "resources": {
            "requests": {"cpu": "100m", "memory": "128Mi", "ephemeral-storage": _bytes_quantity(storage)},
            "limits": {"memory": "512Mi", "ephemeral-storage": _bytes_quantity(storage)},
        },
    }


def _init_containers(
    spec: api.ModelDeploymentSpec, adapters: bool, pod_env: list[api.EnvVar], storage: int
) -> list[dict[str, Any]]:
    """The pod's downloads: the model (workers and the router, which tokenizes) and, with
    `adapters` (workers only: the router learns adapters from the workers), the URI adapters.
    `pod_env` and `storage`: see `_fetch_container`."""
    inits = []
    if spec.model.uri is not None:
        uri = spec.model.uri
        what = ["model", uri, MODEL_MOUNT]
        fetch = _fetch_container(spec, "fetch-model", what, fetch_model_script(uri), pod_env, storage)
        mounts = [{"name": "model", "mountPath": MODEL_MOUNT}, dict(_TMP_MOUNT)]
        inits.append({**fetch, "volumeMounts": mounts})
    if adapters and _fetches_adapters(spec):
        list_path = f"{CONFIG_MOUNT}/{ADAPTER_LIST_KEY}"
        what = ["adapters", list_path, ADAPTER_MOUNT]
        fetch = _fetch_container(spec, "fetch-adapters", what, fetch_adapters_script(), pod_env, storage)
        mounts = [
            {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
            {"name": "adapters", "mountPath": ADAPTER_MOUNT},
            dict(_TMP_MOUNT),
        ]
        inits.append({**fetch, "volumeMounts": mounts})
    return inits


# ----------------------------------------------------------------------------------- config map


def build_engine_config(spec: api.ModelDeploymentSpec) -> dict[str, Any]:
    """engine.json: everything a pod of this deployment is configured with, in one readable file."""
    return {
        "model": model_argument(spec),
        "mode": spec.mode.value,
        "pools": {
            role: {
                "device": "cuda" if pool.gpus > 0 else "cpu",
                "port": pool.port,
                "metricsPort": pool.metrics_port,
                "kvCacheBytes": pool.kv_cache_bytes,
                "maxNumBatchedTokens": pool.max_num_batched_tokens,
                "maxPending": pool.max_pending,
            }
            for role, pool in spec.pools().items()
        },
        "router": {
            "grpcPort": spec.router.grpc_port,
            "metricsPort": spec.router.metrics_port,
            "maxInFlight": spec.router.max_in_flight,
        },
        # The workers register these (`tandem worker --adapters-config`) and load each on first use.
        "adapters": [
            {**a.model_dump(by_alias=True, mode="json"), "path": adapter_path(spec, a)} for a in spec.adapters
        ],
        "slo": spec.slo.model_dump(by_alias=True, mode="json"),
        "autoscaling": spec.autoscaling.model_dump(by_alias=True, mode="json"),
    }


def build_config_map(owner: Owner, spec: api.ModelDeploymentSpec) -> dict[str, Any]:
    data = {"engine.json": json.dumps(build_engine_config(spec), indent=2, sort_keys=True) + "\n"}
    if _fetches_adapters(spec):
        data[ADAPTER_LIST_KEY] = adapter_list(spec)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(owner, config_map_name(owner), "config"),
        "data": data,
    }


def config_reads(config_map: dict[str, Any], component: str) -> dict[str, Any]:
    """The part of the ConfigMap that a pod of `component` (a pool's role, or "router") reads from
    /etc/tandem, keyed by file. Everything else in engine.json (model, mode, pools, router, SLOs,
    autoscaling) reaches the pods as command-line flags, which change the pod template themselves,
    or is read by no pod at all (the autoscaling policy: the operator's autoscaler reads it).

    - Worker process: only with `--adapters-config /etc/tandem/engine.json` (there when the spec has
      adapters), the `name` and `path` of each `adapters` entry (`_read_adapters_config` in
      worker/src/tandem_worker/cli.py).
    - The fetch-adapters init container (worker pods, there when an adapter comes from a URI): all
      of adapter-uris.txt.
    - Router process: nothing (it learns the adapters from the workers)."""
    data = config_map["data"]
    reads: dict[str, Any] = {}
    if component == "router":
        return reads
    if ADAPTER_LIST_KEY in data:
        reads[ADAPTER_LIST_KEY] = data[ADAPTER_LIST_KEY]
    try:
        engine = json.loads(data["engine.json"])
        adapters = [{"name": a["name"], "path": a["path"]} for a in engine.get("adapters") or []]
    except (KeyError, ValueError, TypeError, AttributeError):
        # Not a config these builders wrote: assume the workers read all of it.
        reads["engine.json"] = data.get("engine.json")
    else:
        if adapters:
            reads["engine.json"] = {"adapters": adapters}
    return reads


def config_hash(config_map: dict[str, Any], component: str) -> str:
    """The pod-template annotation of `component`'s pods: a hash of only what those pods read from the
    ConfigMap (`config_reads`), so a config change rolls exactly the pods that read it. Changing the
    SLOs, the router's settings or a pool's settings rolls no worker through this hash (those that
    reach a pod as flags roll that pod through its args); the autoscaling policy rolls no pod."""
    reads = config_reads(config_map, component)
    return hashlib.sha256(json.dumps(reads, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------ workloads


# The worker's health service name that turns NOT_SERVING only when its engine is stuck (a step with
# work that makes no progress for its --engine-stall-timeout: a hung CUDA or NCCL call), never while
# it drains or waits: tandem_worker.server.health.LIVENESS_SERVICE.
WORKER_LIVENESS_SERVICE = "tandem.liveness"


def _probes(port: int, startup: str, startup_seconds: int) -> dict[str, Any]:
    """Readiness asks the gRPC health service (NOT_SERVING while draining, and for the router until
    a worker pair is healthy). Liveness asks a worker's `WORKER_LIVENESS_SERVICE` (a hung engine
    keeps its port open and its gRPC threads answering: only its watchdog can tell), and the router
    only "is the port open": a draining or waiting process is alive and must not be restarted.
    `startup` is "grpc" for workers (SERVING once the model is loaded; up to `startup_seconds`) and
    "tcpSocket" for the router (up once the tokenizer is loaded; its health waits for workers, which
    may take longer than any startup budget)."""
    return {
        "startupProbe": {
            startup: {"port": port},
            "periodSeconds": STARTUP_PROBE_PERIOD_SECONDS,
            "timeoutSeconds": 3,
            "failureThreshold": -(-startup_seconds // STARTUP_PROBE_PERIOD_SECONDS),
        },
        "readinessProbe": {
            "grpc": {"port": port},
            "periodSeconds": 5,
            "timeoutSeconds": 3,
            "failureThreshold": 2,
        },
        "livenessProbe": {
            **(
                {"grpc": {"port": port, "service": WORKER_LIVENESS_SERVICE}}
                if startup == "grpc"
                else {"tcpSocket": {"port": port}}
            ),
            "periodSeconds": 10,
            "timeoutSeconds": 3,
            "failureThreshold": 6,
        },
    }


def _container_security() -> dict[str, Any]:
    # Nothing in a Tandem pod needs privileges (ports are unprivileged, no host access), nor writes
    # outside its volumes (see TMP_MOUNT): a compromised process cannot plant files in the image.
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
    }


def _pod_security() -> dict[str, Any]:
    # Pod Security "restricted": Tandem's image runs as the numeric USER 65532, which the kubelet can
    # check (OpenShift's SCC assigns its own non-root UID instead).
    return {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}


def _env(pod_env: list[api.EnvVar], gpus: int) -> list[dict[str, Any]]:
    # A GGUF model is converted once into this cache (an emptyDir), and HOME is there (see TMP_MOUNT).
    env = [{"name": "TANDEM_CACHE_DIR", "value": CACHE_MOUNT}, {"name": "HOME", "value": CACHE_MOUNT}]
    if gpus == 0:
        env.append(dict(NO_GPU_ENV))
    # The pod's own value of a name wins, without a shadowed duplicate (the API server warns of those).
    own = {e.name for e in pod_env}
    return [e for e in env if e["name"] not in own] + [{"name": e.name, "value": e.value} for e in pod_env]


def _with_storage(resources: dict[str, Any], storage: int) -> dict[str, Any]:
    # Request = limit, as for memory: the scheduler places the pod where its disk is free, and the
    # kubelet evicts it, not its neighbours, when it writes more.
    resources["requests"]["ephemeral-storage"] = _bytes_quantity(storage)
    resources["limits"]["ephemeral-storage"] = _bytes_quantity(storage)
    return resources


def build_worker_args(role: str, pool: api.Pool, spec: api.ModelDeploymentSpec) -> list[str]:
    """`tandem worker ...` exactly as worker/src/tandem_worker/cli.py parses it."""
    args = [
        "worker",
        "--role", role,
        "--model", model_argument(spec),
        "--host", "0.0.0.0",
        "--port", str(pool.port),
        "--metrics-port", str(pool.metrics_port),
        "--device", "cuda" if pool.gpus > 0 else "cpu",
        "--max-num-batched-tokens", str(pool.max_num_batched_tokens),
        "--max-pending", str(pool.max_pending),
        # In-flight requests finish within the pod's grace period: a longer one lengthens the drain.
        "--drain-timeout", str(spec.termination_grace_period_seconds - WORKER_DRAIN_MARGIN_SECONDS),
    ]  # fmt: skip
    if pool.kv_cache_bytes is not None:
        args += ["--kv-cache-bytes", str(pool.kv_cache_bytes)]
    # Only what differs from the worker's defaults: an operator upgrade that adds a setting leaves
    # the pod templates of deployments that do not use it as they were (no rollout of every pool).
    graphs, defaults = pool.cuda_graphs, api.CudaGraphs()
    for flag, value, default in (
        ("--cuda-graph-max-batch", graphs.max_batch, defaults.max_batch),
        ("--cuda-graph-max-lora-rank", graphs.max_lora_rank, defaults.max_lora_rank),
        ("--cuda-graph-lora-fold-rank", graphs.lora_fold_rank, defaults.lora_fold_rank),
    ):
        if pool.gpus > 0 and value != default:
            args += [flag, str(value)]
    if spec.adapters:
        args += ["--adapters-config", f"{CONFIG_MOUNT}/engine.json"]
    return args


def _pod_volumes(
    owner: Owner, spec: api.ModelDeploymentSpec, component: str, adapters: bool
) -> list[dict[str, Any]]:
    model = model_storage_bytes(spec, component)
    # The router converts a GGUF file's config and tokenizer alone: its cache needs no room for weights.
    converted = quantity_bytes(SMALL_MODEL_STORAGE) if component == "router" else model
    return [
        {"name": "config", "configMap": {"name": config_map_name(owner)}},
        {"name": "cache", **_empty_dir(converted + KERNEL_CACHE_BYTES)},
        {"name": "tmp", **_empty_dir(TMP_SIZE_BYTES)},
        *_model_volumes(spec, adapters, model),
    ]


def _pod_mounts(spec: api.ModelDeploymentSpec, adapters: bool) -> list[dict[str, Any]]:
    return [
        {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
        {"name": "cache", "mountPath": CACHE_MOUNT},
        dict(_TMP_MOUNT),
        *_model_mounts(spec, adapters),
    ]


def _without_empty(fields: dict[str, Any]) -> dict[str, Any]:
    # The API server omits empty lists and maps; leaving them out keeps the objects as they will read back.
    return {k: v for k, v in fields.items() if v not in ([], {}, None)}


# The router holds no GPU, so a surge pod always finds room: never below its desired capacity during
# a roll (clients hold connections to it), one new pod at a time.
ROUTER_ROLLING_UPDATE = {"maxSurge": 1, "maxUnavailable": 0}


def _deployment(
    owner: Owner,
    component: str,
    replicas: int,
    pod_spec: dict[str, Any],
    config_digest: str,
    spec: api.ModelDeploymentSpec,
    rolling_update: dict[str, int | str],
) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(owner, child_name(owner, component), component),
        "spec": {
            "replicas": replicas,
            # Longer than the startup budget, so a slow download and model load is not "stuck".
            "progressDeadlineSeconds": spec.startup_timeout_seconds + PROGRESS_MARGIN_SECONDS,
            "selector": {"matchLabels": selector_labels(owner, component)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": dict(rolling_update)},
            "template": {
                "metadata": {
                    "labels": build_labels(owner, component),
                    "annotations": {CONFIG_HASH_ANNOTATION: config_digest},
                },
                "spec": pod_spec,
            },
        },
    }


def build_worker_deployment(
    owner: Owner, spec: api.ModelDeploymentSpec, role: str, config_digest: str
) -> dict[str, Any]:
    pool = spec.pools()[role]
    peer = PEER_ROLE.get(role)
    peer_labels = selector_labels(owner, peer) if peer is not None else None
    storage = pod_storage_bytes(spec, role)
    container = {
        "name": "worker",
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy.value,
        "command": ["tandem"],
        "args": build_worker_args(role, pool, spec),
        "ports": [
            {"name": "grpc", "containerPort": pool.port, "protocol": "TCP"},
            {"name": "metrics", "containerPort": pool.metrics_port, "protocol": "TCP"},
        ],
        "env": _env(pool.env, pool.gpus),
        "resources": _with_storage(build_resources(pool.cpu, pool.memory, pool.gpus), storage),
        "volumeMounts": _pod_mounts(spec, adapters=True),
        # A crash's last log lines become its termination message, where the operator reads why it
        # died (a CUDA out-of-memory error is exit code 1 to the kubelet, unlike a host OOM kill).
        "terminationMessagePolicy": "FallbackToLogsOnError",
        **_probes(pool.port, startup="grpc", startup_seconds=spec.startup_timeout_seconds),
        "securityContext": _container_security(),
    }
    pod_spec = _without_empty(
        {
            "serviceAccountName": owner.name,
            "imagePullSecrets": [{"name": n} for n in spec.image_pull_secrets],
            "automountServiceAccountToken": False,
            # Workers find each other through DNS; Docker-style service env vars only bloat the env.
            "enableServiceLinks": False,
            "securityContext": _pod_security(),
            "terminationGracePeriodSeconds": spec.termination_grace_period_seconds,
            "initContainers": _init_containers(spec, adapters=True, pod_env=pool.env, storage=storage),
            "containers": [container],
            "volumes": _pod_volumes(owner, spec, role, adapters=True),
            "nodeSelector": dict(pool.node_selector),
            "tolerations": build_tolerations(pool.tolerations, pool.gpus),
            "affinity": build_affinity(role, pool, selector_labels(owner, role), peer_labels, spec.placement),
            "topologySpreadConstraints": build_topology_spread(selector_labels(owner, role), spec.placement),
        }
    )
    # Each worker holds a GPU: whether a roll adds pods first (needs a spare GPU) or stops old ones
    # first (loses capacity meanwhile) is the pool's `rollout`.
    rolling_update = pool.rollout.rolling_update()
    return _deployment(owner, role, pool.replicas, pod_spec, config_digest, spec, rolling_update)


def build_worker_service(owner: Owner, spec: api.ModelDeploymentSpec, role: str) -> dict[str, Any]:
    """Headless: the router resolves every ready pod's address (`dns:NAME:PORT`) and balances itself."""
    pool = spec.pools()[role]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(owner, child_name(owner, role), role),
        "spec": {
            "clusterIP": "None",
            "selector": selector_labels(owner, role),
            "ports": [
                {
                    "name": "grpc",
                    "port": pool.port,
                    "targetPort": "grpc",
                    "protocol": "TCP",
                    "appProtocol": "grpc",
                },
                {"name": "metrics", "port": pool.metrics_port, "targetPort": "metrics", "protocol": "TCP"},
            ],
        },
    }


def served_model_name(owner: Owner, spec: api.ModelDeploymentSpec) -> str:
    """The model name clients give: `router.servedModelName`, else the built-in model's name, else
    the ModelDeployment's (a URI's or PVC's model would otherwise be named by its path in the pod)."""
    return spec.router.served_model_name or spec.model.builtin or owner.name


def build_router_args(owner: Owner, spec: api.ModelDeploymentSpec) -> list[str]:
    """`tandem router ...` with the workers as `dns:<headless service>:<port>` targets."""
    r = spec.router
    args = [
        "router",
        "--model", model_argument(spec),
        "--host", "0.0.0.0",
        "--port", str(api.ROUTER_CONTAINER_PORTS["grpc"]),
        "--metrics-port", str(api.ROUTER_CONTAINER_PORTS["metrics"]),
        "--max-in-flight", str(r.max_in_flight),
        # The router judges every request against the SLOs: the outcome counts autoscaling reads.
        "--slo-ttft-ms", str(spec.slo.ttft_ms),
        "--slo-tpot-ms", str(spec.slo.tpot_ms),
        "--served-model-name", served_model_name(owner, spec),
    ]  # fmt: skip
    for name, _, _ in _router_api_ports(r):
        args += [f"--{name}-port", str(api.ROUTER_CONTAINER_PORTS[name])]
    if r.tool_call_parser is not None:  # unset adds nothing: an upgrade leaves routers' pods as they were
        args += ["--tool-call-parser", r.tool_call_parser.value]
    pools = spec.pools()
    if spec.mode == api.Mode.colocated:
        args += ["--decode", f"dns:{service_host(owner, 'colocated')}:{pools['colocated'].port}"]
    else:
        args += ["--decode", f"dns:{service_host(owner, 'decode')}:{pools['decode'].port}"]
        args += ["--prefill", f"dns:{service_host(owner, 'prefill')}:{pools['prefill'].port}"]
    return args


def build_router_deployment(
    owner: Owner, spec: api.ModelDeploymentSpec, config_digest: str
) -> dict[str, Any]:
    r = spec.router
    storage = pod_storage_bytes(spec, "router")
    container = {
        "name": "router",
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy.value,
        "command": ["tandem"],
        "args": build_router_args(owner, spec),
        "ports": [
            {"name": "grpc", "containerPort": api.ROUTER_CONTAINER_PORTS["grpc"], "protocol": "TCP"},
            {"name": "metrics", "containerPort": api.ROUTER_CONTAINER_PORTS["metrics"], "protocol": "TCP"},
            *(
                {"name": n, "containerPort": api.ROUTER_CONTAINER_PORTS[n], "protocol": "TCP"}
                for n, _, _ in _router_api_ports(r)
            ),
        ],
        "env": _env(r.env, 0),
        "resources": _with_storage(build_resources(r.cpu, r.memory, 0), storage),
        "volumeMounts": _pod_mounts(spec, adapters=False),
        # A crash's last log lines become its termination message, where the operator reads why it
        # died (a CUDA out-of-memory error is exit code 1 to the kubelet, unlike a host OOM kill).
        "terminationMessagePolicy": "FallbackToLogsOnError",
        **_probes(
            api.ROUTER_CONTAINER_PORTS["grpc"],
            startup="tcpSocket",
            startup_seconds=spec.startup_timeout_seconds,
        ),
        # `python`: the one program the image must have (the default fetch containers run it too).
        "lifecycle": {
            "preStop": {
                "exec": {"command": ["python", "-c", f"import time; time.sleep({ROUTER_PRESTOP_SECONDS})"]}
            }
        },
        "securityContext": _container_security(),
    }
    selector = selector_labels(owner, "router")
    pod_spec = _without_empty(
        {
            "serviceAccountName": owner.name,
            "imagePullSecrets": [{"name": n} for n in spec.image_pull_secrets],
            "automountServiceAccountToken": False,
            # Workers find each other through DNS; Docker-style service env vars only bloat the env.
            "enableServiceLinks": False,
            "securityContext": _pod_security(),
            "terminationGracePeriodSeconds": ROUTER_TERMINATION_GRACE_SECONDS,
            "initContainers": _init_containers(spec, adapters=False, pod_env=r.env, storage=storage),
            "containers": [container],
            "volumes": _pod_volumes(owner, spec, "router", adapters=False),
            "nodeSelector": dict(r.node_selector),
            "tolerations": build_tolerations(r.tolerations, 0),
            "topologySpreadConstraints": build_topology_spread(selector, spec.placement),
        }
    )
    return _deployment(owner, "router", r.replicas, pod_spec, config_digest, spec, ROUTER_ROLLING_UPDATE)


def build_router_service(owner: Owner, spec: api.ModelDeploymentSpec) -> dict[str, Any]:
    r = spec.router
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(owner, child_name(owner, "router"), "router"),
        "spec": {
            "type": r.service_type.value,
            "selector": selector_labels(owner, "router"),
            "ports": [
                {
                    "name": "grpc",
                    "port": r.grpc_port,
                    "targetPort": "grpc",
                    "protocol": "TCP",
                    "appProtocol": "grpc",
                },
                {"name": "metrics", "port": r.metrics_port, "targetPort": "metrics", "protocol": "TCP"},
                *(
                    {"name": n, "port": port, "targetPort": n, "protocol": "TCP", "appProtocol": proto}
                    for n, port, proto in _router_api_ports(r)
                ),
            ],
        },
    }


def _router_api_ports(r: api.Router) -> list[tuple[str, int, str]]:
    """(name, port, appProtocol) of the optional client APIs next to tandem.v1: OpenAI HTTP, KServe v2."""
    ports = []
    if r.http_port is not None:
        ports.append(("http", r.http_port, "http"))
    if r.kserve_port is not None:
        ports.append(("kserve", r.kserve_port, "grpc"))
    return ports


def build_pdb(owner: Owner, component: str) -> dict[str, Any]:
    # maxUnavailable (not minAvailable): a one-replica pool still lets a node drain.
    # Independent of the pool's `rollout`: the Deployment controller replaces pods without the
    # eviction API. Pods a roll has taken down (its maxUnavailable) count against this budget, so a
    # drain waits for the roll; one stuck with a pod down (a replacement that never gets ready) holds
    # drains of the pool's ready pods until it is fixed. A surge roll (the default) stuck on a Pending
    # pod holds nothing: every desired pod is still ready.
    # AlwaysAllow: a pod that is not Ready protects no capacity, so evicting it is always allowed. The
    # default (IfHealthyBudget) refuses to evict unready pods once the pool is below budget, and a
    # pool's pods often turn unready together (every router while no worker pair is healthy, every
    # worker of a model that fails to load): a node drain then blocks until they recover.
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(owner, child_name(owner, component), component),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": selector_labels(owner, component)},
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


def build_service_account(owner: Owner) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _meta(owner, owner.name, "workload"),
        "automountServiceAccountToken": False,
    }


def build_children(owner: Owner, spec: api.ModelDeploymentSpec) -> list[dict[str, Any]]:
    """Every child this spec wants, in apply order."""
    config_map = build_config_map(owner, spec)
    children = [build_service_account(owner), config_map]
    for role in spec.pools():
        children.append(build_worker_service(owner, spec, role))
    children.append(build_router_service(owner, spec))
    for role in spec.pools():
        children.append(build_worker_deployment(owner, spec, role, config_hash(config_map, role)))
    children.append(build_router_deployment(owner, spec, config_hash(config_map, "router")))
    for role in spec.pools():
        children.append(build_pdb(owner, role))
    children.append(build_pdb(owner, "router"))
    return children


def possible_children(owner: Owner) -> list[tuple[str, str, str]]:
    """(apiVersion, kind, name) of every child any spec of this deployment could have (for pruning)."""
    out = [("v1", "ServiceAccount", owner.name), ("v1", "ConfigMap", config_map_name(owner))]
    for component in (*ROLES, "router"):
        name = child_name(owner, component)
        out += [
            ("v1", "Service", name),
            ("apps/v1", "Deployment", name),
            ("policy/v1", "PodDisruptionBudget", name),
        ]
    return out
