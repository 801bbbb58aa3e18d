"""The engine's CPU path on the C++ ops (tandem_kernels.cpu_extension) against the same engine on
the torch references, on the real model, in steps that mix decodes (attending in place over their
pages) with prefills (attending over gathered blocks)."""

from __future__ import annotations

import pytest

from tandem_kernels import cpu_extension
from tandem_worker.engine.llm_engine import LLMEngine, RequestOutput
from tandem_worker.engine.sampling_params import SamplingParams

TEXTS = [
    "The lighthouse keeper climbed the stairs every evening and",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    ",
    "A recipe for bread: flour, water, salt and yeast. First,"
    + " mix the dry ingredients in a large bowl, then add the water slowly while stirring," * 6,
    "Rivers in Europe: the Danube, the Rhine,",
]


def serve(engine: LLMEngine, prompts: list[list[int]]) -> list[RequestOutput]:
    """One request added per step, so each prefill runs beside the decodes of the ones before."""
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=True)
    pending, ids, final = list(prompts), [], {}
    while pending or engine.has_unfinished():
        if pending:
            ids.append(engine.add_request(prompt_token_ids=pending.pop(0), params=params))
        for o in engine.step():
            if o.finished:
                final[o.request_id] = o
    return [final[i] for i in ids]


def test_the_cpp_ops_serve_what_the_torch_references_serve(engine, model_dir, monkeypatch):
    if not engine.runner.paged_decodes:
        pytest.skip("no C++ compiler: the CPU ops could not be built")
    op = cpu_extension.load()
    calls: dict[str, int] = {}

    class Spy:  # counts the ops' calls; their constants (the decode limits) pass through
        def __getattr__(self, name):
            found = getattr(op, name)
            if not callable(found):
                return found
            calls[name] = calls.get(name, 0)
            return lambda *a: calls.__setitem__(name, calls[name] + 1) or found(*a)

    prompts = [engine.tokenizer.encode(t) for t in TEXTS]
    monkeypatch.setattr(cpu_extension, "loaded", lambda: Spy())
    got = serve(engine, prompts)
    layers = engine.model_config.num_hidden_layers
    # Every layer of every step: the norms, rotary, the KV write, the MLP's SiLU, and paged decodes.
    assert calls["paged_decode_attention"] >= layers * 11  # 12 tokens: 11 steps with decodes at least
    assert calls["store_kvcache"] == calls["silu_and_mul"] == calls["rotary"] // 2
    assert calls["rms_norm"] == calls["store_kvcache"] * 2 + calls["store_kvcache"] // layers

    monkeypatch.setenv("TANDEM_KERNELS", "torch")
    reference = LLMEngine(model=str(model_dir), kv_cache_bytes=32 * 2**20)
    assert not reference.runner.paged_decodes
    want = serve(reference, prompts)
    for g, w in zip(got, want):
        assert g.token_ids == w.token_ids
        assert g.logprobs == pytest.approx(w.logprobs, abs=1e-3)
