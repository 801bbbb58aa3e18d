"""Prompt log-probabilities (vLLM's prompt_logprobs; OpenAI's echo with logprobs): each prompt token's
log-probability given the ones before it, against transformers' forward over the same prompt."""

from __future__ import annotations

import pytest
import torch

from tandem_worker.engine.llm_engine import LLMEngine
from tandem_worker.engine.sampling_params import RequestError, SamplingParams
from tests.engine.conftest import run_all

TEXTS = [
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    " ".join(f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(12)),  # ~170 tokens
]


def hf_prompt_logprobs(
    model, ids: list[int], k: int
) -> tuple[list[float], list[list[int]], list[list[float]]]:
    """log P(ids[i] | ids[:i]) for i >= 1, and each position's top k (ids, log-probabilities)."""
    with torch.inference_mode():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    own = lp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
    top = lp[:-1].topk(k, dim=-1) if k else None
    return own, (top.indices.tolist() if top else []), (top.values.tolist() if top else [])


@pytest.fixture(scope="module")
def chunked(model_dir) -> LLMEngine:
    """Prompts cut into 48-token chunks: the log-probabilities span several steps."""
    return LLMEngine(model=str(model_dir), kv_cache_bytes=64 * 2**20, max_num_batched_tokens=48)


@pytest.mark.parametrize("k", [0, 3])
def test_prompt_logprobs_equal_transformers_over_chunks_and_beside_other_requests(
    chunked, hf_model, hf_tokenizer, k
):
    prompts = [hf_tokenizer.encode(t) for t in TEXTS]
    assert max(map(len, prompts)) > 3 * 48
    with_lp = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=k)
    ids = [chunked.add_request(prompt_token_ids=p, params=with_lp) for p in prompts]
    other = chunked.add_request(prompt_token_ids=prompts[2][:60], params=SamplingParams(max_tokens=4))
    final = run_all(chunked)
    assert final[other].prompt_logprobs is None
    for rid, p in zip(ids, prompts):
        out = final[rid]
        own, top_ids, top_values = hf_prompt_logprobs(hf_model, p, k)
        assert len(out.prompt_logprobs) == len(p) and out.prompt_logprobs[0] is None
        assert out.prompt_logprobs[1:] == pytest.approx(own, abs=2e-4)
        if not k:
            assert out.prompt_top_logprobs is None
            continue
        assert len(out.prompt_top_logprobs) == len(p) and out.prompt_top_logprobs[0] == []
        for pos, (got, want_ids, want_values) in enumerate(
            zip(out.prompt_top_logprobs[1:], top_ids, top_values)
        ):
            assert [v for _, v in got] == pytest.approx(want_values, abs=2e-4), pos
            # The same tokens, but where two of them tie to within float error.
            ties = any(abs(a - b) < 1e-4 for a, b in zip(want_values, want_values[1:]))
            assert ties or [t for t, _ in got] == want_ids, pos


def test_a_cached_prefix_is_computed_again_for_prompt_logprobs(engine, hf_model, hf_tokenizer):
    p = hf_tokenizer.encode(TEXTS[2])
    plain = SamplingParams(max_tokens=1, temperature=0.0)
    engine.add_request(prompt_token_ids=p, params=plain)
    run_all(engine)
    rid = engine.add_request(prompt_token_ids=p, params=SamplingParams(max_tokens=1, prompt_logprobs=0))
    out = run_all(engine)[rid]
    assert out.num_cached_tokens == 0  # the cached blocks hold KV, not the log-probabilities
    assert out.prompt_logprobs[1:] == pytest.approx(hf_prompt_logprobs(hf_model, p, 0)[0], abs=2e-4)
    # Another request for the same prompt still finds it in the prefix cache.
    again = engine.add_request(prompt_token_ids=p, params=plain)
    assert run_all(engine)[again].num_cached_tokens > 0


@pytest.mark.parametrize("value", [-1, 21, True, 1.5])
def test_bad_prompt_logprobs_are_refused_by_name(value):
    with pytest.raises(RequestError) as ei:
        SamplingParams(prompt_logprobs=value)
    assert ei.value.field == "prompt_logprobs"
