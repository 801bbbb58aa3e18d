"""Structured outputs (JSON Schema, JSON object, regex, choice, Lark grammar) on the real model.

The reference for regex and choice constraints is independent of llguidance: transformers'
forward, and at each step the most likely token whose text the `regex` module says can still
become a full match (partial matching), EOS only once the text is one.
"""

from __future__ import annotations

import json

import numpy as np
import pydantic
import pytest
import regex
import torch

from tandem_worker.engine.llm_engine import PrefillResult
from tandem_worker.engine.sampler import _dropped_on_device, _dropped_on_host, _mask_disallowed
from tandem_worker.engine.sampling_params import RequestError, SamplingParams, StructuredOutputs
from tests.engine.conftest import run_all


def chat(engine, text: str) -> list[int]:
    return engine.tokenizer.chat_prompt(text)


@pytest.fixture(scope="module")
def token_texts(hf_tokenizer) -> list[str]:
    return hf_tokenizer.batch_decode([[t] for t in range(len(hf_tokenizer))])


def regex_greedy(model, token_texts: list[str], eos: set[int], prompt: list[int], pattern: str, n: int):
    """Greedy decoding under `pattern` (ASCII text: a token's text is then its own bytes): each step
    takes the most likely token that keeps the text a prefix of a full match; ends at a full match
    (the patterns used end where nothing can follow) or after n tokens."""
    tokens: list[int] = []
    text = ""
    with torch.inference_mode():
        out = model(torch.tensor([prompt]), use_cache=True)
        for _ in range(n):
            order = out.logits[0, -1].float().argsort(descending=True).tolist()
            nxt = next(
                t
                for t in order
                if t not in eos
                and token_texts[t]
                and regex.fullmatch(pattern, text + token_texts[t], partial=True) is not None
            )
            tokens.append(nxt)
            text += token_texts[nxt]
            if regex.fullmatch(pattern, text):
                break
            out = model(torch.tensor([[nxt]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens, text


def generate(engine, prompts: list[list[int]], params: list[SamplingParams]) -> list:
    ids = [engine.add_request(prompt_token_ids=p, params=sp) for p, sp in zip(prompts, params)]
    final = run_all(engine)
    return [final[i] for i in ids]


@pytest.mark.parametrize(
    ("question", "pattern"),
    [
        ("Give me a product code like 123-abc.", r"[0-9]{3}-[a-z]{2,8}\."),
        ("What time is it?", r"(0[0-9]|1[0-9]|2[0-3]):[0-5][0-9]!"),
        # A choice is a regex of its alternatives (none a prefix of another: the text ends at one).
        ("Is the sky blue? Answer yes or no.", r"(yes, it is|no|maybe so)"),
    ],
)
def test_regex_and_choice_greedy_equal_transformers_under_the_regex_module(
    engine, hf_model, token_texts, question, pattern
):
    prompt = chat(engine, question)
    want_tokens, want_text = regex_greedy(
        hf_model, token_texts, set(engine.eos_token_ids), prompt, pattern, 24
    )
    if pattern.startswith("(yes"):
        so = StructuredOutputs(choice=("yes, it is", "no", "maybe so"))
    else:
        so = StructuredOutputs(regex=pattern)
    (out,) = generate(
        engine, [prompt], [SamplingParams(max_tokens=24, temperature=0.0, structured_outputs=so)]
    )
    assert out.token_ids == want_tokens, (out.text, want_text)
    assert out.text == want_text and regex.fullmatch(pattern, out.text)
    assert out.finish_reason == "stop"  # the text was complete: nothing more was generated


class Person(pydantic.BaseModel):
    # Bounded strings and numbers: the small model would otherwise ramble inside a string.
    model_config = pydantic.ConfigDict(extra="forbid")
    name: str = pydantic.Field(max_length=20)
    age: int = pydantic.Field(ge=0, le=120)
    city: str | None = pydantic.Field(default=None, max_length=20)


def test_json_schema_answers_validate_in_a_batch_with_unconstrained_requests(engine):
    schema = Person.model_json_schema()
    so = StructuredOutputs(json=json.dumps(schema))
    prompts = [chat(engine, q) for q in ("Describe a person in JSON.", "Who wrote Hamlet? Reply in JSON.")]
    free = [chat(engine, "Describe a person in JSON."), engine.tokenizer.encode("The capital of France is")]
    constrained = [
        SamplingParams(max_tokens=48, temperature=0.0, structured_outputs=so),
        SamplingParams(max_tokens=48, temperature=0.9, seed=4, structured_outputs=so),
    ]
    plain = [
        SamplingParams(max_tokens=16, temperature=0.0),
        SamplingParams(max_tokens=16, temperature=0.9, seed=2),
    ]
    alone = generate(engine, free, plain)
    both = generate(engine, prompts + free, constrained + plain)
    for out in both[:2]:
        assert out.finish_reason == "stop", out.text
        person = Person.model_validate_json(out.text)  # a schema violation raises
        # Laid out as json.dumps lays it out: no whitespace a small model could run on with.
        assert json.dumps(json.loads(out.text)) == out.text
        assert person.name
    # The masks touched only their own rows: the unconstrained answers are those they have alone.
    assert [o.token_ids for o in both[2:]] == [o.token_ids for o in alone]
    # Without the schema the model does not answer in that shape (the constraint did the work).
    (loose,) = generate(engine, prompts[:1], [SamplingParams(max_tokens=48, temperature=0.0)])
    with pytest.raises(pydantic.ValidationError):
        Person.model_validate_json(loose.text)


def test_json_object_and_lark_grammar(engine):
    grammar = 'start: NUM " + " NUM " = " NUM "."\nNUM: /[0-9]{1,3}/'
    obj, arith = generate(
        engine,
        [chat(engine, "Describe a cat in JSON, briefly."), chat(engine, "Add two small numbers.")],
        [
            SamplingParams(
                max_tokens=80, temperature=0.0, structured_outputs=StructuredOutputs(json_object=True)
            ),
            SamplingParams(
                max_tokens=24, temperature=0.0, structured_outputs=StructuredOutputs(grammar=grammar)
            ),
        ],
    )
    assert arith.finish_reason == "stop" and regex.fullmatch(r"\d{1,3} \+ \d{1,3} = \d{1,3}\.", arith.text)
    if obj.finish_reason == "stop":
        assert isinstance(json.loads(obj.text), dict)
    else:  # cut at max_tokens: still the start of an object
        assert obj.finish_reason == "length" and obj.text.startswith("{")


def test_max_tokens_cuts_a_structured_answer_with_finish_reason_length(engine):
    so = StructuredOutputs(regex=r"[a-z]+( [a-z]+)*\.")
    (out,) = generate(
        engine,
        [chat(engine, "Write a long sentence.")],
        [SamplingParams(max_tokens=3, temperature=0.0, structured_outputs=so)],
    )
    assert out.finish_reason == "length" and len(out.token_ids) == 3
    assert regex.fullmatch(r"[a-z]+( [a-z]+)*\.", out.text, partial=True)


@pytest.mark.parametrize(
    ("so", "words"),
    [
        (StructuredOutputs(regex="([0-9]"), "unclosed group"),
        (StructuredOutputs(json='{"type": "nope"}'), "nope"),
        (StructuredOutputs(grammar="start: missing_rule"), "missing_rule"),
    ],
)
def test_a_grammar_that_does_not_compile_is_refused_and_changes_nothing(engine, so, words):
    before = engine.stats()
    with pytest.raises(RequestError) as ei:
        engine.add_request(prompt_token_ids=[1, 2, 3], params=SamplingParams(structured_outputs=so))
    assert ei.value.field == "structured_outputs" and words in str(ei.value)
    assert not engine.has_unfinished() and engine.stats() == before


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ({}, "exactly one"),
        ({"regex": "a", "choice": ["a"]}, "exactly one"),
        ({"choice": []}, "non-empty"),
        ({"choice": ["a", ""]}, "non-empty"),
        ({"json": "{not json"}, "not a JSON"),
        ({"json": [1]}, "JSON Schema"),
        ({"regex": ""}, "non-empty"),
        ({"json_object": "yes"}, "json_object"),
        ({"structural_tag": "x"}, "structural_tag"),
        ({"regex": "a", "disable_additional_properties": True}, "disable_additional_properties"),
        ({"regex": "a", "whitespace_pattern": " "}, "whitespace_pattern"),
    ],
)
def test_bad_structured_outputs_are_refused_by_name(value, words):
    with pytest.raises(RequestError) as ei:
        SamplingParams(structured_outputs=value)
    assert ei.value.field == "structured_outputs" and words in str(ei.value), str(ei.value)


def test_vllms_other_fields_at_values_that_change_nothing_are_accepted():
    # What vLLM's StructuredOutputsParams serializes by default, beside the kind.
    defaults = {
        "disable_fallback": False,
        "disable_any_whitespace": False,
        "disable_additional_properties": False,
    }
    assert StructuredOutputs.from_dict({"regex": "a+", **defaults, "whitespace_pattern": None}).regex == "a+"


def test_the_request_object_round_trips_and_a_schema_keeps_its_key_order():
    schema = {"type": "object", "properties": {"z": {"type": "string"}, "a": {"type": "integer"}}}
    so = StructuredOutputs.from_dict({"json": schema})
    assert list(json.loads(so.json)["properties"]) == ["z", "a"]  # properties come out in this order
    for value in (
        {"json": schema},
        {"regex": "a+"},
        {"choice": ["x", "y"]},
        {"grammar": 'start: "x"'},
        {"json_object": True},
    ):
        assert request_object(StructuredOutputs.from_dict(value)) == value


def request_object(so: StructuredOutputs) -> dict:
    """The request object `from_dict` reads, back from what it made (a schema as its JSON value)."""
    if so.json is not None:
        return {"json": json.loads(so.json)}
    if so.choice is not None:
        return {"choice": list(so.choice)}
    return {so.kind: getattr(so, so.kind)}


def test_a_grammar_is_compiled_once_and_each_request_gets_its_own_matcher(engine):
    so = StructuredOutputs(choice=("alpha", "beta"))
    assert engine.grammars.compiled(so) is engine.grammars.compiled(
        StructuredOutputs(choice=("alpha", "beta"))
    )
    a, b = engine.grammars.matcher(so), engine.grammars.matcher(so)
    assert a.consume_tokens(engine.tokenizer.encode("alpha"))
    assert not b.is_accepting() and b.consume_tokens(engine.tokenizer.encode("beta"))


@pytest.mark.parametrize("vocab", [64, 49152, 1000])  # 1000: not a multiple of 32
def test_masks_unpack_bit_j_of_word_i_as_token_32i_plus_j(vocab):
    rng = np.random.default_rng(vocab)
    rows, width = 5, (vocab + 31) // 32
    masks = rng.integers(-(2**31), 2**31, size=(3, width), dtype=np.int64).astype(np.int32)
    logits = torch.randn(rows, vocab)
    out = _mask_disallowed(logits, [0, 2, 4], masks)
    bits = np.unpackbits(masks.view(np.uint8), bitorder="little").reshape(3, -1)[:, :vocab].astype(bool)
    for k, row in enumerate([0, 2, 4]):
        assert torch.equal(torch.isinf(out[row]), torch.from_numpy(~bits[k]))
        assert torch.equal(out[row][bits[k]], logits[row][bits[k]])
    for row in (1, 3):
        assert torch.equal(out[row], logits[row])
    assert not torch.isinf(logits).any()  # the raw logits (log-probabilities' source) untouched
    # The device's unpacking (CUDA's path, run here on the CPU) gives the same flags.
    cpu = torch.device("cpu")
    assert torch.equal(_dropped_on_device(masks, vocab, cpu), _dropped_on_host(masks, vocab, cpu))


def test_a_first_token_outside_the_grammar_fails_the_request_and_frees_its_blocks(engine):
    # A prefill worker of an older build would sample the first token without the grammar: the
    # decode worker ends the request with the reason instead of generating text that breaks it.
    prompt = chat(engine, "Is the sky blue?")
    params = SamplingParams(
        max_tokens=8, temperature=0.0, structured_outputs=StructuredOutputs(choice=("yes", "no"))
    )
    free_before = engine.block_manager.stats().num_free
    rid = engine.add_request(prompt_token_ids=prompt, params=params, remote_kv=True)
    engine.step()
    (reservation,) = engine.take_reservations()
    assert reservation.request_id == rid
    out = engine.kv_ready(rid, PrefillResult(token=engine.tokenizer.encode("maybe")[0]))
    assert out.finished and out.finish_reason == "abort"
    assert "does not continue the text's grammar" in out.error
    assert not engine.has_unfinished() and engine.block_manager.stats().num_free == free_before
    # The same request whose first token keeps to the grammar goes on to the end.
    rid = engine.add_request(prompt_token_ids=prompt, params=params, remote_kv=True)
    engine.step()
    engine.take_reservations()
    out = engine.kv_ready(rid, PrefillResult(token=engine.tokenizer.encode("yes")[0]))
    assert out.finished and out.finish_reason == "stop" and out.text == "yes" and out.error is None
