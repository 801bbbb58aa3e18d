"""Where pods go: GPU limits' companions (product affinity, GPU taint toleration), spreading, and the
preference that one deployment's prefill and decode pods share a topology domain (KV crosses between
them, and cross-zone traffic is slow and billed). Pure functions of the spec.
"""

from __future__ import annotations

from typing import Any

from . import api

GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"  # set by NVIDIA GPU feature discovery
GPU_TOLERATION = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}

# The pool a role prefers to sit next to: KV flows prefill -> decode.
PEER_ROLE = {"prefill": "decode", "decode": "prefill"}


def build_tolerations(tolerations: list[api.Toleration], gpus: int) -> list[dict[str, Any]]:
    out = [dict(GPU_TOLERATION)] if gpus > 0 else []
    for t in tolerations:
        out.append(t.model_dump(by_alias=True, exclude_none=True, mode="json"))
    return out


def build_affinity(
    role: str,
    pool: api.Pool,
    selector_labels: dict[str, str],
    peer_labels: dict[str, str] | None,
    placement: api.Placement,
) -> dict[str, Any]:
    """Node affinity on the GPU product; preferred pod affinity towards the peer pool (if any)."""
    affinity: dict[str, Any] = {}
    if pool.gpu_product is not None:
        affinity["nodeAffinity"] = {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {
                        "matchExpressions": [
                            {"key": GPU_PRODUCT_LABEL, "operator": "In", "values": [pool.gpu_product]}
                        ]
                    }
                ]
            }
        }
    if peer_labels is not None:
        affinity["podAffinity"] = {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 100,
                    "podAffinityTerm": {
                        "labelSelector": {"matchLabels": dict(peer_labels)},
                        "topologyKey": placement.affinity_topology_key,
                    },
                }
            ]
        }
    return affinity


def build_topology_spread(selector_labels: dict[str, str], placement: api.Placement) -> list[dict[str, Any]]:
    """Spread a pool across nodes; soft, so a small cluster still schedules everything."""
    return [
        {
            "maxSkew": 1,
            "topologyKey": placement.spread_topology_key,
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": dict(selector_labels)},
        }
    ]


def build_resources(cpu: str, memory: str, gpus: int) -> dict[str, Any]:
    # No CPU limit: CFS throttling adds tail latency; memory limit = request so eviction is predictable.
    requests: dict[str, Any] = {"cpu": cpu, "memory": memory}
    limits: dict[str, Any] = {"memory": memory}
    if gpus > 0:
        requests[GPU_RESOURCE] = str(gpus)
        limits[GPU_RESOURCE] = str(gpus)
    return {"requests": requests, "limits": limits}
