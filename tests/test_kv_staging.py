"""Prefill-side KV staging and the decode-side writer around it.

On CPU: the engine's sinks get the exact KV and `ready=None`, KVWriter.finish() changes nothing,
and bfloat16 (a CUDA cache's dtype) survives the wire. The CUDA tests run only where a GPU is.
"""

from __future__ import annotations

import pytest
import torch

from tandem_proto.v1 import worker_pb2 as wpb
from tandem_worker.engine.kv_staging import KVStager, slot_indices
from tandem_worker.engine.llm_engine import LLMEngine
from tandem_worker.engine.sampling_params import SamplingParams
from tandem_worker.server.kv_transfer import KVWriter, decode_kv_chunk, encode_kv_chunk, kv_chunks

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def chunked_engine(model_dir) -> LLMEngine:
    # A small step budget, so one prompt's prefill spans several steps (pieces with start > 0).
    return LLMEngine(model=str(model_dir), kv_cache_bytes=64 * 2**20, max_num_batched_tokens=32)


def test_slot_indices_follow_the_block_table():
    table, bs = [7, 2, 9], 4
    assert slot_indices(table, 3, 10, bs).tolist() == [table[p // bs] * bs + p % bs for p in range(3, 10)]


def test_cpu_sink_gets_the_exact_kv_and_no_ready(chunked_engine):
    engine = chunked_engine
    prompt = list(range(100, 180))  # 80 tokens: 3 prefill steps of at most 32
    pieces = []

    def sink(layer, start, key, value, ready):
        # Compare with the cache now: the blocks are freed (and may be reused) once the request ends.
        seq = engine._requests[rid].seq
        slots = slot_indices(seq.block_table, start, start + key.shape[0], engine.config.block_size)
        kv = engine.runner.kv_cache
        heads, dim = kv.shape[-2:]
        assert ready is None
        assert torch.equal(key, kv[0, layer].view(-1, heads, dim)[slots])
        assert torch.equal(value, kv[1, layer].view(-1, heads, dim)[slots])
        assert key.untyped_storage().data_ptr() != kv.untyped_storage().data_ptr(), "fresh tensors"
        pieces.append((layer, start, key.shape[0]))

    rid = engine.add_request(prompt_token_ids=prompt, params=SamplingParams(max_tokens=1), kv_sink=sink)
    while engine.has_unfinished():
        engine.step()
    layers = engine.model_config.num_hidden_layers
    for layer in range(layers):
        ranges = [(s, n) for l_, s, n in pieces if l_ == layer]
        assert [s for s, _ in ranges] == [0, 32, 64] and sum(n for _, n in ranges) == len(prompt)


def test_writer_finish_is_a_no_op_on_cpu():
    cache = torch.zeros(2, 2, 6, 4, 2, 8)
    table = [5, 0, 3]
    k, v = torch.randn(12, 2, 8), torch.randn(12, 2, 8)
    writer = KVWriter(cache, table, 4)
    for data in kv_chunks(1, 0, k, v, max_tokens=5):
        writer.write(*decode_kv_chunk(data))
    before = cache.clone()
    writer.finish()
    assert torch.equal(cache, before)
    slots = slot_indices(table, 0, 12, 4)
    assert torch.equal(cache[0, 1].view(-1, 2, 8)[slots], k)
    assert torch.equal(cache[1, 1].view(-1, 2, 8)[slots], v)


def test_bfloat16_kv_round_trips_over_the_wire():
    k = torch.randn(7, 3, 4).to(torch.bfloat16)
    v = torch.randn(7, 3, 4).to(torch.bfloat16)
    data = encode_kv_chunk(wpb.KVChunk(layer=0, token_start=0, num_tokens=7), k, v)
    parsed = wpb.KVChunk.FromString(data)
    assert parsed.key == k.view(torch.int16).numpy().tobytes()
    cache = torch.zeros(2, 1, 4, 4, 3, 4, dtype=torch.bfloat16)
    writer = KVWriter(cache, [2, 0], 4)
    writer.write(*decode_kv_chunk(data))
    writer.finish()
    slots = slot_indices([2, 0], 0, 7, 4)
    assert torch.equal(cache[0, 0].view(-1, 3, 4)[slots], k)
    assert torch.equal(cache[1, 0].view(-1, 3, 4)[slots], v)


@pytest.mark.parametrize(
    "layer, start, n",
    [(2, 0, 2), (0, 7, 2)],  # a layer the cache lacks; tokens past the reserved blocks
)
def test_writer_refuses_a_chunk_outside_the_reservation(layer, start, n):
    cache = torch.zeros(2, 2, 4, 4, 2, 8)
    writer = KVWriter(cache, [0, 1], 4)
    header, key, value = decode_kv_chunk(
        encode_kv_chunk(
            wpb.KVChunk(layer=layer, token_start=start, num_tokens=n),
            torch.randn(n, 2, 8),
            torch.randn(n, 2, 8),
        )
    )
    with pytest.raises(ValueError, match="outside the reserved cache"):
        writer.write(header, key, value)
    assert cache.abs().sum() == 0


def test_stager_on_cpu_gathers_directly_and_is_ready_at_once():
    # Standalone use (the benchmark's CPU smoke run); the engine itself passes ready=None on CPU.
    cache = torch.randn(2, 3, 6, 4, 2, 8)
    slots = slot_indices([5, 0, 3], 2, 11, 4)
    key, value, ready = KVStager("cpu").stage(cache, 2, slots)
    ready.synchronize()
    assert torch.equal(key, cache[0, 2].view(-1, 2, 8)[slots])
    assert torch.equal(value, cache[1, 2].view(-1, 2, 8)[slots])


# --- CUDA only -------------------------------------------------------------------------------


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_stager_copies_the_slots_to_pinned_host_memory(dtype):
    dev = torch.device("cuda")
    cache = torch.randn(2, 3, 16, 8, 2, 64, device=dev).to(dtype)
    slots = slot_indices([11, 3, 7, 0], 5, 29, 8)
    want = cache[:, 1].cpu().view(2, -1, 2, 64)[:, slots]
    key, value, ready = KVStager(dev).stage(cache, 1, slots.to(dev))
    ready.synchronize()
    assert key.is_pinned() and value.is_pinned()
    assert key.dtype == dtype and key.shape == value.shape == (24, 2, 64)
    assert torch.equal(key, want[0]) and torch.equal(value, want[1])


@cuda
def test_stager_snapshot_matches_the_cache_at_stage_time():
    dev = torch.device("cuda")
    cache = torch.randn(2, 4, 32, 16, 4, 128, device=dev, dtype=torch.bfloat16)
    slots = slot_indices(list(range(31, -1, -3)), 0, 150, 16).to(dev)
    want_k = cache[0, 2].view(-1, 4, 128).index_select(0, slots).cpu()
    want_v = cache[1, 2].view(-1, 4, 128).index_select(0, slots).cpu()
    stager = KVStager(dev)
    got = [stager.stage(cache, 2, slots) for _ in range(3)]
    cache.fill_(0)  # queued after the gathers on the compute stream: must not change what was staged
    for key, value, ready in got:
        ready.synchronize()
        assert torch.equal(key, want_k) and torch.equal(value, want_v)


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_writer_matches_the_cpu_writer(dtype):
    layers, blocks, bs, heads, dim = 3, 12, 16, 4, 64
    table = [9, 2, 11, 4, 0, 7]
    k = torch.randn(90, heads, dim).to(dtype)
    v = torch.randn(90, heads, dim).to(dtype)
    msgs = [decode_kv_chunk(m) for layer in range(layers) for m in kv_chunks(layer, 0, k, v, max_tokens=32)]
    cpu = torch.zeros(2, layers, blocks, bs, heads, dim, dtype=dtype)
    gpu = torch.zeros_like(cpu, device="cuda")
    for cache in (cpu, gpu):
        writer = KVWriter(cache, table, bs)
        for header, key, value in msgs:
            writer.write(header, key, value)
        writer.finish()
        assert writer.bytes == 2 * layers * k.numel() * k.element_size()
    assert torch.equal(gpu.cpu(), cpu)
