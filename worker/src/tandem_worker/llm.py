"""`LLM`: the offline Python API, in the style of vLLM's `LLM(...).generate(prompts, params)`."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from .engine.config import EngineConfig
from .engine.llm_engine import LLMEngine, RequestOutput
from .engine.sampling_params import RequestError, SamplingParams


@dataclass(frozen=True)
class TokensPrompt:
    prompt_token_ids: list[int]


@dataclass(frozen=True)
class ChatPrompt:
    messages: list[dict[str, Any]]


PromptType = str | list[int] | TokensPrompt | ChatPrompt


class LLM:
    def __init__(self, model: str = "smollm2-135m", **engine_kwargs: Any) -> None:
        if "seed" in engine_kwargs:
            # As vLLM's LLM(seed=N): a seed given here also replays the draws of unseeded requests
            # (a worker's stream is random unless --sampling-seed).
            engine_kwargs.setdefault("sampling_seed", engine_kwargs["seed"])
        self.engine = LLMEngine(EngineConfig(model=model, **engine_kwargs))
        self.tokenizer = self.engine.tokenizer

    @classmethod
    def from_engine(cls, engine: LLMEngine) -> LLM:
        """Wrap an engine that is already loaded (tests and servers share one)."""
        llm = cls.__new__(cls)
        llm.engine = engine
        llm.tokenizer = engine.tokenizer
        return llm

    def _token_ids(self, prompt: PromptType) -> list[int]:
        if isinstance(prompt, TokensPrompt):
            return list(prompt.prompt_token_ids)
        if isinstance(prompt, ChatPrompt):
            return self.tokenizer.apply_chat_template(prompt.messages)
        if isinstance(prompt, list):
            return list(prompt)
        if not isinstance(prompt, str) or not prompt:
            raise RequestError("prompt", "must be a non-empty string or token ids")
        return self.tokenizer.encode(prompt)

    def generate(
        self,
        prompts: PromptType | Seq[PromptType],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = False,
        adapters: str | Seq[str | None] | None = None,
    ) -> list[RequestOutput]:
        """Generate for all prompts together (they share batches); outputs come back in input order.

        `adapters`: one LoRA adapter name for all prompts, or one per prompt (None or "" for the
        base model); requests for different adapters share batches too. Every prompt and adapter is
        validated before any is submitted, so a bad one changes nothing.
        """
        if isinstance(prompts, (str, TokensPrompt, ChatPrompt)) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        if sampling_params is None:
            params = [SamplingParams() for _ in prompts]
        elif isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        if adapters is None or isinstance(adapters, str):
            names = [adapters or None] * len(prompts)
        else:
            names = [a or None for a in adapters]
            if len(names) != len(prompts):
                raise ValueError(f"{len(prompts)} prompts but {len(names)} adapters")
        token_ids = [self._token_ids(p) for p in prompts]
        for ids, p in zip(token_ids, params):
            self.engine.validate(ids, dataclasses.replace(p))  # a copy: validate may fit max_tokens
        for name in set(names) - {None}:
            self.engine.lora.check(name)
        ids_in_order = [
            self.engine.add_request(prompt_token_ids=ids, params=p, adapter=a)
            for ids, p, a in zip(token_ids, params, names)
        ]
        return self._run(ids_in_order, use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        final: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), disable=not use_tqdm, desc="generate")
        try:
            while len(final) < len(request_ids):
                for o in self.engine.step():
                    if o.error is not None:
                        raise RuntimeError(f"request {o.request_id} failed: {o.error}")
                    if o.finished:
                        final[o.request_id] = o
                        bar.update(1)
        except BaseException:
            for rid in request_ids:
                self.engine.abort(rid)
            raise
        finally:
            bar.close()
        return [final[r] for r in request_ids]
