"""The CUDA-graph decode path's bookkeeping, on any machine.

Off CUDA, `DecodeGraphs` replays a stand-in that re-runs the captured call on the same static
buffers, so everything but the capture itself is checked here: padding batches up to a captured
size, the pinned-buffer inputs, padding rows writing no KV (slot -1), and logits rows matching
their sequences. The real capture is measured on a GPU (benchmarks/bench_gpu.py).
"""

from __future__ import annotations

import pytest
import torch

from tandem_worker.engine.cuda_graphs import DecodeGraphs
from tandem_worker.engine.llm_engine import LLMEngine
from tandem_worker.engine.sampling_params import SamplingParams

from .conftest import run_all

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "List three colors:",
    "Water boils at",
]
MAX_TOKENS = [12, 8, 5, 12, 3]  # the batch shrinks 5 -> 4 -> 3 -> 2 as requests finish


@pytest.fixture(scope="module")
def graph_engine(model_dir) -> LLMEngine:
    engine = LLMEngine(model=str(model_dir), kv_cache_bytes=64 * 2**20)
    runner = engine.runner
    max_blocks = -(-engine.max_model_len // runner.block_size)
    runner.graphs = DecodeGraphs(runner.model, runner.kv_cache, 8, max_blocks)
    runner.graphs.capture()
    return engine


def test_graph_decode_equals_eager_decode(graph_engine, engine, monkeypatch):
    replays: list[int] = []
    original = DecodeGraphs.run

    def counting_run(self, input_ids, *args):
        replays.append(len(input_ids))
        return original(self, input_ids, *args)

    monkeypatch.setattr(DecodeGraphs, "run", counting_run)
    results = {}
    for e in (graph_engine, engine):
        ids = [
            e.add_request(p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
            for p, n in zip(PROMPTS, MAX_TOKENS)
        ]
        out = run_all(e)
        results[e] = [out[i].token_ids for i in ids]
    assert results[graph_engine] == results[engine]
    assert [len(t) for t in results[graph_engine]] == MAX_TOKENS
    # Decode steps went through the graphs, at batch sizes that are not captured sizes too (5, 3).
    assert {5, 3} <= set(replays) and max(replays) == 5


def test_padding_rows_write_no_kv(graph_engine):
    kv = graph_engine.runner.kv_cache
    before = kv.clone()
    g = graph_engine.runner.graphs
    # Three rows run as the captured batch of 4: one padding row.
    logits = g.run([5, 6, 7], [0, 1, 2], [16, 17, 18], [[1], [1], [1]])
    assert logits.shape[0] == 3 and torch.isfinite(logits).all()
    changed = (kv != before).flatten(start_dim=4).any(-1)  # [2, layers, blocks, block_size]
    # Exactly the three real rows' slots (block 1, offsets 0..2) changed; the padding row wrote nothing.
    assert changed.nonzero()[:, 2:].unique(dim=0).tolist() == [[1, 0], [1, 1], [1, 2]]


def test_block_table_rows_follow_growth_reordering_and_preemption(model_dir):
    # DecodeGraphs rewrites a row of its block-table buffer only when the row's table or its length
    # changed. Here tables grow by a block every 16 tokens at different steps, finished requests
    # move the others to other rows, and a KV cache of 6 blocks preempts requests, which come back
    # with new tables: any stale row reads another block's KV and changes the greedy tokens.
    # Preemption is what this test needs: the admission watermark (a free block per running
    # sequence) would avoid most of it.
    engine = LLMEngine(
        model=str(model_dir),
        kv_cache_bytes=6 * 737_280,
        enable_prefix_caching=False,
        admission_watermark_blocks_per_seq=0,
    )
    assert engine.block_manager.num_blocks == 6
    prompts = ["Hi", "The capital of France is", "def fibonacci(n):", "List three colors:"]
    max_tokens = [40, 22, 34, 28]

    def generate() -> list[list[int]]:
        ids = [
            engine.add_request(p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
            for p, n in zip(prompts, max_tokens)
        ]
        out = run_all(engine)
        return [out[i].token_ids for i in ids]

    eager = generate()
    preempted_eagerly = engine.stats()["preemptions"]
    runner = engine.runner
    max_blocks = -(-engine.max_model_len // runner.block_size)
    runner.graphs = DecodeGraphs(runner.model, runner.kv_cache, 4, max_blocks)
    runner.graphs.capture()
    replays: list[int] = []
    original = runner.graphs.run
    runner.graphs.run = lambda ids, *args: replays.append(len(ids)) or original(ids, *args)
    assert generate() == eager
    assert preempted_eagerly > 0 and engine.stats()["preemptions"] == 2 * preempted_eagerly
    assert len(replays) > 30 and {4, 3} <= set(replays)


def test_every_graph_writes_its_logits_into_one_shared_buffer(graph_engine):
    # One [max batch, vocab] buffer for all graphs, not an output per graph (about 0.65 GB more at
    # Llama-3-8B's vocabulary with sizes up to 256); each replay's rows are its batch's logits.
    g = graph_engine.runner.graphs
    table = [[2]]
    first = g.run([5], [0], [32], table)
    assert first.data_ptr() == g.logits.data_ptr() and first.shape[0] == 1
    first = first.clone()
    five = g.run([7, 8, 9, 10, 11], [0, 0, 0, 0, 0], [33, 34, 35, 36, 37], table * 5)
    assert five.data_ptr() == g.logits.data_ptr() and five.shape[0] == 5
    assert g.logits.shape[0] == g.max_batch  # the largest batch's rows, shared by every size
    again = g.run([5], [0], [32], table)
    assert torch.equal(first, again) and not torch.equal(first, g.logits[1:2])
