"""`plan_spec_errors`: the checks a CRD schema cannot express, as a pure function of the object.

The schema (and the typed models) catch shapes, bounds and per-object rules; this catches what needs
knowledge the API server does not have (which models are built in) or rules the issue wants reported
as a condition plus an Event rather than refused at admission. An empty list means the spec is valid.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urlparse

from pydantic import ValidationError

from . import api
from .patching import _quantity

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")


@dataclass(frozen=True)
class SpecError:
    """One reason the spec cannot be served; `reason` is CamelCase (it becomes a condition reason)."""

    reason: str
    message: str


# A model takes at least this much disk: less is a typo ("40" for "40Gi", 40 bytes) that would get
# every pod evicted at its download.
MIN_STORAGE_BYTES = 1 << 20


def quantity_bytes(quantity: str) -> int:
    """A Kubernetes quantity of bytes ("40Gi", "1.5G", "500M") as whole bytes, rounded up."""
    value = _quantity(quantity)
    if value is None:
        raise ValueError(f"not a quantity: {quantity!r}")
    return math.ceil(value)


# The ConfigMap lists every adapter twice (engine.json, and the fetch list for URI sources) and a
# ConfigMap holds at most 1 MiB.
MAX_ADAPTER_LIST_BYTES = 256 * 1024


def model_file_name(uri: str) -> str:
    """The last path segment of a model URI (what the init container saves); "" for a URI that
    does not parse (the schema's pattern lets `https://[bad/x.gguf` through, and urlparse raises)."""
    try:
        return urlparse(uri).path.rsplit("/", 1)[-1]
    except ValueError:
        return ""


def _climbs_out(path: str) -> bool:
    """A path that leaves the volume it is relative to (it would read the container's own files)."""
    return path.startswith("/") or ".." in PurePosixPath(path).parts


def plan_spec_errors(
    name: str, spec: dict[str, Any]
) -> tuple[api.ModelDeploymentSpec | None, list[SpecError]]:
    """Parse and check `spec`: (the typed spec, []) when valid, (None or the spec, errors) otherwise."""
    errors: list[SpecError] = []
    if len(name) > api.MAX_NAME_LENGTH:
        errors.append(
            SpecError("NameTooLong", f"metadata.name must be at most {api.MAX_NAME_LENGTH} characters")
        )
    if not re.fullmatch(api.NAME_PATTERN, name):
        errors.append(
            SpecError(
                "InvalidName",
                f"metadata.name {name!r} must start with a lowercase letter and hold only lowercase "
                "letters, digits and '-' (its Services' names are DNS-1035 labels)",
            )
        )
    try:
        parsed = api.parse_spec(spec)
    except ValidationError as e:
        details = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'spec'}: {err['msg']}" for err in e.errors()
        )
        return None, [*errors, SpecError("InvalidSpec", details)]

    builtin = parsed.model.builtin
    if builtin is not None and builtin not in api.BUILTIN_MODELS:
        errors.append(
            SpecError(
                "UnknownBuiltinModel",
                f"model.builtin {builtin!r} is not a built-in model; "
                f"built-in: {', '.join(api.BUILTIN_MODELS)}",
            )
        )
    if parsed.model.uri is not None:
        file_name = model_file_name(parsed.model.uri)
        try:
            urlparse(parsed.model.uri)
        except ValueError as e:
            errors.append(SpecError("InvalidModelURI", f"model.uri {parsed.model.uri!r} is not a URL: {e}"))
        else:
            if not (file_name.endswith(".gguf") or file_name.endswith(ARCHIVE_SUFFIXES)):
                errors.append(
                    SpecError(
                        "UnsupportedModelURI",
                        f"model.uri must name a .gguf file or a .tar/.tar.gz/.tgz archive, got {file_name!r}",
                    )
                )

    # Label keys: a schema pattern cannot reach a map's keys (structural schemas have no
    # propertyNames), so they are checked here, before anything is applied.
    selectors = {role: getattr(parsed, role) for role in ("prefill", "decode", "colocated")}
    for where, obj in {**selectors, "router": parsed.router}.items():
        for key in obj.node_selector if obj is not None else {}:
            if len(key) > 316 or not re.fullmatch(api.QUALIFIED_NAME_PATTERN, key):
                errors.append(
                    SpecError(
                        "InvalidNodeSelector",
                        f"{where}.nodeSelector key {key!r} is not a label key "
                        "(an optional DNS-subdomain prefix and '/', then up to 63 of [-A-Za-z0-9_.])",
                    )
                )

    size = parsed.model.storage_size
    if size is not None and quantity_bytes(size) < MIN_STORAGE_BYTES:
        errors.append(
            SpecError(
                "StorageSizeTooSmall",
                f"model.storageSize {size!r} is less than 1Mi; give a unit (e.g. 40Gi for 40 GiB)",
            )
        )

    if parsed.model.pvc is not None and _climbs_out(parsed.model.pvc.path):
        errors.append(
            SpecError(
                "ModelPathOutsideVolume",
                f"model.pvc.path {parsed.model.pvc.path!r} must stay inside the claim (no '..')",
            )
        )

    seen: set[str] = set()
    for adapter in parsed.adapters:
        if adapter.name in seen:
            errors.append(SpecError("DuplicateAdapterName", f"adapter name {adapter.name!r} is used twice"))
        seen.add(adapter.name)
        if "://" in adapter.source:
            # The path names the archive; a query may follow (a presigned URL's signature).
            if not adapter.source.startswith(("http://", "https://")) or not model_file_name(
                adapter.source
            ).endswith(ARCHIVE_SUFFIXES):
                errors.append(
                    SpecError(
                        "UnsupportedAdapterURI",
                        f"adapter {adapter.name!r}: a URI source must be an http(s) .tar/.tar.gz/.tgz "
                        f"archive of the PEFT adapter folder, got {adapter.source!r}",
                    )
                )
        elif _climbs_out(adapter.source):
            errors.append(
                SpecError(
                    "AdapterPathOutsideVolume",
                    f"adapter {adapter.name!r}: source {adapter.source!r} must be a relative path inside "
                    "the model volume (no leading '/', no '..')",
                )
            )
        elif parsed.model.pvc is None:
            errors.append(
                SpecError(
                    "AdapterPathWithoutVolume",
                    f"adapter {adapter.name!r}: source {adapter.source!r} is a path in the model volume, "
                    "which only a model.pvc provides; use a URI or a PVC model",
                )
            )
    listed = sum(len(a.name) + len(a.source) for a in parsed.adapters)
    if listed > MAX_ADAPTER_LIST_BYTES:
        errors.append(
            SpecError(
                "AdapterListTooLarge",
                f"the adapters' names and sources take {listed} bytes, more than the "
                f"{MAX_ADAPTER_LIST_BYTES} the deployment's ConfigMap can carry (twice, within its 1 MiB)",
            )
        )

    for role, pool in parsed.pools().items():
        if pool.gpu_product is not None and pool.gpus == 0:
            errors.append(
                SpecError(
                    "GPUProductWithoutGPUs",
                    f"{role}.gpuProduct is {pool.gpu_product!r} but {role}.gpus is 0; "
                    "set gpus or remove gpuProduct",
                )
            )
        if pool.port == pool.metrics_port:
            errors.append(
                SpecError("PortCollision", f"{role}.port and {role}.metricsPort are both {pool.port}")
            )

    router = parsed.router
    ports = {"grpcPort": router.grpc_port, "metricsPort": router.metrics_port}
    if router.http_port is not None:
        ports["httpPort"] = router.http_port
    if router.kserve_port is not None:
        ports["kservePort"] = router.kserve_port
    by_port: dict[int, list[str]] = {}
    for field, port in ports.items():
        by_port.setdefault(port, []).append(field)
    for port, fields in sorted(by_port.items()):
        if len(fields) > 1:
            errors.append(SpecError("PortCollision", f"router.{' and router.'.join(fields)} are all {port}"))
    return parsed, errors
