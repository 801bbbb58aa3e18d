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
