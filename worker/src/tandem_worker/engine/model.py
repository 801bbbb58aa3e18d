"""`LlamaModel`: the Llama-family decoder (Llama, Mistral, Qwen2) over a paged KV cache.

The forward pass takes a packed batch (no padding): decode tokens first, one per sequence,
then the prefill chunks, each a run of consecutive tokens of one sequence. `AttentionMetadata`
says which is which and where each token's KV goes in the cache.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import nn

import tandem_kernels

from .config import ModelConfig
from .loader import checkpoint_files

logger = logging.getLogger(__name__)

# Prompt log-probabilities are computed this many rows of the vocabulary projection at a time: a
# 2,048-token chunk of Llama-3's 128K vocabulary would otherwise be 1 GB of float32 logits.
PROMPT_LOGPROB_ROWS = 256


@dataclass
class PromptRows:
    """Prompt positions whose next (prompt) token's log-probability is wanted: `indices` into the
    step's packed tokens, `targets` the token ids that follow them, and the `k` most likely tokens
    at each too. `LlamaModel.forward` fills `logprobs` [R] and, with k, `top_values`/`top_ids` [R, k]
    (under the raw logits, float32)."""

    indices: torch.Tensor
    targets: torch.Tensor
    k: int
    logprobs: torch.Tensor | None = None
    top_values: torch.Tensor | None = None
    top_ids: torch.Tensor | None = None


@dataclass
class AttentionMetadata:
    num_decode_tokens: int  # the first tokens of the batch, one per decoding sequence
    slot_mapping: torch.Tensor  # [num_tokens] int64: cache slot of each token's new KV
    # Decode part: one row per decoding sequence.
    decode_block_tables: torch.Tensor | None  # [num_decodes, max_blocks] int32
    decode_context_lens: torch.Tensor | None  # [num_decodes] int32
    # Prefill part: packed chunks after the decode tokens.
    prefill_block_tables: torch.Tensor | None  # [num_prefills, max_blocks] int32
    # On the host: attention reads them in Python, and a device copy would cost a sync per layer.
    prefill_cu_seqlens_q: list[int] | None  # num_prefills + 1 bounds of the packed chunks
    prefill_context_lens: list[int] | None  # num_prefills: positions each chunk attends to
    # Every prefill chunk starts at position 0 (no cached prefix, no earlier chunk): attention can
    # use the fresh K/V with a causal mask instead of reading them back from the paged cache.
    prefill_is_fresh: bool = False
    # CPU path: the packed chunks attend over KV gathered by block (see tandem_kernels.gathered_attention),
    # decodes too unless they are paged (no buckets). None: decodes alone, all paged.
    kv_blocks: torch.Tensor | None = None  # [total_blocks] int64
    cu_seqlens_q: list[int] | None = None  # over the packed chunks after the decodes
    context_lens: list[int] | None = None
    decode_buckets: list[tandem_kernels.DecodeBucket] = field(default_factory=list)  # the decodes, batched
    # LoRA deltas for the tokens that use adapters (a tandem_worker.engine.lora.LoRABatch), or None.
    lora: Any = None


# Up to this many rows, Linear's fallback computes (W @ x^T)^T on CPU. Above it, the transposing
# copy of the output costs more than the shape saves: for a 2K-token prefill chunk, the copy of
# gate_up's [2048, 3072] output alone took longer than its matmul (measured on this project's CI
# machines).
SMALL_BATCH_ROWS = 128

# On CPU, float32 products go through oneDNN with each weight reordered once into oneDNN's blocked
# layout ("prepacked"), as torch.compile's CPU backend does for frozen weights. F.linear calls
# MKL's sgemm, which ran 2.1-3.7x slower on this project's CI machines (AMD EPYC, AVX-512) at every
# row count from 16 to 2,048, with the same float32 accuracy. TANDEM_CPU_PREPACK=0 turns it off.
CPU_PREPACK = os.environ.get("TANDEM_CPU_PREPACK", "1") != "0" and torch.backends.mkldnn.is_available()
# Rows the packed layout is tuned for; any row count works with it.
_PREPACK_ROWS_HINT = 16


def _onednn_linear(*args: Any) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(*args)


class Linear(nn.Linear):
    """nn.Linear with a CPU fast path: float32 weights prepacked for oneDNN (see CPU_PREPACK).

    Without it (other dtypes, TANDEM_CPU_PREPACK=0), few-row CPU inputs (decode steps) compute
    (W @ x^T)^T, which MKL runs up to 2x faster than x @ W^T."""

    _packed: torch.Tensor | None = None
    _packed_key: tuple[int, int] | None = None
    _released = False  # the dense weight was freed: only the packed copy is left

    def packed_weight(self) -> torch.Tensor | None:
        """The weight in oneDNN's layout (CPU float32 only), repacked after any change to the
        weight (a reload, a retie), which the key of storage address and version counter sees."""
        if self._released:
            return self._packed
        w = self.weight
        if not CPU_PREPACK or w.device.type != "cpu" or w.dtype != torch.float32:
            return None
        key = (w.data_ptr(), w._version)
        if self._packed_key != key:
            self._packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), _PREPACK_ROWS_HINT)
            self._packed_key = key
        return self._packed

    def release_dense_weight(self) -> None:
        """Keep only the packed copy, so packing costs no memory. The weight becomes empty: a
        later load into it fails on its shape instead of serving stale packed values."""
        if self.packed_weight() is not None:
            self._released = True
            self.weight = nn.Parameter(torch.empty(0, dtype=self.weight.dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return F.linear(x, self.weight, self.bias)
        packed = self.packed_weight()
        if packed is not None:
            if x.dtype != packed.dtype:
                raise TypeError(f"input is {x.dtype}, the packed weight {packed.dtype}")
            return _onednn_linear(x, packed, self.bias, "none", [], "")
        if x.dim() != 2 or x.shape[0] > SMALL_BATCH_ROWS:
            return F.linear(x, self.weight, self.bias)
        out = torch.mm(self.weight, x.t()).t().contiguous()
        return out if self.bias is None else out + self.bias


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__()
        # Computed on the host, and moved with the module: inside `torch.device("meta")` (a model
        # built to be materialised with `to_empty`, which rebuilds this table) the math would go
        # through torch._refs, whose import of torch._dynamo costs about 2 s of a worker's start.
        with torch.device("cpu"):
            inv_freq = rope_inv_freq(cfg)
            pos = torch.arange(max_positions, dtype=torch.float32)
            freqs = pos[:, None] * inv_freq[None, :]  # [max_positions, head_dim // 2]
            emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [T, 1, head_dim] for a step's positions: looked up once, used by every layer."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The norm of x; with `residual`, of x + residual, returned too (the new residual)."""
        return tandem_kernels.rms_norm(x, self.weight, self.eps, residual)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        # One matmul for q, k and v: fewer, larger GEMMs per layer.
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        t = x.shape[0]
        lora = meta.lora
        qkv = self.qkv_proj(x) if lora is None else lora.project(self.layer_idx, "qkv", x, self.qkv_proj)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.reshape(t, self.num_kv_heads, self.head_dim)
        q, k = tandem_kernels.rotary(q, k, *rope)
        tandem_kernels.store_kvcache(k, v, k_cache, v_cache, meta.slot_mapping)
        nd = meta.num_decode_tokens
        if meta.kv_blocks is not None:
            out = tandem_kernels.gathered_attention(
                q,
                k_cache,
                v_cache,
                meta.kv_blocks,
                meta.cu_seqlens_q,
                meta.context_lens,
                self.scale,
                meta.decode_buckets,
            )
            if nd and not meta.decode_buckets:  # decodes not bucketed: read in place from the pages
                out[:nd] = tandem_kernels.paged_decode_attention(
                    q[:nd], k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens, self.scale
                )
        elif nd == t:
            out = tandem_kernels.paged_decode_attention(
                q, k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens, self.scale
            )
        else:
            out = torch.empty_like(q)
            if nd:
                out[:nd] = tandem_kernels.paged_decode_attention(
                    q[:nd], k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens, self.scale
                )
            if meta.prefill_is_fresh:
                out[nd:] = _fresh_prefill_attention(
                    q[nd:], k[nd:], v[nd:], meta.prefill_cu_seqlens_q, self.scale
                )
            else:
                out[nd:] = tandem_kernels.paged_prefill_attention(
                    q[nd:],
                    k_cache,
                    v_cache,
                    meta.prefill_block_tables,
                    meta.prefill_cu_seqlens_q,
                    meta.prefill_context_lens,
                    self.scale,
                )
        out = out.view(t, self.q_size)
        return self.o_proj(out) if lora is None else lora.project(self.layer_idx, "o", out, self.o_proj)


def _fresh_prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: list[int], scale: float
) -> torch.Tensor:
    """Causal attention for whole prompts with no cached prefix, straight from the new K/V."""
    out = torch.empty_like(q)
    for s, e in zip(bounds[:-1], bounds[1:]):
        # 4-D [1, H, L, D]: SDPA's fused (flash / memory-efficient) kernels take only 4-D inputs;
        # 3-D ones fall back to the math path, which materialises the L x L scores (3x slower
        # prefill for a 2K prompt of Llama-3-8B on an H100, measured).
        qs = q[s:e].transpose(0, 1).unsqueeze(0)
        ks = k[s:e].transpose(0, 1).unsqueeze(0)
        vs = v[s:e].transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True)
        out[s:e] = o[0].transpose(0, 1)
    return out


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, lora: Any = None) -> torch.Tensor:
        if lora is None:
            gate_up = self.gate_up_proj(x)
        else:
            gate_up = lora.project(self.layer_idx, "gate_up", x, self.gate_up_proj)
        h = tandem_kernels.silu_and_mul(gate_up)
        return self.down_proj(h) if lora is None else lora.project(self.layer_idx, "down", h, self.down_proj)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, layer_idx)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor],
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's MLP output, the residual stream before it): the next norm adds them, so
        each residual add is part of a norm's kernel. `residual` is None for the first layer."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, rope, k_cache, v_cache, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h, meta.lora), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.config = cfg
        # Given an empty weight, which the checkpoint (or `init_dummy_weights`) fills: a random init
        # on the meta device goes through torch._refs, whose import of torch._dynamo costs about
        # 2 s of every worker's start on a CPU host.
        self.embed_tokens = nn.Embedding(
            cfg.vocab_size, cfg.hidden_size, _weight=torch.empty(cfg.vocab_size, cfg.hidden_size)
        )
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg, max_positions)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_cache: torch.Tensor,  # [2, layers, blocks, block_size, kv_heads, head_dim]
        meta: AttentionMetadata,
        logit_indices: torch.Tensor,  # [S]: the tokens whose next-token logits are wanted
        layer_hook: Callable[[int], None] | None = None,  # called as each layer's KV is written
        logits_out: torch.Tensor | None = None,  # [S, vocab] float32 to write the logits into
        prompt_rows: PromptRows | None = None,  # prompt positions whose log-probabilities are wanted
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        rope = self.rotary(positions, x.dtype)
        residual = None
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, rope, kv_cache[0, i], kv_cache[1, i], meta)
            if layer_hook is not None:
                layer_hook(i)
        if prompt_rows is not None:
            self._prompt_logprobs(x, residual, prompt_rows)
        # Only the sampled positions need the last residual add, norm and vocabulary projection.
        x, _ = self.norm(x[logit_indices], residual[logit_indices])
        if x.device.type == "cpu" and x.shape[0] <= SMALL_BATCH_ROWS and self.lm_head.packed_weight() is None:
            # Rows as a transposed view: the sampler reads each row once, so copying the
            # [S, vocab] block into row-major order first would cost more than the reads it saves.
            logits = torch.mm(self.lm_head.weight, x.t()).t()
        else:
            logits = self.lm_head(x)  # [S, vocab]
        # Into the caller's buffer (one shared by every captured decode graph) or a new one; the
        # cast to float32 is the same copy either way.
        return logits.float() if logits_out is None else logits_out.copy_(logits)

    def _prompt_logprobs(self, x: torch.Tensor, residual: torch.Tensor, rows: PromptRows) -> None:
        """Fill `rows` (see PromptRows), a slice of rows at a time."""
        logprobs, values, ids = [], [], []
        for lo in range(0, len(rows.indices), PROMPT_LOGPROB_ROWS):
            at = rows.indices[lo : lo + PROMPT_LOGPROB_ROWS]
            h, _ = self.norm(x[at], residual[at])
            lp = torch.log_softmax(self.lm_head(h).float(), dim=-1)
            logprobs.append(lp.gather(1, rows.targets[lo : lo + PROMPT_LOGPROB_ROWS, None])[:, 0])
            if rows.k:
                top = lp.topk(rows.k, dim=-1)
                values.append(top.values)
                ids.append(top.indices)
        rows.logprobs = torch.cat(logprobs)
        if rows.k:
            rows.top_values, rows.top_ids = torch.cat(values), torch.cat(ids)

    def prepack(self) -> None:
        """Pack every Linear's weight for the CPU now (see CPU_PREPACK), not in the first step,
        and free the dense copies. A tied lm_head keeps its dense weight: it is the embedding."""
        for m in self.modules():
            if isinstance(m, Linear):
                if m is self.lm_head and self.config.tie_word_embeddings:
                    m.packed_weight()
                else:
                    m.release_dense_weight()

    def weight_bytes(self) -> int:
        """Bytes of the model's weights as served (each counted once, freed dense copies as their
        packed equivalent): what one forward pass reads."""
        total = sum(p.numel() * p.element_size() for p in self.parameters())  # tied: once
        for m in self.modules():
            if isinstance(m, Linear) and m._released:
                total += m.in_features * m.out_features * m.weight.element_size()
        return total

    def load_weights(self, folder: Path) -> None:
        """Load Hugging Face-named safetensors, fusing q/k/v and gate/up as they arrive."""
        files = checkpoint_files(Path(folder))

        def tensors() -> Iterator[tuple[str, torch.Tensor]]:
            for f in files:
                try:
                    with safe_open(str(f), framework="pt") as st:
                        for name in st.keys():
                            yield name, st.get_tensor(name)
                except SafetensorError as e:
                    raise ValueError(
                        f"{f} is not a readable safetensors file (truncated or corrupt?): {e}"
                    ) from None

        self.load_state(tensors(), source=f"model folder {folder}")

    def load_state(self, items: Iterable[tuple[str, torch.Tensor]], source: str = "state dict") -> None:
        """Copy Hugging Face-named tensors (a checkpoint, or a `transformers` model's state_dict)
        into the fused parameters; every weight must arrive exactly as the model expects it."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        fused = {
            "q_proj": ("qkv_proj", 0),
            "k_proj": ("qkv_proj", 1),
            "v_proj": ("qkv_proj", 2),
            "gate_proj": ("gate_up_proj", 0),
            "up_proj": ("gate_up_proj", 1),
        }
        tied_head: torch.Tensor | None = None
        for name, tensor in items:
            if "rotary_emb" in name:
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                tied_head = tensor  # compared with the embedding once every tensor is in
                continue
            target = name.removeprefix("model.")
            parts = target.split(".")
            shard = None
            if len(parts) >= 2 and parts[-2] in fused:
                fused_name, shard = fused[parts[-2]]
                parts[-2] = fused_name
                target = ".".join(parts)
            if target not in params:
                raise ValueError(f"unexpected weight {name!r} in {source}")
            p = params[target]
            key = f"{target}#{shard}"
            if key in loaded:  # two files of one folder (a stale single file beside the shards)
                raise ValueError(f"weight {name!r} appears twice in {source}")
            with torch.no_grad():
                if shard is None:
                    want = tuple(p.shape)
                else:
                    start, length = self._shard_range(parts[-2], shard)
                    want = (length, *p.shape[1:])
                # Checked for the fused parts too: copy_ broadcasts, so a [64] q_proj filled the slice.
                if tuple(tensor.shape) != want:
                    raise ValueError(f"{name}: shape {tuple(tensor.shape)}, model wants {want}")
                (p if shard is None else p.narrow(0, start, length)).copy_(tensor)
            loaded.add(key)
        missing = []
        for name, _ in self.named_parameters():
            if name.endswith("qkv_proj.weight") or name.endswith("qkv_proj.bias"):
                keys = [f"{name}#{i}" for i in range(3)]
            elif name.endswith("gate_up_proj.weight"):
                keys = [f"{name}#{i}" for i in range(2)]
            else:
                keys = [f"{name}#None"]
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            missing += [k for k in keys if k not in loaded]
        if missing:
            raise ValueError(f"{source} lacks weights: {', '.join(sorted(missing)[:5])}")
        if tied_head is not None:
            self._untie_if_different(tied_head, source)

    def _untie_if_different(self, head: torch.Tensor, source: str) -> None:
        """A config that ties the head to the embedding, in a checkpoint that stores a different
        head: transformers keeps the stored head (with a warning), so the outputs match only if we
        do the same."""
        embed = self.embed_tokens.weight
        want = tuple(embed.shape)
        if tuple(head.shape) != want:
            raise ValueError(f"lm_head.weight: shape {tuple(head.shape)}, model wants {want}")
        if torch.equal(head.to(device=embed.device, dtype=embed.dtype), embed):
            return
        logger.warning(
            "%s ties lm_head to embed_tokens (tie_word_embeddings) but stores a different "
            "lm_head.weight: serving the stored head, as transformers does",
            source,
        )
        self.config = dataclasses.replace(self.config, tie_word_embeddings=False)
        with torch.no_grad():
            self.lm_head.weight = nn.Parameter(torch.empty_like(embed).copy_(head), requires_grad=False)

    def init_dummy_weights(self, seed: int = 0, std: float = 0.02) -> None:
        """Random weights for benchmarks (`load_format="dummy"`): no checkpoint is read.

        Drawn on the weights' own device, so an 8B-shaped model is ready in seconds on a GPU."""
        gen = torch.Generator(device=self.embed_tokens.weight.device).manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("layernorm.weight") or name == "norm.weight":
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, std, generator=gen)

    def _shard_range(self, fused_name: str, shard: int) -> tuple[int, int]:
        cfg = self.config
        if fused_name == "qkv_proj":
            q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
            return [(0, q), (q, kv), (q + kv, kv)][shard]
        return (shard * cfg.intermediate_size, cfg.intermediate_size)
