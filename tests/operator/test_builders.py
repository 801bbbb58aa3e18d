"""Builders: each example in manifests/examples produces exactly the expected objects.

Two layers: golden files (tests/operator/golden/<example>.yaml, the whole output; regenerate with
TANDEM_UPDATE_GOLDEN=1 after an intended change and review the diff), and explicit assertions on the
fields that matter (placement, limits, args, probes, labels, owner references) that hold regardless
of the golden files.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml

from tandem_operator import api, builders
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
        "--max-num-batched-tokens", "2048", "--max-pending", "256", "--drain-timeout", "55",
        "--kv-cache-bytes", "268435456",
    ]  # fmt: skip
    # CPU-only pool: no GPU limits, no GPU toleration, no GPU product affinity.
    assert c["resources"] == {
        "requests": {"cpu": "1", "memory": "2Gi", "ephemeral-storage": "3Gi"},
        "limits": {"memory": "2Gi", "ephemeral-storage": "3Gi"},
    }
    assert "tolerations" not in pod(prefill)
    assert "nodeAffinity" not in pod(prefill)["affinity"]
    # Probes: gRPC health for startup and readiness; liveness asks the worker's engine watchdog (a
    # hung engine keeps its port open), by the name the worker serves it under.
    from tandem_worker.server.health import LIVENESS_SERVICE

    assert c["readinessProbe"]["grpc"] == {"port": 50061}
    assert c["startupProbe"]["grpc"] == {"port": 50061}
    assert c["startupProbe"]["failureThreshold"] * c["startupProbe"]["periodSeconds"] >= 300
    assert c["livenessProbe"]["grpc"] == {"port": 50061, "service": LIVENESS_SERVICE}
    assert pod(prefill)["terminationGracePeriodSeconds"] == 60  # the drain (55 s) and 5 s to close
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
        "--served-model-name", "smollm2-135m",
        "--http-port", "8080",
        "--decode", f"dns:{n}-decode.default.svc:50061", "--prefill", f"dns:{n}-prefill.default.svc:50061",
    ]  # fmt: skip
    assert container(router)["readinessProbe"]["grpc"] == {"port": 50051}
    # The router's health waits for workers: its startup probe must not kill it meanwhile.
    assert container(router)["startupProbe"]["tcpSocket"] == {"port": 50051}
    assert container(router)["livenessProbe"]["tcpSocket"] == {"port": 50051}  # no engine to watch
    for dep in (prefill, decode, router):
        assert container(dep)["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
        }
        assert pod(dep)["securityContext"] == {
            "runAsNonRoot": True,
            "seccompProfile": {"type": "RuntimeDefault"},
        }

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
        "unhealthyPodEvictionPolicy": "AlwaysAllow",
    }
    # The built-in model needs no model volume; the config, the conversion cache and /tmp are mounted.
    assert [v["name"] for v in pod(prefill)["volumes"]] == ["config", "cache", "tmp"]
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
    n = "smollm2-small"
    assert ("Deployment", f"{n}-prefill") not in objs and ("Deployment", f"{n}-decode") not in objs
    dep = objs[("Deployment", f"{n}-colocated")]
    assert flag(container(dep)["args"], "--role") == "colocated"
    assert flag(container(dep)["args"], "--model") == "/models/smollm2-360m-instruct-q8_0.gguf"
    # No peer pool: no pod affinity towards one.
    assert "podAffinity" not in pod(dep).get("affinity", {})
    (init,) = pod(dep)["initContainers"]
    # The program test_fetch.py runs, in the volume `--model` reads.
    assert init["image"] == container(dep)["image"]
    assert init["command"][-3:] == [
        "model",
        "https://models.example.com/smollm2-360m-instruct-q8_0.gguf",
        "/models",
    ]
    assert init["volumeMounts"] == [
        {"name": "model", "mountPath": "/models"},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    assert {"name": "model", "emptyDir": {"sizeLimit": "4Gi"}} in pod(dep)["volumes"]
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
    assert pod(dep)["initContainers"][0]["command"][-3:] == [
        "model",
        "https://example.com/m/llama.tar.gz",
        "/models",
    ]


HASH = "tandem.dev/config-hash"


def _with(raw: dict, change: dict) -> dict:
    """`raw` with `change` merged in (one level into each top-level field)."""
    out = copy.deepcopy(raw)
    for key, value in change.items():
        out[key] = {**out[key], **value} if isinstance(value, dict) and key in out else value
    return out


def _templates(raw: dict) -> dict[str, dict]:
    spec, errors = plan_spec_errors("d", raw)
    assert errors == [] and spec is not None
    objs = build_children(Owner("d", "ns", UID), spec)
    return {o["metadata"]["name"]: o["spec"]["template"] for o in objs if o["kind"] == "Deployment"}


def _uri_adapter_spec() -> dict:
    raw = load_example("heterogeneous.yaml")["spec"]
    raw["adapters"].append({"name": "from-web", "source": "https://example.com/a/from-web.tar.gz"})
    return raw


@pytest.mark.parametrize(
    ("change", "rolled"),
    [
        # The router takes the TTFT/TPOT targets as flags; no worker reads the SLOs.
        ({"slo": {"ttftMs": 123}}, {"d-router"}),
        ({"slo": {"attainment": 0.5}}, set()),  # read by the autoscaler only
        ({"router": {"maxInFlight": 7}}, {"d-router"}),
        ({"decode": {"maxPending": 512}}, {"d-decode"}),
        ({"prefill": {"kvCacheBytes": 1 << 30}}, {"d-prefill"}),
        ({"autoscaling": {"maxStep": 3, "cooldownSeconds": 30}}, set()),
    ],
)
@pytest.mark.parametrize("base", ["cpu-demo", "path-adapters", "uri-adapters"])
def test_a_config_change_rolls_only_the_pods_that_read_it(base: str, change: dict, rolled: set[str]):
    """engine.json records every setting, but a pod reads from it only the adapters (see
    `builders.config_reads`); a setting that reaches one pod as a flag rolls that pod through its args
    and leaves every config hash alone."""
    raw = {
        "cpu-demo": lambda: load_example("cpu-demo.yaml")["spec"],
        "path-adapters": lambda: load_example("heterogeneous.yaml")["spec"],
        "uri-adapters": _uri_adapter_spec,
    }[base]()
    before, after = _templates(raw), _templates(_with(raw, change))
    assert {n for n in before if before[n] != after[n]} == rolled
    assert {n: t["metadata"]["annotations"][HASH] for n, t in before.items()} == {
        n: t["metadata"]["annotations"][HASH] for n, t in after.items()
    }


def test_an_adapter_change_rolls_the_pods_that_load_or_fetch_adapters():
    base = load_example("heterogeneous.yaml")["spec"]  # path adapters: the workers register them
    before = _templates(base)

    def hashes_changed(raw: dict) -> set[str]:
        after = _templates(raw)
        return {
            n
            for n in before
            if before[n]["metadata"]["annotations"][HASH] != after[n]["metadata"]["annotations"][HASH]
        }

    added = _with(base, {"adapters": [*base["adapters"], {"name": "new", "source": "adapters/new"}]})
    assert hashes_changed(added) == {"d-prefill", "d-decode"}
    moved = _with(base, {"adapters": [base["adapters"][0], {"name": "support-bot", "source": "adapters/v2"}]})
    assert hashes_changed(moved) == {"d-prefill", "d-decode"}
    # A URI adapter is fetched by the workers' init container; the router fetches none (it learns
    # the adapters from the workers), so it does not roll.
    web = _with(base, {"adapters": [*base["adapters"], {"name": "web", "source": "https://e.com/w.tgz"}]})
    assert hashes_changed(web) == {"d-prefill", "d-decode"}
    web_before = _templates(web)
    web2 = _with(web, {"adapters": [*base["adapters"], {"name": "web", "source": "https://e.com/w2.tgz"}]})
    web_after = _templates(web2)
    assert {
        n
        for n in web_before
        if web_before[n]["metadata"]["annotations"][HASH] != web_after[n]["metadata"]["annotations"][HASH]
    } == {"d-prefill", "d-decode"}
    # Dropping every adapter drops --adapters-config: the worker templates change anyway.
    none = _templates(_with(base, {"adapters": []}))
    assert {n for n in before if before[n] != none[n]} == {"d-prefill", "d-decode"}


@pytest.mark.parametrize("base", ["cpu-demo", "path-adapters", "uri-adapters"])
def test_the_config_hash_covers_what_each_pod_reads(base: str, tmp_path: Path):
    """`config_reads` names a file exactly when the pod has a reader of it (`--adapters-config`, the
    fetch-adapters init container), and for engine.json exactly what the worker's own reader takes."""

    raw = {
        "cpu-demo": lambda: load_example("cpu-demo.yaml")["spec"],
        "path-adapters": lambda: load_example("heterogeneous.yaml")["spec"],
        "uri-adapters": _uri_adapter_spec,
    }[base]()
    spec, _ = plan_spec_errors("d", raw)
    assert spec is not None
    config_map = builders.build_config_map(Owner("d", "ns", UID), spec)
    for name, template in _templates(raw).items():
        component = name.removeprefix("d-")
        reads = builders.config_reads(config_map, component)
        args = template["spec"]["containers"][0]["args"]
        inits = [c["name"] for c in template["spec"].get("initContainers", [])]
        assert ("engine.json" in reads) == ("--adapters-config" in args)
        assert (builders.ADAPTER_LIST_KEY in reads) == ("fetch-adapters" in inits)
        assert template["metadata"]["annotations"][HASH] == builders.config_hash(config_map, component)
        # Nothing else under /etc/tandem is named by the pod's containers.
        for c in [*template["spec"]["containers"], *template["spec"].get("initContainers", [])]:
            text = " ".join([*c.get("command", []), *c.get("args", [])])
            named = {word.split("/etc/tandem/")[1] for word in text.split() if "/etc/tandem/" in word}
            assert named <= set(reads), (name, c["name"], named)
            assert not any("valueFrom" in e for e in c.get("env", []))
        if "engine.json" in reads:
            cli = pytest.importorskip("tandem_worker.cli")
            (tmp_path / "engine.json").write_text(config_map["data"]["engine.json"])
            worker_sees = cli._read_adapters_config(str(tmp_path / "engine.json"))
            assert worker_sees == {a["name"]: a["path"] for a in reads["engine.json"]["adapters"]}


def test_adapters_reach_the_workers():
    """Adapters from a URI are fetched by an init container; every worker registers them all."""
    from tandem_operator import api

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
    owner = Owner(name="d", namespace="ns", uid="u")
    worker = pod(builders.build_worker_deployment(owner, spec, "decode", "h"))
    inits = worker["initContainers"]
    assert [c["name"] for c in inits] == ["fetch-adapters"]
    # The router learns the adapters from the workers: it downloads none.
    router = pod(builders.build_router_deployment(owner, spec, "h"))
    assert all(c["name"] != "fetch-adapters" for c in router.get("initContainers", []))
    assert inits[0]["command"][-3:] == ["adapters", "/etc/tandem/adapter-uris.txt", "/adapters"]
    # The init container reads the URIs from the ConfigMap, which it mounts next to its output.
    assert {m["name"]: m["mountPath"] for m in inits[0]["volumeMounts"]} == {
        "config": "/etc/tandem",
        "adapters": "/adapters",
        "tmp": "/tmp",
    }
    listed = builders.build_config_map(owner, spec)["data"]["adapter-uris.txt"]
    # Path sources come from the model volume, not the web.
    assert listed == "from-web https://example.com/a/from-web.tar.gz\n"
    mounts = {m["name"]: m for m in worker["containers"][0]["volumeMounts"]}
    assert mounts["adapters"]["readOnly"] and mounts["model"]["mountPath"] == "/models"


def test_no_adapter_list_without_uri_adapters():

    objs = build("heterogeneous.yaml")  # path adapters only
    assert set(objs[("ConfigMap", "llama-8b-config")]["data"]) == {"engine.json"}
    for (kind, _), obj in objs.items():
        if kind == "Deployment":
            assert "initContainers" not in pod(obj)
    assert builders.adapter_list(api.parse_spec(load_example("cpu-demo.yaml")["spec"])) == ""


def _with_uri_adapters(count: int, base: str = "https://example.com/adapters") -> api.ModelDeploymentSpec:
    raw = load_example("cpu-demo.yaml")["spec"]
    raw["adapters"] = [
        {"name": f"adapter-{i:05d}", "source": f"{base}/adapter-{i:05d}.tar.gz"} for i in range(count)
    ]
    return api.parse_spec(raw)


def test_many_uri_adapters_keep_the_pods_small():
    """The fetch-adapters program does not grow with the adapters: inlined, 1,000 of them passed the
    kernel's 128 KiB limit on one exec argument (MAX_ARG_STRLEN), so the init container never started."""

    owner = Owner(name="d", namespace="ns", uid="u")
    one, many = _with_uri_adapters(1), _with_uri_adapters(1000)
    for spec in (one, many):
        for role in ("prefill", "decode"):
            init = pod(builders.build_worker_deployment(owner, spec, role, "h"))["initContainers"][0]
            assert init["name"] == "fetch-adapters"
            assert max(len(arg.encode()) for arg in init["command"]) < 4096
        router = pod(builders.build_router_deployment(owner, spec, "h"))
        assert "initContainers" not in router  # a built-in model: the router downloads nothing
        assert all(v["name"] != "adapters" for v in router["volumes"])
    # The Deployments are identical for 1 and 1,000 adapters (but for the config hash: the adapter
    # list is what the init container and the workers read, so a change of it rolls them).
    for role in ("prefill", "decode"):
        assert builders.build_worker_deployment(owner, one, role, "h") == builders.build_worker_deployment(
            owner, many, role, "h"
        )
    lines = builders.adapter_list(many).splitlines()
    assert (
        len(lines) == 1000 and lines[7] == "adapter-00007 https://example.com/adapters/adapter-00007.tar.gz"
    )


def test_the_most_adapters_the_spec_allows_fit_the_config_map_and_its_record():
    """At the limits the operator accepts (1,000 adapters, their names and sources 256 KiB), the
    ConfigMap stays within 1 MiB and its last-applied record within an annotation's 256 KiB; one
    byte more of sources is refused before anything is built."""
    from tandem_operator.patching import LAST_APPLIED_ANNOTATION, with_last_applied
    from tandem_operator.validation import MAX_ADAPTER_LIST_BYTES, plan_spec_errors

    raw = load_example("cpu-demo.yaml")["spec"]
    per = MAX_ADAPTER_LIST_BYTES // 1000
    raw["adapters"] = [
        {"name": f"adapter-{i:05d}", "source": f"https://example.com/{'x' * (per - 47)}/a{i:05d}.tar.gz"}
        for i in range(1000)
    ]
    assert sum(len(a["name"]) + len(a["source"]) for a in raw["adapters"]) <= MAX_ADAPTER_LIST_BYTES
    spec, errors = plan_spec_errors("d", raw)
    assert errors == []
    cm = with_last_applied(builders.build_config_map(Owner(name="d", namespace="ns", uid="u"), spec))
    assert sum(len(v.encode()) for v in cm["data"].values()) < 1 << 20
    assert len(cm["metadata"]["annotations"][LAST_APPLIED_ANNOTATION].encode()) < 256 << 10
    raw["adapters"][0]["source"] = raw["adapters"][0]["source"].replace("x", "xx" * per, 1)
    assert [e.reason for e in plan_spec_errors("d", raw)[1]] == ["AdapterListTooLarge"]


def test_adapter_list_is_one_name_and_one_uri_a_line():

    raw = load_example("cpu-demo.yaml")["spec"]
    raw["adapters"] = [{"name": "a", "source": "https://h/x y\tz\nq\x7f.tgz"}]
    # Whitespace and control characters would split the line; percent-encoded, the URI means the same.
    assert builders.adapter_list(api.parse_spec(raw)) == "a https://h/x%20y%09z%0Aq%7F.tgz\n"


def test_router_serves_the_optional_client_apis_on_any_service_port():
    from tandem_operator import api

    raw = yaml.safe_load((EXAMPLES / "cpu-demo.yaml").read_text())["spec"]
    # Ports below 1024 are the Service's: the non-root container behind it listens on its own ports.
    raw["router"].update(grpcPort=443, httpPort=80, kservePort=8001, metricsPort=8080)
    spec = api.parse_spec(raw)
    owner = Owner(name="demo", namespace="default", uid="u")
    args = builders.build_router_args(owner, spec)
    flags = {f: args[args.index(f) + 1] for f in ("--port", "--http-port", "--kserve-port", "--metrics-port")}
    assert flags == {
        "--port": "50051",
        "--http-port": "8080",
        "--kserve-port": "8081",
        "--metrics-port": "9090",
    }
    dep = builders.build_router_deployment(owner, spec, "digest")
    container = dep["spec"]["template"]["spec"]["containers"][0]
    listening = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert listening == {"grpc": 50051, "metrics": 9090, "http": 8080, "kserve": 8081}
    assert container["readinessProbe"]["grpc"]["port"] == 50051
    svc = builders.build_router_service(owner, spec)
    offered = {p["name"]: (p["port"], p["targetPort"]) for p in svc["spec"]["ports"]}
    # A Service port equal to another API's container port (metrics on 8080) is fine: targets go by name.
    assert offered == {
        "grpc": (443, "grpc"),
        "http": (80, "http"),
        "kserve": (8001, "kserve"),
        "metrics": (8080, "metrics"),
    }
    assert {p["name"]: p["appProtocol"] for p in svc["spec"]["ports"] if "appProtocol" in p} == {
        "grpc": "grpc",
        "http": "http",
        "kserve": "grpc",
    }
    raw["router"]["kservePort"] = 80
    _, errors = plan_spec_errors("demo", raw)
    assert [e.reason for e in errors] == ["PortCollision"]


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_every_pod_meets_pod_security_restricted(example):
    """What the "restricted" Pod Security Standard requires of each pod, init containers included
    (https://kubernetes.io/docs/concepts/security/pod-security-standards/), for every example, with
    URI adapters and a private registry's pull secret."""
    manifest = load_example(example)
    manifest["spec"]["adapters"] = [{"name": "a", "source": "https://example.com/a.tgz"}]
    manifest["spec"]["imagePullSecrets"] = ["registry-creds"]
    spec, errors = plan_spec_errors("x", manifest["spec"])
    assert errors == [] and spec is not None
    for obj in build_children(Owner("x", "ns", UID), spec):
        if obj["kind"] != "Deployment":
            continue
        pod_spec = pod(obj)
        assert pod_spec["securityContext"]["runAsNonRoot"] is True
        assert pod_spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod_spec["imagePullSecrets"] == [{"name": "registry-creds"}]
        assert not any(k in pod_spec for k in ("hostNetwork", "hostPID", "hostIPC"))
        assert all("hostPath" not in v for v in pod_spec.get("volumes", []))
        containers = pod_spec["containers"] + pod_spec.get("initContainers", [])
        for c in containers:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
            assert "runAsUser" not in c["securityContext"]  # the image's numeric USER, or OpenShift's UID
            # Every container runs Tandem's own image (numeric USER): none needs a UID set for it.
            assert c["image"] == manifest["spec"]["image"]
            assert all("hostPort" not in p for p in c.get("ports", []))


def _writable_mounts(pod_spec: dict, c: dict) -> dict[str, dict]:
    """The container's mounts of emptyDir volumes it may write, by path, with their volume."""
    volumes = {v["name"]: v for v in pod_spec["volumes"]}
    return {
        m["mountPath"]: volumes[m["name"]]
        for m in c.get("volumeMounts", [])
        if "emptyDir" in volumes[m["name"]] and not m.get("readOnly")
    }


def _under(path: str, roots: dict[str, dict]) -> bool:
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


@pytest.mark.parametrize("model", ["example", "uri"])
@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_containers_write_only_to_their_volumes(example, model):
    """A read-only root filesystem (an intruder cannot rewrite the image's programs), with the places
    the processes write on emptyDirs: /tmp (Python's tempfile: Triton's launcher and the C++ op
    build there), the cache (converted models, compiled kernels) and HOME (what defaults to ~:
    Triton's ~/.triton, the CUDA driver's ~/.nv), for every container, downloads included."""
    manifest = load_example(example)
    manifest["spec"]["adapters"] = [{"name": "a", "source": "https://example.com/a.tgz"}]
    if model == "uri":
        manifest["spec"]["model"] = {"uri": "https://example.com/m.gguf"}
    spec, errors = plan_spec_errors("x", manifest["spec"])
    assert errors == [] and spec is not None
    seen = set()
    for obj in build_children(Owner("x", "ns", UID), spec):
        if obj["kind"] != "Deployment":
            continue
        pod_spec = pod(obj)
        for c in pod_spec["containers"] + pod_spec.get("initContainers", []):
            seen.add(c["name"])
            assert c["securityContext"]["readOnlyRootFilesystem"] is True, c["name"]
            writable = _writable_mounts(pod_spec, c)
            assert "/tmp" in writable, c["name"]
            if c["name"] in ("worker", "router"):
                env = {e["name"]: e["value"] for e in c["env"]}
                for name in ("HOME", "TANDEM_CACHE_DIR"):
                    assert _under(env[name], writable), (c["name"], name, env[name])
    assert {"worker", "router", "fetch-adapters"} <= seen
    if model == "uri":
        assert "fetch-model" in seen


def _pod_storage(obj: dict) -> dict:
    """{container name: its ephemeral-storage request (= limit)} and {volume name: sizeLimit}."""
    pod_spec = pod(obj)
    containers = {}
    for c in pod_spec["containers"] + pod_spec.get("initContainers", []):
        res = c["resources"]
        assert res["requests"]["ephemeral-storage"] == res["limits"]["ephemeral-storage"], c["name"]
        containers[c["name"]] = res["limits"]["ephemeral-storage"]
    volumes = {v["name"]: v["emptyDir"]["sizeLimit"] for v in pod_spec["volumes"] if "emptyDir" in v}
    return {"containers": containers, "volumes": volumes}


@pytest.mark.parametrize(
    ("model", "worker", "router"),
    [
        # The built-in model converts to 0.5 GB; the router converts its config and tokenizer alone.
        ({"builtin": "smollm2-135m"}, "3Gi", "3Gi"),
        # A PVC's folder is read in place; a PVC's GGUF file is converted (float32) by the workers.
        ({"pvc": {"claimName": "m", "path": "llama"}}, "3Gi", "3Gi"),
        ({"pvc": {"claimName": "m", "path": "llama.Q4.GGUF"}}, "42Gi", "3Gi"),
        ({"pvc": {"claimName": "m", "path": "llama.gguf"}, "storageSize": "100Gi"}, "102Gi", "3Gi"),
        # Every pod downloads a URI's model.
        ({"uri": "https://example.com/m.tar.gz"}, "42Gi", "42Gi"),
        ({"uri": "https://example.com/m.gguf", "storageSize": "1.5Gi"}, "3584Mi", "3584Mi"),
    ],
)
def test_every_pod_bounds_the_disk_it_may_fill(model: dict, worker: str, router: str):
    """A model download had no bound: it could fill its node's disk and get other pods evicted. Every
    emptyDir has a sizeLimit, and every pod declares ephemeral storage (request = limit) for its model
    (`model.storageSize`, documented defaults), its kernel caches and /tmp."""
    from tandem_operator.patching import _quantity

    raw = load_example("cpu-demo.yaml")["spec"]
    raw["model"] = model
    raw["adapters"] = [{"name": "a", "source": "https://example.com/a.tgz"}]
    spec, errors = plan_spec_errors("x", raw)
    assert errors == [] and spec is not None
    deps = {
        o["metadata"]["name"]: o
        for o in build_children(Owner("x", "ns", UID), spec)
        if o["kind"] == "Deployment"
    }
    for name, want in (("x-prefill", worker), ("x-decode", worker), ("x-router", router)):
        got = _pod_storage(deps[name])
        main = "router" if name == "x-router" else "worker"
        assert got["containers"][main] == want, name
        # Downloads count against the pod's budget: an init's own request adds nothing to the pod's.
        assert set(got["containers"].values()) == {want}, name
        assert got["volumes"]["tmp"] == "1Gi"
        budget, tmp = _quantity(want), _quantity(got["volumes"].pop("tmp"))
        # Any one volume full, with /tmp full too, still fits the pod's budget: the pod is evicted
        # for the volume (its message names it) rather than for the total.
        assert all(_quantity(limit) + tmp <= budget for limit in got["volumes"].values()), name
        if "uri" in model:  # the model volume holds the whole of `storageSize`
            assert _quantity(got["volumes"]["model"]) == budget - 2 * 2**30
    # The router never fetches adapters, nor converts weights.
    assert "adapters" not in _pod_storage(deps["x-router"])["volumes"]
    assert _pod_storage(deps["x-router"])["volumes"]["cache"] == "2Gi"


def test_a_storage_size_without_a_unit_is_refused():
    raw = load_example("cpu-demo.yaml")["spec"]
    raw["model"] = {"uri": "https://example.com/m.gguf", "storageSize": "40"}  # 40 bytes
    assert [e.reason for e in plan_spec_errors("x", raw)[1]] == ["StorageSizeTooSmall"]
    raw["model"]["storageSize"] = "40 GB"
    assert [e.reason for e in plan_spec_errors("x", raw)[1]] == ["InvalidSpec"]


def test_a_pods_own_env_wins_without_duplicates():
    """The pool's (and router's) env overrides the operator's defaults by name, leaving one entry."""
    manifest = load_example("cpu-demo.yaml")
    own = [{"name": "HOME", "value": "/home/me"}, {"name": "TANDEM_CACHE_DIR", "value": "/var/cache/me"}]
    manifest["spec"]["decode"]["env"] = own
    manifest["spec"]["router"]["env"] = own
    spec, errors = plan_spec_errors("x", manifest["spec"])
    assert errors == [] and spec is not None
    objs = {(o["kind"], o["metadata"]["name"]): o for o in build_children(Owner("x", "ns", UID), spec)}
    for name in ("x-decode", "x-router"):
        env = container(objs[("Deployment", name)])["env"]
        assert [e["name"] for e in env].count("HOME") == 1
        assert {e["name"]: e["value"] for e in env}["HOME"] == "/home/me"
        assert {e["name"]: e["value"] for e in env}["TANDEM_CACHE_DIR"] == "/var/cache/me"
    # The prefill pool sets nothing: the defaults.
    env = {e["name"]: e["value"] for e in container(objs[("Deployment", "x-prefill")])["env"]}
    assert env["HOME"] == env["TANDEM_CACHE_DIR"] == builders.CACHE_MOUNT


def test_the_pods_env_reaches_its_downloads():
    """Downloads behind a proxy or a private CA need the pod's env (HTTPS_PROXY, NO_PROXY,
    SSL_CERT_FILE): each pod's init containers get that pod's env, pool or router, but never its
    NVIDIA_VISIBLE_DEVICES (an init container has no GPU allocated)."""
    manifest = load_example("cpu-demo.yaml")
    spec_raw = manifest["spec"]
    spec_raw["model"] = {"uri": "https://example.com/m.gguf"}
    spec_raw["adapters"] = [{"name": "a", "source": "https://example.com/a.tgz"}]
    pool_env = [
        {"name": "HTTPS_PROXY", "value": "http://proxy.corp:3128"},
        {"name": "NO_PROXY", "value": ".svc,.cluster.local"},
        {"name": "SSL_CERT_FILE", "value": "/etc/ssl/corp.pem"},
        {"name": "NVIDIA_VISIBLE_DEVICES", "value": "all"},
    ]
    spec_raw["decode"]["env"] = pool_env
    spec_raw["router"]["env"] = [{"name": "HTTPS_PROXY", "value": "http://router-proxy:3128"}]
    spec, errors = plan_spec_errors("x", spec_raw)
    assert errors == [] and spec is not None
    objs = {(o["kind"], o["metadata"]["name"]): o for o in build_children(Owner("x", "ns", UID), spec)}

    def init_env(name: str) -> dict[str, list[str]]:
        inits = pod(objs[("Deployment", name)])["initContainers"]
        out = {}
        for c in inits:
            env: dict[str, list[str]] = {}
            for e in c["env"]:
                env.setdefault(e["name"], []).append(e["value"])
            out[c["name"]] = env
        return out

    for init, env in init_env("x-decode").items():
        assert env == {
            "NVIDIA_VISIBLE_DEVICES": ["void"],
            "HTTPS_PROXY": ["http://proxy.corp:3128"],
            "NO_PROXY": [".svc,.cluster.local"],
            "SSL_CERT_FILE": ["/etc/ssl/corp.pem"],
        }, init
    assert set(init_env("x-decode")) == {"fetch-model", "fetch-adapters"}
    assert init_env("x-router") == {
        "fetch-model": {"NVIDIA_VISIBLE_DEVICES": ["void"], "HTTPS_PROXY": ["http://router-proxy:3128"]}
    }
    assert all(list(env) == ["NVIDIA_VISIBLE_DEVICES"] for env in init_env("x-prefill").values())
    router_env = {e["name"]: e["value"] for e in container(objs[("Deployment", "x-router")])["env"]}
    assert router_env["HTTPS_PROXY"] == "http://router-proxy:3128"


def _children_with_uri_adapters(example: str) -> list[dict]:
    manifest = load_example(example)
    manifest["spec"]["adapters"] = [{"name": "a", "source": "https://example.com/a.tgz"}]
    spec, errors = plan_spec_errors("x", manifest["spec"])
    assert errors == [] and spec is not None
    return build_children(Owner("x", "ns", UID), spec)


def test_router_keeps_serving_while_its_endpoints_go_away(monkeypatch):
    """The router closes its listeners at SIGTERM (new connections are refused at once), while
    kube-proxy and load balancers take a few seconds to stop sending new ones to a deleted pod: the
    router must first sleep in preStop, and its grace period must cover that sleep and its drain."""
    from tandem_worker.server.router_main import DRAIN_SECONDS

    router = build("cpu-demo.yaml")[("Deployment", "smollm2-demo-router")]
    command = container(router)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:2] == ["python", "-c"]
    slept = []
    monkeypatch.setattr("time.sleep", slept.append)
    exec(compile(command[2], "<preStop>", "exec"), {})  # the program the kubelet runs
    assert slept == [builders.ROUTER_PRESTOP_SECONDS] and slept[0] >= 5
    assert builders.ROUTER_DRAIN_SECONDS == DRAIN_SECONDS
    grace = pod(router)["terminationGracePeriodSeconds"]
    assert grace >= slept[0] + DRAIN_SECONDS + 5  # the kubelet's SIGKILL comes this long after preStop starts


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_a_node_drain_may_evict_unready_pods(example):
    """IfHealthyBudget (the default) refuses to evict a Running pod that is not Ready once the pool
    is below its budget; the routers all turn unready together while no worker pair is healthy, and
    a pool's workers while their model fails to load, which would block a node drain."""
    pdbs = [o for o in _children_with_uri_adapters(example) if o["kind"] == "PodDisruptionBudget"]
    assert pdbs
    for pdb in pdbs:
        assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_containers_without_a_gpu_see_none(example):
    """Tandem's CUDA image sets NVIDIA_VISIBLE_DEVICES=all; with the NVIDIA device plugin's default
    strategy a container that requests no GPU (router, CPU pool, init container) would be handed
    every GPU on its node, those of other pods included. Those containers must override it; those
    with a GPU limit must not (the device plugin sets it to the GPUs it allocated)."""
    dockerfile = (Path(__file__).resolve().parents[2] / "worker" / "Dockerfile.cuda").read_text()
    assert "NVIDIA_VISIBLE_DEVICES=all" in dockerfile  # why the override is needed
    seen = {"with": 0, "without": 0}
    for obj in _children_with_uri_adapters(example):
        if obj["kind"] != "Deployment":
            continue
        for c in pod(obj)["containers"] + pod(obj).get("initContainers", []):
            env = [e for e in c.get("env", []) if e["name"] == "NVIDIA_VISIBLE_DEVICES"]
            if "nvidia.com/gpu" in c.get("resources", {}).get("limits", {}):
                assert env == [], c["name"]
                seen["with"] += 1
            else:
                assert env == [{"name": "NVIDIA_VISIBLE_DEVICES", "value": "void"}], c["name"]
                seen["without"] += 1
    assert seen["without"] > 0


def test_a_pools_own_nvidia_visible_devices_wins():
    manifest = load_example("cpu-demo.yaml")
    manifest["spec"]["decode"]["env"] = [{"name": "NVIDIA_VISIBLE_DEVICES", "value": "none"}]
    spec, errors = plan_spec_errors("x", manifest["spec"])
    assert errors == [] and spec is not None
    objs = {(o["kind"], o["metadata"]["name"]): o for o in build_children(Owner("x", "ns", UID), spec)}
    dep = objs[("Deployment", "x-decode")]
    env = [e for e in container(dep)["env"] if e["name"] == "NVIDIA_VISIBLE_DEVICES"]
    assert env == [{"name": "NVIDIA_VISIBLE_DEVICES", "value": "none"}]  # one entry: no shadowed duplicate


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_children_validate_against_the_oldest_and_newest_kubernetes_schemas(example):
    """Strict (unknown fields fail) at the chart's kubeVersion floor and the newest schemas: a field
    the floor's API server lacks would be dropped there, and the operator would patch it forever."""
    import kubernetes_validate

    for obj in _children_with_uri_adapters(example):
        for version in ("1.27.0", kubernetes_validate.latest_version()):
            kubernetes_validate.validate(obj, version, strict=True)


def test_a_longer_grace_period_lengthens_the_workers_drain():
    """The worker's drain was a fixed 30 s: raising terminationGracePeriodSeconds for long generations
    still cut them at 30 s on every scale-down and rollout."""
    from tandem_worker.cli import build_parser

    body = load_example("cpu-demo.yaml")
    spec = api.ModelDeploymentSpec.model_validate({**body["spec"], "terminationGracePeriodSeconds": 600})
    args = build_parser().parse_args(builders.build_worker_args("decode", spec.decode, spec))
    assert args.drain_timeout == 595
    owner = Owner(name="d", namespace="ns", uid="u")
    assert (
        pod(builders.build_worker_deployment(owner, spec, "decode", "h"))["terminationGracePeriodSeconds"]
        == 600
    )


def test_a_large_model_gets_a_longer_startup_budget():
    """The startup probe's 10 minutes and the 900 s progress deadline were fixed: a large model on
    slow storage was restarted mid-load, for ever."""
    body = load_example("cpu-demo.yaml")
    spec = api.ModelDeploymentSpec.model_validate({**body["spec"], "startupTimeoutSeconds": 1800})
    owner = Owner(name="d", namespace="ns", uid="u")
    for dep in (
        builders.build_worker_deployment(owner, spec, "prefill", "h"),
        builders.build_router_deployment(owner, spec, "h"),
    ):
        probe = container(dep)["startupProbe"]
        assert probe["periodSeconds"] * probe["failureThreshold"] == 1800
        assert dep["spec"]["progressDeadlineSeconds"] == 2100
    with pytest.raises(ValueError, match="greater than or equal to 60"):
        api.ModelDeploymentSpec.model_validate({**body["spec"], "startupTimeoutSeconds": 10})


def test_clients_name_the_model_by_a_name_not_its_path_in_the_pod():
    """A model from a URI or a PVC was served under its path in the pod (`/models/x.gguf`), which
    OpenAI and KServe clients then had to give as `model`."""
    from tandem_worker.cli import build_parser

    owner = Owner(name="llama-8b", namespace="ns", uid="u")
    spec = api.ModelDeploymentSpec.model_validate(load_example("heterogeneous.yaml")["spec"])
    args = build_parser().parse_args(builders.build_router_args(owner, spec))
    assert args.model.startswith("/models/") and args.served_model_name == "llama-8b"
    named = spec.model_copy(update={"router": spec.router.model_copy(update={"served_model_name": "llama3"})})
    assert build_parser().parse_args(builders.build_router_args(owner, named)).served_model_name == "llama3"
    with pytest.raises(ValueError, match="should match pattern"):
        api.ModelDeploymentSpec.model_validate(
            {**load_example("heterogeneous.yaml")["spec"], "router": {"servedModelName": "has space"}}
        )


def test_the_routers_tool_call_parser_is_passed_only_when_set():
    from tandem_worker.cli import build_parser

    owner = Owner(name="qwen", namespace="ns", uid="u")
    body = load_example("heterogeneous.yaml")["spec"]
    spec = api.ModelDeploymentSpec.model_validate(body)
    assert "--tool-call-parser" not in builders.build_router_args(owner, spec)
    spec = api.ModelDeploymentSpec.model_validate({**body, "router": {"toolCallParser": "hermes"}})
    assert build_parser().parse_args(builders.build_router_args(owner, spec)).tool_call_parser == "hermes"
    with pytest.raises(ValueError, match="hermes"):
        api.ModelDeploymentSpec.model_validate({**body, "router": {"toolCallParser": "llama3"}})


def test_a_pools_cuda_graph_settings_reach_its_workers_and_only_when_set():
    """`tandem worker --cuda-graph-*` had no field in the custom resource: a deployment serving
    rank-128 adapters decoded them eagerly, its batches past 256 too. Unset fields add no argument,
    so an operator upgrade leaves those pods' templates (and pods) as they were."""
    from tandem_worker.cli import build_parser

    body = load_example("cpu-demo.yaml")["spec"]
    gpu = {**body["decode"], "gpus": 1}
    plain = api.ModelDeploymentSpec.model_validate({**body, "decode": gpu})
    assert not any(
        a.startswith("--cuda-graph") for a in builders.build_worker_args("decode", plain.decode, plain)
    )
    graphs = {"maxBatch": 512, "maxLoraRank": 128, "loraFoldRank": 64}
    spec = api.ModelDeploymentSpec.model_validate({**body, "decode": {**gpu, "cudaGraphs": graphs}})
    args = build_parser().parse_args(builders.build_worker_args("decode", spec.decode, spec))
    assert (args.cuda_graph_max_batch, args.cuda_graph_max_lora_rank, args.cuda_graph_lora_fold_rank) == (
        512,
        128,
        64,
    )
    # On CPU there are no graphs: nothing to pass.
    cpu = api.ModelDeploymentSpec.model_validate({**body, "decode": {**body["decode"], "cudaGraphs": graphs}})
    assert not any(
        a.startswith("--cuda-graph") for a in builders.build_worker_args("decode", cpu.decode, cpu)
    )
    with pytest.raises(ValueError, match="less than or equal to 4096"):
        api.ModelDeploymentSpec.model_validate({**body, "decode": {**gpu, "cudaGraphs": {"maxBatch": 5000}}})
    with pytest.raises(ValueError, match="Extra inputs"):
        api.ModelDeploymentSpec.model_validate({**body, "decode": {**gpu, "cudaGraphs": {"maxBatchSize": 8}}})
