"""A prefill worker can bound the prompt tokens queued on it: past the bound, new pulls are busy.

Heartbeats keep a KV pull queued on a busy prefill worker alive for as long as its engine works, so
its wait was bounded only by the client's deadline, all the while holding the blocks its decode
worker reserved for the prompt. With `max_queued_prefill_tokens`, a pull whose prompt would take
the worker's unfinished prompts past it is refused as busy (RESOURCE_EXHAUSTED), which the decode
worker passes on and the router answers by trying another prefill worker (or with 429). An idle
worker takes any prompt: refused there, it would be refused everywhere.
"""

from __future__ import annotations

import grpc
import pytest

from tandem_proto.v1 import worker_pb2 as wpb
from tandem_worker.engine.llm_engine import LLMEngine
from tandem_worker.server.engine_loop import EngineLoop
from tandem_worker.server.worker_server import WorkerState

from .kv_pull import prefill_puller, prefill_request, prefill_server
from .procs import wait_for

LIMIT = 100


def test_a_prefill_worker_refuses_pulls_past_its_queued_prompt_tokens_as_busy(model_dir):
    engine = LLMEngine(
        model=str(model_dir),
        kv_cache_bytes=64 * 2**20,
        detokenize=False,
        max_num_batched_tokens=16,
        kv_send_backlog_bytes=1,  # a reader that reads nothing holds its prompt back after a chunk
    )
    loop = EngineLoop(engine, max_queued_prefill_tokens=LIMIT).start()
    state = WorkerState(engine, loop, "prefill", "model")

    def request(rid: str, n: int, skip: int = 0) -> wpb.PrefillRequest:
        return prefill_request(state.layout, rid, n, skip)

    try:
        with prefill_server(state) as address, prefill_puller(address, small_windows=True) as pull:
            queued = pull(request("queued", 80), timeout=120)
            next(queued)  # the handshake; its reader reads no more for now, so it stays unfinished
            assert loop.queued_prefill_tokens == 80
            with pytest.raises(grpc.RpcError) as err:
                list(pull(request("refused", 30), timeout=60))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
            assert f"80 prompt tokens queued for prefill; 30 more would pass the limit of {LIMIT}" in (
                err.value.details()
            )
            # What the decode worker holds already is not prefilled, and does not count.
            assert list(pull(request("fits", 40, skip=20), timeout=60))[-1][0].last
            assert loop.queued_prefill_tokens == 80

            assert list(queued)[-1][0].last  # its reader catches up, and it ends
            wait_for(lambda: loop.queued_prefill_tokens == 0, 30, "the finished pull stops counting")
            # Alone, a prompt longer than the bound is served.
            assert list(pull(request("long", 3 * LIMIT), timeout=120))[-1][0].last
            assert loop.queued_prefill_tokens == 0
    finally:
        loop.stop()
