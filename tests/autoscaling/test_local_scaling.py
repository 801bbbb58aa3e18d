"""`tandem up --autoscale` on real processes: workers join and drain under traffic, and the closed
loop (metrics -> the operator's policy -> processes) adds a prefill worker when TTFT misses."""

from __future__ import annotations

import os
import queue
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from tandem_operator.autoscaling.policy import AutoscalingSpec
from tandem_proto.v1 import inference_pb2 as pb
from tandem_proto.v1 import inference_pb2_grpc as pbgrpc
from tandem_worker.server.local import LocalDeployment
from tests.conftest import REPO_ROOT

os.environ.setdefault("TANDEM_CACHE_DIR", str(REPO_ROOT / ".cache" / "models"))

from tests.serving.procs import KV_BYTES, free_port, spawn, tandem_argv  # noqa: E402

pytestmark = pytest.mark.slow  # real processes


def _request(prompt: str, max_tokens: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        text=prompt, sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    )


def _stream(endpoint: str, req: pb.GenerateRequest, started: threading.Event | None = None) -> list[int]:
    with grpc.insecure_channel(endpoint) as ch:
        tokens: list[int] = []
        for msg in pbgrpc.InferenceStub(ch).Generate(req, timeout=240):
            tokens += msg.token_ids
            if started is not None and tokens:
                started.set()
        return tokens


def _wait(cond, timeout: float, what: str, tick=None) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        if tick is not None:
            tick()
        time.sleep(0.3)


def test_workers_join_and_drain_without_losing_requests(tmp_path):
    spec = AutoscalingSpec(
        prefill_min_replicas=1, prefill_max_replicas=2, decode_min_replicas=1, decode_max_replicas=2
    )
    d = LocalDeployment(
        prefill=1, decode=2, port=free_port(), kv_cache_bytes=KV_BYTES, log_dir=str(tmp_path), autoscale=spec
    )
    d.start()
    try:
        # Requests streaming on both decode workers when one of them is told to go.
        n = 6
        started = [threading.Event() for _ in range(n)]
        with ThreadPoolExecutor(n) as ex:
            futures = [
                ex.submit(
                    _stream, d.endpoint, _request(f"Story number {i}: once upon a time", 40), started[i]
                )
                for i in range(n)
            ]
            _wait(lambda: all(e.is_set() for e in started), 180, "every request's first token")
            d.scale("decode", 1)
            assert d.target("decode") == 1 and len(d.stopping) == 1
            results = [f.result() for f in futures]
        assert all(len(t) == 40 for t in results), [len(t) for t in results]  # nothing cut short
        _wait(lambda: not d.stopping, 60, "the drained decode worker to exit", tick=d.poll)
        assert open(os.path.join(d.targets_dir, "decode")).read().count("\n") == 1
        # A new prefill worker joins the router's list once healthy, and takes work.
        d.scale("prefill", 2)
        _wait(lambda: d.ready("prefill") == 2, 240, "the new prefill worker", tick=d.poll)
        assert open(os.path.join(d.targets_dir, "prefill")).read().count("\n") == 2
        time.sleep(1.5)  # the router re-reads its lists every 0.5 s
        with ThreadPoolExecutor(4) as ex:
            outs = list(ex.map(lambda i: _stream(d.endpoint, _request(f"Question {i}: why?", 4)), range(8)))
        assert all(len(t) == 4 for t in outs)
        new = next(c for c in d.children if c.name == "prefill-1")
        import urllib.request

        text = (
            urllib.request.urlopen(f"http://127.0.0.1:{new.metrics_port}/metrics", timeout=10).read().decode()
        )
        computed = [ln for ln in text.splitlines() if ln.startswith("tandem_prefill_tokens_computed_total")]
        assert computed and float(computed[0].split()[-1]) > 0, "the new prefill worker got no work"
    finally:
        d.stop()


def test_tandem_up_autoscale_adds_prefill_when_ttft_misses(tmp_path):
    """The closed loop: a 1 ms TTFT SLO makes every request miss it, the policy blames prefill and
    `tandem up --autoscale` starts a second prefill worker; requests keep succeeding meanwhile."""
    port = free_port()
    argv = tandem_argv(
        "up", "--prefill", "1", "--decode", "1", "--port", str(port), "--kv-cache-bytes", str(KV_BYTES),
        "--log-dir", str(tmp_path / "logs"), "--autoscale", "--max-prefill", "2", "--max-decode", "1",
        "--slo-ttft-ms", "1", "--slo-tpot-ms", "100000", "--window", "10", "--min-requests", "4",
        "--cooldown", "2", "--stabilization", "10",
    )  # fmt: skip
    up = spawn(argv, None, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str | None] = queue.Queue()
    output: list[str] = []

    def pump() -> None:
        for line in up.stdout:  # type: ignore[union-attr]
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()

    def read_until(word: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            assert line is not None, "tandem up exited:\n" + "".join(output)
            output.append(line)
            if word in line:
                return line
        raise AssertionError(f"no {word!r} within {timeout}s:\n" + "".join(output))

    stop_load = threading.Event()
    failures: list[str] = []
    done = [0]

    def load() -> None:
        while not stop_load.is_set():
            try:
                assert len(_stream(f"127.0.0.1:{port}", _request("Tell me a fact.", 2))) == 2
                done[0] += 1
            except (grpc.RpcError, AssertionError) as e:  # noqa: PERF203
                failures.append(repr(e))

    try:
        read_until("serving", 240)
        threads = [threading.Thread(target=load, daemon=True) for _ in range(2)]
        for t in threads:
            t.start()
        line = read_until("autoscale prefill 1 -> 2", 180)
        assert "ttft" in line.lower(), line  # the policy said why: TTFT misses point at prefill
        stop_load.set()
        for t in threads:
            t.join(timeout=120)
        assert done[0] >= 4 and not failures, failures
        # Idle after the load: back to the minimum once the stabilization window has passed.
        read_until("autoscale prefill 2 -> 1", 120)
    finally:
        stop_load.set()
        up.terminate()
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            up.kill()
