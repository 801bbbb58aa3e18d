"""`plan_patch`: what (if anything) to write so a live object holds the fields we own. Pure.

We own exactly the fields our builders set. A field is in sync when the live object has the same
value there; fields the API server or others add (defaults, status, other annotations) are ignored.
Fields we set on an earlier pass but no longer want are removed: the last desired object is kept in
an annotation (as `kubectl apply` does) and keys that left it become `null` in the merge patch.
The patch is a JSON merge patch (RFC 7386): maps merge, lists are replaced whole.

`None` from `plan_patch` means "no write": a pass over an unchanged resource makes no API call.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from decimal import Decimal, InvalidOperation
from typing import Any

LAST_APPLIED_ANNOTATION = "tandem.dev/last-applied"

# The API server writes a quantity finer than 1m back with n or u (cpu: "0.0001" reads "100u"):
# without them here, such a child looked changed and was patched again on every pass.
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(n|u|m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_SUFFIX = {
    None: Decimal(1), "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("0.001"),
    "k": Decimal(10) ** 3, "M": Decimal(10) ** 6,
    "G": Decimal(10) ** 9, "T": Decimal(10) ** 12, "P": Decimal(10) ** 15, "E": Decimal(10) ** 18,
    "Ki": Decimal(2) ** 10, "Mi": Decimal(2) ** 20, "Gi": Decimal(2) ** 30, "Ti": Decimal(2) ** 40,
    "Pi": Decimal(2) ** 50, "Ei": Decimal(2) ** 60,
}  # fmt: skip


def _quantity(value: str) -> Decimal | None:
    m = _QUANTITY.match(value)
    if m is None:
        return None
    try:
        return Decimal(m.group(1)) * _SUFFIX[m.group(2)]
    except InvalidOperation:
        return None


def _same_scalar(want: Any, have: Any) -> bool:
    if want == have and type(want) is type(have):
        return True
    # The API server canonicalises quantities ("0.5" reads back as "500m", "1024Mi" as "1Gi").
    if isinstance(want, str) and isinstance(have, str):
        a, b = _quantity(want), _quantity(have)
        return a is not None and a == b
    return False


def is_subset(want: Any, have: Any) -> bool:
    """True when every field set in `want` has the same value in `have` (extra fields in `have` are fine)."""
    if isinstance(want, dict):
        if not isinstance(have, dict):
            return False
        for key, value in want.items():
            if key not in have:
                # Omitted when empty on the server side (an env var's value "", an empty list).
                if value is None or (isinstance(value, (str, list, dict)) and not value):
                    continue
                return False
            if not is_subset(value, have[key]):
                return False
        return True
    if isinstance(want, list):
        if not isinstance(have, list) or len(want) != len(have):
            return False
        return all(is_subset(w, h) for w, h in zip(want, have))
    return _same_scalar(want, have)


def _removals(last: Any, desired: Any, live: Any) -> dict[str, Any]:
    """Keys we set before (in `last`), want no more (not in `desired`) and that are still live: -> None."""
    out: dict[str, Any] = {}
    if not (isinstance(last, dict) and isinstance(desired, dict) and isinstance(live, dict)):
        return out
    for key, old in last.items():
        if key not in live:
            continue
        if key not in desired:
            out[key] = None
        elif isinstance(old, dict) and isinstance(desired[key], dict):
            sub = _removals(old, desired[key], live[key])
            if sub:
                out[key] = sub
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def _strip_last_applied(obj: dict[str, Any]) -> dict[str, Any]:
    obj = copy.deepcopy(obj)
    annotations = obj.get("metadata", {}).get("annotations", {})
    annotations.pop(LAST_APPLIED_ANNOTATION, None)
    return obj


# Strings longer than this are recorded by digest: the record serves to find the keys we set and no
# longer want (`_removals` reads keys, never values), and an annotation holds at most 256 KiB, which
# a ConfigMap's files copied in whole (engine.json, the adapter list) would use up.
_RECORD_MAX_STRING = 128


def _digested(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _digested(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_digested(v) for v in value]
    if isinstance(value, str) and len(value) > _RECORD_MAX_STRING:
        return "sha256:" + hashlib.sha256(value.encode()).hexdigest()
    return value


def with_last_applied(desired: dict[str, Any]) -> dict[str, Any]:
    """`desired` plus the annotation recording it (compact JSON, sorted: stable across passes; long
    strings by digest)."""
    out = copy.deepcopy(desired)
    record = json.dumps(_digested(_strip_last_applied(desired)), sort_keys=True, separators=(",", ":"))
    out.setdefault("metadata", {}).setdefault("annotations", {})[LAST_APPLIED_ANNOTATION] = record
    return out


def last_applied(live: dict[str, Any]) -> dict[str, Any]:
    text = live.get("metadata", {}).get("annotations", {}).get(LAST_APPLIED_ANNOTATION)
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def plan_patch(desired: dict[str, Any], live: dict[str, Any]) -> dict[str, Any] | None:
    """The merge patch that brings `live` to `desired` on our fields, or None if it is already there."""
    want = with_last_applied(desired)
    removals = _removals(last_applied(live), _strip_last_applied(desired), live)
    if not removals and is_subset(want, live):
        return None
    patch = copy.deepcopy(want)
    for key in ("apiVersion", "kind"):
        patch.pop(key, None)
    return _merge(patch, removals)


def replicas_patch(live: dict[str, Any], replicas: int) -> dict[str, Any]:
    """Merge patch setting a Deployment's `spec.replicas` (the autoscaler's write), with the
    last-applied record updated to match, so that the next reconcile pass finds nothing to write."""
    patch: dict[str, Any] = {"spec": {"replicas": replicas}}
    record = last_applied(live)
    if isinstance(record.get("spec"), dict) and "replicas" in record["spec"]:
        record["spec"]["replicas"] = replicas
        text = json.dumps(record, sort_keys=True, separators=(",", ":"))
        patch["metadata"] = {"annotations": {LAST_APPLIED_ANNOTATION: text}}
    return patch
