"""Presence, frequency and repetition penalties: against transformers' RepetitionPenaltyLogitsProcessor
and OpenAI's formula, one step at a time and through the engine on the real model."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from tandem_worker.engine.penalties import Penalties
from tandem_worker.engine.sampling_params import RequestError, SamplingParams
from tests.engine.conftest import run_all
from tests.engine.test_engine_vs_hf import Reference, assert_matches

VOCAB = 1000


def reference(logits: torch.Tensor, prompt: list[int], output: list[int], p: SamplingParams) -> torch.Tensor:
    """One row as transformers penalizes repetition (over prompt and output) and then as OpenAI's API
    documents the other two: mu[j] -= c[j] * frequency_penalty + (c[j] > 0) * presence_penalty, c
    counting generated tokens only."""
    row = logits[None].clone()
    if p.repetition_penalty != 1.0:
        row = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(torch.tensor([prompt + output]), row)
    row = row[0]
    for token, count in Counter(output).items():
        row[token] -= count * p.frequency_penalty + p.presence_penalty
    return row


def params(rep: float = 1.0, freq: float = 0.0, pres: float = 0.0) -> SamplingParams:
    return SamplingParams(repetition_penalty=rep, frequency_penalty=freq, presence_penalty=pres)


MIXED = [
    params(1.3),
    params(freq=0.7),
    params(pres=-0.5),
    params(0.8, 1.5, 2.0),
    params(),
    params(1.0, 0.0, 0.0),
]


def test_each_step_equals_transformers_and_openais_formula_with_unpenalized_rows_untouched():
    rng = random.Random(0)
    pen = Penalties()
    ids = [f"r{i}" for i in range(len(MIXED))]
    prompts = [[rng.randrange(VOCAB) for _ in range(rng.randint(1, 40))] for _ in MIXED]
    outputs: list[list[int]] = [[] for _ in MIXED]
    for step in range(12):
        logits = torch.randn(len(MIXED), VOCAB, generator=torch.Generator().manual_seed(step)) * 4
        raw = logits.clone()
        got = pen.apply(logits, ids, MIXED, list(zip(prompts, outputs)))
        assert torch.equal(logits, raw), "the raw logits (log-probabilities' source) were changed"
        for i, p in enumerate(MIXED):
            want = reference(raw[i], prompts[i], outputs[i], p)
            assert torch.allclose(got[i], want, atol=1e-6, rtol=0), (i, step)
            if not p.penalized:
                assert torch.equal(got[i], raw[i])
        for out in outputs:  # repeats, so counts above 1 are tested
            out.append(rng.choice(out) if out and rng.random() < 0.5 else rng.randrange(VOCAB))


def test_a_request_starts_clean_and_ended_ones_are_forgotten():
    pen, p = Penalties(), params(1.5, 1.0, 1.0)
    logits = torch.randn(1, VOCAB)
    pen.apply(torch.randn(2, VOCAB), ["a", "keep"], [p, p], [([1, 2, 3], [4, 4, 5]), ([6], [])])
    pen.forget("a")
    got = pen.apply(logits, ["b"], [p], [([7], [8])])
    assert torch.allclose(got[0], reference(logits[0], [7], [8], p), atol=1e-6, rtol=0)
    pen.apply(torch.randn(3, VOCAB), ["b", "c", "d"], [p] * 3, [([7], [8, 9])] * 3)
    got = pen.apply(logits, ["b"], [p], [([7], [8, 9, 9])])
    assert torch.allclose(got[0], reference(logits[0], [7], [8, 9, 9], p), atol=1e-6, rtol=0)
    for rid in ("b", "c", "d", "keep"):
        pen.forget(rid)
    assert not pen._seen, "what ended requests had seen is kept"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("presence_penalty", 2.5),
        ("frequency_penalty", -2.01),
        ("frequency_penalty", float("nan")),
        ("presence_penalty", True),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("repetition_penalty", float("inf")),
        ("repetition_penalty", "1.2"),
    ],
)
def test_bad_penalties_are_refused_by_name(field, value):
    with pytest.raises(RequestError, match=field):
        SamplingParams(**{field: value})


def penalized_greedy(model, prompt: list[int], n: int, p: SamplingParams) -> Reference:
    """transformers' forward and KV cache, each step's logits penalized by `reference`, greedy."""
    tokens: list[int] = []
    gaps = []
    with torch.inference_mode():
        out = model(torch.tensor([prompt]), use_cache=True)
        for _ in range(n):
            logits = reference(out.logits[0, -1].float(), prompt, tokens, p)
            top2 = torch.topk(logits, 2).values
            gaps.append(float(top2[0] - top2[1]))
            tokens.append(int(logits.argmax()))
            out = model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
    return Reference(tokens, gaps)


def test_the_engine_penalizes_as_transformers_does_in_a_mixed_batch(engine, hf_model, hf_tokenizer):
    # Prompts that make SmolLM2 repeat itself greedily, so the penalties change the answer.
    prompts = [
        hf_tokenizer.encode("1, 2, 3, 1, 2, 3, 1, 2, 3,"),
        hf_tokenizer.encode("The cat sat on the mat. The cat sat on the mat. The cat"),
        hf_tokenizer.encode("List the days of the week: Monday, Tuesday,"),
    ]
    cases = [(prompt, p) for prompt in prompts for p in (params(1.3), params(freq=1.0, pres=0.5), params())]
    n = 24
    ids = {}
    for i, (prompt, p) in enumerate(cases):
        greedy = dataclasses.replace(p, max_tokens=n, temperature=0.0, ignore_eos=True)
        ids[engine.add_request(prompt_token_ids=prompt, params=greedy)] = i
    done = {ids[rid]: o.token_ids for rid, o in run_all(engine).items()}
    notes: list[str] = []
    for i, (prompt, p) in enumerate(cases):
        ref = penalized_greedy(hf_model, prompt, n, p)
        assert_matches(f"case {i}", done[i], ref, notes)
    # The penalties changed answers (else the test shows nothing), and the unpenalized ones are plain.
    for j in range(len(prompts)):
        plain = done[3 * j + 2]
        assert done[3 * j] != plain and done[3 * j + 1] != plain, j
    assert not engine.sampler.penalties._seen, "what ended requests had seen is kept"
    print("\n".join(notes))
