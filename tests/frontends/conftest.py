"""Frontend fixtures: one real deployment per session: 1 prefill + 1 decode worker with a LoRA adapter
store, a router serving tandem.v1 gRPC, OpenAI-compatible HTTP and KServe v2 gRPC, and a second
router over the same workers that admits one request at a time (--max-in-flight 1)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from benchmarks.make_adapters import AdapterSpec, make_adapters
from tests.serving.procs import (
    HOST,
    Proc,
    free_port,
    generate,
    greedy,
    request,
    router,
    stop_all,
    wait_for,
    wait_healthy,
    worker,
)

ADAPTER = "fe-qv-r8"
SERVED = "smol"  # --served-model-name: the id OpenAI and KServe clients use


def frontend_router(name: str, log_dir: Path, d0: Proc, p0: Proc, *extra: str) -> tuple[Proc, str, str]:
    """A router over `p0` and `d0` with all three frontends, each on a free port: the router, its
    OpenAI base URL and its KServe address. `extra`: more router flags."""
    http_port, kserve_port = free_port(), free_port()
    r = router(
        name,
        log_dir,
        [d0],
        [p0],
        "--http-port",
        str(http_port),
        "--kserve-port",
        str(kserve_port),
        "--served-model-name",
        SERVED,
        *extra,
    )
    return r, f"http://{HOST}:{http_port}", f"{HOST}:{kserve_port}"


@contextlib.contextmanager
def serving(procs: list[Proc], routers: list[Proc]) -> Iterator[None]:
    """Starts `procs`, waits until they are healthy and each of `routers` generates a token, and
    stops them all on the way out."""
    try:
        for p in procs:
            p.start()
        wait_healthy(procs)
        for r in routers:
            wait_for(
                lambda r=r: generate(r, request("Hi", greedy(1)), timeout=60).token_ids,
                120,
                f"{r.name} serves",
            )
        yield
    finally:
        stop_all(procs)


@pytest.fixture(scope="session")
def frontend_adapters(model_dir, model_cache_dir):
    out = model_cache_dir.parent / "adapters" / "frontends-v1"
    make_adapters(
        model_dir, out, [AdapterSpec(ADAPTER, 8, ("q_proj", "v_proj"), alpha=16, seed=11, b_std=0.2)]
    )
    return out


@pytest.fixture(scope="session")
def deployment(tmp_path_factory, model_dir, frontend_adapters):
    log = tmp_path_factory.mktemp("frontend-logs")
    store = ("--lora-store", str(frontend_adapters))
    p0 = worker("prefill", "fe-prefill-0", log, *store)
    d0 = worker("decode", "fe-decode-0", log, *store)
    r, http, kserve = frontend_router("fe-router", log, d0, p0)
    # The same workers behind a router that admits one request at a time: overload (429) for real.
    limited_http = free_port()
    rlim = router(
        "fe-router-limited",
        log,
        [d0],
        [p0],
        "--max-in-flight",
        "1",
        "--http-port",
        str(limited_http),
        "--served-model-name",
        SERVED,
    )
    with serving([p0, d0, r, rlim], routers=[r]):
        yield SimpleNamespace(
            p0=p0,
            d0=d0,
            router=r,
            workers=[p0, d0],
            http=http,
            limited_http=f"http://{HOST}:{limited_http}",
            kserve=kserve,
            log_dir=log,
        )


# --- in-process: both frontends over a RouterService with no workers ------------------------------


@contextlib.contextmanager
def in_process_frontends(model_dir: Path, router_threads: int) -> Iterator[SimpleNamespace]:
    """The OpenAI and KServe frontends over a real `RouterService` (no workers: a request that
    reaches it fails UNAVAILABLE and counts as `failed`) on a loopback gRPC port served by
    `router_threads` handler threads: the router's `service` and `executor`, the HTTP port, and
    a KServe stub."""
    import concurrent.futures

    import grpc
    from tritonclient.grpc import service_pb2_grpc as kgrpc

    from tandem_worker.engine.tokenizer import Tokenizer
    from tandem_worker.server.kserve import KServeService, serve_kserve
    from tandem_worker.server.openai_http import OpenAIFrontend, serve_openai_http
    from tandem_worker.server.pb import inference_pb2_grpc as pbgrpc
    from tandem_worker.server.router import RouterService
    from tandem_worker.server.worker_pool import WorkerPool

    tok = Tokenizer(model_dir)
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=router_threads)
    server = grpc.server(executor)
    service = RouterService(WorkerPool([]), tok, SERVED, 4096, set())
    pbgrpc.add_InferenceServicer_to_server(service, server)
    upstream = f"{HOST}:{server.add_insecure_port(f'{HOST}:0')}"
    server.start()
    handoffs = service.handoffs
    http = serve_openai_http(
        HOST, 0, OpenAIFrontend(upstream, SERVED, 4096, tok, lambda: [], lambda: True, handoffs=handoffs)
    )
    kserve = serve_kserve(
        HOST, 0, KServeService(upstream, SERVED, 4096, lambda: [], lambda: True, handoffs=handoffs)
    )
    channel = grpc.insecure_channel(f"{HOST}:{kserve.port}")
    try:
        yield SimpleNamespace(
            service=service,
            executor=executor,
            http_port=http.port,
            kserve=kgrpc.GRPCInferenceServiceStub(channel),
        )
    finally:
        channel.close()
        kserve.stop(None)
        kserve.close()
        http.stop()
        http.close()
        server.stop(None)


def registry_outcomes() -> dict[str, float]:
    """`tandem_requests_total` by outcome, in this process."""
    from prometheus_client import REGISTRY

    from tandem_worker.server import metrics

    return {
        o: REGISTRY.get_sample_value("tandem_requests_total", {"outcome": o}) or 0.0
        for o in metrics.REQUEST_OUTCOMES
    }


def registry_counted(before: dict[str, float]) -> dict[str, float]:
    """What `tandem_requests_total` gained, by outcome, since `before` (registry_outcomes')."""
    after = registry_outcomes()
    return {o: n - before[o] for o, n in after.items() if n != before[o]}
