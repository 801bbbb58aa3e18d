"""Workers SIGKILLed mid-request: retry before the first token, a clear status after, no leaked KV.

The deployment here (2 prefill + 2 decode workers and a router) is this module's own, since its
tests destroy workers; each test first restarts, on the same port, any worker it needs.
The prefill workers take at most 256 tokens per step, so a long prompt is prefilled (and its KV
streamed) over several steps, between which their Admin.Stats shows the prompt still queued.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import grpc
import pytest

from tandem_proto.v1 import inference_pb2_grpc as pbgrpc

from .conftest import offline_generate, wait_router_ready
from .procs import (
    Proc,
    assert_idle,
    generate,
    greedy,
    request,
    router,
    rpc_error,
    stop_all,
    wait_for,
    wait_healthy,
    worker,
)

pytestmark = pytest.mark.slow  # real processes: seconds to minutes


@pytest.fixture(scope="module")
def fault(serving_logs, model_dir):
    log = serving_logs
    chunked = ("--max-num-batched-tokens", "256")
    p0 = worker("prefill", "fault-prefill-0", log, *chunked)
    p1 = worker("prefill", "fault-prefill-1", log, *chunked)
    d0, d1 = worker("decode", "fault-decode-0", log), worker("decode", "fault-decode-1", log)
    r = router("fault-router", log, [d0, d1], [p0, p1])
    procs = [p0, p1, d0, d1, r]
    try:
        for p in procs:
            p.start()
        wait_healthy(procs)
        wait_router_ready(r)
        yield SimpleNamespace(p0=p0, p1=p1, d0=d0, d1=d1, r=r, procs=procs)
    finally:
        stop_all(procs)


def ensure_alive(fault, *procs: Proc) -> None:
    """Restart (on its old port) any of `procs` that is dead, and let the router see it again."""
    dead = [p for p in procs if not p.alive()]
    for p in dead:
        p.start()
    if dead:
        wait_healthy(dead)
        time.sleep(1.5)  # a few of the router's health-check rounds (every 0.5 s)


def ledger(tag: str, entries: int = 95) -> str:
    """A long prompt (~1500 tokens) whose first tokens are unique, so no prefix cache helps."""
    items = ["rope", "lamp oil", "salt", "nails", "canvas", "tar", "flour"]
    body = " ".join(f"entry {i}: {tag} paid {i * 7 % 97} coins for {items[i % 7]};" for i in range(entries))
    return f"Ledger of {tag}. {body} The total paid was"


def busy_prefill(*workers: Proc) -> Proc | None:
    """The prefill worker that has a prompt part-way through prefill, if any (busy ones may not answer)."""
    for w in workers:
        try:
            if w.stats(timeout=1).queued_prompt_tokens > 0:
                return w
        except grpc.RpcError:
            pass
    return None


def in_background(fn):
    box: dict = {}

    def run():
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - inspected by the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def test_prompt_is_long(offline):
    n = len(offline.tokenizer.encode(ledger("the Mary Rose")))
    assert 1300 <= n <= 2000, n


def test_decode_worker_killed_mid_stream(fault, offline):
    ensure_alive(fault, fault.p0, fault.d0, fault.d1)
    req = request("Tell me a long story about a lighthouse keeper and her cat.", greedy(400))
    stream = pbgrpc.InferenceStub(fault.r.channel).Generate(req, timeout=120)
    got = []
    for msg in stream:
        got.extend(msg.token_ids)
        if len(got) >= 4:
            break
    victim = next(d for d in (fault.d0, fault.d1) if d.stats().in_flight > 0)
    survivor = fault.d1 if victim is fault.d0 else fault.d0
    victim.kill()
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        for msg in stream:
            got.extend(msg.token_ids)
    assert time.monotonic() - t0 < 5, "the stream should end promptly"
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
    assert len(got) < 400

    # New requests succeed, on the surviving decode worker, with the right tokens.
    prompts = ["The capital of France is", "Three facts about Mars:", "def add(a, b):"]
    refs = offline_generate(offline, prompts, greedy(8))
    received = survivor.metric("tandem_kv_transfer_bytes_total", direction="received")
    for prompt, ref in zip(prompts, refs):
        assert generate(fault.r, request(prompt, greedy(8))).token_ids == ref.token_ids
    assert survivor.metric("tandem_kv_transfer_bytes_total", direction="received") > received
    assert_idle([survivor, fault.p0, fault.p1])
    # The router's own view, for dashboards: one decode worker down, the rest serving.
    workers = {
        (dict(labels)["role"], dict(labels)["state"]): n
        for (name, labels), n in fault.r.metrics().items()
        if name == "tandem_router_workers"
    }
    assert workers == {("decode", "unavailable"): 1, ("decode", "serving"): 1, ("prefill", "serving"): 2}


def test_prefill_worker_killed_during_transfer(fault, offline):
    ensure_alive(fault, fault.p0, fault.p1)
    decodes = [d for d in (fault.d0, fault.d1) if d.alive()]
    if not decodes:
        ensure_alive(fault, fault.d0)
        decodes = [fault.d0]
    prompt = ledger("the Mary Rose")
    (ref,) = offline_generate(offline, [prompt], greedy(8))
    retries = fault.r.metric("tandem_request_retries_total")

    # 1. Kill the prefill worker while it computes and streams the prompt's KV: the router retries
    #    on the other one (nothing has reached the client yet) and the answer is still right.
    thread, box = in_background(lambda: generate(fault.r, request(prompt, greedy(8)), timeout=180))
    victim = wait_for(lambda: busy_prefill(fault.p0, fault.p1), 60, "a prefill worker starts the prompt")
    victim.kill()
    survivor = fault.p1 if victim is fault.p0 else fault.p0
    thread.join(180)
    assert "error" not in box, box.get("error")
    assert box["result"].token_ids == ref.token_ids
    assert fault.r.metric("tandem_request_retries_total") >= retries + 1
    # The decode side freed the blocks it had reserved for the failed attempt.
    assert_idle([*decodes, survivor])

    # 2. The healthy pair keeps serving.
    (short_ref,) = offline_generate(offline, ["The capital of France is"], greedy(8))
    assert generate(fault.r, request("The capital of France is", greedy(8))).token_ids == short_ref.token_ids

    # 3. With no prefill worker left, a request fails with UNAVAILABLE, and nothing leaks.
    thread, box = in_background(
        lambda: generate(fault.r, request(ledger("the Golden Hind"), greedy(8)), timeout=180)
    )
    wait_for(lambda: busy_prefill(survivor), 60, "the last prefill worker starts the prompt")
    survivor.kill()
    thread.join(180)
    err = box.get("error")
    assert isinstance(err, grpc.RpcError), box
    assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
    assert_idle(decodes)
    err = rpc_error(lambda: generate(fault.r, request("Hello", greedy(2)), timeout=30))
    assert err.code() == grpc.StatusCode.UNAVAILABLE

    # 4. A prefill worker back on its port: requests succeed again.
    ensure_alive(fault, victim)
    # Within seconds: the router (and the decode workers) reconnect quickly to a worker that is back.
    wait_router_ready(fault.r, timeout=3, all_workers=False)
    assert generate(fault.r, request("The capital of France is", greedy(8))).token_ids == short_ref.token_ids
    assert_idle([*decodes, victim])
