"""`Tokenizer` (Hugging Face tokenizer and chat template), `IncrementalDetokenizer` and `TextStream`."""

from __future__ import annotations

import bisect
import codecs
import functools
import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
from tokenizers import Tokenizer as RustTokenizer
from tokenizers.decoders import DecodeStream
from transformers import PreTrainedTokenizerBase, TokenizersBackend

from .sampling_params import RequestError, SamplingParams

if TYPE_CHECKING:
    from transformers import PreTrainedConfig

# Tokenizer classes that `AutoTokenizer` (transformers 5.23, pinned) answers with `TokenizersBackend`
# for a Llama config, with no per-model correction: the tokenizer is tokenizer.json alone. Those
# tokenizers are built directly. `AutoTokenizer` imports transformers' model configs, which import
# torch, which the router (it runs no model) otherwise never imports: its start took 2.4 s, not 1.0,
# and it held 386 MiB, not 125. tests/test_router_text.py checks the choice against `AutoTokenizer`.
_GENERIC_CLASSES = frozenset({"TokenizersBackend", "PreTrainedTokenizerFast"})


# The folder's tokenizer_config.json and config.json; None when either is missing or not JSON.
_Configs = tuple[dict[str, Any], dict[str, Any]] | None


def _read_configs(folder: Path) -> _Configs:
    try:
        return (
            json.loads((folder / "tokenizer_config.json").read_text()),
            json.loads((folder / "config.json").read_text()),
        )
    except (OSError, ValueError):
        return None


def _generic_tokenizer(folder: Path, configs: _Configs) -> bool:
    """Whether `AutoTokenizer` would build `TokenizersBackend` from the folder's tokenizer.json and
    nothing else: a Llama (other types have per-model tokenizer classes and fixes), a generic class
    named, no remote code."""
    if configs is None:
        return False
    tokenizer_config, model_config = configs
    return (
        tokenizer_config.get("tokenizer_class") in _GENERIC_CLASSES
        and "auto_map" not in tokenizer_config
        and model_config.get("model_type") == "llama"
        and (folder / "tokenizer.json").is_file()
    )


def _config_for_tokenizer(folder: Path, configs: _Configs) -> PreTrainedConfig | None:
    """The model config as `AutoTokenizer` reads it when the tokenizer names its own class: the
    model type and path only. Without it, `AutoTokenizer` loads the model's config class, whose
    module (for Llama and its kin) imports transformers' modeling stack and torch._dynamo: about
    2 s of every worker's and router's start, for a tokenizer that takes 0.2 s. None (the full
    config is read) where the tokenizer leaves its class to the model type or to remote code, the
    cases where `AutoTokenizer` looks the class up by the config's Python type."""
    if configs is None:
        return None
    tokenizer_config, model_config = configs
    if not tokenizer_config.get("tokenizer_class") or "auto_map" in tokenizer_config:
        return None
    from transformers import PreTrainedConfig  # imports torch: only for tokenizers built by AutoTokenizer

    config = PreTrainedConfig(name_or_path=str(folder), tokenizer_class=model_config.get("tokenizer_class"))
    config.model_type = model_config.get("model_type", "")
    return config


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's (GPT-2's) printable stand-in for each byte: the vocabulary is written in
    these characters. `tokenizers` applies the mapping but does not expose its inverse."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_LEVEL = _byte_level_alphabet()


def _decoder_types(decoder: dict[str, Any] | None) -> set[str]:
    if not decoder:
        return set()
    return {decoder.get("type", ""), *(t for d in decoder.get("decoders") or [] for t in _decoder_types(d))}


class Tokenizer:
    def __init__(self, folder: Path) -> None:
        folder = Path(folder)
        configs = _read_configs(folder)
        self.hf: PreTrainedTokenizerBase
        if _generic_tokenizer(folder, configs):
            self.hf = TokenizersBackend.from_pretrained(str(folder))
        else:
            from transformers import AutoTokenizer  # imports torch (see _GENERIC_CLASSES)

            self.hf = AutoTokenizer.from_pretrained(
                str(folder), config=_config_for_tokenizer(folder, configs)
            )

    @property
    def backend(self) -> RustTokenizer | None:
        """The Rust `tokenizers.Tokenizer` under a fast tokenizer (None for a Python-only one)."""
        backend = getattr(self.hf, "backend_tokenizer", None)
        return backend if isinstance(backend, RustTokenizer) else None

    @property
    def eos_token_id(self) -> int | None:
        return self.hf.eos_token_id

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def encode(self, text: str) -> list[int]:
        # Special tokens such as BOS are added the way the model was trained; for SmolLM2 none.
        return list(self.hf.encode(text))

    def renders(self, word: str) -> bool:
        """Whether the chat template (any of them, for a tokenizer with several) uses `word`: one
        that never reads "tool_calls" would leave an earlier turn's calls out of the prompt."""
        template = getattr(self.hf, "chat_template", None) or ""
        sources = template.values() if isinstance(template, dict) else [template]
        return any(word in source for source in sources)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        """The prompt of a chat; `tools` (OpenAI's list) is given to the template, which shows them
        to the model if it was trained to read them (a template that does not use them ignores them)."""
        if not self.has_chat_template:
            raise RequestError("messages", "this model's tokenizer has no chat template")
        if not messages:
            raise RequestError("messages", "must not be empty")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise RequestError(f"messages[{i}]", "needs 'role' and 'content'")
            if m.get("tool_calls") and not self.renders("tool_calls"):
                raise RequestError(
                    f"messages[{i}].tool_calls",
                    "this model's chat template does not show tool calls: they would vanish from the "
                    "conversation the model sees",
                )
        try:
            # Special tokens spelt out in the messages ("<|im_end|>" in a user's text) are encoded as
            # the plain text they are: only the template writes the tokens that delimit turns, else a
            # user could close their turn and open a system one.
            ids = self.hf.apply_chat_template(
                messages, tools=tools, tokenize=True, add_generation_prompt=True, sanitize_control_tokens=True
            )
        except jinja2.TemplateError as e:
            # Templates refuse what their model was not trained on (Llama 2's and Mistral's raise on
            # roles that do not alternate): the request's fault, said in the template's words.
            raise RequestError("messages", f"the model's chat template refuses them: {e}") from None
        except ValueError as e:
            # A special token this tokenizer cannot spell as plain text: refused, never let through.
            raise RequestError("messages", str(e)) from None
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # a BatchEncoding in newer transformers
            ids = ids["input_ids"]
        return list(ids)

    def chat_messages(self, messages: Iterable[Any], tools_json: str = "") -> list[int]:
        """apply_chat_template on wire messages (role, content, an optional name, tool calls and the
        id of the call a tool turn answers) and tools: each optional field is passed only where
        set, so templates that test for one see none otherwise."""
        out = []
        for i, m in enumerate(messages):
            d: dict[str, Any] = {"role": m.role, "content": m.content}
            if m.name:
                d["name"] = m.name
            if m.tool_calls_json:
                where = f"messages[{i}].tool_calls"
                d["tool_calls"] = _template_tool_calls(_json_list(m.tool_calls_json, where), where)
            if m.tool_call_id:
                d["tool_call_id"] = m.tool_call_id
            out.append(d)
        tools = _json_list(tools_json, "tools") if tools_json else None
        return self.apply_chat_template(out, tools)

    def chat_prompt(self, text: str) -> list[int]:
        return self.apply_chat_template([{"role": "user", "content": text}])

    def decode(self, token_ids: list[int]) -> str:
        return self.hf.decode(token_ids, skip_special_tokens=True)

    @functools.cached_property
    def _decoders(self) -> set[str]:
        # The decoder's own settings only: serializing the whole tokenizer (to_str) to read them took
        # 157 ms for SmolLM2's, on every router's and worker's start.
        decoder = self.backend.decoder if self.backend else None
        return _decoder_types(json.loads(decoder.__getstate__())) if decoder is not None else set()

    @functools.cached_property
    def _special(self) -> set[int]:
        # Every token decoding hides, not only all_special_ids: the bytes of "<repo_name>" would
        # otherwise show in logprobs where the text has none.
        return set(self.hf.all_special_ids) | set(self.hidden_tokens)

    @functools.cached_property
    def hidden_tokens(self) -> dict[int, str]:
        """Tokens with a text of their own ("<|im_end|>") that decoding leaves out, by id: the
        special tokens as `skip_special_tokens` sees them, which are more than `all_special_ids`
        (SmolLM2's "<repo_name>" and its kin)."""
        added = getattr(self.hf, "added_tokens_decoder", None) or {}
        return {i: t.content for i, t in added.items() if t.content and not self.decode([i])}

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for: with byte-level BPE or SentencePiece's byte fallback, a
        token may be part of a UTF-8 character, which `decode` can only show as U+FFFD (OpenAI's
        logprobs report these bytes, so clients can join tokens into text)."""
        if token_id in self._special:  # shown as decode shows them (not at all)
            return self.decode([token_id]).encode()
        piece = self.backend.id_to_token(token_id) if self.backend else None
        if piece is not None and "ByteLevel" in self._decoders and all(c in _BYTE_LEVEL for c in piece):
            return bytes(_BYTE_LEVEL[c] for c in piece)
        if piece is not None and "ByteFallback" in self._decoders:
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                return bytes([int(piece[3:5], 16)])
            return piece.replace("\u2581", " ").encode()
        return self.decode([token_id]).encode()

    def token_text(self, token_id: int) -> str:
        """One token as log-probabilities show it (OpenAI's form): its text; `bytes:\\xe6\\x97` for a
        token holding part of a character, which decoding alone shows as U+FFFD (so two such tokens
        would be one key of the legacy format's text -> logprob map, and one entry lost); a special
        token by its name (decoding skips it: "")."""
        if token_id in self._special:
            return str(self.hf.convert_ids_to_tokens(token_id))
        raw = self.token_bytes(token_id)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    def ends_inside_character(self, token_ids: list[int]) -> bool:
        """Whether the text of `token_ids` ends with the first bytes of a character that later tokens
        may complete. Decoding shows those bytes as U+FFFD, but so it shows a U+FFFD the text really
        holds (a prompt with a replacement character in it): only the bytes tell the two apart."""
        if not self.decode(token_ids).endswith("\ufffd"):
            return False
        if self.backend is None:  # no view of the bytes: assume the character is incomplete
            return True
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        utf8.decode(b"".join(self.token_bytes(t) for t in token_ids))
        return bool(utf8.getstate()[0])  # bytes it holds back: a character's start, still open


def _json_list(text: str, where: str) -> list[dict[str, Any]]:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        raise RequestError(where, "not JSON") from None
    if not isinstance(value, list) or not all(isinstance(x, dict) for x in value):
        raise RequestError(where, "must be a list of objects")
    return value


def _template_tool_calls(calls: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    """OpenAI's tool calls as chat templates read them: arguments as an object (OpenAI sends JSON
    text, which templates that write `arguments | tojson` would quote a second time)."""
    out = []
    for call in calls:
        if not isinstance(call.get("function"), dict):
            raise RequestError(where, "each call needs a 'function' object")
        fn = dict(call["function"])
        args = fn.get("arguments")
        if isinstance(args, str):
            try:
                parsed = json.loads(args)
            except (ValueError, RecursionError):
                parsed = None
            if isinstance(parsed, dict):
                fn["arguments"] = parsed
        out.append({**call, "type": call.get("type", "function"), "function": fn})
    return out


class IncrementalDetokenizer:
    """Text deltas from a growing list of token ids, never splitting a multi-byte character.

    With a fast tokenizer this is the `tokenizers` library's `DecodeStream`: one call into Rust per
    token (about 2 us), where decoding a window twice through `transformers` costs about 40 us. The
    router detokenizes every stream it serves in one Python process, so that is its token rate.
    Otherwise a short window of recent tokens is decoded, which keeps each step O(1) in the sequence
    length; a window ending in U+FFFD is an incomplete UTF-8 sequence, so it waits for the next token.
    Either way the last few prompt tokens are the context, so the first token's leading space (or
    its absence) decodes as it would inside the whole text.

    A prompt given as token ids may end inside a character (a continuation cut mid-emoji): its
    dangling tokens are not context but pending, so the character comes out whole with the token that
    completes it, and the context before it is never emitted (the text is what decoding the prompt
    and output together adds to the prompt's complete characters). `flush` gives what is still held
    back when the output ends, so the text always equals that decode: with U+FFFD for bytes of a
    character never completed. A prompt whose text ends in a U+FFFD of its own (a replacement
    character typed or pasted in) is context like any other: only its bytes tell it apart from an
    unfinished character, and a tokenizer without a `backend` cannot show them.
    """

    CONTEXT = 6  # prompt tokens decoded as context, never emitted

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int]) -> None:
        self.tok = tokenizer.hf
        context = list(prompt_token_ids[-self.CONTEXT :])
        pending: list[int] = []
        while context and tokenizer.ends_inside_character(context):
            pending.insert(0, context.pop())
        # Emitted (or context) ids, the last few kept as the next decode's prefix; then those held back.
        self.head, self.tail = context, list(pending)
        self.backend = tokenizer.backend
        if self.backend is not None and self._decode(context).endswith("\ufffd"):
            # The text before the output ends in a U+FFFD of its own: DecodeStream takes that for an
            # unfinished character and would emit the whole context with the first token.
            self.backend = None
        if self.backend is not None:
            self.stream = DecodeStream(ids=context, skip_special_tokens=True)
            for t in pending:
                self.stream.step(self.backend, t)  # incomplete: nothing to show yet

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        self.tail.append(token_id)
        if self.backend is not None:
            delta = self.stream.step(self.backend, token_id) or ""
        else:
            prefix, full = self._decode(self.head), self._decode(self.head + self.tail)
            delta = full[len(prefix) :] if len(full) > len(prefix) and not full.endswith("\ufffd") else ""
        if not delta:
            return ""
        self.head, self.tail = (self.head + self.tail)[-self.CONTEXT :], []
        return delta

    def flush(self) -> str:
        """The text of the ids still held back (an output ending inside a character): nothing is lost."""
        if not self.tail:
            return ""
        delta = self._decode(self.head + self.tail)[len(self._decode(self.head)) :]
        self.head, self.tail = (self.head + self.tail)[-self.CONTEXT :], []
        return delta


class TextStream:
    """Token ids in, text deltas out, cut at the first stop string and never leaking part of one.

    The engine uses it when it detokenizes itself; the router when workers send token ids only.

    The text leaves special tokens out, yet clients of chat models ask to stop at them by their text
    (stop=["<|im_end|>"], as Hugging Face's `stop_strings` match them): a hidden token whose text is
    in a stop string counts, for matching only, as that text. It is one piece: a stop string that
    starts or ends inside it ("end|>") does not match it. Other hidden tokens stay invisible to the
    match too, as they are to the text ("a<|x|>b" still stops at "ab").

    With min_tokens, as vLLM's output processor does: a stop string counts only if it ends in text
    of a token past the first min_tokens (one straddling that point counts).
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams) -> None:
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        self.stops = params.stop
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""
        self.emitted = 0
        self.stopped_by: str | None = None
        self.used = 0
        hidden = tokenizer.hidden_tokens if self.stops else {}
        self.named = {t: name for t, name in hidden.items() if any(name in s for s in self.stops)}
        # With such tokens: the text with theirs in place, which stop strings are matched in; where
        # each such token's text starts and ends in it; and how much of it is theirs up to each end.
        self.seen = ""
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.hidden: list[int] = []
        # Tokens pushed, and until min_tokens of them are, no stop string is searched for; then
        # only those ending past `floor`, the matched text's length at that point.
        self.min_tokens = params.min_tokens
        self.tokens = 0
        self.floor = 0 if not params.min_tokens else None

    def push(self, token_ids: list[int], special: set[int]) -> str:
        """The new text of `token_ids`; `used` is then how many of them count: up to and including
        the one that completed a stop string (those after it are not part of the output)."""
        self.used = len(token_ids)
        for k, t in enumerate(token_ids):
            if self.floor is None and self.tokens >= self.min_tokens:
                self.floor = len(self.seen if self.named else self.text)
            self.tokens += 1
            if t in special:
                continue  # EOS or a stop token: ends the stream, adds no text
            if self._add(self.detok.push(t), t):
                self.used = k + 1
                return self._flush(final=True)
        return self._flush(final=False)

    def _add(self, delta: str, token: int | None) -> bool:
        """Add `token`'s text `delta`; whether that completed a stop string (the text is then cut
        where it starts)."""
        self.text += delta
        if not self.stops:
            return False
        if not self.named:  # the text is what stop strings are matched in
            cut, s = self._find(self.text, len(self.text) - len(delta))
        else:
            before = len(self.seen)
            self.seen += delta
            if token in self.named:
                self.starts.append(len(self.seen))
                self.seen += self.named[token]
                self.ends.append(len(self.seen))
                self.hidden.append((self.hidden[-1] if self.hidden else 0) + len(self.named[token]))
            cut, s = self._find(self.seen, before)
            if s is not None:  # back from the matched text to the shown text
                j = bisect.bisect_right(self.ends, cut) - 1
                cut -= self.hidden[j] if j >= 0 else 0
        if s is None:
            return False
        self.text, self.stopped_by = self.text[:cut], s
        return True

    def _find(self, text: str, before: int) -> tuple[int, str | None]:
        """The first stop string in `text` (position, string) that ends past `before`: the text up to
        there was searched already."""
        if self.floor is None:
            return 0, None  # short of min_tokens
        lo = max(0, before - self.hold)
        hits = []
        for s in self.stops:
            i = text.find(s, max(lo, self.floor - len(s) + 1))
            while i >= 0 and (self._splits(i) or self._splits(i + len(s))):
                i = text.find(s, i + 1)
            if i >= 0:
                hits.append((i, s))
        return min(hits) if hits else (0, None)

    def _splits(self, pos: int) -> bool:
        """Whether `pos` (in the matched text) lies inside a hidden token's text."""
        j = bisect.bisect_right(self.starts, pos) - 1
        return j >= 0 and self.starts[j] < pos < self.ends[j]

    def _flush(self, final: bool) -> str:
        end = len(self.text) if final else max(self.emitted, len(self.text) - self.hold)
        delta = self.text[self.emitted : end]
        self.emitted = end
        return delta

    def finish(self) -> str:
        """The rest of the text when the output ends (max_tokens, EOS, a stop token)."""
        if self.stopped_by is None:
            # Matched too: a token that starts a character ends the text ("! " then the first
            # bytes of "東"), and the stop string before it was held back with that token.
            self._add(self.detok.flush(), None)
        return self._flush(final=True)
