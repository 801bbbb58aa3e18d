"""LoRA decode steps replayed from CUDA graphs: outputs equal PEFT's, adapters changing under the graph.

Off CUDA, `DecodeGraphs` replays a stand-in that re-runs the captured call on the same static
buffers (tests/engine/test_decode_graphs.py), so what is checked here is everything but the capture
itself: the step's token groups filled into the static LoRA buffers, the tiled launch's metadata,
adapters loaded, evicted and moved after a graph was captured (the offset tables are updated in
place), the recapture after the tables grow, and the eager fallback for a rank above the graph's.
The kernels under the graph are the torch references here; the Triton kernels of the same layout
are checked in tests/lora/test_lora_batch.py and tests/kernels/test_lora_kernels.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tandem_worker.engine.cuda_graphs import DecodeGraphs
from tandem_worker.engine.llm_engine import LLMEngine
from tandem_worker.engine.lora_fold import fold_layers
from tests.engine.conftest import run_all
from tests.engine.test_engine_vs_hf import assert_matches
from tests.lora.conftest import GREEDY

MAX_BATCH = 8


@pytest.fixture(scope="module")
def graph_engine(model_dir: Path, adapter_store: Path) -> LLMEngine:
    engine = LLMEngine(model=str(model_dir), kv_cache_bytes=400 * 2**20, lora_store=str(adapter_store))
    runner = engine.runner
    max_blocks = -(-engine.max_model_len // runner.block_size)
    runner.graphs = DecodeGraphs(runner.model, runner.kv_cache, MAX_BATCH, max_blocks)
    runner.graphs.capture()
    # As a worker with an adapter store does (LLMEngine on CUDA): the LoRA graphs at start-up.
    runner.graphs.use_lora(engine.lora, 32)
    runner.graphs.capture_lora()
    return engine


@pytest.fixture
def replays(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, bool]]:
    """(rows, with adapters) of every decode step replayed from a graph."""
    calls: list[tuple[int, bool]] = []
    original = DecodeGraphs.run

    def spy(self, input_ids, positions, slots, tables, lora_slots=None):
        calls.append((len(input_ids), lora_slots is not None))
        return original(self, input_ids, positions, slots, tables, lora_slots)

    monkeypatch.setattr(DecodeGraphs, "run", spy)
    return calls


def generate(engine: LLMEngine, requests: list[tuple[str | None, int]], prompt_ids) -> dict:
    ids = {
        engine.add_request(prompt_token_ids=prompt_ids[i], params=GREEDY, adapter=name): (name, i)
        for name, i in requests
    }
    final = run_all(engine)
    return {key: final[rid] for rid, key in ids.items()}


def check(results: dict, peft_references) -> None:
    notes: list[str] = []
    for (name, i), out in results.items():
        assert out.error is None
        assert_matches(f"{name}/prompt{i}", out.token_ids, peft_references[(name, i)], notes)


def test_decode_steps_mixing_adapters_replay_graphs_and_match_peft(
    graph_engine, prompt_ids, peft_references, replays, monkeypatch
):
    # Ranks 4 to 32 (stacked q, k, v up to 48, within the graph's 3 x 32) and the base model: batches
    # of up to 7 rows (the adapters load while earlier requests run), padded to captured sizes.
    requests = [(None, 0), ("qv-r4", 1), ("all-r16", 2), ("mlp-r32", 0), ("all-r16", 1), ("attn-r8", 2)]
    requests.append(("pattern-r16", 0))
    graphs = graph_engine.runner.graphs
    assert set(graphs._lora_graphs) == set(graphs.sizes), "not every LoRA graph was captured at start-up"
    captures = []
    original = DecodeGraphs._capture
    monkeypatch.setattr(DecodeGraphs, "_capture", lambda self, *a: captures.append(a) or original(self, *a))
    check(generate(graph_engine, requests, prompt_ids), peft_references)
    assert not captures, "a graph was captured while serving"
    assert any(lora for _, lora in replays), "no decode step replayed a LoRA graph"
    assert {rows for rows, lora in replays if lora} & {3, 5, 6, 7}, "no LoRA step had padding rows"


def test_a_graph_reads_adapters_loaded_after_its_capture(graph_engine, prompt_ids, peft_references, replays):
    # The graph for 8 rows was captured above. Unloading those adapters frees their slots and blocks;
    # new adapters take them with other offsets and ranks, which the graph must read, not the old ones.
    lora = graph_engine.lora
    for name in ("qv-r4", "all-r16", "mlp-r32", "attn-r8", "pattern-r16"):
        lora.unload(name)
    version = lora.tables.version
    requests = [("all-r4", 0), ("k-up-rslora-r8", 1), ("all-r4", 2), (None, 1), ("attn-r8", 0)]
    requests += [("qv-r4", 2), ("mlp-r32", 1)]
    check(generate(graph_engine, requests, prompt_ids), peft_references)
    assert lora.tables.version == version, "the tables grew: this test would not test in-place updates"
    assert any(lora for _, lora in replays)


def test_graphs_are_captured_again_when_the_tables_grow(graph_engine, prompt_ids, peft_references, replays):
    lora = graph_engine.lora
    graphs = graph_engine.runner.graphs
    old = dict(graphs._lora_graphs)
    assert old, "no LoRA graph was captured before"
    assert lora.tables.capacity == 64  # sized at start-up for the graphs
    lora.tables.grow(2 * lora.tables.capacity)  # new device tables: the old graphs read freed memory
    requests = [("all-r16", 0), ("qv-r4", 1), (None, 2), ("mlp-r32", 2)]
    check(generate(graph_engine, requests, prompt_ids), peft_references)
    assert graphs._lora_version == lora.tables.version
    assert graphs._lora_graphs and all(g is not old.get(bs) for bs, g in graphs._lora_graphs.items())


def test_an_adapter_of_a_larger_rank_runs_eagerly(graph_engine, prompt_ids, peft_references, replays):
    # qv-r128 stacks q, k and v to rank 256, past the graph's 3 x 32: its steps run eagerly, the
    # others' still replay graphs.
    check(generate(graph_engine, [("qv-r128", 0), ("all-r16", 1)], prompt_ids), peft_references)
    assert not replays
    check(generate(graph_engine, [("all-r16", 0), ("qv-r4", 1)], prompt_ids), peft_references)
    assert replays and all(lora for _, lora in replays)


def test_a_steps_host_to_device_copies_can_run_asynchronously(graph_engine, prompt_ids, replays, monkeypatch):
    # On CUDA a copy out of pinned memory is asynchronous only when it is a plain memcpy: same dtype,
    # both sides contiguous. A slice of the block tables or an int64 -> int32 copy goes through a
    # pageable temporary instead, and the host waits for the device at every step. Checked here on
    # the copies themselves, since the CPU has no asynchrony to observe.
    graphs = graph_engine.runner.graphs
    host_buffers = (graphs._host, graphs._host_tables, graphs._lora_host_indices, graphs._lora_host_i32)
    host = {t.untyped_storage().data_ptr() for t in host_buffers}
    copies: list[tuple[torch.dtype, torch.dtype, bool, bool, bool]] = []
    original = torch.Tensor.copy_

    def spy(dst: torch.Tensor, src: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
        if src.untyped_storage().data_ptr() in host:
            copies.append((dst.dtype, src.dtype, dst.is_contiguous(), src.is_contiguous(), non_blocking))
        return original(dst, src, non_blocking)

    monkeypatch.setattr(torch.Tensor, "copy_", spy)
    # Three rows in a graph of 4, one without an adapter: padding rows and groups are filled too.
    generate(graph_engine, [("all-r16", 0), (None, 1), ("qv-r4", 2)], prompt_ids)
    generate(graph_engine, [(None, 0)], prompt_ids)
    assert any(lora for _, lora in replays) and any(not lora for _, lora in replays)
    assert len(copies) >= 2 * len(replays)  # the step's rows and tables, then the LoRA groups
    bad = [c for c in copies if not (c[0] == c[1] and all(c[2:]))]
    assert not bad, f"host-to-device copies that would block: {bad[:4]}"


# --- the LoRA shrink folded into the base GEMMs (lora_fold.py) ----------------------------------

FOLD_RANK = 40  # extra rows per part: qkv 120, o 40, gate_up 80, down 40


@pytest.fixture(scope="module")
def fold_engine(model_dir: Path, adapter_store: Path) -> LLMEngine:
    """graph_engine's setup with folding, and dense weights: the CPU's packed weight layout
    (model.CPU_PREPACK) has no rows to append to."""
    from tandem_worker.engine import model as model_module

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(model_module, "CPU_PREPACK", False)
        engine = LLMEngine(model=str(model_dir), kv_cache_bytes=400 * 2**20, lora_store=str(adapter_store))
    runner = engine.runner
    # In ModelRunner's order on CUDA: the weights move into their folded buffers first, then the
    # base graphs are captured, once (they read the weights' storage).
    folded = fold_layers(runner.model.layers, FOLD_RANK)
    max_blocks = -(-engine.max_model_len // runner.block_size)
    runner.graphs = DecodeGraphs(runner.model, runner.kv_cache, MAX_BATCH, max_blocks)
    runner.graphs.capture()
    runner.graphs.use_lora(engine.lora, 32, folded)
    runner.graphs.capture_lora()
    return engine


@pytest.fixture
def lora_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How many projections ran folded (lora_apply_finish) and unfolded (lora_apply_begin)."""
    import tandem_kernels

    calls = {"folded": 0, "unfolded": 0}
    for name, key in (("lora_apply_finish", "folded"), ("lora_apply_begin", "unfolded")):
        original = getattr(tandem_kernels, name)

        def spy(*args, _original=original, _key=key, **kwargs):
            calls[_key] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(tandem_kernels, name, spy)
    return calls


def test_folded_graphs_match_peft(fold_engine, prompt_ids, peft_references, replays, lora_calls):
    # Together within the extra rows (qkv 8 + 48 + 24 of 120, o 24 of 40, gate_up 32 of 80, down 16
    # of 40): every LoRA decode step folds; the base model's rows too read the folded weights' views.
    graphs = fold_engine.runner.graphs
    assert set(graphs._fold_graphs) == set(graphs.sizes), "not every folded graph was captured at start-up"
    requests = [(None, 0), ("qv-r4", 1), ("all-r16", 2), ("attn-r8", 0), ("all-r16", 1), (None, 2)]
    check(generate(fold_engine, requests, prompt_ids), peft_references)
    assert any(lora for _, lora in replays)
    assert lora_calls["folded"] and not lora_calls["unfolded"], lora_calls
    assert len(graphs.fold.base) >= 3
    assert_fold_rows_hold_the_adapters(graphs.fold, fold_engine.lora)


def test_adapters_that_do_not_fit_together_run_unfolded(
    fold_engine, prompt_ids, peft_references, replays, lora_calls
):
    # mlp-r32's gate_up (64 rows) and all-r16's (32) exceed the 80 extra rows together: those steps
    # replay the unfolded LoRA graphs; steps with one of them alone still fold.
    requests = [("mlp-r32", 0), ("all-r16", 1), ("mlp-r32", 2), (None, 1)]
    check(generate(fold_engine, requests, prompt_ids), peft_references)
    assert lora_calls["unfolded"] and lora_calls["folded"], lora_calls


def test_a_slot_that_holds_another_adapter_is_copied_again(
    fold_engine, prompt_ids, peft_references, replays, lora_calls
):
    # Unloading frees the slots; the adapters loaded next take them (the same slots, maybe the same
    # pool blocks) with other weights: the extra rows must be copied again, not reused.
    lora = fold_engine.lora
    fold = fold_engine.runner.graphs.fold
    old = {name: lora._device[name].slot for name in ("qv-r4", "all-r16", "attn-r8", "mlp-r32")}
    assert set(old.values()) & set(fold.base), "nothing was folded before"
    for name in old:
        lora.unload(name)
    requests = [("all-r4", 0), ("k-up-rslora-r8", 1), ("all-r4", 2), ("qv-r4", 1)]
    check(generate(fold_engine, requests, prompt_ids), peft_references)
    assert lora_calls["folded"] and not lora_calls["unfolded"], lora_calls
    new = {name: lora._device[name].slot for name, _ in requests}
    assert set(new.values()) & set(old.values()), "no slot was reused: this test would not test the copy"
    # Small adapters barely move greedy tokens: check the extra rows themselves too.
    assert set(new.values()) <= set(fold.base)
    assert_fold_rows_hold_the_adapters(fold, lora)


def assert_fold_rows_hold_the_adapters(fold, lora) -> None:
    """Every placed slot's extra rows equal its adapter's stacked A rows in the pool, every layer."""
    tables = lora.tables
    for slot, bases in fold.base.items():
        for kind, base in bases.items():
            for layer in range(len(fold.weights)):
                weight, _, hidden_out = fold.weights[layer][kind]
                total = int(tables.total_ranks[kind][layer, slot])
                offset = int(tables.a_offsets[kind][layer, slot])
                a = fold.pool[offset : offset + total * weight.shape[1]].view(total, weight.shape[1])
                assert torch.equal(weight[hidden_out + base : hidden_out + base + total], a), (
                    slot,
                    kind,
                    layer,
                )
