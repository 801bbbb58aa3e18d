"""The router's worker choice: pure decisions over the pool's view, no processes (one retry case
with a fake decode worker in-process)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from tandem_proto.v1 import inference_pb2 as pb
from tandem_proto.v1 import inference_pb2_grpc as pbgrpc
from tandem_proto.v1 import worker_pb2 as wpb
from tandem_proto.v1 import worker_pb2_grpc as wgrpc
from tandem_worker.engine.tokenizer import Tokenizer
from tandem_worker.server.router import RouterService
from tandem_worker.server.worker_pool import Pair, WorkerInfo, WorkerPool, resolve


def info(addr: str, role: str, free_blocks: int = 100, queued: int = 0, draining: bool = False) -> WorkerInfo:
    w = WorkerInfo(addr, grpc.insecure_channel(addr), healthy=True)
    w.stats = wpb.StatsResponse(
        role=role,
        model_id="m",
        num_blocks=max(free_blocks, 100),
        free_blocks=free_blocks,
        block_size=16,
        queued_prompt_tokens=queued,
        draining=draining,
    )
    return w


@pytest.fixture
def pool() -> WorkerPool:
    p = WorkerPool(decode_targets=["d1:1", "d2:1"], prefill_targets=["p1:1", "p2:1"])
    p._workers = {
        "d1:1": info("d1:1", "decode", free_blocks=10),
        "d2:1": info("d2:1", "decode", free_blocks=50),
        "p1:1": info("p1:1", "prefill", queued=900),
        "p2:1": info("p2:1", "prefill", queued=100),
    }
    p._decode, p._prefill = ["d1:1", "d2:1"], ["p1:1", "p2:1"]
    return p


def test_picks_roomiest_decode_and_least_loaded_prefill(pool):
    pair = pool.pick(prompt_tokens=100, exclude=set())
    assert pair.decode.address == "d2:1" and pair.prefill.address == "p2:1"


def test_adapter_residency_beats_room_and_queue(pool):
    """A pair already holding the adapter wins over a roomier, idler one; device beats host memory."""
    pool._workers["d1:1"].stats.adapters_host.append("sql")
    pool._workers["p1:1"].stats.adapters_device.append("sql")
    pair = pool.pick(100, set(), adapter="sql")
    assert pair.decode.address == "d1:1" and pair.prefill.address == "p1:1"
    pool._workers["d2:1"].stats.adapters_device.append("sql")
    assert pool.pick(100, set(), adapter="sql").decode.address == "d2:1"
    # Nobody holds it: plain load balancing; no adapter: residency is ignored.
    pair = pool.pick(100, set(), adapter="other")
    assert pair.decode.address == "d2:1" and pair.prefill.address == "p2:1"
    assert pool.pick(100, set()).prefill.address == "p2:1"
    assert pool.adapters() == ["sql"]
    # Residency never overrides room: a holder without KV room for the prompt (d1: 160 tokens) is skipped.
    del pool._workers["d2:1"].stats.adapters_device[:]
    assert pool.pick(100, set(), adapter="sql").decode.address == "d1:1"
    assert pool.pick(200, set(), adapter="sql").decode.address == "d2:1"


def test_router_side_pending_load_counts_until_the_next_stats(pool):
    pool.begin(pool.pick(100, set()), prompt_tokens=1000)
    pair = pool.pick(100, set())
    assert pair.prefill.address == "p1:1", "p2 now has 1,100 queued tokens by our own count"


def test_an_attempt_gives_its_pending_load_back_when_it_ends(pool):
    d2 = pool._workers["d2:1"]
    room = d2.free_tokens()
    pair = pool.pick(500, set())
    ticket = pool.begin(pair, prompt_tokens=500)
    assert d2.free_tokens() == room - 500 and pool.pick(500, set()) is None  # d1 is too small
    other = pool.begin(pool.pick(100, set()), prompt_tokens=100)
    pool.end(pair, ticket)  # finished before any health check: its prompt no longer counts
    assert d2.free_tokens() == room - 100 and d2.pending_requests == 1
    pool.end(pair, other)
    assert d2.free_tokens() == room and d2.pending_requests == 0


def test_stats_are_asked_again_only_where_an_attempt_ended_since(pool, monkeypatch):
    checked: list[str] = []
    monkeypatch.setattr(pool, "_check", lambda w: checked.append(w.address))
    for w in pool._workers.values():
        w.stats_asked_at = 10.0
    pool.recheck_decodes()
    assert checked == []  # nothing ended since: the stats stand
    pair = pool.pick(100, set())
    pool.end(pair, pool.begin(pair, 100))  # ended now, after those stats were asked for
    pool.recheck_decodes()
    assert checked == [pair.decode.address]  # only that decode worker, never prefill workers


def test_decode_without_room_is_skipped_and_none_when_nobody_fits(pool):
    assert pool.pick(prompt_tokens=300, exclude=set()).decode.address == "d2:1"
    assert not pool.all_full(300, set())
    assert pool.pick(prompt_tokens=900, exclude=set()) is None
    assert pool.all_full(900, set()), "busy, not broken: the router answers RESOURCE_EXHAUSTED"


def test_no_healthy_decode_is_not_full_but_unavailable(pool):
    for a in ("d1:1", "d2:1"):
        pool.mark_failed(pool._workers[a], "down")
    assert pool.pick(10, set()) is None and not pool.all_full(10, set())


def test_excluded_failed_and_draining_workers_are_not_picked(pool):
    assert pool.pick(100, exclude={"d2:1"}).decode.address == "d1:1"
    pool.mark_failed(pool._workers["p2:1"], "boom")
    assert pool.pick(100, set()).prefill.address == "p1:1"
    pool._workers["p1:1"].stats.draining = True
    assert pool.pick(100, set()) is None, "no eligible prefill worker"


def test_colocated_worker_needs_no_prefill_partner():
    p = WorkerPool(decode_targets=["c:1"])
    p._workers = {"c:1": info("c:1", "colocated")}
    p._decode = ["c:1"]
    pair = p.pick(10, set())
    assert pair.decode.address == "c:1" and pair.prefill is None


def test_workers_are_paired_only_by_their_role_and_with_kv_the_other_takes(pool):
    # A prefill worker among the decode targets (a wrong selector) reports the most free KV.
    pool._workers["d3:1"] = info("d3:1", "prefill", free_blocks=500)
    pool._decode.append("d3:1")
    assert pool.pick(100, set()).decode.address == "d2:1"
    # A rolling upgrade: p2 (the shorter queue) serves other weights, whose KV d2 refuses.
    pool._workers["p2:1"].stats.model_id = "m2"
    assert pool.pick(100, set()).prefill.address == "p1:1"
    # Only new workers fit each other: the roomiest decode worker has no partner, the other has.
    pool._workers["p1:1"].stats.model_id = "m2"
    pool._workers["d1:1"].stats.model_id = "m2"
    pair = pool.pick(100, set())
    assert (pair.decode.address, pair.prefill.address) == ("d1:1", "p2:1")


def test_a_prefill_worker_is_picked_only_for_prompts_it_holds(pool):
    pool._workers["d2:1"].stats.num_blocks = pool._workers["d2:1"].stats.free_blocks = 300
    pool._workers["p2:1"].stats.num_blocks = 10  # 160 tokens of KV
    pool._workers["p1:1"].stats.max_model_len = 200
    assert pool.pick(150, set()).prefill.address == "p2:1"
    assert pool.pick(170, set()).prefill.address == "p1:1"
    assert pool.pick(250, set()) is None
    # The longest prompt a pair holds: the decode worker's 4,800, cut to the largest prefill's.
    assert pool.kv_capacity_tokens() == 1600


def test_resolve_static_and_dns_targets():
    assert resolve("10.0.0.7:5000") == ["10.0.0.7:5000"]
    addrs = resolve("dns:localhost:5000")
    assert "127.0.0.1:5000" in addrs
    assert resolve("dns:no-such-host.invalid:5000") == []


class _FlakyDecode(wgrpc.WorkerServicer):
    """A decode worker whose first attempt fails after a health check has already seen its KV
    reservation (the pool's stats refreshed mid-request), as when its prefill partner dies."""

    def __init__(self, pool: WorkerPool, reserved_blocks: int) -> None:
        self.pool, self.reserved, self.calls = pool, reserved_blocks, 0

    def Generate(self, request, context):  # noqa: N802
        self.calls += 1
        w = self.pool._workers["decode"]
        if self.calls == 1:
            # What WorkerPool._check does with stats taken now: the reservation is in them.
            w.stats.free_blocks -= self.reserved
            w.pending.clear()
            context.abort(grpc.StatusCode.UNAVAILABLE, "prefill worker p:1 failed: connection reset")
        w.stats.free_blocks += self.reserved  # the failed attempt's blocks were freed
        yield wpb.WorkerGenerateResponse(token_ids=[42], finish_reason=pb.FINISH_REASON_LENGTH)


class _Context:
    """The parts of a grpc.ServicerContext the router's Generate uses."""

    def abort(self, code, details):
        raise AssertionError(f"aborted: {code} {details}")

    def add_callback(self, callback) -> bool:
        return True  # registered: the RPC is still active

    def time_remaining(self) -> None:
        return None

    def invocation_metadata(self) -> tuple:
        return ()  # a direct client's call, not a frontend's handoff

    def is_active(self) -> bool:
        return True


class _BusyPrefills(wgrpc.WorkerServicer):
    """A decode worker whose every prefill partner is at its request limit."""

    def __init__(self) -> None:
        self.prefills: list[str] = []

    def Generate(self, request, context):  # noqa: N802
        self.prefills.append(request.prefill_endpoint)
        context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"prefill worker {request.prefill_endpoint} is busy: 256 requests in flight (the limit is 256)",
        )
        yield  # a generator, as the real servicer


class _AbortContext(_Context):
    def abort(self, code, details):
        raise grpc.RpcError(code, details)


@contextlib.contextmanager
def _router_over_fake_decode(model_dir, make_servicer) -> Iterator[tuple[RouterService, WorkerPool, Any]]:
    """A router whose pool is one decode worker with 160 free KV blocks, the fake servicer
    `make_servicer(pool)` served here, and two prefill workers p:1 and p:2 (only ever named to it)."""
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=2))
    port = server.add_insecure_port("127.0.0.1:0")
    pool = WorkerPool(decode_targets=[], prefill_targets=[])
    decode = info(f"127.0.0.1:{port}", "decode", free_blocks=160)
    decode.channel = grpc.insecure_channel(decode.address)
    decode.stats.num_blocks = 160
    pool._workers = {"decode": decode, "p:1": info("p:1", "prefill"), "p:2": info("p:2", "prefill")}
    pool._decode, pool._prefill = ["decode"], ["p:1", "p:2"]
    fake = make_servicer(pool)
    wgrpc.add_WorkerServicer_to_server(fake, server)
    server.start()
    try:
        yield RouterService(pool, Tokenizer(model_dir), "smollm2-135m", 4096, set()), pool, fake
    finally:
        server.stop(None)
        decode.channel.close()


def _refused(router: RouterService) -> tuple[grpc.StatusCode, str]:
    """The status a client of `router` gets for a small request."""
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2, 3]), sampling=pb.SamplingParams())
    with pytest.raises(grpc.RpcError) as err:
        list(router.Generate(request, _AbortContext()))
    return err.value.args


def test_busy_workers_are_resource_exhausted_and_stay_in_rotation(model_dir):
    with _router_over_fake_decode(model_dir, lambda pool: _BusyPrefills()) as (router, pool, fake):
        code, details = _refused(router)
    # Busy is a retry-later (HTTP 429), not "no worker could serve it" (503).
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "at their limit" in details, (code, details)
    assert "p:1" not in details and "p:2" not in details  # which worker is the log's, not the client's
    assert sorted(fake.prefills) == ["p:1", "p:2"]  # each prefill worker was tried once
    assert all(pool._workers[a].healthy for a in ("p:1", "p:2")), "busy workers were taken out of rotation"


def test_a_retry_is_not_refused_for_the_kv_its_failed_attempt_held(model_dir):
    # The KV cache holds 2.5 prompts. The first attempt's reservation shows in the stats a health
    # check took while it ran; if the router also still counted it as pending (counted after the
    # send, so after that check), the retry would see room for less than one prompt and be refused
    # as RESOURCE_EXHAUSTED. Seen in CI: test_prefill_worker_killed_during_transfer.
    prompt = list(range(1000, 1000 + 64 * 16))  # 1024 tokens, 64 blocks
    flaky = lambda pool: _FlakyDecode(pool, reserved_blocks=65)  # noqa: E731
    with _router_over_fake_decode(model_dir, flaky) as (router, pool, fake):
        begin = pool.begin

        def late_begin(*args) -> int:  # the router thread descheduled for a moment around the send
            time.sleep(0.2)
            return begin(*args)

        pool.begin = late_begin
        sampling = pb.SamplingParams(max_tokens=1)
        request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling=sampling)
        out = list(router.Generate(request, _Context()))
    assert fake.calls == 2  # retried, on the prefill worker that did not fail
    assert out[-1].token_ids == [42] and out[-1].finish_reason == pb.FINISH_REASON_LENGTH


class _MalformedPrefill(wgrpc.WorkerServicer):
    """A decode worker whose pull from p:1 gets a malformed KV stream (DATA_LOSS)."""

    def __init__(self) -> None:
        self.prefills: list[str] = []

    def Generate(self, request, context):  # noqa: N802
        self.prefills.append(request.prefill_endpoint)
        if request.prefill_endpoint == "p:1":
            context.abort(grpc.StatusCode.DATA_LOSS, "prefill worker p:1: KV stream ended early")
        yield wpb.WorkerGenerateResponse(token_ids=[42], finish_reason=pb.FINISH_REASON_LENGTH)


def test_a_malformed_kv_stream_is_retried_on_another_prefill_worker(model_dir):
    with _router_over_fake_decode(model_dir, lambda pool: _MalformedPrefill()) as (router, pool, fake):
        pool._workers["p:2"].stats.queued_prompt_tokens = 50  # p:1 first
        request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2, 3]), sampling=pb.SamplingParams())
        out = list(router.Generate(request, _Context()))
        assert fake.prefills == ["p:1", "p:2"] and out[-1].token_ids == [42]
        assert not pool._workers["p:1"].healthy  # out of rotation until its next health check


def test_a_whole_answer_through_a_backing_off_worker_clears_its_backoff(model_dir):
    """The router tells the pool when a pair served a request: p:1 failed once (backing off for 1 s),
    then, the only prefill worker left (p:2 gone), served an answer: its count starts over, so its
    next failure backs it off for 1 s again, not 2."""
    with _router_over_fake_decode(model_dir, lambda pool: _SeveralTokensAMessage([42])) as (router, pool, _):
        pool.clock = clock = _Clock()
        p1 = pool._workers["p:1"]
        pool.mark_failed(p1, "prefill worker p:1 stalled")
        _health_checks_pass(pool)
        pool._prefill = ["p:1"]
        request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2, 3]), sampling=pb.SamplingParams())
        out = list(router.Generate(request, _Context()))
        assert out[-1].token_ids == [42]
        assert (p1.failures, p1.backoff_until) == (0, 0.0)
        clock.now += 0.5
        pool.mark_failed(p1, "prefill worker p:1 stalled again")
        assert p1.failures == 1 and p1.backoff_until == clock.now + 1.0


class _CannotPull(wgrpc.WorkerServicer):
    """A decode worker that reaches no prefill worker (its own network is down)."""

    def __init__(self) -> None:
        self.prefills: list[str] = []

    def Generate(self, request, context):  # noqa: N802
        self.prefills.append(request.prefill_endpoint)
        context.abort(
            grpc.StatusCode.UNAVAILABLE, f"prefill worker {request.prefill_endpoint} failed: Socket closed"
        )
        yield  # a generator, as the servicer's streaming method must be


def test_a_decode_worker_that_reaches_no_prefill_worker_is_blamed_not_each_prefill_worker(model_dir):
    """Its pulls failing from p:1 and then p:2, the common factor is the decode worker: before, each
    prefill worker it named backed off in turn (a whole healthy pool, for one broken decode worker)."""
    with _router_over_fake_decode(model_dir, lambda pool: _CannotPull()) as (router, pool, fake):
        pool.clock = clock = _Clock()
        pool._workers["p:2"].stats.queued_prompt_tokens = 50  # p:1 first
        code, _ = _refused(router)
        assert code == grpc.StatusCode.UNAVAILABLE and fake.prefills == ["p:1", "p:2"]
        p1, p2, decode = (pool._workers[a] for a in ("p:1", "p:2", "decode"))
        assert p1.failures == 1  # the first failure could be either's: the prefill worker named
        assert (p2.failures, p2.backoff_until) == (0, 0.0)  # the second points at the decode worker
        assert decode.failures == 1 and decode.backoff_until > clock()

        # Faults a minute apart, or a request served between them, start the count over.
        pair = Pair(decode, p2)
        clock.now += pool.backoff_reset
        assert pool.blame_pull_fault(pair) is p2
        pool.succeeded(pair, pool.begin(pair, 3))
        assert pool.blame_pull_fault(Pair(decode, p1)) is p1


class _DiesMidStream(wgrpc.WorkerServicer):
    def Generate(self, request, context):  # noqa: N802
        yield wpb.WorkerGenerateResponse(token_ids=[42])
        context.abort(grpc.StatusCode.UNAVAILABLE, "Socket closed")


def test_a_decode_worker_that_dies_mid_answer_backs_off(model_dir):
    with _router_over_fake_decode(model_dir, lambda pool: _DiesMidStream()) as (router, pool, _):
        pool.clock = _Clock()
        code, _ = _refused(router)
        decode = pool._workers["decode"]
        assert code == grpc.StatusCode.UNAVAILABLE
        assert decode.failures == 1 and decode.backoff_until > pool.clock()


class _FailsMidStream(wgrpc.WorkerServicer):
    def Generate(self, request, context):  # noqa: N802
        yield wpb.WorkerGenerateResponse(token_ids=[42])
        context.abort(grpc.StatusCode.INTERNAL, "engine failed: CUDA error at /src/kernel.cu:88 (10.0.3.7)")


def test_a_worker_failure_reaches_the_client_without_the_workers_internals(model_dir):
    with _router_over_fake_decode(model_dir, lambda pool: _FailsMidStream()) as (router, _, _):
        code, details = _refused(router)
    assert code == grpc.StatusCode.INTERNAL
    assert details == (
        "the worker serving this request failed (INTERNAL) after part of the answer was sent; "
        "send the request again"
    )


class _PrefillFault(wgrpc.WorkerServicer):
    """A decode worker whose pulls from the prefill workers in `faulty` fail inside them (INTERNAL, as
    an exception there gives), before any token."""

    def __init__(self, faulty: set[str], code: grpc.StatusCode = grpc.StatusCode.INTERNAL) -> None:
        self.faulty, self.code, self.prefills = faulty, code, []

    def Generate(self, request, context):  # noqa: N802
        self.prefills.append(request.prefill_endpoint)
        if request.prefill_endpoint in self.faulty:
            context.abort(
                self.code, f"prefill worker {request.prefill_endpoint} failed: engine error (10.0.3.7)"
            )
        yield wpb.WorkerGenerateResponse(token_ids=[42], finish_reason=pb.FINISH_REASON_LENGTH)


@pytest.mark.parametrize("code", [grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN])
def test_a_fault_inside_a_worker_before_any_token_is_retried_once_elsewhere(model_dir, code):
    with _router_over_fake_decode(model_dir, lambda pool: _PrefillFault({"p:1"}, code)) as (
        router,
        pool,
        fake,
    ):
        pool._workers["p:2"].stats.queued_prompt_tokens = 50  # p:1 first
        request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2, 3]), sampling=pb.SamplingParams())
        out = list(router.Generate(request, _Context()))
        assert fake.prefills == ["p:1", "p:2"] and out[-1].token_ids == [42]
        # One request's failure: p:1 stays in rotation, with no backoff.
        p1 = pool._workers["p:1"]
        assert p1.healthy and p1.failures == 0


def test_a_fault_on_the_retry_too_reaches_the_client_as_the_workers_failure(model_dir):
    # The request itself may be what fails them: one retry, not one per worker.
    faulty = {"p:1", "p:2"}
    with _router_over_fake_decode(model_dir, lambda pool: _PrefillFault(faulty)) as (router, pool, fake):
        code, details = _refused(router)
    assert len(fake.prefills) == 2
    assert (code, details) == (grpc.StatusCode.INTERNAL, "the worker serving this request failed (INTERNAL)")


def test_a_fault_with_no_other_pair_to_try_is_the_workers_failure(model_dir):
    with _router_over_fake_decode(model_dir, lambda pool: _PrefillFault({"p:1"})) as (router, pool, fake):
        pool._prefill = ["p:1"]
        code, details = _refused(router)
    assert fake.prefills == ["p:1"]
    assert (code, details) == (grpc.StatusCode.INTERNAL, "the worker serving this request failed (INTERNAL)")


def _ttft_count() -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("tandem_time_to_first_token_seconds_count") or 0.0


def test_ttft_is_observed_at_the_first_token_once_whatever_happens_after(model_dir):
    # A request that fails after its first token still had one (and an answer's TTFT is reported
    # when it happens, not a whole generation later); a whole answer counts once.
    with _router_over_fake_decode(model_dir, lambda pool: _FailsMidStream()) as (router, _, _):
        before = _ttft_count()
        _refused(router)
        assert _ttft_count() == before + 1
    with _router_over_fake_decode(model_dir, lambda pool: _SeveralTokensAMessage([42, 43])) as (router, _, _):
        before = _ttft_count()
        request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2, 3]), sampling=pb.SamplingParams())
        list(router.Generate(request, _Context()))
        assert _ttft_count() == before + 1


class _SeveralTokensAMessage(wgrpc.WorkerServicer):
    """A decode worker whose one message carries a whole answer, stop string and all."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    def Generate(self, request, context):  # noqa: N802
        yield wpb.WorkerGenerateResponse(
            token_ids=self.ids, logprobs=[-0.5] * len(self.ids), finish_reason=pb.FINISH_REASON_LENGTH
        )


def test_tokens_after_a_stop_string_are_not_part_of_the_output(model_dir):
    tok = Tokenizer(model_dir)
    ids = tok.encode(" one two STOP three four")
    upto = next(k for k in range(1, len(ids) + 1) if "STOP" in tok.decode(ids[:k]))
    assert upto < len(ids)
    with _router_over_fake_decode(model_dir, lambda pool: _SeveralTokensAMessage(ids)) as (router, _, _):
        sampling = pb.SamplingParams(stop=["STOP"])
        request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2, 3]), sampling=sampling)
        (out,) = list(router.Generate(request, _Context()))
    assert out.text == " one two " and out.stop_reason == "STOP"
    assert out.finish_reason == pb.FINISH_REASON_STOP
    # Up to and including the token that completed the stop string, as the engine itself counts.
    assert list(out.token_ids) == ids[:upto] and len(out.logprobs) == upto
    assert out.usage.completion_tokens == upto


def test_a_stop_string_completed_only_when_the_output_ends_is_a_stop(model_dir):
    # " 東" is one token of a space and the character's first bytes: the space is held back until
    # the character is whole, and an answer cut there (max_tokens) completes "! " only at its end.
    tok = Tokenizer(model_dir)
    ids = tok.encode("Hello, world! 東京")
    cut = next(k for k in range(1, len(ids)) if tok.hf.decode(ids[:k]).endswith("! \ufffd"))
    with _router_over_fake_decode(model_dir, lambda pool: _SeveralTokensAMessage(ids[:cut])) as (
        router,
        _,
        _,
    ):
        request = pb.GenerateRequest(
            token_ids=pb.TokenIds(ids=[1, 2, 3]), sampling=pb.SamplingParams(stop=["! "])
        )
        (out,) = list(router.Generate(request, _Context()))
    assert out.text == "Hello, world" and out.stop_reason == "! "
    assert out.finish_reason == pb.FINISH_REASON_STOP


def test_a_router_on_a_port_another_server_holds_fails_to_start(model_dir):
    # gRPC's default SO_REUSEPORT let a second router (or worker) "listen" on a taken port, and
    # the kernel split connections between the two processes.
    from tandem_worker.server.router_main import serve_router

    holder = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=1))
    port = holder.add_insecure_port("127.0.0.1:0")
    holder.start()
    try:
        with pytest.raises(OSError, match=f"cannot listen for gRPC on 127.0.0.1:{port}"):
            serve_router(str(model_dir), ["127.0.0.1:1"], [], port=port)
    finally:
        holder.stop(None)


class _Endless(wgrpc.WorkerServicer):
    """A decode worker that streams for a while unless its caller cancels."""

    def __init__(self) -> None:
        self.started, self.ended = threading.Event(), threading.Event()
        self.sent = 0

    def Generate(self, request, context):  # noqa: N802
        self.started.set()
        context.add_callback(self.ended.set)
        for _ in range(200):  # 2 s of tokens, unless cancelled
            if not context.is_active():
                return
            yield wpb.WorkerGenerateResponse(token_ids=[42])
            self.sent += 1
            time.sleep(0.01)
        yield wpb.WorkerGenerateResponse(token_ids=[42], finish_reason=pb.FINISH_REASON_LENGTH)


class _GoneContext(_Context):
    """The client left before the router registered its cancel callback."""

    def add_callback(self, callback) -> bool:
        return False

    def is_active(self) -> bool:
        return False


def test_a_client_gone_before_the_router_forwards_cancels_the_worker_call(model_dir):
    # add_callback's False (the RPC already ended) was ignored: the worker call then ran on with
    # nobody to cancel it.
    with _router_over_fake_decode(model_dir, lambda pool: _Endless()) as (router, _, fake):
        request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2, 3]), sampling=pb.SamplingParams())
        for _ in router.Generate(request, _GoneContext()):
            pass
        # Cancelled at once: the worker never saw the call, or stopped long before its end.
        time.sleep(0.5)
        assert not fake.started.is_set() or (fake.ended.wait(10) and fake.sent < 100)


def test_what_stops_a_pool_from_serving_is_named_and_full_kv_is_not_it(pool):
    pool._workers["d1:1"].stats.free_blocks = pool._workers["d2:1"].stats.free_blocks = 0
    assert pool.serving_problem() is None, "full KV caches are busy, not gone: the router stays ready"
    for a in ("p1:1", "p2:1"):
        pool.mark_failed(pool._workers[a], "down")
    assert pool.serving_problem() == "no prefill worker is serving (2 known)"
    pool._workers["d1:1"].stats.draining = True
    pool.mark_failed(pool._workers["d2:1"], "down")
    assert pool.serving_problem() == "no decode or colocated worker is serving (2 known)"


class _StatsOnly(wgrpc.AdminServicer):
    def __init__(self, role: str) -> None:
        self.role = role

    def Stats(self, request, context):  # noqa: N802
        return wpb.StatsResponse(role=self.role, model_id="m", num_blocks=100, free_blocks=100, block_size=16)


def _fake_worker(role: str, port: int = 0) -> tuple[grpc.Server, int]:
    """What the router's pool asks a worker (gRPC health, Admin.Stats), served here."""
    from grpc_health.v1 import health, health_pb2_grpc

    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=2))
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    wgrpc.add_AdminServicer_to_server(_StatsOnly(role), server)
    server.start()
    return server, port


def test_a_router_without_workers_is_not_ready_until_they_are_back(model_dir, caplog):
    """With every decode worker gone the router reported SERVING all the same: Kubernetes kept
    sending it clients whose every request failed. It now follows its pool's health checks."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tandem_worker.server.local import free_port
    from tandem_worker.server.router_main import serve_router

    from .serving.procs import wait_for

    decode, decode_port = _fake_worker("decode")
    prefill, prefill_port = _fake_worker("prefill")
    port, http_port, stop = free_port(), free_port(), threading.Event()
    router = threading.Thread(
        target=serve_router,
        args=(str(model_dir), [f"127.0.0.1:{decode_port}"], [f"127.0.0.1:{prefill_port}"]),
        kwargs={"port": port, "http_port": http_port, "stop_event": stop},
        daemon=True,
    )
    router.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    statuses = health_pb2.HealthCheckResponse

    def health_is(status: int) -> bool:
        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        return check.status == status

    def http_health() -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health", timeout=5) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as e:
            return e.code, json.load(e)

    caplog.set_level(logging.INFO, logger="tandem_worker.server.router_main")
    try:
        wait_for(lambda: health_is(statuses.SERVING), 60, "the router is ready")
        # Not ready while starting is expected: no warning on `tandem up`'s terminal for it.
        not_ready = [r for r in caplog.records if "router not ready" in r.getMessage()]
        assert all(r.levelno == logging.INFO for r in not_ready)
        decode.stop(None)
        wait_for(lambda: health_is(statuses.NOT_SERVING), 30, "the router leaves the Service")
        wait_for(
            lambda: any(
                r.levelno == logging.WARNING and "no decode or colocated worker" in r.getMessage()
                for r in caplog.records
            ),
            10,
            "losing its workers is a warning",
        )
        assert http_health() == (503, {"status": "unavailable"})  # the OpenAI frontend's probe too
        request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2, 3]))
        with pytest.raises(grpc.RpcError) as err:
            list(pbgrpc.InferenceStub(channel).Generate(request, timeout=30))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "no decode or colocated worker is serving" in err.value.details()
        decode, _ = _fake_worker("decode", decode_port)  # back, on its old address
        wait_for(lambda: health_is(statuses.SERVING), 30, "the router is ready again")
        assert http_health() == (200, {"status": "ok"})
    finally:
        stop.set()
        router.join(timeout=30)
        channel.close()
        decode.stop(None)
        prefill.stop(None)


class _Clock:
    """The pool's clock for its backoffs, moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _health_checks_pass(pool: WorkerPool) -> None:
    """What the pool's next refresh does for workers that answer their health checks."""
    for w in pool._workers.values():
        w.healthy = True


def test_a_failed_worker_stays_out_though_its_health_checks_pass_for_a_growing_backoff():
    """A prefill worker that is up but stalls its KV streams was back in rotation at its next
    health check (half a second on), each time costing a request its KV idle timeout (30 s)."""
    servers = [_fake_worker(role) for role in ("decode", "prefill", "prefill")]
    (_, d), (_, p1), (_, p2) = servers
    clock = _Clock()
    pool = WorkerPool([f"127.0.0.1:{d}"], [f"127.0.0.1:{p1}", f"127.0.0.1:{p2}"], clock=clock)
    try:
        pool.refresh()
        stalls = pool.pick(100, set()).prefill
        other = next(w for w in pool._targets()[1] if w is not stalls)
        for backoff in (1, 2, 4, 8, 16, 30, 30):
            failed_at = clock.now
            pool.mark_failed(stalls, "prefill worker: no KV for 30 s")
            pool.refresh()  # a real health check, which it passes
            assert stalls.healthy and pool.pick(100, set()).prefill is other
            assert pool.readiness_problem() is None, "the other prefill worker serves"
            clock.now = failed_at + backoff - 0.5
            assert pool.pick(100, set()).prefill is other, f"back before its {backoff} s were up"
            clock.now = failed_at + backoff
            assert pool.pick(100, set()).prefill is stalls  # as idle as the other: the first again
        # A minute in rotation without a failure: the next one starts over at a second.
        clock.now += pool.backoff_reset
        pool.mark_failed(stalls, "prefill worker: no KV for 30 s")
        pool.refresh()
        clock.now += 1
        assert pool.pick(100, set()).prefill is stalls
    finally:
        for w in pool.snapshot():
            w.channel.close()
        for server, _ in servers:
            server.stop(None)


def test_one_fault_failing_many_requests_at_once_counts_once(pool):
    pool.clock = clock = _Clock()
    p2 = pool._workers["p2:1"]
    for _ in range(10):  # every request it held stalled together
        pool.mark_failed(p2, "prefill worker: no KV for 30 s")
    _health_checks_pass(pool)
    clock.now += 0.5
    assert pool.pick(100, set()).prefill.address == "p1:1"
    clock.now += 0.5
    assert pool.pick(100, set()).prefill is p2, "one fault, one second out, not the longest backoff"


def test_a_request_served_through_a_worker_resets_its_backoff(pool):
    pool.clock = clock = _Clock()
    p1, p2 = pool._workers["p1:1"], pool._workers["p2:1"]
    earlier = pool.pick(100, set())
    earlier_ticket = pool.begin(earlier, 100)  # a long stream through p2, begun before its fault
    pool.mark_failed(p2, "prefill worker: no KV for 30 s")
    _health_checks_pass(pool)
    pool.succeeded(earlier, earlier_ticket)  # says nothing about p2 since its fault
    assert pool.pick(100, set()).prefill is p1
    clock.now += 1
    pair = pool.pick(100, set())
    assert pair.prefill is p2
    pool.succeeded(pair, pool.begin(pair, 100))
    pool.mark_failed(p2, "prefill worker: no KV for 30 s")  # a second fault, but not in a row
    _health_checks_pass(pool)
    clock.now += 1
    assert pool.pick(100, set()).prefill is p2, "out for 2 s as if the request between had failed"

    # Both backing off, so both in rotation; one serves a request and is preferred again.
    pool.mark_failed(p1, "prefill worker: no KV for 30 s")
    pool.mark_failed(p2, "prefill worker: no KV for 30 s")
    _health_checks_pass(pool)
    pair = pool.pick(100, {"p2:1"})
    assert pair.prefill is p1
    pool.succeeded(pair, pool.begin(pair, 100))
    assert pool.pick(100, set()).prefill is p1, "p2 queues less, but it is still backing off"


def test_a_backoff_never_takes_the_last_workers_of_a_role_out(pool):
    pool.clock = _Clock()
    pool.mark_failed(pool._workers["p2:1"], "prefill worker: no KV for 30 s")
    _health_checks_pass(pool)
    assert pool.pick(100, set()).prefill.address == "p1:1" and pool.serving_problem() is None
    # p1 only busy (it refused this request): p2 stays out; the router answers retry-later.
    assert pool.pick(100, {"p1:1"}) is None
    for a in ("p1:1", "d1:1", "d2:1"):
        pool.mark_failed(pool._workers[a], "no KV for 30 s")
    _health_checks_pass(pool)
    # All backing off: all in rotation, as if none were, rather than nothing to serve with.
    pair = pool.pick(100, set())
    assert pair.decode.address == "d2:1" and pair.prefill.address == "p2:1"
    assert pool.serving_problem() is None


def test_a_backoff_never_takes_out_the_only_workers_that_can_serve_a_request():
    """The fallback on workers backing off was by role: a decode worker in rotation made the one
    backing off spare even when only the latter could serve (its KV fits the prefill workers, a
    prompt only its partner holds, or it is the colocated one): every request failed and the router
    was unready for the whole backoff (up to 30 s)."""
    clock = _Clock()
    # A rolling upgrade: the new decode worker is up, its prefill partner not yet.
    p = WorkerPool(decode_targets=["old:1", "new:1"], prefill_targets=["p:1"], clock=clock)
    p._workers = {
        "old:1": info("old:1", "decode"),
        "new:1": info("new:1", "decode", free_blocks=200),
        "p:1": info("p:1", "prefill"),
    }
    p._workers["new:1"].stats.model_id = "m2"
    p._decode, p._prefill = ["old:1", "new:1"], ["p:1"]
    p.mark_failed(p._workers["old:1"], "worker stream ended early")
    _health_checks_pass(p)
    assert p.pick(100, set()).decode.address == "old:1"
    assert p.serving_problem() is None
    # A colocated worker, beside a decode worker that has no prefill partner at all.
    p = WorkerPool(decode_targets=["c:1", "d:1"], clock=clock)
    p._workers = {"c:1": info("c:1", "colocated"), "d:1": info("d:1", "decode", free_blocks=200)}
    p._decode = ["c:1", "d:1"]
    p.mark_failed(p._workers["c:1"], "worker stream ended early")
    _health_checks_pass(p)
    assert p.pick(100, set()).decode.address == "c:1" and p.serving_problem() is None


def test_a_prompt_only_a_worker_backing_off_holds_goes_to_it(pool):
    pool.clock = clock = _Clock()
    pool._workers["d2:1"].stats.num_blocks = pool._workers["d2:1"].stats.free_blocks = 1000
    pool._workers["p1:1"].stats.num_blocks = 1000  # 16,000 tokens of KV; p2 holds 1,600
    pool.mark_failed(pool._workers["p1:1"], "prefill worker p1:1 stalled")
    _health_checks_pass(pool)
    assert pool.pick(100, set()).prefill.address == "p2:1"  # short prompts avoid it
    assert pool.pick(5000, set()).prefill.address == "p1:1"  # it alone holds this one
    # Busy is not unable: with the decode worker full, a long prompt is one to retry later.
    pool._workers["d2:1"].stats.free_blocks = 10
    assert pool.pick(5000, set()) is None and pool.all_full(5000, set())
    clock.now += 1
    pool._workers["d2:1"].stats.free_blocks = 1000
    assert pool.pick(100, set()).prefill.address == "p2:1", "p2 still queues less"


def test_a_request_failed_while_the_health_checks_run_leaves_readiness_alone():
    """Readiness is the health checks' word: a request that failed on the only decode worker after
    its check, while the same refresh checked the others, made the router unready until the next."""
    servers = [_fake_worker(role) for role in ("decode", "prefill")]
    (_, d), (_, p) = servers
    pool = WorkerPool([f"127.0.0.1:{d}"], [f"127.0.0.1:{p}"], clock=_Clock())
    check = pool._check

    def check_then_a_request_fails(w: WorkerInfo) -> None:
        check(w)
        if w.address == f"127.0.0.1:{d}":
            pool.mark_failed(w, "worker stream ended early")

    try:
        pool.refresh()
        assert pool.readiness_problem() is None
        pool._check = check_then_a_request_fails
        pool.refresh()
        assert pool.readiness_problem() is None
        # Out of rotation until its next check all the same, as before.
        assert pool.pick(100, set()) is None
    finally:
        for w in pool.snapshot():
            w.channel.close()
        for server, _ in servers:
            server.stop(None)


def test_a_prefill_worker_that_failed_a_request_is_not_tried_first_again(model_dir):
    with _router_over_fake_decode(model_dir, lambda pool: _MalformedPrefill()) as (router, pool, fake):
        pool.clock = _Clock()
        pool._workers["p:2"].stats.queued_prompt_tokens = 50  # p:1 first
        request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2, 3]), sampling=pb.SamplingParams())
        list(router.Generate(request, _Context()))
        _health_checks_pass(pool)
        out = list(router.Generate(request, _Context()))
        assert fake.prefills == ["p:1", "p:2", "p:2"] and out[-1].token_ids == [42]


class _HeldAnswer(wgrpc.WorkerServicer):
    """A worker that sends one token, then the rest of its answer once `release` is set."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def Generate(self, request, context):  # noqa: N802
        yield wpb.WorkerGenerateResponse(token_ids=[42])
        self.release.wait(30)
        yield wpb.WorkerGenerateResponse(token_ids=[43], finish_reason=pb.FINISH_REASON_LENGTH)


def test_a_worker_that_leaves_the_targets_finishes_the_answers_it_streams(model_dir, tmp_path):
    """A scaled-down pod leaves its headless Service's DNS as it starts to drain: the router closed
    its channel at the next refresh, which cancels every call on it, cutting the answers the drain
    was there to finish."""
    from grpc_health.v1 import health, health_pb2_grpc

    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=4))
    port = server.add_insecure_port("127.0.0.1:0")
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    wgrpc.add_AdminServicer_to_server(_StatsOnly("colocated"), server)
    worker = _HeldAnswer()
    wgrpc.add_WorkerServicer_to_server(worker, server)
    server.start()
    targets = tmp_path / "decode"
    targets.write_text(f"127.0.0.1:{port}\n")
    pool = WorkerPool([f"file:{targets}"])
    try:
        pool.refresh()
        router = RouterService(pool, Tokenizer(model_dir), "smollm2-135m", 4096, set())
        request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2, 3]), sampling=pb.SamplingParams())
        answer = router.Generate(request, _Context())
        assert list(next(answer).token_ids) == [42]
        targets.write_text("")  # it drains: out of the targets
        pool.refresh()
        assert pool.pick(3, set()) is None, "no new work for it"
        worker.release.set()
        rest = list(answer)
        assert [list(m.token_ids) for m in rest] == [[43]]
        assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
        pool.refresh()
        assert not pool._leaving, "its channel is closed once nothing runs on it"
    finally:
        worker.release.set()
        for w in [*pool.snapshot(), *pool._leaving.values()]:
            w.channel.close()
        server.stop(None)


def test_the_requests_a_stalled_worker_held_count_as_one_failure_though_they_fail_apart(pool):
    """Each stalled pull fails at its own KV idle timeout, seconds apart: those that failed after
    the first backoff was over each doubled it, as if the worker had failed again."""
    pool.clock = clock = _Clock()
    p2 = pool._workers["p2:1"]
    pair = pool.pick(100, set())
    assert pair.prefill is p2
    held = [pool.begin(pair, 100) for _ in range(3)]  # its pulls when it stalled
    for ticket, at in zip(held, (0.0, 1.5, 4.0), strict=True):
        clock.now = 1000 + at
        pool.mark_failed(p2, "prefill worker p2:1 stalled", ticket)
    assert p2.failures == 1 and p2.backoff_until == 1001.0
    # A request sent to it after that fault that fails too is a failure in a row.
    _health_checks_pass(pool)
    pair = pool.pick(100, set())
    assert pair.prefill is p2
    pool.mark_failed(p2, "prefill worker p2:1 stalled", pool.begin(pair, 100))
    assert p2.failures == 2 and p2.backoff_until == clock.now + 2.0


# --- a draining worker ----------------------------------------------------------------------------


@contextlib.contextmanager
def _served(servicer: wgrpc.WorkerServicer) -> Iterator[str]:
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=2))
    port = server.add_insecure_port("127.0.0.1:0")
    wgrpc.add_WorkerServicer_to_server(servicer, server)
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)


def _draining_worker() -> wgrpc.WorkerServicer:
    """The worker's own Generate, on a worker that drains: it refuses before anything else (so no
    engine is needed behind it)."""
    from types import SimpleNamespace

    from tandem_worker.server.worker_server import WorkerService

    draining = threading.Event()
    draining.set()
    return WorkerService(SimpleNamespace(draining=draining, engine_stall=None, role="colocated"))


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_draining_worker_is_skipped_for_the_request_not_failed(model_dir, caplog):
    """A rollout or a scale-down drains workers, which refuse new requests (UNAVAILABLE) until their
    next health check reports the drain: the router backed each off as failed, with a warning "out
    of rotation" on every rollout. The request goes to another worker all the same."""
    with _served(_draining_worker()) as leaving, _served(_SeveralTokensAMessage([42])) as staying:
        pool = WorkerPool(decode_targets=[], clock=_Clock())
        pool._workers = {a: info(a, "colocated") for a in (leaving, staying)}
        pool._workers[leaving].stats.free_blocks = 200  # the roomiest: picked first
        pool._decode = [leaving, staying]
        for w in pool._workers.values():
            w.checked_healthy = True
        caplog.set_level(logging.INFO, logger="tandem_worker")
        request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2, 3]), sampling=pb.SamplingParams())
        router = RouterService(pool, Tokenizer(model_dir), "smollm2-135m", 4096, set())
        try:
            (out,) = list(router.Generate(request, _Context()))
        finally:
            for w in pool._workers.values():
                w.channel.close()
    assert out.token_ids == [42]
    w = pool._workers[leaving]
    assert w.healthy and w.failures == 0 and w.backoff_until == 0.0, "backed off as failed"
    assert w.state(pool.clock()) == "serving"  # until its health check reports the drain
    assert _warnings(caplog) == []


class _PrefillDraining(wgrpc.WorkerServicer):
    """A decode worker whose KV pull from p:1 meets a draining prefill worker, whose refusal it passes
    on as the decode worker does (`prefill worker ADDR failed: DETAILS`)."""

    def __init__(self) -> None:
        self.prefills: list[str] = []

    def Generate(self, request, context):  # noqa: N802
        self.prefills.append(request.prefill_endpoint)
        if request.prefill_endpoint == "p:1":
            context.abort(grpc.StatusCode.UNAVAILABLE, "prefill worker p:1 failed: worker is draining")
        yield wpb.WorkerGenerateResponse(token_ids=[42], finish_reason=pb.FINISH_REASON_LENGTH)


def test_a_draining_prefill_worker_is_skipped_for_the_request_not_failed(model_dir, caplog):
    with _router_over_fake_decode(model_dir, lambda pool: _PrefillDraining()) as (router, pool, fake):
        pool.clock = _Clock()
        pool._workers["p:2"].stats.queued_prompt_tokens = 50  # p:1 first
        caplog.set_level(logging.INFO, logger="tandem_worker")
        request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2, 3]), sampling=pb.SamplingParams())
        out = list(router.Generate(request, _Context()))
        assert fake.prefills == ["p:1", "p:2"] and out[-1].token_ids == [42]
        p1, decode = pool._workers["p:1"], pool._workers["decode"]
        assert p1.healthy and p1.failures == 0 and p1.backoff_until == 0.0, "backed off as failed"
        assert decode.failures == 0, "the decode worker was blamed for its partner's drain"
        assert _warnings(caplog) == []


class _Recording(wgrpc.WorkerServicer):
    """A decode worker that records what it is sent and refuses it as busy."""

    def __init__(self, pool: WorkerPool) -> None:
        self.requests: list[wpb.WorkerGenerateRequest] = []

    def Generate(self, request, context):  # noqa: N802
        self.requests.append(request)
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy")
        yield  # a generator, as the real servicer


def test_a_request_with_newer_sampling_controls_goes_only_to_workers_that_apply_them(model_dir):
    # A worker of an older build drops the wire fields it does not know: it would sample without
    # the penalty, in silence. During a rolling upgrade such requests go to the new workers; with
    # none yet, the client is told why.
    from tandem_worker.engine.sampling_params import SAMPLING_CONTROLS

    def ask(router: RouterService, sampling: pb.SamplingParams) -> tuple[grpc.StatusCode, str]:
        request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2, 3]), sampling=sampling)
        with pytest.raises(grpc.RpcError) as err:
            list(router.Generate(request, _AbortContext()))
        return err.value.args

    with _router_over_fake_decode(model_dir, _Recording) as (router, pool, fake):
        code, details = ask(router, pb.SamplingParams(repetition_penalty=1.2, min_p=0.1))
        assert code == grpc.StatusCode.UNAVAILABLE
        assert "no worker applies min_p, penalties" in details and "older build" in details
        assert fake.requests == [], "sent to a worker that would drop the penalty"
        ask(router, pb.SamplingParams())  # a request without them is served as before
        assert len(fake.requests) == 1
        for w in pool._workers.values():
            w.stats.sampling_controls.extend(SAMPLING_CONTROLS)
        ask(router, pb.SamplingParams(repetition_penalty=1.2, min_p=0.1))
        assert len(fake.requests) == 2 and fake.requests[-1].sampling.repetition_penalty == pytest.approx(1.2)


def test_workers_report_the_sampling_controls_they_apply():
    from tandem_worker.engine.sampling_params import SAMPLING_CONTROLS, SamplingParams

    every = SamplingParams(
        max_tokens=4,
        repetition_penalty=1.1,
        logit_bias={1: 1.0},
        min_p=0.1,
        min_tokens=2,
        structured_outputs={"regex": "a"},
        prompt_logprobs=0,
    ).controls
    assert every == set(SAMPLING_CONTROLS)
    assert SamplingParams().controls == frozenset()
