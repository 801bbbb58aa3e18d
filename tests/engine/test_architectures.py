"""Llama-family variants beyond the built-in model: tiny random Llama-3 (RoPE scaling, untied head),
Qwen2 (q/k/v biases) and Mistral checkpoints saved by transformers, served by the engine, compared
with transformers' greedy output token for token."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

from tandem_worker.engine.llm_engine import LLMEngine
from tandem_worker.engine.sampling_params import SamplingParams

from .conftest import run_all

COMMON = dict(
    vocab_size=49152,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)
CONFIGS = {
    "llama3-scaled-rope-untied": lambda: LlamaConfig(
        **COMMON,
        tie_word_embeddings=False,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "qwen2-biases-tied": lambda: Qwen2Config(**COMMON, tie_word_embeddings=True),
    "mistral": lambda: MistralConfig(**COMMON, tie_word_embeddings=False, sliding_window=None),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_tiny_variant_matches_transformers(name, model_dir, tmp_path):
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(CONFIGS[name](), dtype=torch.float32).eval()
    with torch.no_grad():  # random biases too, so a dropped bias would show
        for n, p in hf.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.5)
    hf.save_pretrained(tmp_path)
    for f in model_dir.iterdir():  # the built-in tokenizer fits the 49,152-token vocabulary
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, tmp_path / f.name)

    engine = LLMEngine(model=str(tmp_path), kv_cache_bytes=16 * 2**20)
    # Long enough that RoPE scaling's low-frequency change moves the logits.
    prompts = [[5, 17, 300, 4000, 12], list(range(100, 490)), [7]]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=True)
    rids = [engine.add_request(prompt_token_ids=p, params=params) for p in prompts]
    outs = run_all(engine)
    for rid, p in zip(rids, prompts):
        with torch.inference_mode():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=12, min_new_tokens=12, do_sample=False)
        assert outs[rid].token_ids == ref[0, len(p) :].tolist(), name
        # Logprobs are a finer probe than argmax tokens for a small random model.
        with torch.inference_mode():
            logits = hf(ref).logits[0, len(p) - 1 : -1].float()
        expected = torch.log_softmax(logits, -1).gather(1, ref[0, len(p) :, None])[:, 0]
        assert torch.allclose(torch.tensor(outs[rid].logprobs), expected, atol=1e-4), name
