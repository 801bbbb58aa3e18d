"""`tandem router`: serve the Inference API in front of a pool of workers."""

from __future__ import annotations

import logging
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ..engine.config import ModelConfig
from ..engine.loader import resolve_model
from ..engine.tokenizer import Tokenizer
from . import metrics
from .pb import inference_pb2, inference_pb2_grpc
from .router import SLO, RouterService
from .worker_pool import WorkerPool

log = logging.getLogger(__name__)


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
) -> None:
    if not decode:
        raise ValueError("the router needs at least one decode or colocated worker (--decode)")
    folder = resolve_model(model)
    cfg = ModelConfig.from_folder(folder)
    tok = Tokenizer(folder)
    eos = set(cfg.eos_token_ids) | ({tok.eos_token_id} if tok.eos_token_id is not None else set())
    pool = WorkerPool(decode, prefill).start()
    service = RouterService(
        pool, tok, model, cfg.max_position_embeddings, eos, max_in_flight=max_in_flight, slo=slo
    )

    server = grpc.server(ThreadPoolExecutor(max_workers=max_in_flight + 16))
    inference_pb2_grpc.add_InferenceServicer_to_server(service, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    name = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
    reflection.enable_server_reflection([name, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    metrics.serve_metrics(metrics_port, host)
    server.start()
    for n in ("", name):
        health_servicer.set(n, health_pb2.HealthCheckResponse.NOT_SERVING)
    print(f"tandem router listening on {host}:{bound}", flush=True)
    stop = stop_event or threading.Event()

    def mark_ready() -> None:
        # Ready (for probes and `tandem up`) only once a whole worker pair could take a request.
        while not stop.is_set():
            if pool.pick(1, set()) is not None:
                for n in ("", name):
                    health_servicer.set(n, health_pb2.HealthCheckResponse.SERVING)
                log.info("router ready: a worker pair is healthy")
                return
            stop.wait(0.25)

    threading.Thread(target=mark_ready, name="router-ready", daemon=True).start()

    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            signal.signal(sig, lambda *_: stop.set())
        except ValueError:
            break
    stop.wait()
    for n in ("", name):
        health_servicer.set(n, health_pb2.HealthCheckResponse.NOT_SERVING)
    server.stop(grace=5.0).wait()
    pool.stop()
