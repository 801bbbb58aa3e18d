"""`Tokenizer` (Hugging Face tokenizer and chat template), `IncrementalDetokenizer` and `TextStream`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jinja2
from tokenizers import Tokenizer as RustTokenizer
from tokenizers.decoders import DecodeStream
from transformers import AutoTokenizer, PreTrainedConfig, PreTrainedTokenizerBase

from .sampling_params import RequestError, SamplingParams


def _config_for_tokenizer(folder: Path) -> PreTrainedConfig | None:
    """The model config as `AutoTokenizer` reads it when the tokenizer names its own class: the
    model type and path only. Without it, `AutoTokenizer` loads the model's config class, whose
    module (for Llama and its kin) imports transformers' modeling stack and torch._dynamo: about
    2 s of every worker's and router's start, for a tokenizer that takes 0.2 s. None (the full
    config is read) where the tokenizer leaves its class to the model type or to remote code, the
    cases where `AutoTokenizer` looks the class up by the config's Python type."""
    try:
        tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
        model_config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not tokenizer_config.get("tokenizer_class") or "auto_map" in tokenizer_config:
        return None
    config = PreTrainedConfig(name_or_path=str(folder), tokenizer_class=model_config.get("tokenizer_class"))
    config.model_type = model_config.get("model_type", "")
    return config


class Tokenizer:
    def __init__(self, folder: Path) -> None:
        folder = Path(folder)
        self.hf: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(
            str(folder), config=_config_for_tokenizer(folder)
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

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> list[int]:
        if not self.has_chat_template:
            raise RequestError("messages", "this model's tokenizer has no chat template")
        if not messages:
            raise RequestError("messages", "must not be empty")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise RequestError(f"messages[{i}]", "needs 'role' and 'content'")
        try:
            ids = self.hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        except jinja2.TemplateError as e:
            # Templates refuse what their model was not trained on (Llama 2's and Mistral's raise on
            # roles that do not alternate): the request's fault, said in the template's words.
            raise RequestError("messages", f"the model's chat template refuses them: {e}") from None
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # a BatchEncoding in newer transformers
            ids = ids["input_ids"]
        return list(ids)

    def chat_prompt(self, text: str) -> list[int]:
        return self.apply_chat_template([{"role": "user", "content": text}])

    def decode(self, token_ids: list[int]) -> str:
        return self.hf.decode(token_ids, skip_special_tokens=True)


class IncrementalDetokenizer:
    """Text deltas from a growing list of token ids, never splitting a multi-byte character.

    With a fast tokenizer this is the `tokenizers` library's `DecodeStream`: one call into Rust per
    token (about 2 us), where decoding a window twice through `transformers` costs about 40 us. The
    router detokenizes every stream it serves in one Python process, so that is its token rate.
    Otherwise a short window of recent tokens is decoded, which keeps each step O(1) in the sequence
    length; a window ending in U+FFFD is an incomplete UTF-8 sequence, so it waits for the next token.
    Either way the last few prompt tokens are the context, so the first token's leading space (or
    its absence) decodes as it would inside the whole text. A prompt given as token ids may end
    inside a character (a continuation cut mid-emoji): its dangling tokens are not context but
    pending, so the character comes out whole with the token that completes it, and the context
    before it is never emitted.
    """

    CONTEXT = 6  # prompt tokens decoded as context, never emitted

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int]) -> None:
        context = list(prompt_token_ids[-self.CONTEXT :])
        pending: list[int] = []
        while context and tokenizer.hf.decode(context, skip_special_tokens=True).endswith("\ufffd"):
            pending.insert(0, context.pop())
        self.backend = tokenizer.backend
        if self.backend is not None:
            self.stream = DecodeStream(ids=context, skip_special_tokens=True)
            for t in pending:
                self.stream.step(self.backend, t)  # incomplete: nothing to show yet
            return
        self.tok = tokenizer.hf
        self.ids: list[int] = context + pending
        self.prefix_offset = 0
        self.read_offset = len(context)

    def push(self, token_id: int) -> str:
        if self.backend is not None:
            return self.stream.step(self.backend, token_id) or ""
        self.ids.append(token_id)
        prefix = self.tok.decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        full = self.tok.decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return delta
        return ""


class TextStream:
    """Token ids in, text deltas out, cut at the first stop string and never leaking part of one.

    The engine uses it when it detokenizes itself; the router when workers send token ids only.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams) -> None:
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        self.stops = params.stop
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""
        self.emitted = 0
        self.stopped_by: str | None = None

    def push(self, token_ids: list[int], special: set[int]) -> str:
        for t in token_ids:
            if t in special:
                continue  # EOS or a stop token: ends the stream, adds no text
            before = len(self.text)
            self.text += self.detok.push(t)
            if self.stops:
                lo = max(0, before - self.hold)
                hits = [(i, s) for s in self.stops if (i := self.text.find(s, lo)) >= 0]
                if hits:
                    i, s = min(hits)
                    self.text, self.stopped_by = self.text[:i], s
                    return self._flush(final=True)
        return self._flush(final=False)

    def _flush(self, final: bool) -> str:
        end = len(self.text) if final else max(self.emitted, len(self.text) - self.hold)
        delta = self.text[self.emitted : end]
        self.emitted = end
        return delta

    def finish(self) -> str:
        return self._flush(final=True)
