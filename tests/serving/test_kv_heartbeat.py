"""A busy prefill worker is not a stalled one: its KV pulls survive the decode worker's idle timeout.

A decode worker gives up on a pull that receives nothing for its idle timeout
(`$TANDEM_KV_IDLE_TIMEOUT_S`). A request queued on the prefill worker behind another prompt
receives nothing until its turn, so a healthy but busy pair failed its requests. While the prefill
worker's engine is stepping, each of its pulls that has nothing to send gets an empty message
within a heartbeat period (well under the timeout); an engine that stops stepping (a stuck kernel)
sends none, so its pulls still time out.

Both workers run in this process: a decode worker as `serve_worker` runs it, and a prefill worker
built from its parts so its engine's steps can be slowed down (a slow CPU) or hung.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from tandem_proto.v1 import worker_pb2 as wpb
from tandem_proto.v1 import worker_pb2_grpc as wgrpc
from tandem_worker.engine.llm_engine import LLMEngine
from tandem_worker.server.convert import model_id, params_from_pb
from tandem_worker.server.engine_loop import EngineLoop
from tandem_worker.server.kv_transfer import prefill_method_handler
from tandem_worker.server.worker_server import (
    GRPC_OPTIONS,
    KV_IDLE_TIMEOUT_ENV,
    KVTransferService,
    WorkerState,
)

from .procs import HOST, greedy, wait_for
from .test_worker_in_process import in_process_worker

IDLE_TIMEOUT = 2.0  # the decode worker's; both workers read it, the prefill worker beats 4x faster
CHUNK = 16  # tokens per prefill step
STEP_DELAY = 0.1  # seconds added to every prefill step that computes something: a slow machine
LONG = list(range(1000, 1000 + 48 * CHUNK))  # 48 steps, >= 4.8 s: more than twice the timeout
SHORT = list(range(3000, 3040))


class SlowPrefill:
    """A prefill worker whose steps take at least STEP_DELAY, and that can be made to hang."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.computing = threading.Event()  # set at its first step with work
        self.steps = 0
        self.hang_at: int | None = None  # this step blocks until `release`
        self.release = threading.Event()
        self._step = engine.step
        engine.step = self.step

    def step(self):
        s = self.engine.scheduler
        if s.waiting or s.running:
            self.steps += 1
            self.computing.set()
            if self.steps == self.hang_at:
                self.release.wait(60)  # a kernel that never returns
            threading.Event().wait(STEP_DELAY)
        return self._step()


@contextlib.contextmanager
def slow_prefill_worker(
    model_dir, kv_idle_timeout_s: float | None = None
) -> Iterator[tuple[str, SlowPrefill]]:
    engine = LLMEngine(
        model=str(model_dir), kv_cache_bytes=64 * 2**20, detokenize=False, max_num_batched_tokens=CHUNK
    )
    slow = SlowPrefill(engine)
    loop = EngineLoop(engine).start()
    state = WorkerState(engine, loop, "prefill", model_id(engine.model_dir), kv_idle_timeout_s)
    server = grpc.server(ThreadPoolExecutor(8), options=GRPC_OPTIONS)
    server.add_generic_rpc_handlers((prefill_method_handler(KVTransferService(state).Prefill),))
    port = server.add_insecure_port(f"{HOST}:0")
    server.start()
    try:
        yield f"{HOST}:{port}", slow
    finally:
        slow.release.set()
        server.stop(None)
        loop.stop()


def generate(worker: wgrpc.WorkerStub, rid: str, ids: list[int], prefill: str):
    req = wpb.WorkerGenerateRequest(
        request_id=rid, prompt_token_ids=ids, sampling=greedy(6), prefill_endpoint=prefill
    )
    return worker.Generate(req, timeout=60)


def tokens(stream) -> list[int]:
    return [t for m in stream for t in m.token_ids]


def test_the_heartbeat_is_well_under_the_idle_timeout():
    from tandem_worker.server.worker_server import kv_heartbeat

    assert kv_heartbeat(30.0) == 5.0
    assert kv_heartbeat(IDLE_TIMEOUT) < IDLE_TIMEOUT / 3


def test_a_pull_queued_behind_a_long_prefill_outlives_the_idle_timeout(model_dir, offline, monkeypatch):
    monkeypatch.setenv(KV_IDLE_TIMEOUT_ENV, f"{IDLE_TIMEOUT:g}")
    with (
        slow_prefill_worker(model_dir) as (prefill, slow),
        in_process_worker("decode", model_dir) as (ch, _, _),
    ):
        worker = wgrpc.WorkerStub(ch)
        long = generate(worker, "long", LONG, prefill)
        assert slow.computing.wait(60)
        # Queued behind the long prompt: nothing of its own to send for about 4.7 s.
        short = generate(worker, "short", SHORT, prefill)
        got = [tokens(long), tokens(short)]
        assert slow.steps >= 48  # it did wait behind the long prompt
    want = [o.token_ids for o in offline.generate([LONG, SHORT], params_from_pb(greedy(6)))]
    assert got == want


def test_a_prefill_worker_beats_for_the_decode_workers_timeout_not_its_own(model_dir, offline, monkeypatch):
    """The timeout is the decode worker's, and each pull names it: a prefill worker set up with a
    longer one (its own beat every 5 s) used to keep a pull queued on it alive only when both
    workers read the same $TANDEM_KV_IDLE_TIMEOUT_S, and failed it against a decode worker's 2 s."""
    monkeypatch.delenv(KV_IDLE_TIMEOUT_ENV, raising=False)
    with (
        slow_prefill_worker(model_dir, kv_idle_timeout_s=600.0) as (prefill, slow),
        in_process_worker("decode", model_dir, kv_idle_timeout_s=IDLE_TIMEOUT) as (ch, _, _),
    ):
        worker = wgrpc.WorkerStub(ch)
        long = generate(worker, "long", LONG, prefill)
        assert slow.computing.wait(60)
        short = generate(worker, "short", SHORT, prefill)  # waits ~4.7 s for its turn, beating
        got = [tokens(long), tokens(short)]
        assert slow.steps >= 48
    want = [o.token_ids for o in offline.generate([LONG, SHORT], params_from_pb(greedy(6)))]
    assert got == want


def test_a_prefill_engine_that_stops_stepping_still_fails_its_pulls(model_dir, monkeypatch):
    monkeypatch.setenv(KV_IDLE_TIMEOUT_ENV, f"{IDLE_TIMEOUT:g}")
    with (
        slow_prefill_worker(model_dir) as (prefill, slow),
        in_process_worker("decode", model_dir) as (ch, _, _),
    ):
        # It hangs once the queued request has waited past the timeout (kept alive by heartbeats).
        slow.hang_at = 30
        worker = wgrpc.WorkerStub(ch)
        long = generate(worker, "long", LONG, prefill)
        assert slow.computing.wait(60)
        short = generate(worker, "short", SHORT, prefill)
        for stream in (long, short):
            with pytest.raises(grpc.RpcError) as err:
                tokens(stream)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
            assert err.value.details() == f"prefill worker {prefill} stalled: no KV for {IDLE_TIMEOUT:g} s"
        assert slow.steps == 30, "the engine was not hung when the pulls gave up"
        stats = wgrpc.AdminStub(ch).Stats
        wait_for(lambda: stats(wpb.StatsRequest(), timeout=2).used_blocks == 0, 10, "the blocks are freed")
