"""`LoRABatch.apply` on both of its paths: the GPU one (`tandem_kernels.lora_apply`, here through
Triton's interpreter) and the CPU one (`lora_apply_grouped`), against PEFT's arithmetic done naively.

Adapters are placed in a small KV pool by the real `LoRAManager`, so the offsets, ranks, y offsets
and per-part tables are the engine's own. No model is needed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import tandem_kernels
from tandem_worker.engine.block_manager import BlockManager
from tandem_worker.engine.config import ModelConfig
from tandem_worker.engine.cuda_graphs import DecodeGraphs
from tandem_worker.engine.lora import KINDS, HostAdapter, LoRABatch, LoRAManager, module_shapes

LAYERS = 2
# Adapter -> (rank per module, layers it covers); modules it leaves out have rank 0 there.
ADAPTERS = {
    "all-r8": (
        {m: 8 for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")},
        (0, 1),
    ),
    "qv-r4": ({"q_proj": 4, "v_proj": 4}, (0, 1)),
    "mixed": ({"k_proj": 16, "v_proj": 2, "up_proj": 12, "down_proj": 4}, (1,)),  # layer 0: nothing
}


def make_config() -> ModelConfig:
    # q 64 and kv 32 columns (tile-aligned parts), intermediate 160 (gate and up end mid-tile).
    return ModelConfig.from_dict(
        {
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": 32,
            "hidden_size": 64,
            "intermediate_size": 160,
            "num_hidden_layers": LAYERS,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "max_position_embeddings": 64,
            "rms_norm_eps": 1e-5,
        }
    )


def make_adapter(name: str, cfg: ModelConfig, gen: torch.Generator) -> HostAdapter:
    ranks, layers = ADAPTERS[name]
    shapes = module_shapes(cfg)
    weights, num_bytes = {}, 0
    for layer in layers:
        for m, r in ranks.items():
            fan_in, fan_out = shapes[m]
            a = torch.randn(r, fan_in, generator=gen) * fan_in**-0.5
            b = torch.randn(fan_out, r, generator=gen) * r**-0.5
            weights[(layer, m)] = (a, b)
            num_bytes += a.nbytes + b.nbytes
    scaling = {m: 2.0 / r for m, r in ranks.items()}
    return HostAdapter(name, Path("/nonexistent") / name, weights, scaling, num_bytes)


@pytest.fixture
def manager() -> tuple[LoRAManager, dict[str, HostAdapter], dict[str, int]]:
    cfg = make_config()
    gen = torch.Generator().manual_seed(0)
    kv_cache = torch.full((2, LAYERS, 64, 16, 2, 16), float("nan"))  # unused memory reads as NaN
    mgr = LoRAManager(cfg, BlockManager(64, 16), kv_cache)
    adapters, slots = {}, {}
    for name in ADAPTERS:
        adapters[name] = mgr._host[name] = make_adapter(name, cfg, gen)
        slots[name] = mgr.acquire(name)
    yield mgr, adapters, slots
    mgr.close()


def naive(adapter: HostAdapter, layer: int, kind: str, x: torch.Tensor, shapes: dict) -> torch.Tensor:
    """The adapter's delta for projection `kind`, float64, [tokens, fused width]."""
    cols = []
    for m in KINDS[kind]:
        ab = adapter.weights.get((layer, m))
        if ab is None:
            cols.append(torch.zeros(x.shape[0], shapes[m][1], dtype=torch.float64))
        else:
            a, b = (t.double() for t in ab)
            cols.append(adapter.scaling[m] * (x.double() @ a.T) @ b.T)
    return torch.cat(cols, dim=1)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_apply_matches_naive_on_both_paths(manager, backend, monkeypatch):
    mgr, adapters, slots = manager
    if backend == "triton" and not tandem_kernels.triton_available():
        pytest.skip("triton is not installed")
    monkeypatch.setenv("TANDEM_KERNELS", backend)
    names = [None, "all-r8", "qv-r4", None, "mixed", "all-r8", "mixed", "qv-r4"]
    seq_lens = [2, 1, 3, 1, 5, 1, 1, 2]
    batch = mgr.batch(seq_lens, [None if n is None else slots[n] for n in names])
    assert isinstance(batch, LoRABatch) and (batch.host_groups is None) == (backend == "triton")
    token_names = [n for n, k in zip(names, seq_lens) for _ in range(k)]
    check_every_projection(batch, token_names, len(token_names), adapters, mgr.shapes, seed=1)


def check_every_projection(
    batch: LoRABatch, token_names: list, rows: int, adapters: dict, shapes: dict, seed: int
) -> None:
    """batch.apply on random x and out of `rows` rows, for every layer and projection, against the
    naive delta of each row's adapter (token_names[t]; None, or a row past them: no adapter, the
    same bits)."""
    gen = torch.Generator().manual_seed(seed)
    names = token_names + [None] * (rows - len(token_names))
    for layer in range(LAYERS):
        for kind, parts in KINDS.items():
            fan_in = shapes[parts[0]][0]
            width = sum(shapes[m][1] for m in parts)
            x = torch.randn(rows, fan_in, generator=gen)
            out = torch.randn(rows, width, generator=gen)
            expected = out.double()
            for t, name in enumerate(names):
                if name is not None:
                    expected[t] += naive(adapters[name], layer, kind, x[t : t + 1], shapes)[0]
            batch.apply(layer, kind, x, out)
            err = float((out.double() - expected).abs().max() / expected.abs().max())
            assert err < 1e-5, (token_names, layer, kind, err)
            no_adapter = [t for t, name in enumerate(names) if name is None]
            assert torch.equal(out[no_adapter].double(), expected[no_adapter])


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_a_decode_graphs_lora_batch_matches_naive(manager, backend, monkeypatch):
    """The LoRA work of a CUDA-graph decode step: the token groups filled into static buffers padded
    to the graph's batch size, the tiled launch, each projection's shrink sized for the graph's
    largest rank; then the same buffers refilled for another mix of adapters, as a replay reads them."""
    mgr, adapters, slots = manager
    if backend == "triton" and not tandem_kernels.triton_available():
        pytest.skip("triton is not installed")
    monkeypatch.setenv("TANDEM_KERNELS", backend)
    graphs = DecodeGraphs(None, mgr.kv_cache, max_batch=40, max_blocks_per_seq=4)
    graphs.use_lora(mgr, max_rank=16)
    bs = 40  # three tiles of 16 rows; 18 and 20 rows used below leave the last tiles partly empty
    batch = graphs._lora_batch(bs)
    assert batch.tiles is not None and batch.max_rank["qkv"] == 48
    mixes = [
        # Adapters interleaved, rows of no adapter between them: tiles span several groups.
        ([None, "all-r8", "qv-r4", None, "mixed", "all-r8", "mixed", "qv-r4"] * 2 + ["mixed", None]),
        (["qv-r4"] * 17 + [None, "all-r8", None]),
    ]
    for seed, names in enumerate(mixes):
        graphs._fill_lora([None if n is None else slots[n] for n in names], bs)
        # The graph's rows: the step's, then padding rows up to bs (no adapter).
        check_every_projection(batch, names, bs, adapters, mgr.shapes, seed=2 + seed)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_project_adds_the_delta_to_the_base_projection(manager, backend, monkeypatch):
    """What the model calls: the base projection, with the LoRA shrink begun before it (on a GPU on
    a side stream, concurrent with the GEMM) and the expand added after."""
    mgr, adapters, slots = manager
    if backend == "triton" and not tandem_kernels.triton_available():
        pytest.skip("triton is not installed")
    monkeypatch.setenv("TANDEM_KERNELS", backend)
    names = ["all-r8", None, "mixed", "qv-r4", "all-r8"]
    batch = mgr.batch([1] * len(names), [None if n is None else slots[n] for n in names])
    shapes = mgr.shapes
    gen = torch.Generator().manual_seed(3)
    for layer in range(LAYERS):
        for kind, parts in KINDS.items():
            fan_in = shapes[parts[0]][0]
            linear = torch.nn.Linear(fan_in, sum(shapes[m][1] for m in parts), bias=False)
            x = torch.randn(len(names), fan_in, generator=gen)
            with torch.no_grad():
                out = batch.project(layer, kind, x, linear)
                expected = linear(x).double()
            for t, name in enumerate(names):
                if name is not None:
                    expected[t] += naive(adapters[name], layer, kind, x[t : t + 1], shapes)[0]
            err = float((out.double() - expected).abs().max() / expected.abs().max())
            assert err < 1e-5, (layer, kind, err)
