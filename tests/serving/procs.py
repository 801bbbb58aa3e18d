"""Real Tandem processes for the serving tests: start, wait for health, inspect, kill, restart.

Every child is started from the test process's main thread with PR_SET_PDEATHSIG (as `tandem up`
does), so even a killed pytest leaves no orphan; fixtures stop them in teardown as well. Each
child's output goes to a log file whose tail is shown when it fails to start.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from tandem_proto.v1 import inference_pb2 as pb
from tandem_proto.v1 import inference_pb2_grpc as pbgrpc
from tandem_proto.v1 import worker_pb2 as wpb
from tandem_proto.v1 import worker_pb2_grpc as wgrpc
from tandem_worker.server.local import free_port, popen_dying_with_parent

HOST = "127.0.0.1"
KV_BYTES = 200_000_000  # ~4300 tokens of SmolLM2 KV per worker: small, but room for every test
START_TIMEOUT = 240.0  # workers load the model (~10 s alone, longer on a busy 2-core machine)


def tandem_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "tandem_worker.cli", *args]


def spawn(argv: list[str], log: Path | None, **kw: Any) -> subprocess.Popen:
    """A child that dies with this process (PR_SET_PDEATHSIG); call from the main thread only (the
    signal fires when the *thread* that started it exits)."""
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - the child keeps it
    try:
        return popen_dying_with_parent(
            argv,
            stdout=kw.pop("stdout", out),
            stderr=kw.pop("stderr", subprocess.STDOUT if log else None),
            env={**os.environ, "PYTHONUNBUFFERED": "1", **kw.pop("env", {})},
            **kw,
        )
    finally:
        if log:
            out.close()


@dataclass
class Proc:
    """One `tandem worker` or `tandem router` process on a fixed port (kept across restarts)."""

    name: str
    args: list[str]  # the CLI arguments after `tandem`, without --port/--metrics-port
    log_dir: Path
    port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    _channel: grpc.Channel | None = None

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def log(self) -> Path:
        return self.log_dir / f"{self.name}.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> Proc:
        argv = tandem_argv(
            *self.args, "--host", HOST, "--port", str(self.port), "--metrics-port", str(self.metrics_port)
        )
        with open(self.log, "a") as f:
            f.write(f"\n=== {' '.join(argv)}\n")
        self.proc = spawn(argv, self.log)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def channel(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.address)
        return self._channel

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def healthy(self) -> bool:
        try:
            with grpc.insecure_channel(self.address) as ch:
                r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
            return r.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            return False

    # --- workers -------------------------------------------------------------------------------

    def stats(self, timeout: float = 5.0) -> wpb.StatsResponse:
        return wgrpc.AdminStub(self.channel).Stats(wpb.StatsRequest(), timeout=timeout)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """/metrics as {(sample name, sorted labels): value}."""
        with urllib.request.urlopen(f"http://{HOST}:{self.metrics_port}/metrics", timeout=10) as r:
            text = r.read().decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
        }

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)

    # --- stopping ------------------------------------------------------------------------------

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.alive():
            self.proc.send_signal(sig)  # type: ignore[union-attr]
            if sig == signal.SIGKILL:
                self.proc.wait(10)  # type: ignore[union-attr]

    def close_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None


def worker(role: str, name: str, log_dir: Path, *extra: str, model: str = "smollm2-135m") -> Proc:
    return Proc(
        name,
        ["worker", "--role", role, "--model", model, "--kv-cache-bytes", str(KV_BYTES), *extra],
        log_dir,
    )


def router(
    name: str, log_dir: Path, decode: Iterable[Proc], prefill: Iterable[Proc] = (), *extra: str
) -> Proc:
    args = ["router"]
    for d in decode:
        args += ["--decode", d.address]
    for p in prefill:
        args += ["--prefill", p.address]
    return Proc(name, [*args, *extra], log_dir)


def wait_healthy(procs: Iterable[Proc], timeout: float = START_TIMEOUT) -> None:
    pending = list(procs)
    deadline = time.monotonic() + timeout
    while pending:
        for p in list(pending):
            if not p.alive():
                code = p.proc.poll() if p.proc else None
                raise RuntimeError(f"{p.name} exited with {code} during start-up:\n{p.log_tail()}")
            if p.healthy():
                pending.remove(p)
        if pending:
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {p.name}\n{p.log_tail()}" for p in pending)
                raise TimeoutError(f"not healthy after {timeout:.0f}s: {[p.name for p in pending]}\n{tails}")
            time.sleep(0.25)


def stop_all(procs: Iterable[Proc], grace: float = 15.0) -> None:
    """SIGTERM everyone at once, wait, then SIGKILL whatever is left."""
    procs = [p for p in procs if p.proc is not None]
    for p in procs:
        p.close_channel()
        if p.alive():
            p.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.proc.wait(max(0.1, deadline - time.monotonic()))  # type: ignore[union-attr]
        except subprocess.TimeoutExpired:
            p.proc.kill()  # type: ignore[union-attr]
            p.proc.wait()  # type: ignore[union-attr]


def wait_for(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll `cond` until it returns something truthy; fail naming `what` and the last value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = cond()
        except grpc.RpcError as e:
            last = f"{e.code()}: {e.details()}"
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s (last: {last!r})")
        time.sleep(interval)


def assert_idle(workers: Iterable[Proc], timeout: float = 10.0) -> None:
    """Every worker soon holds no KV block for a request and has nothing in flight (blocks holding
    LoRA adapters are the adapters', not a request's)."""
    for w in workers:
        last: list[str] = []

        def idle(w: Proc = w, last: list[str] = last) -> bool:
            s = w.stats(timeout=2)
            last[:] = [
                f"used_blocks={s.used_blocks} (adapters {s.adapter_blocks}) in_flight={s.in_flight} "
                f"running={s.running} waiting={s.waiting}"
            ]
            busy = s.used_blocks - s.adapter_blocks
            return busy == 0 and s.in_flight == 0 and s.running == 0 and s.waiting == 0

        try:
            wait_for(idle, timeout, f"{w.name} frees every block")
        except AssertionError:
            raise AssertionError(f"{w.name} still busy after {timeout}s: {last}") from None


# --- the client side -----------------------------------------------------------------------------


@dataclass
class Result:
    prompt_token_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: int = 0
    stop_reason: str = ""
    usage: pb.Usage | None = None
    messages: int = 0
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    # The prompt's tokens 1..n-1 (as the wire carries them), when asked for; how many messages had them.
    prompt_logprobs: list[float] = field(default_factory=list)
    prompt_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    prompt_logprobs_messages: int = 0


def sampling(**kw: Any) -> pb.SamplingParams:
    return pb.SamplingParams(**kw)


def greedy(max_tokens: int = 16, **kw: Any) -> pb.SamplingParams:
    return pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


def request(prompt: str | list[int] | list[dict[str, str]], params: pb.SamplingParams, **kw: Any):
    req = pb.GenerateRequest(sampling=params, **kw)
    if isinstance(prompt, str):
        req.text = prompt
    elif prompt and isinstance(prompt[0], dict):
        for m in prompt:
            req.chat.messages.add(role=m["role"], content=m["content"])  # type: ignore[index]
    else:
        req.token_ids.ids.extend(prompt)  # type: ignore[arg-type]
    return req


def generate(endpoint: Proc | grpc.Channel, req: pb.GenerateRequest, timeout: float = 120.0) -> Result:
    """Run one request to the end; a gRPC error propagates as grpc.RpcError."""
    ch = endpoint.channel if isinstance(endpoint, Proc) else endpoint
    r = Result()
    for msg in pbgrpc.InferenceStub(ch).Generate(req, timeout=timeout):
        assert not r.finish_reason, "a message after the final one"
        r.messages += 1
        r.prompt_token_ids.extend(msg.prompt_token_ids)
        r.token_ids.extend(msg.token_ids)
        r.text += msg.text
        r.logprobs.extend(msg.logprobs)
        r.top_logprobs.extend(list(zip(t.token_ids, t.logprobs)) for t in msg.top_logprobs)
        if msg.HasField("prompt_logprobs"):
            r.prompt_logprobs_messages += 1
            r.prompt_logprobs.extend(msg.prompt_logprobs.logprobs)
            pl = msg.prompt_logprobs.top_logprobs
            r.prompt_top_logprobs.extend(list(zip(t.token_ids, t.logprobs)) for t in pl)
        if msg.finish_reason:
            r.finish_reason = msg.finish_reason
            r.stop_reason = msg.stop_reason
            r.usage = msg.usage
    assert r.finish_reason, "the stream ended without a finish reason"
    return r


def rpc_error(fn: Callable[[], Any]) -> grpc.RpcError:
    try:
        fn()
    except grpc.RpcError as e:
        return e
    raise AssertionError("expected a gRPC error, the call succeeded")
