"""Structured outputs as token masks: `Grammars` compiles a request's `StructuredOutputs` and says,
at each step, which tokens may come next.

llguidance (the grammar engine vLLM, SGLang and llama.cpp use) does the work: JSON Schema, regex
and Lark grammars compiled against the tokenizer's vocabulary, a bitmask of the allowed tokens in
tens of microseconds per row, and the matcher state advanced by each sampled token. Writing that
by hand would mean a JSON Schema compiler and a lexer over token bytes.

A JSON Schema's text is laid out as `json.dumps` lays it out (", " and ": ", no other whitespace):
a schema that allows free whitespace lets a small model emit newlines until max_tokens. A schema
may ask for other separators or free whitespace in its own `x-guidance` object (llguidance's).

This module is torch-free (the router checks grammars with it); the sampler applies the masks.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import TYPE_CHECKING

import llguidance
import numpy as np

from .sampling_params import RequestError, StructuredOutputs

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

JSON_LAYOUT: llguidance.JsonCompileOptions = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}
# Compiled grammars kept per worker (a fresh matcher is a copy of one: microseconds): clients send
# the same few schemas again and again.
GRAMMAR_CACHE_SIZE = 128


def grammar(so: StructuredOutputs) -> str:
    """`so` as an llguidance grammar (text); RequestError if a schema is not one it reads."""
    kind = so.kind
    try:
        if kind == "json":
            return llguidance.LLMatcher.grammar_from_json_schema(so.json or "", defaults=JSON_LAYOUT)
        if kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_LAYOUT)
        if kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(so.regex or "")
        if kind == "choice":
            # Lark string literals read JSON's escapes: any text, quotes and newlines included.
            alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in so.choice or ())
            return llguidance.LLMatcher.grammar_from_lark(f"start: {alternatives}")
        return llguidance.LLMatcher.grammar_from_lark(so.grammar or "")
    except ValueError as e:
        raise RequestError("structured_outputs", f"{kind}: {e}") from None


def check(so: StructuredOutputs) -> None:
    """RequestError with llguidance's message if `so` cannot compile whatever the vocabulary (a bad
    regex, an unknown schema keyword, a Lark syntax error): the router's check, before any worker
    computes the prompt. A worker compiles it against its tokenizer (`Grammars.compiled`)."""
    error = llguidance.LLMatcher.validate_grammar(grammar(so))
    if error:
        raise RequestError("structured_outputs", f"{so.kind}: {error.strip()}")


class Grammars:
    """A worker's compiled grammars and the tokenizer they are compiled against (built on first
    use: about 0.2 s for a 49K vocabulary). Thread-safe: requests are checked on the server's
    threads and their matchers made on the engine's."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: Iterable[int]) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos = sorted(eos_token_ids)
        self._lock = threading.Lock()
        self._ll: llguidance.LLTokenizer | None = None
        self._compiled: OrderedDict[StructuredOutputs, llguidance.LLMatcher] = OrderedDict()
        self._executor: llguidance.LLExecutor | None = None

    def _lltokenizer(self) -> llguidance.LLTokenizer:
        if self._ll is None:
            backend = self._tokenizer.backend
            if backend is None:
                raise RequestError(
                    "structured_outputs", "this model's tokenizer is not a fast (Rust) tokenizer"
                )
            # The tokenizer's JSON (added tokens included), as llguidance's own HF helper reads it;
            # the model's vocabulary may be wider than the tokenizer's (padding rows, never allowed).
            self._ll = llguidance.LLTokenizer(backend.to_str(), n_vocab=self.vocab_size, eos_token=self._eos)
        return self._ll

    def compiled(self, so: StructuredOutputs) -> llguidance.LLMatcher:
        """A matcher at the start of `so`'s grammar, compiled once per worker (cached); raises
        RequestError if it does not compile. Do not advance it: take `matcher`'s copies."""
        with self._lock:
            m = self._compiled.get(so)
            if m is not None:
                self._compiled.move_to_end(so)
                return m
            tokenizer = self._lltokenizer()
        # Outside the lock: a large grammar compiles for a while (llguidance drops the GIL).
        m = llguidance.LLMatcher(tokenizer, grammar(so), log_level=0)
        if m.is_error():
            raise RequestError("structured_outputs", f"{so.kind}: {m.get_error().strip()}")
        with self._lock:
            self._compiled[so] = m
            while len(self._compiled) > GRAMMAR_CACHE_SIZE:
                self._compiled.popitem(last=False)
        return m

    def matcher(self, so: StructuredOutputs) -> llguidance.LLMatcher:
        """A new matcher for one request (a copy of the compiled one)."""
        return self.compiled(so).deep_copy()

    def masks(self, matchers: list[llguidance.LLMatcher]) -> np.ndarray:
        """Each matcher's allowed next tokens (computed in parallel), a bit per token: int32
        [len(matchers), words], bit j of word i set if token 32 i + j may come next."""
        words = (self.vocab_size + 31) // 32
        out = np.zeros((len(matchers), words), dtype=np.int32)
        if self._executor is None:
            self._executor = llguidance.LLExecutor()
        self._executor.unsafe_compute_mask_ptr(
            [(m, row) for row, m in enumerate(matchers)], out.ctypes.data, words * 4, len(matchers)
        )
        return out
