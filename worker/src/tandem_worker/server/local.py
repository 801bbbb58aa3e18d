"""`tandem up`: a whole deployment (workers and router) as local processes.

The children are the same `tandem worker` / `tandem router` processes the operator runs as pods.
Each child has the kernel kill it if this supervisor dies (PR_SET_PDEATHSIG), so even a
SIGKILLed supervisor leaves no orphans; Ctrl-C or SIGTERM stops them all cleanly (SIGTERM, a grace
period in which workers drain, then SIGKILL).
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
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

from ..engine.config import EngineConfig
from .health import LIVENESS_SERVICE

# A child must die with its supervisor (PR_SET_PDEATHSIG), but not through Popen(preexec_fn=...):
# running Python in a forked child while gRPC is active can crash it before it execs (grpcio >= 1.80,
# grpc/grpc#43055). So a tiny launcher sets the signal (it survives exec) and execs the real command.
_LAUNCH = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (glibc or musl)\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    os._exit(1)  # the parent died before the signal was set\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def popen_dying_with_parent(argv: list[str], **kw: Any) -> subprocess.Popen:
    """Start `argv` so that it is SIGKILLed if this process dies (call from the main thread: the
    signal follows the thread that started the child)."""
    return subprocess.Popen([sys.executable, "-S", "-c", _LAUNCH, str(os.getpid()), *argv], **kw)


_PORTS_GIVEN: set[int] = set()
_PORT_SPAN = 12000


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, for a child server to bind soon after.

    Drawn just below the kernel's ephemeral range. A port from bind(0) lies inside that range,
    where any outgoing connection (gRPC channels, health checks, scrapes) can take it as its local
    port before the child binds it, and the child then dies with EADDRINUSE. Never hands out the
    same port twice in one process, since the first taker may not have bound it yet."""
    low = _ephemeral_low()
    if low - _PORT_SPAN < 1024:  # an unusual range: no room below it
        with socket.socket(_family(host)) as s:
            s.bind((host, 0))
            return s.getsockname()[1]
    rng = random.SystemRandom()
    family = _family(host)
    for _ in range(1000):
        port = rng.randrange(low - _PORT_SPAN, low)
        if port in _PORTS_GIVEN:
            continue
        with socket.socket(family) as s:
            try:
                s.bind((host, port))
            except OSError as e:
                if e.errno in (errno.EADDRINUSE, errno.EACCES):
                    continue
                # Not this port but the address: no other port would do (it spun for ever).
                raise OSError(f"cannot listen on {host}: {e.strerror or e}") from None
        _PORTS_GIVEN.add(port)
        return port
    raise OSError(f"no free port on {host} in {low - _PORT_SPAN}-{low - 1}")


def _bindable(host: str, port: int) -> bool:
    with socket.socket(_family(host)) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _url(host: str, port: int, path: str = "") -> str:
    return f"http://[{host}]:{port}{path}" if ":" in host else f"http://{host}:{port}{path}"


def _family(host: str) -> socket.AddressFamily:
    """The address family `host` binds with (an IPv6 address needs an AF_INET6 socket)."""
    try:
        return socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as e:
        raise OSError(f"cannot resolve host {host!r}: {e.strerror or e}") from None


@dataclass
class Child:
    name: str
    address: str
    argv: list[str]
    proc: subprocess.Popen | None = None
    metrics_port: int = 0
    restarts: list[float] = field(default_factory=list)  # time.monotonic() of each restart


@dataclass
class LocalDeployment:
    prefill: int = 1
    decode: int = 1
    colocated: int = 0
    port: int = 50051
    host: str = "127.0.0.1"
    model: str = "smollm2-135m"
    kv_cache_bytes: int = 1 << 30
    device: str = "cpu"  # every worker's; on one GPU they share it, each within its KV budget
    startup_timeout: float = 300.0
    log_dir: str | None = None
    lora_store: str | None = None  # a folder of PEFT adapters every worker can load from
    http_port: int = 0  # the router's OpenAI-compatible HTTP API (0: off)
    kserve_port: int = 0  # the router's KServe v2 gRPC API (0: off)
    slo_ttft_ms: float = 2000.0  # the router judges each request against these (metrics, autoscaling)
    slo_tpot_ms: float = 200.0
    # The router's /metrics port; the workers' are the next free ports above it, so that a scrape
    # config can name them. 0: free ports drawn at random (each printed once serving).
    metrics_port: int = 0
    # Autoscaling: the router reads its workers from files that `scale` rewrites.
    autoscale: Any = None  # a tandem_operator.autoscaling.policy.AutoscalingSpec, or None
    # Where the router's worker lists and a Prometheus file_sd target file (targets.json) go.
    targets_dir: str | None = None
    prometheus_url: str | None = None  # autoscale from this Prometheus (scraping targets.json)
    scrape_interval: float = 15.0  # seconds between that Prometheus' scrapes
    children: list[Child] = field(default_factory=list)
    starting: list[Child] = field(default_factory=list)  # spawned, not yet healthy (autoscaling)
    stopping: list[Child] = field(default_factory=list)  # draining after SIGTERM (autoscaling)
    # Set (by up's signal handlers) to stop: start-up gives up at once, run_forever returns.
    stop_requested: threading.Event = field(default_factory=threading.Event)
    _own_targets_dir: bool = False  # made here (a temporary folder): removed by stop()
    _last_metrics_port: int = 0  # the highest worker metrics port handed out from metrics_port

    def __post_init__(self) -> None:
        if self.colocated and (self.prefill or self.decode):
            raise ValueError("choose --colocated K, or --prefill N --decode M, not both")
        if self.colocated < 0 or self.prefill < 0 or self.decode < 0:
            raise ValueError("worker counts must not be negative")
        if not self.colocated and (self.prefill < 1 or self.decode < 1):
            raise ValueError("a disaggregated deployment needs at least 1 prefill and 1 decode worker")
        # Here, before any child starts: each would die of it after loading the model.
        EngineConfig(device=self.device)
        if self.metrics_port and self.metrics_port in (self.port, self.http_port, self.kserve_port):
            raise ValueError(f"--metrics-port {self.metrics_port} is also the router's gRPC or HTTP port")

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def _worker_metrics_port(self) -> int:
        if not self.metrics_port:
            return free_port(self.host)
        # The router's own ports are not bound yet when workers start: skip them by number.
        taken = {self.port, self.http_port, self.kserve_port}
        port = max(self._last_metrics_port, self.metrics_port) + 1
        while port in taken or port in _PORTS_GIVEN or not _bindable(self.host, port):
            port += 1
            if port > 65535:
                raise OSError(f"--metrics-port {self.metrics_port}: no free port above it for a worker")
        _PORTS_GIVEN.add(port)
        self._last_metrics_port = port
        return port

    def _router_metrics_port(self) -> int:
        if not self.metrics_port:
            return free_port(self.host)
        if not _bindable(self.host, self.metrics_port):
            raise OSError(f"--metrics-port {self.metrics_port}: {self.host}:{self.metrics_port} is in use")
        _PORTS_GIVEN.add(self.metrics_port)
        return self.metrics_port

    def _worker(self, role: str, i: int) -> Child:
        port, mport = free_port(self.host), self._worker_metrics_port()
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
            "--device",
            self.device,
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
            # Out of the terminal's process group: Ctrl-C reaches only `tandem up`, which then
            # stops the children in order (router first) instead of each dying mid-request.
            start_new_session=True,
        )
        if out is not None:
            out.close()  # the child has its own copy

    def start(self) -> None:
        """Start every worker, wait until each is healthy, then start the router in front of them."""
        # Checked before the workers spend a minute loading the model, not once they are healthy.
        router_metrics = self._router_metrics_port()
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
                    str(router_metrics),
                    "--model",
                    self.model,
                    *self._router_targets(decode, prefill),
                    "--slo-ttft-ms",
                    str(self.slo_ttft_ms),
                    "--slo-tpot-ms",
                    str(self.slo_tpot_ms),
                    *(["--http-port", str(self.http_port)] if self.http_port else []),
                    *(["--kserve-port", str(self.kserve_port)] if self.kserve_port else []),
                ],
                metrics_port=router_metrics,
            )
            self.children.append(router)
            self._spawn(router)
            self._wait_healthy([router])
            self._write_targets()  # Prometheus' target list now includes the router
        except BaseException:
            self.stop()
            raise

    # --- scaling (tandem up --autoscale) ----------------------------------------------------------

    def _router_targets(self, decode: list[str], prefill: list[str]) -> list[str]:
        if self.autoscale is None:
            return [
                *[a for d in decode for a in ("--decode", d)],
                *[a for p in prefill for a in ("--prefill", p)],
            ]
        import tempfile

        if self.targets_dir is None:
            self.targets_dir = tempfile.mkdtemp(prefix="tandem-up-")
            self._own_targets_dir = True
        self._write_targets()
        return [
            "--decode",
            f"file:{os.path.join(self.targets_dir, 'decode')}",
            "--prefill",
            f"file:{os.path.join(self.targets_dir, 'prefill')}",
        ]

    def _write_targets(self) -> None:
        """The router's worker lists: every worker that is up, draining ones included (they refuse
        new work themselves; dropping them early would cut their in-flight calls)."""
        if self.targets_dir is None:
            return
        os.makedirs(self.targets_dir, exist_ok=True)
        # Prometheus (file_sd_configs) scrapes the same processes the autoscaler would.
        metrics = [f"{self.host}:{c.metrics_port}" for c in self.children if c.metrics_port]
        sd = [{"targets": metrics, "labels": {"deployment": PROMETHEUS_DEPLOYMENT_LABEL}}]
        _write_atomic(os.path.join(self.targets_dir, "targets.json"), json.dumps(sd))
        for role in ("prefill", "decode"):
            addrs = [c.address for c in self.children if _role(c) == role]
            _write_atomic(os.path.join(self.targets_dir, role), "".join(a + "\n" for a in addrs))

    def target(self, role: str) -> int:
        """Workers of `role` that are up or starting, not draining."""
        return sum(1 for c in [*self.children, *self.starting] if _role(c) == role and c not in self.stopping)

    def ready(self, role: str) -> int:
        return sum(1 for c in self.children if _role(c) == role and c not in self.stopping)

    def scale(self, role: str, n: int) -> None:
        """Start or drain workers of `role` until `n` are up or starting (call from the main thread)."""
        while self.target(role) < n:
            index = max(
                [int(c.name.rsplit("-", 1)[1]) for c in [*self.children, *self.starting] if _role(c) == role]
                + [-1]
            )
            child = self._worker(role, index + 1)
            self._spawn(child)
            self.starting.append(child)
        while self.target(role) > n:
            pending = [c for c in self.starting if _role(c) == role]
            victim = (
                pending[-1]
                if pending
                else [c for c in self.children if _role(c) == role and c not in self.stopping][-1]
            )
            if victim in self.starting:
                self.starting.remove(victim)
                self.children.append(victim)  # so that it is reaped below like any other
            # SIGTERM: the worker drains (refuses new work, finishes what it holds), then exits.
            victim.proc.send_signal(signal.SIGTERM)
            self.stopping.append(victim)

    def poll(self) -> None:
        """Admit started workers that became healthy; forget drained ones that exited."""
        changed = False
        for c in list(self.starting):
            if c.proc.poll() is not None:
                self.starting.remove(c)
                print(f"tandem up: {c.name} exited with code {c.proc.returncode} during start-up", flush=True)
            elif _serving(c.address, timeout=0.2):
                self.starting.remove(c)
                self.children.append(c)
                changed = True
                print(f"tandem up: {c.name} ready, metrics {self.metrics_url(c)}", flush=True)
        for c in list(self.stopping):
            if c.proc.poll() is not None:
                self.stopping.remove(c)
                self.children.remove(c)
                changed = True
        if changed:
            self._write_targets()

    def metrics_url(self, c: Child) -> str:
        return _url(self.host, c.metrics_port, "/metrics")

    def router_metrics_url(self) -> str | None:
        router = next((c for c in self.children if c.name == "router"), None)
        return self.metrics_url(router) if router and router.metrics_port else None

    def worker_metrics_urls(self) -> dict[str, str]:
        return {self.metrics_url(c): _role(c) for c in self.children if _role(c) in ("prefill", "decode")}

    def banner(self) -> list[str]:
        """What `tandem up` prints once serving: where to send requests and where each process's
        Prometheus metrics are (their ports are drawn at random unless metrics_port is given)."""
        lines = [
            f"  try: tandem generate --endpoint {self.endpoint} --stream --chat --prompt 'Hello!'",
        ]
        if self.http_port:
            lines.append(f"  OpenAI-compatible HTTP: {_url(self.host, self.http_port, '/v1')}")
        if self.kserve_port:
            lines.append(f"  KServe v2 gRPC: {self.host}:{self.kserve_port}")
        # The router first: its metrics are the deployment's (requests, SLOs, workers by state).
        named = sorted((c for c in self.children if c.metrics_port), key=lambda c: c.name != "router")
        width = max((len(c.name) for c in named), default=0)
        lines += ["  Prometheus metrics:"] + [f"    {c.name:<{width}}  {self.metrics_url(c)}" for c in named]
        return lines

    def _wait_healthy(self, children: list[Child]) -> None:
        deadline = time.monotonic() + self.startup_timeout
        pending = list(children)
        while pending:
            if self.stop_requested.is_set():
                raise KeyboardInterrupt  # Ctrl-C or SIGTERM while starting: stop now, not when healthy
            for c in list(pending):
                code = c.proc.poll() if c.proc else None
                if code is not None:
                    raise RuntimeError(f"{c.name} exited with code {code} during start-up{self._log_hint(c)}")
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
                self.stop_requested.wait(0.3)

    def _log_hint(self, c: Child) -> str:
        """Where a child's output went, with its last lines (with --log-dir it is not on screen)."""
        if not self.log_dir:
            return ""
        path = os.path.join(self.log_dir, f"{c.name}.log")
        try:
            with open(path, errors="replace") as f:
                tail = "".join(f.readlines()[-8:])
        except OSError:
            return f" (its log: {path})"
        return f"; the end of its log {path}:\n{tail.rstrip()}"

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM the router, and once it has finished its in-flight requests the workers
        (which those requests need until then); SIGKILL whoever outlasts `grace`."""
        self.children += [c for c in self.starting if c not in self.children]
        self.starting = []
        deadline = time.monotonic() + grace
        routers = [c for c in self.children if c.name == "router"]
        workers = [c for c in self.children if c.name != "router"]
        for group in (routers, workers):
            for c in group:
                if c.proc and c.proc.poll() is None:
                    c.proc.send_signal(signal.SIGTERM)
            for c in group:
                if c.proc is None:
                    continue
                try:
                    c.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    c.proc.kill()
                    c.proc.wait()
        if self._own_targets_dir and self.targets_dir:
            shutil.rmtree(self.targets_dir, ignore_errors=True)

    def run_forever(self, stop: threading.Event | None = None, autoscaler: Any = None) -> int:
        """Supervise until `stop` (by default `stop_requested`): restart a worker that dies, as
        Kubernetes would (on its port, which the router keeps calling), unless it died
        RESTART_LIMIT times within RESTART_WINDOW_S; run the autoscaler. Returns the exit status:
        1 when the router or a worker that keeps dying ends the deployment."""
        stop = stop or self.stop_requested
        next_liveness = time.monotonic() + LIVENESS_CHECK_S
        while not stop.wait(0.5):
            if autoscaler is not None:
                autoscaler.tick()
            if time.monotonic() >= next_liveness:
                self._kill_stuck()
                next_liveness = time.monotonic() + LIVENESS_CHECK_S
            for c in self.children:
                code = c.proc.poll() if c.proc else None
                if code is None or c in self.stopping:
                    continue
                print(
                    f"tandem up: {c.name} ({c.address}) exited with code {code}", file=sys.stderr, flush=True
                )
                if c.name == "router":
                    return 1
                now = time.monotonic()
                c.restarts = [t for t in c.restarts if now - t < RESTART_WINDOW_S] + [now]
                if len(c.restarts) > RESTART_LIMIT:
                    print(
                        f"tandem up: {c.name} died {len(c.restarts)} times in {RESTART_WINDOW_S:.0f} s; "
                        f"stopping{self._log_hint(c)}",
                        file=sys.stderr,
                        flush=True,
                    )
                    return 1
                print(f"tandem up: restarting {c.name}", file=sys.stderr, flush=True)
                self._spawn(c)
        return 0

    def _kill_stuck(self) -> None:
        """Kill each worker whose engine watchdog says it is stuck (`LIVENESS_SERVICE`), as a
        liveness probe gets a pod restarted: the loop then restarts it like one that died. A hung
        CUDA call keeps the process up and its port answering, and the router only stops sending
        it work."""
        for c in self.children:
            if c.name == "router" or c in self.stopping or c in self.starting:
                continue
            if c.proc is not None and c.proc.poll() is None and _stuck(c.address):
                print(
                    f"tandem up: {c.name} ({c.address}): its engine is stuck (see its log); killing it",
                    file=sys.stderr,
                    flush=True,
                )
                c.proc.kill()
                c.proc.wait()


PROMETHEUS_DEPLOYMENT_LABEL = "tandem-up"
LIVENESS_CHECK_S = 10.0  # as the operator's liveness probe's period
RESTART_LIMIT = 3  # a worker restarted this often within the window is given up on
RESTART_WINDOW_S = 60.0


def _write_atomic(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)  # readers (the router, Prometheus) never see a half-written file


def _role(c: Child) -> str:
    return c.name.rsplit("-", 1)[0]


def _health(address: str, timeout: float, service: str = "") -> int | None:
    """What the process at `address` says of `service` in the gRPC health service; None when it
    does not answer."""
    try:
        with grpc.insecure_channel(address) as ch:
            request = health_pb2.HealthCheckRequest(service=service)
            return health_pb2_grpc.HealthStub(ch).Check(request, timeout=timeout).status
    except grpc.RpcError:
        return None


def _serving(address: str, timeout: float) -> bool:
    return _health(address, timeout) == health_pb2.HealthCheckResponse.SERVING


def _stuck(address: str, timeout: float = 2.0) -> bool:
    """The worker says its engine is stuck. A worker that does not answer is not judged here: it
    may be starting, or dying (the supervisor sees it exit)."""
    return _health(address, timeout, LIVENESS_SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING


def up(deployment: LocalDeployment) -> int:
    stop = deployment.stop_requested
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    shape = (
        f"{deployment.colocated} colocated"
        if deployment.colocated
        else f"{deployment.prefill} prefill + {deployment.decode} decode"
    )
    print(f"tandem up: starting {shape} worker(s) for {deployment.model} ...", flush=True)
    try:
        deployment.start()
    except KeyboardInterrupt:  # start() stopped every child it had started
        print("tandem up: stopped while starting", flush=True)
        return 0
    print(
        f"tandem up: serving {deployment.model} on {deployment.endpoint} ({shape}). Ctrl-C stops it.",
        flush=True,
    )
    print("\n".join(deployment.banner()), flush=True)
    autoscaler = None
    if deployment.autoscale is not None:
        from .autoscale_local import LocalAutoscaler

        autoscaler = LocalAutoscaler(
            deployment,
            deployment.autoscale,
            prometheus_url=deployment.prometheus_url,
            scrape_interval=deployment.scrape_interval,
        )
        spec = deployment.autoscale
        print(
            f"tandem up: autoscaling prefill {spec.prefill_min_replicas}..{spec.prefill_max_replicas}, "
            f"decode {spec.decode_min_replicas}..{spec.decode_max_replicas} "
            f"(SLO: TTFT {spec.ttft_ms:g} ms, TPOT {spec.tpot_ms:g} ms, attainment {spec.attainment:g})",
            flush=True,
        )
    try:
        status = deployment.run_forever(stop, autoscaler)
    finally:
        deployment.stop()
    print("tandem up: stopped", flush=True)
    return status
