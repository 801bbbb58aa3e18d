"""`SamplingParams`: how one request picks its tokens and when it stops."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

SAMPLING_EPS = 1e-5
# OpenAI's bound: each position's most likely tokens cost a topk over the vocabulary and that many
# (token, logprob) pairs on the wire per generated token.
MAX_TOP_LOGPROBS = 20
# The request fields every frontend takes by these names (the CLI's prompts file, OpenAI's body,
# KServe's sampling_parameters), one per SamplingParams field it sets; log-probabilities are named
# differently by each.
SAMPLING_REQUEST_FIELDS = (
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "min_p",
    "logit_bias",
    "min_tokens",
    "structured_outputs",
)


# The sampling controls added after the first workers shipped, by the name workers report (StatsResponse
# .sampling_controls). An older worker drops the wire fields it does not know in silence, so the
# router sends a request using one only to workers that apply it.
SAMPLING_CONTROLS = (
    "penalties",
    "logit_bias",
    "min_p",
    "min_tokens",
    "structured_outputs",
    "prompt_logprobs",
)


class RequestError(ValueError):
    """A request that can never be served as given; `field` names the offending input."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


# The seeds the HTTP and KServe frontends take: any int64 (OpenAI's type for it) or uint64 (the
# engine's, and KServe's seed tensor). -1 is no seed, as vLLM and llama.cpp read it (their clients
# send it for "sample at random"); any other negative seed is its 64-bit two's complement, as vLLM's
# torch generators read it, so a client that keeps seeds signed gets the same tokens for -2 as one
# that sends 2^64 - 2. Wider values would fold onto others and are refused.
NO_SEED = -1
MIN_REQUEST_SEED, MAX_REQUEST_SEED = -(2**63), 2**64 - 1


def request_seed(seed: int) -> int | None:
    """A frontend request's seed as the engine takes it (None: no seed); RequestError if out of range."""
    if (
        isinstance(seed, bool)
        or not isinstance(seed, int)
        or not MIN_REQUEST_SEED <= seed <= MAX_REQUEST_SEED
    ):
        raise RequestError("seed", f"must be in [-2^63, 2^64) (-1: no seed), got {seed!r}")
    if seed == NO_SEED:
        return None
    return seed & (2**64 - 1)


def json_token_id(key: object) -> int | None:
    """A logit_bias key as JSON carries it (a string: OpenAI's clients send token ids as "50256"), as
    the token id; None when it is not one (ASCII digits, below 2^32: the wire's uint32)."""
    if isinstance(key, str) and key.isascii() and key.isdigit() and int(key) < 2**32:
        return int(key)
    return None


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# Each structured-output kind by vLLM's name for it (its `structured_outputs` request field and
# StructuredOutputsParams), so clients written for vLLM send the same object here.
STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object")
# vLLM's other StructuredOutputsParams fields, at the values that change nothing here (its own
# serialized defaults among them): one grammar engine, so no fallback to disable; JSON's layout is
# fixed (structured.JSON_LAYOUT), with no free whitespace either way.
STRUCTURED_NEUTRAL = {
    "disable_fallback": (True, False),
    "disable_any_whitespace": (True, False),
    "disable_additional_properties": (False,),
}


@dataclass(frozen=True)
class StructuredOutputs:
    """What the generated text must be, exactly one of: `json`, a JSON Schema (as JSON text);
    `json_object`, any JSON object; `regex`, a regular expression the whole text matches (Rust's
    `regex` syntax); `choice`, one of these strings; `grammar`, a Lark grammar (llguidance's
    dialect). The engine masks, at each step, the tokens that could not continue such a text
    (engine/structured.py); the request ends once the text is complete."""

    json: str | None = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    json_object: bool = False

    def __post_init__(self) -> None:
        given = [k for k in STRUCTURED_KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise RequestError(
                "structured_outputs",
                f"give exactly one of {', '.join(STRUCTURED_KINDS)}; got {', '.join(given) or 'none'}",
            )
        if self.json is not None:
            if not isinstance(self.json, str):
                raise RequestError("structured_outputs", "json: must be a JSON Schema as JSON text")
            try:
                schema = json.loads(self.json)
            except (ValueError, RecursionError):
                raise RequestError("structured_outputs", "json: not a JSON document") from None
            if not isinstance(schema, (dict, bool)):
                raise RequestError("structured_outputs", "json: a JSON Schema is an object (or a boolean)")
        for kind in ("regex", "grammar"):
            value = getattr(self, kind)
            if value is not None and (not isinstance(value, str) or not value):
                raise RequestError("structured_outputs", f"{kind}: must be a non-empty string")
        if self.choice is not None:
            if (
                not isinstance(self.choice, tuple)
                or not self.choice
                or not all(isinstance(c, str) and c for c in self.choice)
            ):
                raise RequestError("structured_outputs", "choice: must be a list of non-empty strings")
        if not isinstance(self.json_object, bool):
            raise RequestError("structured_outputs", "json_object: must be a boolean")

    @property
    def kind(self) -> str:
        return next(k for k in STRUCTURED_KINDS if getattr(self, k) not in (None, False))

    @classmethod
    def from_dict(cls, value: Any) -> StructuredOutputs:
        """From vLLM's request object `{"json": {...}}`, `{"regex": "..."}`, `{"choice": [...]}`,
        `{"grammar": "..."}` or `{"json_object": true}` (a schema may also come as JSON text).
        RequestError names what is wrong; keys vLLM has for its other backends are refused."""
        if not isinstance(value, dict):
            raise RequestError(
                "structured_outputs", "must be an object with one of " + ", ".join(STRUCTURED_KINDS)
            )
        unknown = sorted(
            k
            for k, v in value.items()
            if k not in STRUCTURED_KINDS
            and v is not None
            and not any(v is off for off in STRUCTURED_NEUTRAL.get(k, ()))
        )
        if unknown:
            raise RequestError(
                "structured_outputs",
                f"unsupported key {unknown[0]!r}; give one of {', '.join(STRUCTURED_KINDS)}",
            )
        schema = value.get("json")
        if schema is not None and not isinstance(schema, str):
            if not isinstance(schema, (dict, bool)):
                raise RequestError("structured_outputs", "json: must be a JSON Schema (an object)")
            schema = json.dumps(schema, separators=(",", ":"), ensure_ascii=False)  # key order kept
        choice = value.get("choice")
        if choice is not None:
            if not isinstance(choice, list):
                raise RequestError("structured_outputs", "choice: must be a list of non-empty strings")
            choice = tuple(choice)
        return cls(
            json=schema,
            regex=value.get("regex"),
            choice=choice,
            grammar=value.get("grammar"),
            json_object=value.get("json_object") or False,
        )


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False
    # This many most likely tokens at each generated position, with log-probabilities; implies
    # logprobs.
    top_logprobs: int = 0
    # max_tokens is an upper bound: the engine lowers it to what fits its KV cache (beside the
    # request's adapter) instead of refusing the request.
    fit_max_tokens: bool = False
    # Penalties on tokens already seen, applied to the logits after logit_bias and before the rest
    # (greedy too), as OpenAI's API and vLLM define them: each generated token's logit is lowered by
    # frequency_penalty per time it was generated and by presence_penalty once; repetition_penalty
    # (transformers' and vLLM's) divides the positive logit of a token in the prompt or the output
    # and multiplies a negative one. Log-probabilities stay those of the raw logits.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    # vLLM's: after temperature, tokens less likely than min_p times the most likely one are
    # dropped (before top-k and top-p).
    min_p: float = 0.0
    # OpenAI's: added to the logits of these token ids first of all (in [-100, 100]; -100 all but
    # bans a token, 100 all but forces it).
    logit_bias: dict[int, float] = field(default_factory=dict)
    # vLLM's: no EOS (unless ignore_eos) nor stop_token_ids is sampled before this many tokens;
    # a stop string counts only if it ends in the text of a later token (TextStream).
    min_tokens: int = 0
    # The text must be a JSON value of a schema, match a regex, be one of some strings or follow
    # a grammar (vLLM's structured outputs); the engine masks the tokens that cannot continue it.
    structured_outputs: StructuredOutputs | None = None
    # vLLM's: each prompt token's log-probability given the tokens before it (None for the first),
    # and this many most likely tokens at each position (0: none); None: not computed. The prompt is
    # then computed whole, not taken from the prefix cache.
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        if isinstance(self.logit_bias, dict):
            self.logit_bias = dict(self.logit_bias)  # the request's own: callers' dicts stay theirs
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputs.from_dict(self.structured_outputs)
        self.validate()
        if self.top_logprobs:
            self.logprobs = True

    def validate(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise RequestError("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        if not (isinstance(self.temperature, (int, float)) and 0 <= self.temperature < float("inf")):
            raise RequestError("temperature", f"must be a finite number >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise RequestError("top_p", f"must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise RequestError("top_k", f"must be -1, 0 (disabled) or a positive integer, got {self.top_k!r}")
        # Checked here, not when first used: a bad seed raised inside the engine's step, which
        # failed every request in the batch.
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**64
        ):
            raise RequestError("seed", f"must be an integer in [0, 2^64), got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise RequestError("stop", "stop strings must be non-empty strings")
        if any((not isinstance(t, int)) or t < 0 for t in self.stop_token_ids):
            raise RequestError("stop_token_ids", "must be non-negative integers")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2.0 <= value <= 2.0:
                raise RequestError(name, f"must be a number in [-2, 2], got {value!r}")
        rep = self.repetition_penalty
        if not _is_number(rep) or not 0.0 < rep < float("inf"):
            raise RequestError("repetition_penalty", f"must be a finite number > 0 (1: none), got {rep!r}")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise RequestError("min_tokens", f"must be an integer >= 0, got {self.min_tokens!r}")
        if self.min_tokens > self.max_tokens:
            raise RequestError("min_tokens", f"{self.min_tokens} is more than max_tokens ({self.max_tokens})")
        if not _is_number(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise RequestError("min_p", f"must be a number in [0, 1], got {self.min_p!r}")
        if not isinstance(self.logit_bias, dict):
            raise RequestError("logit_bias", f"must map token ids to biases, got {self.logit_bias!r}")
        for token, bias in self.logit_bias.items():
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise RequestError("logit_bias", f"keys must be token ids (integers >= 0), got {token!r}")
            if not _is_number(bias) or not -100.0 <= bias <= 100.0:
                raise RequestError(
                    "logit_bias", f"token {token}: the bias must be in [-100, 100], got {bias!r}"
                )
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputs):
            raise RequestError(
                "structured_outputs", f"must be StructuredOutputs or None, got {self.structured_outputs!r}"
            )
        pl = self.prompt_logprobs
        if pl is not None and (
            isinstance(pl, bool) or not isinstance(pl, int) or not 0 <= pl <= MAX_TOP_LOGPROBS
        ):
            raise RequestError(
                "prompt_logprobs", f"must be an integer in [0, {MAX_TOP_LOGPROBS}] or unset, got {pl!r}"
            )
        if not isinstance(self.top_logprobs, int) or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise RequestError(
                "top_logprobs", f"must be an integer in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs!r}"
            )

    @property
    def controls(self) -> frozenset[str]:
        """The SAMPLING_CONTROLS this request uses."""
        used = {
            "penalties": self.penalized,
            "logit_bias": bool(self.logit_bias),
            "min_p": bool(self.min_p),
            "min_tokens": bool(self.min_tokens),
            "structured_outputs": self.structured_outputs is not None,
            "prompt_logprobs": self.prompt_logprobs is not None,
        }
        return frozenset(name for name, on in used.items() if on)

    @property
    def penalized(self) -> bool:
        """Whether the tokens already seen change this request's logits."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def greedy(self) -> bool:
        # Below this, logits / temperature overflows float32; the distribution is an argmax anyway.
        return self.temperature < SAMPLING_EPS or self.top_k == 1
