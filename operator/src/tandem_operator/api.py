"""The `ModelDeployment` API (`tandem.dev/v1alpha1`): typed models, the one source of truth.

The operator validates every object with these models, and `crd.py` generates the CRD's OpenAPI
schema (descriptions, defaults, enums, bounds) from them. Cross-field rules are declared once as
`Rule`s: each carries the CEL expression the API server evaluates (`x-kubernetes-validations`) and
the Python predicate the operator evaluates, so an object that got past an older CRD is still
checked.

Parts of the spec: `model` (built-in name, PVC path or URI), `image`, `mode`, the pools (`prefill`
and `decode`, or `colocated`), `router`, `adapters`, `slo`, `autoscaling`, `placement`.
Parts of the status: see `ModelDeploymentStatus`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, WithJsonSchema, model_validator
from pydantic.alias_generators import to_camel

GROUP = "tandem.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "ModelDeployment"
PLURAL = "modeldeployments"
SINGULAR = "modeldeployment"
SHORT_NAMES = ["tmd"]  # `md` is too generic (and taken by Cluster API's MachineDeployment)

# Kept in step with tandem_worker.engine.loader.BUILTIN_MODELS (a test compares them); the operator
# never imports the worker (layers point one way).
BUILTIN_MODELS = ("smollm2-135m",)

# The longest child suffix is "-colocated" (10): Service names are DNS-1035 labels (63).
MAX_NAME_LENGTH = 50
# Kubernetes accepts any DNS-1123 subdomain as a resource's name ("llama.v3", "7b-chat"), but the
# children's Services need DNS-1035 labels: a lowercase letter first, no dots.
NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"

# The autoscaler's saved memory grows with its history (window and stabilization over the step
# interval): about 22 KB at the defaults' extremes with 15 s steps, 66 KB with 5 s, 164 KB with 2 s.
MAX_AUTOSCALER_MEMORY_BYTES = 256 * 1024

# Kubernetes' label keys (an optional DNS-subdomain prefix and "/", then a name of at most 63) and
# label values; topology keys and taint keys are label keys too. Checked here so that a bad one
# makes the spec invalid before anything is applied, instead of one Deployment failing with 422
# while the rest of the update goes out.
QUALIFIED_NAME_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|Ki|Mi|Gi|Ti|Pi)?$"
DNS_SUBDOMAIN_PATTERN = (
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"  # e.g. a Secret's name
)
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
LabelValue = Annotated[str, Field(max_length=63, pattern=LABEL_VALUE_PATTERN)]


@dataclass(frozen=True)
class Rule:
    """A cross-field rule: `cel` for the API server, `check` for the operator (True means valid)."""

    cel: str
    message: str
    check: Callable[[Any], bool]


class _Model(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown fields are errors (as in a structural CRD)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")
    rules: ClassVar[tuple[Rule, ...]] = ()

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema, handler):
        # The CEL half of each rule goes into the generated CRD next to the model's properties.
        schema = handler(core_schema)
        if cls.rules:
            target = handler.resolve_ref_schema(schema)
            target["x-kubernetes-validations"] = [{"rule": r.cel, "message": r.message} for r in cls.rules]
        return schema

    @model_validator(mode="after")
    def _check_rules(self):
        for rule in self.rules:
            if not rule.check(self):
                raise ValueError(rule.message)
        return self


class Mode(str, Enum):
    disaggregated = "disaggregated"
    colocated = "colocated"


class ToolCallParser(str, Enum):
    hermes = "hermes"  # Qwen2.5 and later, Hermes 2 and 3: <tool_call>{...}</tool_call> blocks


class ServiceType(str, Enum):
    ClusterIP = "ClusterIP"
    NodePort = "NodePort"
    LoadBalancer = "LoadBalancer"


class PullPolicy(str, Enum):
    IfNotPresent = "IfNotPresent"
    Always = "Always"
    Never = "Never"


class TolerationOperator(str, Enum):
    Exists = "Exists"
    Equal = "Equal"


class TaintEffect(str, Enum):
    NoSchedule = "NoSchedule"
    PreferNoSchedule = "PreferNoSchedule"
    NoExecute = "NoExecute"


class PVCSource(_Model):
    claim_name: str = Field(
        min_length=1,
        max_length=253,
        pattern=DNS_SUBDOMAIN_PATTERN,
        description="Name of a PersistentVolumeClaim in the same namespace.",
    )
    path: str = Field(
        min_length=1,
        max_length=1024,
        pattern=r"^[^/].*$",
        description="Path inside the claim (relative) to a .gguf file or a Hugging Face model folder.",
    )


class ModelSource(_Model):
    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            "[has(self.builtin), has(self.pvc), has(self.uri)].filter(x, x).size() == 1",
            "set exactly one of builtin, pvc and uri",
            lambda m: sum(x is not None for x in (m.builtin, m.pvc, m.uri)) == 1,
        ),
    )

    builtin: str | None = Field(
        default=None,
        max_length=63,
        description="Name of a model built into the Tandem image (e.g. smollm2-135m).",
    )
    pvc: PVCSource | None = Field(
        default=None, description="A model stored on a PersistentVolumeClaim, mounted read-only."
    )
    uri: str | None = Field(
        default=None,
        max_length=2048,
        pattern=r"^https?://[^\s]+$",
        description=(
            "http(s) URI of a .gguf file, or of a .tar/.tar.gz/.tgz archive of a Hugging Face model "
            "folder; an init container downloads it into each pod before the engine starts."
        ),
    )
    fetch_image: str | None = Field(
        default=None,
        min_length=1,
        description=(
            "Image of the init containers that download `uri` and the URI adapters, running a sh "
            "program (needs sh, curl and tar, and a numeric non-root USER: the pods run as non-root); "
            "unset: the deployment's own image downloads them, with Python."
        ),
    )
    # The model's size is known only once it is downloaded, so the disk it takes is declared here: a
    # pod without a bound could fill its node's disk and get other pods evicted.
    storage_size: str | None = Field(
        default=None,
        pattern=QUANTITY_PATTERN,
        description=(
            "Local disk for the model in each pod that keeps a copy of it: the workers (a `uri` model's "
            "download, whose archive and unpacked folder coexist while it unpacks; a GGUF file's "
            "conversion, whose weights are float32: about 4 bytes a parameter, 8 times a 4-bit GGUF "
            "file; the URI adapters) and, for a `uri` model, the router. It bounds those emptyDir "
            "volumes (sizeLimit) and, with 2Gi for /tmp and compiled-kernel caches, is each pod's "
            "ephemeral-storage request and limit: pods go where the disk is free, and one that "
            "outgrows it is evicted instead of filling its node's disk. Default: 40Gi where the model "
            "is downloaded or converted (a `uri`, or a `pvc` path ending in .gguf), else 1Gi (the "
            "built-in model, a PVC's Hugging Face folder, and the router of a `pvc` model)."
        ),
    )


class EnvVar(_Model):
    name: str = Field(
        min_length=1, max_length=253, pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$", description="Variable name."
    )
    value: str = Field(default="", description="Variable value.")


class Toleration(_Model):
    # Kubernetes' own toleration checks, so a bad one is refused at apply time, not when the
    # operator's Deployment is (Degraded with ApplyFailed).
    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            "self.operator == 'Exists' || (has(self.key) && self.key != '')",
            "a toleration without a key must use operator Exists",
            lambda t: t.operator == "Exists" or bool(t.key),
        ),
        Rule(
            "self.operator != 'Exists' || !has(self.value) || self.value == ''",
            "a toleration with operator Exists takes no value",
            lambda t: t.operator != "Exists" or not t.value,
        ),
        Rule(
            "!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
            "tolerationSeconds needs effect NoExecute",
            lambda t: t.toleration_seconds is None or t.effect == "NoExecute",
        ),
    )

    key: str | None = Field(
        default=None,
        max_length=316,
        pattern=r"^(" + QUALIFIED_NAME_PATTERN[1:-1] + r")?$",  # or empty
        description="Taint key to tolerate; empty with Exists: all taints.",
    )
    operator: TolerationOperator = Field(
        default=TolerationOperator.Equal, description="Exists (any value) or Equal (value must match)."
    )
    value: str | None = Field(
        default=None,
        max_length=63,
        pattern=LABEL_VALUE_PATTERN,
        description="Taint value, with operator Equal.",
    )
    effect: TaintEffect | None = Field(default=None, description="Taint effect to tolerate; empty: all.")
    toleration_seconds: int | None = Field(
        default=None, ge=0, description="With NoExecute: how long the pod stays bound after the taint."
    )


# A rollout's maxSurge and maxUnavailable, as Kubernetes' IntOrString takes them: a number of pods or
# a percentage of the pool's replicas. Bounded at 100% and at a pool's most replicas: a rollout never
# runs more new pods than the pool's replicas, so a larger surge adds nothing, and Kubernetes refuses
# a maxUnavailable above 100% (the operator's Deployment would fail with 422).
MAX_POOL_REPLICAS = 1000
PERCENT_PATTERN = r"^(100|[1-9]?[0-9])%$"
DEFAULT_MAX_SURGE = 1
# An IntOrString is `dyn` to the API server's CEL: every use is guarded by `type(...)`.
_COUNT_OR_PERCENT_CEL = (
    f"type(self) == int ? self >= 0 && self <= {MAX_POOL_REPLICAS} "
    f": type(self) == string && self.matches('{PERCENT_PATTERN}')"
)
_COUNT_OR_PERCENT_MESSAGE = (
    f"must be a number of pods (0 to {MAX_POOL_REPLICAS}) or a percentage of the pool's replicas "
    "(0% to 100%, e.g. 25%)"
)


def is_count_or_percent(value: Any) -> bool:
    """True for what a rollout field takes: an int from 0 or a percentage like "25%" (no "1", no 1.0)."""
    if isinstance(value, bool):  # JSON true is no number of pods
        return False
    if isinstance(value, int):
        return 0 <= value <= MAX_POOL_REPLICAS
    return isinstance(value, str) and re.fullmatch(PERCENT_PATTERN, value) is not None


def _count_or_percent(value: Any) -> int | str:
    if not is_count_or_percent(value):
        raise ValueError(f"{_COUNT_OR_PERCENT_MESSAGE}, got {value!r}")
    return value


def is_zero(value: Any) -> bool:
    """A rollout field that lets no pod be added (maxSurge) or taken down (maxUnavailable)."""
    return (isinstance(value, int) and not isinstance(value, bool) and value == 0) or value == "0%"


# The CRD's IntOrString: `x-kubernetes-int-or-string` and no `type` is the one untyped node a structural
# schema allows; the field's own CEL rule checks the value, so a bad one is refused at apply time.
CountOrPercent = Annotated[
    int | str,
    PlainValidator(_count_or_percent),
    WithJsonSchema(
        {
            "x-kubernetes-int-or-string": True,
            "x-kubernetes-validations": [
                {"rule": _COUNT_OR_PERCENT_CEL, "message": _COUNT_OR_PERCENT_MESSAGE}
            ],
        }
    ),
]


# With the pattern, a percentage's one zero is "0%". `type(...)` keeps CEL from comparing a string to
# an int, which CEL without heterogeneous equality refuses rather than answering false.
def _zero_cel(field: str) -> str:
    return f"(type(self.{field}) == int ? self.{field} == 0 : self.{field} == '0%')"


class Rollout(_Model):
    """How a pool's Deployment replaces its pods when the pod template changes (a new image, a changed
    spec): the Deployment's RollingUpdate strategy."""

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            "!has(self.maxSurge) || !has(self.maxUnavailable) || "
            f"!({_zero_cel('maxSurge')} && {_zero_cel('maxUnavailable')})",
            "rollout maxSurge and maxUnavailable cannot both be 0: the rollout could neither add a pod "
            "nor take one down; with no spare GPU set maxUnavailable to 1 (maxSurge 0 alone does that)",
            lambda r: not (is_zero(_field(r, "max_surge")) and is_zero(_field(r, "max_unavailable"))),
        ),
    )

    max_surge: CountOrPercent | None = Field(
        default=None,
        description=(
            "Pods (or a percentage of replicas, rounded up) started beyond replicas while the pool "
            "rolls out, each holding its GPUs. Default 1: a new pod must be ready before an old one "
            "stops, so capacity never drops and a broken update takes nothing down, but the cluster "
            "needs a spare GPU of the pool's type; without one the new pod stays Pending and the "
            "rollout never finishes (Degraded: ProgressDeadlineExceeded). 0 there: old pods stop "
            "first and free their GPUs for their replacements."
        ),
    )
    max_unavailable: CountOrPercent | None = Field(
        default=None,
        description=(
            "Pods (or a percentage of replicas, rounded down) that may be missing from replicas while "
            "the pool rolls out: old pods stopped before their replacements are ready. Default 0, or 1 "
            "when maxSurge is 0. With replicas 1, anything above 0 means the pool serves nothing "
            "while its pod is replaced, and nothing until a broken update is fixed. Not both 0."
        ),
    )

    def rolling_update(self) -> dict[str, int | str]:
        """The Deployment's `strategy.rollingUpdate`, defaults filled in."""
        surge = DEFAULT_MAX_SURGE if self.max_surge is None else self.max_surge
        if self.max_unavailable is not None:
            unavailable = self.max_unavailable
        else:
            # maxSurge 0 alone is how Kubernetes users ask for an in-place roll (Kubernetes' own
            # maxUnavailable default, 25%, lets it progress); a default of 0 would refuse it.
            unavailable = 1 if is_zero(surge) else 0
        return {"maxSurge": surge, "maxUnavailable": unavailable}


class CudaGraphs(_Model):
    """Decode steps replayed from captured CUDA graphs (GPU pools; `tandem worker --cuda-graph-*`)."""

    max_batch: int = Field(
        default=256,
        ge=0,
        le=4096,
        description="Decode batches up to this size replay captured graphs (0: always eager).",
    )
    max_lora_rank: int = Field(
        default=64,
        ge=0,
        le=1024,
        description="Decode batches with adapters of at most this rank replay graphs too (0: eager).",
    )
    lora_fold_rank: int = Field(
        default=0,
        ge=0,
        le=1024,
        description=(
            "Extra weight rows per projection part (in rank units) that hold the running batch's "
            "adapters, whose LoRA shrink then runs inside the base GEMMs (0: off; its rows come out of "
            "GPU memory the KV cache would take)."
        ),
    )


class Pool(_Model):
    """One pool of worker pods (prefill, decode or colocated): one Deployment plus a headless Service."""

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            "!has(self.minReplicas) || self.minReplicas <= self.replicas",
            "minReplicas must be <= replicas",
            lambda p: p.min_replicas is None or p.min_replicas <= p.replicas,
        ),
        Rule(
            "!has(self.maxReplicas) || self.replicas <= self.maxReplicas",
            "replicas must be <= maxReplicas",
            lambda p: p.max_replicas is None or p.replicas <= p.max_replicas,
        ),
        Rule(
            "self.port != self.metricsPort",
            "port and metricsPort must differ",
            lambda p: p.port != p.metrics_port,
        ),
    )

    replicas: int = Field(default=1, ge=0, le=MAX_POOL_REPLICAS, description="Number of worker pods.")
    min_replicas: int | None = Field(
        default=None,
        ge=1,
        le=MAX_POOL_REPLICAS,
        description=(
            "Lower bound for the autoscaler (default: replicas). At least 1: nothing scales a pool "
            "up from zero."
        ),
    )
    max_replicas: int | None = Field(
        default=None,
        ge=1,
        le=MAX_POOL_REPLICAS,
        description="Upper bound for the autoscaler (default: replicas).",
    )
    # At most 1: a worker runs one engine on one device (no tensor parallelism), so a second GPU per
    # pod would be allocated and never used.
    gpus: int = Field(
        default=1,
        ge=0,
        le=1,
        description=(
            "nvidia.com/gpu per pod: 1, or 0 to run the engine on CPU (demos). A worker runs one engine on "
            "one GPU (no tensor parallelism)."
        ),
    )
    gpu_product: str | None = Field(
        default=None,
        max_length=63,
        pattern=LABEL_VALUE_PATTERN,
        description=(
            "Required value of the node label nvidia.com/gpu.product (e.g. NVIDIA-H100-80GB-HBM3), so "
            "each pool can land on its own GPU type."
        ),
    )
    cpu: str = Field(
        default="2", pattern=QUANTITY_PATTERN, description="CPU request per pod (no CPU limit is set)."
    )
    memory: str = Field(
        default="8Gi", pattern=QUANTITY_PATTERN, description="Memory request and limit per pod."
    )
    node_selector: dict[str, LabelValue] = Field(
        default_factory=dict, description="Extra node labels the pods require."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list,
        description="Extra tolerations (nvidia.com/gpu:NoSchedule is tolerated when gpus > 0).",
    )
    env: list[EnvVar] = Field(
        default_factory=list,
        description=(
            "Extra environment variables of the pool's pods, their download init containers included "
            "(HTTPS_PROXY, NO_PROXY, SSL_CERT_FILE...); NVIDIA_VISIBLE_DEVICES does not reach those."
        ),
    )
    port: int = Field(default=50061, ge=1024, le=65535, description="Worker gRPC port.")
    metrics_port: int = Field(default=9091, ge=1024, le=65535, description="Worker /metrics HTTP port.")
    kv_cache_bytes: int | None = Field(
        default=None, ge=1, description="KV cache budget per pod in bytes (default: a share of free memory)."
    )
    max_num_batched_tokens: int = Field(
        default=2048, ge=1, le=1 << 20, description="Token budget of one engine step."
    )
    max_pending: int = Field(
        default=256, ge=1, le=100000, description="Requests in flight per pod before RESOURCE_EXHAUSTED."
    )
    cuda_graphs: CudaGraphs = Field(
        default_factory=CudaGraphs,
        description="CUDA graphs of decode steps (pools with gpus: 1; ignored on CPU).",
    )
    rollout: Rollout = Field(
        default_factory=Rollout,
        description=(
            "How the pool's pods are replaced when their template changes (maxSurge, maxUnavailable). "
            "Default: one extra pod at a time, none down; on a cluster with no spare GPU set "
            "maxSurge 0 (then maxUnavailable defaults to 1)."
        ),
    )


# The router container's own ports, whatever its Service offers: fixed, so they never collide and
# are always bindable by a non-root process.
ROUTER_CONTAINER_PORTS: dict[str, int] = {"grpc": 50051, "http": 8080, "kserve": 8081, "metrics": 9090}


class Router(_Model):
    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            "self.grpcPort != self.metricsPort",
            "router grpcPort and metricsPort must differ",
            lambda r: r.grpc_port != r.metrics_port,
        ),
    )

    replicas: int = Field(default=1, ge=1, le=100, description="Number of router pods.")
    service_type: ServiceType = Field(
        default=ServiceType.ClusterIP, description="Type of the router's Service: the endpoint clients use."
    )
    # These are the router Service's ports, any of 1-65535 (a LoadBalancer may offer 443). The container
    # behind them listens on fixed ports above 1024 (ROUTER_CONTAINER_PORTS): an unprivileged
    # container, as ours runs, may not bind below 1024 on many runtimes.
    grpc_port: int = Field(
        default=50051, ge=1, le=65535, description="Service port of the gRPC inference API."
    )
    http_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description=(
            "Service port of the OpenAI-compatible HTTP API (/v1/models, /v1/completions, "
            "/v1/chat/completions); unset: not served."
        ),
    )
    kserve_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="Service port of KServe's Open Inference Protocol v2 over gRPC; unset: not served.",
    )
    metrics_port: int = Field(default=9090, ge=1, le=65535, description="Service port of /metrics.")
    max_in_flight: int = Field(
        default=512, ge=1, le=100000, description="Requests in flight before RESOURCE_EXHAUSTED."
    )
    served_model_name: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$",
        description=(
            "The model name clients give (OpenAI's `model`, KServe's model name, /v1/models); "
            "default: the built-in model's name, else this ModelDeployment's name (not the model's "
            "path inside the pod)."
        ),
    )
    tool_call_parser: ToolCallParser | None = Field(
        default=None,
        description=(
            "The model's tool-call format, which OpenAI's tool_choice 'auto' reads calls in (hermes: "
            "Qwen2.5 and later, Hermes 2 and 3); unset, 'auto' with tools is refused."
        ),
    )
    cpu: str = Field(default="1", pattern=QUANTITY_PATTERN, description="CPU request per router pod.")
    memory: str = Field(
        default="2Gi", pattern=QUANTITY_PATTERN, description="Memory request and limit per router pod."
    )
    node_selector: dict[str, LabelValue] = Field(
        default_factory=dict, description="Node labels the pods require."
    )
    tolerations: list[Toleration] = Field(default_factory=list, description="Tolerations of the router pods.")
    env: list[EnvVar] = Field(
        default_factory=list,
        description=(
            "Extra environment variables of the router pods, their fetch-model init container "
            "included (HTTPS_PROXY, NO_PROXY, SSL_CERT_FILE...)."
        ),
    )


class Adapter(_Model):
    name: str = Field(
        min_length=1,
        max_length=63,
        pattern=r"^[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$",
        description="Adapter name clients select it by; unique within the deployment.",
    )
    source: str = Field(
        min_length=1,
        max_length=2048,
        description="Where the PEFT-format adapter lives: a path in the model volume or a URI.",
    )


class SLO(_Model):
    ttft_ms: int = Field(default=1000, ge=1, le=600000, description="Time-to-first-token target (ms).")
    tpot_ms: int = Field(default=100, ge=1, le=60000, description="Time-per-output-token target (ms).")
    attainment: float = Field(
        default=0.9, gt=0, le=1, description="Fraction of requests that must meet both targets."
    )


class RatioBand(_Model):
    rules: ClassVar[tuple[Rule, ...]] = (
        Rule("self.min <= self.max", "ratio min must be <= max", lambda b: b.min <= b.max),
    )

    min: float = Field(gt=0, le=100, description="Lowest prefill:decode replica ratio.")
    max: float = Field(gt=0, le=100, description="Highest prefill:decode replica ratio.")


class Autoscaling(_Model):
    enabled: bool = Field(default=False, description="Let the operator scale the pools within their bounds.")
    window_seconds: int = Field(
        default=60, ge=10, le=3600, description="Window over which SLO attainment is measured."
    )
    stabilization_seconds: int = Field(
        default=300, ge=0, le=3600, description="How long a lower size must persist before scaling down."
    )
    cooldown_seconds: int = Field(
        default=60, ge=0, le=3600, description="Minimum time between two scaling actions of a pool."
    )
    max_step: int = Field(default=1, ge=1, le=100, description="Most replicas added or removed at once.")
    prefill_decode_ratio: RatioBand | None = Field(
        default=None, description="Optional band the prefill:decode replica ratio is kept in."
    )


class Placement(_Model):
    affinity_topology_key: str = Field(
        default="topology.kubernetes.io/zone",
        min_length=1,
        max_length=316,
        pattern=QUALIFIED_NAME_PATTERN,
        description=(
            "Node label whose domain prefill and decode pods prefer to share (KV crosses between them)."
        ),
    )
    spread_topology_key: str = Field(
        default="kubernetes.io/hostname",
        min_length=1,
        max_length=316,
        pattern=QUALIFIED_NAME_PATTERN,
        description="Node label each pool's pods are spread across.",
    )


def _field(obj: Any, name: str) -> Any:
    """A nested field as a rule's Python half sees it: a typed model in the operator, the raw
    camelCase object where the rules are tested against CEL."""
    if isinstance(obj, dict):
        return obj.get(to_camel(name))
    return getattr(obj, name, None)


def _autoscaling_on(spec: Any) -> bool:
    return bool(spec.autoscaling is not None and _field(spec.autoscaling, "enabled"))


def _floor_at_least_one(pool: Any) -> bool:
    if pool is None:
        return True
    lo = _field(pool, "min_replicas")
    return (_field(pool, "replicas") if lo is None else lo) >= 1


_AUTOSCALING_ON = "has(self.autoscaling) && has(self.autoscaling.enabled) && self.autoscaling.enabled"


def _floor_cel(role: str) -> str:
    pool = f"self.{role}"
    return f"(!has({pool}) || (has({pool}.minReplicas) ? {pool}.minReplicas : {pool}.replicas) >= 1)"


class ModelDeploymentSpec(_Model):
    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            "self.mode != 'disaggregated' || (has(self.prefill) && has(self.decode) && !has(self.colocated))",
            "mode disaggregated needs prefill and decode pools and no colocated pool",
            lambda s: (
                s.mode != Mode.disaggregated
                or (s.prefill is not None and s.decode is not None and s.colocated is None)
            ),
        ),
        Rule(
            "self.mode != 'colocated' || (has(self.colocated) && !has(self.prefill) && !has(self.decode))",
            "mode colocated needs a colocated pool and no prefill or decode pool",
            lambda s: (
                s.mode != Mode.colocated
                or (s.colocated is not None and s.prefill is None and s.decode is None)
            ),
        ),
        Rule(
            f"!({_AUTOSCALING_ON}) || self.mode != 'colocated'",
            "autoscaling sizes prefill and decode pools: mode colocated cannot enable it",
            lambda s: not _autoscaling_on(s) or s.mode != Mode.colocated,
        ),
        Rule(
            f"!({_AUTOSCALING_ON}) || ({_floor_cel('prefill')} && {_floor_cel('decode')})",
            "with autoscaling enabled, prefill and decode need minReplicas (or, unset, replicas) of "
            "at least 1: nothing scales a pool up from zero",
            lambda s: (
                not _autoscaling_on(s) or (_floor_at_least_one(s.prefill) and _floor_at_least_one(s.decode))
            ),
        ),
    )

    model: ModelSource = Field(description="The model to serve.")
    image: str = Field(
        min_length=1, pattern=r"^\S+$", description="Tandem container image for workers and router."
    )
    image_pull_policy: PullPolicy = Field(
        default=PullPolicy.IfNotPresent, description="Pull policy of the Tandem image."
    )
    image_pull_secrets: list[Annotated[str, Field(pattern=DNS_SUBDOMAIN_PATTERN, max_length=253)]] = Field(
        default_factory=list,
        max_length=16,
        description="Secrets (in this namespace) with credentials for the image's registry.",
    )
    mode: Mode = Field(
        default=Mode.disaggregated,
        description="disaggregated: prefill and decode pools; colocated: one pool does both.",
    )
    prefill: Pool | None = Field(default=None, description="Prefill pool (mode disaggregated).")
    decode: Pool | None = Field(default=None, description="Decode pool (mode disaggregated).")
    colocated: Pool | None = Field(default=None, description="Colocated pool (mode colocated).")
    router: Router = Field(default_factory=Router, description="The router: the gRPC endpoint.")
    # Bounded by the ConfigMap that lists them: its last-applied record (an annotation, at most
    # 256 KiB) holds engine.json and adapter-uris.txt, about 220 bytes an adapter with 50-character
    # URIs, so 1,000 leaves room for longer ones.
    adapters: list[Adapter] = Field(
        default_factory=list, max_length=1000, description="LoRA adapters (at most 1,000)."
    )
    slo: SLO = Field(default_factory=SLO, description="Latency objectives goodput is measured against.")
    autoscaling: Autoscaling = Field(
        default_factory=Autoscaling, description="Autoscaling policy (applied by the autoscaler)."
    )
    placement: Placement = Field(default_factory=Placement, description="Topology preferences.")
    startup_timeout_seconds: int = Field(
        default=600,
        ge=60,
        le=7200,
        description=(
            "How long a worker may take from its container's start to a loaded model (its startup "
            "probe) before it is restarted; each Deployment reports ProgressDeadlineExceeded 300 s "
            "after that (the model's download comes first). Raise it for large models on slow storage."
        ),
    )
    termination_grace_period_seconds: int = Field(
        default=60,
        ge=35,
        le=3600,
        description=(
            "Grace period of worker pods: after SIGTERM a worker lets in-flight requests finish for "
            "this less 5 s (at least 30 s), so a longer one suits long generations."
        ),
    )

    def pools(self) -> dict[str, Pool]:
        """The pools this mode runs, by role, in a stable order."""
        pools = {"prefill": self.prefill, "decode": self.decode, "colocated": self.colocated}
        return {role: pool for role, pool in pools.items() if pool is not None}


# ----------------------------------------------------------------------------------------- status


class ConditionStatus(str, Enum):
    true = "True"
    false = "False"
    unknown = "Unknown"


class Condition(_Model):
    type: str = Field(
        description="Ready, Progressing, Degraded, SpecValid, WorkersHealthy or AutoscalerHealthy."
    )
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(description="CamelCase reason for the condition's last transition or state.")
    message: str = Field(default="", description="Human-readable details.")
    observed_generation: int = Field(default=0, ge=0, description="metadata.generation this was set from.")
    last_transition_time: str = Field(description="When status last changed (RFC 3339).")


class ReplicaStatus(_Model):
    desired: int = Field(default=0, ge=0, description="Replicas the spec asks for.")
    ready: int = Field(default=0, ge=0, description="Replicas whose pods are ready.")
    updated: int = Field(default=0, ge=0, description="Replicas running the current pod template.")
    summary: str = Field(default="0/0", description="ready/desired, for kubectl get.")


class AutoscalerInputs(_Model):
    """What the autoscaler's decision was made from (absent: not measured)."""

    window_seconds: float | None = Field(default=None, description="Length of the metrics window (s).")
    requests: int | None = Field(default=None, ge=0, description="Requests that finished in the window.")
    met: int | None = Field(default=None, ge=0, description="Of those, requests that met both SLOs.")
    missed_ttft: int | None = Field(default=None, ge=0, description="Requests that missed the TTFT SLO.")
    missed_tpot: int | None = Field(default=None, ge=0, description="Requests that missed the TPOT SLO.")
    failed: int | None = Field(default=None, ge=0, description="Requests that failed.")
    rejected: int | None = Field(
        default=None,
        ge=0,
        description=(
            "Requests turned away before any token (RESOURCE_EXHAUSTED, HTTP 429): by the router at its "
            "own in-flight limit, or by a pool's workers (at their request limit; for decode also every "
            "KV cache full). routerRejected, prefillRejected and decodeRejected say by whom."
        ),
    )
    router_rejected: int | None = Field(
        default=None,
        ge=0,
        description=(
            "Of those, requests the router turned away at its own in-flight limit "
            "(spec.router.maxInFlight per router pod): no pool is scaled up for them."
        ),
    )
    prefill_rejected: int | None = Field(
        default=None,
        ge=0,
        description=(
            "Of those, requests turned away because the prefill workers tried were at their request "
            "limit: counted as prefill's (TTFT-side) misses."
        ),
    )
    decode_rejected: int | None = Field(
        default=None,
        ge=0,
        description=(
            "Of those, requests turned away because every decode worker's KV cache was full or the "
            "decode workers were at their request limit (with a router that does not tell the pools "
            "apart, every rejection not at the router's limit): counted as decode's misses."
        ),
    )
    attainment: float | None = Field(default=None, description="Fraction of requests that met both SLOs.")
    ttft_p90_seconds: float | None = Field(
        default=None, description="90th percentile time to first token (s)."
    )
    tpot_p90_seconds: float | None = Field(
        default=None, description="90th percentile time per output token (s)."
    )
    prefill_backlog_tokens: float | None = Field(
        default=None, description="Mean queued prompt tokens per prefill replica over the window."
    )
    decode_kv_usage: float | None = Field(
        default=None, description="Mean used fraction of the decode pools' KV caches over the window."
    )
    prefill_replicas: int | None = Field(
        default=None, ge=0, description="Prefill replicas before the decision."
    )
    prefill_ready: int | None = Field(default=None, ge=0, description="Of those, ready ones.")
    decode_replicas: int | None = Field(
        default=None, ge=0, description="Decode replicas before the decision."
    )
    decode_ready: int | None = Field(default=None, ge=0, description="Of those, ready ones.")


class AutoscalerStatus(_Model):
    """The autoscaler's last decision (one that changed a pool's size) and whether it is holding."""

    last_decision_time: str | None = Field(
        default=None, description="When the autoscaler last changed a pool's size (RFC 3339)."
    )
    prefill: int | None = Field(default=None, ge=0, description="Prefill replicas the last decision set.")
    decode: int | None = Field(default=None, ge=0, description="Decode replicas the last decision set.")
    reason: str | None = Field(default=None, description="Why, per pool (the policy's reasoning).")
    inputs: AutoscalerInputs | None = Field(default=None, description="What the decision was made from.")
    holding: str | None = Field(
        default=None,
        description=(
            "Set while the autoscaler holds pools at their size for lack of data (no metrics for "
            "this deployment, too few finished requests): which pools and why."
        ),
    )
    router_at_limit_since: str | None = Field(
        default=None,
        description=(
            "Set while the router turns requests away at its own in-flight limit: when that began "
            "(RFC 3339; a RouterAtLimit Warning Event was posted then). Cleared by the first window "
            "without such rejections."
        ),
    )
    memory: str | None = Field(
        default=None,
        max_length=MAX_AUTOSCALER_MEMORY_BYTES,
        description=(
            "The policy's memory (recent recommendations, last changes, burst and outcome history, "
            "learned prefill throughput) as JSON, saved at each change and every minute: a restarted "
            "or newly elected operator carries on from it instead of starting afresh."
        ),
    )


class ModelDeploymentStatus(_Model):
    observed_generation: int = Field(default=0, ge=0, description="Last metadata.generation reconciled.")
    conditions: list[Condition] = Field(
        default_factory=list,
        description=(
            "Ready (requests can be served), Progressing (a workload is rolling out), Degraded "
            "(fewer ready pods than desired, a refused or conflicting child), SpecValid, "
            "WorkersHealthy (False: a component's containers were OOMKilled or crash-loop in the "
            "last 10 minutes, named in its message), and AutoscalerHealthy while autoscaling is "
            "enabled (False: Prometheus cannot be queried, and every pool holds its size)."
        ),
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    prefill: ReplicaStatus | None = Field(default=None, description="Prefill pool replicas.")
    decode: ReplicaStatus | None = Field(default=None, description="Decode pool replicas.")
    colocated: ReplicaStatus | None = Field(default=None, description="Colocated pool replicas.")
    router: ReplicaStatus | None = Field(default=None, description="Router replicas.")
    endpoint: str = Field(default="", description="host:port of the router's gRPC endpoint.")
    autoscaler: AutoscalerStatus | None = Field(
        default=None, description="The autoscaler's last decision (while autoscaling is enabled)."
    )


def parse_spec(spec: dict[str, Any]) -> ModelDeploymentSpec:
    """Validate a spec dict from the API (raises pydantic.ValidationError)."""
    return ModelDeploymentSpec.model_validate(spec)
