"""Frontend fixtures: one real deployment per session: 1 prefill + 1 decode worker with a LoRA adapter
store, a router serving tandem.v1 gRPC, OpenAI-compatible HTTP and KServe v2 gRPC, and a second
router over the same workers that admits one request at a time (--max-in-flight 1)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from benchmarks.make_adapters import AdapterSpec, make_adapters
from tests.serving.procs import (
    HOST,
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
    http_port, kserve_port = free_port(), free_port()
    r = router(
        "fe-router",
        log,
        [d0],
        [p0],
        "--http-port",
        str(http_port),
        "--kserve-port",
        str(kserve_port),
        "--served-model-name",
        SERVED,
    )
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
    procs = [p0, d0, r, rlim]
    try:
        for p in procs:
            p.start()
        wait_healthy(procs)
        wait_for(lambda: generate(r, request("Hi", greedy(1)), timeout=60).token_ids, 120, "router serves")
        yield SimpleNamespace(
            p0=p0,
            d0=d0,
            router=r,
            workers=[p0, d0],
            http=f"http://{HOST}:{http_port}",
            limited_http=f"http://{HOST}:{limited_http}",
            kserve=f"{HOST}:{kserve_port}",
            log_dir=log,
        )
    finally:
        stop_all(procs)
