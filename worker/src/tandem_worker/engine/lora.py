"""LoRA adapters: PEFT files in a store, a host-memory cache, and device pages inside the KV pool.

Three tiers (S-LoRA):
- the store: a folder of PEFT adapters, `<store>/<name>/adapter_config.json` +
  `adapter_model.safetensors` (a mounted volume in Kubernetes); adapters can also be registered
  from any folder with `LoRAManager.load`;
- host memory: parsed adapters, least-recently-used out past `host_cache_bytes`; queued
  requests prefetch into it on a background thread while earlier batches run;
- device: each resident adapter owns a contiguous run of KV-cache blocks and its weights live in
  those blocks' memory (unified paging): adapters and KV compete for one pool, and an adapter
  nobody is running is evicted, least recently used first, when either needs room. An adapter in
  use by a scheduled request is pinned.

Inside the pool, layer i of an adapter lives in the K and V halves of layer i of its blocks, so a
block run holds every layer. For each of the four projections the engine computes (fused qkv, o,
fused gate_up, down) an adapter has one A (the concatenated A rows of the fused parts, so one
shrink serves q, k and v) and one B per part; `tandem_kernels.lora_apply` (on the CPU,
`lora_reference.lora_apply_grouped`) reads them by offset into the flat pool. A part the adapter
does not target has rank 0 and costs nothing.

Versions: each read records a digest of the adapter's files (`adapter_digest`). The same name may
stand for other files on another worker (its own store) or later on this one (files replaced on
disk), so a prefill worker sends the digest of the adapter it computed a prompt's KV with and the
decode worker refuses KV of another version (worker_server); `LoRAManager.version` is what both
read.

Replaced files: a resident adapter's files are checked (a stat of both, at most every
`files_check_interval_s` per adapter, when a request wants it, on the loader's thread: a store that
stops answering never stops the engine). Once they changed, the new files are
read in the background; requests that have not yet computed with the old version wait for the new
one (as for a load, within the load timeout), those that have finish on the old one, and once none
pins it the new version replaces it. One version at a time per name, so a response never comes from
two, and `version` is that of every request holding the adapter.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open

import tandem_kernels
from tandem_kernels import cpu_extension, lora_reference

from .block_manager import BlockManager
from .config import ModelConfig
from .sampling_params import RequestError
from .streams import side_stream

if TYPE_CHECKING:
    from .lora_fold import LoRAFold

log = logging.getLogger(__name__)

# Fused projection -> its parts, in the order of the fused output's columns.
KINDS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
MODULE_KIND = {m: k for k, parts in KINDS.items() for m in parts}
_KEY = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.\w+)?\.weight$"
)


class AdapterError(ValueError):
    """An adapter's files are unreadable or do not fit the base model."""


class AdapterBusyError(AdapterError):
    """The adapter is fine but the operation cannot happen now (in use, or no room on the device)."""


class AdapterNotFoundError(RequestError):
    def __init__(self, name: str, detail: str = "") -> None:
        super().__init__("adapter", f"unknown adapter {name!r}{detail}")
        self.name = name


def module_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every projection LoRA may target."""
    h, q, kv, inter = (
        cfg.hidden_size,
        cfg.num_attention_heads * cfg.head_dim,
        cfg.num_key_value_heads * cfg.head_dim,
        cfg.intermediate_size,
    )
    return {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, inter),
        "up_proj": (h, inter),
        "down_proj": (inter, h),
    }


@dataclass
class HostAdapter:
    """An adapter parsed into host memory: per (layer, module), A [r, in] and B [out, r]."""

    name: str
    path: Path
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    scaling: dict[str, float]  # per module, as PEFT applies it
    num_bytes: int
    digest: str = ""  # adapter_digest() of the files as read

    @property
    def max_rank(self) -> int:
        return max(a.shape[0] for a, _ in self.weights.values())

    @property
    def modules(self) -> list[str]:
        return sorted({m for _, m in self.weights}, key=list(MODULE_KIND).index)


# Seconds between two checks of a resident adapter's files for a replacement: a stat of two files,
# made only when a request wants the adapter, so even a short interval costs next to nothing.
FILES_CHECK_INTERVAL_S = 2.0
# The check's stat runs on the loader's thread, not the engine's: a store on a network filesystem
# that stops answering would otherwise stop every request's decoding, also of adapters in memory.
# The engine waits this long for it (a stat answers in microseconds), then notices a change at a
# later check; while one hangs, no other check of that adapter starts.
FILES_CHECK_WAIT_S = 0.05

DIGEST_SHORT = 12  # hex characters of a digest in messages (48 bits: enough to tell versions apart)
_DIGEST_BUFFER = 2**20


def adapter_digest(config: bytes, weights_file: Path) -> str:
    """sha256 (hex) over adapter_config.json's bytes and adapter_model.safetensors', each prefixed
    by its length: two copies of the same files agree on any machine.

    Measured on a 298 MiB adapter (rank 256 on every projection of SmolLM2-135M, about a rank-64
    one of a 7B model in bf16), files in the page cache, one core with SHA instructions: 190 ms
    (1.5 GiB/s), where the parse without it took 25-75 ms; from a volume that reads slower than
    that, the parse's own reading dominates (the parse then finds the pages cached). sha256, not
    blake2b: 1.5x faster here with the SHA instructions. Runs where the files are read (the loader
    thread), and hashlib releases the GIL, so the engine thread steps meanwhile; a re-read of
    unchanged files reuses the digest (LoRAManager._parse)."""
    h = hashlib.sha256()
    h.update(len(config).to_bytes(8, "little"))
    h.update(config)
    buf = bytearray(_DIGEST_BUFFER)
    view = memoryview(buf)
    with open(weights_file, "rb", buffering=0) as f:
        h.update(os.fstat(f.fileno()).st_size.to_bytes(8, "little"))
        while n := f.readinto(view):
            h.update(view[:n])
    return h.hexdigest()


def short_digest(digest: str) -> str:
    """A digest as messages name it."""
    return digest[:DIGEST_SHORT] if digest else "(none)"


def read_peft_adapter(
    path: Path, cfg: ModelConfig, dtype: torch.dtype, name: str = "", digest: str | None = None
) -> HostAdapter:
    """Parse a PEFT LoRA adapter folder and check it against the base model (AdapterError if unfit).
    `digest`: the files' `adapter_digest`, known from an earlier read of the same files (else
    computed)."""
    path = Path(path)
    name = name or path.name
    try:
        return _read_peft_adapter(path, cfg, dtype, name, digest)
    except AdapterError:
        raise
    except Exception as e:
        # The files come from users: whatever else a malformed one trips must fail this adapter
        # (its requests, its admin load), never the engine thread that reads it.
        raise AdapterError(f"adapter {name!r}: malformed adapter in {path}: {type(e).__name__}: {e}") from e


# PEFT options under which the adapter computes something other than "x A^T B^T * scaling added to
# these projections, on every token": served as plain LoRA they would give wrong outputs, so they
# are refused by name, with what they do.
_UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA",
    "fan_in_fan_out": "transposed weights",
    "modules_to_save": "fully trained copies of modules",
    "alora_invocation_tokens": "Activated LoRA: applied only from its invocation tokens on",
    "layer_replication": "duplicated base layers",
    "target_parameters": "adapted raw parameters",
}


def _read_peft_adapter(
    path: Path, cfg: ModelConfig, dtype: torch.dtype, name: str, digest: str | None
) -> HostAdapter:
    cfg_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not cfg_file.is_file() or not weights_file.is_file():
        raise AdapterError(f"adapter {name!r}: {path} lacks adapter_config.json or adapter_model.safetensors")
    try:
        config_bytes = cfg_file.read_bytes()  # parsed and digested from the same bytes
        conf = json.loads(config_bytes)
    except (OSError, ValueError) as e:
        raise AdapterError(f"adapter {name!r}: unreadable adapter_config.json: {e}") from e
    if not isinstance(conf, dict):
        raise AdapterError(f"adapter {name!r}: adapter_config.json is a {type(conf).__name__}, not an object")
    if conf.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"adapter {name!r}: peft_type {conf.get('peft_type')!r}, only LORA is supported")
    bad = [f"{k} ({what})" for k, what in _UNSUPPORTED_OPTIONS.items() if conf.get(k)]
    if conf.get("bias", "none") not in ("none", None) or conf.get("lora_bias"):
        bad.append("bias")
    if bad:
        raise AdapterError(f"adapter {name!r}: unsupported PEFT option(s) {', '.join(bad)}")
    alpha = _alpha(conf.get("lora_alpha", 8), name)
    alphas = _alpha_pattern(conf.get("alpha_pattern"), name)
    rslora = bool(conf.get("use_rslora"))
    shapes = module_shapes(cfg)
    raw: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    parents: dict[tuple[int, str], str] = {}
    try:
        # Before the parse: the parse then reads the file from the page cache. That the digest is of
        # the bytes parsed is LoRAManager._parse's check (the files' identity unchanged around both).
        if digest is None:
            digest = adapter_digest(config_bytes, weights_file)
        with safe_open(str(weights_file), framework="pt") as st:
            for key in st.keys():
                m = _KEY.match(key)
                if m is None:
                    raise AdapterError(
                        f"adapter {name!r}: tensor {key!r} targets a module Tandem cannot adapt "
                        f"(supported: {', '.join(MODULE_KIND)} of the decoder layers)"
                    )
                layer, parent, module, ab = int(m.group(1)), m.group(2), m.group(3), m.group(4)
                if module not in MODULE_KIND:
                    raise AdapterError(f"adapter {name!r}: unknown target module {module!r} in {key!r}")
                if layer >= cfg.num_hidden_layers:
                    raise AdapterError(
                        f"adapter {name!r}: layer {layer} but the base model has {cfg.num_hidden_layers}"
                    )
                raw.setdefault((layer, module), {})[ab] = st.get_tensor(key)
                parents[(layer, module)] = parent
    except AdapterError:
        raise
    except Exception as e:  # a truncated or foreign file: say which adapter
        raise AdapterError(f"adapter {name!r}: unreadable adapter_model.safetensors: {e}") from e
    if not raw:
        raise AdapterError(f"adapter {name!r}: no LoRA weights in {weights_file}")
    checked: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]] = {}
    for (layer, module), ab in sorted(raw.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"adapter {name!r}: layer {layer} {module} lacks lora_A or lora_B")
        a, b = ab["A"], ab["B"]
        fan_in, fan_out = shapes[module]
        if (
            a.dim() != 2
            or b.dim() != 2
            or not a.is_floating_point()
            or not b.is_floating_point()
            or a.shape[0] < 1
            or a.shape[1] != fan_in
            or tuple(b.shape) != (fan_out, a.shape[0])
        ):
            raise AdapterError(
                f"adapter {name!r}: layer {layer} {module}: A {tuple(a.shape)} {a.dtype}, "
                f"B {tuple(b.shape)} {b.dtype} do not fit the base model's {fan_in} -> {fan_out} "
                f"projection (floating-point A [rank, {fan_in}] and B [{fan_out}, rank] expected)"
            )
        r = a.shape[0]
        a_mod = _pattern_value(alphas, f"model.layers.{layer}.{parents[(layer, module)]}.{module}", alpha)
        checked[(layer, module)] = (a, b, a_mod / math.sqrt(r) if rslora else a_mod / r)
    # The kernels apply one scaling per module: the first layer's that is not 0 (alpha 0 adds
    # nothing). A layer with its own (PEFT's rank_pattern or alpha_pattern keyed by layer) has the
    # ratio folded into B.
    scaling: dict[str, float] = {}
    for (_, module), (_, _, s) in checked.items():
        if not scaling.get(module):  # unset, or 0 so far
            scaling[module] = s
    weights, num_bytes = {}, 0
    for (layer, module), (a, b, s) in checked.items():
        ref = scaling[module]
        if s != ref:
            b = b.float() * (s / ref)
        a, b = a.to(dtype).contiguous(), b.to(dtype).contiguous()
        weights[(layer, module)] = (a, b)
        num_bytes += a.nbytes + b.nbytes
    return HostAdapter(name, path, weights, scaling, num_bytes, digest)


def _alpha_pattern(value: Any, name: str) -> dict[str, float]:
    """PEFT's alpha_pattern (module-name pattern -> alpha), checked: keys are regular expressions
    matched against the module's full name, values numbers."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise AdapterError(f"adapter {name!r}: alpha_pattern is a {type(value).__name__}, not an object")
    out = {}
    for key, alpha in value.items():
        try:
            re.compile(key)
        except re.error as e:
            raise AdapterError(
                f"adapter {name!r}: alpha_pattern key {key!r} is not a regular expression: {e}"
            ) from None
        out[key] = _alpha(alpha, name)
    return out


def _pattern_value(patterns: dict[str, float], module: str, default: float) -> float:
    """The value of the first pattern naming `module` (the whole name or a dotted suffix of it),
    else `default`: PEFT's own rule (peft.utils.other.get_pattern_key), so that the first key in
    the config's order wins as it does there."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _alpha(value: Any, name: str) -> float:
    """lora_alpha as a finite number (PEFT writes an int; a numeric string is taken as its number)."""
    alpha = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        alpha = float(value)
    elif isinstance(value, str):
        try:
            alpha = float(value)
        except ValueError:
            pass
    if alpha is None or not math.isfinite(alpha):
        raise AdapterError(f"adapter {name!r}: lora_alpha {value!r} is not a number")
    return alpha


@dataclass
class _Placement:
    """Where one projection kind of one layer of an adapter sits in the flat pool (element offsets)."""

    a_offset: int
    total_rank: int
    parts: dict[str, tuple[int, int, int]]  # module -> (b_offset, rank, y_offset)


def _layer_matrices(adapter: HostAdapter, layer: int, shapes: dict[str, tuple[int, int]]) -> list[tuple]:
    """(kind, tag, numel) for each matrix of one layer in pool order: A of each kind, then its Bs."""
    out = []
    for kind, parts in KINDS.items():
        present = [m for m in parts if (layer, m) in adapter.weights]
        if not present:
            continue
        fan_in = shapes[present[0]][0]
        total = sum(adapter.weights[(layer, m)][0].shape[0] for m in present)
        out.append((kind, "A", total * fan_in))
        for m in present:
            out.append((kind, m, adapter.weights[(layer, m)][1].numel()))
    return out


def _pack(sizes: list[int], regions: list[int]) -> list[tuple[int, int]] | None:
    """First-fit the matrices, in order, into regions of the given sizes; none straddles two regions."""
    placed, region, used = [], 0, 0
    for n in sizes:
        while region < len(regions) and used + n > regions[region]:
            region, used = region + 1, 0
        if region == len(regions):
            return None
        placed.append((region, used))
        used += n
    return placed


@dataclass
class DeviceAdapter:
    name: str
    slot: int
    first_block: int
    num_blocks: int
    num_bytes: int
    rank: int
    pins: int = 0
    placements: dict[tuple[int, str], _Placement] = field(default_factory=dict)
    digest: str = ""


@dataclass
class _Refresh:
    """A resident adapter whose files changed on disk: the read of the new ones, which replaces the
    old version once no request pins it (`LoRAManager._advance_refresh`)."""

    read: Future  # of LoRAManager._parse: (HostAdapter, stamp)
    since: float  # LoRAManager.clock() when the change was noticed
    generation: int  # the name's generation then: a drop (unload, re-point) meanwhile voids the read
    stamp: tuple  # the files' identity as noticed


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    tier: str  # "device", "host", "loading" or "store"
    size_bytes: int
    rank: int
    pinned: bool
    digest: str = ""  # of the files its weights were read from; "" while never read


@dataclass
class LoRAStats:
    # Per request, the tier its adapter was found in when it arrived ("store": a miss, read from disk).
    hits: dict[str, int] = field(default_factory=lambda: {"device": 0, "host": 0, "store": 0})
    loads: int = 0  # store -> host reads
    load_failures: int = 0
    load_seconds: float = 0.0
    device_loads: int = 0  # host -> device copies
    device_evictions: int = 0
    host_evictions: int = 0


class LoRATables:
    """Per (kind, layer) slot tables the kernels read: offsets into the pool, ranks and scaling."""

    def __init__(self, num_layers: int, device: torch.device, capacity: int = 8) -> None:
        self.num_layers, self.device, self.capacity = num_layers, device, capacity
        # Bumped when the device tables are reallocated (a capacity change): a CUDA graph that
        # captured the old ones must be captured again. Changes of values are copied in place.
        self.version = 0
        # Bumped at every change of values, in all (generation) and per slot: what a copy of a
        # slot's weights elsewhere (LoRAFold) checks to see that the slot holds something else now.
        self.generation = 0
        self.slot_generation = [0] * capacity
        self._alloc()

    def _alloc(self) -> None:
        L, S = self.num_layers, self.capacity

        def z(dtype=torch.int64):
            return torch.zeros(L, S, dtype=dtype)

        self.a_offsets = {k: z() for k in KINDS}
        self.total_ranks = {k: z(torch.int32) for k in KINDS}
        self.b_offsets = {m: z() for m in MODULE_KIND}
        self.ranks = {m: z(torch.int32) for m in MODULE_KIND}
        self.y_offsets = {m: z() for m in MODULE_KIND}
        self.scaling = {m: torch.zeros(S, dtype=torch.float32) for m in MODULE_KIND}
        self.max_total_rank = {k: [0] * S for k in KINDS}  # host copy: per slot, max over layers
        self._dev: dict | None = None
        self._stale = True

    def grow(self, capacity: int) -> None:
        old = (self.a_offsets, self.total_ranks, self.b_offsets, self.ranks, self.y_offsets, self.scaling)
        old_max, old_cap = self.max_total_rank, self.capacity
        self.capacity = capacity
        self.version += 1
        self._alloc()
        new = (self.a_offsets, self.total_ranks, self.b_offsets, self.ranks, self.y_offsets, self.scaling)
        for o, n in zip(old, new):
            for key in o:
                n[key][..., :old_cap] = o[key]
        for k in KINDS:
            self.max_total_rank[k][:old_cap] = old_max[k]
        self.slot_generation += [0] * (capacity - old_cap)
        self.generation += 1

    def set_slot(self, slot: int, dev: DeviceAdapter | None, scaling: dict[str, float]) -> None:
        self.generation += 1
        self.slot_generation[slot] += 1
        for kind in KINDS:
            self.a_offsets[kind][:, slot] = 0
            self.total_ranks[kind][:, slot] = 0
            self.max_total_rank[kind][slot] = 0
        for m in MODULE_KIND:
            self.b_offsets[m][:, slot] = 0
            self.ranks[m][:, slot] = 0
            self.y_offsets[m][:, slot] = 0
            self.scaling[m][slot] = scaling.get(m, 0.0)
        if dev is not None:
            for (layer, kind), p in dev.placements.items():
                self.a_offsets[kind][layer, slot] = p.a_offset
                self.total_ranks[kind][layer, slot] = p.total_rank
                self.max_total_rank[kind][slot] = max(self.max_total_rank[kind][slot], p.total_rank)
                for m, (b_off, r, y_off) in p.parts.items():
                    self.b_offsets[m][layer, slot] = b_off
                    self.ranks[m][layer, slot] = r
                    self.y_offsets[m][layer, slot] = y_off
        self._stale = True

    def on_device(self) -> dict:
        """The tables as device tensors, copied once per change, indexed [layer] -> [slots].

        "fused" holds, per kind and layer, the arguments `tandem_kernels.lora_apply` takes for that
        projection (`fused_args`), so a call indexes nothing. The tensors stay the same until the
        capacity changes (`version`): a change of values is copied into them, so a CUDA graph
        that read them keeps reading the current values.
        """
        if not self._stale:
            return self._dev
        to = lambda d: {k: v.to(self.device) for k, v in d.items()}  # noqa: E731
        dev = {
            "a_offsets": to(self.a_offsets),
            "total_ranks": to(self.total_ranks),
            "b_offsets": to(self.b_offsets),
            "ranks": to(self.ranks),
            "y_offsets": to(self.y_offsets),
            "scaling": to(self.scaling),
        }
        dev["fused"] = fused_args(dev)
        if self._dev is None:
            self._dev = dev
        else:
            for old, new in zip(_tensors(self._dev), _tensors(dev)):
                old.copy_(new)
        self._stale = False
        return self._dev


def _tensors(tree: Any) -> list[torch.Tensor]:
    """The tensors of nested dicts, lists and tuples, in a fixed order."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    items = tree.values() if isinstance(tree, dict) else tree
    return [t for item in items for t in _tensors(item)]


def fused_args(tables: dict) -> dict[str, list[tuple[torch.Tensor, ...]]]:
    """Per kind, per layer: (a_offsets, total_ranks, b_offsets, ranks, y_offsets, scaling) for
    `tandem_kernels.lora_apply`, the per-part tables stacked in KINDS order as [num_parts, num_slots]
    (contiguous views of one [layers, parts, slots] tensor per kind), from `LoRATables.on_device`'s
    per-module tables. Built once per table change, not per call.
    """
    out = {}
    for kind, parts in KINDS.items():
        stacked = [
            torch.stack([tables[key][m] for m in parts], dim=1) for key in ("b_offsets", "ranks", "y_offsets")
        ]
        scaling = torch.stack([tables["scaling"][m] for m in parts])
        a_off, total = tables["a_offsets"][kind], tables["total_ranks"][kind]
        out[kind] = [
            (a_off[layer], total[layer], *(t[layer] for t in stacked), scaling)
            for layer in range(a_off.shape[0])
        ]
    return out


class LoRABatch:
    """One step's LoRA work: which tokens use which slot, and the tables to read weights by.

    On a GPU (Triton) `apply` calls `tandem_kernels.lora_apply` once per fused projection (two
    launches: shrink, then one expand for all parts), with the metadata on the device. On the CPU
    it calls `lora_reference.lora_apply_grouped` with host metadata instead: the token groups are
    worked out once per step (`HostGroups`), each kind's offsets, ranks and scalings for the step's
    slots are read from the host tables once per step, and a call gathers its tokens once for all
    groups, not once per group and per op.
    """

    def __init__(
        self,
        pool: torch.Tensor,
        tables: dict | LoRATables,
        groups: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
        max_rank: dict[str, int],
        shapes: dict[str, tuple[int, int]],
        host_groups: lora_reference.HostGroups | None = None,
        tiles: torch.Tensor | None = None,
        stream: torch.cuda.Stream | None = None,
        fold: LoRAFold | None = None,
        max_part_rank: int | None = None,
    ) -> None:
        self.pool, self.t, self.groups, self.max_rank = pool, tables, groups, max_rank
        self.host_groups = host_groups
        self.tiles = tiles  # the tiled launch (a CUDA graph's): `lora_token_tiles` of the groups
        self.stream = stream  # CUDA: where `project` runs the shrinks, beside the base GEMMs
        # The step's adapters placed in the projections' extra weight rows: `project` runs one GEMM
        # (the projection and every x @ A.T) and one expand (lora_fold.py). max_part_rank, if
        # known, sizes the expand's rank tile.
        self.fold, self.max_part_rank = fold, max_part_rank
        self._work: dict[str, list[list]] = {}  # CPU path: kind -> per layer, per group
        self._native: dict[str, lora_reference.NativeTables] = {}  # CPU decode steps: kind -> tables
        self.part_cols: dict[str, list[tuple[str, int, int]]] = {}
        self.part_spans: dict[str, tuple[tuple[int, int], ...]] = {}  # lora_apply's `parts`
        for kind, parts in KINDS.items():
            cols, off = [], 0
            for m in parts:
                cols.append((m, off, shapes[m][1]))
                off += shapes[m][1]
            self.part_cols[kind] = cols
            self.part_spans[kind] = tuple((col, width) for _, col, width in cols)
        self._fused: dict | None = None
        if host_groups is None:
            fused = tables.get("fused") if isinstance(tables, dict) else None
            self._fused = fused if fused is not None else fused_args(tables)

    def apply(self, layer: int, kind: str, x: torch.Tensor, out: torch.Tensor) -> None:
        """out += the LoRA delta of projection `kind` for every adapter token of the batch, in place."""
        max_rank = self.max_rank[kind]
        if not max_rank:
            return
        if self.host_groups is not None:
            op = lora_reference.native_op(x, out, self.pool, self.host_groups)
            if op is not None:
                native = self._native.get(kind)
                if native is None:
                    native = self._native[kind] = self._native_tables(kind, x.shape[1])
                op.lora_grouped(x, out, self.pool, self.host_groups.token_indices, *native.layer(layer))
                return
            work = self._work.get(kind)
            if work is None:
                work = self._work[kind] = self._host_work(kind)
            lora_reference.lora_apply_grouped(x, out, self.pool, self.host_groups, work[layer])
            return
        self._begin(layer, kind, x).finish(out)

    def project(
        self, layer: int, kind: str, x: torch.Tensor, linear: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """linear(x) plus projection `kind`'s LoRA delta for every adapter token of the batch.

        On a GPU the LoRA shrink, which reads only x, runs on the side stream while linear's GEMM
        runs on the current one (also inside a CUDA graph, as parallel branches); the expand adds
        into the GEMM's output once both are done. What the LoRA kernels add to a projection is
        then the expand, not the expand and the shrink.
        """
        if self.host_groups is not None or not self.max_rank[kind]:
            out = linear(x)
            self.apply(layer, kind, x, out)
            return out
        if self.fold is not None:
            return self._project_folded(layer, kind, x)
        stream = self.stream
        if stream is None:
            pending = self._begin(layer, kind, x)
            out = linear(x)
        else:
            current = torch.cuda.current_stream()
            stream.wait_stream(current)  # x is written
            with torch.cuda.stream(stream):
                pending = self._begin(layer, kind, x)
            out = linear(x)
            current.wait_stream(stream)
        pending.finish(out)
        return out

    def _project_folded(self, layer: int, kind: str, x: torch.Tensor) -> torch.Tensor:
        """One GEMM over the weight with the placed adapters' A rows appended, then one expand from
        those extra columns into the projection's: returns a view of the GEMM's output."""
        weight, bias, hidden_out, y_offsets, total_ranks = self.fold.layer(layer, kind)
        wide = torch.nn.functional.linear(x, weight, bias)
        _, _, b_offsets, ranks, _, scaling = self._fused[kind][layer]
        out = wide[:, :hidden_out]
        tandem_kernels.lora_apply_finish(
            wide[:, hidden_out:],
            self.pool,
            total_ranks,
            *self.groups,
            self.fold.rows[kind],
            out,
            b_offsets,
            ranks,
            y_offsets,
            scaling,
            self.part_spans[kind],
            self.tiles,
            self.max_part_rank,
        )
        return out

    def _begin(self, layer: int, kind: str, x: torch.Tensor) -> lora_reference.PendingLoRA:
        a_offsets, total_ranks, b_offsets, ranks, y_offsets, scaling = self._fused[kind][layer]
        return tandem_kernels.lora_apply_begin(
            x,
            self.pool,
            a_offsets,
            total_ranks,
            *self.groups,
            self.max_rank[kind],
            b_offsets,
            ranks,
            y_offsets,
            scaling,
            self.part_spans[kind],
            self.tiles,
        )

    def _step_columns(self, kind: str) -> tuple[torch.Tensor, torch.Tensor, list[tuple]]:
        """The host tables' columns for this step's slots (in `host_groups.slots` order): A's
        offsets and total ranks [layers, groups], and per part (b_offsets, ranks, y_offsets
        [layers, groups], scaling [groups], out column, width)."""
        t = self.t
        slots = torch.tensor(self.host_groups.slots, dtype=torch.int64)
        parts = [
            (
                t.b_offsets[m].index_select(1, slots),
                t.ranks[m].index_select(1, slots),
                t.y_offsets[m].index_select(1, slots),
                t.scaling[m].index_select(0, slots),
                col,
                width,
            )
            for m, col, width in self.part_cols[kind]
        ]
        return t.a_offsets[kind].index_select(1, slots), t.total_ranks[kind].index_select(1, slots), parts

    def _native_tables(self, kind: str, hidden_in: int) -> lora_reference.NativeTables:
        """Every layer's C++-op metadata for `kind`, read from the host tables once per step."""
        a_off, total, parts = self._step_columns(kind)
        return lora_reference.NativeTables(
            self.pool.numel(), hidden_in, self.host_groups, a_off, total, parts, torch.get_num_threads()
        )

    def _host_work(self, kind: str) -> list[list]:
        """Per layer, per group: (a_offset, total_rank, parts) or None, read from the host tables once."""
        a_cols, total_cols, part_cols = self._step_columns(kind)
        a_off, total = a_cols.tolist(), total_cols.tolist()
        parts = [
            (b.tolist(), rk.tolist(), yo.tolist(), sc.tolist(), col, width)
            for b, rk, yo, sc, col, width in part_cols
        ]
        work = []
        for layer, (offs, totals) in enumerate(zip(a_off, total)):
            row = []
            for g, (a, r) in enumerate(zip(offs, totals)):
                if r <= 0:
                    row.append(None)
                    continue
                row.append(
                    (
                        a,
                        r,
                        [
                            (b[layer][g], rk[layer][g], yo[layer][g], sc[g], col, width)
                            for b, rk, yo, sc, col, width in parts
                            if rk[layer][g] > 0
                        ],
                    )
                )
            work.append(row)
        return work


class LoRAManager:
    """The three tiers and the device slots; called from the engine thread, loads on a worker thread."""

    def __init__(
        self,
        cfg: ModelConfig,
        block_manager: BlockManager,
        kv_cache: torch.Tensor,
        store_dir: Path | None = None,
        host_cache_bytes: int = 2 * 2**30,
        load_timeout_s: float = 30.0,
        files_check_interval_s: float = FILES_CHECK_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.bm = block_manager
        self.kv_cache = kv_cache
        self.pool = kv_cache.view(-1)
        self.dtype = kv_cache.dtype
        self.store_dir = Path(store_dir) if store_dir else None
        self.host_cache_bytes = host_cache_bytes
        self.load_timeout_s = load_timeout_s
        # How often, at most, a resident adapter's files are checked for a replacement (0: at every
        # use), and the clock that and the load timeout are measured by: time.monotonic's scale, as
        # requests' arrival times are compared with it (tests move it on).
        self.files_check_interval_s = files_check_interval_s
        self.clock = clock
        self.shapes = module_shapes(cfg)
        self._paths: dict[str, Path] = {}  # registered by `load` from outside the store
        self._host: OrderedDict[str, HostAdapter] = OrderedDict()  # LRU, oldest first
        self._loading: dict[str, Future] = {}
        self._loading_since: dict[str, float] = {}
        # Per name, part of its prefix-cache salt: moved on whenever what the name stands for may
        # have changed (see `cache_salt`), so KV computed with old weights never serves new ones.
        self._generation: dict[str, int] = {}
        self._stamps: dict[str, tuple] = {}  # per name, its files' identity when last read
        # Per name: the digest of its last read that was installed, and how many times an installed
        # read's digest differed from the one before (see `version`). Kept past unload, so that a
        # later load of other files still counts as a change. Under _lock: read by gRPC threads.
        self._versions: dict[str, tuple[str, int]] = {}
        self._users: dict[str, int] = {}  # per name, unfinished requests for it (add_user)
        self._checked: dict[str, float] = {}  # per name, when its files were last checked (`_watch`)
        self._looks: dict[str, Future] = {}  # per name, a check's stat under way (`_watch`)
        self._refresh: dict[str, _Refresh] = {}  # resident names whose files changed (`_watch`)
        # Per name, the identity of changed files whose read failed: the version in memory serves
        # on, and they are read again only once they change again (a copy still being written).
        self._unreadable: dict[str, tuple] = {}
        # Per name, a read of changed files given up on as hung: no other starts until it returns,
        # or each would queue behind it on the loader and stall the adapter's requests again.
        self._hung: dict[str, Future] = {}
        # Admin loads that re-point a name: its new files' parse, begun by `admin_read` (the path
        # resolved, and the read), for `load` to take.
        self._admin_parses: dict[str, tuple[Path, Future]] = {}
        self._device: OrderedDict[str, DeviceAdapter] = OrderedDict()  # LRU, oldest first
        self._free_slots: list[int] = []
        self._next_slot = 0
        self.tables = LoRATables(cfg.num_hidden_layers, kv_cache.device)
        # The LoRA shrinks run here, concurrent with the base projections' GEMMs (LoRABatch.project).
        self.stream = side_stream("lora", kv_cache.device) if kv_cache.device.type == "cuda" else None
        if kv_cache.device.type == "cpu" and kv_cache.dtype == torch.float32:
            # Build (first time on a machine, ~25 s) or load the C++ decode op now, not inside the
            # first decode step with an adapter.
            cpu_extension.load()
        self.stats = LoRAStats()
        self._lock = threading.Lock()  # guards _host and stats between the loader and the engine
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-load")
        # Geometry of one block's memory in one layer: K half then V half, each `block_elems` long.
        _, layers, num_blocks = kv_cache.shape[:3]
        self.block_elems = kv_cache[0, 0, 0].numel()
        self._layer_stride = num_blocks * self.block_elems
        self._v_base = layers * num_blocks * self.block_elems

    # --- lookup ----------------------------------------------------------------------------

    def _path(self, name: str) -> Path | None:
        if name in self._paths:
            return self._paths[name]
        if self.store_dir is not None and _valid_name(name):
            p = self.store_dir / name
            if (p / "adapter_config.json").is_file():
                return p
        return None

    def known(self, name: str) -> bool:
        return (
            name in self._device
            or name in self._host
            or name in self._loading
            or self._path(name) is not None
        )

    def check(self, name: str) -> None:
        """Raise AdapterNotFoundError unless `name` is resident or can be loaded from the store."""
        if not self.known(name):
            where = " (not registered nor in the adapter store)" if self.store_dir else " (no adapter store)"
            raise AdapterNotFoundError(name, where)

    def store_names(self) -> list[str]:
        if self.store_dir is None or not self.store_dir.is_dir():
            return []
        # A folder whose name requests cannot use (spaces, '+', a leading '_' or '.') is not listed:
        # it would be advertised and then never found.
        return sorted(
            p.name
            for p in self.store_dir.iterdir()
            if _valid_name(p.name) and (p / "adapter_config.json").is_file()
        )

    # --- requests --------------------------------------------------------------------------

    def add_user(self, name: str) -> None:
        """An unfinished request names `name`; until its `remove_user`, `name` cannot be unloaded
        or re-pointed, whether the request is waiting, running or preempted (holding no pin)."""
        self._users[name] = self._users.get(name, 0) + 1

    def remove_user(self, name: str) -> None:
        n = self._users.get(name, 0) - 1
        if n > 0:
            self._users[name] = n
        else:
            self._users.pop(name, None)

    def _refuse_if_used(self, name: str, action: str) -> None:
        dev = self._device.get(name)
        n = max(self._users.get(name, 0), dev.pins if dev is not None else 0)
        if n:
            raise AdapterBusyError(
                f"adapter {name!r} is in use by {n} unfinished request(s): {action} it is refused "
                f"until they finish"
            )

    def cache_salt(self, name: str) -> bytes:
        """Prefix-cache salt: KV computed under one adapter (and load) is never reused by another.

        A request takes its salt when it arrives and keeps it for life: its block hashes chain from
        it, and a preempted request resumes from its own cached blocks. That is sound because what
        a name stands for cannot change under an unfinished request: unload and a load or register
        from another path are refused while any names it (`add_user`), and each moves the
        generation on. Refusing is simpler than re-salting requests mid-flight, and a response is
        never generated by two adapters. The one change that cannot be refused, the files replaced
        on disk, is seen at the next read, or for a resident adapter when `_watch` notices it; the
        new files' read is installed only once no request pins the old version, and moves the
        generation on too. Then the scheduler restarts under the new salt a request that has
        neither sampled a token nor streamed KV (one preempted mid-prefill too), and fails one that
        has (part of its answer came from the old files): such a request keeps the old version
        pinned while it can (`acquire`'s `keep_version`), so only one preempted and paged out
        before the switch fails.
        """
        return f"lora:{name}:{self._generation.get(name, 0)}".encode()

    # --- host tier -------------------------------------------------------------------------

    def _parse(self, name: str, path: Path) -> tuple[HostAdapter, tuple]:
        t0 = time.perf_counter()
        try:
            for attempt in range(_READ_ATTEMPTS):
                # The files' identity around the read: the same after it, and the digest (taken in
                # the read) is of the bytes parsed. Files replaced meanwhile are read again.
                stamp = _stamp(path)
                with self._lock:
                    # The files of the last read, unchanged (as `cache_salt` trusts too): the digest
                    # is not computed again when an adapter paged out of host memory comes back.
                    same = self._stamps.get(name) == stamp
                    known = self._versions[name][0] if same and name in self._versions else None
                try:
                    adapter = read_peft_adapter(path, self.cfg, self.dtype, name, digest=known)
                except AdapterError:
                    if attempt + 1 < _READ_ATTEMPTS and _stamp(path) != stamp:
                        continue  # half-written files: the new ones may be complete by now
                    raise
                if _stamp(path) == stamp:
                    break
            else:
                raise AdapterError(
                    f"adapter {name!r}: its files in {path} changed during each of {_READ_ATTEMPTS} reads; "
                    f"load it again once they are written"
                )
        except Exception:
            with self._lock:
                self.stats.load_failures += 1
            raise
        with self._lock:
            self.stats.loads += 1
            self.stats.load_seconds += time.perf_counter() - t0
        return adapter, stamp

    def _install(self, name: str, adapter: HostAdapter, stamp: tuple, generation: int) -> None:
        """Put a read in the host tier, unless `name` was unloaded or re-pointed since the read began
        (its generation moved on): that read is of weights the name no longer stands for."""
        with self._lock:
            if self._generation.get(name, 0) != generation:
                return
            if self._stamps.get(name, stamp) != stamp:
                self._generation[name] = generation + 1  # the files changed on disk since the last read
            self._stamps[name] = stamp
            digest, changes = self._versions.get(name, (adapter.digest, 0))
            self._versions[name] = (adapter.digest, changes + (digest != adapter.digest))
            self._host[name] = adapter
            self._trim_host()

    def version(self, name: str) -> tuple[str, int]:
        """(digest, changes) of `name`: the digest of the files its weights were last read from ("" if
        never read), and how many times a read found other files than the read before. Safe from any
        thread (the KV transfer's).

        The weights a request computes with are those of the last read when it is admitted: a read
        is installed only while the name is off the device (the engine reads an adapter it holds in
        neither tier; a re-pointing load evicts it first; a read of replaced files waits until no
        request pins the old version, then evicts it), and what is on the device stays there
        while a request pins it. So while a request runs, `version` is its adapter's. Once it has
        ended, a later read may have replaced the name's files: a caller that reads `version` after
        the request may have ended compares `changes` with a reading taken before it was submitted
        (equal: the digest is the request's)."""
        with self._lock:
            return self._versions.get(name, ("", 0))

    def _read(self, name: str, path: Path, generation: int) -> HostAdapter:
        adapter, stamp = self._parse(name, path)
        self._install(name, adapter, stamp, generation)
        return adapter

    def _trim_host(self) -> None:
        total = sum(a.num_bytes for a in self._host.values())
        while total > self.host_cache_bytes and len(self._host) > 1:
            _, old = self._host.popitem(last=False)
            total -= old.num_bytes
            self.stats.host_evictions += 1

    def prefetch(self, name: str) -> None:
        """A request wants `name`: count where it was found, and start reading it from the store
        in the background unless it is already in memory."""
        with self._lock:
            tier = "device" if name in self._device else "host" if name in self._host else "store"
            self.stats.hits[tier] += 1
        if tier != "store" or name in self._refresh:
            self._watch(name)  # the read of replaced files starts as the request queues
            return
        if name in self._loading:
            return
        path = self._path(name)
        if path is not None:
            self._start_read(name, path)

    def _start_read(self, name: str, path: Path) -> None:
        self._loading[name] = self._executor.submit(self._read, name, path, self._generation.get(name, 0))
        self._loading_since[name] = self.clock()

    def _watch(self, name: str, force: bool = False) -> None:
        """Start reading `name`'s files in the background if they changed on disk since the
        version in memory was read (`_refresh`). A stat of both files, at most every
        `files_check_interval_s` per adapter (`force`: now), and only for an adapter in memory:
        one that is not is read from the files anyway when wanted. Without it, an adapter always in
        use would keep its first version for good."""
        if name in self._refresh or (name not in self._device and name not in self._host):
            return
        hung = self._hung.get(name)
        if hung is not None:
            if not hung.done():
                return
            del self._hung[name]
        look = self._looks.get(name)
        wait = 0.0
        if force or look is None:
            now = self.clock()
            if not force and now - self._checked.get(name, -math.inf) < self.files_check_interval_s:
                return
            self._checked[name] = now
            look = self._looks[name] = self._executor.submit(self._look, name)
            # An admin's forced check waits for its answer (it means the files as they are now),
            # a request's briefly.
            wait = self.load_timeout_s if force else FILES_CHECK_WAIT_S
        if not look.done():
            with contextlib.suppress(TimeoutError):
                look.result(timeout=wait)
            if not look.done():
                return  # the stat hangs (or waits behind a read): the version in memory serves on
        del self._looks[name]
        try:
            path, stamp = look.result()
        except OSError as e:
            log.warning("adapter %r: cannot check its files (%s); the version in memory serves on", name, e)
            return
        if path is None:  # gone from the store: the version in memory serves on
            return
        with self._lock:
            known = self._stamps.get(name)
        if known is None or stamp == known or stamp == self._unreadable.get(name):
            return
        log.info("adapter %r: its files in %s changed on disk; reading the new version", name, path)
        read = self._executor.submit(self._parse, name, path)
        self._refresh[name] = _Refresh(read, self.clock(), self._generation.get(name, 0), stamp)

    def _look(self, name: str) -> tuple[Path | None, tuple]:
        """On the loader's thread: where `name`'s files are and their `_stamp`."""
        path = self._path(name)
        return path, (_stamp(path) if path is not None else ())

    def _advance_refresh(self, name: str) -> bool:
        """Replace `name`'s old version by the read of its new files if both are ready: the read
        done and no request pinning the old version. True when no refresh remains pending."""
        r = self._refresh.get(name)
        if r is None:
            return True
        if not r.read.done():
            if self.clock() - r.since <= self.load_timeout_s:
                return False
            # A read that hangs must not keep the adapter from serving: the old version serves on,
            # and a later check of the files starts another read.
            if not r.read.cancel():
                self._hung[name] = r.read
            del self._refresh[name]
            log.warning(
                "adapter %r: reading its changed files took over %g s; serving the version read before",
                name,
                self.load_timeout_s,
            )
            return True
        try:
            adapter, stamp = r.read.result()
        except Exception as e:  # noqa: BLE001 - bad new files leave the version in memory serving
            del self._refresh[name]
            self._unreadable[name] = r.stamp
            log.warning(
                "adapter %r: its changed files cannot be read (%s); serving the version read before "
                "until they change again",
                name,
                e,
            )
            return True
        with self._lock:
            same = adapter.digest == self._versions.get(name, ("", 0))[0]
            if same:  # the same bytes copied again: nothing to switch
                self._stamps[name] = stamp
        if same or self._generation.get(name, 0) != r.generation:
            # Nothing to switch, or the name was read or dropped anew meanwhile (the read is stale).
            del self._refresh[name]
            return True
        dev = self._device.get(name)
        if dev is not None and dev.pins > 0:
            return False  # requests still run on the old version
        del self._refresh[name]
        if dev is not None:
            self._evict(name)
        with self._lock:
            self._host.pop(name, None)
        self._install(name, adapter, stamp, r.generation)  # moves the generation (the salt) on
        return True

    def _drop(self, name: str) -> None:
        """Forget every copy of `name`'s weights and move its generation on."""
        if name in self._device:
            self._evict(name)
        fut = self._loading.pop(name, None)
        self._loading_since.pop(name, None)
        if fut is not None:
            fut.cancel()  # one already running completes, and `_install` drops it as stale
        with self._lock:
            self._host.pop(name, None)
            self._stamps.pop(name, None)
            self._generation[name] = self._generation.get(name, 0) + 1
        r = self._refresh.pop(name, None)
        if r is not None:
            r.read.cancel()
        self._checked.pop(name, None)
        self._looks.pop(name, None)
        self._unreadable.pop(name, None)
        self._hung.pop(name, None)

    def _moves(self, name: str, path: Path) -> bool:
        """`name` would stand for other files if it were pointed at `path`."""
        old = self._path(name)
        return old is None or Path(old).resolve() != Path(path).resolve()

    def admin_read(self, name: str, path: Path | None = None) -> Future | None:
        """Admin's load, its first half, on the engine thread and quick: start in the background
        the reading of files that `load` would otherwise do on the engine thread (every decode
        stalled meanwhile: a second or more for a large adapter, up to the load timeout on a slow
        volume), and return that read for the caller to wait on off the engine thread; `load` then
        finds it done. None: nothing to read first (a name or path `load` refuses, files unchanged).
        Raises what `load` would for a re-pointing refused while requests for the name run."""
        if not _valid_name(name):
            return None
        if path is not None and self._moves(name, Path(path)):
            self._refuse_if_used(name, "re-pointing")  # before reading what would be refused
            read = self._executor.submit(self._parse, name, Path(path))
            self._admin_parses[name] = (Path(path).resolve(), read)
            return read
        src = Path(path) if path is not None else self._path(name)
        if src is None:
            return None
        if name in self._host or name in self._device or name in self._refresh:
            self._watch(name, force=True)
            refresh = self._refresh.get(name)
            return None if refresh is None else refresh.read
        pending = self._loading.get(name)
        if pending is None or (pending.done() and pending.exception() is not None):
            self._start_read(name, src)  # a failed read is not what the files say now
        return self._loading[name]

    def forget_admin_read(self, name: str) -> None:
        """An admin load that gave up waiting: its parse (and the memory it holds) is not kept."""
        entry = self._admin_parses.pop(name, None)
        if entry is not None:
            entry[1].cancel()

    def load(self, name: str, path: Path | None = None, to_device: bool = False) -> AdapterInfo:
        """Admin: read an adapter (from `path`, else the store) into host memory now, checking it fits.

        A `path` other than the one `name` stands for now re-points it (refused while requests
        for it are unfinished); a `path` that is not a fitting adapter changes nothing."""
        if not _valid_name(name):
            raise AdapterError(f"adapter name {name!r}: use letters, digits, '.', '_' and '-' only")
        if path is not None and self._moves(name, Path(path)):
            src = Path(path)
            self._refuse_if_used(name, "re-pointing")
            resolved, read = self._admin_parses.pop(name, (None, None))
            if read is not None and resolved == src.resolve() and read.done():
                adapter, stamp = read.result()  # admin_read's; raises its AdapterError likewise
            else:
                adapter, stamp = self._parse(name, src)  # raises AdapterError before anything changes
            self._drop(name)
            self._paths[name] = src
            self._install(name, adapter, stamp, self._generation[name])
        else:
            src = Path(path) if path is not None else self._path(name)
            if src is None:
                raise AdapterNotFoundError(name, f" (not in the adapter store {self.store_dir})")
            if name in self._host or name in self._device or name in self._refresh:
                # An operator who replaced the files and loads the name means the new ones: read
                # now, and in place now unless requests still run on the old version (then once
                # they finish, as for requests).
                self._watch(name, force=True)
                r = self._refresh.get(name)
                if r is not None:
                    try:
                        r.read.result(timeout=self.load_timeout_s)
                    except AdapterError as e:
                        self._advance_refresh(name)  # keeps the version in memory
                        raise AdapterError(f"{e} (the version read before serves on)") from e
                    except TimeoutError:
                        pass  # requests wait for it as for any read, within the load timeout
                    self._advance_refresh(name)
            if name not in self._host and name not in self._device:
                pending = self._loading.get(name)
                if pending is None:
                    self._read(name, src, self._generation.get(name, 0))
                else:
                    # Awaited, not read a second time: the two reads could find two versions of
                    # the files, and the later install replace the one on the device (see `version`).
                    try:
                        pending.result(timeout=self.load_timeout_s)
                    except AdapterError:
                        # Said here, and taken off `_loading` as a request's poll takes it (raising
                        # it again): not kept for the next request to be failed with once the
                        # files are mended.
                        self._poll(name)
                        raise
            if path is not None:
                self._paths[name] = src
        if to_device and name not in self._device:
            with self._lock:
                adapter = self._host.get(name)
            if adapter is None:  # its files changed on disk while it was read: a later load reads them
                raise AdapterBusyError(f"adapter {name!r} changed while it was loaded; load it again")
            if self._to_device(adapter) is None:
                raise AdapterBusyError(f"adapter {name!r}: no room on the device now (KV cache full)")
        return self.info(name)

    def register(self, name: str, path: Path) -> None:
        """Make `name` loadable from `path` on first use (no read now): deployments list their adapters."""
        if not _valid_name(name):
            raise AdapterError(f"adapter name {name!r}: use letters, digits, '.', '_' and '-' only")
        if self._moves(name, Path(path)):
            self._refuse_if_used(name, "re-pointing")
            self._drop(name)
        self._paths[name] = Path(path)

    def unload(self, name: str) -> None:
        """Admin: drop an adapter from every tier; refused while a request for it is unfinished."""
        self._refuse_if_used(name, "unloading")
        if not self.known(name):
            raise AdapterNotFoundError(name)
        self._drop(name)
        self._paths.pop(name, None)

    def num_blocks(self, name: str) -> int | None:
        """KV blocks `name` takes on the device; None while its weights are not in memory."""
        dev = self._device.get(name)
        if dev is not None:
            return dev.num_blocks
        with self._lock:
            host = self._host.get(name)
        return None if host is None else self._plan(host)[0]

    # --- device tier -----------------------------------------------------------------------

    def is_loading(self, name: str) -> bool:
        """Still being read from the store (and not yet past the load timeout)."""
        if name in self._refresh:
            return True  # its new files' read, or the old version's last users (see `acquire`)
        fut = self._loading.get(name)
        if fut is None or fut.done():
            return False
        return self.clock() - self._loading_since[name] <= self.load_timeout_s

    def _poll(self, name: str) -> HostAdapter | None:
        """The host copy if ready; raises AdapterError if its load failed."""
        fut = self._loading.get(name)
        if fut is not None:
            if not fut.done():
                waited = self.clock() - self._loading_since[name]
                if waited > self.load_timeout_s:
                    del self._loading[name]  # a later request starts a fresh read
                    raise AdapterError(f"adapter {name!r}: loading took over {self.load_timeout_s:g} s")
                return None
            del self._loading[name]
            fut.result()  # re-raises the load error
        with self._lock:
            adapter = self._host.get(name)
            if adapter is not None:
                self._host.move_to_end(name)
        return adapter

    def acquire(
        self, name: str, keep_version: bool = False, waiting_since: float | None = None
    ) -> int | None:
        """Pin `name` on the device and return its slot; None while it is loading or there is no room.

        Raises AdapterError if it cannot be loaded, AdapterNotFoundError if it is unknown.

        While the files of a resident `name` are being replaced (`_watch`), a request waits (None)
        until the new version is in, so that the old one's users drain: no new one joins them. But
        `keep_version`, a request that has computed with the version in memory (sampled tokens,
        streamed KV) and must finish on it, pins that version if it is still on the device. The
        wait is bounded by the load timeout, counted from the later of the change's notice and
        `waiting_since` (the request's arrival, by `clock`): past it the request fails.
        """
        self._watch(name)
        # A `keep_version` request pins the old version below, as any request pins a resident one.
        if name in self._refresh and not (keep_version and name in self._device):
            if not self._advance_refresh(name):
                r = self._refresh[name]
                now = self.clock()
                # (A read that hangs is given up on by `_advance_refresh` instead: what is left to
                # wait for is the old version's users.)
                if now - max(r.since, waiting_since or r.since) > self.load_timeout_s:
                    raise AdapterError(
                        f"adapter {name!r}: its files changed on disk, and the requests still running "
                        f"on the version read before did not finish within the adapter load timeout "
                        f"({self.load_timeout_s:g} s); send the request again"
                    )
                return None
        dev = self._device.get(name)
        if dev is not None:
            self._device.move_to_end(name)
            dev.pins += 1
            return dev.slot
        if name not in self._host and name not in self._loading:
            self.check(name)
            self._start_read(name, self._path(name))
        adapter = self._poll(name)
        if adapter is None:
            return None
        dev = self._to_device(adapter)
        if dev is None:
            return None
        dev.pins += 1
        return dev.slot

    def is_resident(self, name: str) -> bool:
        """Resident in device memory now (acquiring it needs no room)."""
        return name in self._device

    def release(self, name: str) -> None:
        dev = self._device.get(name)
        if dev is not None and dev.pins > 0:
            dev.pins -= 1

    def evict_one(self, keep: str | None = None) -> bool:
        """Evict the least recently used unpinned device adapter (not `keep`); False if none."""
        for name, dev in self._device.items():
            if dev.pins == 0 and name != keep:
                self._evict(name)
                return True
        return False

    def _evict(self, name: str) -> None:
        dev = self._device.pop(name)
        self.bm.free_run(dev.first_block, dev.num_blocks)
        self.tables.set_slot(dev.slot, None, {})
        self._free_slots.append(dev.slot)
        with self._lock:
            self.stats.device_evictions += 1

    def _plan(self, adapter: HostAdapter) -> tuple[int, dict[int, list[tuple]]]:
        """Blocks needed and, per layer, the matrices to place, so that no matrix straddles a half."""
        layers = {}
        for layer in range(self.cfg.num_hidden_layers):
            mats = _layer_matrices(adapter, layer, self.shapes)
            if mats:
                layers[layer] = mats
        need = max(sum(n for *_, n in m) for m in layers.values())
        n = max(1, -(-need // (2 * self.block_elems)))
        while any(_pack([s for *_, s in m], [n * self.block_elems] * 2) is None for m in layers.values()):
            n += 1
        return n, layers

    def _to_device(self, adapter: HostAdapter) -> DeviceAdapter | None:
        name = adapter.name
        n, layers = self._plan(adapter)
        if n > self.bm.num_blocks:
            raise AdapterError(
                f"adapter {name!r} needs {n} KV blocks but the whole pool has {self.bm.num_blocks}; "
                f"raise the memory budget"
            )
        first = self.bm.allocate_run(n)
        while first is None and self.evict_one(keep=name):
            first = self.bm.allocate_run(n)
        if first is None:
            return None
        slot = None
        try:
            slot = self._free_slots.pop() if self._free_slots else self._take_slot()
            dev = DeviceAdapter(
                name, slot, first, n, adapter.num_bytes, adapter.max_rank, digest=adapter.digest
            )
            self._place(adapter, dev, layers)
            self.tables.set_slot(slot, dev, adapter.scaling)
        except BaseException:
            # The scheduler fails the request on any error here and the engine serves on: the run
            # and the slot go back, or they would be lost for good.
            if slot is not None:
                self.tables.set_slot(slot, None, {})
                self._free_slots.append(slot)
            self.bm.free_run(first, n)
            raise
        self._device[name] = dev
        with self._lock:
            self.stats.device_loads += 1
        return dev

    def _place(self, adapter: HostAdapter, dev: DeviceAdapter, layers: dict[int, list[tuple]]) -> None:
        """Copy the adapter's matrices into its block run and record where each one went."""
        first, n = dev.first_block, dev.num_blocks
        regions = (first * self.block_elems, self._v_base + first * self.block_elems)
        for layer, mats in layers.items():
            base = [r + layer * self._layer_stride for r in regions]
            spots = _pack([s for *_, s in mats], [n * self.block_elems] * 2)
            assert spots is not None
            by_kind: dict[str, _Placement] = {}
            for (kind, tag, numel), (region, off) in zip(mats, spots):
                at = base[region] + off
                if tag == "A":
                    # The parts' A stacked in place (no torch.cat: one copy of each, not two).
                    pos, rows = at, 0
                    for m in KINDS[kind]:
                        if (layer, m) in adapter.weights:
                            a = adapter.weights[(layer, m)][0]
                            self.pool[pos : pos + a.numel()].copy_(a.reshape(-1))
                            pos, rows = pos + a.numel(), rows + a.shape[0]
                    assert pos == at + numel
                    by_kind[kind] = _Placement(at, rows, {})
                else:
                    a, b = adapter.weights[(layer, tag)]
                    p = by_kind[kind]
                    y_off = sum(r for _, r, _ in p.parts.values())
                    self.pool[at : at + numel].copy_(b.reshape(-1))
                    p.parts[tag] = (at, a.shape[0], y_off)
            for kind, p in by_kind.items():
                dev.placements[(layer, kind)] = p

    def _take_slot(self) -> int:
        slot = self._next_slot
        self._next_slot += 1
        if slot >= self.tables.capacity:
            self.tables.grow(2 * self.tables.capacity)
        return slot

    # --- per step --------------------------------------------------------------------------

    def batch(self, seq_lens: list[int], seq_slots: list[int | None]) -> LoRABatch | None:
        """LoRA metadata for a packed step, or None when no token uses an adapter."""
        active = {s for s in seq_slots if s is not None}
        if not active:
            return None
        max_rank = {k: max(self.tables.max_total_rank[k][s] for s in active) for k in KINDS}
        if tandem_kernels.uses_triton(self.pool.device):
            groups = tandem_kernels.lora_token_groups(seq_lens, seq_slots, self.pool.device)
            return LoRABatch(
                self.pool, self.tables.on_device(), groups, max_rank, self.shapes, stream=self.stream
            )
        # The CPU path: the metadata stays on the host (see LoRABatch).
        host = lora_reference.HostGroups(seq_lens, seq_slots)
        return LoRABatch(self.pool, self.tables, None, max_rank, self.shapes, host)

    # --- introspection ---------------------------------------------------------------------

    def info(self, name: str) -> AdapterInfo:
        dev = self._device.get(name)
        if dev is not None:
            return AdapterInfo(name, "device", dev.num_bytes, dev.rank, dev.pins > 0, dev.digest)
        with self._lock:
            host = self._host.get(name)
        if host is not None:
            return AdapterInfo(name, "host", host.num_bytes, host.max_rank, False, host.digest)
        if name in self._loading:
            return AdapterInfo(name, "loading", 0, 0, False)
        return AdapterInfo(name, "store", 0, 0, False)

    def list(self) -> list[AdapterInfo]:
        names = set(self._device) | set(self._host) | set(self._loading) | set(self._paths)
        names |= set(self.store_names())
        return [self.info(n) for n in sorted(names)]

    def resident(self) -> dict[str, list[str]]:
        with self._lock:
            host = [n for n in self._host if n not in self._device]
        return {"device": list(self._device), "host": host}

    def stats_dict(self) -> dict[str, Any]:
        """Residency and counters, for the engine's stats (metrics, admin Stats, routing)."""
        resident = self.resident()
        with self._lock:
            st = self.stats
            return {
                "adapters_device": resident["device"],
                "adapters_host": resident["host"],
                "adapter_hits": dict(st.hits),
                "adapter_loads": st.loads,
                "adapter_load_failures": st.load_failures,
                "adapter_load_seconds": st.load_seconds,
                "adapter_device_loads": st.device_loads,
                "adapter_evictions": {"device": st.device_evictions, "host": st.host_evictions},
            }

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


_READ_ATTEMPTS = 3  # reads of an adapter whose files change while it is read, before giving up


def _stamp(path: Path) -> tuple:
    """The identity of an adapter's files (inode, size, times): another value means other weights
    may be behind the same path. ctime too, as a copy that keeps the mtime still changes it."""
    out = []
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        try:
            st = (Path(path) / f).stat()
        except OSError:
            out.append(None)
            continue
        out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(out)


def _valid_name(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", name)) and ".." not in name
