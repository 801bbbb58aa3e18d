"""`tandem up` as a user runs it: serve, answer `tandem generate --endpoint`, stop cleanly on SIGTERM."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import threading
import urllib.request

import psutil
import pytest

from .conftest import offline_generate
from .procs import KV_BYTES, free_port, greedy, spawn, tandem_argv

pytestmark = pytest.mark.slow  # real processes: seconds to minutes


def test_tandem_up_serves_and_stops_cleanly(offline, model_dir, tmp_path):
    port, metrics_port = free_port(), free_port()
    up = spawn(
        tandem_argv(
            "up",
            "--prefill",
            "1",
            "--decode",
            "1",
            "--port",
            str(port),
            "--kv-cache-bytes",
            str(KV_BYTES),
            "--log-dir",
            str(tmp_path / "logs"),
            "--metrics-port",
            str(metrics_port),
        ),
        None,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in up.stdout:  # type: ignore[union-attr]
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    children: list[psutil.Process] = []
    output: list[str] = []
    try:
        while True:
            line = lines.get(timeout=240)
            assert line is not None, "tandem up exited before serving:\n" + "".join(output)
            output.append(line)
            if "serving" in line:
                break
        assert f"127.0.0.1:{port}" in line
        # The banner says where each process's Prometheus metrics are (they were printed nowhere):
        # the router's on --metrics-port, the workers' above it.
        metrics: dict[str, str] = {}
        while len(metrics) < 3:
            line = lines.get(timeout=30)
            assert line is not None, "tandem up exited:\n" + "".join(output)
            output.append(line)
            if "/metrics" in line:
                name, url = line.split()
                metrics[name] = url
        assert metrics["router"] == f"http://127.0.0.1:{metrics_port}/metrics"
        for name, family in [
            ("router", "tandem_router_workers"),
            ("prefill-0", "tandem_kv_blocks_free"),
            ("decode-0", "tandem_kv_blocks_free"),
        ]:
            assert int(metrics[name].split(":")[2].split("/")[0]) >= metrics_port
            with urllib.request.urlopen(metrics[name], timeout=10) as r:
                assert family in r.read().decode(), name
        children = psutil.Process(up.pid).children(recursive=True)
        assert len(children) == 3, children  # prefill, decode, router

        prompt = "Héllo wörld, the weather today is"
        gen_argv = tandem_argv(
            "generate",
            "--endpoint",
            f"127.0.0.1:{port}",
            "--json",
            "--prompt",
            prompt,
            "--max-tokens",
            "8",
            "--ignore-eos",
            "--timeout",
            "120",
        )
        gen = subprocess.run(gen_argv, capture_output=True, text=True, timeout=180)
        assert gen.returncode == 0, gen.stderr
        (record,) = [json.loads(x) for x in gen.stdout.splitlines()]
        (ref,) = offline_generate(offline, [prompt], greedy(8))
        assert record["prompt"] == prompt
        assert record["prompt_token_ids"] == ref.prompt_token_ids
        assert record["token_ids"] == ref.token_ids
        assert record["text"] == ref.text
        assert record["finish_reason"] == "length"

        # A worker that dies is restarted on its port, as Kubernetes would; the deployment
        # answers again once it is back (it was left dead, failing every request).
        decode = next(c for c in children if "decode" in " ".join(c.cmdline()))
        decode.kill()
        while "restarting decode-0" not in output[-1]:
            line = lines.get(timeout=60)
            assert line is not None, "tandem up exited:\n" + "".join(output)
            output.append(line)
        again = None
        for _ in range(60):
            again = subprocess.run(gen_argv, capture_output=True, text=True, timeout=180)
            if again.returncode == 0:
                break
            threading.Event().wait(2)
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout)["token_ids"] == ref.token_ids
        children = psutil.Process(up.pid).children(recursive=True)

        up.send_signal(signal.SIGTERM)
        code = up.wait(60)
        left = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        for c in children:  # never leave one behind, even when an assertion failed
            try:
                c.kill()
            except psutil.NoSuchProcess:
                pass
    rest = "".join(output) + "".join(iter(lambda: lines.get(timeout=10) or "", ""))
    assert code == 0, rest
    assert "tandem up: stopped" in rest
    assert not left, f"children left running after tandem up exited: {left}"


def test_free_port_fails_at_once_for_an_address_this_machine_lacks():
    # Any bind error but "in use" was retried for ever, at 100% CPU, on a --host it cannot bind.
    from tandem_worker.server.local import free_port as local_free_port

    with pytest.raises(OSError, match="cannot listen on 192.0.2.1"):  # TEST-NET-1: on no interface
        local_free_port("192.0.2.1")
    with pytest.raises(OSError, match="cannot resolve host"):
        local_free_port("no-such-host.invalid")


def test_a_child_that_fails_to_start_is_reported_with_its_log(tmp_path):
    import sys

    from tandem_worker.server.local import Child, LocalDeployment

    d = LocalDeployment(log_dir=str(tmp_path))
    c = Child("prefill-0", "127.0.0.1:1", [sys.executable, "-c", "print('model file is truncated'); exit(3)"])
    d._spawn(c)
    with pytest.raises(RuntimeError, match="prefill-0 exited with code 3 during start-up") as err:
        d._wait_healthy([c])
    assert "model file is truncated" in str(err.value) and str(tmp_path / "prefill-0.log") in str(err.value)


def test_the_autoscaler_s_temporary_folder_is_removed_on_stop():
    import os

    from tandem_worker.server.local import LocalDeployment

    d = LocalDeployment(autoscale=object())
    d._router_targets(["127.0.0.1:1"], ["127.0.0.1:2"])
    folder = d.targets_dir
    assert os.path.isfile(os.path.join(folder, "decode"))
    d.stop()
    assert not os.path.exists(folder)


def test_tandem_up_stops_at_once_when_told_to_while_starting(tmp_path):
    # Its signal handlers only set a flag that start-up never looked at: SIGTERM or Ctrl-C waited
    # until every worker was healthy (or 300 s for one that never would be).
    up = spawn(
        tandem_argv("up", "--port", str(free_port()), "--kv-cache-bytes", str(KV_BYTES)),
        None,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    children: list[psutil.Process] = []
    try:
        assert "starting" in up.stdout.readline()  # type: ignore[union-attr]
        for _ in range(300):  # its two workers (loading the model, not yet healthy)
            children = psutil.Process(up.pid).children(recursive=True)
            if len(children) >= 2:
                break
            threading.Event().wait(0.1)
        up.send_signal(signal.SIGINT)
        out, _ = up.communicate(timeout=60)
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
    assert up.returncode == 0 and "stopped while starting" in out, out
    assert "serving" not in out
    psutil.wait_procs(children, timeout=10)
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]


def test_a_child_dies_with_its_supervisor_even_when_that_is_killed():
    # PR_SET_PDEATHSIG, set by the launcher through libc's prctl (found in the process itself, so
    # glibc and musl images alike; it named libc.so.6, which musl lacks).
    import sys

    code = (
        "import time; from tandem_worker.server.local import popen_dying_with_parent; "
        "p = popen_dying_with_parent(['/bin/sleep', '100']); print(p.pid, flush=True); time.sleep(100)"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        child = psutil.Process(int(parent.stdout.readline()))  # type: ignore[union-attr]
        assert child.is_running() and child.status() != psutil.STATUS_ZOMBIE
    finally:
        parent.kill()
        parent.wait()

    def dead() -> bool:  # reaped, or a zombie awaiting its reaper
        try:
            return child.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    for _ in range(100):
        if dead():
            break
        threading.Event().wait(0.1)
    assert dead()


def test_the_banner_lists_every_process_s_metrics_url():
    # `tandem up` drew each process's metrics port at random and printed none of them.
    from tandem_worker.server.local import Child, LocalDeployment

    d = LocalDeployment(prefill=1, decode=1, http_port=8000)
    d.children = [
        d._worker("prefill", 0),
        d._worker("decode", 0),
        Child("router", d.endpoint, [], metrics_port=9100),
    ]
    lines = d.banner()
    listed = {line.split()[0]: line.split()[1] for line in lines if line.endswith("/metrics")}
    assert listed == {
        "router": "http://127.0.0.1:9100/metrics",
        "prefill-0": f"http://127.0.0.1:{d.children[0].metrics_port}/metrics",
        "decode-0": f"http://127.0.0.1:{d.children[1].metrics_port}/metrics",
    }
    for c in d.children[:2]:  # the port each worker is told to serve /metrics on
        assert c.argv[c.argv.index("--metrics-port") + 1] == str(c.metrics_port)
    assert "  OpenAI-compatible HTTP: http://127.0.0.1:8000/v1" in lines


def test_metrics_port_puts_the_router_there_and_the_workers_on_free_ports_above():
    import socket

    from tandem_worker.server.local import LocalDeployment

    base = free_port()
    d = LocalDeployment(prefill=1, decode=2, metrics_port=base)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", base + 1))  # taken by something else: skipped
        ports = [d._worker("prefill", 0).metrics_port, d._worker("decode", 0).metrics_port]
    ports.append(d._worker("decode", 1).metrics_port)  # one the autoscaler adds later
    assert base + 1 not in ports and ports == sorted(set(ports)) and ports[0] > base
    assert d._router_metrics_port() == base
    with socket.socket() as busy:  # refused at start, not once the workers have loaded the model
        busy.bind(("127.0.0.1", base))
        with pytest.raises(OSError, match=f"--metrics-port {base}: 127.0.0.1:{base} is in use"):
            LocalDeployment(metrics_port=base).start()
    with pytest.raises(ValueError, match="also the router's"):
        LocalDeployment(port=base, metrics_port=base)
