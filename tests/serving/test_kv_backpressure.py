"""A prefill worker's KV waiting for slow readers stays bounded, with a real engine on this process.

- Per request: each layer's KV goes to the request's stream as the engine computes it, and the
  KVTransfer servicer sends it at the reader's pace. A slow reader (a decode worker, its link) let
  the whole prompt's KV pile up in host memory. Past `kv_send_backlog_bytes` unsent, the request's
  next prompt chunk is held back (the sink itself never waits: it runs inside a step every request
  shares); the other requests run on, and the reader wakes the engine loop as it catches up.
- Per worker: past `kv_send_backlog_total_bytes` unsent over all requests, new pulls are refused as
  busy (RESOURCE_EXHAUSTED), which the decode worker passes on and the router answers by trying
  another prefill worker, or 429.
"""

from __future__ import annotations

from collections import defaultdict

import grpc
import pytest

from tandem_proto.v1 import worker_pb2 as wpb
from tandem_worker.engine.llm_engine import LLMEngine
from tandem_worker.engine.sampling_params import SamplingParams
from tandem_worker.server.engine_loop import EngineLoop, KVPiece
from tandem_worker.server.worker_server import WorkerState

from .kv_pull import prefill_puller, prefill_request, prefill_server
from .procs import wait_for

LAYERS = 30
TOKEN_KV = LAYERS * 2 * 3 * 64 * 4  # SmolLM2-135M's KV of one token in float32: 45 KiB


def test_a_slow_kv_reader_holds_back_its_own_prefill_and_not_the_others(model_dir):
    chunk = 16
    engine = LLMEngine(
        model=str(model_dir),
        kv_cache_bytes=32 * 2**20,
        max_num_batched_tokens=chunk,
        kv_send_backlog_bytes=4 * TOKEN_KV,
    )
    loop = EngineLoop(engine).start()
    try:
        prompt = list(range(100, 100 + 10 * chunk))
        slow = loop.submit(prompt, SamplingParams(max_tokens=1, temperature=0.0), "slow", kv_sink=True)
        # Nobody reads `slow` yet. Another request runs to its end meanwhile: 24 steps, in which the
        # whole prompt (10 chunks) would have been computed and its KV queued.
        params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
        other = loop.submit([1, 2, 3], params, "other")
        assert len(list(other)[-1].token_ids) == 24
        computed = loop.call(
            lambda: [s.num_computed_tokens for s in engine.scheduler.running if s.request_id == "slow"]
        )
        assert computed == [chunk], "computed KV for a reader that read none, past the limit"
        assert loop.kv_unsent_bytes == chunk * TOKEN_KV

        # The reader catches up: the prefill goes on to the end, its KV complete and in order.
        spans: dict[int, list[tuple[int, int]]] = defaultdict(list)
        outputs = []
        for ev in slow:
            if isinstance(ev, KVPiece):
                spans[ev.layer].append((ev.start, ev.key.shape[0]))
            else:
                outputs.append(ev)
        assert outputs[-1].finished and len(outputs[-1].token_ids) == 1
        for layer in range(LAYERS):
            starts = [s for s, _ in spans[layer]]
            assert starts == [sum(n for _, n in spans[layer][:i]) for i in range(len(starts))]
            assert sum(n for _, n in spans[layer]) == len(prompt)
        assert loop.kv_unsent_bytes == 0
    finally:
        loop.stop()


def test_a_prefill_worker_with_too_much_kv_unsent_refuses_new_pulls_as_busy(model_dir):
    engine = LLMEngine(
        model=str(model_dir), kv_cache_bytes=64 * 2**20, detokenize=False, kv_send_backlog_total_bytes=2**20
    )
    loop = EngineLoop(engine).start()
    state = WorkerState(engine, loop, "prefill", "model")

    def request(rid: str, n: int) -> wpb.PrefillRequest:
        return prefill_request(state.layout, rid, n)

    try:
        with prefill_server(state) as address, prefill_puller(address) as pull:
            # 512 tokens: 22 MiB of KV, far more than gRPC's windows take from a reader that stops.
            hog = pull(request("hog", 512), timeout=120)
            next(hog)  # the handshake; then this reader reads no more
            wait_for(lambda: loop.kv_unsent_bytes > 2**20, 120, "KV piles up for the reader that stopped")
            with pytest.raises(grpc.RpcError) as err:
                list(pull(request("refused", 8), timeout=60))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
            assert "KV wait for slow readers (the limit is 1 MiB)" in err.value.details()
            # The reader that left stops counting (its KV is dropped), and pulls are served again.
            hog.cancel()
            wait_for(lambda: loop.kv_unsent_bytes == 0, 30, "the cancelled pull's KV stops counting")
            assert list(pull(request("served", 8), timeout=60))[-1][0].last
    finally:
        loop.stop()
