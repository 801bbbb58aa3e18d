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


def _save(config, model_dir, path):
    """A random model of `config` saved by transformers with the built-in tokenizer (which fits
    the 49,152-token vocabulary); returns the transformers model."""
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # random biases too, so a dropped bias would show
        for n, p in hf.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.5)
    hf.save_pretrained(path)
    for f in model_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, path / f.name)
    return hf


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_tiny_variant_matches_transformers(name, model_dir, tmp_path):
    hf = _save(CONFIGS[name](), model_dir, tmp_path)
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


def test_sliding_window_model_is_served_only_within_its_window(model_dir, tmp_path):
    """Mistral attends over its last `sliding_window` positions; the engine's attention is full,
    which is the same only up to the window. So contexts stop there (equal to transformers up to
    the last token), and a longer one is refused, never computed differently."""
    hf = _save(MistralConfig(**COMMON, tie_word_embeddings=False, sliding_window=32), model_dir, tmp_path)
    engine = LLMEngine(model=str(tmp_path), kv_cache_bytes=16 * 2**20)
    assert engine.max_model_len == 32
    prompt = list(range(100, 120))
    rid = engine.add_request(
        prompt_token_ids=prompt, params=SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)
    )
    out = run_all(engine)[rid]
    assert len(prompt) + len(out.token_ids) == 32  # cut at the window
    with torch.inference_mode():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert out.token_ids == ref[0, len(prompt) :].tolist()
    with pytest.raises(ValueError, match="leave no room"):
        engine.add_request(prompt_token_ids=list(range(100, 140)), params=SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="sliding attention window"):
        LLMEngine(model=str(tmp_path), kv_cache_bytes=16 * 2**20, max_model_len=64)
    # Qwen2 lists a window it does not use (use_sliding_window: false): no limit then.
    qwen = tmp_path / "qwen"
    _save(Qwen2Config(**COMMON, sliding_window=32, use_sliding_window=False), model_dir, qwen)
    assert LLMEngine(model=str(qwen), kv_cache_bytes=16 * 2**20).max_model_len == 512
