"""Tandem's attention and KV-cache ops, each a Triton kernel with a plain-torch reference.

Shapes (the contract every op shares):
    key, value          [num_tokens, num_kv_heads, head_dim]
    k_cache, v_cache    [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping        [num_tokens] int64, slot = block_id * block_size + offset
    block_tables        [num_seqs, max_blocks] int32, rows padded with any valid block id
    context_lens        [num_seqs] int32, KV tokens each sequence attends to (>= 1)
    cu_seqlens_q        [num_seqs + 1] int32, cumulative query lengths of packed queries
    q (decode)          [num_seqs, num_heads, head_dim], the newest token of each sequence
    q (prefill)         [num_tokens, num_heads, head_dim], packed without padding
    attention output    q's shape and dtype
GQA: num_heads is a multiple of num_kv_heads and query head h reads kv head
h // (num_heads // num_kv_heads). Prefill query i of sequence s sits at position
context_lens[s] - q_len_s + i and sees KV positions up to its own; its KV is already cached.

LoRA (many adapters in one batch, tokens grouped by adapter; lora.py details the shapes):
    x                   [num_tokens, hidden_in]
    lora_a              [num_slots, max_rank, hidden_in]; lora_b [num_slots, hidden_out, max_rank]
    ranks               [num_slots] int32, 1 <= rank <= max_rank; weights past the rank are never read
    scaling             [num_slots] float32, lora_alpha / rank
    token_indices       [num_lora_tokens] int64, the tokens that use an adapter, grouped by adapter
    group_offsets       [num_groups + 1] int32, group g owns token_indices[offsets[g]:offsets[g + 1]]
    group_slots         [num_groups] int32, each group's adapter slot
    y = lora_shrink(...)                 [num_tokens, max_rank] float32, zero outside groups and ranks
    lora_expand(..., out, ..., offset)   out[:, offset:offset + hidden_out] += scaling * y @ B.T, in
                                         place, for grouped tokens only (others stay bit-identical)
Tokens without an adapter are simply in no group; `lora_token_groups` builds the metadata.

Each op dispatches per call: the Triton launcher for CUDA tensors (when Triton is installed),
the torch reference otherwise. `TANDEM_KERNELS=triton` forces Triton (with TRITON_INTERPRET=1
this runs the kernels on CPU, which is how the tests check them) and `TANDEM_KERNELS=torch`
forces the reference. Prefill has no Triton kernel yet and always runs the reference.
"""

from __future__ import annotations

import os

import torch

from tandem_kernels import lora_reference, reference
from tandem_kernels.lora_reference import lora_token_groups

try:
    import triton
except ImportError:  # Triton is optional: a CPU-only install runs the references.
    triton = None

# Import the launchers eagerly under private names. Importing a submodule binds it as an
# attribute of this package the first time, so a lazy import of `tandem_kernels.store_kvcache`
# would overwrite the public `store_kvcache` function defined below.
if triton is not None:
    from tandem_kernels.lora import lora_expand as _triton_lora_expand
    from tandem_kernels.lora import lora_shrink as _triton_lora_shrink
    from tandem_kernels.paged_decode_attention import (
        paged_decode_attention as _triton_paged_decode_attention,
    )
    from tandem_kernels.store_kvcache import store_kvcache as _triton_store_kvcache
else:
    _triton_paged_decode_attention = None
    _triton_store_kvcache = None
    _triton_lora_shrink = None
    _triton_lora_expand = None

__all__ = [
    "gathered_attention",
    "lora_expand",
    "lora_reference",
    "lora_shrink",
    "lora_token_groups",
    "paged_decode_attention",
    "paged_prefill_attention",
    "reference",
    "store_kvcache",
    "triton_available",
]

_BACKENDS = ("", "auto", "triton", "torch")


def triton_available() -> bool:
    """Whether the Triton launchers imported."""
    return triton is not None


def _use_triton(device: torch.device) -> bool:
    # Read at call time so tests and operators can switch backends without re-importing.
    backend = os.environ.get("TANDEM_KERNELS", "").lower()
    if backend not in _BACKENDS:
        raise ValueError(f"TANDEM_KERNELS={backend!r}: expected one of 'triton', 'torch', 'auto'")
    if backend == "torch":
        return False
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("TANDEM_KERNELS=triton but Triton could not be imported")
        return True
    return device.type == "cuda" and triton_available()


def store_kvcache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write each token's key and value into its cache slot, in place."""
    if _use_triton(k_cache.device):
        _triton_store_kvcache(key, value, k_cache, v_cache, slot_mapping)
    else:
        reference.store_kvcache(key, value, k_cache, v_cache, slot_mapping)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attend one query token per sequence to its paged KV; returns [num_seqs, num_heads, head_dim]."""
    if _use_triton(q.device):
        return _triton_paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)
    return reference.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal attention for packed query chunks whose KV is already cached; returns q's shape."""
    # No Triton varlen kernel yet: the reference is the only path on every device.
    return reference.paged_prefill_attention(
        q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale
    )


def gathered_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_slots: torch.Tensor,
    cu_seqlens_q: list[int],
    cu_seqlens_kv: list[int],
    scale: float,
) -> torch.Tensor:
    """Causal attention for packed chunks (decodes and prefills alike) over KV gathered by slot.

    The CPU path: one exact, unpadded gather per layer. GPUs use the paged kernels instead.
    """
    return reference.gathered_attention(q, k_cache, v_cache, kv_slots, cu_seqlens_q, cu_seqlens_kv, scale)


def lora_shrink(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    ranks: torch.Tensor,
    token_indices: torch.Tensor,
    group_offsets: torch.Tensor,
    group_slots: torch.Tensor,
) -> torch.Tensor:
    """y[t] = x[t] @ lora_a[slot].T for every grouped token; returns [num_tokens, max_rank] float32."""
    if _use_triton(x.device):
        return _triton_lora_shrink(x, lora_a, ranks, token_indices, group_offsets, group_slots)
    return lora_reference.lora_shrink(x, lora_a, ranks, token_indices, group_offsets, group_slots)


def lora_expand(
    y: torch.Tensor,
    lora_b: torch.Tensor,
    ranks: torch.Tensor,
    token_indices: torch.Tensor,
    group_offsets: torch.Tensor,
    group_slots: torch.Tensor,
    out: torch.Tensor,
    scaling: torch.Tensor,
    out_offset: int = 0,
) -> None:
    """out[t, out_offset:out_offset + hidden_out] += scaling[slot] * y[t] @ lora_b[slot].T, in place."""
    args = (y, lora_b, ranks, token_indices, group_offsets, group_slots, out, scaling, out_offset)
    if _use_triton(out.device):
        _triton_lora_expand(*args)
    else:
        lora_reference.lora_expand(*args)
