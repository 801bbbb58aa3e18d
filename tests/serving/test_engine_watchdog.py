"""A worker whose engine is stuck says so; one that is idle, or waits on others, does not.

A step that never returns (a CUDA kernel or NCCL call, a deadlock) left the worker's port open and
its gRPC threads answering: its health stayed SERVING, the router kept sending it work and its TCP
liveness probe passed, so nothing restarted it while every request it took timed out. The engine
watchdog calls the engine stuck once one step with work to do has made no progress for the stall
timeout: the worker then refuses new requests (UNAVAILABLE), reports NOT_SERVING for "" (the
router's checks, readiness) and for the liveness service (a Kubernetes gRPC liveness probe, so the
kubelet restarts it), and logs what the engine was doing; it serves again if the step returns.

The loop-level tests move an injected clock by hand (no timed assertions); the in-process worker
tests hang a real step and wait for the health to change.
"""

from __future__ import annotations

import logging
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tandem_proto.v1 import worker_pb2 as wpb
from tandem_proto.v1 import worker_pb2_grpc as wgrpc
from tandem_worker.cli import build_parser
from tandem_worker.engine.llm_engine import LLMEngine
from tandem_worker.engine.model_runner import ModelRunner
from tandem_worker.engine.sampling_params import SamplingParams
from tandem_worker.server.engine_loop import ENGINE_STALL_TIMEOUT_S, EngineLoop, EngineWatchdog, KVBacklog
from tandem_worker.server.health import LIVENESS_SERVICE

from .procs import greedy, wait_for
from .test_worker_in_process import in_process_worker

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
PARAMS = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


class Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Hang:
    """Makes the model's forward pass (the step's device work) block while `on` is set."""

    def __init__(self) -> None:
        self.on, self.entered, self.release = threading.Event(), threading.Event(), threading.Event()

    def wrap(self, execute):
        def hung_execute(*args, **kwargs):
            if self.on.is_set():
                self.entered.set()
                self.release.wait(60)  # a kernel that never returns, until the test lets it
            return execute(*args, **kwargs)

        return hung_execute


def error_records(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.ERROR and "engine stuck" in r.getMessage()
    ]


def test_a_step_that_never_returns_is_a_stall_until_it_returns(model_dir, monkeypatch, caplog):
    caplog.set_level(logging.ERROR, logger="tandem_worker.server.engine_loop")
    clock, hang = Clock(), Hang()
    engine = LLMEngine(model=str(model_dir), kv_cache_bytes=32 * 2**20)
    monkeypatch.setattr(engine.runner, "execute", hang.wrap(engine.runner.execute))
    loop = EngineLoop(engine, clock=clock).start()
    changes: list = []
    watchdog = EngineWatchdog(loop, 30.0, changes.append)  # not started: the test looks by hand
    try:
        assert len(list(loop.submit([1, 2, 3], PARAMS, "done"))) == 4
        clock.now += 1e6  # idle for a million seconds: alive
        assert watchdog.check() is None

        hang.on.set()
        stream = loop.submit([4, 5, 6, 7, 8], PARAMS, "hung")
        assert hang.entered.wait(30)
        clock.now += 29.0
        assert watchdog.check() is None  # a slow step, not yet a stuck one
        clock.now += 2.0
        stall = watchdog.check()
        assert stall is not None and stall.seconds == 31.0
        assert stall.doing == "a step with 1 request (1 prefilling)"
        assert changes == [stall]
        [error] = error_records(caplog)
        assert "a step with 1 request (1 prefilling), no progress for 31.0 s" in error
        assert "in hung_execute" in error  # the loop thread's stack: the call that does not return

        clock.now += 100.0
        assert watchdog.check() is not None and len(changes) == 1  # one report per stall
        assert len(error_records(caplog)) == 1

        hang.on.clear()
        hang.release.set()
        assert sum(len(o.new_token_ids) for o in stream) == 4
        # Its last step is over (`_busy` is cleared before outputs go out) and nothing is left.
        assert watchdog.check() is None
        assert changes == [stall, None]
    finally:
        hang.release.set()
        loop.stop()


def test_kv_computed_within_a_long_step_restarts_the_clock(model_dir, monkeypatch):
    """A prefill worker's long chunk (a slow CPU) hands each layer's KV out as it is computed:
    progress within the step, which is slow but not stuck."""
    clock = Clock()
    reached, release = threading.Event(), threading.Event()
    put = KVBacklog.put

    def timed_put(self, stream, piece):
        if piece.layer == 3:
            clock.now += 100.0  # layers 0 to 2 took 100 s
        put(self, stream, piece)
        if piece.layer == 3:
            reached.set()
            release.wait(60)  # layer 4 never comes

    monkeypatch.setattr(KVBacklog, "put", timed_put)
    engine = LLMEngine(model=str(model_dir), kv_cache_bytes=32 * 2**20, detokenize=False)
    loop = EngineLoop(engine, clock=clock).start()
    try:
        loop.submit(list(range(10, 60)), SamplingParams(max_tokens=1), "kv", kv_sink=True)
        assert reached.wait(30)
        assert loop.stall(50.0) is None  # 100 s into the step, but layer 3 just came out
        clock.now += 50.0
        stall = loop.stall(50.0)
        assert stall is not None and stall.seconds == 50.0 and "1 prefilling" in stall.doing
    finally:
        release.set()
        loop.stop()


def test_a_loop_with_nothing_it_can_do_is_never_stalled(model_dir, monkeypatch):
    """Idle, or holding requests that wait for KV from a prefill worker (and one queued behind their
    blocks): no step can do anything, however long, and the engine is not stuck."""
    clock = Clock()
    engine = LLMEngine(model=str(model_dir), kv_cache_bytes=8 * 16 * 2 * 30 * 3 * 64 * 4)  # 8 blocks
    steps: list[int] = []
    step = engine.step
    monkeypatch.setattr(engine, "step", lambda: steps.append(1) or step())
    loop = EngineLoop(engine, clock=clock).start()
    watchdog = EngineWatchdog(loop, 1.0, lambda stall: pytest.fail(f"reported stuck: {stall}"))

    def steps_on() -> None:
        seen = len(steps)
        wait_for(lambda: len(steps) >= seen + 2, 30, "the loop steps on", interval=0.01)

    def after_a_long_wait() -> None:
        steps_on()  # the loop has taken in what was submitted
        clock.now += 1e6
        steps_on()  # whatever step it is in now began after the clock moved
        assert loop.stall(1.0) is None and watchdog.check() is None

    try:
        after_a_long_wait()
        holder = loop.submit(list(range(100, 200)), PARAMS, "in-transit", remote_kv=True)
        next(iter(holder))  # KVReserved: 7 of 8 blocks, its KV never arrives
        loop.submit(list(range(300, 340)), PARAMS, "waiting", remote_kv=True)  # for blocks
        after_a_long_wait()
        assert loop.num_in_flight == 2
    finally:
        loop.stop()


def check(channel: grpc.Channel, service: str = "") -> int:
    """The worker's health for `service`; NOT_SERVING when it cannot be asked."""
    try:
        return (
            health_pb2_grpc.HealthStub(channel)
            .Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            .status
        )
    except grpc.RpcError:
        return NOT_SERVING


def test_a_worker_whose_engine_hangs_is_neither_ready_nor_live_until_it_moves(model_dir, monkeypatch, caplog):
    caplog.set_level(logging.ERROR, logger="tandem_worker.server.engine_loop")
    hang = Hang()
    monkeypatch.setattr(ModelRunner, "execute", hang.wrap(ModelRunner.execute))
    with in_process_worker("colocated", model_dir, engine_stall_timeout_s=0.5) as (channel, thread, _):
        worker = wgrpc.WorkerStub(channel)
        assert check(channel) == SERVING and check(channel, LIVENESS_SERVICE) == SERVING

        hang.on.set()
        request = wpb.WorkerGenerateRequest(request_id="hung", prompt_token_ids=[1, 2, 3], sampling=greedy(6))
        stuck = worker.Generate(request, timeout=120)
        assert hang.entered.wait(60)
        wait_for(lambda: check(channel) == NOT_SERVING, 60, "health NOT_SERVING")
        # The kubelet's liveness probe asks this name: it fails, and the pod is restarted.
        assert check(channel, LIVENESS_SERVICE) == NOT_SERVING
        assert check(channel, "tandem.v1.Worker") == NOT_SERVING
        # New work is refused at once (the router retries it elsewhere), not queued behind the step.
        refused = wpb.WorkerGenerateRequest(request_id="new", prompt_token_ids=[4, 5], sampling=greedy(2))
        with pytest.raises(grpc.RpcError) as err:
            list(worker.Generate(refused, timeout=60))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "engine stuck: a step with 1 request (1 prefilling)" in err.value.details()
        [error] = error_records(caplog)
        assert "a step with 1 request (1 prefilling), no progress for" in error

        hang.on.clear()
        hang.release.set()
        assert sum(len(m.token_ids) for m in stuck) == 6  # the stuck request goes on
        wait_for(lambda: check(channel) == SERVING, 60, "health SERVING again")
        assert check(channel, LIVENESS_SERVICE) == SERVING
        assert sum(len(m.token_ids) for m in worker.Generate(refused, timeout=60)) == 2
        assert thread.is_alive() and len(error_records(caplog)) == 1


def test_a_draining_worker_is_not_ready_but_still_live(model_dir, monkeypatch):
    """Liveness asks only "is the engine stuck": a worker that drains (SIGTERM, a scale-down) lets its
    requests finish and must not be restarted meanwhile."""
    from tandem_worker.engine.config import EngineConfig
    from tandem_worker.server.local import free_port
    from tandem_worker.server.worker_main import serve_worker

    from .procs import HOST, KV_BYTES

    step = LLMEngine.step
    monkeypatch.setattr(LLMEngine, "step", lambda self: threading.Event().wait(0.02) or step(self))
    port, stop = free_port(), threading.Event()
    config = EngineConfig(model=str(model_dir), kv_cache_bytes=KV_BYTES)
    thread = threading.Thread(
        target=serve_worker, args=("colocated", config, HOST, port), kwargs={"stop_event": stop}, daemon=True
    )
    thread.start()
    channel = grpc.insecure_channel(f"{HOST}:{port}")
    try:
        wait_for(lambda: check(channel) == SERVING, 120, "the worker serves")
        assert check(channel, LIVENESS_SERVICE) == SERVING
        request = wpb.WorkerGenerateRequest(request_id="long", prompt_token_ids=[1, 2], sampling=greedy(1000))
        stream = wgrpc.WorkerStub(channel).Generate(request, timeout=120)
        assert next(stream).token_ids
        stop.set()  # SIGTERM: drain while "long" is in flight
        wait_for(lambda: check(channel) == NOT_SERVING, 30, "draining: NOT_SERVING")
        assert check(channel, LIVENESS_SERVICE) == SERVING
        stream.cancel()  # the drain is over
        thread.join(timeout=30)
        assert not thread.is_alive()
    finally:
        stop.set()
        channel.close()
        thread.join(timeout=30)


@pytest.mark.parametrize(("flag", "expected"), [([], None), (["--engine-stall-timeout", "45"], 45.0)])
def test_the_stall_timeout_flag(flag, expected):
    args = build_parser().parse_args(["worker", "--role", "decode", *flag])
    assert args.engine_stall_timeout == expected
    assert ENGINE_STALL_TIMEOUT_S == 120.0  # what None means (serve_worker)


@pytest.mark.parametrize("value", ["-1", "nan", "soon"])
def test_a_bad_stall_timeout_is_refused_before_anything_starts(value, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["worker", "--role", "decode", "--engine-stall-timeout", value])
    assert exit_.value.code == 2 and "--engine-stall-timeout" in capsys.readouterr().err
