"""Worker behaviour that needs the worker in this process, where its engine can be made to fail
or its KV writes held at a chosen point.

- A worker whose engine fails (out of device memory, a kernel fault) stops serving and exits: the
  stream in flight ends with UNAVAILABLE (which the router retries on another pair and takes the
  worker out of rotation for), later requests are refused with UNAVAILABLE instead of hanging or
  UNKNOWN, health says NOT_SERVING, and `serve_worker` returns exit status 1 so that Kubernetes
  restarts the pod.
- A client that goes away while its prompt's KV is being written into the decode worker's reserved
  blocks gets those blocks freed only after the writes are done, never while a copy may still land
  in them (they could belong to another sequence by then).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tandem_proto.v1 import worker_pb2 as wpb
from tandem_proto.v1 import worker_pb2_grpc as wgrpc
from tandem_worker.engine.config import EngineConfig
from tandem_worker.engine.llm_engine import LLMEngine
from tandem_worker.engine.lora import AdapterNotFoundError
from tandem_worker.engine.sampling_params import RequestError
from tandem_worker.server.local import free_port
from tandem_worker.server.worker_main import serve_worker

from .procs import HOST, KV_BYTES, assert_idle, greedy, wait_for


@contextlib.contextmanager
def in_process_worker(
    role: str, model_dir, **serve_kw
) -> Iterator[tuple[grpc.Channel, threading.Thread, list[int]]]:
    """A worker served by a thread of this process: (a channel to it, the thread, its exit status
    once it returned). `serve_kw`: more arguments of `serve_worker`."""
    port, stop, status = free_port(), threading.Event(), []
    config = EngineConfig(model=str(model_dir), kv_cache_bytes=KV_BYTES)
    thread = threading.Thread(
        target=lambda: status.append(serve_worker(role, config, HOST, port, stop_event=stop, **serve_kw)),
        daemon=True,
    )
    thread.start()
    channel = grpc.insecure_channel(f"{HOST}:{port}")
    try:
        wait_for(lambda: serving(channel), 120, f"the in-process {role} worker serves")
        yield channel, thread, status
    finally:
        stop.set()
        channel.close()
        thread.join(timeout=30)


def serving(channel: grpc.Channel) -> bool:
    try:
        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
    except grpc.RpcError:
        return False
    return check.status == health_pb2.HealthCheckResponse.SERVING


@contextlib.contextmanager
def fake_prefill(handler, workers: int = 2, options=None) -> Iterator[int]:
    """A scripted prefill worker on loopback: `handler(request, context)` serves its KV pulls;
    yields its port."""
    from tandem_worker.server.kv_transfer import prefill_method_handler

    server = grpc.server(ThreadPoolExecutor(workers), options=options)
    server.add_generic_rpc_handlers((prefill_method_handler(handler),))
    port = server.add_insecure_port(f"{HOST}:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(None)


def test_a_worker_whose_engine_fails_refuses_work_and_exits_nonzero(model_dir, monkeypatch):
    fail = threading.Event()
    original = LLMEngine.step

    def step(self):
        if fail.is_set():
            raise RuntimeError("CUDA out of memory (injected by the test)")
        return original(self)

    monkeypatch.setattr(LLMEngine, "step", step)
    with in_process_worker("colocated", model_dir) as (channel, server, status):
        worker = wgrpc.WorkerStub(channel)
        request = wpb.WorkerGenerateRequest(
            request_id="r1", prompt_token_ids=[1, 2, 3, 4], sampling=greedy(500)
        )
        stream = worker.Generate(request, timeout=60)
        assert next(stream).token_ids  # decoding
        fail.set()
        with pytest.raises(grpc.RpcError) as err:
            for _ in stream:
                pass
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
        assert "engine failed" in err.value.details() and "out of memory" in err.value.details()

        server.join(timeout=30)  # stops on its own: no stop_event, no signal
        assert not server.is_alive() and status == [1]
        # Nothing listens any more: a router's health check and its requests fail fast.
        assert not serving(channel)
        with pytest.raises(grpc.RpcError) as err:
            next(worker.Generate(request, timeout=5))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_client_gone_during_the_kv_pull_frees_the_blocks_after_the_writes(cluster, model_dir, monkeypatch):
    from tandem_worker.server.engine_loop import EngineLoop
    from tandem_worker.server.kv_transfer import KVWriter

    events: list[str] = []
    writing, release = threading.Event(), threading.Event()
    write, finish, abort = KVWriter.write, KVWriter.finish, EngineLoop.abort

    def held_write(self, *args):
        if not writing.is_set():
            writing.set()
            release.wait(30)  # a slow copy, as a big chunk into device memory can be
        return write(self, *args)

    def spy_finish(self):
        finish(self)
        events.append("writes done")

    def spy_abort(self, request_id):
        events.append("abort")
        abort(self, request_id)

    monkeypatch.setattr(KVWriter, "write", held_write)
    monkeypatch.setattr(KVWriter, "finish", spy_finish)
    monkeypatch.setattr(EngineLoop, "abort", spy_abort)
    with in_process_worker("decode", model_dir) as (channel, _, _):
        request = wpb.WorkerGenerateRequest(
            request_id="gone",
            prompt_token_ids=list(range(1, 200)),
            sampling=greedy(8),
            prefill_endpoint=cluster.p0.address,
        )
        stream = wgrpc.WorkerStub(channel).Generate(request, timeout=60)
        assert writing.wait(30), "no KV chunk reached the decode worker"
        stream.cancel()
        with pytest.raises(grpc.RpcError):
            list(stream)
        # The RPC is over, but a write is still in progress: its blocks stay the request's.
        assert not wait_for_event(events, "abort", 1.0)
        release.set()
        assert wait_for_event(events, "abort", 10.0)
        assert events.index("writes done") < events.index("abort")
        stats = wgrpc.AdminStub(channel).Stats
        wait_for(lambda: stats(wpb.StatsRequest(), timeout=2).used_blocks == 0, 10, "the blocks are freed")
    assert_idle([cluster.p0])


def test_a_client_gone_while_its_blocks_are_reserved_gets_no_kv_written(cluster, model_dir, monkeypatch):
    """Cancelled during the engine step that reserves its blocks: the cancel frees them at once (no
    write has started), so the pull must not start afterwards and write into blocks that may
    already be another sequence's."""
    from tandem_worker.server.kv_transfer import KVWriter

    reserving, writes = threading.Event(), []
    step, write = LLMEngine.step, KVWriter.write

    def slow_step(self):
        if self.scheduler.awaiting:  # the step that will reserve the request's blocks
            reserving.set()
            threading.Event().wait(1.5)  # a busy engine's step
        return step(self)

    def spy_write(self, *args):
        writes.append(args[0].layer)
        return write(self, *args)

    monkeypatch.setattr(LLMEngine, "step", slow_step)
    monkeypatch.setattr(KVWriter, "write", spy_write)
    with in_process_worker("decode", model_dir) as (channel, _, _):
        request = wpb.WorkerGenerateRequest(
            request_id="early",
            prompt_token_ids=list(range(100, 400)),
            sampling=greedy(5),
            prefill_endpoint=cluster.p0.address,
        )
        stream = wgrpc.WorkerStub(channel).Generate(request, timeout=60)
        assert reserving.wait(30)
        stream.cancel()
        with pytest.raises(grpc.RpcError):
            list(stream)
        stats = wgrpc.AdminStub(channel).Stats
        wait_for(lambda: stats(wpb.StatsRequest(), timeout=2).used_blocks == 0, 10, "the blocks are freed")
        threading.Event().wait(2.0)  # where the pull would have run
        assert writes == [], f"{len(writes)} KV chunks were written after the request was cancelled"
    assert_idle([cluster.p0])


def test_a_busy_prefill_worker_is_resource_exhausted_not_failed(model_dir):
    """A prefill worker at its request limit answers RESOURCE_EXHAUSTED; the decode worker passes
    that on (the router then tries another and keeps this one in rotation) instead of calling the
    prefill worker failed (UNAVAILABLE, which takes it out of rotation)."""

    def busy(request, context):
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "256 requests in flight (the limit is 256)")
        yield b""

    with fake_prefill(busy) as port:
        with in_process_worker("decode", model_dir) as (channel, _, _):
            request = wpb.WorkerGenerateRequest(
                request_id="busy",
                prompt_token_ids=list(range(1, 50)),
                sampling=greedy(4),
                prefill_endpoint=f"{HOST}:{port}",
            )
            with pytest.raises(grpc.RpcError) as err:
                list(wgrpc.WorkerStub(channel).Generate(request, timeout=60))
            stats = wgrpc.AdminStub(channel).Stats
            wait_for(
                lambda: stats(wpb.StatsRequest(), timeout=2).used_blocks == 0, 10, "the blocks are freed"
            )
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
    assert "is busy" in err.value.details() and "the limit is 256" in err.value.details()


def wait_for_event(events: list[str], name: str, timeout: float) -> bool:
    try:
        wait_for(lambda: name in events, timeout, name, interval=0.05)
    except AssertionError:
        return False
    return True


def test_a_dead_engine_loop_fails_every_caller_at_once(model_dir, monkeypatch):
    from tandem_worker.engine.sampling_params import SamplingParams
    from tandem_worker.server.engine_loop import EngineDead, EngineLoop

    engine = LLMEngine(model=str(model_dir), kv_cache_bytes=32 * 2**20)
    loop = EngineLoop(engine).start()
    try:
        params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
        running = loop.submit([1, 2, 3], params, "running")
        assert next(iter(running)).new_token_ids
        monkeypatch.setattr(engine, "step", lambda: 1 / 0)
        with pytest.raises(EngineDead, match="ZeroDivisionError"):
            list(running)
        assert loop.died.wait(5)
        with pytest.raises(EngineDead):
            loop.submit([1, 2, 3], params, "after")
        # A command for the loop thread (adapter admin) fails now, not after its timeout.
        with pytest.raises(EngineDead):
            loop.call(lambda: None, timeout=600)
        assert loop.num_in_flight == 0
    finally:
        loop.stop()


def test_the_engine_loop_waits_instead_of_spinning_while_kv_is_in_transit(model_dir, monkeypatch):
    # A request waiting for blocks that a request with KV in transit holds: no step can do
    # anything until that KV lands. The loop stepped back to back (250,000 empty steps a second),
    # taking a core and the GIL from the threads writing that KV; it now waits for a command.
    from tandem_worker.engine.sampling_params import SamplingParams
    from tandem_worker.server.engine_loop import EngineLoop, KVReserved

    engine = LLMEngine(model=str(model_dir), kv_cache_bytes=8 * 16 * 2 * 30 * 3 * 64 * 4)  # 8 blocks
    steps = []
    step = engine.step
    monkeypatch.setattr(engine, "step", lambda: steps.append(1) or step())
    loop = EngineLoop(engine).start()
    try:
        params = SamplingParams(max_tokens=4, temperature=0.0)
        holder = loop.submit(list(range(100, 200)), params, "in-transit", remote_kv=True)
        assert isinstance(next(iter(holder)), KVReserved)  # 7 of 8 blocks, its KV never arrives
        loop.submit(list(range(300, 340)), params, "waiting", remote_kv=True)
        before = len(steps)
        threading.Event().wait(1.0)
        # Blocking waits of 50 ms allow about 20; spinning made hundreds of thousands.
        assert len(steps) - before < 100
    finally:
        loop.stop()


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (RequestError("prompt", "can never fit beside adapter x"), grpc.StatusCode.INVALID_ARGUMENT),
        (AdapterNotFoundError("x"), grpc.StatusCode.NOT_FOUND),
    ],
)
def test_what_the_engine_thread_refuses_reaches_the_client_as_its_code(model_dir, monkeypatch, error, code):
    # The engine thread adds each request after the server thread checked it; what it refuses
    # then (the adapter's size is known only there, or it was unloaded meanwhile) is the caller's
    # error, not UNKNOWN, and the worker serves on.
    original = LLMEngine.add_request

    def add_request(self, *args, request_id=None, **kwargs):
        if request_id == "refused":
            raise error
        return original(self, *args, request_id=request_id, **kwargs)

    monkeypatch.setattr(LLMEngine, "add_request", add_request)
    with in_process_worker("colocated", model_dir) as (channel, server, status):
        worker = wgrpc.WorkerStub(channel)
        ids = [1, 2, 3]
        refused = wpb.WorkerGenerateRequest(request_id="refused", prompt_token_ids=ids, sampling=greedy(4))
        with pytest.raises(grpc.RpcError) as err:
            list(worker.Generate(refused, timeout=60))
        assert err.value.code() == code, err.value
        served = wpb.WorkerGenerateRequest(request_id="served", prompt_token_ids=ids, sampling=greedy(4))
        assert sum(len(m.token_ids) for m in worker.Generate(served, timeout=60)) == 4
        assert server.is_alive()


def test_a_malformed_kv_stream_fails_its_request_and_corrupts_nothing(model_dir, offline):
    """What a faulty (or mismatched) prefill worker sends is checked before the decode worker uses
    it: a stream missing KV, a chunk over the decode worker's own cached prefix (blocks shared with
    other sequences), or a first token past the vocabulary each fail that request with DATA_LOSS.
    Before, the first two were accepted and left garbage in the prefix cache, served afterwards to
    purely local requests, and the third failed the engine and every request on the worker."""

    import torch

    from tandem_worker.server.convert import params_from_pb
    from tandem_worker.server.kv_transfer import encode_kv_chunk, kv_chunks

    def prompt(start: int) -> list[int]:
        return list(range(start, start + 65))  # 4 full blocks, which the prefix cache keeps

    def expected(ids: list[int]) -> list[int]:
        return offline.generate([ids], params_from_pb(greedy(8)))[0].token_ids

    def no_kv(request, context):
        yield encode_kv_chunk(wpb.KVChunk(layout=request.layout))
        yield encode_kv_chunk(wpb.KVChunk(last=True, first_token=42))

    def whole_stream(request, first_token: int, over_the_prefix: bool = False):
        """The handshake, every layer's KV from the skip to the prompt's end (zeros), and the last
        message; `over_the_prefix` adds tokens [0, 16) per layer: the decode worker's cached blocks."""
        yield encode_kv_chunk(wpb.KVChunk(layout=request.layout))
        lay, n = request.layout, len(request.prompt_token_ids)
        for layer in range(lay.num_layers):
            z = torch.zeros(n - request.skip_tokens, lay.num_kv_heads, lay.head_dim)
            yield from kv_chunks(layer, request.skip_tokens, z, z)
            if over_the_prefix:
                g = torch.full((16, lay.num_kv_heads, lay.head_dim), 7.0)
                yield from kv_chunks(layer, 0, g, g)
        yield encode_kv_chunk(wpb.KVChunk(last=True, first_token=first_token))

    def over_the_cached_prefix(request, context):
        return whole_stream(request, 42, over_the_prefix=True)

    def token_past_the_vocabulary(request, context):
        return whole_stream(request, 10**6)

    behaviour = {"now": no_kv}
    with fake_prefill(lambda r, c: behaviour["now"](r, c), workers=4) as port:
        with in_process_worker("decode", model_dir) as (channel, thread, _):
            worker = wgrpc.WorkerStub(channel)

            def generate(rid: str, ids: list[int], remote: bool = False) -> list[int]:
                req = wpb.WorkerGenerateRequest(
                    request_id=rid,
                    prompt_token_ids=ids,
                    sampling=greedy(8),
                    prefill_endpoint=f"{HOST}:{port}" if remote else "",
                )
                return [t for m in worker.Generate(req, timeout=60) for t in m.token_ids]

            def refused(rid: str, ids: list[int], why: str) -> None:
                with pytest.raises(grpc.RpcError) as err:
                    generate(rid, ids, remote=True)
                assert err.value.code() == grpc.StatusCode.DATA_LOSS, err.value.details()
                assert why in err.value.details()

            # 1. No KV at all: refused, and nothing of it is cached for the next local request.
            refused("no-kv", prompt(1000), "KV stream ended with 30 layer(s) incomplete")
            assert generate("local-1", prompt(1000)) == expected(prompt(1000))
            # 2. A write over the cached prefix: refused; the prefix still gives the same tokens.
            behaviour["now"] = over_the_cached_prefix
            assert generate("local-2", prompt(2000)) == expected(prompt(2000))
            refused("overwrite", prompt(2000) + [5, 6, 7], "starts at token 0, expected")
            assert generate("local-3", prompt(2000)) == expected(prompt(2000))
            # 3. A first token past the vocabulary: refused; the worker serves on.
            behaviour["now"] = token_past_the_vocabulary
            refused("bad-token", prompt(3000), "outside the vocabulary")
            assert generate("local-4", prompt(3000)) == expected(prompt(3000))
            assert thread.is_alive()
            stats = wgrpc.AdminStub(channel).Stats
            wait_for(
                lambda: stats(wpb.StatsRequest(), timeout=2).used_blocks == 0, 10, "the blocks are freed"
            )


def test_a_stalled_prefill_worker_frees_the_reserved_blocks_and_is_named(model_dir, monkeypatch):
    """A prefill worker that answers keepalive pings and sends its handshake but then no KV (its
    engine stuck) held the decode worker's reserved blocks for as long as the client had no
    deadline. After the idle timeout the pull is cancelled, the blocks are freed, and the request
    fails with UNAVAILABLE naming the prefill worker, which the router retries on another pair."""

    from tandem_worker.server.kv_transfer import encode_kv_chunk
    from tandem_worker.server.worker_pool import SERVER_KEEPALIVE_OPTIONS
    from tandem_worker.server.worker_server import KV_IDLE_TIMEOUT_ENV

    monkeypatch.setenv(KV_IDLE_TIMEOUT_ENV, "1")
    cancelled = threading.Event()

    def stalled(request, context):
        context.add_callback(cancelled.set)
        yield encode_kv_chunk(wpb.KVChunk(layout=request.layout))
        cancelled.wait(60)  # sends nothing more until the caller gives up

    with fake_prefill(stalled, options=SERVER_KEEPALIVE_OPTIONS) as port:
        with in_process_worker("decode", model_dir) as (channel, _, _):
            request = wpb.WorkerGenerateRequest(
                request_id="stalled",
                prompt_token_ids=list(range(1, 200)),
                sampling=greedy(4),
                prefill_endpoint=f"{HOST}:{port}",
            )
            with pytest.raises(grpc.RpcError) as err:
                list(wgrpc.WorkerStub(channel).Generate(request, timeout=30))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
            assert err.value.details() == f"prefill worker {HOST}:{port} stalled: no KV for 1 s"
            assert cancelled.wait(10), "the prefill worker's call was left open"
            stats = wgrpc.AdminStub(channel).Stats
            wait_for(
                lambda: stats(wpb.StatsRequest(), timeout=2).used_blocks == 0, 10, "the blocks are freed"
            )
