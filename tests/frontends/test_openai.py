"""The OpenAI-compatible HTTP API of a real router, through the official `openai` client: the same
text as the tandem.v1 gRPC path, streaming with server-sent events, adapters by model name, and
errors in OpenAI's shape with the right status."""

from __future__ import annotations

import http.client
import json
import re
import socket
import time
import urllib.error
import urllib.request

import grpc
import openai
import pytest
import torch

from tandem_proto.v1 import inference_pb2 as pb
from tandem_worker.server.openai_http import from_rpc
from tests.frontends.conftest import ADAPTER, SERVED
from tests.serving.procs import HOST, assert_idle, generate, greedy, request, sampling

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Name three colours."}]
GREEDY = {"temperature": 0.0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def client(deployment):
    with openai.OpenAI(base_url=deployment.http + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def grpc_text(deployment):
    """The gRPC path's greedy text for PROMPT and for CHAT (16 tokens, EOS ignored)."""
    return {
        "text": generate(deployment.router, request(PROMPT, greedy(16))),
        "chat": generate(deployment.router, request(CHAT, greedy(16))),
    }


def test_models_lists_base_and_adapters(client):
    models = {m.id: m for m in client.models.list().data}
    assert SERVED in models and ADAPTER in models, models
    assert models[SERVED].object == "model"
    assert models[ADAPTER].model_extra.get("parent") == SERVED
    assert models[SERVED].model_extra.get("max_model_len", 0) > 0
    assert client.models.retrieve(ADAPTER).id == ADAPTER


def test_completion_equals_grpc(client, grpc_text):
    ref = grpc_text["text"]
    r = client.completions.create(model=SERVED, prompt=PROMPT, max_tokens=16, **GREEDY)
    assert r.object == "text_completion" and len(r.choices) == 1
    assert r.choices[0].text == ref.text and ref.text
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert r.usage.completion_tokens == 16
    assert r.usage.total_tokens == r.usage.prompt_tokens + 16


def test_completion_stream_with_usage(client, grpc_text):
    chunks = list(
        client.completions.create(
            model=SERVED,
            prompt=PROMPT,
            max_tokens=16,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    text_chunks = [c for c in chunks if c.choices]
    assert len(text_chunks) >= 3, "the text is streamed in several events"
    assert "".join(c.choices[0].text for c in text_chunks) == grpc_text["text"].text
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == "length"
    assert all(c.usage is None for c in text_chunks)
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 16
    assert last.usage.prompt_tokens == len(grpc_text["text"].prompt_token_ids)


def test_chat_equals_grpc(client, grpc_text):
    ref = grpc_text["chat"]
    r = client.chat.completions.create(model=SERVED, messages=CHAT, max_completion_tokens=16, **GREEDY)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.text and ref.text
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids) and r.usage.completion_tokens == 16


def test_chat_with_names_is_served_through_the_models_template(client, grpc_text):
    # SmolLM2's template renders no names: the same prompt and answer as without them (a template
    # that renders them gets them: tests/test_router_text.py).
    ref = grpc_text["chat"]
    named = [dict(m, name=f"speaker_{i}") for i, m in enumerate(CHAT)]
    r = client.chat.completions.create(model=SERVED, messages=named, max_completion_tokens=16, **GREEDY)
    assert r.choices[0].message.content == ref.text
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids)


def test_chat_stream(client, grpc_text):
    stream = client.chat.completions.create(
        model=SERVED,
        messages=CHAT,
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
        **GREEDY,
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert sum(1 for piece in content if piece) >= 3
    assert "".join(content) == grpc_text["chat"].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]


def test_chat_stream_without_usage_has_no_usage_chunk(client):
    chunks = list(client.chat.completions.create(model=SERVED, messages=CHAT, max_tokens=4, stream=True))
    assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)


def test_adapter_selected_by_model_name(client, deployment):
    ref = generate(deployment.router, request(PROMPT, greedy(12), adapter=ADAPTER))
    base = generate(deployment.router, request(PROMPT, greedy(12)))
    assert ref.text != base.text, "the test adapter must change the output for this check to mean anything"
    r = client.completions.create(model=ADAPTER, prompt=PROMPT, max_tokens=12, **GREEDY)
    assert r.model == ADAPTER and r.choices[0].text == ref.text


def test_seed_and_stop(client, deployment):
    kw = {"model": SERVED, "prompt": PROMPT, "max_tokens": 12, "temperature": 1.0, "seed": 1234}
    a = client.completions.create(**kw, extra_body={"ignore_eos": True})
    b = client.completions.create(**kw, extra_body={"ignore_eos": True})
    ref = generate(
        deployment.router,
        request(PROMPT, sampling(max_tokens=12, temperature=1.0, seed=1234, ignore_eos=True)),
    )
    assert a.choices[0].text == b.choices[0].text == ref.text
    full = client.completions.create(model=SERVED, prompt=PROMPT, max_tokens=16, **GREEDY).choices[0].text
    words = full.split()
    assert len(words) >= 3, full
    stop = " " + words[2]
    r = client.completions.create(model=SERVED, prompt=PROMPT, max_tokens=16, stop=[stop], **GREEDY)
    assert r.choices[0].text == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"


def test_stop_token_ids_end_the_completion_at_that_token(client, deployment, grpc_text):
    # vLLM's extension, as its clients send it: it was silently ignored, the text ran to max_tokens.
    full = grpc_text["text"]
    stop = full.token_ids[len(full.token_ids) // 2]
    k = full.token_ids.index(stop)
    r = client.completions.create(
        model=SERVED,
        prompt=PROMPT,
        max_tokens=16,
        temperature=0.0,
        extra_body={"ignore_eos": True, "stop_token_ids": [stop]},
    )
    ref = generate(deployment.router, request(PROMPT, greedy(16, stop_token_ids=[stop])))
    assert r.choices[0].text == ref.text and len(ref.text) < len(full.text)
    assert full.text.startswith(ref.text)
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == k + 1
    with pytest.raises(openai.BadRequestError) as ei:
        client.completions.create(
            model=SERVED, prompt=PROMPT, max_tokens=4, extra_body={"stop_token_ids": ["\n"]}
        )
    assert _error_body(ei.value)["param"] == "stop_token_ids"


def test_chat_logprobs(client, deployment):
    ref = generate(deployment.router, request(CHAT, greedy(6, logprobs=True)))
    r = client.chat.completions.create(model=SERVED, messages=CHAT, max_tokens=6, logprobs=True, **GREEDY)
    content = r.choices[0].logprobs.content
    assert len(content) == 6 and all(t.logprob <= 0 for t in content)
    assert "".join(t.token for t in content) == r.choices[0].message.content == ref.text


@pytest.mark.parametrize("stream", [False, True])
def test_chat_top_logprobs_equal_grpc(client, deployment, stream):
    ref = generate(deployment.router, request(CHAT, greedy(6, top_logprobs=3)))
    kw = {"model": SERVED, "messages": CHAT, "max_tokens": 6, "logprobs": True, "top_logprobs": 3, **GREEDY}
    if stream:
        content = [
            entry
            for chunk in client.chat.completions.create(**kw, stream=True)
            if chunk.choices and chunk.choices[0].logprobs
            for entry in chunk.choices[0].logprobs.content
        ]
    else:
        content = client.chat.completions.create(**kw).choices[0].logprobs.content
    assert len(content) == len(ref.top_logprobs) == 6
    for entry, want in zip(content, ref.top_logprobs):
        alts = entry.top_logprobs
        # Greedy: the chosen token is the most likely one, listed first with the same logprob.
        assert [a.token for a in alts][0] == entry.token and alts[0].logprob == pytest.approx(entry.logprob)
        assert [a.logprob for a in alts] == pytest.approx([lp for _, lp in want], abs=1e-6)
        assert all(a.bytes and all(0 <= b < 256 for b in a.bytes) for a in alts)
    # Each entry's bytes are its token's own: joined, they are the text.
    assert b"".join(bytes(e.bytes) for e in content).decode() == ref.text


def test_completion_logprobs_n_lists_the_most_likely_and_the_sampled(client):
    r = client.completions.create(
        model=SERVED,
        prompt=PROMPT,
        max_tokens=6,
        logprobs=2,
        temperature=1.5,
        seed=11,
        extra_body={"ignore_eos": True},
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert "".join(lp.tokens) == r.choices[0].text
    for tok, tok_lp, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        # The two most likely, and the sampled token when it is not one of them (OpenAI's rule).
        assert 2 <= len(top) <= 3 and top[tok] == pytest.approx(tok_lp)
        if len(top) == 3:  # listed beside the two most likely: it is less likely than both
            assert all(tok_lp <= v + 1e-6 for t, v in top.items() if t != tok)
    # At temperature 1.5 some sampled token is not among the two most likely (else, a weak test).
    assert any(len(top) == 3 for top in lp.top_logprobs)


def test_top_logprobs_need_logprobs_and_a_bound(client):
    for kw, param in (
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ):
        with pytest.raises(openai.BadRequestError) as ei:
            client.chat.completions.create(model=SERVED, messages=CHAT, max_tokens=2, **kw)
        assert _error_body(ei.value)["param"] == param
    with pytest.raises(openai.BadRequestError) as ei:
        client.completions.create(model=SERVED, prompt=PROMPT, max_tokens=2, logprobs=21)
    assert _error_body(ei.value)["param"] == "logprobs"


def _error_body(e: openai.APIStatusError) -> dict:
    body = e.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def test_unknown_model_is_404(client, deployment):
    for call in (
        lambda: client.completions.create(model="no-such-model", prompt=PROMPT, max_tokens=2),
        lambda: client.chat.completions.create(
            model="no-such-model", messages=CHAT, max_tokens=2, stream=True
        ),
        lambda: client.models.retrieve("no-such-model"),
    ):
        with pytest.raises(openai.NotFoundError) as ei:
            call()
        err = _error_body(ei.value)
        assert "no-such-model" in err["message"] and err["code"] == "model_not_found"
        # Nothing of the deployment's insides: no worker address, no path on a worker's disk.
        assert "127.0.0.1" not in err["message"] and "/" not in err["message"], err["message"]
    assert_idle(deployment.workers)


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"n": 0}, "n"),
        ({"n": 17}, "n"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
        ({"prompt": [1] * 9000}, "prompt"),  # refused by the router: longer than the model's context
        # Past their protobuf fields' ranges: refused by name, not a dropped connection.
        ({"max_tokens": 5_000_000_000}, "max_tokens"),
        ({"extra_body": {"top_k": 2**31}}, "top_k"),
        ({"extra_body": {"top_k": -2}}, "top_k"),
        ({"prompt": [2**32]}, "prompt"),
        # vLLM's, which would keep the stop string in the text: refused, never silently ignored.
        ({"extra_body": {"include_stop_str_in_output": True}}, "include_stop_str_in_output"),
        # Past 64 bits a seed would be folded onto another one (2^64 onto 0).
        ({"seed": 2**64}, "seed"),
    ],
)
def test_bad_parameter_is_400(client, kwargs, param):
    args = {"model": SERVED, "prompt": PROMPT, "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as ei:
        client.completions.create(**args)
    err = _error_body(ei.value)
    assert err["param"] == param and err["type"] == "invalid_request_error", err


def test_a_request_the_frontend_refuses_is_counted_as_invalid(client, deployment):
    # The router counts the requests it refuses; one refused by the frontend never reached it and
    # was counted nowhere, so the dashboard's invalid rate missed it.
    before = deployment.router.metric("tandem_requests_total", outcome="invalid")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(
            model=SERVED, prompt=PROMPT, max_tokens=4, extra_body={"use_beam_search": True}
        )
    assert deployment.router.metric("tandem_requests_total", outcome="invalid") == before + 1


def test_a_lone_surrogate_is_400_not_a_dropped_connection(deployment):
    # What JavaScript sends after cutting an emoji in half: valid JSON ("\ud83e"), not valid text.
    bodies = {
        "/v1/completions": {"model": SERVED, "prompt": "half an emoji: \ud83e", "max_tokens": 2},
        "/v1/chat/completions": {
            "model": SERVED,
            "messages": [{"role": "user", "content": "\ud83e"}],
            "max_tokens": 2,
        },
    }
    for path, body in bodies.items():
        data = json.dumps(body).encode()  # ASCII, the surrogate escaped
        post = urllib.request.Request(
            deployment.http + path, data=data, headers={"Content-Type": "application/json"}
        )
        with pytest.raises(urllib.error.HTTPError) as ei:
            urllib.request.urlopen(post, timeout=30)
        assert ei.value.code == 400
        assert "invalid request" in json.loads(ei.value.read())["error"]["message"]
    assert_idle(deployment.workers)


def test_chat_bad_message_is_400(client):
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(
            model=SERVED, messages=[{"role": "function", "content": "x"}], max_tokens=2
        )
    assert _error_body(ei.value)["param"] == "messages[0].role"  # OpenAI's older role: tool turns now


def test_deadline_is_504(client):
    with pytest.raises(openai.APIStatusError) as ei:
        client.completions.create(
            model=SERVED, prompt=PROMPT, max_tokens=200, extra_headers={"X-Request-Timeout": "0.05"}
        )
    assert ei.value.status_code == 504
    assert _error_body(ei.value)["code"] == "deadline_exceeded"


@pytest.mark.parametrize("seconds", ["inf", "1e12"])
def test_a_deadline_beyond_any_wait_is_none(client, seconds):
    # gRPC deadlines that far out overflow and expire at once: they must mean "no deadline".
    r = client.completions.create(
        model=SERVED, prompt=PROMPT, max_tokens=2, extra_headers={"X-Request-Timeout": seconds}
    )
    assert r.usage.completion_tokens == 2


@pytest.mark.parametrize("chat", [False, True])
def test_n_choices_are_the_requests_with_seeds_seed_plus_i(client, deployment, chat):
    # Choice i is the request with seed + i: choice 0 is the answer with n 1, the others differ.
    seeded = {"max_tokens": 12, "temperature": 1.0, "seed": 21}
    prompt = CHAT if chat else PROMPT
    want = [
        generate(deployment.router, request(prompt, sampling(**seeded | {"seed": 21 + i}))) for i in range(3)
    ]
    assert len({w.text for w in want}) > 1
    extra = {"model": SERVED, "max_tokens": 12, "temperature": 1.0, "seed": 21, "n": 3}
    if chat:
        r = client.chat.completions.create(messages=CHAT, **extra)
        texts = [c.message.content for c in r.choices]
    else:
        r = client.completions.create(prompt=PROMPT, **extra)
        texts = [c.text for c in r.choices]
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert texts == [w.text for w in want]
    assert [c.finish_reason for c in r.choices] == [{1: "stop", 2: "length"}[w.finish_reason] for w in want]
    # The prompt once, every choice's tokens.
    assert r.usage.prompt_tokens == len(want[0].prompt_token_ids)
    assert r.usage.completion_tokens == sum(w.usage.completion_tokens for w in want)
    # Streamed: each chunk names its choice; joined per choice, the same texts; usage at the end.
    stream_kwargs = {"stream": True, "stream_options": {"include_usage": True}}
    if chat:
        chunks = list(client.chat.completions.create(messages=CHAT, **extra, **stream_kwargs))
        pieces = [(c.choices[0].index, c.choices[0].delta.content or "") for c in chunks if c.choices]
    else:
        chunks = list(client.completions.create(prompt=PROMPT, **extra, **stream_kwargs))
        pieces = [(c.choices[0].index, c.choices[0].text) for c in chunks if c.choices]
    assert ["".join(t for i, t in pieces if i == k) for k in range(3)] == texts
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens and not chunks[-1].choices
    assert_idle(deployment.workers)


def test_n_choices_past_the_admission_bound_are_429_and_leave_nothing_running(deployment):
    with openai.OpenAI(
        base_url=deployment.limited_http + "/v1", api_key="x", max_retries=0, timeout=120
    ) as c:
        with pytest.raises(openai.RateLimitError):
            c.completions.create(
                model=SERVED, prompt=PROMPT, max_tokens=500, n=2, extra_body={"ignore_eos": True}
            )
    assert_idle(deployment.workers, timeout=20)


def test_overload_is_429(deployment):
    """The router's admission bound (--max-in-flight 1) answers a second request with 429."""
    with openai.OpenAI(
        base_url=deployment.limited_http + "/v1", api_key="x", max_retries=0, timeout=120
    ) as c:
        busy = c.completions.create(
            model=SERVED,
            prompt=PROMPT,
            max_tokens=2000,
            stream=True,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        try:
            next(iter(busy))  # admitted and running
            with pytest.raises(openai.RateLimitError) as ei:
                c.completions.create(model=SERVED, prompt=PROMPT, max_tokens=2)
            err = _error_body(ei.value)
            assert err["code"] == "server_overloaded" and "in flight" in err["message"]
        finally:
            busy.close()  # disconnects: the running request is cancelled
    assert_idle(deployment.workers, timeout=20)


def test_status_mapping():
    class Err(grpc.RpcError):
        def __init__(self, code, details):
            self._c, self._d = code, details

        def code(self):
            return self._c

        def details(self):
            return self._d

    cases = {
        grpc.StatusCode.INVALID_ARGUMENT: 400,
        grpc.StatusCode.NOT_FOUND: 404,
        grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
        grpc.StatusCode.UNAVAILABLE: 503,
        grpc.StatusCode.DEADLINE_EXCEEDED: 504,
        grpc.StatusCode.INTERNAL: 500,
    }
    for code, status in cases.items():
        assert from_rpc(Err(code, "max_tokens: bad"), "m", False).status == status
    assert (
        from_rpc(Err(grpc.StatusCode.INVALID_ARGUMENT, "max_tokens: bad"), "m", False).param == "max_tokens"
    )
    assert from_rpc(Err(grpc.StatusCode.INVALID_ARGUMENT, "prompt: too long"), "m", True).param == "messages"


def test_health_and_unknown_route(deployment):
    with urllib.request.urlopen(deployment.http + "/health", timeout=10) as r:
        assert r.status == 200
    with pytest.raises(urllib.error.HTTPError) as ei:
        urllib.request.urlopen(deployment.http + "/v1/nothing", timeout=10)
    assert ei.value.code == 404 and "error" in json.loads(ei.value.read())


@pytest.mark.parametrize(("stream", "n"), [(True, 1), (False, 1), (True, 3), (False, 3)])
def test_client_disconnect_cancels_upstream(deployment, stream, n):
    """Closing the connection mid-request frees the KV blocks of the request (each of its n
    choices) on both workers long before its 2000 tokens could have been generated."""
    body = json.dumps(
        {
            "model": SERVED,
            "prompt": PROMPT,
            "max_tokens": 2000,
            "ignore_eos": True,
            "temperature": 0,
            "stream": stream,
            "n": n,
        }
    )
    port = int(deployment.http.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection(HOST, port, timeout=60)
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    if stream:
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.fp.readline()  # the first event's chunk has arrived: it is running
    else:
        time.sleep(1.5)
        assert deployment.d0.stats().in_flight == n
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    t0 = time.monotonic()
    assert_idle(deployment.workers, timeout=20)
    assert time.monotonic() - t0 < 20


def test_a_model_id_is_percent_decoded(deployment):
    # openai's models.retrieve() sends "org%2Fmodel" for the Hugging Face id "org/model".
    with urllib.request.urlopen(deployment.http + "/v1/models/sm%6Fl", timeout=30) as r:
        assert json.loads(r.read())["id"] == SERVED


def test_json_nested_too_deeply_is_400_not_a_dropped_connection(deployment):
    data = b"[" * 100_000 + b"]" * 100_000
    post = urllib.request.Request(
        deployment.http + "/v1/completions", data=data, headers={"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as ei:
        urllib.request.urlopen(post, timeout=30)
    assert ei.value.code == 400 and "nested too deeply" in json.loads(ei.value.read())["error"]["message"]


def test_text_parts_are_separate_lines(client):
    # ["Translate to French:", "Good morning"] is two pieces of text, not "French:Good".
    def prompt_tokens(content) -> int:
        r = client.chat.completions.create(
            model=SERVED, messages=[{"role": "user", "content": content}], max_tokens=1
        )
        return r.usage.prompt_tokens

    parts = [{"type": "text", "text": "Translate to French:"}, {"type": "text", "text": "Good morning"}]
    assert prompt_tokens(parts) == prompt_tokens("Translate to French:\nGood morning")
    assert prompt_tokens(parts) != prompt_tokens("Translate to French:Good morning")


def test_chat_on_an_adapter_without_max_tokens_is_served(client):
    # The rest of the context is more KV than the worker holds beside the adapter: it lowers the
    # bound instead of refusing the request (a 400 naming max_tokens, which the client never sent).
    client.completions.create(model=ADAPTER, prompt="Hi", max_tokens=1)  # the adapter now in memory
    r = client.chat.completions.create(
        model=ADAPTER, messages=[{"role": "user", "content": "Say hi."}], stop=[" ", "\n"], **GREEDY
    )
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens >= 1


def test_an_http_1_0_client_gets_a_plain_stream_ended_by_the_close(deployment):
    # RFC 9112: no chunked encoding to an HTTP/1.0 client; the stream ends when the connection does.
    body = json.dumps({"model": SERVED, "prompt": PROMPT, "max_tokens": 2, "stream": True}).encode()
    host, port = deployment.http.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(b"POST /v1/completions HTTP/1.0\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    head, _, stream = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.") and b" 200 " in head.split(b"\r\n")[0]
    assert b"transfer-encoding" not in head.lower()
    events = [e for e in stream.split(b"\n\n") if e]
    assert all(e.startswith(b"data: ") for e in events) and events[-1] == b"data: [DONE]", events


def test_top_k_minus_one_is_disabled_as_vllm_clients_send_it(client):
    plain = client.completions.create(model=SERVED, prompt=PROMPT, max_tokens=4, **GREEDY)
    off = client.completions.create(
        model=SERVED,
        prompt=PROMPT,
        max_tokens=4,
        temperature=0.0,
        extra_body={"ignore_eos": True, "top_k": -1},
    )
    assert off.choices[0].text == plain.choices[0].text


@pytest.mark.parametrize(
    ("chat", "field", "value"),
    [
        # Features the engine does not have: ignoring them would change the output in silence.
        (False, "skip_special_tokens", False),
        (False, "guided_decoding_backend", "xgrammar"),
        (False, "use_beam_search", True),
        (True, "response_format", {"type": "structural_tag"}),
        (True, "tool_choice", "required"),
        (True, "reasoning_effort", "high"),
        (True, "add_generation_prompt", False),
        (True, "presence_penalty", True),  # a bool is not the penalty 1
        # Another endpoint's field: max_completion_tokens would have left completions at 16 tokens.
        (False, "max_completion_tokens", 2),
        (False, "top_logprobs", 2),
        (False, "tools", [{"type": "function", "function": {"name": "f"}}]),
        (True, "prompt", "x"),
        # A misspelling, or a field of a newer API: OpenAI's own answer is the same 400.
        (False, "max_token", 2),
        (True, "temprature", 0.5),
    ],
)
def test_an_unsupported_field_is_refused_by_name(client, chat, field, value):
    with pytest.raises(openai.BadRequestError) as ei:
        if chat:
            client.chat.completions.create(
                model=SERVED, messages=CHAT, max_tokens=2, extra_body={field: value}
            )
        else:
            client.completions.create(model=SERVED, prompt=PROMPT, max_tokens=2, extra_body={field: value})
    err = _error_body(ei.value)
    assert err["param"] == field and field in err["message"], err


@pytest.mark.parametrize("chat", [False, True])
def test_penalties_and_logit_bias_are_served_as_through_grpc(client, deployment, chat):
    prompt = CHAT if chat else PROMPT
    plain = generate(deployment.router, request(prompt, greedy(16)))
    # The greedy answer's first token banned, the second one's favoured: both change the answer.
    bias = {plain.token_ids[0]: -100.0, plain.token_ids[1]: 5.0}
    openai_fields = {
        "frequency_penalty": 0.5,
        "presence_penalty": 0.25,
        "logit_bias": {str(k): v for k, v in bias.items()},  # JSON's keys are strings
    }
    extra = {"ignore_eos": True, "repetition_penalty": 1.3}
    wire = greedy(16, frequency_penalty=0.5, presence_penalty=0.25, repetition_penalty=1.3, logit_bias=bias)
    want = generate(deployment.router, request(prompt, wire))
    assert want.token_ids != plain.token_ids and want.token_ids[0] != plain.token_ids[0]
    if chat:
        r = client.chat.completions.create(
            model=SERVED, messages=CHAT, max_tokens=16, temperature=0, extra_body=extra, **openai_fields
        )
        assert r.choices[0].message.content == want.text
    else:
        r = client.completions.create(
            model=SERVED, prompt=PROMPT, max_tokens=16, temperature=0, extra_body=extra, **openai_fields
        )
        assert r.choices[0].text == want.text


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
WHO = [{"role": "user", "content": "Describe a person in JSON."}]


def test_structured_outputs_are_served_as_through_grpc(client, deployment):
    wire = sampling(
        max_tokens=40, temperature=0.0, structured_outputs=pb.StructuredOutputs(json=json.dumps(PERSON))
    )
    want = generate(deployment.router, request(WHO, wire))
    assert want.finish_reason == pb.FINISH_REASON_STOP and set(json.loads(want.text)) == {"name", "age"}
    schema = {"name": "person", "schema": PERSON, "strict": True}
    r = client.chat.completions.create(
        model=SERVED,
        messages=WHO,
        max_tokens=40,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": schema},
    )
    assert r.choices[0].message.content == want.text and r.choices[0].finish_reason == "stop"
    # vLLM's request object and its older field, on the completions endpoint.
    yes_no = {"max_tokens": 8, "temperature": 0.0}
    want = generate(
        deployment.router,
        request(PROMPT, sampling(**yes_no, structured_outputs=pb.StructuredOutputs(regex=" [A-Z][a-z]+\\."))),
    )
    for extra in ({"structured_outputs": {"regex": " [A-Z][a-z]+\\."}}, {"guided_regex": " [A-Z][a-z]+\\."}):
        r = client.completions.create(model=SERVED, prompt=PROMPT, extra_body=extra, **yes_no)
        assert r.choices[0].text == want.text and re.fullmatch(r" [A-Z][a-z]+\.", want.text), extra
    r = client.completions.create(
        model=SERVED, prompt=PROMPT, extra_body={"guided_choice": ["Paris", "Lyon"]}, **yes_no
    )
    assert r.choices[0].text in ("Paris", "Lyon") and r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        (
            {"response_format": {"type": "json_object"}, "guided_regex": "a"},
            "response_format",
            "one structured",
        ),
        ({"structured_outputs": {"regex": "([0-9]"}}, "structured_outputs", "unclosed group"),
        ({"guided_json": {"type": "nope"}}, "structured_outputs", "nope"),
        ({"structured_outputs": {"choice": "yes"}}, "structured_outputs", "list"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format",
            "schema",
        ),
    ],
)
def test_a_bad_structured_output_is_a_400_naming_it(client, deployment, fields, param, words):
    err = chat_refused(client, deployment, CHAT, fields)
    assert err["param"] == param and words in err["message"], err


def chat_refused(client, deployment, messages: list[dict], fields: dict) -> dict:
    """The error body of the 400 a chat request with these extra fields gets; nothing is left
    running on the workers."""
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model=SERVED, messages=messages, max_tokens=2, extra_body=fields)
    assert_idle(deployment.workers)
    return _error_body(ei.value)


def test_min_tokens_defers_the_end_as_through_grpc(client, deployment):
    short = [{"role": "user", "content": "Say just the word: yes"}]
    plain = generate(deployment.router, request(short, sampling(max_tokens=40, temperature=0.0)))
    assert plain.usage.completion_tokens < 12, "the answer should end early without min_tokens"
    want = generate(
        deployment.router, request(short, sampling(max_tokens=40, temperature=0.0, min_tokens=12))
    )
    assert want.usage.completion_tokens >= 12
    r = client.chat.completions.create(
        model=SERVED, messages=short, max_tokens=40, temperature=0, extra_body={"min_tokens": 12}
    )
    assert r.choices[0].message.content == want.text
    assert r.usage.completion_tokens == want.usage.completion_tokens


def test_min_p_is_served_as_through_grpc(client, deployment):
    sampled = {"max_tokens": 16, "temperature": 1.5, "seed": 11, "ignore_eos": True}
    want = generate(deployment.router, request(PROMPT, sampling(**sampled, min_p=0.2)))
    r = client.completions.create(
        model=SERVED,
        prompt=PROMPT,
        max_tokens=16,
        temperature=1.5,
        seed=11,
        extra_body={"ignore_eos": True, "min_p": 0.2},
    )
    assert r.choices[0].text == want.text


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("presence_penalty", 2.5),
        ("frequency_penalty", -3),
        ("repetition_penalty", 0),
        ("repetition_penalty", -1.0),
        ("min_p", 1.5),
        ("min_tokens", -1),
        ("min_tokens", 3),  # more than max_tokens (2): the engine's refusal
        ("logit_bias", {"12": 101}),
        ("logit_bias", {"twelve": 1}),
        ("logit_bias", {"-1": 1}),
        ("logit_bias", [12]),
        ("logit_bias", {"49152": 1}),  # past the vocabulary: the worker's refusal
    ],
)
def test_a_sampling_control_out_of_range_is_refused_by_name(client, field, value):
    with pytest.raises(openai.BadRequestError) as ei:
        client.completions.create(model=SERVED, prompt=PROMPT, max_tokens=2, extra_body={field: value})
    err = _error_body(ei.value)
    assert err["param"] == field and field in err["message"], err


def test_off_values_and_bookkeeping_fields_are_accepted(client, grpc_text):
    # What OpenAI's and vLLM's clients send by default (penalties 0, n 1, ...) and fields that change
    # nothing in the output: the request runs, with the text it has without them.
    ref = grpc_text["chat"]
    r = client.chat.completions.create(
        model=SERVED,
        messages=CHAT,
        max_tokens=16.0,  # an integral float is the integer (as vLLM takes it)
        temperature=0,
        n=1,
        presence_penalty=0,
        frequency_penalty=0.0,
        logit_bias={},
        response_format={"type": "text"},
        tool_choice="none",
        user="u-1",
        metadata={"team": "a"},
        store=False,
        extra_body={
            "ignore_eos": True,
            "repetition_penalty": 1.0,
            "min_tokens": 0,
            "min_p": 0,
            "skip_special_tokens": True,
            "guided_json": None,
        },
    )
    assert r.choices[0].message.content == ref.text and ref.text
    assert r.usage.completion_tokens == 16


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        # An earlier turn's tool call would vanish from the conversation the model sees.
        (
            [
                {"role": "user", "content": "hi"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                    ],
                },
            ],
            "messages[1].tool_calls",
        ),
        # Not text: a number is not the text "5", a missing text not "".
        ([{"role": "user", "content": [{"type": "text", "text": 5}]}], "messages[0].content"),
        ([{"role": "user", "content": [{"type": "text"}]}], "messages[0].content"),
        # A name the template would render as "5" or nothing.
        ([{"role": "user", "content": "hi", "name": 5}], "messages[0].name"),
        ([{"role": "user", "content": "hi", "name": ""}], "messages[0].name"),
    ],
)
def test_a_message_that_would_lose_its_meaning_is_refused(client, messages, param):
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model=SERVED, messages=messages, max_tokens=2)
    assert _error_body(ei.value)["param"] == param


@pytest.mark.parametrize(
    "options",
    [
        {"include_usage": "false"},  # a string: "false" is not false
        {"continuous_usage_stats": True},  # vLLM's usage in every chunk: not sent here
        {"include_usages": True},
    ],
)
def test_stream_options_are_checked(client, options):
    with pytest.raises(openai.BadRequestError) as ei:
        client.completions.create(
            model=SERVED, prompt=PROMPT, max_tokens=2, stream=True, stream_options=options
        )
    assert _error_body(ei.value)["param"] == "stream_options"


def _raw_post(deployment, head: bytes, body: bytes) -> bytes:
    """One request written as given, on a connection of its own; the whole reply until the close."""
    host, port = deployment.http.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + head + b"\r\n" + body
        )
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    return reply


def _status(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


BODY = json.dumps({"model": SERVED, "prompt": PROMPT, "max_tokens": 1}).encode()


def test_a_well_framed_body_is_served(deployment):
    # The baseline for the refusals below: both framings, one of them with a trailer.
    assert _status(_raw_post(deployment, b"Content-Length: %d\r\n" % len(BODY), BODY)) == 200
    chunked = b"%x\r\n%s\r\n0\r\nX-Trailer: 1\r\n\r\n" % (len(BODY), BODY)
    assert _status(_raw_post(deployment, b"Transfer-Encoding: chunked\r\n", chunked)) == 200


@pytest.mark.parametrize(
    ("head", "body", "status"),
    [
        # Framings int() takes and HTTP does not (RFC 9110 8.6, RFC 9112 7.1): a proxy in front would
        # read the body's end elsewhere.
        (b"Content-Length: +%d\r\n" % len(BODY), BODY, 400),
        (b"Transfer-Encoding: chunked\r\n", b"0x%x\r\n%s\r\n0\r\n\r\n" % (len(BODY), BODY), 400),
        # A coding the server cannot undo (gzip): its body was read as plain JSON.
        (b"Transfer-Encoding: gzip\r\nContent-Length: %d\r\n" % len(BODY), BODY, 501),
    ],
)
def test_a_malformed_framing_is_refused(deployment, head, body, status):
    assert _status(_raw_post(deployment, head, body)) == status


def test_a_trailer_after_a_chunked_body_does_not_become_the_next_request(deployment):
    host, port = deployment.http.removeprefix("http://").split(":")
    chunked = b"%x\r\n%s\r\n0\r\nX-Trailer: 1\r\n\r\n" % (len(BODY), BODY)
    first = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked
    second = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(first + second)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    # Each response's status line (the first one's JSON body ends without a newline).
    statuses = [int(x) for x in re.findall(rb"HTTP/1\.1 (\d{3}) ", reply)]
    assert statuses == [200, 200], reply[-300:]


def test_echo_with_logprobs_scores_a_continuation_as_transformers_does(client, hf_model, hf_tokenizer):
    # lm-evaluation-harness's loglikelihood request: context + continuation as token ids, echo, one
    # token, logprobs 1; the continuation's score is the sum of its tokens' log-probabilities.
    context, continuation = hf_tokenizer.encode("The capital of France is"), hf_tokenizer.encode(" Paris.")
    ids = context + continuation
    r = client.completions.create(
        model=SERVED, prompt=[ids], max_tokens=1, temperature=0, logprobs=1, echo=True
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[0] is None
    assert lp.top_logprobs[0] is None and all(1 <= len(t) <= 2 for t in lp.top_logprobs[1:])
    with torch.inference_mode():
        want = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].float(), dim=-1)
    want_score = sum(float(want[i - 1, ids[i]]) for i in range(len(context), len(ids)))
    assert sum(lp.token_logprobs[len(context) : len(ids)]) == pytest.approx(want_score, abs=1e-3)
    greedy_ids = want[len(context) - 1 : len(ids) - 1].argmax(-1).tolist()
    is_greedy = all(
        tok == max(top, key=top.get)
        for tok, top in zip(lp.tokens[len(context) : len(ids)], lp.top_logprobs[len(context) : len(ids)])
    )
    assert is_greedy == (greedy_ids == continuation)
    assert r.choices[0].text.startswith(hf_tokenizer.decode(ids))


@pytest.mark.parametrize("stream", [False, True])
def test_echo_puts_the_prompt_and_its_logprobs_first(client, deployment, stream):
    want = generate(
        deployment.router,
        request(
            PROMPT, sampling(max_tokens=4, temperature=0.0, logprobs=True, top_logprobs=2, prompt_logprobs=2)
        ),
    )
    n = len(want.prompt_token_ids)
    kwargs = {
        "model": SERVED,
        "prompt": PROMPT,
        "max_tokens": 4,
        "temperature": 0,
        "logprobs": 2,
        "echo": True,
    }
    if stream:
        chunks = [c for c in client.completions.create(stream=True, **kwargs) if c.choices]
        text = "".join(c.choices[0].text for c in chunks)
        lp = {
            k: [x for c in chunks if c.choices[0].logprobs for x in getattr(c.choices[0].logprobs, k)]
            for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")
        }
    else:
        choice = client.completions.create(**kwargs).choices[0]
        text, lp = (
            choice.text,
            {
                k: getattr(choice.logprobs, k)
                for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")
            },
        )
    assert text == PROMPT + want.text
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:n] == pytest.approx(want.prompt_logprobs, abs=1e-5)
    assert lp["token_logprobs"][n:] == pytest.approx(want.logprobs, abs=1e-5)
    assert len(lp["tokens"]) == n + 4 and all(len(t) in (2, 3) for t in lp["top_logprobs"][1:])
    assert lp["text_offset"][n] == len(PROMPT) and lp["text_offset"] == sorted(lp["text_offset"])
    # Without logprobs, the text alone; chat has no echo.
    plain = client.completions.create(model=SERVED, prompt=PROMPT, max_tokens=4, temperature=0, echo=True)
    assert plain.choices[0].text == PROMPT + want.text and plain.choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=SERVED, messages=CHAT, max_tokens=2, extra_body={"echo": True})


@pytest.mark.parametrize("stream", [False, True])
def test_a_list_of_prompts_answers_each_n_times_in_order(client, deployment, stream):
    # Evaluation harnesses send their batches so: choice k n + j is prompt k's j-th (seed + j).
    prompts = [PROMPT, "Once upon a time", [504, 3458, 282, 253]]
    want = [
        generate(deployment.router, request(p, sampling(max_tokens=6, temperature=0.8, seed=5 + j)))
        for p in prompts
        for j in range(2)
    ]
    kwargs = {"model": SERVED, "prompt": prompts, "n": 2, "max_tokens": 6, "temperature": 0.8, "seed": 5}
    if stream:
        texts = [""] * 6
        usage = None
        for c in client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs):
            for choice in c.choices:
                texts[choice.index] += choice.text
            usage = c.usage or usage
    else:
        r = client.completions.create(**kwargs)
        assert [c.index for c in r.choices] == list(range(6))
        texts, usage = [c.text for c in r.choices], r.usage
    assert texts == [w.text for w in want]
    assert usage.prompt_tokens == sum(len(w.prompt_token_ids) for w in want[::2])
    assert usage.completion_tokens == sum(w.usage.completion_tokens for w in want)
    if not stream:  # each choice echoes its own prompt
        echoed = client.completions.create(echo=True, **{**kwargs, "prompt": prompts[:2]})
        assert [c.text for c in echoed.choices] == [
            p + w.text for p, w in zip([PROMPT] * 2 + [prompts[1]] * 2, want)
        ]
    with pytest.raises(openai.BadRequestError) as ei:
        client.completions.create(**{**kwargs, "prompt": [PROMPT] * 65})
    assert _error_body(ei.value)["param"] == "prompt"
    assert_idle(deployment.workers)


def _post_json(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_tokenize_gives_the_ids_the_router_prompts_with_and_detokenize_the_text(deployment, grpc_text):
    status, body = _post_json(deployment.http + "/tokenize", {"model": SERVED, "prompt": PROMPT})
    assert status == 200 and body["tokens"] == list(grpc_text["text"].prompt_token_ids)
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] > 0
    status, body = _post_json(deployment.http + "/tokenize", {"messages": CHAT, "return_token_strs": True})
    assert status == 200 and body["tokens"] == list(grpc_text["chat"].prompt_token_ids)
    assert len(body["token_strs"]) == body["count"] and "<|im_start|>" in body["token_strs"]
    status, body = _post_json(deployment.http + "/detokenize", {"tokens": list(grpc_text["text"].token_ids)})
    assert status == 200 and body["prompt"] == grpc_text["text"].text
    for path, bad, code, param in [
        ("/tokenize", {"prompt": "x", "messages": CHAT}, 400, "prompt"),
        ("/tokenize", {"prompt": "x", "add_special_tokens": False}, 400, "add_special_tokens"),
        ("/tokenize", {"model": "nope", "prompt": "x"}, 404, "model"),
        ("/detokenize", {"tokens": [1, -1]}, 400, "tokens"),
        ("/detokenize", {"tokens": "12"}, 400, "tokens"),
    ]:
        status, body = _post_json(deployment.http + path, bad)
        assert (status, body["error"]["param"]) == (code, param), (path, bad, body)


def test_tokenize_refuses_a_lone_surrogate_with_a_400(deployment):
    req = urllib.request.Request(
        deployment.http + "/tokenize",
        data=b'{"messages": [{"role": "user", "content": "\\ud83e"}]}',
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as ei:
        urllib.request.urlopen(req, timeout=30)
    assert ei.value.code == 400
