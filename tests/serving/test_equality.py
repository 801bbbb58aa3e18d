"""Served outputs equal the offline engine's, token for token, through every deployment shape."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from tandem_proto.v1 import inference_pb2 as pb
from tandem_worker.server.convert import FINISH_TO_PB as FINISH

from .conftest import offline_generate
from .procs import generate, greedy, request, sampling

pytestmark = pytest.mark.slow  # real processes: seconds to minutes

LONG_PROMPT = (
    " ".join(
        f"Paragraph {i}: the river town of Elmsford kept {i * 3} lanterns along its quay, and every "
        f"evening the keeper counted them twice before walking home across the stone bridge."
        for i in range(1, 17)
    )
    + " Summarise the story so far:"
)

CHAT = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Name three primary colours."},
]

PROMPTS = {
    "short": "The capital of France is",
    "long": LONG_PROMPT,
    "chat": CHAT,
    "non-ascii": "Grüße aus München! 日本語のテキスト — «ça va?» 🎉 Translate to English:",
    "token-ids": [504, 3458, 282, 253, 1345, 28, 2060, 314],
    "code": "def fibonacci(n):\n    ",
}

# 20 distinct prompts for the concurrency test: the ones above and 14 more of varied lengths.
MANY = list(PROMPTS.values()) + [
    f"Story {i}: once upon a time, " + "in a faraway land " * (i % 5) + f"there lived a {w}"
    for i, w in enumerate(
        [
            "fox",
            "king",
            "robot",
            "baker",
            "dragon",
            "sailor",
            "cat",
            "wizard",
            "child",
            "owl",
            "poet",
            "miner",
            "giant",
            "clock",
        ]
    )
]


@pytest.fixture(scope="module")
def references(offline):
    """The offline engine's greedy outputs (16 tokens, EOS ignored) for MANY, computed in one batch."""
    outs = offline_generate(offline, MANY, greedy(16))
    return {i: o for i, o in enumerate(outs)}


def test_long_prompt_is_long(offline):
    assert 550 <= len(offline.tokenizer.encode(LONG_PROMPT)) <= 700


def _check(result, ref, what: str) -> None:
    assert result.prompt_token_ids == ref.prompt_token_ids, what
    assert result.token_ids == ref.token_ids, f"{what}: tokens differ from the offline engine's"
    assert result.text == ref.text, f"{what}: streamed text differs from the offline engine's"
    assert result.finish_reason == pb.FINISH_REASON_LENGTH, what
    assert result.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert result.usage.completion_tokens == len(ref.token_ids) == 16
    assert result.messages > 1, f"{what}: the text should stream in several messages"


@pytest.mark.parametrize("shape", ["1+1", "2+2", "colocated"])
def test_greedy_equals_offline(cluster, references, shape):
    r = {"1+1": cluster.r11, "2+2": cluster.r22, "colocated": cluster.rc}[shape]
    for i, (name, prompt) in enumerate(PROMPTS.items()):
        _check(generate(r, request(prompt, greedy(16))), references[i], f"{shape} {name}")


def test_twenty_concurrent_streams_through_2p2d(cluster, references):
    prefill_before = {
        w.name: w.metric("tandem_kv_transfer_bytes_total", direction="sent") for w in (cluster.p0, cluster.p1)
    }
    decode_before = {
        w.name: w.metric("tandem_kv_transfer_bytes_total", direction="received")
        for w in (cluster.d0, cluster.d1)
    }
    with ThreadPoolExecutor(len(MANY)) as ex:
        results = list(ex.map(lambda p: generate(cluster.r22, request(p, greedy(16))), MANY))
    for i, res in enumerate(results):
        _check(res, references[i], f"stream {i}")
    # The router spread the work: every prefill worker sent KV and every decode worker received some.
    for w in (cluster.p0, cluster.p1):
        assert w.metric("tandem_kv_transfer_bytes_total", direction="sent") > prefill_before[w.name], w.name
    for w in (cluster.d0, cluster.d1):
        received = w.metric("tandem_kv_transfer_bytes_total", direction="received")
        assert received > decode_before[w.name], w.name


def test_disaggregated_requests_are_prefilled_by_prefill_workers(cluster, references):
    """Prompt tokens are computed on prefill workers and only cross the wire to decode workers."""
    p0, d0 = cluster.p0, cluster.d0
    sent0 = p0.metric("tandem_kv_transfer_bytes_total", direction="sent")
    computed0 = p0.metric("tandem_prefill_tokens_computed_total", role="prefill")
    received0 = d0.metric("tandem_kv_transfer_bytes_total", direction="received")
    decode_computed0 = d0.metric("tandem_prefill_tokens_computed_total", role="decode")
    prompt = "A fresh prompt that no prefix cache has seen: the seven wonders of the ancient world are"
    res = generate(cluster.r11, request(prompt, greedy(4)))
    n = len(res.prompt_token_ids)
    assert p0.metric("tandem_prefill_tokens_computed_total", role="prefill") - computed0 >= n - 16
    sent = p0.metric("tandem_kv_transfer_bytes_total", direction="sent") - sent0
    received = d0.metric("tandem_kv_transfer_bytes_total", direction="received") - received0
    assert sent > 0 and received == sent
    # SmolLM2: 30 layers x 3 KV heads x 64 dims x 4 bytes x (K, V) per token.
    assert sent == n * 30 * 3 * 64 * 4 * 2
    assert d0.metric("tandem_prefill_tokens_computed_total", role="decode") == decode_computed0
    assert d0.metric("tandem_decode_tokens_total", role="decode") > 0


SEEDED = ["Once upon a time", "My favourite food is", CHAT]


def test_seeded_sampling_same_through_1p1d_colocated_and_offline(cluster, offline):
    params = sampling(max_tokens=16, temperature=0.8, seed=1234, ignore_eos=True)
    refs = offline_generate(offline, SEEDED, params)
    greedy_refs = offline_generate(offline, SEEDED, greedy(16))
    for prompt, ref in zip(SEEDED, refs):
        disagg = generate(cluster.r11, request(prompt, params))
        coloc = generate(cluster.rc, request(prompt, params))
        assert disagg.token_ids == coloc.token_ids, prompt
        assert disagg.token_ids == ref.token_ids, prompt
        assert disagg.text == coloc.text == ref.text
    # Sampling really happened (otherwise the test proves nothing).
    assert any(r.token_ids != g.token_ids for r, g in zip(refs, greedy_refs))


def test_penalties_bias_and_min_p_through_1p1d_equal_offline(cluster, offline):
    """The prefill worker samples the first token with the prompt's repetition penalty and the
    bias, the decode worker the rest with everything: as one engine does, sampled and greedy."""
    penalties = {
        "repetition_penalty": 1.3,
        "frequency_penalty": 0.5,
        "presence_penalty": 0.25,
        "logit_bias": {28: 3.0, 30: -5.0},  # "," favoured, "." disfavoured
    }
    seeded = sampling(max_tokens=16, temperature=0.8, seed=5, min_p=0.1, **penalties)
    for params in (greedy(16, **penalties), seeded):
        refs = offline_generate(offline, SEEDED, params)
        for prompt, ref in zip(SEEDED, refs):
            assert generate(cluster.r11, request(prompt, params)).token_ids == ref.token_ids, prompt
    plain = offline_generate(offline, SEEDED, greedy(16))
    penalized = offline_generate(offline, SEEDED, greedy(16, **penalties))
    assert any(a.token_ids != b.token_ids for a, b in zip(plain, penalized))


def test_structured_outputs_through_1p1d_equal_offline(cluster, offline):
    """The prefill worker samples the first token under the grammar; the decode worker compiles it
    again, takes that token and goes on: as one engine does, greedy and sampled, for each kind."""
    person = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 16},
            "age": {"type": "integer", "maximum": 99},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    ask = [{"role": "user", "content": "Describe a person in JSON."}]
    cases = [
        (ask, greedy(40, structured_outputs=pb.StructuredOutputs(json=json.dumps(person)))),
        (
            ask,
            sampling(
                max_tokens=40,
                temperature=0.8,
                seed=3,
                structured_outputs=pb.StructuredOutputs(json_object=True),
            ),
        ),
        (
            PROMPTS["short"],
            greedy(12, structured_outputs=pb.StructuredOutputs(regex=" [A-Z][a-z]+, [A-Z][a-z]+\\.")),
        ),
        (
            PROMPTS["short"],
            greedy(
                8,
                structured_outputs=pb.StructuredOutputs(
                    choice=pb.StructuredOutputs.Choices(values=["Rome", "Paris"])
                ),
            ),
        ),
    ]
    for prompt, params in cases:
        (ref,) = offline_generate(offline, [prompt], params)
        res = generate(cluster.r11, request(prompt, params))
        assert res.token_ids == ref.token_ids and res.text == ref.text, params
        assert res.finish_reason == FINISH[ref.finish_reason]
    assert set(json.loads(generate(cluster.r11, request(*cases[0])).text)) == {"name", "age"}
    # A grammar that cannot compile never reaches a worker: the router names it.
    bad = greedy(4, structured_outputs=pb.StructuredOutputs(grammar="start: nothing_here"))
    with pytest.raises(grpc.RpcError) as ei:
        generate(cluster.r11, request(PROMPTS["short"], bad))
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "nothing_here" in ei.value.details()


@pytest.mark.parametrize("shape", ["1+1", "colocated"])
def test_prompt_logprobs_equal_offline(cluster, offline, shape):
    """The prefill worker computes them with the prompt and hands them over with the KV; a
    colocated worker computes them itself. Both as the offline engine, on the first message only."""
    r = {"1+1": cluster.r11, "colocated": cluster.rc}[shape]
    cases = (greedy(4, prompt_logprobs=0), sampling(max_tokens=3, temperature=0.8, seed=2, prompt_logprobs=3))
    for params in cases:
        (ref,) = offline_generate(offline, [LONG_PROMPT], params)
        res = generate(r, request(LONG_PROMPT, params))
        assert res.token_ids == ref.token_ids
        assert res.prompt_logprobs_messages == 1
        assert len(res.prompt_logprobs) == len(res.prompt_token_ids) - 1
        assert res.prompt_logprobs == pytest.approx(ref.prompt_logprobs[1:], abs=1e-4)
        if params.prompt_logprobs:
            want = [[t for t, _ in p] for p in ref.prompt_top_logprobs[1:]]
            assert [[t for t, _ in p] for p in res.prompt_top_logprobs] == want
        else:
            assert res.prompt_top_logprobs == []
    # The prompt is in the prefix caches now, yet computed whole again for its log-probabilities.
    assert generate(r, request(LONG_PROMPT, greedy(1))).usage.cached_prompt_tokens > 0
    again = generate(r, request(LONG_PROMPT, greedy(1, prompt_logprobs=0)))
    assert again.usage.cached_prompt_tokens == 0
    assert again.prompt_logprobs == pytest.approx(res.prompt_logprobs, abs=1e-4)


def test_top_logprobs_through_1p1d_equal_offline(cluster, offline):
    """The first position's come from the prefill worker with the KV, the rest from decode."""
    params = sampling(max_tokens=8, temperature=0.8, seed=7, ignore_eos=True, top_logprobs=4)
    (ref,) = offline_generate(offline, [PROMPTS["short"]], params)
    res = generate(cluster.r11, request(PROMPTS["short"], params))
    assert res.token_ids == ref.token_ids
    assert len(res.top_logprobs) == len(res.logprobs) == 8
    for pos, (got, want) in enumerate(zip(res.top_logprobs, ref.top_logprobs)):
        assert [t for t, _ in got] == [t for t, _ in want], pos
        assert [lp for _, lp in got] == pytest.approx([lp for _, lp in want], abs=1e-4), pos
    assert res.logprobs == pytest.approx(ref.logprobs, abs=1e-4)


@pytest.mark.parametrize("shape", ["1+1", "colocated"])
def test_stop_string_cuts_text(cluster, references, offline, shape):
    r = {"1+1": cluster.r11, "colocated": cluster.rc}[shape]
    idx = list(PROMPTS).index("short")
    full = references[idx].text
    # A stop string that straddles a token boundary, in the second half of the text.
    k = len(full) // 2
    stop = full[k : k + 4]
    assert stop.strip(), full
    cut = full.find(stop)
    params = greedy(16, stop=["no such words anywhere", stop])
    res = generate(r, request(PROMPTS["short"], params))
    assert res.text == full[:cut]
    assert stop not in res.text
    assert res.finish_reason == pb.FINISH_REASON_STOP
    assert res.stop_reason == stop
    assert len(res.token_ids) < 16
    assert res.token_ids == references[idx].token_ids[: len(res.token_ids)]
    # The offline engine applies stop strings the same way.
    (ref,) = offline_generate(offline, [PROMPTS["short"]], params)
    assert ref.text == res.text and ref.stop_reason == stop


@pytest.mark.parametrize("at", [0, 5])
def test_stop_token_id(cluster, references, at):
    """Also when the stop token is the first one, which the prefill worker samples."""
    idx = list(PROMPTS).index("code")
    ref = references[idx]
    stop_id = ref.token_ids[at]
    first = ref.token_ids.index(stop_id)
    res = generate(cluster.r11, request(PROMPTS["code"], greedy(16, stop_token_ids=[stop_id])))
    assert res.finish_reason == pb.FINISH_REASON_STOP
    assert res.token_ids == ref.token_ids[: first + 1]


@pytest.mark.parametrize("shape", ["1+1", "colocated"])
def test_single_token(cluster, references, shape):
    """max_tokens 1: the prefill worker's first token is the whole answer."""
    r = {"1+1": cluster.r11, "colocated": cluster.rc}[shape]
    res = generate(r, request(PROMPTS["short"], greedy(1)))
    assert res.token_ids == references[0].token_ids[:1]
    assert res.finish_reason == pb.FINISH_REASON_LENGTH


def test_list_models(cluster):
    from tandem_proto.v1 import inference_pb2_grpc as pbgrpc

    resp = pbgrpc.InferenceStub(cluster.r11.channel).ListModels(pb.ListModelsRequest(), timeout=10)
    assert [m.id for m in resp.models] == ["smollm2-135m"]
    assert resp.models[0].max_model_len == 8192
