"""`tandem router`: serve the Inference API in front of a pool of workers.

Besides `tandem.v1.Inference` (gRPC), the router process can serve an OpenAI-compatible HTTP API
(`http_port`, see `openai_http`) and KServe's Open Inference Protocol v2 over gRPC (`kserve_port`,
see `kserve`). Both translate to `tandem.v1.Inference` calls on the router's own port over
loopback, so they share its validation, admission, retries, metrics, deadlines and cancellation.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ..engine.config import ModelConfig
from ..engine.loader import resolve_model
from ..engine.tokenizer import Tokenizer
from . import metrics
from .listen import EXCLUSIVE_PORT_OPTIONS, listen
from .pb import inference_pb2, inference_pb2_grpc
from .pb import worker_pb2 as wpb
from .pb import worker_pb2_grpc as wgrpc
from .router import SLO, RouterService
from .worker_pool import WorkerPool

log = logging.getLogger(__name__)

# On SIGTERM, streams in flight get this long to finish (answers stream for tens of seconds; 5 s
# cut them off at every rollout). Within the pod's 35 s termination grace, after its 5 s preStop
# (builders.py).
DRAIN_SECONDS = 25.0
# How long a starting router's "not ready" is expected (logged as info), before it warns.
STARTUP_GRACE_SECONDS = 30.0


def serve_router(
    model: str,
    decode: list[str],
    prefill: list[str],
    host: str = "127.0.0.1",
    port: int = 50051,
    metrics_port: int = 0,
    max_in_flight: int = 512,
    slo: SLO | None = None,
    stop_event: threading.Event | None = None,
    http_port: int = 0,
    kserve_port: int = 0,
    served_model_name: str | None = None,
    tool_call_parser: str | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT (or `stop_event`). `http_port`/`kserve_port` 0: that frontend is
    off. `served_model_name` is the model id clients use (default: `model`). `tool_call_parser`:
    the model's tool-call format, which OpenAI's tool_choice "auto" reads calls in."""
    if not decode:
        raise ValueError("the router needs at least one decode or colocated worker (--decode)")
    folder = resolve_model(model, weights=False)  # config and tokenizer: no weights in the router
    cfg = ModelConfig.from_folder(folder)
    tok = Tokenizer(folder)
    eos = set(cfg.eos_token_ids) | ({tok.eos_token_id} if tok.eos_token_id is not None else set())
    pool = WorkerPool(decode, prefill).start()
    model_name = served_model_name or model
    service = RouterService(
        pool, tok, model_name, cfg.context_limit, eos, max_in_flight=max_in_flight, slo=slo
    )

    server = grpc.server(ThreadPoolExecutor(max_workers=max_in_flight + 16), options=EXCLUSIVE_PORT_OPTIONS)
    inference_pb2_grpc.add_InferenceServicer_to_server(service, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    name = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
    reflection.enable_server_reflection([name, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    try:
        bound = listen(server, host, port)
    except OSError:
        pool.stop()
        raise
    metrics.register_worker_pool(pool.snapshot, pool.clock)
    metrics.start_request_outcomes()
    metrics.serve_metrics(metrics_port, host)
    server.start()
    for n in ("", name):
        health_servicer.set(n, health_pb2.HealthCheckResponse.NOT_SERVING)
    print(f"tandem router listening on {host}:{bound}", flush=True)
    stop = stop_event or threading.Event()
    ready = threading.Event()
    upstream = f"{_loopback(host)}:{bound}"
    http_server = kserve_server = None
    try:
        if http_port:
            from .openai_http import OpenAIFrontend, serve_openai_http

            frontend = OpenAIFrontend(
                upstream,
                model_name,
                cfg.context_limit,
                tok,
                adapters=lambda: known_adapters(pool),
                ready=ready.is_set,
                kv_capacity=pool.kv_capacity_tokens,
                handoffs=service.handoffs,
                tool_call_parser=tool_call_parser,
            )
            http_server = serve_openai_http(host, http_port, frontend)
            print(f"tandem router: OpenAI-compatible HTTP on http://{host}:{http_server.port}/v1", flush=True)
        if kserve_port:
            try:
                from .kserve import KServeService, serve_kserve
            except ImportError as e:  # tritonclient missing: say so instead of a traceback
                raise RuntimeError(f"--kserve-port: {e}") from None

            kservice = KServeService(
                upstream,
                model_name,
                cfg.context_limit,
                adapters=lambda: known_adapters(pool),
                ready=ready.is_set,
                version=_version(),
                handoffs=service.handoffs,
            )
            kserve_server = serve_kserve(host, kserve_port, kservice, max_workers=max_in_flight + 16)
            print(f"tandem router: KServe v2 gRPC on {host}:{kserve_server.port}", flush=True)
    except BaseException:
        if http_server is not None:
            http_server.stop()
        server.stop(None)
        pool.stop()
        raise

    def track_readiness() -> None:
        # Ready (for probes, the frontends and `tandem up`) only while a whole worker pair could take
        # a request, as of the pool's last health checks: a router left with no usable pair must
        # leave the Service (its requests would all fail) and rejoin once workers are back.
        serving: bool | None = None
        told = None
        # While starting (before the first ready, within STARTUP_GRACE_SECONDS) "not ready" is
        # expected, the first health checks not yet answered: info, not a warning on the terminal
        # of `tandem up`. Later, or after having been ready, it is news.
        started, ever_ready, warned_slow = time.monotonic(), False, False
        while not stop.is_set():
            problem = pool.readiness_problem()
            starting = not ever_ready and time.monotonic() - started < STARTUP_GRACE_SECONDS
            if problem is None and serving is not True:
                set_serving(True)
                ever_ready = True
                log.info("router ready: a worker pair is healthy")
            elif problem is not None and (serving is not False or problem != told):
                if serving:
                    set_serving(False)
                log.log(logging.INFO if starting else logging.WARNING, "router not ready: %s", problem)
            elif problem is not None and not starting and not ever_ready and not warned_slow:
                log.warning("router not ready after %.0f s: %s", STARTUP_GRACE_SECONDS, problem)
                warned_slow = True
            serving, told = problem is None, problem
            stop.wait(0.25)

    def set_serving(on: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if on else health_pb2.HealthCheckResponse.NOT_SERVING
        for n in ("", name):
            health_servicer.set(n, status)
        if on:
            ready.set()
        else:
            ready.clear()
        if kserve_server is not None:
            kserve_server.set_serving(on)

    readiness = threading.Thread(target=track_readiness, name="router-ready", daemon=True)
    readiness.start()

    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            signal.signal(sig, lambda *_: stop.set())
        except ValueError:
            break
    stop.wait()
    readiness.join(timeout=5)  # else it could report SERVING again after this
    set_serving(False)
    # Close the frontends' listeners first; their in-flight calls finish within the gRPC grace.
    if http_server is not None:
        http_server.stop()
    stopping = [server.stop(grace=DRAIN_SECONDS)]
    if kserve_server is not None:
        stopping.append(kserve_server.stop(grace=DRAIN_SECONDS))
    for done in stopping:
        done.wait()
    for fe in (http_server, kserve_server):
        if fe is not None:
            fe.close()
    pool.stop()


def _loopback(host: str) -> str:
    """Where this process reaches its own gRPC port: loopback when it listens on every address."""
    if host in ("", "0.0.0.0", "::", "[::]", "*"):
        return "127.0.0.1"
    return host


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("tandem-worker")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        return ""


def known_adapters(pool: WorkerPool, timeout: float = 2.0) -> list[str]:
    """LoRA adapters clients may name as models: those resident on a worker (the pool's stats) and
    those the decode workers can load (their adapter store and registered adapters)."""
    names = set(pool.adapters())
    for w in pool.snapshot():
        if w.eligible and w.role in ("decode", "colocated"):
            try:
                resp = wgrpc.AdminStub(w.channel).ListAdapters(wpb.ListAdaptersRequest(), timeout=timeout)
            except grpc.RpcError as e:
                log.debug("ListAdapters on %s: %s", w.address, e)
                continue
            names.update(a.name for a in resp.adapters)
    return sorted(names)
