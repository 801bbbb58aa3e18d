"""Engine behaviour on the real model: prefix caching, stops, streaming text, seeds, logprobs, bad input."""

from __future__ import annotations

import time

import pytest
import torch

from tandem_worker.engine.llm_engine import LLMEngine
from tandem_worker.engine.loader import ModelNotFoundError
from tandem_worker.engine.sampling_params import RequestError, SamplingParams
from tandem_worker.engine.tokenizer import IncrementalDetokenizer, Tokenizer
from tandem_worker.llm import LLM, ChatPrompt

from .conftest import run_all

GREEDY8 = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
LONG_PREFIX = " ".join(f"Clause {i}: the tenant shall keep unit {i} tidy and quiet." for i in range(40))


def _generate_one(engine: LLMEngine, params: SamplingParams, **kw):
    rid = engine.add_request(params=params, **kw)
    return run_all(engine)[rid]


def test_shared_prefix_computes_only_new_tokens(engine):
    engine.block_manager.reset_prefix_cache()
    bs = engine.config.block_size
    first = engine.tokenizer.encode(LONG_PREFIX + " Question: who keeps unit 3 tidy?")
    second = engine.tokenizer.encode(LONG_PREFIX + " Question: is unit 7 quiet at night?")
    shared = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
    assert shared > 20 * bs, "the prompts must share a long prefix"
    _generate_one(engine, GREEDY8, prompt_token_ids=first)

    before = engine.stats()["prefill_tokens_computed"]
    out = _generate_one(engine, GREEDY8, prompt_token_ids=second)
    computed = engine.stats()["prefill_tokens_computed"] - before
    assert out.num_cached_tokens == (shared // bs) * bs
    assert computed == len(second) - out.num_cached_tokens

    # Same output when everything is recomputed.
    engine.block_manager.reset_prefix_cache()
    before = engine.stats()["prefill_tokens_computed"]
    fresh = _generate_one(engine, GREEDY8, prompt_token_ids=second)
    assert engine.stats()["prefill_tokens_computed"] - before == len(second)
    assert fresh.num_cached_tokens == 0
    assert fresh.token_ids == out.token_ids


def test_stop_string_token_and_length(engine):
    prompt = "The capital of France is"
    base = _generate_one(engine, SamplingParams(max_tokens=12, temperature=0), prompt=prompt)
    assert "." in base.text, base.text  # greedy: " Paris.\n\n..."
    cut = base.text.index(".")

    out = _generate_one(engine, SamplingParams(max_tokens=12, temperature=0, stop=["."]), prompt=prompt)
    assert out.finish_reason == "stop" and out.stop_reason == "."
    assert out.text == base.text[:cut]

    first = base.token_ids[0]
    out = _generate_one(
        engine, SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[first]), prompt=prompt
    )
    assert out.token_ids == [first] and out.finish_reason == "stop" and out.stop_reason == first

    out = _generate_one(engine, SamplingParams(max_tokens=3, temperature=0), prompt=prompt)
    assert out.token_ids == base.token_ids[:3] and out.finish_reason == "length"


def test_streamed_deltas_add_up_and_never_leak_a_stop_string(engine):
    prompt = "Count: one, two, three, four, five, six,"
    rid = engine.add_request(prompt, SamplingParams(max_tokens=20, temperature=0, stop=[" nine"]))
    pieces, final = [], None
    while engine.has_unfinished():
        for o in engine.step():
            if o.request_id == rid:
                pieces.append(o.new_text)
                assert " nine" not in "".join(pieces)
                final = o
    assert "".join(pieces) == final.text
    if final.finish_reason == "stop":
        assert final.stop_reason == " nine"


@pytest.mark.parametrize("path", ["decode_stream", "window"])
def test_incremental_detokenizer_never_splits_multibyte_characters(engine, path, monkeypatch):
    tok = engine.tokenizer
    if path == "window":  # what a tokenizer without a Rust backend gets
        monkeypatch.setattr(Tokenizer, "backend", property(lambda self: None))
    text = "東京は日本の首都で、🚀🌍 Ωμέγα — naïve café"
    ids = tok.encode(text)
    assert any("\ufffd" in tok.hf.decode([t]) for t in ids), "the text must split characters across tokens"
    detok = IncrementalDetokenizer(tok, tok.encode("Hi"))
    assert (detok.backend is None) == (path == "window")
    deltas = [detok.push(t) for t in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tok.decode(ids) == text


def test_seeded_sampling_is_independent_of_batching(engine):
    params = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, seed=1234)
    alone = _generate_one(engine, params, prompt="My favourite animal is").token_ids
    rids = [engine.add_request("Write a list of fruits:", SamplingParams(max_tokens=6, temperature=1.0))]
    target = engine.add_request("My favourite animal is", params)
    rids.append(
        engine.add_request("In the beginning", SamplingParams(max_tokens=12, temperature=0.7, seed=9))
    )
    batched = run_all(engine)[target].token_ids
    assert batched == alone
    other = _generate_one(
        engine,
        SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, seed=4321),
        prompt="My favourite animal is",
    )
    assert other.token_ids != alone


def test_logprobs_match_transformers(engine, hf_model):
    out = _generate_one(
        engine,
        SamplingParams(max_tokens=6, temperature=0, logprobs=True, ignore_eos=True),
        prompt="Roses are red,",
    )
    ids = out.prompt_token_ids + out.token_ids
    with torch.inference_mode():
        logits = hf_model(torch.tensor([ids])).logits[0].float()
    n = len(out.prompt_token_ids)
    expected = torch.log_softmax(logits[n - 1 : -1], -1).gather(1, torch.tensor(out.token_ids)[:, None])[:, 0]
    assert out.logprobs is not None and len(out.logprobs) == 6
    assert torch.allclose(torch.tensor(out.logprobs), expected, atol=1e-3)


def test_top_logprobs_match_transformers(engine, hf_model):
    k = 5
    out = _generate_one(
        engine,
        SamplingParams(max_tokens=6, temperature=0, top_logprobs=k, ignore_eos=True),
        prompt="Roses are red,",
    )
    ids = out.prompt_token_ids + out.token_ids
    with torch.inference_mode():
        logits = hf_model(torch.tensor([ids])).logits[0].float()
    n = len(out.prompt_token_ids)
    ref = torch.log_softmax(logits[n - 1 : -1], -1)
    assert out.top_logprobs is not None and len(out.top_logprobs) == len(out.token_ids) == 6
    assert out.logprobs is not None and len(out.logprobs) == 6  # implied
    for pos, top in enumerate(out.top_logprobs):
        tokens, values = [t for t, _ in top], [lp for _, lp in top]
        assert len(top) == k and len(set(tokens)) == k
        # Greedy: the chosen token leads, with the same logprob as reported for it.
        assert tokens[0] == out.token_ids[pos] and values[0] == pytest.approx(out.logprobs[pos], abs=1e-6)
        # Each listed value is transformers' for that token, most likely first, and no token
        # transformers ranks higher than the last listed is missing (up to float noise).
        assert values == pytest.approx(ref[pos, tokens].tolist(), abs=1e-3)
        assert values == sorted(values, reverse=True)
        assert float(ref[pos].topk(k + 1).values[-1]) <= values[-1] + 1e-3


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt_token_ids": []}, "prompt"),
        ({"prompt_token_ids": [1] * 8192}, "prompt"),
        ({"prompt_token_ids": [49152]}, "prompt_token_ids"),
    ],
)
def test_bad_prompt_is_refused_before_any_work_and_others_keep_running(engine, kwargs, field):
    good = engine.add_request("The sky is", GREEDY8)
    engine.step()
    blocks_before = engine.block_manager.num_free_blocks
    with pytest.raises(RequestError) as err:
        engine.add_request(params=SamplingParams(max_tokens=4), **kwargs)
    assert err.value.field == field
    assert engine.num_unfinished == 1 and engine.block_manager.num_free_blocks == blocks_before
    assert run_all(engine)[good].finish_reason == "length"


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"temperature": -0.5}, "temperature"),
    ],
)
def test_bad_sampling_params_name_the_field(params, field):
    with pytest.raises(RequestError) as err:
        SamplingParams(**params)
    assert err.value.field == field and field in str(err.value)


def test_request_that_can_never_fit_the_kv_cache(model_dir):
    tiny = LLMEngine(model=str(model_dir), kv_cache_bytes=8 * 16 * 2 * 30 * 3 * 64 * 4)  # 8 blocks
    assert tiny.block_manager.num_blocks == 8
    with pytest.raises(RequestError, match="never fit") as err:
        tiny.add_request(prompt_token_ids=list(range(100, 250)), params=SamplingParams(max_tokens=4))
    assert err.value.field == "prompt"
    with pytest.raises(RequestError, match="never fit") as err:
        tiny.add_request(prompt_token_ids=list(range(100, 110)), params=SamplingParams(max_tokens=200))
    assert err.value.field == "max_tokens"
    # What fits still runs, with preemption if it must.
    ok = [tiny.add_request(prompt_token_ids=list(range(100 + i, 140 + i)), params=GREEDY8) for i in range(4)]
    final = run_all(tiny)
    assert all(final[r].finish_reason == "length" for r in ok)
    assert tiny.block_manager.num_free_blocks == 8


def test_unknown_model_names_the_input_and_lists_builtins(tmp_path):
    with pytest.raises(ModelNotFoundError, match="smollm2-135m") as err:
        LLMEngine(model="no-such-model")
    assert "no-such-model" in str(err.value)
    with pytest.raises(FileNotFoundError, match="missing"):
        LLMEngine(model=str(tmp_path / "missing"))


def test_abort_frees_every_block(engine):
    rid = engine.add_request(LONG_PREFIX, SamplingParams(max_tokens=50))
    engine.step()
    assert engine.block_manager.stats().num_used > 0
    assert engine.abort(rid)
    assert engine.block_manager.stats().num_used == 0 and not engine.has_unfinished()
    assert not engine.abort(rid)


def test_llm_generate_keeps_input_order_and_validates_all_first(engine):
    llm = LLM.from_engine(engine)
    prompts = ["Name a colour:", ChatPrompt([{"role": "user", "content": "Say hi"}]), [504, 3250, 314]]
    outs = llm.generate(prompts, SamplingParams(max_tokens=4, temperature=0))
    assert [o.prompt_token_ids for o in outs] == [
        engine.tokenizer.encode("Name a colour:"),
        engine.tokenizer.chat_prompt("Say hi"),
        [504, 3250, 314],
    ]
    with pytest.raises(RequestError):
        llm.generate(["fine", ""], SamplingParams(max_tokens=4))
    assert not engine.has_unfinished()


def test_every_streamed_output_keeps_what_its_step_said(engine):
    # Outputs hold the request's growing lists and text, not copies (see RequestOutput): each must
    # still read as of its own step after the request has moved on and finished.
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=True, stop=["zzz"])
    rid = engine.add_request("Write a short poem about the sea:", params)
    seen = []
    while engine.has_unfinished():
        for o in engine.step():
            if o.request_id == rid:
                seen.append((o, list(o.token_ids), o.text, list(o.logprobs)))
    assert len(seen) == 12 and seen[-1][0].finished
    tokens, text = [], ""
    for out, token_ids, out_text, logprobs in seen:
        tokens += out.new_token_ids
        text += out.new_text
        assert out.token_ids == token_ids == tokens
        assert out.logprobs == logprobs and len(logprobs) == len(tokens)
        # Text is held back while it may still turn into the stop string ("zzz": 2 characters).
        assert out.text == out_text == text
    assert seen[-1][0].text == engine.tokenizer.decode(tokens)


def test_busy_time_lasts_until_the_step_tokens_are_read_back(engine, monkeypatch):
    # On a GPU the model runs asynchronously and the engine waits for it in the sampler's
    # read-back: the busy time the autoscaler divides by must include that wait. The engine's
    # clock only moves while the sampler "waits", so the figure is exact whatever the machine's load.
    import types

    from tandem_worker.engine import llm_engine

    clock = [0.0]
    monkeypatch.setattr(
        llm_engine, "time", types.SimpleNamespace(perf_counter=lambda: clock[0], monotonic=time.monotonic)
    )
    original = engine.sampler.sample

    def slow_sample(*args, **kwargs):
        clock[0] += 0.3  # stands in for waiting on the device
        return original(*args, **kwargs)

    monkeypatch.setattr(engine.sampler, "sample", slow_sample)
    before = engine.busy_seconds
    _generate_one(engine, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True), prompt="Hi")
    assert engine.busy_seconds - before == pytest.approx(3 * 0.3)


def test_a_turn_ends_at_an_eos_only_generation_config_lists(engine, model_dir, tmp_path):
    # Llama 3 Instruct ends a turn with <|eot_id|>, listed in generation_config.json but not as
    # config.json's eos_token_id: transformers stops there, so the engine must too.
    import json

    params = SamplingParams(max_tokens=6, temperature=0.0)
    free = _generate_one(engine, params, prompt="Name three colours.")
    assert len(free.token_ids) == 6 and free.finish_reason == "length"
    third = free.token_ids[2]
    assert third not in free.token_ids[:2]
    folder = tmp_path / "model"
    folder.mkdir()
    for f in model_dir.iterdir():
        if f.name != "generation_config.json":
            (folder / f.name).symlink_to(f)
    generation = json.loads((model_dir / "generation_config.json").read_text())
    generation["eos_token_id"] = [*engine.model_config.eos_token_ids, third]
    (folder / "generation_config.json").write_text(json.dumps(generation))
    chat = LLMEngine(model=str(folder), kv_cache_bytes=32 * 2**20)
    assert third in chat.eos_token_ids
    ended = _generate_one(chat, params, prompt="Name three colours.")
    assert ended.token_ids == free.token_ids[:3] and ended.finish_reason == "stop"


def _small_engine(engine, blocks: int, **kw) -> LLMEngine:
    """An engine on the same model whose KV cache holds exactly `blocks` blocks."""
    cfg = engine.model_config
    block_bytes = engine.config.block_size * cfg.kv_bytes_per_token(4)  # float32 on the CPU
    return LLMEngine(model=engine.config.model, kv_cache_bytes=blocks * block_bytes, **kw)


def test_a_request_whose_kv_fits_the_cache_exactly_is_served(engine):
    # 100 prompt tokens + 29 generated: the last token is sampled, never fed back, so the request
    # holds at most 128 tokens of KV, 8 blocks of 16; an 8-block cache serves it.
    small = _small_engine(engine, 8)
    assert small.block_manager.num_blocks == 8
    prompt = small.tokenizer.encode(" ".join(["word"] * 200))[:100]
    out = _generate_one(
        small, SamplingParams(max_tokens=29, temperature=0.0, ignore_eos=True), prompt_token_ids=prompt
    )
    assert len(out.token_ids) == 29 and out.finish_reason == "length"
    with pytest.raises(RequestError, match="max_tokens: 100 prompt tokens \\+ 30 max_tokens can never fit"):
        small.add_request(prompt_token_ids=prompt, params=SamplingParams(max_tokens=30))
    with pytest.raises(RequestError, match="prompt: 129 prompt tokens"):
        small.add_request(prompt_token_ids=prompt + prompt[:29], params=SamplingParams(max_tokens=1))


def test_fit_max_tokens_fits_each_request_not_the_callers_params(engine):
    # One params object for a batch (LLM.generate's usual call): the long prompt's lowered bound
    # was written into it, and cut the short prompt (and the caller's later calls) to 29 tokens.
    small = _small_engine(engine, 8)  # 128 tokens of KV
    prompt = small.tokenizer.encode(" ".join(["word"] * 200))[:100]
    params = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True, fit_max_tokens=True)
    outs = LLM.from_engine(small).generate([prompt, prompt[:5]], params)
    assert [len(o.token_ids) for o in outs] == [29, 60]
    assert params.max_tokens == 60


def test_an_aborted_request_hands_out_no_reservation(engine):
    # Its blocks are free again once it is aborted, and the next admission takes them: a KV pull
    # started from the reservation would overwrite that other request's KV.
    small = _small_engine(engine, 4)
    prompt = list(range(100, 130))
    remote = small.add_request(prompt_token_ids=prompt, params=GREEDY8, remote_kv=True)
    small.step()  # reserves its blocks
    small.abort(remote)
    local = small.add_request(prompt_token_ids=prompt, params=GREEDY8)
    small.step()  # admitted into the blocks the aborted request held
    assert [r.request_id for r in small.take_reservations()] == []
    assert small.scheduler.running[0].request_id == local


def test_cached_tokens_count_only_the_prompts_first_admission(engine):
    # Preempted and admitted again, a request hits the blocks it computed itself (prompt and
    # output): those are not the prompt's cache hits, which usage reports.
    small = _small_engine(engine, 8, max_num_batched_tokens=64)
    params = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    prompts = ["Tell me a story about a dragon.", "Write a poem about the moon.", "Explain how rain forms."]
    ids = [small.add_request(p, params) for p in prompts]
    final = run_all(small)
    assert small.stats()["preemptions"] > 0
    assert [final[i].num_cached_tokens for i in ids] == [0, 0, 0]  # no prompt shares a block with another
    assert small.stats()["prefix_cached_tokens"] == 0
