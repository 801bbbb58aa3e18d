"""The loader on the real built-in model: GGUF -> Hugging Face folder, checked against transformers."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tandem_worker.engine.config import ModelConfig
from tandem_worker.engine.loader import (
    BUILTIN_MODELS,
    CONVERSION_INFO_FILE,
    ModelNotFoundError,
    UnsupportedModelError,
    hf_tensor_name,
    resolve_model,
    unpermute_rotary,
)

PROMPT_MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
NON_ASCII_TEXTS = [
    "Grüße aus Köln — naïve café, crème brûlée",
    "日本語のテキストと中文文本",
    "Ελληνικά, русский язык, עברית, العربية",
    "emoji 🦙🚀👩‍💻 and\ttabs\nnewlines  double  spaces",
    "<|im_start|>user\nhi<|im_end|>",
]


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    return BUILTIN_MODELS["smollm2-135m"].gguf_path()


@pytest.fixture(scope="module")
def gguf_reference_model(gguf_path: Path):
    """transformers' own GGUF loading of the same file (slow: ~35 s on 2 cores)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def gguf_tokenizer(gguf_path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


def _llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute, verbatim in spirit."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


# ------------------------------------------------------------------------------------------ weights


def test_unpermute_inverts_llama_cpp_permute() -> None:
    rng = np.random.default_rng(0)
    for n_head, head_dim, cols in [(9, 64, 576), (3, 64, 576), (2, 4, 3)]:
        w = rng.standard_normal((n_head * head_dim, cols)).astype(np.float32)
        np.testing.assert_array_equal(unpermute_rotary(_llama_cpp_permute(w, n_head), n_head), w)
        bias = rng.standard_normal(n_head * head_dim).astype(np.float32)
        np.testing.assert_array_equal(unpermute_rotary(_llama_cpp_permute(bias, n_head), n_head), bias)


def test_tensor_names() -> None:
    assert hf_tensor_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_tensor_name("output.weight") == "lm_head.weight"
    assert hf_tensor_name("blk.12.attn_output.weight") == "model.layers.12.self_attn.o_proj.weight"
    assert hf_tensor_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    with pytest.raises(UnsupportedModelError, match="blk.0.ssm_conv1d.weight"):
        hf_tensor_name("blk.0.ssm_conv1d.weight")


@pytest.mark.slow
def test_state_dict_equals_transformers_gguf_loading(model_dir: Path, gguf_reference_model) -> None:
    ours = load_file(model_dir / "model.safetensors")
    reference = gguf_reference_model.state_dict()
    # Tied embeddings: lm_head is not stored, transformers ties it to embed_tokens.
    assert "lm_head.weight" not in ours
    assert set(reference) - set(ours) == {"lm_head.weight"}
    assert len(ours) == 30 * 9 + 2
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32, name
        ref = reference[name]
        assert tensor.shape == ref.shape, name
        torch.testing.assert_close(tensor, ref, rtol=0, atol=1e-6, msg=name)


@pytest.mark.slow
def test_converted_folder_gives_same_logits(hf_model, hf_tokenizer, gguf_reference_model) -> None:
    assert hf_model.lm_head.weight.data_ptr() == hf_model.model.embed_tokens.weight.data_ptr()
    ids = hf_tokenizer.apply_chat_template(
        PROMPT_MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    with torch.no_grad():
        ours = hf_model(ids).logits
        reference = gguf_reference_model(ids).logits
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_greedy_answer_is_sensible(hf_model, hf_tokenizer) -> None:
    """Independent of transformers' GGUF code: wrong Q/K un-permutation would produce garbage here."""
    ids = hf_tokenizer.apply_chat_template(
        PROMPT_MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    with torch.no_grad():
        out = hf_model.generate(ids, max_new_tokens=12, do_sample=False)
    answer = hf_tokenizer.decode(out[0, ids.shape[1] :])
    assert "Paris" in answer


# ------------------------------------------------------------------------------------------- config


@pytest.mark.slow
def test_config_round_trips_into_model_config(model_dir: Path, gguf_reference_model) -> None:
    cfg = ModelConfig.from_folder(model_dir)
    # Real values of SmolLM2-135M-Instruct, read from the GGUF metadata.
    assert cfg.architecture == "LlamaForCausalLM"
    assert cfg.num_hidden_layers == 30
    assert cfg.num_attention_heads == 9
    assert cfg.num_key_value_heads == 3
    assert cfg.hidden_size == 576
    assert cfg.head_dim == 64
    assert cfg.intermediate_size == 1536
    assert cfg.vocab_size == 49152
    assert cfg.max_position_embeddings == 8192
    assert cfg.rope_theta == 100000.0
    assert cfg.rope_scaling is None
    assert cfg.rms_norm_eps == pytest.approx(1e-5)
    assert cfg.tie_word_embeddings is True
    assert cfg.attention_bias is False
    assert cfg.bos_token_id == 1
    assert cfg.eos_token_ids == (2,)
    # And the same as transformers' own reading of the GGUF metadata.
    ref = gguf_reference_model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        ref.num_hidden_layers,
        ref.num_attention_heads,
        ref.num_key_value_heads,
    )
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.max_position_embeddings) == (
        ref.hidden_size,
        ref.intermediate_size,
        ref.vocab_size,
        ref.max_position_embeddings,
    )
    assert cfg.rope_theta == ref.rope_parameters["rope_theta"]
    assert cfg.rms_norm_eps == pytest.approx(ref.rms_norm_eps, rel=1e-6)


def test_generation_ids_are_copied(model_dir: Path, hf_model) -> None:
    gen = hf_model.generation_config
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (1, 2, 2)
    assert (model_dir / "generation_config.json").is_file()


# ---------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_matches_gguf_tokenizer(hf_tokenizer, gguf_tokenizer) -> None:
    assert len(hf_tokenizer) == len(gguf_tokenizer) == 49152
    for text in NON_ASCII_TEXTS:
        ids = hf_tokenizer.encode(text)
        assert ids == gguf_tokenizer.encode(text), text
        assert hf_tokenizer.decode(ids) == text
        assert gguf_tokenizer.decode(ids) == text
    assert hf_tokenizer.encode("hi")[0] != hf_tokenizer.bos_token_id  # GGUF says add_bos_token = false
    assert (hf_tokenizer.bos_token, hf_tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert hf_tokenizer.model_max_length == 8192


def test_chat_template_comes_from_the_gguf(hf_tokenizer, gguf_tokenizer, model_dir: Path) -> None:
    assert hf_tokenizer.chat_template  # the GGUF's tokenizer.chat_template, carried over
    assert hf_tokenizer.chat_template == gguf_tokenizer.chat_template
    assert json.loads((model_dir / CONVERSION_INFO_FILE).read_text())["chat_template"] is True
    text = hf_tokenizer.apply_chat_template(PROMPT_MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n")
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")


# ------------------------------------------------------------------------------------ cache, errors


def test_second_resolve_uses_the_cache(model_dir: Path, model_cache_dir: Path) -> None:
    weights = model_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    again = resolve_model("smollm2-135m", cache_dir=model_cache_dir)
    assert again == model_dir
    assert weights.stat().st_mtime_ns == before  # not converted again
    assert (model_dir / CONVERSION_INFO_FILE).is_file()
    assert not [p for p in model_cache_dir.iterdir() if ".tmp-" in p.name]


def test_gguf_path_resolves_to_the_same_cache(model_dir: Path, model_cache_dir: Path, gguf_path) -> None:
    assert resolve_model(str(gguf_path), cache_dir=model_cache_dir) == model_dir


def test_hf_folder_is_returned_as_is(model_dir: Path) -> None:
    assert resolve_model(str(model_dir)) == model_dir
    assert resolve_model(model_dir) == model_dir


def test_default_cache_dir_follows_env(model_dir: Path, model_cache_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(model_cache_dir))
    assert resolve_model("smollm2-135m") == model_dir


def test_unknown_name_is_a_clear_error() -> None:
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("no-such-model")
    message = str(info.value)
    assert "'no-such-model'" in message
    assert "smollm2-135m" in message
    assert isinstance(info.value, FileNotFoundError)


def test_missing_path_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "model.gguf"
    with pytest.raises(FileNotFoundError, match="smollm2-135m") as info:
        resolve_model(str(missing))
    assert str(missing) in str(info.value)


def test_incomplete_folder_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UnsupportedModelError, match=r"\*\.safetensors"):
        resolve_model(tmp_path)


def test_non_gguf_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(UnsupportedModelError, match="not a .gguf file"):
        resolve_model(path)


def test_failed_conversion_leaves_no_cache(tmp_path: Path) -> None:
    """A real (tiny) GGUF of an architecture we don't convert: clear error, nothing left in the cache."""
    import gguf

    path = tmp_path / "tiny-qwen3.gguf"
    writer = gguf.GGUFWriter(path, "qwen3")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    cache = tmp_path / "cache"
    with pytest.raises(UnsupportedModelError, match="'qwen3'.*llama"):
        resolve_model(path, cache_dir=cache)
    # Only the (empty) lock converters take turns on: unlinking it could let two hold it at once.
    assert [p for p in os.listdir(cache) if not p.endswith(".lock")] == []


def test_converters_of_one_file_take_turns_and_keep_each_others_work(tmp_path, monkeypatch, gguf_path):
    # Two containers sharing a cache volume live in different PID namespaces: a converter's
    # temporary folder named a PID the other could not see, so it was taken for a crash and
    # deleted mid-conversion. Converters now take turns on a lock file.
    import fcntl
    import threading

    from tandem_worker.engine import loader

    calls = []

    def convert(path, out):
        calls.append(out)
        (out / "model.safetensors").write_bytes(b"x")
        return {}

    monkeypatch.setattr(loader, "_convert_into", convert)
    cache = tmp_path / "cache"
    cache.mkdir()
    target = loader.cache_folder_for(gguf_path, cache)
    theirs = cache / f".{target.name}.tmp-999999-abcdef01"  # a converter we cannot see, at work
    theirs.mkdir()
    with open(cache / f".{target.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # that converter holds the lock
        ours = threading.Thread(target=loader.convert_gguf, args=(gguf_path, cache))
        ours.start()
        ours.join(1.0)
        assert ours.is_alive() and theirs.is_dir() and not target.exists()  # it waits, deletes nothing
        fcntl.flock(lock, fcntl.LOCK_UN)  # (as if that converter crashed: its folder is stale now)
    ours.join(30)
    assert (target / CONVERSION_INFO_FILE).is_file() and len(calls) == 1 and not theirs.exists()
    assert loader.convert_gguf(gguf_path, cache) == target and len(calls) == 1


# ------------------------------------------------------------------------ shards, config + tokenizer


def test_a_conversion_in_shards_holds_the_single_files_tensors_and_the_engine_serves_it(
    tmp_path, monkeypatch, gguf_path, model_dir, hf_model
):
    # Every tensor was dequantized into one dict before anything was written: an 8B GGUF needed
    # its whole float32 model (~32 GB) in the worker's memory. Shards are now written as they fill.
    from tandem_worker.engine import loader
    from tandem_worker.engine.llm_engine import LLMEngine
    from tandem_worker.engine.loader import checkpoint_files
    from tandem_worker.engine.sampling_params import SamplingParams

    limit = 16 << 20  # the embedding (113 MB) alone is larger: it gets a shard of its own
    monkeypatch.setattr(loader, "MAX_SHARD_BYTES", limit)
    folder = loader.convert_gguf(gguf_path, tmp_path / "cache")
    assert folder == loader.cache_folder_for(gguf_path, tmp_path / "cache")
    assert not (folder / "model.safetensors").exists()
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    files = checkpoint_files(folder)
    assert len(files) > 2 and {f.name for f in files} == set(index["weight_map"].values())
    assert all(f.stat().st_mode & 0o777 == 0o644 for f in files)

    single = load_file(model_dir / "model.safetensors")  # the default: one file, no index
    assert not (model_dir / "model.safetensors.index.json").exists()
    sharded: dict[str, torch.Tensor] = {}
    for f in files:
        shard = load_file(f)
        assert sum(t.nbytes for t in shard.values()) <= limit or len(shard) == 1, f.name
        assert all(index["weight_map"][name] == f.name for name in shard)
        assert not set(shard) & set(sharded)
        sharded.update(shard)
    assert set(sharded) == set(single) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in single.values())
    for name, tensor in single.items():
        assert sharded[name].dtype == tensor.dtype and torch.equal(sharded[name], tensor), name
    del single, sharded
    # Everything else in the folder is as in the single-file conversion.
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (folder / f).read_bytes() == (model_dir / f).read_bytes(), f

    ids = hf_model.generation_config.bos_token_id, 504, 3458, 282, 4649, 314, 4649
    want = hf_model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=None)
    engine = LLMEngine(model=str(folder), kv_cache_bytes=16 << 20)
    engine.add_request(
        prompt_token_ids=list(ids), params=SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    )
    got = []
    while engine.has_unfinished():
        got += [o.token_ids for o in engine.step() if o.finished]
    assert got[0] == want[0, len(ids) :].tolist()


def test_the_routers_resolution_writes_no_weights_and_gives_the_full_folders_config_and_tokenizer(
    tmp_path, gguf_path, model_dir
):
    # The router converted the whole GGUF (weights dequantized to float32 in memory) to read
    # config.json and the tokenizer: its pod's 2Gi limit OOM-killed it on any GGUF over ~0.5B.
    from tandem_worker.engine.loader import cache_folder_for, metadata_folder_for
    from tandem_worker.engine.tokenizer import Tokenizer

    cache = tmp_path / "cache"
    folder = resolve_model("smollm2-135m", cache_dir=cache, weights=False)
    assert folder == metadata_folder_for(cache_folder_for(gguf_path, cache)) != model_dir
    assert not [p for p in cache.rglob("*") if "safetensors" in p.name]
    assert not cache_folder_for(gguf_path, cache).exists()
    info = json.loads((folder / CONVERSION_INFO_FILE).read_text())
    assert info["weights"] is False and info["chat_template"] is True
    assert resolve_model(gguf_path, cache_dir=cache, weights=False) == folder  # cached

    names = {p.name for p in model_dir.iterdir()} - {"model.safetensors", CONVERSION_INFO_FILE}
    assert {p.name for p in folder.iterdir()} - {CONVERSION_INFO_FILE} == names
    for f in names:  # tie_word_embeddings and the vocabulary check came from the tensor infos
        assert (folder / f).read_bytes() == (model_dir / f).read_bytes(), f
    assert ModelConfig.from_folder(folder) == ModelConfig.from_folder(model_dir)
    ours, full = Tokenizer(folder), Tokenizer(model_dir)
    for text in NON_ASCII_TEXTS:
        assert ours.encode(text) == full.encode(text)
    assert ours.eos_token_id == full.eos_token_id

    # An HF folder needs no weights for it either; a full folder still does.
    bare = tmp_path / "bare"
    shutil.copytree(folder, bare)
    assert resolve_model(bare, weights=False) == bare
    with pytest.raises(UnsupportedModelError, match=r"\*\.safetensors"):
        resolve_model(bare)


def test_a_process_without_torch_converts_the_tokenizer_in_a_child_and_never_imports_torch(
    tmp_path, model_dir
):
    # transformers' GGUF reading imports torch. The router converts the built-in model's metadata
    # at every start (an emptyDir cache) and otherwise never imports torch: 470 MiB held, not 137.
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from tandem_worker.engine.loader import resolve_model\n"
        "from tandem_worker.engine.tokenizer import Tokenizer\n"
        f"folder = resolve_model('smollm2-135m', cache_dir={str(tmp_path)!r}, weights=False)\n"
        "assert Tokenizer(folder).chat_prompt('Hi')\n"
        "print(folder)\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    folder, imported = out.stdout.strip().splitlines()[-2:]
    assert imported == "False"
    # The same files as a conversion in this process (which has torch: model_dir's, in-process).
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json"):
        assert (Path(folder) / f).read_bytes() == (model_dir / f).read_bytes(), f


def test_the_router_reuses_a_full_conversion(model_dir, model_cache_dir):
    # `tandem up` starts the workers (which convert the file) before the router: it must not
    # write a second folder beside theirs.
    from tandem_worker.engine.loader import metadata_folder_for

    assert resolve_model("smollm2-135m", cache_dir=model_cache_dir, weights=False) == model_dir
    assert not metadata_folder_for(model_dir).exists()


def test_the_router_reads_a_gguf_model_without_its_weights(tmp_path, monkeypatch):
    import concurrent.futures

    import grpc

    from tandem_worker.server.router_main import serve_router

    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path / "cache"))
    # A taken port ends serve_router right after it has read the model's config and tokenizer.
    holder = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=1))
    port = holder.add_insecure_port("127.0.0.1:0")
    holder.start()
    try:
        with pytest.raises(OSError, match=f"cannot listen for gRPC on 127.0.0.1:{port}"):
            serve_router("smollm2-135m", ["127.0.0.1:1"], [], port=port)
    finally:
        holder.stop(None)
    (folder,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert folder.name.endswith("-metadata") and (folder / CONVERSION_INFO_FILE).is_file()
    assert not [p for p in folder.iterdir() if "safetensors" in p.name]
