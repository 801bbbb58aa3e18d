"""`tandem up`: a whole deployment (workers and router) as local processes.

The children are the same `tandem worker` / `tandem router` processes the operator runs as pods.
Each child has the kernel kill it if this supervisor dies (PR_SET_PDEATHSIG), so even a
SIGKILLed supervisor leaves no orphans; Ctrl-C or SIGTERM stops them all cleanly (SIGTERM, a grace
period in which workers drain, then SIGKILL).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

# A child must die with its supervisor (PR_SET_PDEATHSIG), but not through Popen(preexec_fn=...):
# running Python in a forked child while gRPC is active can crash it before it execs (grpcio >= 1.80,
# grpc/grpc#43055). So a tiny launcher sets the signal (it survives exec) and execs the real command.
_LAUNCH = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    os._exit(1)  # the parent died before the signal was set\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def popen_dying_with_parent(argv: list[str], **kw: Any) -> subprocess.Popen:
    """Start `argv` so that it is SIGKILLed if this process dies (call from the main thread: the
    signal follows the thread that started the child)."""
    return subprocess.Popen([sys.executable, "-S", "-c", _LAUNCH, str(os.getpid()), *argv], **kw)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class Child:
    name: str
    address: str
    argv: list[str]
    proc: subprocess.Popen | None = None
    metrics_port: int = 0


@dataclass
class LocalDeployment:
    prefill: int = 1
    decode: int = 1
    colocated: int = 0
    port: int = 50051
    host: str = "127.0.0.1"
    model: str = "smollm2-135m"
    kv_cache_bytes: int = 1 << 30
    startup_timeout: float = 300.0
    log_dir: str | None = None
    lora_store: str | None = None  # a folder of PEFT adapters every worker can load from
    http_port: int = 0  # the router's OpenAI-compatible HTTP API (0: off)
    kserve_port: int = 0  # the router's KServe v2 gRPC API (0: off)
    children: list[Child] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.colocated and (self.prefill or self.decode):
            raise ValueError("choose --colocated K, or --prefill N --decode M, not both")
        if not self.colocated and (self.prefill < 1 or self.decode < 1):
            raise ValueError("a disaggregated deployment needs at least 1 prefill and 1 decode worker")

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def _worker(self, role: str, i: int) -> Child:
        port, mport = free_port(self.host), free_port(self.host)
        argv = [
            sys.executable,
            "-m",
            "tandem_worker.cli",
            "worker",
            "--role",
            role,
            "--host",
            self.host,
            "--port",
            str(port),
            "--metrics-port",
            str(mport),
            "--model",
            self.model,
            "--kv-cache-bytes",
            str(self.kv_cache_bytes),
        ]
        if self.lora_store:
            argv += ["--lora-store", self.lora_store]
        return Child(f"{role}-{i}", f"{self.host}:{port}", argv, metrics_port=mport)

    def _spawn(self, child: Child) -> None:
        out = None
        if self.log_dir:
            os.makedirs(self.log_dir, exist_ok=True)
            out = open(os.path.join(self.log_dir, f"{child.name}.log"), "ab")  # noqa: SIM115 - child owns it
        child.proc = popen_dying_with_parent(
            child.argv,
            stdout=out or subprocess.DEVNULL,
            stderr=out or None,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def start(self) -> None:
        """Start every worker, wait until each is healthy, then start the router in front of them."""
        workers = [self._worker("prefill", i) for i in range(self.prefill)]
        workers += [self._worker("decode", i) for i in range(self.decode)]
        workers += [self._worker("colocated", i) for i in range(self.colocated)]
        self.children = list(workers)
        try:
            for w in workers:
                self._spawn(w)
            self._wait_healthy(workers)
            decode = [w.address for w in workers if not w.name.startswith("prefill")]
            prefill = [w.address for w in workers if w.name.startswith("prefill")]
            router = Child(
                "router",
                self.endpoint,
                [
                    sys.executable,
                    "-m",
                    "tandem_worker.cli",
                    "router",
                    "--host",
                    self.host,
                    "--port",
                    str(self.port),
                    "--metrics-port",
                    str(free_port(self.host)),
                    "--model",
                    self.model,
                    *[a for d in decode for a in ("--decode", d)],
                    *[a for p in prefill for a in ("--prefill", p)],
                    *(["--http-port", str(self.http_port)] if self.http_port else []),
                    *(["--kserve-port", str(self.kserve_port)] if self.kserve_port else []),
                ],
            )
            self.children.append(router)
            self._spawn(router)
            self._wait_healthy([router])
        except BaseException:
            self.stop()
            raise

    def _wait_healthy(self, children: list[Child]) -> None:
        deadline = time.monotonic() + self.startup_timeout
        pending = list(children)
        while pending:
            for c in list(pending):
                code = c.proc.poll() if c.proc else None
                if code is not None:
                    raise RuntimeError(f"{c.name} exited with code {code} during start-up")
                try:
                    with grpc.insecure_channel(c.address) as ch:
                        r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if r.status == health_pb2.HealthCheckResponse.SERVING:
                        pending.remove(c)
                except grpc.RpcError:
                    pass
            if pending and time.monotonic() > deadline:
                raise TimeoutError(
                    f"not healthy after {self.startup_timeout:.0f}s: {', '.join(c.name for c in pending)}"
                )
            if pending:
                time.sleep(0.3)

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM everyone (router first, so no new work reaches draining workers), then SIGKILL."""
        for c in reversed(self.children):
            if c.proc and c.proc.poll() is None:
                c.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for c in reversed(self.children):
            if c.proc is None:
                continue
            try:
                c.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                c.proc.kill()
                c.proc.wait()

    def run_forever(self, stop: threading.Event) -> int:
        """Supervise until `stop`; report children that die. Returns the exit status."""
        reported: set[str] = set()
        while not stop.wait(0.5):
            for c in self.children:
                code = c.proc.poll() if c.proc else None
                if code is not None and c.name not in reported:
                    reported.add(c.name)
                    print(
                        f"tandem up: {c.name} ({c.address}) exited with code {code}",
                        file=sys.stderr,
                        flush=True,
                    )
                    if c.name == "router":
                        return 1
        return 0


def up(deployment: LocalDeployment) -> int:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    shape = (
        f"{deployment.colocated} colocated"
        if deployment.colocated
        else f"{deployment.prefill} prefill + {deployment.decode} decode"
    )
    print(f"tandem up: starting {shape} worker(s) for {deployment.model} ...", flush=True)
    deployment.start()
    print(
        f"tandem up: serving {deployment.model} on {deployment.endpoint} ({shape}). Ctrl-C stops it.",
        flush=True,
    )
    print(
        f"  try: tandem generate --endpoint {deployment.endpoint} --stream --chat --prompt 'Hello!'",
        flush=True,
    )
    if deployment.http_port:
        print(f"  OpenAI-compatible HTTP: http://{deployment.host}:{deployment.http_port}/v1", flush=True)
    if deployment.kserve_port:
        print(f"  KServe v2 gRPC: {deployment.host}:{deployment.kserve_port}", flush=True)
    try:
        status = deployment.run_forever(stop)
    finally:
        deployment.stop()
    print("tandem up: stopped", flush=True)
    return status
