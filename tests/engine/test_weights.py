"""Weights from a checkpoint, from a live `transformers` model, or random (`load_format="dummy"`)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from tandem_worker.engine import model as model_module
from tandem_worker.engine.config import EngineConfig, ModelConfig
from tandem_worker.engine.cuda_graphs import capture_sizes
from tandem_worker.engine.llm_engine import LLMEngine
from tandem_worker.engine.model import LlamaModel
from tandem_worker.engine.sampling_params import SamplingParams

from .conftest import TINY


def test_load_state_from_transformers_equals_the_checkpoint(model_dir, hf_model):
    """A live transformers model's state_dict (unfused q/k/v, gate/up) loads into the fused model
    exactly as the safetensors checkpoint does."""
    cfg = ModelConfig.from_folder(model_dir)
    from_folder = LlamaModel(cfg, 64)
    from_folder.load_weights(model_dir)
    from_hf = LlamaModel(cfg, 64)
    from_hf.load_state(hf_model.state_dict().items(), source="transformers model")
    a, b = from_folder.state_dict(), from_hf.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_load_state_names_what_is_missing_or_unexpected(model_dir, hf_model):
    cfg = ModelConfig.from_folder(model_dir)
    state = dict(hf_model.state_dict())
    model = LlamaModel(cfg, 64)
    missing = {k: v for k, v in state.items() if "layers.3.mlp.up_proj" not in k}
    with pytest.raises(ValueError, match=r"lacks weights: layers\.3\.mlp\.gate_up_proj\.weight#1"):
        model.load_state(missing.items())
    with pytest.raises(ValueError, match="unexpected weight 'model.extra.weight'"):
        model.load_state([*state.items(), ("model.extra.weight", torch.zeros(1))])
    bad = dict(state)
    bad["model.norm.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"model\.norm\.weight: shape \(3,\)"):
        model.load_state(bad.items())


def test_dummy_weights_need_no_checkpoint_and_are_seeded(tmp_path, model_dir):
    """load_format="dummy": a config.json (and tokenizer) is enough; the same seed gives the same
    model, so a benchmark is repeatable; a folder without weights is still refused otherwise."""
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    for f in model_dir.glob("tokenizer*"):
        shutil.copy(f, tmp_path / f.name)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    outs = []
    for seed in (3, 3, 4):
        engine = LLMEngine(model=str(tmp_path), load_format="dummy", seed=seed, kv_cache_bytes=1 << 20)
        engine.add_request(prompt_token_ids=[5, 6, 7, 8], params=params)
        while engine.has_unfinished():
            for o in engine.step():
                if o.finished:
                    outs.append(o.token_ids)
        norms = [engine.runner.model.layers[0].input_layernorm.weight]
        assert all(torch.equal(n, torch.ones_like(n)) for n in norms)
    assert outs[0] == outs[1] and len(outs[0]) == 6
    assert outs[0] != outs[2]
    with pytest.raises(Exception, match=r"missing \*\.safetensors"):
        LLMEngine(model=str(tmp_path), kv_cache_bytes=1 << 20)


def test_engine_config_rejects_bad_load_format_and_graph_batch():
    with pytest.raises(ValueError, match="load_format"):
        EngineConfig(load_format="pt")
    with pytest.raises(ValueError, match="cuda_graph_max_batch"):
        EngineConfig(cuda_graph_max_batch=-1)


def test_engine_config_refuses_a_device_this_machine_lacks_and_a_bad_max_model_len():
    # torch's own error was an AssertionError deep inside its CUDA init ("Torch not compiled
    # with CUDA enabled"), a traceback from every worker after it loaded the model.
    import torch

    for bad, why in (("mps", "cpu or cuda"), ("not a device", "not a device name")):
        with pytest.raises(ValueError, match=why):
            EngineConfig(device=bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device is available here"):
            EngineConfig(device="cuda")
    else:
        with pytest.raises(ValueError, match="CUDA device"):
            EngineConfig(device=f"cuda:{torch.cuda.device_count()}")
    # 0 read as "unset" (the whole context) and a negative one failed inside torch.
    for bad in (0, -5, 1):
        with pytest.raises(ValueError, match="max_model_len must be at least 2"):
            EngineConfig(max_model_len=bad)


def test_capture_sizes_cover_every_batch_up_to_the_maximum():
    """Every decode batch of 1..max fits a captured size, never padded to twice its rows."""
    for max_batch in (1, 7, 32, 100, 256, 600):
        sizes = capture_sizes(max_batch)
        assert sizes == sorted(set(sizes)) and sizes[-1] == max_batch
        for n in range(1, max_batch + 1):
            padded = next(s for s in sizes if s >= n)
            assert padded < 2 * n or padded == n == 1
    assert capture_sizes(0) == []


@pytest.mark.skipif(not model_module.CPU_PREPACK, reason="torch without oneDNN, or TANDEM_CPU_PREPACK=0")
def test_cpu_prepacked_linear_matches_linear_and_follows_weight_changes():
    """The oneDNN-packed CPU path computes x @ W^T + b as F.linear does, for any row count, and
    never serves a stale packed copy after the weight is reloaded in place or replaced."""
    torch.manual_seed(0)
    lin = model_module.Linear(64, 96, bias=True)
    for rows in (1, 16, 300):
        x = torch.randn(rows, 64)
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
    assert lin.packed_weight() is not None
    with torch.no_grad():
        lin.weight.copy_(torch.randn(96, 64))  # a reload: same storage, new values
    x = torch.randn(16, 64)
    torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
    lin.weight = torch.nn.Parameter(torch.randn(96, 64))  # a retie: new storage
    torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not model_module.CPU_PREPACK, reason="torch without oneDNN, or TANDEM_CPU_PREPACK=0")
def test_engine_runs_its_cpu_projections_on_packed_weights(engine, monkeypatch):
    """The engine packs every projection (the tied lm_head too) at start and its steps use them."""
    model = engine.runner.model
    linears = [m for m in model.modules() if isinstance(m, model_module.Linear)]
    assert linears and all(m._packed is not None for m in linears)
    calls = []
    real = torch.ops.mkldnn._linear_pointwise

    def spy(*args):
        calls.append(args[0].shape[0])
        return real(*args)

    monkeypatch.setattr(model_module, "_onednn_linear", spy)
    engine.add_request(
        request_id="packed", prompt_token_ids=[1, 2, 3, 4, 5], params=SamplingParams(max_tokens=2)
    )
    while engine.has_unfinished():
        engine.step()
    # Per step: four projections per layer, then lm_head; one prefill and one decode step.
    per_step = 4 * model.config.num_hidden_layers + 1
    assert len(calls) == 2 * per_step


@pytest.mark.skipif(not model_module.CPU_PREPACK, reason="torch without oneDNN, or TANDEM_CPU_PREPACK=0")
def test_packing_frees_the_dense_projection_weights(engine):
    """Packing must not double the weights' memory: every projection but the tied lm_head (which
    is the embedding) keeps only its packed copy, and a load into it fails instead of going stale."""
    model = engine.runner.model
    cfg = model.config
    mlp = model.layers[0].mlp.gate_up_proj
    assert mlp.weight.numel() == 0 and mlp.packed_weight() is not None
    assert model.lm_head.weight is model.embed_tokens.weight and model.lm_head.weight.numel() > 0
    dense = sum(p.numel() for n, p in model.named_parameters() if n.endswith("_proj.weight") and p.numel())
    assert dense == 0
    # What a forward pass reads is still counted: 134.5M parameters for SmolLM2-135M.
    assert model.weight_bytes() == 4 * (
        cfg.vocab_size * cfg.hidden_size
        + cfg.num_hidden_layers
        * (
            cfg.hidden_size * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
            + cfg.num_attention_heads * cfg.head_dim * cfg.hidden_size
            + 3 * cfg.hidden_size * cfg.intermediate_size
            + 2 * cfg.hidden_size
        )
        + cfg.hidden_size
    )
    with pytest.raises(ValueError, match="shape"):
        model.load_state([("model.layers.0.mlp.down_proj.weight", torch.zeros(576, 1536))])


def test_a_kv_cache_budget_beyond_free_memory_is_refused(monkeypatch):
    # It failed in torch's allocator, or got the process OOM-killed once the pages were touched.
    from tandem_worker.engine import model_runner

    cfg = ModelConfig.from_dict(TINY)
    monkeypatch.setattr(model_runner, "available_memory_bytes", lambda device: 2**30)
    cpu = torch.device("cpu")
    with pytest.raises(
        ValueError, match=r"kv_cache_bytes=2147483648 \(2\.0 GiB\) is more than the 1\.0 GiB free"
    ):
        model_runner.plan_kv_cache(cfg, EngineConfig(kv_cache_bytes=2**31), torch.float32, cpu)
    assert (
        model_runner.plan_kv_cache(cfg, EngineConfig(kv_cache_bytes=2**29), torch.float32, cpu).num_blocks > 0
    )


def test_dummy_weights_of_a_gguf_model_convert_none_of_its_weights(tmp_path, monkeypatch):
    # Random weights need the config and tokenizer only: converting a GGUF file's weights (the whole
    # float32 model, minutes for an 8B one) was wasted on a benchmark that overwrites them.
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path))
    engine = LLMEngine(model="smollm2-135m", load_format="dummy", kv_cache_bytes=1 << 22)
    assert engine.model_dir.parent == tmp_path
    assert not list(tmp_path.rglob("*.safetensors"))
