"""A pool's `rollout`: the RollingUpdate strategy of its worker Deployment.

Each worker pod holds a GPU. The strategy was fixed at maxSurge 1 / maxUnavailable 0, so on a cluster
with no spare GPU every rollout (a new image, a changed spec) waited on a Pending surge pod for ever.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from tandem_operator import api
from tandem_operator.builders import Owner, build_children
from tandem_operator.validation import plan_spec_errors

from .conftest import REPO_ROOT, load_example

CRD = REPO_ROOT / "manifests" / "crds" / f"{api.PLURAL}.{api.GROUP}.yaml"
SURGE_ONE = {"maxSurge": 1, "maxUnavailable": 0}


def _demo(rollout: dict[str, Any] | None, role: str = "decode") -> dict[str, Any]:
    spec = copy.deepcopy(load_example("cpu-demo.yaml")["spec"])
    if rollout is not None:
        spec[role]["rollout"] = rollout
    return spec


def _children(spec: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    parsed, errors = plan_spec_errors("demo", spec)
    assert errors == [] and parsed is not None
    return {(o["kind"], o["metadata"]["name"]): o for o in build_children(Owner("demo", "ns", "u"), parsed)}


def _strategy(objs: dict[tuple[str, str], dict[str, Any]], component: str) -> dict[str, Any]:
    strategy = objs[("Deployment", f"demo-{component}")]["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    return strategy["rollingUpdate"]


def _cel_accepts(rollout: dict[str, Any]) -> bool:
    """What the API server's CEL rules (the committed CRD's) say of a pool's `rollout`."""
    celpy = pytest.importorskip("celpy")
    root = yaml.safe_load(CRD.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    schema = root["properties"]["spec"]["properties"]["decode"]["properties"]["rollout"]
    env = celpy.Environment()

    def holds(rules: list[dict[str, str]], value: Any) -> bool:
        return all(
            env.program(env.compile(r["rule"])).evaluate({"self": celpy.json_to_cel(value)}) for r in rules
        )

    fields = all(
        holds(schema["properties"][name]["x-kubernetes-validations"], value)
        for name, value in rollout.items()
    )
    return fields and holds(schema["x-kubernetes-validations"], rollout)


def test_without_a_rollout_a_pool_surges_one_pod():
    """The default keeps every desired pod serving through a roll, and a broken update takes nothing
    down; it needs a spare GPU, which a pool without one opts out of with `maxSurge: 0`."""
    spec = api.parse_spec(_demo(None))
    assert spec.decode.rollout.rolling_update() == SURGE_ONE
    objs = _children(_demo(None))
    for component in ("prefill", "decode", "router"):
        assert _strategy(objs, component) == SURGE_ONE, component
    colocated = load_example("colocated.yaml")["spec"]
    assert api.parse_spec(colocated).colocated.rollout.rolling_update() == SURGE_ONE


@pytest.mark.parametrize(
    "rollout, expected",
    [
        ({}, SURGE_ONE),
        # No spare GPU: stop an old pod first. maxSurge 0 alone must do, as it does in Kubernetes.
        ({"maxSurge": 0}, {"maxSurge": 0, "maxUnavailable": 1}),
        ({"maxSurge": "0%"}, {"maxSurge": "0%", "maxUnavailable": 1}),
        ({"maxSurge": 0, "maxUnavailable": 1}, {"maxSurge": 0, "maxUnavailable": 1}),
        ({"maxSurge": 0, "maxUnavailable": "100%"}, {"maxSurge": 0, "maxUnavailable": "100%"}),
        ({"maxUnavailable": 0}, SURGE_ONE),
        ({"maxUnavailable": 2}, {"maxSurge": 1, "maxUnavailable": 2}),
        # Percentages stay strings (the API server keeps an IntOrString as given: a number would read
        # back changed and be patched on every pass).
        ({"maxSurge": "25%", "maxUnavailable": "50%"}, {"maxSurge": "25%", "maxUnavailable": "50%"}),
        ({"maxSurge": 3, "maxUnavailable": 0}, {"maxSurge": 3, "maxUnavailable": 0}),
    ],
)
def test_a_pools_rollout_sets_its_deployments_strategy(rollout: dict, expected: dict):
    import kubernetes_validate

    objs = _children(_demo(rollout))
    assert _strategy(objs, "decode") == expected
    # Only that pool's: the other pool keeps its own, and the router (no GPU) always surges.
    assert _strategy(objs, "prefill") == SURGE_ONE
    assert _strategy(objs, "router") == SURGE_ONE
    # The setting is no part of the pod template, so changing it (say, to unstick a roll waiting
    # for a GPU) lets the roll under way go on instead of starting another.
    plain = _children(_demo(None))
    for component in ("prefill", "decode", "router"):
        key = ("Deployment", f"demo-{component}")
        assert objs[key]["spec"]["template"] == plain[key]["spec"]["template"]
    # The eviction budget is independent of it (the Deployment controller evicts nothing).
    assert objs[("PodDisruptionBudget", "demo-decode")] == plain[("PodDisruptionBudget", "demo-decode")]
    dep = objs[("Deployment", "demo-decode")]
    for version in ("1.27.0", kubernetes_validate.latest_version()):
        kubernetes_validate.validate(dep, version, strict=True)
    assert _cel_accepts(rollout)


@pytest.mark.parametrize(
    "rollout, where, message",
    [
        # Kubernetes refuses both 0 (the roll could neither add a pod nor take one down).
        ({"maxSurge": 0, "maxUnavailable": 0}, "decode.rollout", "cannot both be 0"),
        ({"maxSurge": "0%", "maxUnavailable": "0%"}, "decode.rollout", "cannot both be 0"),
        ({"maxSurge": -1}, "decode.rollout.maxSurge", "must be a number of pods"),
        ({"maxUnavailable": -1}, "decode.rollout.maxUnavailable", "must be a number of pods"),
        ({"maxUnavailable": "-10%"}, "decode.rollout.maxUnavailable", "must be a number of pods"),
        # Kubernetes refuses maxUnavailable over 100%; a surge over 100% adds no pod.
        ({"maxUnavailable": "150%"}, "decode.rollout.maxUnavailable", "must be a number of pods"),
        ({"maxSurge": "150%"}, "decode.rollout.maxSurge", "must be a number of pods"),
        ({"maxSurge": 1001}, "decode.rollout.maxSurge", "must be a number of pods"),
        # A count as a string is no IntOrString the Deployment takes ("1" is refused there).
        ({"maxSurge": "1"}, "decode.rollout.maxSurge", "must be a number of pods"),
        ({"maxSurge": "25"}, "decode.rollout.maxSurge", "must be a number of pods"),
        ({"maxSurge": "01%"}, "decode.rollout.maxSurge", "must be a number of pods"),
        ({"maxUnavailable": 1.5}, "decode.rollout.maxUnavailable", "must be a number of pods"),
        ({"maxSurge": True}, "decode.rollout.maxSurge", "must be a number of pods"),
    ],
)
def test_bad_rollouts_are_refused_naming_the_field(rollout: dict, where: str, message: str):
    spec = _demo(rollout)
    with pytest.raises(ValidationError, match=message):
        api.parse_spec(spec)
    _, errors = plan_spec_errors("demo", spec)
    assert [e.reason for e in errors] == ["InvalidSpec"]
    assert errors[0].message.startswith(f"{where}: ") and message in errors[0].message
    # The API server refuses it at apply time too, instead of the operator's Deployment failing (422).
    assert not _cel_accepts(rollout)


def test_the_both_zero_message_says_what_to_set():
    _, errors = plan_spec_errors("demo", _demo({"maxSurge": 0, "maxUnavailable": 0}, role="prefill"))
    assert errors[0].message.startswith("prefill.rollout: ")
    assert "set maxUnavailable to 1" in errors[0].message
