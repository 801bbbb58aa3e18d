"""What a checkpoint on disk may hold, and the clear errors for what it must not: the files
transformers would read (an index's shards, else model.safetensors), every tensor once and of its
own shape, truncated files named, activations the engine does not compute refused; a GGUF file's
conversion cache keyed by its whole content."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import save_file

from tandem_worker.engine.config import ModelConfig
from tandem_worker.engine.loader import BUILTIN_MODELS, UnsupportedModelError, convert_gguf, gguf_cache_key
from tandem_worker.engine.model import LlamaModel

from .conftest import TINY


def _state() -> dict[str, torch.Tensor]:
    """A transformers-named state dict of TINY, random."""
    g = torch.Generator().manual_seed(0)
    h, i, kv = 64, 128, 32
    state = {
        "model.embed_tokens.weight": torch.randn(300, h, generator=g),
        "lm_head.weight": torch.randn(300, h, generator=g),
    }
    state["model.norm.weight"] = torch.ones(h)
    for n in range(2):
        pre = f"model.layers.{n}."
        for name, shape in (
            ("self_attn.q_proj.weight", (h, h)),
            ("self_attn.k_proj.weight", (kv, h)),
            ("self_attn.v_proj.weight", (kv, h)),
            ("self_attn.o_proj.weight", (h, h)),
            ("mlp.gate_proj.weight", (i, h)),
            ("mlp.up_proj.weight", (i, h)),
            ("mlp.down_proj.weight", (h, i)),
        ):
            state[pre + name] = torch.randn(*shape, generator=g) * 0.1
        state[pre + "input_layernorm.weight"] = torch.ones(h)
        state[pre + "post_attention_layernorm.weight"] = torch.ones(h)
    return state


def _load(folder) -> LlamaModel:
    model = LlamaModel(ModelConfig.from_dict(TINY), 64)
    model.load_weights(folder)
    return model


def _same(a: LlamaModel, b: LlamaModel) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_fused_weight_of_the_wrong_shape_is_refused(tmp_path):
    # q/k/v and gate/up are copied into slices of one fused tensor; copy_ broadcasts, so a [64]
    # q_proj filled the whole q slice with no error.
    for name, bad in (
        ("self_attn.q_proj.weight", torch.randn(64)),
        ("mlp.up_proj.weight", torch.randn(128, 1)),
    ):
        state = _state()
        state[f"model.layers.0.{name}"] = bad
        save_file(state, str(tmp_path / "model.safetensors"))
        with pytest.raises(ValueError, match=re.escape(f"model.layers.0.{name}: shape {tuple(bad.shape)}")):
            _load(tmp_path)


def test_a_sharded_checkpoint_reads_the_files_its_index_names(tmp_path):
    state = _state()
    names = sorted(state)
    half = len(names) // 2
    shards = {
        "model-00001-of-00002.safetensors": names[:half],
        "model-00002-of-00002.safetensors": names[half:],
    }
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(tmp_path / file))
    index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    reference = _load(tmp_path)
    # A stale single-file checkpoint beside the shards (all zeros): it was read too, and won.
    save_file({k: torch.zeros_like(v) for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    # Mistral's repos ship consolidated.safetensors (another naming) beside the HF shards.
    save_file({"layers.0.attention.wq.weight": torch.zeros(2)}, str(tmp_path / "consolidated.safetensors"))
    assert _same(_load(tmp_path), reference)
    assert reference.embed_tokens.weight.abs().sum() > 0
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing shards: model-00002-of-00002.safetensors"):
        _load(tmp_path)


def test_a_tensor_in_two_files_is_refused(tmp_path):
    state = _state()
    save_file(state, str(tmp_path / "a.safetensors"))
    save_file({"model.norm.weight": torch.zeros(64)}, str(tmp_path / "b.safetensors"))
    with pytest.raises(ValueError, match="'model.norm.weight' appears twice"):
        _load(tmp_path)


def test_a_truncated_safetensors_file_is_named(tmp_path):
    save_file(_state(), str(tmp_path / "model.safetensors"))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors file"):
        _load(tmp_path)


def test_an_activation_the_mlp_does_not_compute_is_refused():
    # It was served as SiLU, with other outputs than transformers.
    with pytest.raises(ValueError, match="unsupported hidden_act 'gelu'"):
        ModelConfig.from_dict({**TINY, "hidden_act": "gelu"})
    assert ModelConfig.from_dict({**TINY, "hidden_act": "silu"}).hidden_size == 64
    with pytest.raises(ValueError, match="llama3 rope scaling lacks 'low_freq_factor'"):
        ModelConfig.from_dict({**TINY, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})


def test_the_gguf_cache_key_covers_the_whole_file_and_a_truncated_file_is_named(tmp_path):
    gguf = tmp_path / "m.gguf"
    shutil.copy(BUILTIN_MODELS["smollm2-135m"].gguf_path(), gguf)
    key = gguf_cache_key(gguf)
    with gguf.open("r+b") as f:  # a byte in the middle (a tensor's, far from the metadata)
        size = f.seek(0, 2)
        f.seek(size // 2)
        byte = f.read(1)
        f.seek(size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert gguf_cache_key(gguf) != key  # it was the same: stale weights served from the cache
    with gguf.open("r+b") as f:
        f.truncate(size * 2 // 3)
    with pytest.raises(UnsupportedModelError, match=r"m\.gguf is truncated or corrupt"):
        convert_gguf(gguf, tmp_path / "cache")


@pytest.mark.parametrize("head_differs", [True, False])
def test_a_tied_config_with_a_stored_head_serves_what_transformers_serves(tmp_path, model_dir, head_differs):
    # transformers keeps a stored lm_head that differs from the embedding even when the config says
    # tie_word_embeddings (it warns); tying it anyway gave other tokens than the reference.
    from transformers import LlamaForCausalLM

    from tandem_worker.engine.llm_engine import LLMEngine
    from tandem_worker.engine.sampling_params import SamplingParams

    state = _state()
    if not head_differs:
        state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({**TINY, "tie_word_embeddings": True}))
    for f in model_dir.glob("tokenizer*"):
        shutil.copy(f, tmp_path / f.name)
    prompt = [5, 17, 33, 2 + 40, 99]
    reference = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    want = reference.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None)
    engine = LLMEngine(model=str(tmp_path), kv_cache_bytes=1 << 20)
    engine.add_request(
        prompt_token_ids=prompt, params=SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    )
    got = []
    while engine.has_unfinished():
        got += [o.token_ids for o in engine.step() if o.finished]
    assert got[0] == want[0, len(prompt) :].tolist()
    model = engine.runner.model
    tied = model.lm_head.weight.data_ptr() == model.embed_tokens.weight.data_ptr()
    assert tied is not head_differs
