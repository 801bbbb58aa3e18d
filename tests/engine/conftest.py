"""Engine fixtures: one engine on the real built-in model per test session."""

from __future__ import annotations

import pytest

from tandem_worker.engine.llm_engine import LLMEngine, RequestOutput


@pytest.fixture(scope="session")
def engine(model_dir) -> LLMEngine:
    return LLMEngine(model=str(model_dir), kv_cache_bytes=400 * 2**20)


def run_all(engine: LLMEngine) -> dict[str, RequestOutput]:
    """Step until idle; return each request's final output."""
    final: dict[str, RequestOutput] = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                final[o.request_id] = o
    return final
