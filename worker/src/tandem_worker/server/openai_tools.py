"""Tool calling for the OpenAI frontend: `tools`, `tool_choice` and the `tool_calls` of the answer.

A call the client makes certain, `tool_choice: "required"` or a named function, is generated under
a JSON Schema (structured outputs): a named function's `parameters`, or a list of
`{"name", "parameters"}` objects, one of the tools each (one only without `parallel_tool_calls`),
as vLLM does. The text is then valid arguments by construction and becomes the message's
`tool_calls`. `tool_choice: "auto"` (OpenAI's default once tools are given) lets the model choose
between text and a call in its own trained format, which only a parser for that format can tell
apart: with the router's `--tool-call-parser hermes` (the format of Qwen2.5 and later, Hermes 2 and
3: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks in the text), the blocks
become tool_calls and the rest the content; without a parser, "auto" is refused by name rather
than answered with a call left in the text.

The tools go to the chat template, which shows them to the model if it was trained to read them;
earlier turns' calls and the tool results (`role: "tool"`) too, through the template.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


class ToolError(ValueError):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class ToolChoice:
    """A call the answer must make: `name` (a named function) or any of the tools ("required")."""

    tools: list[dict[str, Any]]
    name: str | None = None
    parallel: bool = True
    # "auto": the model chooses, and its calls are read from the text in the Hermes format.
    auto: bool = False

    @property
    def finish_reason(self) -> str:
        # As OpenAI's: a function the client named ends as "stop", calls the model made as "tool_calls".
        return "stop" if self.name else "tool_calls"

    def answer(self, text: str) -> tuple[str | None, list[dict[str, Any]] | None]:
        """The message's content and tool_calls for the whole text (no calls: the text as content)."""
        if self.auto:
            content, calls = hermes_calls(text)
            return (content, calls) if calls else (text, None)
        calls = self.calls(text)
        return (None, calls) if calls is not None else (text, None)

    def schema(self) -> dict[str, Any]:
        """The JSON Schema the answer is generated under."""
        params = {
            t["function"]["name"]: t["function"].get("parameters") or {"type": "object"} for t in self.tools
        }
        if self.name is not None:
            return params[self.name]
        defs: dict[str, Any] = {}
        call = []
        for name, schema in params.items():
            schema = _hoist_defs(name, schema, defs)
            call.append(
                {
                    "type": "object",
                    "properties": {"name": {"const": name}, "parameters": schema},
                    "required": ["name", "parameters"],
                    "additionalProperties": False,
                }
            )
        out: dict[str, Any] = {"type": "array", "items": {"anyOf": call}, "minItems": 1}
        if not self.parallel:
            out["maxItems"] = 1
        if defs:
            out["$defs"] = defs
        return out

    def calls(self, text: str) -> list[dict[str, Any]] | None:
        """The answer's text as OpenAI's tool_calls; None if it is no complete call (cut by max_tokens)."""
        if self.name is not None:
            return [_call(new_call_id(), self.name, text)]
        try:
            items = json.loads(text)
        except ValueError:
            return None
        try:  # (the schema makes it such a list; a client's stop string may have cut it short)
            return [
                _call(new_call_id(), item["name"], json.dumps(item["parameters"], ensure_ascii=False))
                for item in items
            ]
        except (TypeError, KeyError):
            return None


class StreamedCalls:
    """One choice's tool calls as stream deltas: a named function's arguments as they come (its id
    and name with the first), the calls of "required" once their list is whole (before, it is not
    yet JSON); a list cut by max_tokens goes out as the text it is."""

    def __init__(self, tc: ToolChoice) -> None:
        self.tc = tc
        self.id = new_call_id()
        self.started = False
        self.text = ""
        self.hermes = HermesStream() if tc.auto else None
        self.made = 0  # calls sent (auto)

    def delta(self, text: str, finish: str | None) -> tuple[dict[str, Any], str | None]:
        if self.hermes is not None:
            content, calls = self.hermes.feed(text, final=finish is not None)
            delta: dict[str, Any] = {"content": content} if content else {}
            if calls:
                delta["tool_calls"] = [{"index": self.made + j, **c} for j, c in enumerate(calls)]
                self.made += len(calls)
            if finish == "stop" and self.made:
                finish = self.tc.finish_reason
            return delta, finish
        if self.tc.name is not None:
            if not text:
                return {}, finish
            call: dict[str, Any] = {"index": 0, "function": {"arguments": text}}
            if not self.started:
                self.started = True
                call = {
                    "index": 0,
                    "id": self.id,
                    "type": "function",
                    "function": {"name": self.tc.name, "arguments": text},
                }
            return {"tool_calls": [call]}, finish
        self.text += text
        if finish is None:
            return {}, None
        calls = self.tc.calls(self.text)
        if calls is None:
            return {"content": self.text}, finish
        return {"tool_calls": [{"index": j, **c} for j, c in enumerate(calls)]}, (
            self.tc.finish_reason if finish == "stop" else finish
        )


TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"


def _hermes_call(body: str) -> dict[str, Any] | None:
    """One block's call, or None when it is not one (it then stays in the content)."""
    try:
        call = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    args = call.get("arguments", {})
    arguments = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return _call(new_call_id(), call["name"], arguments)


def hermes_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """The Hermes format's `<tool_call>` blocks of a whole text as calls, and the text around them
    (None when only whitespace)."""
    stream = HermesStream()
    content, calls = stream.feed(text, final=True)
    return (content if content.strip() else None), calls


class HermesStream:
    """The Hermes format read as text streams in: content goes out as it comes, but for what could
    be the start of a `<tool_call>` tag (held back until it is told apart); a block goes out as a
    call once closed (or the text ends: a model may stop at EOS without the closing tag). A block
    that is no call stays in the content, as it was."""

    def __init__(self) -> None:
        self.buf = ""
        self.in_call = False

    def feed(self, text: str, final: bool) -> tuple[str, list[dict[str, Any]]]:
        self.buf += text
        out, calls = [], []
        while True:
            if not self.in_call:
                i = self.buf.find(TOOL_CALL_OPEN)
                if i >= 0:
                    out.append(self.buf[:i])
                    self.buf, self.in_call = self.buf[i + len(TOOL_CALL_OPEN) :], True
                    continue
                keep = 0 if final else _partial_tag(self.buf, TOOL_CALL_OPEN)
                out.append(self.buf[: len(self.buf) - keep])
                self.buf = self.buf[len(self.buf) - keep :]
                break
            j = self.buf.find(TOOL_CALL_CLOSE)
            if j < 0 and not final:
                break
            body = self.buf if j < 0 else self.buf[:j]
            call = _hermes_call(body.strip())
            if call is not None:
                calls.append(call)
            else:
                out.append(TOOL_CALL_OPEN + body + ("" if j < 0 else TOOL_CALL_CLOSE))
            self.buf, self.in_call = ("" if j < 0 else self.buf[j + len(TOOL_CALL_CLOSE) :]), False
        return "".join(out), calls


def _partial_tag(text: str, tag: str) -> int:
    """The length of the longest end of `text` that begins `tag` (0 if none)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def _hoist_defs(tool: str, schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """`schema` without its own definitions (pydantic's `$defs` of nested models, or the older
    `definitions`), which move into `defs` under names of the tool's: nested in the list's schema,
    its `#/$defs/...` references would point at the list's root."""
    local = {**schema.get("definitions", {}), **schema.get("$defs", {})}
    if not local:
        return schema
    renamed = {
        f"#/{key}/{name}": f"#/$defs/{tool}.{name}" for key in ("$defs", "definitions") for name in local
    }

    def rewrite(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: renamed.get(v, v) if k == "$ref" else rewrite(v) for k, v in node.items()}
        if isinstance(node, list):
            return [rewrite(v) for v in node]
        return node

    for name, definition in local.items():
        defs[f"{tool}.{name}"] = rewrite(definition)
    return rewrite({k: v for k, v in schema.items() if k not in ("$defs", "definitions")})


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


TOOL_CALL_PARSERS = ("hermes",)


def parse_tools(
    body: dict[str, Any], parser: str | None = None
) -> tuple[list[dict[str, Any]], ToolChoice | None]:
    """The request's tools (for the chat template) and the calls the answer must or may make
    (None: a text answer). `parser`: the router's tool-call parser, which "auto" needs. Raises
    ToolError naming the field."""
    tools = body.get("tools")
    if tools is None:
        tools = []
    if not isinstance(tools, list):
        raise ToolError("tools", "must be a list of function tools")
    names: list[str] = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(fn, dict):
            raise ToolError("tools", f"tools[{i}]: must be {{'type': 'function', 'function': {{...}}}}")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ToolError(
                "tools", f"tools[{i}].function.name: 1-64 letters, digits, '_' or '-', got {name!r}"
            )
        if name in names:
            raise ToolError("tools", f"tools[{i}].function.name: {name!r} is given twice")
        names.append(name)
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise ToolError("tools", f"tools[{i}].function.description: must be a string")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise ToolError("tools", f"tools[{i}].function.parameters: must be a JSON Schema object")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise ToolError("parallel_tool_calls", "must be a boolean")
    choice = body.get("tool_choice")
    if choice is None:
        choice = "auto" if tools else "none"
    if choice == "none":
        return tools, None
    if choice == "auto":
        if not tools:
            return tools, None
        if parser is None:
            raise ToolError(
                "tool_choice",
                "'auto' is not supported: telling a call from text needs a parser of this model's own "
                "tool-call format (the router's --tool-call-parser); give 'required', a named function "
                "or 'none'",
            )
        return tools, ToolChoice(tools, parallel=parallel is not False, auto=True)
    if choice == "required":
        if not tools:
            raise ToolError("tool_choice", "'required' needs tools")
        return tools, ToolChoice(tools, parallel=parallel is not False)
    fn = choice.get("function") if isinstance(choice, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(fn, dict):
        raise ToolError(
            "tool_choice", "must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name'}}"
        )
    if fn.get("name") not in names:
        raise ToolError("tool_choice", f"function {fn.get('name')!r} is not among the tools")
    return tools, ToolChoice(tools, name=fn["name"])


def parse_tool_calls(value: Any, where: str) -> str:
    """An assistant turn's `tool_calls` (OpenAI's list) checked, as JSON text for the wire."""
    if not isinstance(value, list):
        raise ToolError(where, "must be a list of tool calls")
    for i, call in enumerate(value):
        fn = call.get("function") if isinstance(call, dict) else None
        if (
            not isinstance(call, dict)
            or call.get("type", "function") != "function"
            or not isinstance(fn, dict)
            or not isinstance(fn.get("name"), str)
            or not isinstance(fn.get("arguments"), str)
        ):
            raise ToolError(
                where, f"[{i}]: must be {{'id', 'type': 'function', 'function': {{'name', 'arguments'}}}}"
            )
        if call.get("id") is not None and not isinstance(call["id"], str):
            raise ToolError(where, f"[{i}].id: must be a string")
    return json.dumps(value, ensure_ascii=False)
