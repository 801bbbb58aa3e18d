"""The init containers' downloads, run for real against a local HTTP server: the model and the URI
adapters, by each program a pod may run. By default the deployment's own image runs
`python -m tandem_worker.fetch`; with `model.fetchImage` set, a `sh` program runs in that image,
tried with the system's sh (dash here) and as in `curlimages/curl` (busybox's sh, tar, mkdir, mv
and rm; only curl its own)."""

from __future__ import annotations

import contextlib
import http.server
import io
import os
import shutil
import subprocess
import sys
import tarfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tandem_operator import api, builders
from tandem_operator.builders import Owner

from .conftest import load_example

Fetch = Callable[..., subprocess.CompletedProcess]


def _tar(path: Path, mode: str, members: dict[str, bytes]) -> None:
    with tarfile.open(path, mode) as tar:
        for member, body in members.items():
            info = tarfile.TarInfo(member)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))


@contextlib.contextmanager
def _serving(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    """`handler` on a loopback port, in a thread; yields the server's base URL."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.fixture
def server(tmp_path: Path):
    """A local HTTP server of PEFT-like adapter archives in `tmp_path/served`; yields (base URL, the
    paths requested)."""
    served = tmp_path / "served"
    served.mkdir()
    for archive, mode in (("gz.tar.gz", "w:gz"), ("plain.tar", "w"), ("with space.tgz", "w:gz")):
        _tar(
            served / archive,
            mode,
            {"adapter_config.json": b'{"r": 8}', "adapter_model.safetensors": archive.encode()},
        )
    requested: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(served), **kwargs)

        def do_GET(self):
            requested.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    with _serving(Handler) as url:
        yield url, requested


@pytest.fixture(params=["python", "sh", "busybox"])
def fetch(request, tmp_path_factory) -> Fetch:
    """`fetch("model", URI, DIR)` or `fetch("adapters", LIST, DIR)` as that program runs it."""
    env = None
    if request.param != "python":
        if shutil.which("curl") is None or shutil.which("tar") is None:
            pytest.skip("needs curl and tar")
        if request.param == "busybox":
            busybox = shutil.which("busybox")
            if busybox is None:
                pytest.skip("needs Debian's busybox package (make install fetches it)")
            bin_dir = tmp_path_factory.mktemp("busybox-bin")
            for applet in ("sh", "tar", "gzip", "mkdir", "mv", "rm", "cat", "test", "["):
                (bin_dir / applet).symlink_to(busybox)
            (bin_dir / "curl").symlink_to(shutil.which("curl"))
            env = {"PATH": str(bin_dir)}

    def run(what: str, source: str, directory: Path) -> subprocess.CompletedProcess:
        if request.param == "python":
            argv = [sys.executable, "-m", "tandem_worker.fetch", what, source, str(directory)]
        elif what == "model":
            argv = ["sh", "-c", builders.fetch_model_script(source, str(directory))]
        else:
            argv = ["sh", "-c", builders.fetch_adapters_script(str(directory), source)]
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=60, cwd=directory.parent, env=env,
            executable=None if env is None else str(Path(env["PATH"]) / "sh"),
        )  # fmt: skip

    run.program = request.param  # type: ignore[attr-defined]
    return run


def _spec(**change) -> api.ModelDeploymentSpec:
    raw = load_example("cpu-demo.yaml")["spec"]
    raw.update(change)
    return api.parse_spec(raw)


def _inits(spec: api.ModelDeploymentSpec) -> dict[str, dict]:
    objs = builders.build_children(Owner("d", "ns", "u"), spec)
    decode = next(o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"] == "d-decode")
    return {c["name"]: c for c in decode["spec"]["template"]["spec"]["initContainers"]}


def test_the_python_program_names_files_as_the_operator_does():
    # Twins across the layers (the operator imports no worker code): the program must save a model
    # where `--model` points, and take the archives the operator's validation lets through.
    from tandem_operator.validation import ARCHIVE_SUFFIXES, model_file_name
    from tandem_worker import fetch

    assert set(fetch.ARCHIVE_SUFFIXES) == set(ARCHIVE_SUFFIXES)
    for uri in ("https://h/m/my%20model.gguf?x=1", "http://h/a.tar.gz", "https://h/-x.gguf"):
        assert fetch.file_name(uri) == model_file_name(uri)


def test_init_containers_run_these_programs():
    uri = "https://example.com/m/tiny.gguf"
    adapters = [{"name": "a", "source": "https://example.com/a.tgz"}]
    by_default = _inits(_spec(model={"uri": uri}, adapters=adapters))
    # The deployment's own image (already on the node; numeric non-root USER) with its pull policy.
    assert {c["image"] for c in by_default.values()} == {"ghcr.io/tandem-dev/tandem:0.1.0"}
    assert by_default["fetch-model"]["command"] == [
        "python",
        "-m",
        "tandem_worker.fetch",
        "model",
        uri,
        "/models",
    ]
    assert by_default["fetch-adapters"]["command"] == [
        "python", "-m", "tandem_worker.fetch", "adapters", "/etc/tandem/adapter-uris.txt", "/adapters",
    ]  # fmt: skip
    own = _inits(_spec(model={"uri": uri, "fetchImage": "curlimages/curl:8.11.1"}, adapters=adapters))
    assert {c["image"] for c in own.values()} == {"curlimages/curl:8.11.1"}
    assert own["fetch-model"]["command"] == ["sh", "-c", builders.fetch_model_script(uri, "/models")]
    assert own["fetch-adapters"]["command"] == ["sh", "-c", builders.fetch_adapters_script()]


def test_the_model_lands_where_model_points(tmp_path: Path, server, fetch: Fetch):
    """A .gguf file is saved under its own name (also one starting with "-"), an archive unpacked into
    `model`, each where `--model` points; a rerun (an init restart) downloads nothing again."""
    base, requested = server
    (tmp_path / "served" / "-tiny.gguf").write_bytes(b"GGUF")
    for uri, expect in ((f"{base}/-tiny.gguf", "-tiny.gguf"), (f"{base}/gz.tar.gz", "model")):
        models = tmp_path / "models" / expect.strip("-")
        models.mkdir(parents=True)
        assert builders.model_argument(_spec(model={"uri": uri})) == f"{builders.MODEL_MOUNT}/{expect}"
        for _ in range(2):
            done = fetch("model", uri, models)
            assert done.returncode == 0, done.stderr
            assert sorted(p.name for p in models.iterdir()) == [expect]  # no temporaries left
    assert (tmp_path / "models" / "tiny.gguf" / "-tiny.gguf").read_bytes() == b"GGUF"
    assert (tmp_path / "models" / "model" / "model" / "adapter_config.json").read_text() == '{"r": 8}'
    assert sorted(requested) == ["/-tiny.gguf", "/gz.tar.gz"]  # once each


@pytest.fixture
def proxy():
    """A forward HTTP proxy on loopback that answers every request itself (with b"GGUF"); yields
    (its URL, the request targets it saw)."""
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.path)  # a proxy is asked for the absolute URI
            self.send_response(200)
            self.send_header("Content-Length", "4")
            self.end_headers()
            self.wfile.write(b"GGUF")

        def log_message(self, *args):
            pass

    with _serving(Handler) as url:
        yield url, seen


@pytest.mark.parametrize("program", ["python", "sh"])
def test_downloads_go_through_the_pods_proxy(tmp_path: Path, proxy, program: str):
    """A cluster that reaches the web only through a proxy: the pool's and the router's env name it,
    and each pod's fetch-model init container, run with exactly its env, downloads through it (the
    model's host does not even resolve). Without the pod's env the downloads could not start."""
    if program == "sh" and shutil.which("curl") is None:
        pytest.skip("needs curl")
    proxy_url, seen = proxy
    uri = "http://hub.example.invalid/tiny.gguf"  # .invalid never resolves (RFC 6761)
    model: dict = {"uri": uri}
    if program == "sh":
        model["fetchImage"] = "curlimages/curl:8.11.1"
    # Lower case: curl reads only http_proxy for http:// (HTTP_PROXY is the CGI header's, httpoxy).
    env = [{"name": "http_proxy", "value": proxy_url}]
    raw = load_example("cpu-demo.yaml")["spec"]
    raw.update(model=model, router={**raw["router"], "env": env})
    raw["decode"] = {**raw["decode"], "env": env}
    objs = builders.build_children(Owner("d", "ns", "u"), api.parse_spec(raw))
    pods = {o["metadata"]["name"]: o["spec"]["template"]["spec"] for o in objs if o["kind"] == "Deployment"}
    for name in ("d-decode", "d-router"):
        (init,) = pods[name]["initContainers"]
        models = tmp_path / name
        models.mkdir()
        # The container's own command, with the model volume here and this interpreter for `python`.
        command = [a.replace(builders.MODEL_MOUNT, str(models)) for a in init["command"]]
        if command[0] == "python":
            command[0] = sys.executable
        init_env = {e["name"]: e["value"] for e in init["env"]}
        done = subprocess.run(
            command, env={"PATH": os.environ["PATH"], **init_env}, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, (name, done.stderr)
        assert (models / "tiny.gguf").read_bytes() == b"GGUF"
    assert seen == [uri, uri]


def _fetch_list(tmp_path: Path, fetch: Fetch, list_text: str) -> subprocess.CompletedProcess:
    (tmp_path / "config").mkdir(exist_ok=True)
    (tmp_path / "adapters").mkdir(exist_ok=True)
    (tmp_path / "config" / "adapter-uris.txt").write_text(list_text)
    return fetch("adapters", str(tmp_path / "config" / "adapter-uris.txt"), tmp_path / "adapters")


def test_each_adapter_is_unpacked_into_its_folder_once(tmp_path: Path, server, fetch: Fetch):
    base, requested = server
    spec = _spec(
        adapters=[
            {"name": "zipped", "source": f"{base}/gz.tar.gz"},
            {"name": "plain", "source": f"{base}/plain.tar"},
            {"name": "spaced.v2", "source": f"{base}/with space.tgz"},
            # A presigned URL: the query follows the archive's name (it was refused as no archive).
            {"name": "signed", "source": f"{base}/gz.tar.gz?X-Amz-Signature=ab%2Fcd&X-Amz-Expires=600"},
        ]
    )
    listed = builders.build_config_map(Owner("d", "ns", "u"), spec)["data"][builders.ADAPTER_LIST_KEY]
    done = _fetch_list(tmp_path, fetch, listed)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "adapters"
    assert sorted(p.name for p in out.iterdir()) == ["plain", "signed", "spaced.v2", "zipped"]  # nothing else
    for name, archive in (
        ("zipped", "gz.tar.gz"),
        ("plain", "plain.tar"),
        ("spaced.v2", "with space.tgz"),
        ("signed", "gz.tar.gz"),
    ):
        assert (out / name / "adapter_config.json").read_text() == '{"r": 8}'
        assert (out / name / "adapter_model.safetensors").read_text() == archive
    assert sorted(requested) == [
        "/gz.tar.gz",
        "/gz.tar.gz?X-Amz-Signature=ab%2Fcd&X-Amz-Expires=600",
        "/plain.tar",
        "/with%20space.tgz",
    ]

    again = _fetch_list(tmp_path, fetch, listed)
    assert again.returncode == 0, again.stderr
    assert len(requested) == 4  # all present: nothing fetched twice


def test_the_adapter_list_is_never_evaluated(tmp_path: Path, server, fetch: Fetch):
    base, requested = server
    marker = tmp_path / "pwned"
    for line in (
        f"x {base}/$(touch${{IFS}}{marker}).tgz",
        f"x {base}/`touch${{IFS}}{marker}`.tgz",
        f"x {base}/a.tgz;touch${{IFS}}{marker}",
        f"x {base}/'\"$IFS;touch${{IFS}}{marker};.tgz",
    ):
        done = _fetch_list(tmp_path, fetch, line + "\n")
        assert done.returncode != 0  # a 404, final
        assert not marker.exists() and not (tmp_path / "adapters" / "x").exists()
    # What the operator's validation rejects, the program rejects too: a path outside the volume, a
    # URI that curl would read as an option or a local file.
    for line in (
        f"../escaped {base}/gz.tar.gz",
        f".hidden {base}/gz.tar.gz",
        "x -o/tmp/evil",
        "x file:///etc/passwd",
    ):
        done = _fetch_list(tmp_path, fetch, line + "\n")
        assert done.returncode == 1 and "fetch" in done.stderr, line
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "adapters" / ".hidden").exists()
    # The injection attempts reached the server as literal paths; the rejected lines never left the pod.
    assert len(requested) == 4 and all("touch" in path for path in requested)


def test_python_fetch_refuses_archives_that_reach_outside_their_folder(tmp_path: Path, server):
    """tarfile's "data" filter: a member climbing out of its folder, or a link pointing out, fails
    the download with a message, leaving nothing behind (GNU tar would only warn and skip them)."""
    from tandem_worker import fetch

    base, _ = server
    climb = tarfile.TarInfo("../../outside")
    link = tarfile.TarInfo("adapter_model.safetensors")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    for name, member in (("climb.tgz", climb), ("link.tgz", link)):
        with tarfile.open(tmp_path / "served" / name, "w:gz") as tar:
            tar.addfile(member, io.BytesIO(b"x") if member.isfile() else None)
        (tmp_path / "list").write_text(f"bad {base}/{name}\n")
        (tmp_path / "adapters").mkdir(exist_ok=True)
        with pytest.raises(fetch.FetchError, match="not a usable tar archive"):
            fetch.fetch_adapters(tmp_path / "list", tmp_path / "adapters")
        assert list((tmp_path / "adapters").iterdir()) == []  # no adapter, no temporaries
    assert not (tmp_path / "outside").exists()


def test_python_fetch_retries_server_errors_but_not_client_errors(tmp_path: Path):
    from tandem_worker import fetch

    answers = [503, 429, 200, 404]
    seen: list[int] = []

    class Flaky(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            code = answers[len(seen)]
            seen.append(code)
            self.send_response(code)
            self.send_header("Content-Length", "4")
            self.end_headers()
            self.wfile.write(b"GGUF")

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/m.gguf"
        fetch.download(url, tmp_path / "m.gguf", delay=0)
        assert (tmp_path / "m.gguf").read_bytes() == b"GGUF" and seen == [503, 429, 200]
        with pytest.raises(fetch.FetchError, match="HTTP 404"):
            fetch.download(url, tmp_path / "again.gguf", delay=0)
        assert seen == [503, 429, 200, 404]  # a 404 is final: asked once
    finally:
        httpd.shutdown()
        httpd.server_close()
