"""Builders: each example in manifests/examples produces exactly the expected objects.

Two layers: golden files (tests/operator/golden/<example>.yaml, the whole output; regenerate with
TANDEM_UPDATE_GOLDEN=1 after an intended change and review the diff), and explicit assertions on the
fields that matter (placement, limits, args, probes, labels, owner references) that hold regardless
of the golden files.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from tandem_operator import api
from tandem_operator.builders import Owner, build_children
from tandem_operator.validation import plan_spec_errors

from .conftest import EXAMPLES, load_example

GOLDEN = Path(__file__).parent / "golden"
UID = "00000000-0000-0000-0000-000000000001"


def build(example: str) -> dict[tuple[str, str], dict]:
    manifest = load_example(example)
    spec, errors = plan_spec_errors(manifest["metadata"]["name"], manifest["spec"])
    assert errors == [] and spec is not None
    owner = Owner(manifest["metadata"]["name"], manifest["metadata"]["namespace"], UID)
    return {(o["kind"], o["metadata"]["name"]): o for o in build_children(owner, spec)}


def pod(dep: dict) -> dict:
    return dep["spec"]["template"]["spec"]


def container(dep: dict) -> dict:
    return pod(dep)["containers"][0]


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_examples_match_golden_files(example: str):
    manifest = load_example(example)
    spec, _ = plan_spec_errors(manifest["metadata"]["name"], manifest["spec"])
    owner = Owner(manifest["metadata"]["name"], manifest["metadata"]["namespace"], UID)
    text = yaml.safe_dump_all(build_children(owner, spec), sort_keys=False)
    assert "&id" not in text  # no dict shared between two places (YAML anchors): mutation hazards
    path = GOLDEN / example
    if os.environ.get("TANDEM_UPDATE_GOLDEN"):
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.read_text() == text, f"{path} differs; rerun with TANDEM_UPDATE_GOLDEN=1 and review"


def test_cpu_demo_objects():
    objs = build("cpu-demo.yaml")
    n = "smollm2-demo"
    assert set(objs) == {
        ("ServiceAccount", n),
        ("ConfigMap", f"{n}-config"),
        *{(k, f"{n}-{c}") for k in ("Service", "Deployment", "PodDisruptionBudget")
          for c in ("prefill", "decode", "router")},
    }  # fmt: skip
    for obj in objs.values():
        assert obj["metadata"]["namespace"] == "default"
        assert obj["metadata"]["ownerReferences"] == [
            {"apiVersion": "tandem.dev/v1alpha1", "kind": "ModelDeployment", "name": n, "uid": UID,
             "controller": True, "blockOwnerDeletion": True}
        ]  # fmt: skip
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "tandem"
        assert labels["app.kubernetes.io/instance"] == n
        assert labels["app.kubernetes.io/managed-by"] == "tandem-operator"
        assert labels["app.kubernetes.io/part-of"] == "tandem"

    prefill = objs[("Deployment", f"{n}-prefill")]
    assert prefill["metadata"]["labels"]["app.kubernetes.io/component"] == "prefill"
    assert prefill["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": "tandem",
        "app.kubernetes.io/instance": n,
        "app.kubernetes.io/component": "prefill",
    }
    c = container(prefill)
    assert c["command"] == ["tandem"]
    assert c["args"] == [
        "worker", "--role", "prefill", "--model", "smollm2-135m", "--host", "0.0.0.0",
        "--port", "50061", "--metrics-port", "9091", "--device", "cpu",
        "--max-num-batched-tokens", "2048", "--max-pending", "256", "--kv-cache-bytes", "268435456",
    ]  # fmt: skip
    # CPU-only pool: no GPU limits, no GPU toleration, no GPU product affinity.
    assert c["resources"] == {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "2Gi"}}
    assert "tolerations" not in pod(prefill)
    assert "nodeAffinity" not in pod(prefill)["affinity"]
    # Probes: gRPC health for startup and readiness, TCP for liveness.
    assert c["readinessProbe"]["grpc"] == {"port": 50061}
    assert c["startupProbe"]["grpc"] == {"port": 50061}
    assert c["startupProbe"]["failureThreshold"] * c["startupProbe"]["periodSeconds"] >= 300
    assert c["livenessProbe"]["tcpSocket"] == {"port": 50061}
    assert pod(prefill)["terminationGracePeriodSeconds"] == 60  # > the worker's 30 s drain
    # Prefill prefers the zone of this deployment's decode pods (and vice versa).
    affinity = pod(prefill)["affinity"]["podAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]
    assert affinity["podAffinityTerm"] == {
        "labelSelector": {
            "matchLabels": {
                "app.kubernetes.io/name": "tandem",
                "app.kubernetes.io/instance": n,
                "app.kubernetes.io/component": "decode",
            }
        },
        "topologyKey": "topology.kubernetes.io/zone",
    }
    spread = pod(prefill)["topologySpreadConstraints"][0]
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert spread["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "prefill"
    assert pod(prefill)["serviceAccountName"] == n
    startup = c["startupProbe"]
    assert prefill["spec"]["progressDeadlineSeconds"] > startup["failureThreshold"] * startup["periodSeconds"]
    assert pod(prefill)["automountServiceAccountToken"] is False
    assert {"name": "TANDEM_CACHE_DIR", "value": "/var/cache/tandem"} in c["env"]

    decode = objs[("Deployment", f"{n}-decode")]
    assert flag(container(decode)["args"], "--role") == "decode"
    decode_affinity = pod(decode)["affinity"]["podAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"
    ]
    assert decode_affinity[0]["podAffinityTerm"]["labelSelector"]["matchLabels"][
        "app.kubernetes.io/component"
    ] == ("prefill")

    router = objs[("Deployment", f"{n}-router")]
    assert container(router)["args"] == [
        "router", "--model", "smollm2-135m", "--host", "0.0.0.0", "--port", "50051",
        "--metrics-port", "9090", "--max-in-flight", "512", "--slo-ttft-ms", "1000", "--slo-tpot-ms", "100",
        "--http-port", "8000",
        "--decode", f"dns:{n}-decode.default.svc:50061", "--prefill", f"dns:{n}-prefill.default.svc:50061",
    ]  # fmt: skip
    assert container(router)["readinessProbe"]["grpc"] == {"port": 50051}
    # The router's health waits for workers: its startup probe must not kill it meanwhile.
    assert container(router)["startupProbe"]["tcpSocket"] == {"port": 50051}
    for dep in (prefill, decode, router):
        assert container(dep)["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        }
        assert pod(dep)["securityContext"] == {"seccompProfile": {"type": "RuntimeDefault"}}

    headless = objs[("Service", f"{n}-decode")]
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"]["app.kubernetes.io/component"] == "decode"
    assert [(p["name"], p["port"]) for p in headless["spec"]["ports"]] == [("grpc", 50061), ("metrics", 9091)]
    router_svc = objs[("Service", f"{n}-router")]
    assert router_svc["spec"]["type"] == "ClusterIP"
    assert [(p["name"], p["port"]) for p in router_svc["spec"]["ports"]] == [
        ("grpc", 50051),
        ("metrics", 9090),
        ("http", 8000),
    ]

    pdb = objs[("PodDisruptionBudget", f"{n}-decode")]
    assert pdb["spec"] == {
        "maxUnavailable": 1,
        "selector": {"matchLabels": headless["spec"]["selector"]},
    }
    # The built-in model needs no model volume; the config and the conversion cache are mounted.
    assert [v["name"] for v in pod(prefill)["volumes"]] == ["config", "cache"]
    assert "initContainers" not in pod(prefill)


def test_heterogeneous_pools_land_on_their_own_gpu_types():
    objs = build("heterogeneous.yaml")
    n = "llama-8b"
    prefill, decode = objs[("Deployment", f"{n}-prefill")], objs[("Deployment", f"{n}-decode")]

    def product(dep: dict) -> list[str]:
        terms = pod(dep)["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        (expr,) = terms["nodeSelectorTerms"][0]["matchExpressions"]
        assert expr["key"] == "nvidia.com/gpu.product" and expr["operator"] == "In"
        return expr["values"]

    assert product(prefill) == ["NVIDIA-H100-80GB-HBM3"]
    assert product(decode) == ["NVIDIA-A100-SXM4-80GB"]
    for dep in (prefill, decode):
        res = container(dep)["resources"]
        assert res["limits"]["nvidia.com/gpu"] == "1"
        assert res["requests"]["nvidia.com/gpu"] == "1"
        assert "cpu" not in res["limits"]
        assert flag(container(dep)["args"], "--device") == "cuda"
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod(dep)[
            "tolerations"
        ]
    # The decode pool's own toleration is added after the GPU one.
    assert pod(decode)["tolerations"][1] == {
        "key": "dedicated",
        "operator": "Equal",
        "value": "inference",
        "effect": "NoSchedule",
    }
    assert prefill["spec"]["replicas"] == 2 and decode["spec"]["replicas"] == 4
    # The model comes from a read-only PVC.
    assert flag(container(prefill)["args"], "--model") == "/models/llama-3.1-8b-instruct"
    assert {"name": "model", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}} in pod(
        prefill
    )["volumes"]
    assert {"name": "model", "mountPath": "/models", "readOnly": True} in container(prefill)["volumeMounts"]
    assert flag(container(prefill)["args"], "--max-num-batched-tokens") == "8192"
    assert objs[("Service", f"{n}-router")]["spec"]["type"] == "LoadBalancer"
    assert objs[("Deployment", f"{n}-router")]["spec"]["replicas"] == 2
    # The router runs no GPU work: no GPU limits or GPU toleration.
    router = objs[("Deployment", f"{n}-router")]
    assert "nvidia.com/gpu" not in container(router)["resources"]["limits"]
    assert "tolerations" not in pod(router)
    # Adapters, SLOs and the autoscaling policy reach the engine config.
    engine = objs[("ConfigMap", f"{n}-config")]["data"]["engine.json"]
    assert '"name": "sql-assistant"' in engine and '"ttftMs": 500' in engine and '"maxStep": 2' in engine


def test_colocated_example_fetches_its_model_and_has_one_pool():
    objs = build("colocated.yaml")
    n = "qwen-small"
    assert ("Deployment", f"{n}-prefill") not in objs and ("Deployment", f"{n}-decode") not in objs
    dep = objs[("Deployment", f"{n}-colocated")]
    assert flag(container(dep)["args"], "--role") == "colocated"
    assert flag(container(dep)["args"], "--model") == "/models/qwen2-0.5b-instruct-q8_0.gguf"
    # No peer pool: no pod affinity towards one.
    assert "podAffinity" not in pod(dep).get("affinity", {})
    (init,) = pod(dep)["initContainers"]
    assert init["image"] == "curlimages/curl:8.11.1"
    script = init["command"][2]
    assert "https://models.example.com/qwen2-0.5b-instruct-q8_0.gguf" in script
    assert "mv /models/.download /models/qwen2-0.5b-instruct-q8_0.gguf" in script
    assert {"name": "model", "emptyDir": {}} in pod(dep)["volumes"]
    router = objs[("Deployment", f"{n}-router")]
    args = container(router)["args"]
    assert flag(args, "--decode") == f"dns:{n}-colocated.default.svc:50061"
    assert "--prefill" not in args
    # The router tokenizes, so it gets the model too (same init container).
    assert pod(router)["initContainers"][0]["name"] == "fetch-model"


def test_archive_uri_is_unpacked_into_a_folder():
    manifest = load_example("colocated.yaml")
    manifest["spec"]["model"]["uri"] = "https://example.com/m/llama.tar.gz"
    spec, errors = plan_spec_errors("x", manifest["spec"])
    assert errors == []
    objs = build_children(Owner("x", "ns", UID), spec)
    dep = next(o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"] == "x-colocated")
    assert flag(container(dep)["args"], "--model") == "/models/model"
    assert "tar -xzf /models/.download -C /models/.unpack" in pod(dep)["initContainers"][0]["command"][2]


def test_config_change_changes_the_pod_template_hash():
    manifest = load_example("cpu-demo.yaml")
    spec1, _ = plan_spec_errors("d", manifest["spec"])
    manifest["spec"]["slo"] = {"ttftMs": 123}
    spec2, _ = plan_spec_errors("d", manifest["spec"])
    owner = Owner("d", "ns", UID)

    def template_hash(spec: api.ModelDeploymentSpec) -> str:
        dep = next(
            o
            for o in build_children(owner, spec)
            if o["metadata"]["name"] == "d-decode" and o["kind"] == "Deployment"
        )
        return dep["spec"]["template"]["metadata"]["annotations"]["tandem.dev/config-hash"]

    assert template_hash(spec1) != template_hash(spec2)
    assert template_hash(spec1) == template_hash(
        plan_spec_errors("d", load_example("cpu-demo.yaml")["spec"])[0]
    )


def test_adapters_reach_the_workers():
    """Adapters from a URI are fetched by an init container; every worker registers them all."""
    from tandem_operator import api, builders

    raw = yaml.safe_load((EXAMPLES / "heterogeneous.yaml").read_text())["spec"]
    raw["adapters"].append({"name": "from-web", "source": "https://example.com/a/from-web.tar.gz"})
    spec = api.parse_spec(raw)
    config = builders.build_engine_config(spec)
    paths = {a["name"]: a["path"] for a in config["adapters"]}
    assert paths == {
        "sql-assistant": "/models/adapters/sql-assistant",
        "support-bot": "/models/adapters/support-bot",
        "from-web": "/adapters/from-web",
    }
    args = builders.build_worker_args("decode", spec.decode, spec)
    assert args[args.index("--adapters-config") + 1] == "/etc/tandem/engine.json"
    inits = builders._init_containers(spec)
    assert [c["name"] for c in inits] == ["fetch-adapters"]
    script = inits[0]["command"][-1]
    assert "https://example.com/a/from-web.tar.gz" in script and "/adapters/from-web" in script
    assert "sql-assistant" not in script  # path sources come from the model volume, not the web
    mounts = {m["name"]: m for m in builders._model_mounts(spec)}
    assert mounts["adapters"]["readOnly"] and mounts["model"]["mountPath"] == "/models"


def test_router_serves_the_optional_client_apis():
    from tandem_operator import api, builders

    raw = yaml.safe_load((EXAMPLES / "cpu-demo.yaml").read_text())["spec"]
    raw["router"]["kservePort"] = 8001
    spec = api.parse_spec(raw)
    owner = Owner(name="demo", namespace="default", uid="u")
    args = builders.build_router_args(owner, spec)
    assert args[args.index("--http-port") + 1] == "8000" and args[args.index("--kserve-port") + 1] == "8001"
    svc = builders.build_router_service(owner, spec)
    ports = {p["name"]: p for p in svc["spec"]["ports"]}
    assert ports["http"]["port"] == 8000 and ports["http"]["targetPort"] == "http"
    assert ports["kserve"]["appProtocol"] == "grpc"
    dep = builders.build_router_deployment(owner, spec, "digest")
    names = {p["name"]: p["containerPort"] for p in dep["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert names == {"grpc": 50051, "metrics": 9090, "http": 8000, "kserve": 8001}
    raw["router"]["kservePort"] = 8000
    _, errors = plan_spec_errors("demo", raw)
    assert [e.reason for e in errors] == ["PortCollision"]
