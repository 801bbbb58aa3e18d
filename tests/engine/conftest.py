"""Engine fixtures: one engine on the real built-in model per test session."""

from __future__ import annotations

import pytest

from tandem_worker.engine.llm_engine import LLMEngine, RequestOutput

# A tiny random Llama's config.json: checkpoints and shapes without the built-in model.
TINY = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 300,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
    "eos_token_id": 2,
}


@pytest.fixture(scope="session")
def engine(model_dir) -> LLMEngine:
    return LLMEngine(model=str(model_dir), kv_cache_bytes=400 * 2**20)


def run_all(engine: LLMEngine) -> dict[str, RequestOutput]:
    """Step until idle; return each request's final output."""
    final: dict[str, RequestOutput] = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                final[o.request_id] = o
    return final
