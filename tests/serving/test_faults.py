"""Bad requests, overload, deadlines, cancellation and an incompatible prefill worker, end to end.

Every failure must reach the client with the right status, and leave no KV block reserved on
either side.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from tandem_proto.v1 import inference_pb2 as pb
from tandem_proto.v1 import inference_pb2_grpc as pbgrpc
from tandem_proto.v1 import worker_pb2 as wpb
from tandem_proto.v1 import worker_pb2_grpc as wgrpc

from .conftest import wait_router_ready
from .procs import (
    assert_idle,
    generate,
    greedy,
    request,
    router,
    rpc_error,
    sampling,
    stop_all,
    wait_for,
    wait_healthy,
    worker,
)

pytestmark = pytest.mark.slow  # real processes: seconds to minutes

INVALID = {
    "max_tokens": request("Hello", sampling(max_tokens=0)),
    "top_p": request("Hello", sampling(top_p=1.5)),
    "temperature": request("Hello", sampling(temperature=-1.0)),
    "prompt": request("", sampling()),
    "context": request([100] * 8192, sampling()),
    "model": request("Hello", sampling(), model="llama-9000"),
    "prompt_token_ids": request([49152], sampling()),  # out of the vocabulary: the worker's check
    "stop": request("Hello", sampling(stop=[""])),
    # Fits the model's context but never any worker's KV cache (~4300 tokens each): the router
    # (which knows the workers' capacity from their stats) or the decode worker's admission
    # control says so, instead of failing it as if no worker were healthy.
    "kv-cache": request([100] * 4500, sampling()),
    "kv-cache-max-tokens": request([100] * 100, sampling(max_tokens=5000)),
}
FIELD = {"context": "prompt", "kv-cache": "prompt", "kv-cache-max-tokens": "max_tokens"}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_request_is_invalid_argument_naming_the_field(cluster, case):
    err = rpc_error(lambda: generate(cluster.r11, INVALID[case]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    field = FIELD.get(case, case)
    assert err.details().startswith(f"{field}:"), err.details()
    if case == "context":
        assert "8192" in err.details()
    if case.startswith("kv-cache"):
        assert "KV cache" in err.details()


def test_invalid_requests_leave_workers_serving(cluster):
    for req in INVALID.values():
        rpc_error(lambda req=req: generate(cluster.r11, req))
    assert generate(cluster.r11, request("Hello", greedy(2))).token_ids
    assert_idle([cluster.p0, cluster.d0])


def test_two_clients_may_use_the_same_request_id(cluster):
    # Clients name their requests as they like ("1" is common); the workers see ids of their own,
    # and each answer carries its client's id.
    streams = [
        pbgrpc.InferenceStub(cluster.r11.channel).Generate(
            request(prompt, greedy(6), request_id="1"), timeout=60
        )
        for prompt in ("Hello there", "The sky is")
    ]
    results = [list(s) for s in streams]
    for msgs in results:
        assert msgs[-1].finish_reason and {m.request_id for m in msgs} == {"1"}
        assert sum(len(m.token_ids) for m in msgs) == 6
    assert_idle([cluster.p0, cluster.d0])


def test_more_load_than_fits_is_resource_exhausted(cluster):
    """A router that takes 2 requests at once refuses the rest with RESOURCE_EXHAUSTED."""
    go = threading.Barrier(6)

    def one(i: int):
        req = request(f"Request {i}: list every prime number below one thousand:", greedy(48))
        go.wait()
        try:
            return generate(cluster.rlim, req)
        except grpc.RpcError as e:
            return e

    with ThreadPoolExecutor(6) as ex:
        results = list(ex.map(one, range(6)))
    errors = [r for r in results if isinstance(r, grpc.RpcError)]
    ok = [r for r in results if not isinstance(r, grpc.RpcError)]
    assert errors and ok, results
    for e in errors:
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (e.code(), e.details())
        assert "in flight" in e.details()
    assert len(ok) <= 2 + 1  # at most 2 at once; one more only if an early one already finished
    for r in ok:
        assert len(r.token_ids) == 48 and r.finish_reason == pb.FINISH_REASON_LENGTH
    # The slots are given back: the router takes requests again.
    assert len(generate(cluster.rlim, request("Hello", greedy(2))).token_ids) == 2
    assert_idle([cluster.p0, cluster.d0])


def test_back_to_back_prompts_of_over_half_the_kv_cache_are_served(cluster):
    """Each prompt needs more than half of the decode worker's KV cache. The router's stats of
    that worker, taken while the previous request held its blocks, must not refuse the next one
    as "every KV cache is full" once the previous one is done."""
    capacity = cluster.d0.stats().num_blocks * cluster.d0.stats().block_size
    n = capacity * 3 // 5
    rng = random.Random(3)
    for i in range(2):
        prompt = [rng.randrange(1000, 40000) for _ in range(n)]  # distinct: no prefix-cache help
        res = generate(cluster.r11, request(prompt, greedy(1)))
        assert res.token_ids and res.finish_reason == pb.FINISH_REASON_LENGTH, i
    assert_idle([cluster.p0, cluster.d0])


def test_usage_counts_the_prefill_workers_prefix_cache_hits(cluster):
    """A prompt the shared prefill worker has cached (served before for another decode worker) is
    reported as cached, though this decode worker never saw it."""
    rng = random.Random(5)
    prompt = [rng.randrange(1000, 40000) for _ in range(300)]
    warm = wpb.WorkerGenerateRequest(
        request_id="warm-p0", prompt_token_ids=prompt, sampling=greedy(1), prefill_endpoint=cluster.p0.address
    )
    assert list(wgrpc.WorkerStub(cluster.d1.channel).Generate(warm, timeout=60))[-1].finish_reason
    res = generate(cluster.r11, request(prompt, greedy(2)))  # decode-0 + prefill-0
    assert res.usage.cached_prompt_tokens >= 300 - 16, res.usage  # all but the last partial block


def test_expired_deadline_frees_both_sides(cluster):
    req = request("Write a very long essay about the history of bridges.", greedy(400))
    t0 = time.monotonic()
    err = rpc_error(lambda: generate(cluster.r11, req, timeout=0.3))
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED, (err.code(), err.details())
    assert time.monotonic() - t0 < 3
    assert_idle([cluster.p0, cluster.d0], timeout=5)


def test_deadline_mid_stream_frees_both_sides(cluster):
    """A deadline that expires after tokens have streamed ends the stream with DEADLINE_EXCEEDED."""
    req = request("Write a very long essay about the history of canals.", greedy(400))
    got = []
    stream = pbgrpc.InferenceStub(cluster.r11.channel).Generate(req, timeout=3.0)
    with pytest.raises(grpc.RpcError) as info:
        for msg in stream:
            got.extend(msg.token_ids)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0 < len(got) < 400
    assert_idle([cluster.p0, cluster.d0], timeout=5)


def test_client_cancel_mid_stream_frees_both_sides(cluster):
    req = request("Write a very long essay about the history of roads.", greedy(400))
    stream = pbgrpc.InferenceStub(cluster.r11.channel).Generate(req, timeout=120)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.cancel()
    assert_idle([cluster.p0, cluster.d0], timeout=5)
    # And the pair serves the next request.
    assert len(generate(cluster.r11, request("Hello", greedy(3))).token_ids) == 3


def test_client_cancel_during_prefill_frees_both_sides(cluster):
    """Cancelled before the first token (while the prefill worker computes a long prompt)."""
    prompt = "Cancelled: " + " ".join(
        f"item {i} is a {['red', 'blue', 'green'][i % 3]} box;" for i in range(300)
    )
    p0 = cluster.p0
    computed = p0.metric("tandem_prefill_tokens_computed_total", role="prefill")
    stream = pbgrpc.InferenceStub(cluster.r11.channel).Generate(request(prompt, greedy(8)), timeout=120)
    queued = wait_for(lambda: p0.stats(timeout=1).queued_prompt_tokens, 10, "prefill-0 starts the prompt")
    stream.cancel()
    with pytest.raises(grpc.RpcError) as info:
        list(stream)
    assert info.value.code() == grpc.StatusCode.CANCELLED
    # The cancellation reaches the decode worker at once (not when a first token would have come) ...
    assert_idle([cluster.d0], timeout=2)
    # ... and the prefill worker, which drops the rest of the prompt (it computes 2048 tokens a step).
    assert_idle([p0], timeout=15)
    assert queued > 2048
    assert p0.metric("tandem_prefill_tokens_computed_total", role="prefill") - computed < queued
    assert len(generate(cluster.r11, request("Hello", greedy(3))).token_ids) == 3


def test_worker_busy_with_a_long_prefill_stays_in_rotation(cluster):
    """A prefill step of seconds must not make the router think the worker is dead: its stats (and
    health) answer at once, and other requests are still routed to it meanwhile."""
    p0 = cluster.p0
    prompt = "Busy: " + " ".join(
        f"crate {i} holds {i % 13} {['apples', 'pears', 'plums'][i % 3]};" for i in range(225)
    )
    stream = pbgrpc.InferenceStub(cluster.r11.channel).Generate(request(prompt, greedy(4)), timeout=120)
    done = threading.Event()
    long = threading.Thread(target=lambda: (list(stream), done.set()), daemon=True)
    long.start()
    # Stats answer within 0.5 s although prefill-0 is in the middle of a step (of seconds, here).
    wait_for(lambda: done.is_set() or p0.stats(timeout=0.5).queued_prompt_tokens, 10, "prefill-0 starts")
    until = time.monotonic() + 1.5  # several of the router's health-check rounds (every 0.5 s)
    while not done.is_set() and time.monotonic() < until:
        assert p0.stats(timeout=0.5).queued_prompt_tokens > 0
        assert p0.healthy()
        time.sleep(0.1)
    # The router still routes to it (it is the only prefill worker behind this router).
    assert len(generate(cluster.r11, request("Hello", greedy(2)), timeout=60).token_ids) == 2
    long.join(120)
    assert done.is_set()
    assert_idle([p0, cluster.d0])


@pytest.fixture
def incompatible(cluster, model_dir: Path, tmp_path: Path):
    """A prefill worker serving a model that differs from the decode worker's in its config only."""
    folder = tmp_path / "smollm2-other-eps"
    folder.mkdir()
    for f in model_dir.iterdir():
        if f.name != "config.json":
            os.symlink(f, folder / f.name)
    config = json.loads((model_dir / "config.json").read_text())
    config["rms_norm_eps"] = 1e-6
    (folder / "config.json").write_text(json.dumps(config))
    bad = worker("prefill", "prefill-incompatible", cluster.log_dir, model=str(folder))
    r = router("router-incompatible", cluster.log_dir, [cluster.d0], [bad])
    procs = [bad, r]
    try:
        for p in procs:
            p.start()
        wait_healthy([bad])
        yield bad, r
    finally:
        stop_all(procs)


def test_incompatible_prefill_worker_is_never_paired(cluster, incompatible):
    """The router pairs a decode worker only with prefill workers whose KV it takes (same weights
    and block size): with none, it stays unready and says why, and sends the pair nothing. (It
    paired them before, and join-shortest-queue kept choosing the idle incompatible worker.)"""
    bad, r = incompatible
    assert bad.stats().model_id != cluster.d0.stats().model_id
    says_why = "no prefill worker's KV fits a decode worker's"
    wait_for(lambda: says_why in r.log_tail(), 60, "the router says why")
    assert cluster.d0.stats().model_id in r.log_tail()
    e = rpc_error(lambda: generate(r, request("Hello there", greedy(4)), timeout=60))
    assert e.code() == grpc.StatusCode.UNAVAILABLE, (e.code(), e.details())
    assert bad.metric("tandem_kv_transfer_bytes_total", direction="sent") == 0
    assert_idle([cluster.d0, bad])
    # The decode worker is unharmed: it still serves through a compatible prefill worker.
    wait_router_ready(cluster.r11)


def test_a_frozen_worker_fails_its_streams_instead_of_hanging_them(cluster):
    """A worker that stops answering without closing its connections (its node lost power, a network
    partition; here a SIGSTOP) ends the streams it was serving with UNAVAILABLE once the router's
    keepalive pings go unanswered, rather than leaving them waiting until their deadlines."""
    from tandem_worker.server.worker_pool import KEEPALIVE_TIME_MS, KEEPALIVE_TIMEOUT_MS

    c0, rc = cluster.c0, cluster.rc
    stream = pbgrpc.InferenceStub(rc.channel).Generate(
        request("Count to a thousand:", greedy(3000)), timeout=300
    )
    assert next(stream).text is not None  # decoding
    os.kill(c0.pid, signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        with pytest.raises(grpc.RpcError) as info:
            for _ in stream:
                pass
        waited = time.monotonic() - t0
    finally:
        os.kill(c0.pid, signal.SIGCONT)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value
    assert waited < 3 * (KEEPALIVE_TIME_MS + KEEPALIVE_TIMEOUT_MS) / 1000
    # Resumed, the worker finds the connection gone, frees the request, and serves again.
    assert_idle([c0], timeout=30)
    wait_router_ready(rc, all_workers=False)
