"""`tandem worker --role prefill|decode|colocated`: one engine behind gRPC, plus /metrics."""

from __future__ import annotations

import logging
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ..engine.config import EngineConfig
from ..engine.llm_engine import LLMEngine
from . import metrics
from .convert import model_id
from .engine_loop import ENGINE_STALL_TIMEOUT_S, EngineLoop, EngineWatchdog, Stall
from .health import LIVENESS_SERVICE
from .kv_transfer import prefill_method_handler
from .listen import EXCLUSIVE_PORT_OPTIONS, listen
from .pb import worker_pb2, worker_pb2_grpc
from .worker_pool import SERVER_KEEPALIVE_OPTIONS
from .worker_server import (
    GRPC_OPTIONS,
    AdminService,
    KVTransferService,
    WorkerService,
    WorkerState,
    kv_idle_timeout,
)

log = logging.getLogger(__name__)

ROLES = ("prefill", "decode", "colocated")


class _Health:
    """The worker's health statuses, from two facts set by different threads: draining (the main
    thread) and a stuck engine (the watchdog)."""

    def __init__(self, servicer: health.HealthServicer, names: list[str]) -> None:
        self._servicer = servicer
        self._names = ["", *names]
        self._lock = threading.Lock()
        self._draining = False
        self._stuck = False

    def update(self, *, draining: bool | None = None, stuck: bool | None = None) -> None:
        with self._lock:  # each update sets every status: the last one wins whole
            if draining is not None:
                self._draining = draining
            if stuck is not None:
                self._stuck = stuck
            serving = not (self._draining or self._stuck)
            for name in self._names:
                self._servicer.set(name, _status(serving))
            self._servicer.set(LIVENESS_SERVICE, _status(not self._stuck))


def _status(serving: bool) -> int:
    return health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING


def serve_worker(
    role: str,
    config: EngineConfig,
    host: str = "127.0.0.1",
    port: int = 50061,
    metrics_port: int = 0,
    max_pending: int = 256,
    drain_timeout: float = 30.0,
    stop_event: threading.Event | None = None,
    adapters: dict[str, str] | None = None,
    kv_idle_timeout_s: float | None = None,
    max_queued_prefill_tokens: int = 0,
    engine_stall_timeout_s: float | None = None,
) -> int:
    """Serve until SIGTERM/SIGINT (or `stop_event`), then drain: refuse new work, finish in-flight.
    Returns the process's exit status: 0, or 1 when the engine failed (out of device memory, a
    kernel fault): the worker then stops at once, so that Kubernetes restarts it, rather than
    staying up and failing every request it is sent.

    `adapters` (name -> folder) are registered to load on first use, besides the adapter store.
    `kv_idle_timeout_s`: how long a decode worker's KV pull may receive nothing (see
    worker_server.KV_IDLE_TIMEOUT_S; default: $TANDEM_KV_IDLE_TIMEOUT_S, else 30 s).
    `max_queued_prefill_tokens`: a prefill worker's bound on the prompt tokens of its unfinished
    KV pulls, past which it refuses new ones as busy (0: none; see `EngineLoop`).
    `engine_stall_timeout_s`: how long one engine step with work may make no progress before the
    worker calls its engine stuck (default ENGINE_STALL_TIMEOUT_S; 0: never): it then refuses new
    requests (UNAVAILABLE) and reports NOT_SERVING for "" and every service, LIVENESS_SERVICE
    included, until the step returns. It does not exit: the liveness probe gets it restarted."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    stall_timeout = ENGINE_STALL_TIMEOUT_S if engine_stall_timeout_s is None else engine_stall_timeout_s
    if not stall_timeout >= 0:  # also NaN
        raise ValueError(f"the engine stall timeout must be >= 0 seconds, got {stall_timeout!r}")
    # Resolved here, so a bad $TANDEM_KV_IDLE_TIMEOUT_S fails before the model loads.
    idle_timeout = kv_idle_timeout(kv_idle_timeout_s)
    config.detokenize = False  # the router detokenizes and applies stop strings
    engine = LLMEngine(config)
    for name, path in (adapters or {}).items():
        engine.lora.register(name, Path(path))
    loop = EngineLoop(
        engine, max_pending=max_pending, max_queued_prefill_tokens=max_queued_prefill_tokens
    ).start()
    state = WorkerState(engine, loop, role, model_id(engine.model_dir), idle_timeout)

    server = grpc.server(
        ThreadPoolExecutor(max_workers=max_pending + 16),
        options=GRPC_OPTIONS + SERVER_KEEPALIVE_OPTIONS + EXCLUSIVE_PORT_OPTIONS,
    )
    names = [worker_pb2.DESCRIPTOR.services_by_name["Admin"].full_name]
    worker_pb2_grpc.add_AdminServicer_to_server(AdminService(state), server)
    if role == "prefill":
        # Registered by hand: its chunks are pre-encoded bytes (see kv_transfer), not message objects.
        server.add_generic_rpc_handlers((prefill_method_handler(KVTransferService(state).Prefill),))
        names.append(worker_pb2.DESCRIPTOR.services_by_name["KVTransfer"].full_name)
    else:
        worker_pb2_grpc.add_WorkerServicer_to_server(WorkerService(state), server)
        names.append(worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    bound = listen(server, host, port)

    if role == "prefill":
        collector = metrics.register_engine(role, loop.stats, lambda: loop.kv_unsent_bytes)
        metrics.start_kv_transfers("sent")
    else:
        collector = metrics.register_engine(role, loop.stats)
        if role == "decode":
            metrics.start_kv_transfers("received")
    metrics.serve_metrics(metrics_port, host)
    server.start()
    status = _Health(health_servicer, names)
    status.update(draining=False, stuck=False)

    def stuck(stall: Stall | None) -> None:
        state.engine_stall = stall  # set first: new requests are refused before health says why
        status.update(stuck=stall is not None)

    watchdog = EngineWatchdog(loop, stall_timeout, stuck).start() if stall_timeout > 0 else None
    log.info("%s worker serving %s on %s:%d (metrics :%d)", role, state.model_id, host, bound, metrics_port)
    print(f"tandem worker ({role}) listening on {host}:{bound}", flush=True)

    stop = stop_event or threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            signal.signal(sig, lambda *_: stop.set())
        except ValueError:  # not the main thread (tests): rely on stop_event
            break
    while not stop.is_set() and not loop.died.is_set():
        stop.wait(0.2)

    # Drain: new requests are refused (health NOT_SERVING tells routers), in-flight ones finish.
    # After an engine failure there is nothing left to finish: the loop failed them already.
    state.draining.set()
    status.update(draining=True)
    deadline = time.monotonic() + drain_timeout
    while loop.num_in_flight and not loop.died.is_set() and time.monotonic() < deadline:
        time.sleep(0.05)
    server.stop(grace=1.0).wait()
    if watchdog is not None:
        watchdog.stop()
    loop.stop()
    metrics.unregister(collector)
    if loop.died.is_set():
        log.error("%s worker stopped: its engine failed (%r)", role, loop.error)
        return 1
    return 0
