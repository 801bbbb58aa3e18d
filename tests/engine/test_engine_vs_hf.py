"""The engine's greedy output equals Hugging Face transformers', token for token, on SmolLM2-135M.

The reference is a plain greedy loop over transformers' own forward pass with its KV cache (what
`generate` does), run once per prompt. A difference is accepted only at a near-tie: where the
reference's top-2 logit gap is under 1e-4, the two implementations may round either way, and the
test says so.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch

from tandem_worker.engine.llm_engine import LLMEngine
from tandem_worker.engine.sampling_params import SamplingParams

MAX_NEW = 24
NEAR_TIE = 1e-4

RAW_TEXTS = [
    "The capital of France is",
    "def quicksort(arr):\n    ",
    "Once upon a time, in a land far away,",
    "Translate to French: The cat sits on the mat.\nFrench:",
    "1, 2, 3, 5, 8, 13,",
    "Les élèves étudient la physique quantique à l'université de",
    "東京は日本の首都で、",
    "Привет! Сегодня мы поговорим о",
    "Emoji test 🚀🌍: the rocket flew to",
    "SELECT name, age FROM users WHERE",
    "import numpy as np\nx = np.",
    "Q: What is 12 * 12?\nA:",
    "In 1969, Neil Armstrong",
    "Ωμέγα και άλφα είναι",
    "The three primary colors are",
    "<html>\n  <body>\n    <h1>",
    "A short history of the printing press: In the fifteenth century,",
    "Water boils at 100 degrees Celsius at sea level because",
    "Die Katze schläft auf dem Sofa, während der Hund",
]
CHAT_TEXTS = [
    "What is the capital of Germany?",
    "Write a haiku about the sea.",
    "¿Cuál es la capital de España?",
    "Explain recursion in one sentence.",
    "给我讲一个关于猫的笑话。",
    "List three uses of a paperclip.",
]


def _long_text(n_records: int, seed: int) -> str:
    rng = random.Random(seed)
    colors = ["red", "blue", "green", "amber", "violet", "grey", "teal"]
    animals = ["fox", "otter", "heron", "lynx", "badger", "crane", "moth"]
    lines = [
        f"Record {i}: the {rng.choice(colors)} {rng.choice(animals)} weighs {rng.randint(1, 99)} kg "
        f"and was seen near {rng.choice(['the river', 'Zürich', 'the old mill', 'Kyōto'])}."
        for i in range(n_records)
    ]
    return "Field notes.\n" + "\n".join(lines) + "\nSummary: the heaviest animal was the"


@dataclass
class Case:
    name: str
    token_ids: list[int]


@dataclass
class Reference:
    tokens: list[int]
    gaps: list[float]  # top-2 logit gap at each generated position


@pytest.fixture(scope="session")
def all_cases(hf_tokenizer) -> list[Case]:
    out = [Case("single-token", hf_tokenizer.encode("Hello")[:1])]
    out += [Case(f"raw-{i}", hf_tokenizer.encode(t)) for i, t in enumerate(RAW_TEXTS)]
    for i, t in enumerate(CHAT_TEXTS):
        ids = hf_tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True)
        if not isinstance(ids, list):
            ids = ids["input_ids"]
        out.append(Case(f"chat-{i}", list(ids)))
    # Long prompts, up to 1,500 tokens: many KV blocks, chunked prefill.
    for records, seed in ((8, 1), (30, 2), (45, 3), (66, 4)):
        out.append(Case(f"long-{records}", hf_tokenizer.encode(_long_text(records, seed))))
    lengths = [len(c.token_ids) for c in out]
    assert len(out) >= 30 and min(lengths) == 1 and 1300 <= max(lengths) <= 1500, lengths
    return out


def hf_greedy(model, token_ids: list[int], n: int) -> Reference:
    """Greedy decoding with transformers' forward and KV cache, ignoring EOS (as the engine is told to)."""
    tokens, gaps = [], []
    with torch.inference_mode():
        out = model(torch.tensor([token_ids]), use_cache=True)
        for _ in range(n):
            logits = out.logits[0, -1].float()
            top2 = torch.topk(logits, 2).values
            gaps.append(float(top2[0] - top2[1]))
            nxt = int(logits.argmax())
            tokens.append(nxt)
            out = model(torch.tensor([[nxt]]), past_key_values=out.past_key_values, use_cache=True)
    return Reference(tokens, gaps)


@pytest.fixture(scope="session")
def references(all_cases: list[Case], hf_model) -> dict[str, Reference]:
    return {c.name: hf_greedy(hf_model, c.token_ids, MAX_NEW) for c in all_cases}


def assert_matches(name: str, got: list[int], ref: Reference, notes: list[str]) -> None:
    for i, (a, b) in enumerate(zip(got, ref.tokens)):
        if a != b:
            assert ref.gaps[i] < NEAR_TIE, (
                f"{name}: token {i} is {a}, transformers says {b} (gap {ref.gaps[i]:.3g}: no near-tie)"
            )
            notes.append(f"{name}: diverged at token {i} at a near-tie (gap {ref.gaps[i]:.2g})")
            return
    assert len(got) == len(ref.tokens), f"{name}: {len(got)} tokens, expected {len(ref.tokens)}"


GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)


def run_to_completion(engine: LLMEngine, pending: list[tuple[int, Case]], wave: int) -> dict[str, list[int]]:
    """Submit `wave` requests, step twice, submit the next wave... until all are done."""
    done: dict[str, list[int]] = {}
    ids = {}
    queue = list(pending)
    while queue or engine.has_unfinished():
        for _ in range(min(wave, len(queue))):
            _, case = queue.pop(0)
            ids[engine.add_request(prompt_token_ids=case.token_ids, params=GREEDY)] = case.name
        for _ in range(2):
            for o in engine.step():
                if o.finished:
                    done[ids[o.request_id]] = o.token_ids
            if not engine.has_unfinished():
                break
    return done


def test_one_at_a_time_matches_transformers(engine, all_cases, references, record_property):
    notes: list[str] = []
    for case in all_cases:
        rid = engine.add_request(prompt_token_ids=case.token_ids, params=GREEDY)
        final = None
        while engine.has_unfinished():
            for o in engine.step():
                if o.request_id == rid and o.finished:
                    final = o
        assert final is not None and final.finish_reason == "length"
        assert_matches(case.name, final.token_ids, references[case.name], notes)
    record_property("near_ties", notes)
    print("\n".join(notes))
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_together_staggered_small_budget_matches_transformers(model_dir, all_cases, references):
    """All prompts share batches, arriving in waves, in a KV cache too small for them all at once."""
    longest = max(len(c.token_ids) for c in all_cases) + MAX_NEW
    bytes_per_token = 2 * 30 * 3 * 64 * 4
    small = LLMEngine(
        model=str(model_dir),
        kv_cache_bytes=int(longest * 1.6) * bytes_per_token,
        max_num_batched_tokens=192,
        enable_prefix_caching=False,
        # The admission watermark spares this mix every preemption: off, so recomputes are checked.
        admission_watermark_blocks_per_seq=0,
    )
    assert small.block_manager.num_blocks * small.config.block_size < sum(
        len(c.token_ids) + MAX_NEW for c in all_cases
    ), "the budget must be too small for all requests at once"
    order = list(enumerate(all_cases))
    random.Random(7).shuffle(order)
    done = run_to_completion(small, order, wave=4)
    notes: list[str] = []
    for case in all_cases:
        assert_matches(case.name, done[case.name], references[case.name], notes)
    print("\n".join(notes))
    stats = small.stats()
    assert stats["chunked_prefill_steps"] > 0, stats
    assert stats["preemptions"] > 0, stats
    assert small.block_manager.num_free_blocks == small.block_manager.num_blocks


def test_natural_eos_stop_matches_transformers_generate(engine, hf_model, hf_tokenizer):
    ids = hf_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Say just the word: yes"}], add_generation_prompt=True
    )
    if not isinstance(ids, list):
        ids = ids["input_ids"]
    with torch.inference_mode():
        ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False)[
            0, len(ids) :
        ].tolist()
    rid = engine.add_request(prompt_token_ids=list(ids), params=SamplingParams(max_tokens=40, temperature=0))
    final = None
    while engine.has_unfinished():
        for o in engine.step():
            if o.request_id == rid and o.finished:
                final = o
    assert ref[-1] in engine.eos_token_ids, "the reference should stop at EOS within 40 tokens"
    assert final.finish_reason == "stop"
    assert final.token_ids == ref
    assert final.text == hf_tokenizer.decode(ref, skip_special_tokens=True)


def test_min_tokens_defers_eos_as_transformers_generate_does(engine, hf_model, hf_tokenizer):
    ids = hf_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Say just the word: yes"}], add_generation_prompt=True
    )
    if not isinstance(ids, list):
        ids = ids["input_ids"]
    plain = SamplingParams(max_tokens=40, temperature=0)
    with torch.inference_mode():
        ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=40, min_new_tokens=12, do_sample=False)[
            0, len(ids) :
        ].tolist()
    # Alone and beside a request without min_tokens, which stops at its EOS as before.
    deferred = SamplingParams(max_tokens=40, temperature=0, min_tokens=12)
    a = engine.add_request(prompt_token_ids=list(ids), params=deferred)
    b = engine.add_request(prompt_token_ids=list(ids), params=plain)
    final = {}
    while engine.has_unfinished():
        final.update({o.request_id: o for o in engine.step() if o.finished})
    assert len(final[b].token_ids) < 12 and final[b].finish_reason == "stop", "EOS should come early"
    assert final[a].token_ids == ref and len(ref) >= 12
    assert all(t not in engine.eos_token_ids for t in final[a].token_ids[:12])
