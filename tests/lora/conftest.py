"""LoRA fixtures: real PEFT adapters for the built-in model, made once per session with `peft`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks import make_adapters as make_adapters_mod
from tandem_worker.engine.sampling_params import SamplingParams
from tests.engine.test_engine_vs_hf import Reference, hf_greedy

AdapterSpec = make_adapters_mod.AdapterSpec
ALL = make_adapters_mod.ALL_MODULES

# Nine adapters: ranks 4 to 128, every target set from PEFT's default (q, v) to all seven
# projections, rsLoRA scaling and a per-module rank (rank_pattern).
MIXED_SPECS = [
    AdapterSpec("qv-r4", 4, ("q_proj", "v_proj"), alpha=8, seed=1, b_std=0.05),
    AdapterSpec("attn-r8", 8, ("q_proj", "k_proj", "v_proj", "o_proj"), alpha=16, seed=2, b_std=0.1),
    AdapterSpec("all-r16", 16, ALL, alpha=32, seed=3),
    AdapterSpec("mlp-r32", 32, ("gate_proj", "up_proj", "down_proj"), alpha=16, seed=4),
    AdapterSpec("o-down-r64", 64, ("o_proj", "down_proj"), alpha=64, seed=5),
    AdapterSpec("qv-r128", 128, ("q_proj", "v_proj"), alpha=128, seed=6, b_std=0.01),
    AdapterSpec("k-up-rslora-r8", 8, ("k_proj", "up_proj"), alpha=16, seed=7, use_rslora=True, b_std=0.01),
    AdapterSpec(
        "pattern-r16",
        16,
        ("v_proj", "gate_proj", "down_proj"),
        alpha=16,
        seed=8,
        rank_pattern={"down_proj": 4},
    ),
    AdapterSpec("all-r4", 4, ALL, alpha=4, seed=9, b_std=0.05),
]


@pytest.fixture(scope="session")
def adapter_store(model_dir: Path, model_cache_dir: Path) -> Path:
    """A folder of the MIXED_SPECS adapters (kept between runs next to the model cache)."""
    out = model_cache_dir.parent / "adapters" / "mixed-v2"
    make_adapters_mod.make_adapters(model_dir, out, MIXED_SPECS)
    return out


@pytest.fixture(scope="session")
def many_adapter_store(model_dir: Path, model_cache_dir: Path) -> Path:
    """200 PEFT adapters of ranks 4 and 8 and mixed targets, for paging under memory pressure."""
    out = model_cache_dir.parent / "adapters" / "many-v2"
    specs = make_adapters_mod.mixed_specs(200, ranks=(4, 8), seed=1, b_std=0.1)
    make_adapters_mod.make_adapters(model_dir, out, specs)
    return out


MAX_NEW = 12
GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a land far away, there lived a dragon who",
]


@pytest.fixture(scope="session")
def prompt_ids(hf_tokenizer) -> list[list[int]]:
    return [hf_tokenizer.encode(p) for p in PROMPTS]


@pytest.fixture(scope="session")
def peft_references(
    model_dir: Path, adapter_store: Path, prompt_ids
) -> dict[tuple[str | None, int], Reference]:
    """PEFT's greedy tokens for every (adapter or None, prompt)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    refs = {(None, i): hf_greedy(base, ids, MAX_NEW) for i, ids in enumerate(prompt_ids)}
    names = [s.name for s in MIXED_SPECS]
    model = PeftModel.from_pretrained(base, adapter_store / names[0], adapter_name=names[0]).eval()
    for name in names[1:]:
        model.load_adapter(adapter_store / name, adapter_name=name)
    for name in names:
        model.set_adapter(name)
        for i, ids in enumerate(prompt_ids):
            refs[(name, i)] = hf_greedy(model, ids, MAX_NEW)
    return refs
