"""Tandem's attention and KV-cache ops, each a Triton kernel with a plain-torch reference.

Shapes (the contract every op shares):
    key, value          [num_tokens, num_kv_heads, head_dim]
    k_cache, v_cache    [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping        [num_tokens] int64, slot = block_id * block_size + offset; -1: skip (padding)
    block_tables        [num_seqs, max_blocks] int32, rows padded with any valid block id
    context_lens        [num_seqs] int32, KV tokens each sequence attends to (>= 1)
    cu_seqlens_q        [num_seqs + 1] int32, cumulative query lengths of packed queries
    q (decode)          [num_seqs, num_heads, head_dim], the newest token of each sequence
    q (prefill)         [num_tokens, num_heads, head_dim], packed without padding
    attention output    q's shape and dtype
GQA: num_heads is a multiple of num_kv_heads and query head h reads kv head
h // (num_heads // num_kv_heads). Prefill query i of sequence s sits at position
context_lens[s] - q_len_s + i and sees KV positions up to its own; its KV is already cached.

LoRA (many adapters in one batch, tokens grouped by adapter; lora.py details the shapes). Adapter
weights live in one flat pool at per-slot element offsets, each at its own rank (S-LoRA paging):
    x                   [num_tokens, hidden_in], rows contiguous
    pool                [pool_size] contiguous, any float dtype (x and out may differ: upcast to fp32)
    a_offsets           [num_slots] int64; slot s's A is pool[a_offsets[s]:][:r * hidden_in], [r, hidden_in]
    b_offsets           [num_slots] int64; its B is pool[b_offsets[s]:][:hidden_out * r], [hidden_out, r]
    ranks               [num_slots] int32, r = ranks[s] in [0, max_rank]; r = 0: slot s's group is skipped
    scaling             [num_slots] float32, lora_alpha / rank
    y_offsets           [num_slots] int64 or None (zeros): expand reads y[:, y_offsets[s]:][:, :r]
    token_indices       [num_lora_tokens] int64, the tokens that use an adapter, grouped by adapter
    group_offsets       [num_groups + 1] int32, group g owns token_indices[offsets[g]:offsets[g + 1]]
    group_slots         [num_groups] int32, each group's adapter slot
    y = lora_shrink(x, pool, a_offsets, ranks, *groups, max_rank)
        [num_tokens, max_rank] float32, zero outside groups and past each slot's rank
    lora_expand(y, pool, b_offsets, ranks, *groups, out, scaling, out_offset, hidden_out, y_offsets)
        out[:, out_offset:out_offset + hidden_out] += scaling * y[:, cols] @ B.T, in place, for
        grouped tokens only (others stay bit-identical); fp32 sum, rounded to out's dtype once
A fused projection (qkv, gate/up) shrinks once over its parts' A rows stacked in the pool, then
expands once per part with that part's b_offsets, ranks, out_offset and y_offsets. `lora_apply`
does all of that as one op (two kernel launches on a GPU), with the per-part metadata stacked:
    total_ranks         [num_slots] int32, rows of the stacked A (the shrink's ranks), <= max_rank
    b_offsets, ranks    [num_parts, num_slots] int64 / int32: row p is part p's expand b_offsets, ranks
    y_offsets, scaling  [num_parts, num_slots] int64 / float32: likewise
    parts               num_parts host (out_offset, hidden_out) pairs, disjoint column ranges of out
    lora_apply(x, pool, a_offsets, total_ranks, *groups, max_rank, out, b_offsets, ranks,
               y_offsets, scaling, parts, tiles=None)
        out[:, col_p:col_p + w_p] += scaling[p, s] * (x @ A[s].T)[:, y_offsets[p, s]:][:, :ranks[p, s]]
        @ B[p, s].T for every part p = (col_p, w_p) and grouped token of slot s, in place: the same
        as lora_shrink then lora_expand per part (columns of y past total_ranks[s] read as zero)
        (tiles: `lora_token_tiles`, for a launch a CUDA graph can capture; see lora.py)
    lora_apply_begin(x, pool, a_offsets, total_ranks, *groups, max_rank, b_offsets, ranks,
                     y_offsets, scaling, parts, tiles=None).finish(out)
        the same in two halves: the shrink (it reads only x) before out exists, the expands after
    lora_apply_finish(y, pool, total_ranks, *groups, max_rank, out, b_offsets, ranks, y_offsets,
                      scaling, parts, tiles=None, max_part_rank=None)
        the expands alone, on a y [num_tokens, >= max_rank] computed elsewhere (any float dtype,
        rows contiguous; the base GEMM's own output when each adapter's stacked A is appended to
        the weight): columns [y_offsets[p, s], + ranks[p, s]) of y, below total_ranks[s]
A layer's elementwise work (fused_ops.py: one kernel each where the torch ops take several):
    rms_norm(x, weight, eps, residual=None)     x, residual [T, N] -> out, or (out, x + residual)
    rotary(q, k, cos, sin)                      q [T, Hq, D], k [T, Hk, D], cos/sin [T, 1, D] -> q', k'
    silu_and_mul(gate_up)                       [T, 2I] -> SiLU(gate) * up [T, I]

Tokens without an adapter are simply in no group; `lora_token_groups` builds the metadata. Bad
shapes, dtypes and (for metadata on the CPU, where it costs no sync) bad ranks, offsets and slots
raise ValueError.

Each op dispatches per call: the Triton launcher for CUDA tensors (when Triton is installed);
for CPU float32 tensors the C++ op (`cpu_extension`: store_kvcache, paged_decode_attention,
rms_norm, rotary, silu_and_mul) once loaded (`cpu_ops_serve`, which the engine calls at start);
the torch reference otherwise.
`TANDEM_KERNELS=triton` forces Triton (with TRITON_INTERPRET=1 this runs the kernels on CPU, which
is how the tests check them) and `TANDEM_KERNELS=torch` forces the reference. Prefill over
cached KV has no Triton kernel: on CUDA it runs PyTorch's fused attention (prefill_attention.py).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from tandem_kernels import cpu_extension, lora_reference, reference
from tandem_kernels.lora_reference import lora_token_groups, lora_token_tiles
from tandem_kernels.prefill_attention import paged_prefill_attention as _fused_paged_prefill_attention
from tandem_kernels.reference import DecodeBucket, plan_decode_buckets

try:
    import triton
except ImportError:  # Triton is optional: a CPU-only install runs the references.
    triton = None

# Import the launchers eagerly under private names. Importing a submodule binds it as an
# attribute of this package the first time, so a lazy import of `tandem_kernels.store_kvcache`
# would overwrite the public `store_kvcache` function defined below.
if triton is not None:
    from tandem_kernels.fused_ops import rms_norm as _triton_rms_norm
    from tandem_kernels.fused_ops import rotary as _triton_rotary
    from tandem_kernels.fused_ops import silu_and_mul as _triton_silu_and_mul
    from tandem_kernels.lora import lora_apply_begin as _triton_lora_apply_begin
    from tandem_kernels.lora import lora_apply_finish as _triton_lora_apply_finish
    from tandem_kernels.lora import lora_expand as _triton_lora_expand
    from tandem_kernels.lora import lora_shrink as _triton_lora_shrink
    from tandem_kernels.paged_decode_attention import (
        paged_decode_attention as _triton_paged_decode_attention,
    )
    from tandem_kernels.store_kvcache import store_kvcache as _triton_store_kvcache
else:
    _triton_paged_decode_attention = None
    _triton_store_kvcache = None
    _triton_rms_norm = None
    _triton_rotary = None
    _triton_silu_and_mul = None
    _triton_lora_shrink = None
    _triton_lora_expand = None
    _triton_lora_apply_begin = None
    _triton_lora_apply_finish = None

__all__ = [
    "DecodeBucket",
    "cpu_ops_serve",
    "gathered_attention",
    "lora_apply",
    "lora_apply_begin",
    "lora_apply_finish",
    "lora_expand",
    "lora_reference",
    "lora_shrink",
    "lora_token_groups",
    "lora_token_tiles",
    "paged_decode_attention",
    "paged_prefill_attention",
    "plan_decode_buckets",
    "reference",
    "rms_norm",
    "rotary",
    "silu_and_mul",
    "store_kvcache",
    "triton_available",
    "uses_triton",
]

_BACKENDS = ("", "auto", "triton", "torch")


def triton_available() -> bool:
    """Whether the Triton launchers imported."""
    return triton is not None


def uses_triton(device: torch.device) -> bool:
    """Whether ops on `device` run the Triton kernels (else the torch references)."""
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


def _cpu_ops(*tensors: torch.Tensor) -> Any:
    """The C++ CPU ops (cpu_extension) when they serve these tensors (CPU float32, the backend not
    forced to the reference) and are loaded, else None. Never builds them: a call must not stall
    for a compile, so the engine loads them at start-up (`cpu_ops_serve`)."""
    if os.environ.get("TANDEM_KERNELS", "") == "torch":
        return None
    if all(t.device.type == "cpu" and t.dtype == torch.float32 and t.stride(-1) == 1 for t in tensors):
        return cpu_extension.loaded()
    return None


def cpu_ops_serve(dtype: torch.dtype) -> bool:
    """Whether CPU tensors of this dtype run the C++ ops; loads (or builds) them now, so a caller
    pays that at start-up rather than in its first step."""
    if os.environ.get("TANDEM_KERNELS", "") != "torch" and dtype == torch.float32:
        cpu_extension.load()
    probe = torch.empty(1, dtype=dtype)
    return _cpu_ops(probe) is not None


def store_kvcache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write each token's key and value into its cache slot, in place."""
    if uses_triton(k_cache.device):
        _triton_store_kvcache(key, value, k_cache, v_cache, slot_mapping)
    elif (ops := _cpu_ops(key, value, k_cache, v_cache)) is not None and slot_mapping.dtype == torch.int64:
        ops.store_kvcache(key, value, k_cache, v_cache, slot_mapping)
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
    if uses_triton(q.device):
        return _triton_paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)
    ops = _cpu_ops(q, k_cache, v_cache)
    if ops is not None and _cpp_decode_fits(ops, q, k_cache, v_cache, block_tables, context_lens):
        return ops.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)
    return reference.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)


def _cpp_decode_fits(
    ops: Any,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
) -> bool:
    """Whether the C++ decode attention takes these inputs: its shape limits (exported by the
    module, decode_cpu.cpp), whole caches and int32 index tensors. Anything else is the reference's,
    which takes any layout, rather than the op's error."""
    d, group = q.size(-1), q.size(1) // k_cache.size(2)
    return (
        d % ops.DECODE_HEAD_MULTIPLE == 0
        and d <= ops.DECODE_MAX_HEAD_DIM
        and group <= ops.DECODE_MAX_GROUP
        and k_cache.is_contiguous()
        and v_cache.is_contiguous()
        and all(
            t.device.type == "cpu" and t.dtype == torch.int32 and t.is_contiguous()
            for t in (block_tables, context_lens)
        )
    )


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Llama's RMSNorm of x [T, N]; with `residual`, of x + residual, returning (out, x + residual)."""
    if uses_triton(x.device):
        return _triton_rms_norm(x, weight, eps, residual)
    cpu_f32 = (x, weight) if residual is None else (x, weight, residual)
    if x.dim() == 2 and (ops := _cpu_ops(*cpu_f32)) is not None:
        # One row with the residual add: 4 us, against 17 for ATen's rms_norm and 39 for the
        # reference's six ops (2-core Xeon); a SmolLM2 step has 61 norms.
        out, h = ops.rms_norm(x, weight, eps, residual)
        return out if residual is None else (out, h)
    if os.environ.get("TANDEM_KERNELS", "") != "torch" and all(
        t.device.type == "cpu" and t.dtype == torch.float32 for t in cpu_f32
    ):
        # Without the C++ op, ATen's rms_norm: the reference's float32 arithmetic bit for bit, in
        # one call where the reference makes six.
        if residual is None:
            return torch.nn.functional.rms_norm(x, x.shape[-1:], weight, eps)
        x = x + residual
        return torch.nn.functional.rms_norm(x, x.shape[-1:], weight, eps), x
    return reference.rms_norm(x, weight, eps, residual)


def rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, heads, D] and k [T, kv_heads, D] rotated by cos, sin [T, 1, D] (rotate-half layout)."""
    if uses_triton(q.device):
        return _triton_rotary(q, k, cos, sin)
    if (ops := _cpu_ops(q, k, cos, sin)) is not None:
        return ops.rotary(q, cos, sin), ops.rotary(k, cos, sin)  # the reference's arithmetic, bit for bit
    return reference.rotary(q, k, cos, sin)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for gate_up = [gate | up] along the last dimension: [T, 2I] -> [T, I]."""
    if uses_triton(gate_up.device):
        return _triton_silu_and_mul(gate_up)
    if gate_up.dim() == 2 and (ops := _cpu_ops(gate_up)) is not None:
        return ops.silu_and_mul(gate_up)
    return reference.silu_and_mul(gate_up)


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor | Sequence[int],
    context_lens: torch.Tensor | Sequence[int],
    scale: float,
) -> torch.Tensor:
    """Causal attention for packed query chunks whose KV is already cached; returns q's shape.
    `cu_seqlens_q` and `context_lens` may be host lists (no sync to read them)."""
    args = (q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale)
    if q.device.type == "cuda" and os.environ.get("TANDEM_KERNELS", "").lower() != "torch":
        # PyTorch's fused (flash) attention over the gathered pages: no Triton kernel of our own.
        return _fused_paged_prefill_attention(*args)
    return reference.paged_prefill_attention(*args)


def gathered_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_blocks: torch.Tensor,
    cu_seqlens_q: list[int],
    context_lens: list[int],
    scale: float,
    decode_buckets: Sequence[DecodeBucket] = (),
) -> torch.Tensor:
    """Causal attention for packed chunks (decodes and prefills alike) over KV gathered by block.

    The CPU path: one exact gather per layer, padded only to whole blocks; decoding sequences of
    similar lengths batched together (`plan_decode_buckets`, once per step). GPUs use the paged
    kernels instead.
    """
    return reference.gathered_attention(
        q, k_cache, v_cache, kv_blocks, cu_seqlens_q, context_lens, scale, decode_buckets
    )


def lora_shrink(
    x: torch.Tensor,
    pool: torch.Tensor,
    a_offsets: torch.Tensor,
    ranks: torch.Tensor,
    token_indices: torch.Tensor,
    group_offsets: torch.Tensor,
    group_slots: torch.Tensor,
    max_rank: int,
) -> torch.Tensor:
    """y[t, :rank] = x[t] @ A[slot].T for every grouped token; returns [num_tokens, max_rank] float32."""
    args = (x, pool, a_offsets, ranks, token_indices, group_offsets, group_slots, max_rank)
    if uses_triton(x.device):
        return _triton_lora_shrink(*args)
    return lora_reference.lora_shrink(*args)


def lora_expand(
    y: torch.Tensor,
    pool: torch.Tensor,
    b_offsets: torch.Tensor,
    ranks: torch.Tensor,
    token_indices: torch.Tensor,
    group_offsets: torch.Tensor,
    group_slots: torch.Tensor,
    out: torch.Tensor,
    scaling: torch.Tensor,
    out_offset: int,
    hidden_out: int,
    y_offsets: torch.Tensor | None = None,
) -> None:
    """out[t, out_offset:out_offset + hidden_out] += scaling[slot] * y[t, cols] @ B[slot].T, in place."""
    args = (
        y,
        pool,
        b_offsets,
        ranks,
        token_indices,
        group_offsets,
        group_slots,
        out,
        scaling,
        out_offset,
        hidden_out,
        y_offsets,
    )
    if uses_triton(out.device):
        _triton_lora_expand(*args)
    else:
        lora_reference.lora_expand(*args)


def lora_apply(
    x: torch.Tensor,
    pool: torch.Tensor,
    a_offsets: torch.Tensor,
    total_ranks: torch.Tensor,
    token_indices: torch.Tensor,
    group_offsets: torch.Tensor,
    group_slots: torch.Tensor,
    max_rank: int,
    out: torch.Tensor,
    b_offsets: torch.Tensor,
    ranks: torch.Tensor,
    y_offsets: torch.Tensor,
    scaling: torch.Tensor,
    parts: Sequence[tuple[int, int]],
    tiles: torch.Tensor | None = None,
) -> None:
    """One fused projection's LoRA, in place: lora_shrink over the stacked A, then lora_expand per part.

    Part p = parts[p] = (out_offset, hidden_out) expands with row p of b_offsets, ranks, y_offsets
    and scaling ([num_parts, num_slots] each); parts must not overlap. On a GPU this is two launches
    for up to 4 parts (the shrink writes split-K partials, one expand for every part sums them as it
    reads them); a third sums the partials first when re-reading them would cost more (long
    prefills), with the same bits, and each further 4 parts add an expand launch. `tiles`
    (`lora_token_tiles(group_offsets, len(token_indices))`) makes the launches' grids depend only on
    the metadata's shapes, as a CUDA graph needs; the result is the same.
    """
    lora_apply_begin(
        x,
        pool,
        a_offsets,
        total_ranks,
        token_indices,
        group_offsets,
        group_slots,
        max_rank,
        b_offsets,
        ranks,
        y_offsets,
        scaling,
        parts,
        tiles,
    ).finish(out)


def lora_apply_begin(
    x: torch.Tensor,
    pool: torch.Tensor,
    a_offsets: torch.Tensor,
    total_ranks: torch.Tensor,
    token_indices: torch.Tensor,
    group_offsets: torch.Tensor,
    group_slots: torch.Tensor,
    max_rank: int,
    b_offsets: torch.Tensor,
    ranks: torch.Tensor,
    y_offsets: torch.Tensor,
    scaling: torch.Tensor,
    parts: Sequence[tuple[int, int]],
    tiles: torch.Tensor | None = None,
) -> lora_reference.PendingLoRA:
    """`lora_apply` in two halves: the shrink now (it reads only x), the expand at `.finish(out)`.

    Between the two, out's own GEMM can run: on a GPU the engine launches the shrink on a side
    stream, concurrent with the base projection, and finishes on the main stream after it. The
    result is lora_apply's.
    """
    args = (
        x,
        pool,
        a_offsets,
        total_ranks,
        token_indices,
        group_offsets,
        group_slots,
        max_rank,
        b_offsets,
        ranks,
        y_offsets,
        scaling,
        parts,
        tiles,
    )
    if uses_triton(pool.device):
        return _triton_lora_apply_begin(*args)
    return lora_reference.lora_apply_begin(*args)


def lora_apply_finish(
    y: torch.Tensor,
    pool: torch.Tensor,
    total_ranks: torch.Tensor,
    token_indices: torch.Tensor,
    group_offsets: torch.Tensor,
    group_slots: torch.Tensor,
    max_rank: int,
    out: torch.Tensor,
    b_offsets: torch.Tensor,
    ranks: torch.Tensor,
    y_offsets: torch.Tensor,
    scaling: torch.Tensor,
    parts: Sequence[tuple[int, int]],
    tiles: torch.Tensor | None = None,
    max_part_rank: int | None = None,
) -> None:
    """`lora_apply`'s expands alone, in place, on a y computed elsewhere: one launch on a GPU.

    What it is for: the shrink folded into the base GEMM. With each adapter's stacked A rows
    appended to a projection's weight, x @ W_cat.T computes the projection and every adapter's
    x @ A.T at once (the extra rows cost their bytes, about 0.3% of a Llama-3-8B layer's for one
    rank-16 adapter), and this adds the deltas into the projection's columns. Slot s's columns of
    y are then [base_s, base_s + total_s): pass y_offsets + base_s and total_ranks = base_s + total_s.
    """
    args = (y, pool, total_ranks, token_indices, group_offsets, group_slots, max_rank, out)
    tables = (b_offsets, ranks, y_offsets, scaling, parts, tiles, max_part_rank)
    if uses_triton(pool.device):
        _triton_lora_apply_finish(*args, *tables)
    else:
        lora_reference.lora_apply_finish(*args, *tables)
