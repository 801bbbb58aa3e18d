"""The API: typed models, the generated CRD (drift, structure, CEL) and the semantic checks."""

from __future__ import annotations

import pytest
import yaml
from pydantic import ValidationError

from tandem_operator import api, crd
from tandem_operator.validation import plan_spec_errors

from .conftest import EXAMPLES, REPO_ROOT, load_example

CRD_DIR = REPO_ROOT / "manifests" / "crds"


def test_committed_crds_match_the_models():
    """Like proto/generate.py --check: `make crds` must have been run after changing api.py."""
    assert crd.main(["--check", "--out", str(CRD_DIR)]) == 0


def test_check_fails_on_drift(tmp_path):
    for name, text in crd.render_files().items():
        (tmp_path / name).write_text(text)
    assert crd.main(["--check", "--out", str(tmp_path)]) == 0
    path = tmp_path / f"{api.PLURAL}.{api.GROUP}.yaml"
    path.write_text(path.read_text().replace("maximum: 1000", "maximum: 1001"))
    assert crd.main(["--check", "--out", str(tmp_path)]) == 1


def _walk(schema: dict, path: str = ""):
    yield path, schema
    for name, child in schema.get("properties", {}).items():
        yield from _walk(child, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from _walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _walk(schema["additionalProperties"], f"{path}{{}}")


def test_crd_schema_is_structural_and_documented():
    doc = yaml.safe_load((CRD_DIR / f"{api.PLURAL}.{api.GROUP}.yaml").read_text())
    assert doc["metadata"]["name"] == "modeldeployments.tandem.dev"
    assert doc["spec"]["scope"] == "Namespaced"
    assert doc["spec"]["names"]["shortNames"] == ["tmd"]
    (version,) = doc["spec"]["versions"]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Mode"] == ".spec.mode"
    assert columns["Prefill"] == ".status.prefill.summary"
    assert columns["Decode"] == ".status.decode.summary"
    assert columns["Colocated"] == ".status.colocated.summary"
    assert columns["Ready"] == '.status.conditions[?(@.type=="Ready")].status'
    assert columns["Workers"] == '.status.conditions[?(@.type=="WorkersHealthy")].reason'
    # Only -o wide adds a column: a colocated deployment's size and its health show by default.
    assert [c["name"] for c in version["additionalPrinterColumns"] if c.get("priority")] == ["Endpoint"]
    assert columns["Age"] == ".metadata.creationTimestamp"
    root = version["schema"]["openAPIV3Schema"]
    for path, node in _walk(root):
        # Structural: a type everywhere but on IntOrString nodes (which Kubernetes requires untyped,
        # and which then need their own CEL check), none of JSON Schema's combinators or references.
        if node.get("x-kubernetes-int-or-string"):
            assert "type" not in node and node["x-kubernetes-validations"], path
        else:
            assert "type" in node, path
        assert not {"$ref", "anyOf", "oneOf", "allOf", "$defs", "title"} & set(node), path
        if path and path != ".metadata" and not path.endswith(("[]", "{}")):  # fields, not items
            assert node.get("description"), f"{path} has no description"
    spec = root["properties"]["spec"]
    assert spec["properties"]["mode"]["enum"] == ["disaggregated", "colocated"]
    assert spec["properties"]["mode"]["default"] == "disaggregated"
    pool = spec["properties"]["prefill"]
    assert pool["properties"]["gpus"]["minimum"] == 0 and pool["properties"]["gpus"]["maximum"] == 1
    assert pool["properties"]["replicas"]["default"] == 1
    rollout = pool["properties"]["rollout"]["properties"]
    assert rollout["maxSurge"]["x-kubernetes-int-or-string"] is True
    assert rollout["maxUnavailable"]["x-kubernetes-int-or-string"] is True
    assert spec["properties"]["router"]["default"] == {}  # so the API server fills the router's defaults
    slo = spec["properties"]["slo"]["properties"]["attainment"]
    assert slo["minimum"] == 0 and slo["exclusiveMinimum"] is True and slo["maximum"] == 1
    rules = {r["rule"] for r in pool["x-kubernetes-validations"]}
    assert "!has(self.minReplicas) || self.minReplicas <= self.replicas" in rules
    assert "!has(self.maxReplicas) || self.replicas <= self.maxReplicas" in rules
    assert any("filter" in r["rule"] for r in spec["properties"]["model"]["x-kubernetes-validations"])
    assert any("colocated" in r["rule"] for r in spec["x-kubernetes-validations"])
    assert root["x-kubernetes-validations"][0]["rule"] == "self.metadata.name.size() <= 50"
    assert root["properties"]["metadata"] == {"type": "object"}
    conditions = root["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert "type" in conditions["items"]["required"]


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_every_example_is_valid(example: str):
    manifest = load_example(example)
    assert manifest["apiVersion"] == api.API_VERSION and manifest["kind"] == api.KIND
    spec, errors = plan_spec_errors(manifest["metadata"]["name"], manifest["spec"])
    assert errors == [] and spec is not None


def _demo_spec() -> dict:
    return load_example("cpu-demo.yaml")["spec"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"prefill": {"replicas": 3, "maxReplicas": 2}}, "replicas must be <= maxReplicas"),
        ({"prefill": {"replicas": 1, "minReplicas": 2}}, "minReplicas must be <= replicas"),
        ({"model": {"builtin": "smollm2-135m", "uri": "https://x/y.gguf"}}, "exactly one of builtin"),
        ({"mode": "colocated"}, "mode colocated needs a colocated pool"),
        ({"decode": None}, "mode disaggregated needs prefill and decode"),
        ({"prefill": {"gpus": 2}}, "less than or equal to 1"),
        ({"prefill": {"memory": "lots"}}, "should match pattern"),
        ({"slo": {"attainment": 0}}, "greater than 0"),
        ({"autoscaling": {"prefillDecodeRatio": {"min": 2, "max": 1}}}, "ratio min must be <= max"),
        ({"prefill": {"port": 9000, "metricsPort": 9000}}, "port and metricsPort must differ"),
        ({"router": {"serviceType": "Ingress"}}, "ClusterIP"),
        ({"prefill": {"unknownField": 1}}, "Extra inputs are not permitted"),
        ({"terminationGracePeriodSeconds": 10}, "greater than or equal to 35"),
        ({"router": {"httpPort": 0}}, "greater than or equal to 1"),
        # The router's env is checked as the pools' is.
        ({"router": {"env": [{"name": "1 BAD", "value": "x"}]}}, "should match pattern"),
        ({"model": {"builtin": "smollm2-135m", "storageSize": "40 GB"}}, "should match pattern"),
        ({"prefill": {"minReplicas": 0}}, "greater than or equal to 1"),
        ({"prefill": {"tolerations": [{"effect": "NoSchedule"}]}}, "without a key must use operator Exists"),
        (
            {"prefill": {"tolerations": [{"key": "k", "operator": "Exists", "value": "v"}]}},
            "operator Exists takes no value",
        ),
        (
            {"decode": {"tolerations": [{"key": "k", "effect": "NoSchedule", "tolerationSeconds": 5}]}},
            "tolerationSeconds needs effect NoExecute",
        ),
        (
            {
                "mode": "colocated",
                "prefill": None,
                "decode": None,
                "colocated": {"gpus": 0},
                "autoscaling": {"enabled": True},
            },
            "mode colocated cannot enable it",
        ),
        ({"prefill": {"replicas": 0}, "autoscaling": {"enabled": True}}, "of at least 1"),
    ],
)
def test_models_refuse_what_the_schema_refuses(change: dict, message: str):
    spec = _demo_spec()
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict) and key != "model":
            spec[key] = {**spec[key], **value}
        elif value is None:
            spec.pop(key)
        else:
            spec[key] = value
    with pytest.raises(ValidationError, match=message):
        api.parse_spec(spec)
    # The operator reports the same as a condition reason rather than raising.
    _, errors = plan_spec_errors("x", spec)
    assert errors[0].reason == "InvalidSpec" and message.split()[0] in errors[0].message


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"model": {"builtin": "llama-405b"}}, "UnknownBuiltinModel"),
        (
            {
                "adapters": [
                    {"name": "a", "source": "https://example.com/a.tar.gz"},
                    {"name": "a", "source": "https://example.com/b.tgz"},
                ]
            },
            "DuplicateAdapterName",
        ),
        ({"adapters": [{"name": "a", "source": "adapters/a"}]}, "AdapterPathWithoutVolume"),
        ({"adapters": [{"name": "a", "source": "s3://bucket/a"}]}, "UnsupportedAdapterURI"),
        ({"prefill": {"gpus": 0, "gpuProduct": "NVIDIA-H100-80GB-HBM3"}}, "GPUProductWithoutGPUs"),
        ({"router": {"grpcPort": 8080, "httpPort": 8080}}, "PortCollision"),
        ({"model": {"uri": "https://example.com/model.bin"}}, "UnsupportedModelURI"),
        ({"model": {"uri": "https://[bad/model.gguf"}}, "InvalidModelURI"),
        # Paths that leave the volume would read the container's own files.
        ({"model": {"pvc": {"claimName": "m", "path": "../../etc/model"}}}, "ModelPathOutsideVolume"),
        (
            {
                "model": {"pvc": {"claimName": "m", "path": "llama"}},
                "adapters": [{"name": "a", "source": "adapters/../../../proc/self"}],
            },
            "AdapterPathOutsideVolume",
        ),
        ({"prefill": {"nodeSelector": {"pool type": "fast"}}}, "InvalidNodeSelector"),
    ],
)
def test_semantic_checks_the_schema_cannot_express(change: dict, reason: str):
    spec = {**_demo_spec(), **change}
    parsed, errors = plan_spec_errors("demo", spec)
    assert parsed is not None  # the shape is fine ...
    assert [e.reason for e in errors] == [reason]  # ... the meaning is not


def test_long_names_are_refused():
    _, errors = plan_spec_errors("x" * 51, _demo_spec())
    assert [e.reason for e in errors] == ["NameTooLong"]
    _, errors = plan_spec_errors("x" * 50, _demo_spec())
    assert errors == []


@pytest.mark.parametrize("name", ["llama.v3", "7b-chat", "demo-", "Demo", "a_b"])
def test_names_that_cannot_name_a_service_are_refused(name):
    # Valid names for the custom resource itself (DNS-1123 subdomains, or close), but its Services
    # ("<name>-router", ...) must be DNS-1035 labels.
    _, errors = plan_spec_errors(name, _demo_spec())
    assert [e.reason for e in errors] == ["InvalidName"], name


def test_autoscaled_pools_keep_a_floor_and_paused_manual_pools_are_fine():
    spec = _demo_spec()
    spec["prefill"] = {**spec["prefill"], "replicas": 0}  # manual: paused
    assert plan_spec_errors("demo", spec)[1] == []
    spec["autoscaling"] = {"enabled": True}
    with pytest.raises(ValidationError, match="of at least 1"):
        api.parse_spec(spec)
    spec["prefill"]["minReplicas"] = 1  # the autoscaler may start it from 0
    spec["prefill"]["replicas"] = 1
    assert plan_spec_errors("demo", spec)[1] == []


def test_defaults_fill_a_minimal_spec():
    spec = api.parse_spec({"model": {"builtin": "smollm2-135m"}, "image": "i", "prefill": {}, "decode": {}})
    assert spec.mode == api.Mode.disaggregated
    assert spec.prefill.gpus == 1 and spec.prefill.replicas == 1 and spec.prefill.port == 50061
    assert spec.router.grpc_port == 50051 and spec.router.service_type == api.ServiceType.ClusterIP
    assert spec.slo.attainment == 0.9 and spec.autoscaling.enabled is False
    assert spec.placement.affinity_topology_key == "topology.kubernetes.io/zone"


def test_builtin_models_match_the_worker():
    # The operator keeps its own list (it must not import the worker); the two must agree.
    loader = pytest.importorskip("tandem_worker.engine.loader")
    assert set(api.BUILTIN_MODELS) == set(loader.BUILTIN_MODELS)


# Each cross-field rule exists twice: CEL for the API server, Python for the operator. Evaluate both
# on the same objects (with cel-python, a CEL implementation independent of our code) so they
# cannot disagree, and so a CEL typo fails here instead of at `kubectl apply` time.
RULE_SAMPLES: dict[type, list[dict]] = {
    api.ModelSource: [
        {"builtin": "b"}, {"pvc": {"claimName": "c", "path": "p"}}, {"uri": "https://x/y.gguf"},
        {}, {"builtin": "b", "uri": "https://x/y.gguf"}, {"builtin": "b", "pvc": {}, "uri": "u"},
    ],
    api.Pool: [
        {"replicas": r, "port": 1, "metricsPort": m, **extra}
        for r in (0, 2, 5)
        for m in (1, 2)
        for extra in ({}, {"minReplicas": 2}, {"maxReplicas": 2}, {"minReplicas": 1, "maxReplicas": 4})
    ],
    api.Router: [{"grpcPort": 1, "metricsPort": 1}, {"grpcPort": 1, "metricsPort": 2}],
    api.Toleration: [
        {"operator": op, **extra}
        for op in ("Equal", "Exists")
        for extra in ({}, {"key": "k"}, {"key": "k", "value": "v"}, {"value": "v"}, {"key": "", "value": ""},
                      {"key": "k", "effect": "NoExecute", "tolerationSeconds": 5},
                      {"key": "k", "effect": "NoSchedule", "tolerationSeconds": 5},
                      {"key": "k", "tolerationSeconds": 5})
    ],
    api.RatioBand: [{"min": 0.5, "max": 1.0}, {"min": 1.0, "max": 1.0}, {"min": 2.0, "max": 1.0}],
    api.Rollout: [
        {**surge, **unavailable}
        for surge in ({}, {"maxSurge": 0}, {"maxSurge": "0%"}, {"maxSurge": 1}, {"maxSurge": "10%"})
        for unavailable in ({}, {"maxUnavailable": 0}, {"maxUnavailable": "0%"}, {"maxUnavailable": 2})
    ],
    api.ModelDeploymentSpec: [
        {"mode": mode, **pools}
        for mode in ("disaggregated", "colocated")
        for pools in ({"prefill": {}, "decode": {}}, {"colocated": {}}, {"prefill": {}},
                      {"prefill": {}, "decode": {}, "colocated": {}}, {"decode": {}, "colocated": {}})
    ] + [
        {"mode": mode, **pools, "autoscaling": auto}
        for mode in ("disaggregated", "colocated")
        for auto in ({}, {"enabled": False}, {"enabled": True})
        for pools in ({"prefill": {"replicas": 1}, "decode": {"replicas": 1}},
                      {"prefill": {"replicas": 0}, "decode": {"replicas": 1}},
                      {"prefill": {"replicas": 0, "minReplicas": 1}, "decode": {"replicas": 2}},
                      {"prefill": {"replicas": 1}, "decode": {"replicas": 3, "minReplicas": 0}},
                      {"colocated": {"replicas": 1}})
    ],
}  # fmt: skip


@pytest.mark.parametrize("model", list(RULE_SAMPLES), ids=lambda m: m.__name__)
def test_cel_rules_agree_with_the_python_checks(model):
    celpy = pytest.importorskip("celpy")
    from types import SimpleNamespace

    from pydantic.alias_generators import to_snake

    env = celpy.Environment()
    assert model.rules
    for rule in model.rules:
        program = env.program(env.compile(rule.cel))
        outcomes = set()
        for sample in RULE_SAMPLES[model]:
            fields = {to_snake(name): None for name in (f.alias or n for n, f in model.model_fields.items())}
            fields.update({to_snake(k): v for k, v in sample.items()})
            python_ok = rule.check(SimpleNamespace(**fields))
            cel_ok = bool(program.evaluate({"self": celpy.json_to_cel(sample)}))
            assert cel_ok == python_ok, (rule.cel, sample)
            outcomes.add(cel_ok)
        assert outcomes == {True, False}, f"samples never exercise both outcomes of {rule.cel!r}"


def test_the_name_rules_in_cel():
    celpy = pytest.importorskip("celpy")
    doc = yaml.safe_load((CRD_DIR / f"{api.PLURAL}.{api.GROUP}.yaml").read_text())
    rules = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["x-kubernetes-validations"]
    env = celpy.Environment()
    programs = [env.program(env.compile(rule["rule"])) for rule in rules]

    def accepted(name: str) -> bool:
        return all(p.evaluate({"self": celpy.json_to_cel({"metadata": {"name": name}})}) for p in programs)

    for name in ("x" * 50, "demo", "llama3-8b", "a"):
        assert accepted(name), name
        assert plan_spec_errors(name, _demo_spec())[1] == []  # the operator agrees
    for name in ("x" * 51, "llama.v3", "7b-chat", "demo-", "Demo"):
        assert not accepted(name), name
        assert plan_spec_errors(name, _demo_spec())[1] != []
