"""A prefill worker reading a request's LoRA adapter from a slow disk is busy, not stalled.

A KV pull whose request waits on the prefill worker for its adapter's read used to receive nothing
for as long as the read took: the engine made no step, so no heartbeat went out (they need
`EngineLoop.progress`), and a read longer than the decode worker's idle timeout failed the request
as a stalled prefill worker. A wait on a read still within the adapter load timeout now counts as
progress; a read that hangs is bounded by that timeout instead, and the pull ends with its reason.

Both workers run in this process: the decode worker as `serve_worker` runs it, the prefill worker
built from its parts so that its adapter reads can be held.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc

from tandem_proto.v1 import worker_pb2 as wpb
from tandem_proto.v1 import worker_pb2_grpc as wgrpc
from tandem_worker.engine.llm_engine import LLMEngine
from tandem_worker.server.convert import model_id, params_from_pb
from tandem_worker.server.engine_loop import EngineLoop
from tandem_worker.server.worker_server import WorkerState
from tests.lora.conftest import adapter_store  # noqa: F401 - the fixture

from .kv_pull import prefill_server
from .procs import greedy
from .test_worker_in_process import in_process_worker

IDLE_TIMEOUT = 2.0  # the decode worker's: the prefill worker beats every 0.5 s
ADAPTER = "qv-r4"
PROMPT = list(range(2000, 2040))


@contextlib.contextmanager
def prefill_worker_with_held_reads(
    model_dir: Path, adapters: Path, load_timeout_s: float
) -> Iterator[tuple[str, threading.Event, LLMEngine]]:
    """A prefill worker whose adapter reads wait for the event it yields (a slow or hung disk)."""
    engine = LLMEngine(
        model=str(model_dir),
        kv_cache_bytes=64 * 2**20,
        detokenize=False,
        lora_load_timeout_s=load_timeout_s,
    )
    engine.lora.register(ADAPTER, adapters / ADAPTER)
    release = threading.Event()
    parse = engine.lora._parse

    def held_parse(name, path):  # on the loader thread, as the real read
        release.wait(120)
        return parse(name, path)

    engine.lora._parse = held_parse
    loop = EngineLoop(engine).start()
    state = WorkerState(engine, loop, "prefill", model_id(engine.model_dir))
    try:
        with prefill_server(state, threads=8) as address:
            try:
                yield address, release, engine
            finally:
                release.set()
    finally:
        loop.stop()


@contextlib.contextmanager
def decode_worker(model_dir: Path, adapters: Path) -> Iterator[grpc.Channel]:
    """A decode worker that can serve ADAPTER and gives up on a silent pull after IDLE_TIMEOUT."""
    with in_process_worker(
        "decode",
        model_dir,
        adapters={ADAPTER: str(adapters / ADAPTER)},
        kv_idle_timeout_s=IDLE_TIMEOUT,
    ) as (ch, _, _):
        yield ch


def generate(ch: grpc.Channel, prefill: str) -> list[int]:
    req = wpb.WorkerGenerateRequest(
        request_id="r", prompt_token_ids=PROMPT, sampling=greedy(6), prefill_endpoint=prefill, adapter=ADAPTER
    )
    return [t for m in wgrpc.WorkerStub(ch).Generate(req, timeout=120) for t in m.token_ids]


def reference(model_dir: Path, adapters: Path) -> list[int]:
    engine = LLMEngine(model=str(model_dir), kv_cache_bytes=64 * 2**20, detokenize=False)
    engine.lora.register(ADAPTER, adapters / ADAPTER)
    rid = engine.add_request(prompt_token_ids=PROMPT, params=params_from_pb(greedy(6)), adapter=ADAPTER)
    final = None
    while engine.has_unfinished():
        final = next((o for o in engine.step() if o.request_id == rid and o.finished), final)
    return final.token_ids


def test_a_pull_waiting_for_a_slow_adapter_read_outlives_the_idle_timeout(model_dir, adapter_store):  # noqa: F811
    with (
        prefill_worker_with_held_reads(model_dir, adapter_store, load_timeout_s=60.0) as (
            prefill,
            release,
            engine,
        ),
        decode_worker(model_dir, adapter_store) as ch,
    ):
        # The read takes three idle timeouts: the decode worker gave up after the first.
        threading.Timer(3 * IDLE_TIMEOUT, release.set).start()
        got = generate(ch, prefill)
        assert engine.lora.stats.loads == 1 and release.is_set()
    assert got == reference(model_dir, adapter_store)


def test_a_hung_adapter_read_ends_the_pull_at_the_load_timeout_with_its_reason(model_dir, adapter_store):  # noqa: F811
    """Heartbeats while a read hangs stop at the adapter load timeout, past which the request
    fails saying why, rather than as a stalled worker after the decode worker's idle timeout."""
    load_timeout = 2 * IDLE_TIMEOUT
    with (
        prefill_worker_with_held_reads(model_dir, adapter_store, load_timeout) as (prefill, _, engine),
        decode_worker(model_dir, adapter_store) as ch,
    ):
        try:
            generate(ch, prefill)
        except grpc.RpcError as e:
            err = e
        else:
            raise AssertionError("served with an adapter that was never read")
        assert f"loading took over {load_timeout:g} s" in err.details(), err.details()
        assert engine.lora.stats.loads == 0
