"""A worker whose engine fails (out of device memory, a kernel fault) stops serving and exits.

Served in-process, so that the engine's step can be made to fail: the stream in flight ends with
UNAVAILABLE (which the router retries on another pair and takes the worker out of rotation for),
requests after it are refused with UNAVAILABLE at once instead of hanging or UNKNOWN, health says
NOT_SERVING, and `serve_worker` returns exit status 1 so that Kubernetes restarts the pod.
"""

from __future__ import annotations

import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tandem_proto.v1 import worker_pb2 as wpb
from tandem_proto.v1 import worker_pb2_grpc as wgrpc
from tandem_worker.engine.config import EngineConfig
from tandem_worker.engine.llm_engine import LLMEngine
from tandem_worker.server.local import free_port
from tandem_worker.server.worker_main import serve_worker

from .procs import HOST, KV_BYTES, greedy, wait_for


def test_a_worker_whose_engine_fails_refuses_work_and_exits_nonzero(model_dir, monkeypatch):
    fail = threading.Event()
    original = LLMEngine.step

    def step(self):
        if fail.is_set():
            raise RuntimeError("CUDA out of memory (injected by the test)")
        return original(self)

    monkeypatch.setattr(LLMEngine, "step", step)
    port = free_port()
    stop = threading.Event()
    result: list[int] = []
    config = EngineConfig(model=str(model_dir), kv_cache_bytes=KV_BYTES)
    server = threading.Thread(
        target=lambda: result.append(serve_worker("colocated", config, HOST, port, stop_event=stop)),
        daemon=True,
    )
    server.start()
    channel = grpc.insecure_channel(f"{HOST}:{port}")
    try:
        health = health_pb2_grpc.HealthStub(channel)

        def serving() -> bool:
            try:
                return health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1
            except grpc.RpcError:
                return False

        wait_for(serving, 120, "the in-process worker serves")
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
        assert not server.is_alive() and result == [1]
        # Nothing listens any more: a router's health check and its requests fail fast.
        assert not serving()
        with pytest.raises(grpc.RpcError) as err:
            next(worker.Generate(request, timeout=5))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        stop.set()
        channel.close()
        server.join(timeout=30)


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
