"""The engine's GPU code path on the CPU: every Triton kernel it launches on a GPU, through Triton's
interpreter (the elementwise kernels, the KV store, paged decode attention), on a small random
Llama, against the same engine on the torch references. float32: the interpreter's bf16 dots are
wrong (tests/kernels/conftest.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import tandem_kernels
from tandem_worker.engine.llm_engine import LLMEngine
from tandem_worker.engine.sampling_params import SamplingParams

from .conftest import run_all

TINY = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


@pytest.mark.skipif(not tandem_kernels.triton_available(), reason="triton is not installed")
def test_triton_kernels_in_the_engine_match_the_torch_path(model_dir, tmp_path: Path, monkeypatch):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    for f in Path(model_dir).glob("tokenizer*"):
        shutil.copy(f, tmp_path / f.name)
    prompts = [[5, 17, 99, 3, 42, 7], [200, 11], list(range(20, 57))]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=True)
    kernels = {"rms_norm", "rotary", "silu_and_mul", "store_kvcache", "paged_decode_attention"}
    calls: list[str] = []
    for name in kernels:
        launcher = getattr(tandem_kernels, f"_triton_{name}")
        monkeypatch.setattr(
            tandem_kernels, f"_triton_{name}", lambda *a, _f=launcher, _n=name: calls.append(_n) or _f(*a)
        )
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("TANDEM_KERNELS", backend)
        calls.clear()
        engine = LLMEngine(
            model=str(tmp_path), load_format="dummy", dtype="float32", kv_cache_bytes=4 << 20, seed=3
        )
        ids = [engine.add_request(prompt_token_ids=p, params=params) for p in prompts]
        out = run_all(engine)
        results[backend] = [(out[i].token_ids, out[i].logprobs) for i in ids]
        # The torch path launches none; the Triton path all of them (prefill and decode steps).
        assert set(calls) == (kernels if backend == "triton" else set())
    for (tokens, logprobs), (want_tokens, want_logprobs) in zip(results["triton"], results["torch"]):
        assert tokens == want_tokens
        assert logprobs == pytest.approx(want_logprobs, abs=1e-4)
