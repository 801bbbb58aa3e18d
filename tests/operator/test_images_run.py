"""The images, run as a cluster runs them (`make images` builds them; `make test-images` runs this).

* The worker images (CPU, and CUDA, which falls back to the CPU without a GPU) serve a whole
  disaggregated deployment (`tandem demo`: router, prefill and decode processes, the built-in
  model) as the operator's pods run them: as their non-root user, with a read-only root
  filesystem, a tmpfs where the worker pod has an emptyDir (the cache and HOME, /tmp), the pod's env
  and no network at all; the CPU image's C++ op loads prebuilt.
* The operator image reconciles a ModelDeployment against kmock's Kubernetes API, from its own
  container, and answers its liveness probe.

Skipped unless TANDEM_WORKER_IMAGE, TANDEM_WORKER_CUDA_IMAGE or TANDEM_OPERATOR_IMAGE name the images
(CI has no Docker engine: tests/chart/test_images.py reads the Dockerfiles there); an image they name
must be there.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import urllib.request
from pathlib import Path

import pytest

from tandem_operator.builders import CACHE_MOUNT

from .conftest import Cluster, eventually, load_example
from .test_operator_kmock import DEMO, DEMO_CHILDREN, converge_demo

UID = "65532"  # the images' USER
pytestmark = pytest.mark.slow


def image(var: str) -> str:
    """The image `var` names; skip without one, fail if it names one that is not there."""
    tag = os.environ.get(var)
    if not tag:
        built_by = "make images-cuda" if "CUDA" in var else "make images"
        pytest.skip(f"{var} is not set (`{built_by}` builds it, `make test-images` runs this)")
    assert shutil.which("docker"), f"{var}={tag}, but there is no docker command"
    probe = subprocess.run(["docker", "image", "inspect", tag], capture_output=True, text=True)
    assert probe.returncode == 0, f"no image {tag} on a Docker engine: {probe.stderr.strip()[:300]}"
    return tag


def _as_the_worker_pod() -> list[str]:
    """`docker run` options giving the container what the operator's worker pods give theirs: a
    tmpfs (writable, executable, as an emptyDir) where the pod mounts an emptyDir, and its env
    (HOME, TANDEM_CACHE_DIR, ...)."""
    from tandem_operator import api, builders

    spec = api.parse_spec(load_example("cpu-demo.yaml")["spec"])
    pod = builders.build_worker_deployment(builders.Owner("d", "ns", "u"), spec, "decode", "h")
    pod_spec = pod["spec"]["template"]["spec"]
    (c,) = pod_spec["containers"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True  # hence --read-only
    empty = {v["name"] for v in pod_spec["volumes"] if "emptyDir" in v}
    options = [
        f"--tmpfs={m['mountPath']}:rw,exec,uid={UID},gid={UID}"
        for m in c["volumeMounts"]
        if m["name"] in empty and not m.get("readOnly")
    ]
    assert any(o.startswith(f"--tmpfs={CACHE_MOUNT}:") for o in options)
    return options + [f"--env={e['name']}={e['value']}" for e in c["env"]]


@pytest.mark.parametrize("var", ["TANDEM_WORKER_IMAGE", "TANDEM_WORKER_CUDA_IMAGE"])
def test_the_worker_image_serves_a_deployment_read_only_and_offline(var):
    tag = image(var)
    run = subprocess.run(
        [
            "docker", "run", "--rm", "--network", "none", "--read-only", *_as_the_worker_pod(),
            tag, "demo", "--max-tokens", "8",
        ],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    out = run.stdout
    assert "Serving smollm2-135m" in out and "Stopped the deployment" in out
    assert len(re.findall(r"\[\d+ tokens, first token after \d+ ms", out)) == 3, out  # three answers
    user = subprocess.run(
        ["docker", "run", "--rm", "--entrypoint", "id", tag, "-u"], capture_output=True, text=True
    )
    assert user.stdout.strip() == UID
    if var == "TANDEM_WORKER_IMAGE":
        # The C++ LoRA op, built ahead for any CPU of the architecture, loads without a compiler
        # (the CUDA image's LoRA path is Triton's).
        assert "no C++ compiler" not in run.stderr
        code = "from tandem_kernels import cpu_extension as c; m = c.load(); print(m and m.__file__)"
        op = subprocess.run(
            ["docker", "run", "--rm", "--read-only", "--entrypoint", "python", tag, "-c", code],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert op.stdout.strip().startswith("/opt/tandem/lib/tandem-cpu-ops/"), op.stdout + op.stderr
        _fetch_runs_in_the_image(tag)


def _fetch_runs_in_the_image(tag: str) -> None:
    """The fetch-model init container, as the operator builds it: the image's non-root user, a
    read-only root, the model volume an emptyDir (here a tmpfs), from a server on loopback."""
    import http.server
    import threading

    from tandem_operator import api, builders

    served = Path(subprocess.run(["mktemp", "-d"], capture_output=True, text=True).stdout.strip())
    (served / "tiny.gguf").write_bytes(b"GGUF")
    handler = lambda *a, **kw: http.server.SimpleHTTPRequestHandler(*a, directory=str(served), **kw)  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        uri = f"http://127.0.0.1:{httpd.server_address[1]}/tiny.gguf"
        spec = api.parse_spec({"image": tag, "model": {"uri": uri}, "mode": "colocated", "colocated": {}})
        (init,) = builders._init_containers(spec, adapters=False, pod_env=[], storage=1 << 30)
        assert init["command"][0] == "python"
        script = init["command"] + ["&&", "cat", f"{builders.MODEL_MOUNT}/tiny.gguf"]
        run = subprocess.run(
            [
                "docker", "run", "--rm", "--network", "host", "--read-only",
                "--tmpfs", f"{builders.MODEL_MOUNT}:rw,mode=1777", "--tmpfs", "/tmp:rw,mode=1777",
                "--entrypoint", "sh", tag,
                "-c", " ".join(script),
            ],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert run.returncode == 0 and run.stdout == "GGUF", run.stdout + run.stderr
    finally:
        httpd.shutdown()
        httpd.server_close()


async def test_the_operator_image_reconciles_from_its_container(cluster: Cluster, tmp_path: Path):
    tag = image("TANDEM_OPERATOR_IMAGE")
    kubeconfig = Path(os.environ["KUBECONFIG"])  # written by the fixture: kmock on loopback
    kubeconfig.chmod(0o644)  # readable by the image's user
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    name = f"tandem-operator-test-{port}"
    subprocess.run(
        [
            "docker", "run", "-d", "--name", name, "--network", "host", "--read-only", "--tmpfs", "/tmp:rw",
            "-v", f"{kubeconfig}:/kube/config:ro", "-e", "KUBECONFIG=/kube/config",
            tag, "--namespace", "default", "--standalone",
            "--liveness", f"http://127.0.0.1:{port}/healthz",
        ],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    try:

        def alive() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                    return r.status == 200
            except OSError:
                return False

        await eventually(alive, timeout=60, interval=0.5)
        await converge_demo(cluster)
        assert set(cluster.children()) == DEMO_CHILDREN
        dep = cluster.get("Deployment", f"{DEMO}-prefill")
        assert dep["metadata"]["ownerReferences"][0]["name"] == DEMO
    finally:
        logs = subprocess.run(["docker", "logs", name], capture_output=True, text=True).stderr
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)
    assert "Traceback" not in logs, logs[-4000:]
