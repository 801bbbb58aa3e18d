"""OpenAI-compatible HTTP frontend of the router: `/v1/models`, `/v1/completions`, `/v1/chat/completions`,
and vLLM's `/tokenize` and `/detokenize`.

What it serves: the base model and every LoRA adapter the workers know as model ids (`model:
"<adapter>"` selects that adapter); non-streaming responses and server-sent events (`data: {...}`,
then `data: [DONE]`), with `stream_options.include_usage` adding a last chunk that carries usage and
no choices; `max_tokens`/`max_completion_tokens`, `temperature`, `top_p`, `seed` (-1: no seed, as
vLLM reads it; see `request_seed`), `stop`, `presence_penalty`, `frequency_penalty`, `logit_bias`,
`n` up to 16 (choice i is the request with seed + i), completions' `prompt` as a list of prompts
(n choices each, prompt after prompt), log-probabilities (the sampled token's and
up to 20 most likely: chat's `logprobs`/`top_logprobs`, completions' `logprobs: N`; completions'
`echo` puts the prompt's text, and with logprobs its tokens' log-probabilities, first), structured
output (`response_format` json_object / json_schema, vLLM's `structured_outputs` and `guided_*`),
tool calls the client makes certain (`tool_choice` "required" or a named function; openai_tools.py),
and vLLM's `top_k`, `min_p`, `min_tokens`, `ignore_eos`, `stop_token_ids` and `repetition_penalty`
extensions. Any other field is refused by name (400), unless it changes nothing in the output
(`user`, `metadata`, `store`, ...) or holds the value that turns its feature off (`best_of: 1`,
`tools: []`, `echo: false`, ...; OFF_VALUES): what the engine cannot do is never dropped in
silence. Errors have OpenAI's shape `{"error": {"message", "type", "param", "code"}}` and status:
400 invalid, 404 unknown model or adapter, 429 overloaded, 503 no worker, 504 past the deadline (an
optional `X-Request-Timeout: SECONDS` header sets one). `GET /health` is 200 once the router can
serve.

Design choices:

* Upstream is the router's own `tandem.v1.Inference` port, over a loopback gRPC channel. The HTTP
  layer is then a pure protocol translator of the public API: validation, retries, admission
  (`--max-in-flight`), metrics, deadlines and cancellation are the gRPC path's own, so the two
  can never disagree, and the frontend needs no second implementation of the router or a fake
  `grpc.ServicerContext`. The cost is one loopback hop per streamed message (tens of
  microseconds, against milliseconds per decode step).
* The HTTP server is the standard library's `ThreadingHTTPServer` (no dependency in the worker
  image): the upstream gRPC calls are blocking iterators, so a thread per connection is the natural
  fit, and the router's admission bound (RESOURCE_EXHAUSTED, here 429) caps the work behind them.
  aiohttp would need the asyncio gRPC API or a thread per call anyway.
* A client that disconnects cancels the upstream call (which the router passes to the workers, who
  free the request's KV blocks): a watcher notices the socket closing while the request waits or
  runs, and a failed write does the same while streaming.
"""

from __future__ import annotations

import codecs
import itertools
import json
import logging
import queue
import select
import socket
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc

from ..engine.sampling_params import (
    MAX_TOP_LOGPROBS,
    SAMPLING_REQUEST_FIELDS,
    RequestError,
    StructuredOutputs,
    json_token_id,
    request_seed,
)
from ..engine.tokenizer import Tokenizer
from . import metrics
from .convert import structured_to_pb
from .handoff import Handoffs, forward
from .openai_tools import (
    TOOL_CALL_PARSERS,
    StreamedCalls,
    ToolChoice,
    ToolError,
    parse_tool_calls,
    parse_tools,
)
from .pb import inference_pb2 as pb
from .pb import inference_pb2_grpc as pbgrpc

log = logging.getLogger(__name__)

# Deadlines past this (about three years) mean none: a gRPC deadline that far out, or infinite,
# overflows and expires at once.
MAX_TIMEOUT_SECONDS = 1e8
# `n`: each choice is a request of its own upstream (its own admission slot, KV and metrics).
MAX_CHOICES = 16
# Completions' `prompt` may be a list of prompts (evaluation harnesses send batches so): n choices
# each, one upstream request per choice, and at most this many in all.
MAX_UPSTREAM = 128

FINISH = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_ABORT: "abort",
}

# gRPC status of the upstream call -> (HTTP status, OpenAI error type, error code)
STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", None),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error", None),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error", None),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error", "model_not_found"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "server_overloaded"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error", "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error", "deadline_exceeded"),
    grpc.StatusCode.CANCELLED: (499, "cancelled", "cancelled"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "invalid_request_error", "unsupported"),
}

# The router names the offending field first ("max_tokens: must be ..."); OpenAI calls a few of
# them differently.
PARAM_NAMES = {"prompt_token_ids": "prompt"}

# vLLM's older names for structured outputs (its clients still send them): field -> kind.
GUIDED_FIELDS = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}

# The fields `parse` reads, per endpoint. Any other field must be in NEUTRAL_FIELDS or OFF_VALUES, or
# the request is refused naming it (as OpenAI's own API does): a field ignored in silence would
# change what the client asked for (a penalty, a JSON schema, a second choice) without a word.
COMMON_FIELDS = frozenset(
    {
        "model",
        "n",
        "stream",
        "stream_options",
        "include_stop_str_in_output",
        "logprobs",
        "response_format",
        *SAMPLING_REQUEST_FIELDS,
        *GUIDED_FIELDS,
    }
)
CHAT_FIELDS = COMMON_FIELDS | {
    "messages",
    "max_completion_tokens",
    "top_logprobs",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "echo"}
# Accepted and ignored: bookkeeping and routing hints that change nothing in the output.
NEUTRAL_FIELDS = frozenset(
    {"user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier", "request_id"}
)
# The numeric fields read as they come, once in range: (JSON types, what they must be, the range
# check, the range as the error says it). The engine checks them again (RequestError).
BOUNDED_FIELDS: dict[str, tuple[tuple[type, ...], str, Callable[[Any], bool], str]] = {
    "temperature": ((int, float), "a number", lambda v: 0 <= v <= 2, "in [0, 2]"),
    "top_p": ((int, float), "a number", lambda v: 0 < v <= 1, "in (0, 1]"),
    # -1: disabled, as vLLM's clients send it (and 0)
    "top_k": ((int,), "an integer", lambda v: -1 <= v < 2**31, "-1 or 0 (disabled) or in [1, 2^31)"),
    "presence_penalty": ((int, float), "a number", lambda v: -2 <= v <= 2, "in [-2, 2]"),
    "frequency_penalty": ((int, float), "a number", lambda v: -2 <= v <= 2, "in [-2, 2]"),
    "repetition_penalty": (
        (int, float),
        "a number",
        lambda v: 0 < v < float("inf"),
        "a number > 0 (1: none)",
    ),
    "min_p": ((int, float), "a number", lambda v: 0 <= v <= 1, "in [0, 1]"),
    "min_tokens": ((int,), "an integer", lambda v: 0 <= v < 2**32, "in [0, 2^32)"),
}
# Features the engine does not have (OpenAI's and vLLM's names), accepted only at a value that turns
# them off, or null; any other value is refused. An empty tuple: only null.
OFF_VALUES: dict[str, tuple[Any, ...]] = {
    "best_of": (1,),
    "length_penalty": (1,),
    "use_beam_search": (False,),
    "echo": (False,),
    "suffix": ("",),
    "tools": ([],),  # completions have no tools
    "functions": ([],),
    "tool_choice": ("none", "auto"),  # completions: both mean plain text
    "function_call": ("none", "auto"),
    "parallel_tool_calls": (True, False),  # completions: no tools, no calls
    "modalities": (["text"],),
    "skip_special_tokens": (True,),  # the detokenizer always skips them
    "spaces_between_special_tokens": (True,),
    "add_generation_prompt": (True,),  # the chat template is always applied with it
    "continue_final_message": (False,),
    "return_tokens_as_token_ids": (False,),
    "priority": (0,),
    "bad_words": ([],),
    "allowed_token_ids": (),
    "prompt_logprobs": (),
    "truncate_prompt_tokens": (),
    "logits_processors": (),
    "guided_decoding_backend": (),
    "guided_whitespace_pattern": (),
    "structural_tag": (),
    "chat_template": (),
    "chat_template_kwargs": ({},),
    "documents": (),
    "reasoning_effort": (),
    "verbosity": (),
    "web_search_options": (),
    "audio": (),
    "prediction": (),
}
# stream_options keys: include_usage is read; these are accepted at the value shown only.
STREAM_OPTION_OFF: dict[str, tuple[Any, ...]] = {
    "continuous_usage_stats": (False,),
    "include_obfuscation": (True, False),  # padding against side channels: no change to the text
}


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param, code="invalid_value")


def from_rpc(e: grpc.RpcError, model: str, chat: bool) -> ApiError:
    code, details = e.code(), e.details() or str(e.code())
    status, type_, err_code = STATUS.get(code, (500, "server_error", "internal_error"))
    param = None
    if status == 400 and ":" in details:
        head = details.split(":", 1)[0].strip()
        if head.replace("_", "").replace("[", "").replace("]", "").replace(".", "").isalnum():
            param = PARAM_NAMES.get(head, head)
            if chat and param == "prompt":
                param = "messages"
    if code == grpc.StatusCode.NOT_FOUND:
        param = "model"
        details = f"The model {model!r} does not exist or is not served here ({details})"
    return ApiError(status, details, type_, param, err_code)


class TextOffsets:
    """Where each generated token's text starts in the completion's text, in characters (the
    legacy `text_offset`). Counted from the tokens' bytes: a token holding part of a character
    decodes alone to one U+FFFD, so summing the lengths of single-token decodes drifts past the
    text with every character split across tokens (most CJK text and emoji)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tok = tokenizer
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.chars = 0

    def start_of(self, token_id: int) -> int:
        """The offset of `token_id`, the next token: of the character its first byte belongs to."""
        start = self.chars
        self.chars += len(self.utf8.decode(self.tok.token_bytes(token_id)))
        return start


@dataclass
class Parsed:
    """One OpenAI request, translated."""

    request: pb.GenerateRequest
    model: str
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    chat: bool = False
    timeout: float | None = None
    n: int = 1
    # Completions: the prompt's text (and with logprobs, its tokens' log-probabilities) comes first.
    echo: bool = False
    # Chat: the answer is this tool call (or calls), generated under its schema.
    tool_choice: ToolChoice | None = None
    # Completions: the prompts after the first (`request` holds the first), as text or token ids.
    more_prompts: list[str | list[int]] = field(default_factory=list)

    @property
    def choices(self) -> int:
        """n choices per prompt, prompt after prompt (choice k n + j is prompt k's j-th)."""
        return self.n * (1 + len(self.more_prompts))

    def prompt_request(self, choice: int) -> pb.GenerateRequest:
        """The request (before its choice's id and seed) that `choice` answers."""
        k = choice // self.n
        if k == 0:
            return self.request
        r = pb.GenerateRequest()
        r.CopyFrom(self.request)
        prompt = self.more_prompts[k - 1]
        if isinstance(prompt, str):
            r.text = prompt
        else:
            r.token_ids.ids[:] = prompt
        return r

    def choice_requests(self) -> list[pb.GenerateRequest]:
        """One upstream request per choice: ids `<id>-<i>`; with a seed, a prompt's choice j draws
        with seed + j (so choice 0 is the answer with n 1, and the others differ from it)."""
        out = []
        for i in range(self.choices):
            r = self.prompt_request(i)
            if r is self.request:
                r = pb.GenerateRequest()
                r.CopyFrom(self.request)
            r.request_id = f"{self.request.request_id}-{i}"
            if r.sampling.HasField("seed"):
                r.sampling.seed = (r.sampling.seed + i % self.n) % 2**64
            out.append(r)
        return out


class _Choices:
    """`n` upstream calls answered as one response's choices: their messages as (choice, message),
    in the order they arrive; the first error cancels the other calls and is raised. `cancel`
    cancels them all (a client gone)."""

    def __init__(self, calls: list[grpc.Call]) -> None:
        self.calls = calls
        self._arrived: queue.Queue = queue.Queue()
        for i, call in enumerate(calls):
            threading.Thread(target=self._read, args=(i, call), name="openai-choice", daemon=True).start()

    def _read(self, i: int, call: grpc.Call) -> None:
        try:
            for msg in call:
                self._arrived.put((i, msg))
            self._arrived.put((i, None))
        except grpc.RpcError as e:
            self._arrived.put((i, e))

    def cancel(self) -> None:
        for call in self.calls:
            call.cancel()

    def __iter__(self) -> Iterator[tuple[int, pb.GenerateResponse]]:
        running = len(self.calls)
        while running:
            i, item = self._arrived.get()
            if item is None:
                running -= 1
            elif isinstance(item, grpc.RpcError):
                self.cancel()
                raise item
            else:
                yield i, item


def _get(body: dict, key: str, types: tuple[type, ...], what: str) -> Any:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) and bool not in types:
        raise invalid(key, f"must be {what}, got {json.dumps(v)}")
    if int in types and float not in types and isinstance(v, float) and v.is_integer():
        # 16.0 is the integer 16 (Python clients serialise computed counts so; vLLM accepts them).
        return int(v)
    if not isinstance(v, types):
        raise invalid(key, f"must be {what}, got {json.dumps(v)[:80]}")
    return v


def _only(body: dict, fields: set[str]) -> None:
    """Refuse, by name as OpenAI's API does, a field not among `fields`."""
    unknown = sorted(set(body) - fields)
    if unknown:
        raise ApiError(
            400,
            f"Unrecognized request argument supplied: {unknown[0]}",
            param=unknown[0],
            code="unknown_parameter",
        )


def _structured_outputs(body: dict) -> StructuredOutputs | None:
    """The request's structured output, from OpenAI's `response_format` (json_object, json_schema),
    vLLM's `structured_outputs` object or its older `guided_*` fields; at most one of them."""
    given: dict[str, Any] = {}
    rf = body.get("response_format")
    if rf is not None:
        if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
            raise invalid("response_format", "must be an object with a 'type'")
        kind = rf["type"]
        if kind == "json_object":
            given["response_format"] = {"json_object": True}
        elif kind == "json_schema":
            spec = rf.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
                raise invalid("response_format", "json_schema: must be an object with a 'schema' object")
            # `strict` either way: the schema is always enforced, never only asked for.
            given["response_format"] = {"json": spec["schema"]}
        elif kind != "text":
            raise invalid(
                "response_format", f"type {kind!r} is not supported (text, json_object, json_schema)"
            )
    if body.get("structured_outputs") is not None:
        given["structured_outputs"] = body["structured_outputs"]
    for key, kind in GUIDED_FIELDS.items():
        if body.get(key) is not None:
            given[key] = {kind: body[key]}
    if len(given) > 1:
        raise invalid(sorted(given)[1], f"give one structured output, not {' and '.join(sorted(given))}")
    if not given:
        return None
    ((key, value),) = given.items()
    try:
        return StructuredOutputs.from_dict(value)
    except RequestError as e:
        raise invalid(key, str(e).removeprefix("structured_outputs: ")) from None


def _is_value(value: Any, off: Any) -> bool:
    # A bool is an int to Python: true is not the count 1, nor false the penalty 0.
    return isinstance(value, bool) == isinstance(off, bool) and value == off


def _check_fields(body: dict, chat: bool) -> None:
    """Refuse, by name, every field that is neither read nor harmless to ignore."""
    read = CHAT_FIELDS if chat else COMPLETION_FIELDS
    for key, value in body.items():
        if key in read or key in NEUTRAL_FIELDS:
            continue
        if key in OFF_VALUES:
            offs = OFF_VALUES[key]
            if value is None or any(_is_value(value, off) for off in offs):
                continue
            shown = " or ".join(json.dumps(off) for off in offs) or "null"
            raise ApiError(
                400,
                f"{key}: {json.dumps(value)[:80]} is not supported here; leave it unset or {shown}",
                param=key,
                code="unsupported_value",
            )
        raise ApiError(
            400, f"Unrecognized request argument supplied: {key}", param=key, code="unknown_parameter"
        )


class OpenAIFrontend:
    """Translates OpenAI requests to `tandem.v1.Inference/Generate` calls on `upstream`."""

    def __init__(
        self,
        upstream: str,
        model_name: str,
        max_model_len: int,
        tokenizer: Tokenizer,
        adapters: Callable[[], list[str]],
        ready: Callable[[], bool],
        kv_capacity: Callable[[], int | None] = lambda: None,
        handoffs: Handoffs | None = None,
        tool_call_parser: str | None = None,
    ) -> None:
        if tool_call_parser is not None and tool_call_parser not in TOOL_CALL_PARSERS:
            raise ValueError(f"tool-call parser {tool_call_parser!r}: one of {', '.join(TOOL_CALL_PARSERS)}")
        self.tool_call_parser = tool_call_parser  # what tool_choice "auto" reads calls with
        self.channel = grpc.insecure_channel(upstream)
        self.handoffs = handoffs  # the router's, when `upstream` is this process's router
        self.stub = pbgrpc.InferenceStub(self.channel)
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.tok = tokenizer
        self.adapters = adapters
        self.ready = ready
        self.kv_capacity = kv_capacity
        self.created = int(time.time())

    def close(self) -> None:
        self.channel.close()

    # --- /v1/models ---------------------------------------------------------------------------

    def models(self) -> dict[str, Any]:
        base = {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "tandem",
            "root": self.model_name,
            "parent": None,
            "max_model_len": self.max_model_len,
        }
        cards = [base]
        for name in self.adapters():
            if name != self.model_name:
                cards.append({**base, "id": name, "root": name, "parent": self.model_name})
        return {"object": "list", "data": cards}

    # --- /tokenize, /detokenize (vLLM's) -------------------------------------------------------

    def tokenize(self, body: Any) -> dict[str, Any]:
        """A prompt's token ids as the router makes them: `prompt` (text) or `messages` (through the
        chat template, with `tools` if given), so a client can count them before it sends."""
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        self._served(body)
        _only(body, {"model", "prompt", "messages", "tools", "return_token_strs"})
        if ("prompt" in body) == ("messages" in body):
            raise invalid("prompt", "give one of prompt (text) or messages")
        if "prompt" in body:
            prompt = _get(body, "prompt", (str,), "a string")
            ids = self.tok.encode(prompt or "")
        else:
            chat = pb.ChatMessages()
            # Counted as the prompt is made, whatever tool_choice (which picks no prompt) would be.
            self._chat(body | {"tool_choice": "none"}, chat)
            try:
                ids = self.tok.chat_messages(chat.messages, chat.tools_json)
            except RequestError as e:
                raise invalid(e.field, str(e).split(": ", 1)[-1]) from None
        strs = (
            [self.tok.token_text(t) for t in ids]
            if _get(body, "return_token_strs", (bool,), "a boolean")
            else None
        )
        return {"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids, "token_strs": strs}

    def detokenize(self, body: Any) -> dict[str, Any]:
        """Token ids back to text (special tokens left out, as answers are)."""
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        self._served(body)
        _only(body, {"model", "tokens"})
        tokens = body.get("tokens")
        vocab = len(self.tok.hf)
        if not isinstance(tokens, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in tokens
        ):
            raise invalid("tokens", f"must be a list of token ids in [0, {vocab})")
        return {"prompt": self.tok.decode(tokens)}

    def _served(self, body: dict) -> None:
        model = body.get("model")
        if model is not None and model != self.model_name and model not in self.adapters():
            raise ApiError(404, f"The model {model!r} does not exist", param="model", code="model_not_found")

    # --- request translation ------------------------------------------------------------------

    def parse(self, body: Any, chat: bool, headers: Any) -> Parsed:
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        _check_fields(body, chat)
        model = _get(body, "model", (str,), "a string") or self.model_name
        req = pb.GenerateRequest(adapter="" if model == self.model_name else model)
        s = req.sampling
        tool_choice = None
        more_prompts: list[str | list[int]] = []
        if chat:
            tool_choice = self._chat(body, req.chat)
        else:
            more_prompts = self._prompt(body, req)

        max_tokens = _get(body, "max_tokens", (int,), "an integer")
        if chat:
            mct = _get(body, "max_completion_tokens", (int,), "an integer")
            max_tokens = mct if mct is not None else max_tokens
        if max_tokens is not None:
            if not 1 <= max_tokens < 2**32:
                key = (
                    "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
                )
                raise invalid(key, f"must be in [1, 2^32), got {max_tokens}")
            s.max_tokens = max_tokens
        elif chat:
            # Up to the rest of the context; the serving worker lowers it to what its KV cache
            # holds beside the prompt and the adapter (the router knows neither worker nor adapter).
            s.max_tokens = self._room(req)
            s.fit_max_tokens = True
        for key, (types, what, within, bounds) in BOUNDED_FIELDS.items():
            value = _get(body, key, types, what)
            if value is not None:
                if not within(value):
                    raise invalid(key, f"must be {bounds}, got {value}")
                setattr(s, key, value)
        bias = _get(body, "logit_bias", (dict,), "an object mapping token ids to biases")
        for key, value in (bias or {}).items():
            # JSON's keys are strings: OpenAI's clients send token ids as "50256".
            token = json_token_id(key)
            if token is None:
                raise invalid("logit_bias", f"keys must be token ids, got {json.dumps(key)[:40]}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
                raise invalid(
                    "logit_bias", f"token {key}: the bias must be in [-100, 100], got {json.dumps(value)}"
                )
            s.logit_bias[token] = value
        seed = _get(body, "seed", (int,), "an integer")
        if seed is not None:
            try:
                engine_seed = request_seed(seed)
            except RequestError as e:
                raise invalid("seed", str(e).split(": ", 1)[-1]) from None
            if engine_seed is not None:
                s.seed = engine_seed
        stop = body.get("stop")
        if stop is not None:
            stops = [stop] if isinstance(stop, str) else stop
            if not isinstance(stops, list) or not all(isinstance(x, str) and x for x in stops):
                raise invalid("stop", "must be a non-empty string or a list of them")
            s.stop.extend(stops)
        stop_ids = body.get("stop_token_ids")
        if stop_ids is not None:
            if not isinstance(stop_ids, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**32 for t in stop_ids
            ):
                raise invalid("stop_token_ids", "must be a list of token ids")
            s.stop_token_ids.extend(stop_ids)
        if _get(body, "include_stop_str_in_output", (bool,), "a boolean"):
            # The router cuts the text at a stop string before it reaches this frontend.
            raise invalid("include_stop_str_in_output", "not supported; leave it unset or false")
        if _get(body, "ignore_eos", (bool,), "a boolean"):
            s.ignore_eos = True
        structured = _structured_outputs(body)
        if structured is not None and tool_choice is not None:
            raise invalid(
                "tool_choice",
                "a tool call is generated under its own schema: give no other structured output",
            )
        if tool_choice is not None and not tool_choice.auto:
            structured = StructuredOutputs(json=json.dumps(tool_choice.schema(), ensure_ascii=False))
        if structured is not None:
            s.structured_outputs.CopyFrom(structured_to_pb(structured))

        logprobs = False
        top = None
        if chat:
            logprobs = bool(_get(body, "logprobs", (bool,), "a boolean"))
            top = _get(body, "top_logprobs", (int,), "an integer")
            if top and not logprobs:
                raise invalid("top_logprobs", "requires 'logprobs' to be true")
        else:
            # The legacy field: how many most likely tokens to list at each position (the sampled
            # one is always listed too); 0 lists only the sampled one.
            top = _get(body, "logprobs", (int,), "an integer")
            logprobs = top is not None
        if top is not None:
            if not 0 <= top <= MAX_TOP_LOGPROBS:
                raise invalid(
                    "top_logprobs" if chat else "logprobs",
                    f"must be an integer in [0, {MAX_TOP_LOGPROBS}], got {top}",
                )
            s.top_logprobs = top
        s.logprobs = logprobs

        echo = not chat and bool(_get(body, "echo", (bool,), "a boolean"))
        if echo and logprobs:
            # Each prompt token's log-probability (the first has none) and its top `logprobs`: what
            # evaluation harnesses score continuations with (lm-evaluation-harness's loglikelihood).
            s.prompt_logprobs = top or 0

        n = _get(body, "n", (int,), "an integer")
        if n is not None and not 1 <= n <= MAX_CHOICES:
            raise invalid("n", f"must be in [1, {MAX_CHOICES}], got {n}")
        if (n or 1) * (1 + len(more_prompts)) > MAX_UPSTREAM:
            raise invalid(
                "prompt", f"{1 + len(more_prompts)} prompts x n {n or 1} is more than {MAX_UPSTREAM} answers"
            )

        stream = bool(_get(body, "stream", (bool,), "a boolean"))
        include_usage = False
        opts = body.get("stream_options")
        if opts is not None:
            if not stream:
                raise invalid("stream_options", "only allowed when 'stream' is true")
            if not isinstance(opts, dict):
                raise invalid("stream_options", "must be an object")
            for key, value in opts.items():
                if key == "include_usage":
                    if value is not None and not isinstance(value, bool):
                        raise invalid("stream_options", f"include_usage must be a boolean, got {value!r}")
                elif key not in STREAM_OPTION_OFF:
                    raise invalid("stream_options", f"unknown option {key!r}")
                elif value is not None and not any(_is_value(value, o) for o in STREAM_OPTION_OFF[key]):
                    raise invalid("stream_options", f"{key}={json.dumps(value)} is not supported")
            include_usage = bool(opts.get("include_usage"))

        timeout = None
        raw = headers.get("X-Request-Timeout") if headers is not None else None
        if raw:
            try:
                timeout = float(raw)
                if not timeout > 0:
                    raise ValueError
            except ValueError:
                raise ApiError(400, f"X-Request-Timeout: must be seconds > 0, got {raw!r}") from None
            if timeout > MAX_TIMEOUT_SECONDS:  # "inf" and the like: no deadline (gRPC's would expire)
                timeout = None
        # Always our own id: the workers refuse a second request under an id that is in flight, and
        # clients' ids are not unique across clients.
        req.request_id = uuid.uuid4().hex
        return Parsed(
            req,
            model,
            stream,
            include_usage,
            logprobs,
            chat,
            timeout,
            n or 1,
            echo,
            tool_choice,
            more_prompts,
        )

    def _chat(self, body: dict, chat: pb.ChatMessages) -> ToolChoice | None:
        """A chat request's messages and tools into `chat` (what the chat template gets); returns
        the tool calls the answer must or may make (None: a text answer)."""
        for m in self._messages(body):
            chat.messages.add(**m)
        try:
            tools, tool_choice = parse_tools(body, self.tool_call_parser)
        except ToolError as e:
            raise invalid(e.param, str(e)) from None
        if tools:
            chat.tools_json = json.dumps(tools, ensure_ascii=False)
        return tool_choice

    def _prompt(self, body: dict, req: pb.GenerateRequest) -> list[str | list[int]]:
        """The first prompt into `req`; returns the others (OpenAI's `prompt` is a string, token
        ids, or a list of either)."""
        p = body.get("prompt")
        prompts = p if isinstance(p, list) and p and all(isinstance(x, (str, list)) for x in p) else [p]
        for i, x in enumerate(prompts):
            if isinstance(x, str):
                continue
            which = f" (prompt {i})" if len(prompts) > 1 else ""
            if (
                not isinstance(x, list)
                or not x
                or not all(isinstance(t, int) and not isinstance(t, bool) for t in x)
            ):
                raise invalid(
                    "prompt",
                    f"must be a string, a list of token ids, or a list of either (one per prompt){which}",
                )
            if any(not 0 <= t < 2**32 for t in x):
                raise invalid("prompt", f"token ids must be in [0, 2^32){which}")
        first = prompts[0]
        if isinstance(first, str):
            req.text = first
        else:
            req.token_ids.ids.extend(first)
        return prompts[1:]

    def _messages(self, body: dict) -> list[dict[str, str]]:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise invalid("messages", "must be a non-empty list")
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise invalid(f"messages[{i}]", "needs a string 'role'")
            role = m["role"]
            if role == "developer":
                role = "system"
            if role not in ("system", "user", "assistant", "tool"):
                raise invalid(
                    f"messages[{i}].role", f"{role!r} is not supported (system, user, assistant, tool)"
                )
            if m.get("function_call"):
                # OpenAI's older form: a call of an earlier turn would vanish from the conversation.
                raise invalid(f"messages[{i}].function_call", "not supported; send tool_calls")
            extra: dict[str, str] = {}
            if m.get("tool_calls"):  # (clients send [] for none)
                if role != "assistant":
                    raise invalid(f"messages[{i}].tool_calls", "only an assistant turn makes tool calls")
                try:
                    extra["tool_calls_json"] = parse_tool_calls(m["tool_calls"], f"messages[{i}].tool_calls")
                except ToolError as e:
                    raise invalid(e.param, str(e)) from None
            if role == "tool":
                call_id = m.get("tool_call_id")
                if not isinstance(call_id, str) or not call_id:
                    raise invalid(
                        f"messages[{i}].tool_call_id", "a tool turn needs the id of the call it answers"
                    )
                extra["tool_call_id"] = call_id
            content = m.get("content")
            if content is None:
                content = ""
            elif isinstance(content, list):
                parts = []
                for part in content:
                    if not isinstance(part, dict) or part.get("type") != "text":
                        raise invalid(f"messages[{i}].content", "only text parts are supported")
                    if not isinstance(part.get("text"), str):
                        raise invalid(f"messages[{i}].content", "a text part needs a string 'text'")
                    parts.append(part["text"])
                content = "\n".join(parts)  # separate parts stay separate words (as vLLM joins them)
            elif not isinstance(content, str):
                raise invalid(f"messages[{i}].content", "must be a string or a list of text parts")
            name = m.get("name")
            if name is not None and (not isinstance(name, str) or not name):
                raise invalid(f"messages[{i}].name", "must be a non-empty string")
            out.append({"role": role, "content": content} | ({"name": name} if name else {}) | extra)
        return out

    def _room(self, req: pb.GenerateRequest) -> int:
        """A chat request without max_tokens may use the rest of the context (as OpenAI and vLLM),
        bounded by what one worker's KV cache can hold."""
        try:
            n = len(self.tok.chat_messages(req.chat.messages, req.chat.tools_json))
        except RequestError as e:
            raise invalid(e.field, str(e).split(": ", 1)[-1]) from None
        limit = self.max_model_len
        cap = self.kv_capacity()
        if cap:
            limit = min(limit, cap)
        return max(1, limit - n)

    # --- responses ----------------------------------------------------------------------------

    def call(self, p: Parsed) -> tuple[Any, Callable[[], None]]:
        """The call upstream (with n > 1, the choices' calls as one `_Choices`), and what to run
        once done with it."""
        if p.choices == 1:
            return forward(self.stub, p.request, p.timeout, self.handoffs)
        forwarded = [forward(self.stub, r, p.timeout, self.handoffs) for r in p.choice_requests()]

        def done() -> None:
            for _, settle in forwarded:
                settle()

        return _Choices([call for call, _ in forwarded]), done

    def _logprobs(self, msg: pb.GenerateResponse, chat: bool, offsets: TextOffsets) -> Any:
        toks = [self.tok.token_text(t) for t in msg.token_ids]
        lps = list(msg.logprobs)
        # Each position's most likely tokens, when asked for (else none: the lists stay empty).
        tops = [list(zip(top.token_ids, top.logprobs)) for top in msg.top_logprobs] or [[] for _ in toks]
        if chat:
            # `bytes` are the token's own (part of a character for some, whose `token` reads
            # `bytes:\\x..`): joined, they are the text.
            return [
                {
                    "token": t,
                    "logprob": lp,
                    "bytes": list(self.tok.token_bytes(tid)),
                    "top_logprobs": [
                        {
                            "token": self.tok.token_text(alt),
                            "logprob": alt_lp,
                            "bytes": list(self.tok.token_bytes(alt)),
                        }
                        for alt, alt_lp in top
                    ],
                }
                for tid, t, lp, top in zip(msg.token_ids, toks, lps, tops)
            ]
        # The legacy format maps text to logprob: the most likely first, then the sampled token if
        # it is not among them (OpenAI lists it always, so up to logprobs + 1 entries).
        listed = [{self.tok.token_text(alt): alt_lp for alt, alt_lp in top} for top in tops]
        for d, t, lp in zip(listed, toks, lps):
            d.setdefault(t, lp)
        return {
            "tokens": toks,
            "token_logprobs": lps,
            "top_logprobs": listed,
            "text_offset": [offsets.start_of(t) for t in msg.token_ids],
        }

    def _echo(
        self, p: Parsed, choice: int, msg: pb.GenerateResponse, offsets: TextOffsets
    ) -> tuple[str, Any]:
        """With echo, what comes before the first message's text: the prompt's text and, with
        logprobs, its tokens in the legacy format (the first token has no log-probability)."""
        ids = list(msg.prompt_token_ids)
        request = p.prompt_request(choice)
        text = request.text if request.WhichOneof("prompt") == "text" else self.tok.decode(ids)
        if not p.logprobs:
            return text, None
        pl = msg.prompt_logprobs
        lps: list[float | None] = [None, *pl.logprobs]
        listed: list[dict[str, float] | None] = [None]
        for tid, lp, top in itertools.zip_longest(ids[1:], pl.logprobs, pl.top_logprobs):
            d = (
                {self.tok.token_text(alt): alt_lp for alt, alt_lp in zip(top.token_ids, top.logprobs)}
                if top
                else {}
            )
            d.setdefault(self.tok.token_text(tid), lp)
            listed.append(d)
        return text, {
            "tokens": [self.tok.token_text(t) for t in ids],
            "token_logprobs": lps,
            "top_logprobs": listed,
            "text_offset": [offsets.start_of(t) for t in ids],
        }

    @staticmethod
    def usage(msg: pb.GenerateResponse) -> dict[str, Any]:
        u = msg.usage
        return {
            "prompt_tokens": u.prompt_tokens,
            "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens},
        }

    @staticmethod
    def usage_of_choices(usages: list[dict[str, Any]], n: int) -> dict[str, Any]:
        """Each prompt once (as OpenAI counts one for its n choices) and every choice's tokens."""
        firsts = usages[::n]
        usage = dict(usages[0])
        usage["prompt_tokens"] = sum(u["prompt_tokens"] for u in firsts)
        cached = sum(u["prompt_tokens_details"]["cached_tokens"] for u in firsts)
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
        usage["completion_tokens"] = sum(u["completion_tokens"] for u in usages)
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return usage

    def complete_choices(self, p: Parsed, choices: _Choices) -> dict[str, Any]:
        """The whole response of n choices."""
        per: list[list[pb.GenerateResponse]] = [[] for _ in range(p.choices)]
        for i, msg in choices:
            per[i].append(msg)
        bodies = [self.complete(p, iter(messages), i) for i, messages in enumerate(per)]
        body = bodies[0]
        body["choices"] = [dict(b["choices"][0], index=i) for i, b in enumerate(bodies)]
        body["usage"] = self.usage_of_choices([b["usage"] for b in bodies], p.n)
        return body

    def complete(self, p: Parsed, messages: Iterator[pb.GenerateResponse], choice: int = 0) -> dict[str, Any]:
        text, finish, usage = "", None, None
        lp_chat: list[dict] = []
        lp_text: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        offsets = TextOffsets(self.tok)
        for msg in messages:
            if p.echo and msg.prompt_token_ids:
                text, lp = self._echo(p, choice, msg, offsets)
                if lp is not None:
                    for k in lp_text:
                        lp_text[k].extend(lp[k])
            text += msg.text
            if p.logprobs and msg.token_ids:
                lp = self._logprobs(msg, p.chat, offsets)
                if p.chat:
                    lp_chat.extend(lp)
                else:
                    for k in lp_text:
                        lp_text[k].extend(lp[k])
            if msg.finish_reason:
                finish, usage = FINISH.get(msg.finish_reason, "stop"), self.usage(msg)
        if finish is None:
            raise ApiError(502, "the upstream stream ended without a finish reason", "server_error")
        rid = p.request.request_id
        if p.chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if p.tool_choice is not None:
                content, tool_calls = p.tool_choice.answer(text)
                if tool_calls is not None:
                    message = {"role": "assistant", "content": content, "tool_calls": tool_calls}
                    if finish == "stop":
                        finish = p.tool_choice.finish_reason
            choice = {
                "index": 0,
                "message": message,
                "logprobs": {"content": lp_chat} if p.logprobs else None,
                "finish_reason": finish,
            }
            obj, prefix = "chat.completion", "chatcmpl-"
        else:
            choice = {
                "index": 0,
                "text": text,
                "logprobs": lp_text if p.logprobs else None,
                "finish_reason": finish,
            }
            obj, prefix = "text_completion", "cmpl-"
        return {
            "id": prefix + rid,
            "object": obj,
            "created": int(time.time()),
            "model": p.model,
            "system_fingerprint": None,
            "choices": [choice],
            "usage": usage,
        }

    def chunks(
        self,
        p: Parsed,
        received: list[tuple[int, pb.GenerateResponse]],
        rest: Iterator[tuple[int, pb.GenerateResponse]],
    ) -> Iterator[dict[str, Any]]:
        """The streamed chunks (as dicts) of p.choices choices, from the messages already received (each
        choice's first among them) and the rest, as (choice, message) in the order they arrive."""
        rid = p.request.request_id
        created = int(time.time())
        obj, prefix = ("chat.completion.chunk", "chatcmpl-") if p.chat else ("text_completion", "cmpl-")
        head = {
            "id": prefix + rid,
            "object": obj,
            "created": created,
            "model": p.model,
            "system_fingerprint": None,
        }
        if p.include_usage:
            head["usage"] = None
        offsets = [TextOffsets(self.tok) for _ in range(p.choices)]
        calls = [StreamedCalls(p.tool_choice) for _ in range(p.choices)] if p.tool_choice else None

        def chunk(
            index: int,
            delta_text: str,
            msg: pb.GenerateResponse | None,
            finish: str | None,
            role: bool = False,
        ) -> dict[str, Any] | None:
            lp = None
            if p.echo and msg is not None and msg.prompt_token_ids:
                echoed, lp = self._echo(p, index, msg, offsets[index])
                delta_text = echoed + delta_text
            if p.logprobs and msg is not None and msg.token_ids:
                generated = self._logprobs(msg, p.chat, offsets[index])
                if p.chat:
                    lp = {"content": generated}
                elif lp is not None:
                    lp = {k: lp[k] + generated[k] for k in lp}
                else:
                    lp = generated
            if p.chat:
                delta: dict[str, Any] = {"content": delta_text}
                if role:
                    delta = {"role": "assistant", "content": delta_text}
                elif calls is not None:
                    delta, finish = calls[index].delta(delta_text, finish)
                    if not delta and finish is None and lp is None:
                        return None  # the calls' list is not whole yet: nothing to say
                choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}
            else:
                choice = {"index": index, "text": delta_text, "logprobs": lp, "finish_reason": finish}
            return {**head, "choices": [choice]}

        if p.chat:  # OpenAI opens a chat stream with the assistant's role, per choice
            for i in range(p.choices):
                yield chunk(i, "", None, None, role=True)
        finals: dict[int, pb.GenerateResponse] = {}
        for i, msg in itertools.chain(received, rest):
            if i in finals:
                continue
            finish = FINISH.get(msg.finish_reason) if msg.finish_reason else None
            if msg.text or finish or (p.logprobs and msg.token_ids) or (p.echo and msg.prompt_token_ids):
                out = chunk(i, msg.text, msg, finish)
                if out is not None:
                    yield out
            if finish:
                finals[i] = msg
                if len(finals) == p.choices:
                    break
        if len(finals) < p.choices:
            raise ApiError(502, "the upstream stream ended without a finish reason", "server_error")
        if p.include_usage:
            usage = self.usage_of_choices([self.usage(finals[i]) for i in range(p.choices)], p.n)
            yield {**head, "choices": [], "usage": usage}


MAX_BODY_BYTES = 32 << 20


def _hex_size(text: bytes) -> int:
    """A chunk size: hex digits only (int(x, 16) also takes "0x10", "-5", "1_0")."""
    if not text or len(text) > 16 or text.strip(b"0123456789abcdefABCDEF"):
        raise ValueError
    return int(text, 16)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "tandem"
    # An idle keep-alive connection gives its thread back after this long (socket operations only:
    # waiting for the upstream call is not limited by it).
    timeout = 300
    frontend: OpenAIFrontend  # set on the subclass made by serve_openai_http

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("%s " + fmt, self.address_string(), *args)

    # --- plumbing -------------------------------------------------------------------------

    def _send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(obj, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, e: ApiError) -> None:
        self._send_json(e.status, e.body())

    def _read_json(self) -> Any:
        too_big = ApiError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes", code="too_large")
        coding = self.headers.get("Transfer-Encoding")
        try:
            if coding is not None and coding.strip().lower() != "chunked":
                # A coding this server cannot undo (gzip, ...): where its body ends is unknown, so the
                # rest of the connection cannot be read as requests (RFC 9112 6.1: 501).
                self.close_connection = True
                raise ApiError(501, f"Transfer-Encoding {coding!r} is not supported", code="unsupported")
            if coding is not None:
                raw = b""
                while True:
                    size = _hex_size(self.rfile.readline(65537).split(b";")[0].strip())
                    if size == 0:
                        # The trailer section: header lines up to an empty one.
                        while self.rfile.readline(65537).strip():
                            pass
                        break
                    if len(raw) + size > MAX_BODY_BYTES:
                        self.close_connection = True
                        raise too_big
                    chunk = self.rfile.read(size)
                    if len(chunk) != size or self.rfile.readline(3).strip():
                        raise ValueError
                    raw += chunk
            else:
                text = (self.headers.get("Content-Length") or "0").strip()
                # Digits only: int() would also take "+5", "1_000" and " 5 " (RFC 9110 8.6).
                if not (text.isascii() and text.isdigit()):
                    raise ValueError
                length = int(text)
                if length > MAX_BODY_BYTES:
                    self.close_connection = True
                    raise too_big
                raw = self.rfile.read(length)
                if len(raw) != length:
                    raise ValueError  # the client closed before sending it all
        except ValueError:
            self.close_connection = True
            raise ApiError(400, "malformed Content-Length or chunked body") from None
        try:
            return json.loads(raw or b"null")
        except ValueError as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None
        except RecursionError:
            raise ApiError(400, "the request body is not valid JSON: nested too deeply") from None

    def _watch(self, call: grpc.Call, done: threading.Event) -> None:
        """Cancel `call` when the client closes its connection before the response is complete."""
        sock = self.connection

        def watch() -> None:
            while not done.is_set():
                try:
                    r, _, _ = select.select([sock], [], [], 0.25)
                    if not r:
                        continue
                    gone = sock.recv(1, socket.MSG_PEEK) == b""
                except (OSError, ValueError):
                    gone = True
                if gone and not done.is_set():
                    log.info("client %s went away: cancelling its request", self.address_string())
                    call.cancel()
                return  # closed, or the client sent more (a pipelined request): stop watching

        threading.Thread(target=watch, name="http-disconnect-watch", daemon=True).start()

    # --- routes ---------------------------------------------------------------------------

    def do_GET(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0].rstrip("/")
        fe = self.frontend
        if path == "/v1/models":
            self._send_json(200, fe.models())
        elif path.startswith("/v1/models/"):
            # Clients percent-encode the id (openai's models.retrieve: "org%2Fmodel" for "org/model").
            name = urllib.parse.unquote(path[len("/v1/models/") :])
            for card in fe.models()["data"]:
                if card["id"] == name:
                    self._send_json(200, card)
                    return
            self._send_error(
                ApiError(404, f"The model {name!r} does not exist", param="model", code="model_not_found")
            )
        elif path in ("/health", "/ready"):
            ok = fe.ready()
            # Not ready: still starting, or no worker pair can serve now (workers gone, or incompatible).
            self._send_json(200 if ok else 503, {"status": "ok" if ok else "unavailable"})
        else:
            self._send_error(ApiError(404, f"no route {self.command} {path}", code="not_found"))

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0].rstrip("/")
        if path in ("/tokenize", "/detokenize"):
            fe = self.frontend
            try:
                body = self._read_json()
                self._send_json(200, fe.tokenize(body) if path == "/tokenize" else fe.detokenize(body))
            except ApiError as e:
                self._send_error(e)
            except (ValueError, TypeError) as e:  # as for generation: a lone surrogate, ...
                self._send_error(ApiError(400, f"invalid request: {e}"))
            return
        if path not in ("/v1/completions", "/v1/chat/completions"):
            # Still read the body, so the connection stays usable.
            try:
                self._read_json()
            except ApiError:
                pass
            self._send_error(ApiError(404, f"no route {self.command} {path}", code="not_found"))
            return
        chat = path == "/v1/chat/completions"
        fe = self.frontend
        try:
            parsed = fe.parse(self._read_json(), chat, self.headers)
        except ApiError as e:
            # Refused here, so the router never counts it. Every refusal before the call upstream
            # is the caller's: 400, and also 413 (a body past the limit) and 501 (a transfer coding
            # this server cannot undo), which no retry or added capacity would serve: `invalid`, not
            # `rejected` (a retry-later that the autoscaler reads as a pool short of capacity) or
            # `failed` (the service's fault, against its attainment).
            metrics.REQUESTS.labels(outcome="invalid").inc()
            self._send_error(e)
            return
        except (ValueError, TypeError) as e:
            # What the checks above let through and the request's protobuf refuses (a lone UTF-16
            # surrogate in a string, a number out of its field's range) or a chat template raises:
            # the client's request, not the server, so 400, never a dropped connection.
            metrics.REQUESTS.labels(outcome="invalid").inc()
            self._send_error(ApiError(400, f"invalid request: {e}"))
            return
        call, settle = fe.call(parsed)
        done = threading.Event()
        self._watch(call, done)
        try:
            try:
                self._serve(parsed, call)
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.CANCELLED and not self._alive():
                    self.close_connection = True  # the client went away: nobody to answer
                    return
                self._send_error(from_rpc(e, parsed.model, chat))
            except ApiError as e:
                self._send_error(e)
        except (BrokenPipeError, ConnectionResetError):
            log.info("client %s went away mid-stream: cancelling its request", self.address_string())
            call.cancel()
            self.close_connection = True
        finally:
            done.set()
            settle()

    def _alive(self) -> bool:
        try:
            r, _, _ = select.select([self.connection], [], [], 0)
            return not r or self.connection.recv(1, socket.MSG_PEEK) != b""
        except (OSError, ValueError):
            return False

    def _serve(self, p: Parsed, call: Any) -> None:
        fe = self.frontend
        if not p.stream:
            body = fe.complete(p, call) if p.choices == 1 else fe.complete_choices(p, call)
            self._send_json(200, body, {"X-Request-Id": p.request.request_id})
            return
        # Wait for the first message (of every choice) before answering 200, so that a request the
        # router refuses (invalid, unknown adapter, overloaded) gets its proper status instead of a
        # broken stream.
        messages = ((0, m) for m in call) if p.choices == 1 else iter(call)
        received: list[tuple[int, pb.GenerateResponse]] = []  # all of them, in order, until then
        started: set[int] = set()
        for i, msg in messages:
            received.append((i, msg))
            started.add(i)
            if len(started) == p.choices:
                break
        if len(started) < p.choices:
            raise ApiError(502, "the upstream stream ended without a message", "server_error")
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("X-Accel-Buffering", "no")
        self.send_header("X-Request-Id", p.request.request_id)
        # HTTP/1.0 knows no chunked encoding (RFC 9112): its stream ends when the connection closes.
        self._chunked = self.request_version != "HTTP/1.0"
        if self._chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.close_connection = True
        self.end_headers()
        try:
            for c in fe.chunks(p, received, messages):
                self._chunk(b"data: " + json.dumps(c, ensure_ascii=False).encode() + b"\n\n")
            self._chunk(b"data: [DONE]\n\n")
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.CANCELLED and not self._alive():
                raise BrokenPipeError from None
            self._chunk(b"data: " + json.dumps(from_rpc(e, p.model, p.chat).body()).encode() + b"\n\n")
        except ApiError as e:
            self._chunk(b"data: " + json.dumps(e.body()).encode() + b"\n\n")
        if self._chunked:
            self.wfile.write(b"0\r\n\r\n")

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if self._chunked else data)
        self.wfile.flush()


class OpenAIServer:
    """A running frontend: `stop()` closes the listener and the upstream channel."""

    def __init__(self, httpd: ThreadingHTTPServer, frontend: OpenAIFrontend) -> None:
        self.httpd, self.frontend = httpd, frontend
        self.port = httpd.server_address[1]
        self.thread = threading.Thread(target=httpd.serve_forever, name="openai-http", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def close(self) -> None:
        self.frontend.close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # socketserver's default accept queue of 5 left bursts of new connections waiting for SYN
    # retries: seconds to a minute for 100 clients at once.
    request_queue_size = 1024

    def __init__(self, addr: tuple[str, int], handler: type) -> None:
        if ":" in addr[0]:
            self.address_family = socket.AF_INET6
        super().__init__(addr, handler)


def serve_openai_http(host: str, port: int, frontend: OpenAIFrontend) -> OpenAIServer:
    handler = type("OpenAIHandler", (_Handler,), {"frontend": frontend})
    try:
        httpd = _Server((host, port), handler)
    except OSError as e:
        raise OSError(f"cannot listen for HTTP on {host}:{port}: {e.strerror}") from None
    return OpenAIServer(httpd, frontend)


__all__ = ["ApiError", "OpenAIFrontend", "OpenAIServer", "serve_openai_http"]
