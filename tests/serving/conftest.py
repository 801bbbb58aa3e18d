"""Serving fixtures: real worker and router processes on loopback, and the offline engine to compare with.

`cluster` (one per session, never destroyed by a test): prefill-0, prefill-1, decode-0, decode-1 and
colocated-0, with routers over prefill-0 + decode-0 ("1+1"), over all four ("2+2"), over
colocated-0, and a second 1+1 router limited to 2 requests in flight. Tests that kill processes
start their own deployments.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from .procs import KV_BYTES, Proc, generate, greedy, request, router, stop_all, wait_for, wait_healthy, worker


@pytest.fixture(scope="session")
def serving_logs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serving-logs")


@pytest.fixture(scope="session")
def offline(model_dir):
    """The offline engine (LLM API) on the same model: the reference every served output must equal."""
    from tandem_worker.llm import LLM

    return LLM(str(model_dir), kv_cache_bytes=KV_BYTES)


def offline_generate(llm, prompts: list, params) -> list:
    """The offline engine's outputs for prompts in the wire forms (text, chat messages, token ids),
    with `params` a wire SamplingParams (one for all, or one per prompt)."""
    from tandem_worker.llm import ChatPrompt
    from tandem_worker.server.convert import params_from_pb

    plist = params if isinstance(params, list) else [params] * len(prompts)
    conv = [ChatPrompt(p) if isinstance(p, list) and p and isinstance(p[0], dict) else p for p in prompts]
    return llm.generate(conv, [params_from_pb(p) for p in plist])


def wait_router_ready(r: Proc, timeout: float = 120.0, all_workers: bool = True) -> None:
    """Healthy is not enough: the router must also see a healthy worker pair, so serve one token.

    `all_workers`: also wait until the router has reached every worker it was given. A worker it
    first dialled before that worker listened may still be in reconnect backoff, and a test that
    kills "the other one" would leave the router with none."""
    if all_workers:

        def reached_all() -> bool:
            counts = [
                (dict(labels)["state"], n)
                for (name, labels), n in r.metrics().items()
                if name == "tandem_router_workers" and n > 0
            ]
            return bool(counts) and all(state == "serving" for state, _ in counts)

        wait_for(reached_all, timeout, f"{r.name} reaches all its workers", interval=0.25)
    wait_for(
        lambda: generate(r, request("Hi", greedy(1)), timeout=60).token_ids,
        timeout,
        f"{r.name} serves a request",
        interval=0.5,
    )


@pytest.fixture(scope="session")
def cluster(serving_logs, model_dir):
    log = serving_logs
    p0, p1 = worker("prefill", "prefill-0", log), worker("prefill", "prefill-1", log)
    d0, d1 = worker("decode", "decode-0", log), worker("decode", "decode-1", log)
    c0 = worker("colocated", "colocated-0", log)
    r11 = router("router-1p1d", log, [d0], [p0])
    r22 = router("router-2p2d", log, [d0, d1], [p0, p1])
    rc = router("router-colocated", log, [c0])
    rlim = router("router-limited", log, [d0], [p0], "--max-in-flight", "2")
    procs = [p0, p1, d0, d1, c0, r11, r22, rc, rlim]
    try:
        for p in procs:
            p.start()
        wait_healthy(procs)
        for r in (r11, r22, rc, rlim):
            wait_router_ready(r)
        yield SimpleNamespace(
            p0=p0, p1=p1, d0=d0, d1=d1, c0=c0, r11=r11, r22=r22, rc=rc, rlim=rlim, log_dir=log
        )
    finally:
        stop_all(procs)
