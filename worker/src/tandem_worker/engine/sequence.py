"""`Sequence`: one request's tokens and bookkeeping as the scheduler sees it."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.Enum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the model's context
    ABORT = "abort"


@dataclass
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    status: SequenceStatus = SequenceStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    output_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    # With params.prompt_logprobs: each prompt token's log-probability given those before it (None
    # for the first) and the most likely tokens there, filled as the prompt's chunks are computed.
    prompt_logprobs: list[float | None] = field(default_factory=list)
    prompt_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    # Tokens whose KV is in the cache (computed here or found in the prefix cache).
    num_computed_tokens: int = 0
    # Of the prompt, tokens served from the prefix cache at (the last) admission.
    num_cached_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    # Disaggregation. Prefill side: each layer's new KV goes to `kv_sink(layer, start, k, v, ready)`,
    # from token `kv_sent` on. k/v are fresh host tensors [n, kv_heads, head_dim]; `ready` is None
    # (CPU: they hold the KV already) or has `.synchronize()`, to call before reading them (CUDA:
    # pinned copies still in flight on a side stream, see kv_staging.py). Call it in the reader's
    # thread, never the engine's. Decode side: `remote_kv` means the prompt's KV arrives from a
    # prefill worker.
    kv_sink: Callable[[int, int, Any, Any, Any], None] | None = None
    kv_sent: int = 0
    # Prefill side: True while more of this request's KV waits for its reader than it may (see
    # engine_loop.KVBacklog); the scheduler then holds back its next prompt chunk, the others run
    # on. The sink must never wait (it runs inside a step all requests share): this is how a slow
    # reader's backlog stays bounded, at about the limit plus one chunk's KV.
    kv_backlogged: Callable[[], bool] | None = None
    remote_kv: bool = False
    # LoRA: the adapter's name, its device slot while the sequence holds it pinned (see lora.py),
    # and the prefix-cache salt that keeps KV computed under different adapters apart.
    lora_name: str | None = None
    lora_slot: int | None = None
    cache_salt: bytes | None = None
    # Steps this request was passed over because its adapter found no room on the device.
    num_adapter_waits: int = 0

    def __post_init__(self) -> None:
        if self.params.prompt_logprobs is not None and not self.prompt_logprobs:
            self.prompt_logprobs.append(None)
            self.prompt_top_logprobs.append([])

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_at(self, index: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[index] if index < n else self.output_token_ids[index - n]

    def tokens(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n : end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n]

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_prefilling(self) -> bool:
        """More than the newest token still lacks KV: a (possibly resumed) prefill."""
        return self.num_uncomputed_tokens > 1 or not self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
