"""Tool calling through the OpenAI frontend, with the official client: a named function or
"required" calls generated under their schemas, as the message's tool_calls, streamed and not."""

from __future__ import annotations

import json

import openai
import pytest

from tandem_proto.v1 import inference_pb2 as pb
from tests import detokenizers
from tests.frontends.conftest import SERVED
from tests.frontends.test_openai import _error_body, chat_refused
from tests.serving.procs import generate, request, sampling

real_tok = detokenizers.real_tok  # a fixture, by assignment

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city now.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"timezone": {"type": "string", "maxLength": 20}},
            "required": ["timezone"],
            "additionalProperties": False,
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather like in Paris right now?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def client(deployment):
    with openai.OpenAI(base_url=deployment.http + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def valid_weather(arguments: str) -> dict:
    args = json.loads(arguments)
    assert set(args) == {"city", "unit"} and args["unit"] in ("celsius", "fahrenheit"), args
    assert isinstance(args["city"], str) and len(args["city"]) <= 20
    return args


def test_a_named_function_is_called_with_arguments_under_its_schema(client, deployment):
    r = client.chat.completions.create(
        model=SERVED, messages=ASK, tools=[WEATHER, TIME], tool_choice=NAMED, max_tokens=40, temperature=0
    )
    choice = r.choices[0]
    assert choice.finish_reason == "stop" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    valid_weather(call.function.arguments)
    # The arguments are the answer under the parameters' schema (this model's template shows no
    # tools, so the prompt is the same).
    schema = pb.StructuredOutputs(json=json.dumps(WEATHER["function"]["parameters"]))
    want = generate(
        deployment.router, request(ASK, sampling(max_tokens=40, temperature=0.0, structured_outputs=schema))
    )
    assert call.function.arguments == want.text
    # Streamed: the id and name come first, then the arguments as they are generated.
    chunks = list(
        client.chat.completions.create(
            model=SERVED,
            messages=ASK,
            tools=[WEATHER],
            tool_choice=NAMED,
            max_tokens=40,
            temperature=0,
            stream=True,
        )
    )
    deltas = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert len(deltas) >= 2 and deltas[0][0].id and deltas[0][0].function.name == "get_weather"
    assert all(d[0].id is None and d[0].index == 0 for d in deltas[1:])
    assert "".join(d[0].function.arguments for d in deltas) == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize("stream", [False, True])
def test_required_makes_calls_of_the_given_tools(client, stream):
    kwargs = {
        "model": SERVED,
        "messages": ASK,
        "tools": [WEATHER, TIME],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "max_tokens": 60,
        "temperature": 0,
    }
    if stream:
        chunks = [c for c in client.chat.completions.create(stream=True, **kwargs) if c.choices]
        calls = [t for c in chunks if c.choices[0].delta.tool_calls for t in c.choices[0].delta.tool_calls]
        finish = chunks[-1].choices[0].finish_reason
    else:
        choice = client.chat.completions.create(**kwargs).choices[0]
        calls, finish = choice.message.tool_calls, choice.finish_reason
        assert choice.message.content is None
    assert finish == "tool_calls" and len(calls) == 1  # one call: parallel_tool_calls false
    assert calls[0].function.name in ("get_weather", "get_time") and calls[0].id.startswith("call_")
    args = json.loads(calls[0].function.arguments)
    assert set(args) == ({"city", "unit"} if calls[0].function.name == "get_weather" else {"timezone"})


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"tools": [WEATHER]}, "tool_choice", "'auto' is not supported"),  # OpenAI's default with tools
        ({"tools": [WEATHER], "tool_choice": "auto"}, "tool_choice", "parser"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "nope",
        ),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        (
            {"tools": [{"type": "function", "function": {"name": "bad name"}}], "tool_choice": "required"},
            "tools",
            "bad name",
        ),
        ({"tools": [WEATHER, WEATHER], "tool_choice": "required"}, "tools", "twice"),
        (
            {"tools": [WEATHER], "tool_choice": NAMED, "response_format": {"type": "json_object"}},
            "tool_choice",
            "own schema",
        ),
        (
            {"tools": [WEATHER], "tool_choice": NAMED, "parallel_tool_calls": "yes"},
            "parallel_tool_calls",
            "boolean",
        ),
    ],
)
def test_bad_tool_requests_are_a_400_naming_the_field(client, deployment, fields, param, words):
    err = chat_refused(client, deployment, ASK, fields)
    assert err["param"] == param and words in err["message"], err


def test_tools_none_answers_in_text(client, deployment):
    r = client.chat.completions.create(
        model=SERVED, messages=ASK, tools=[WEATHER], tool_choice="none", max_tokens=8, temperature=0
    )
    want = generate(deployment.router, request(ASK, sampling(max_tokens=8, temperature=0.0)))
    assert r.choices[0].message.content == want.text and not r.choices[0].message.tool_calls


def test_an_earlier_call_this_template_cannot_show_is_refused(client):
    # SmolLM2's template reads no tool_calls: the call would vanish from the conversation.
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
    ]
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model=SERVED, messages=history, max_tokens=4)
    assert _error_body(ei.value)["param"] == "messages[1].tool_calls"
    with pytest.raises(openai.BadRequestError) as ei:  # a tool turn must name the call it answers
        client.chat.completions.create(
            model=SERVED, messages=[*ASK, {"role": "tool", "content": "x"}], max_tokens=4
        )
    assert _error_body(ei.value)["param"] == "messages[1].tool_call_id"


def test_required_keeps_each_tools_nested_definitions_apart(real_tok):
    # pydantic's schemas keep nested models in $defs, referred to from the schema's root: nested in
    # the list of calls, they move to its root under the tool's name (two tools' "Place" differ).
    import llguidance
    import pydantic

    from tandem_worker.engine import structured
    from tandem_worker.engine.sampling_params import StructuredOutputs
    from tandem_worker.server.openai_tools import ToolChoice

    class Place(pydantic.BaseModel):
        city: str

    class Weather(pydantic.BaseModel):
        place: Place

    class Zone(pydantic.BaseModel):
        offset: int

    class Time(pydantic.BaseModel):
        place: Zone

    Time.model_rebuild()
    tools = [
        {"type": "function", "function": {"name": "weather", "parameters": Weather.model_json_schema()}},
        {"type": "function", "function": {"name": "time", "parameters": Time.model_json_schema()}},
    ]
    assert "$defs" in tools[0]["function"]["parameters"]
    so = StructuredOutputs(json=json.dumps(ToolChoice(tools).schema()))
    structured.check(so)
    ll = llguidance.LLTokenizer(real_tok.backend.to_str())
    for text, ok in [
        ('[{"name": "weather", "parameters": {"place": {"city": "Paris"}}}]', True),
        ('[{"name": "time", "parameters": {"place": {"offset": 2}}}]', True),
        ('[{"name": "time", "parameters": {"place": {"city": "Paris"}}}]', False),  # weather's Place
    ]:
        m = llguidance.LLMatcher(ll, structured.grammar(so), log_level=0)
        assert (m.consume_tokens(real_tok.encode(text)) and m.is_accepting()) == ok, text


# --- tool_choice "auto", read in the Hermes format (Qwen2.5 and later, Hermes 2/3) -----------------

HERMES_ANSWER = (
    "Let me look that up.\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {"timezone": "CET"}}\n</tool_call>'
)


def test_hermes_blocks_are_calls_and_the_rest_content_at_every_split_of_the_stream():
    from tandem_worker.server.openai_tools import HermesStream, hermes_calls

    content, calls = hermes_calls(HERMES_ANSWER)
    assert content == "Let me look that up.\n\n"
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris", "unit": "celsius"}),
        ("get_time", {"timezone": "CET"}),
    ]
    for cut in range(1, len(HERMES_ANSWER)):  # streamed in two pieces, split anywhere
        stream = HermesStream()
        first, early = stream.feed(HERMES_ANSWER[:cut], final=False)
        rest, late = stream.feed(HERMES_ANSWER[cut:], final=True)
        assert "<" not in first or first.startswith("Let me look that up.")  # no half tag leaks out
        assert first + rest == content and [c["function"] for c in early + late] == [
            c["function"] for c in calls
        ]
    # Not a call: stays in the text as it was; a block left open at the end is still read.
    assert hermes_calls("a <tool_call>not json</tool_call> b") == ("a <tool_call>not json</tool_call> b", [])
    content, calls = hermes_calls('<tool_call>{"name": "f", "arguments": {}}')
    assert content is None and calls[0]["function"] == {"name": "f", "arguments": "{}"}
    assert hermes_calls("no calls at all") == ("no calls at all", [])


class _Canned:
    """A tandem.v1 Inference server answering every request with `text`, a few characters a
    message, as a worker streams; it keeps the requests it got."""

    def __init__(self, text: str) -> None:
        from tandem_worker.server.pb import inference_pb2_grpc as pbgrpc

        self.text, self.requests = text, []
        outer = self

        class Servicer(pbgrpc.InferenceServicer):
            def Generate(self, request, context):  # noqa: N802
                outer.requests.append(request)
                pieces = [outer.text[i : i + 7] for i in range(0, len(outer.text), 7)]
                for k, piece in enumerate(pieces):
                    last = k == len(pieces) - 1
                    msg = pb.GenerateResponse(text=piece, token_ids=[1])
                    if last:
                        msg.finish_reason = pb.FINISH_REASON_STOP
                        msg.usage.CopyFrom(pb.Usage(prompt_tokens=5, completion_tokens=len(pieces)))
                    yield msg

        self.servicer = Servicer()


@pytest.fixture
def hermes_frontend(model_dir):
    import concurrent.futures

    import grpc

    from tandem_worker.engine.tokenizer import Tokenizer
    from tandem_worker.server.openai_http import OpenAIFrontend, serve_openai_http
    from tandem_worker.server.pb import inference_pb2_grpc as pbgrpc

    canned = _Canned(HERMES_ANSWER)
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=4))
    pbgrpc.add_InferenceServicer_to_server(canned.servicer, server)
    upstream = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    fe = OpenAIFrontend(
        upstream, SERVED, 4096, Tokenizer(model_dir), lambda: [], lambda: True, tool_call_parser="hermes"
    )
    http = serve_openai_http("127.0.0.1", 0, fe)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{http.port}/v1", api_key="unused", max_retries=0)
    try:
        yield client, canned
    finally:
        client.close()
        http.stop()
        http.close()
        server.stop(None)


@pytest.mark.parametrize("stream", [False, True])
def test_auto_reads_the_models_own_calls_with_the_hermes_parser(hermes_frontend, stream):
    client, canned = hermes_frontend
    kwargs = {
        "model": SERVED,
        "messages": ASK,
        "tools": [WEATHER, TIME],
        "max_tokens": 64,
    }  # "auto": the default
    if stream:
        chunks = [c for c in client.chat.completions.create(stream=True, **kwargs) if c.choices]
        content = "".join(c.choices[0].delta.content or "" for c in chunks)
        calls = [t for c in chunks for t in c.choices[0].delta.tool_calls or []]
        finish = chunks[-1].choices[0].finish_reason
    else:
        choice = client.chat.completions.create(**kwargs).choices[0]
        content, calls, finish = choice.message.content, choice.message.tool_calls, choice.finish_reason
    assert finish == "tool_calls" and content == "Let me look that up.\n\n"
    assert [(c.index if stream else i, c.function.name) for i, c in enumerate(calls)] == [
        (0, "get_weather"),
        (1, "get_time"),
    ]
    assert json.loads(calls[0].function.arguments) == {"city": "Paris", "unit": "celsius"}
    assert all(c.id.startswith("call_") and c.type == "function" for c in calls)
    # The model generated freely (no schema), with the tools given to the chat template.
    sent = canned.requests[-1]
    assert not sent.sampling.HasField("structured_outputs")
    assert [t["function"]["name"] for t in json.loads(sent.chat.tools_json)] == ["get_weather", "get_time"]


def test_auto_without_calls_is_a_text_answer(hermes_frontend):
    client, canned = hermes_frontend
    canned.text = "It is sunny in Paris."
    choice = client.chat.completions.create(
        model=SERVED, messages=ASK, tools=[WEATHER], max_tokens=16
    ).choices[0]
    assert (choice.message.content, choice.message.tool_calls, choice.finish_reason) == (
        "It is sunny in Paris.",
        None,
        "stop",
    )
