"""Shared by the autoscaling tests."""

from __future__ import annotations

# Every key of `LLMEngine.stats()` that `tandem_worker.server.metrics.EngineCollector` exports.
ENGINE_STAT_KEYS = (
    "used_blocks",
    "free_blocks",
    "cached_blocks",
    "running",
    "waiting",
    "queued_prompt_tokens",
    "prefill_tokens_computed",
    "prefix_cached_tokens",
    "decode_tokens",
    "preemptions",
    "busy_seconds",
)


def idle_engine_stats(num_blocks: int) -> dict[str, float]:
    """An idle engine's stats: every counter and gauge at 0, a KV pool of `num_blocks`."""
    return {**dict.fromkeys(ENGINE_STAT_KEYS, 0), "num_blocks": num_blocks}
