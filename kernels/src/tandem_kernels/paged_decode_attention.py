"""Triton kernel for decode attention over a paged KV cache.

Shapes:
    q                   [num_seqs, num_heads, head_dim], the newest token of each sequence
    k_cache, v_cache    [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables        [num_seqs, max_blocks] int32, rows padded with any valid block id
    context_lens        [num_seqs] int32, KV tokens each sequence attends to (>= 1)
    out                 [num_seqs, num_heads, head_dim], q's dtype
GQA: query head h reads kv head h // (num_heads // num_kv_heads).

One program per (sequence, kv head) serves every query head of the group, so each KV
page is read from memory once per group rather than once per query head.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def _paged_decode_attention_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    context_lens_ptr,
    out_ptr,
    qk_scale_log2,
    q_stride_s,
    q_stride_h,
    out_stride_s,
    out_stride_h,
    cache_stride_b,
    cache_stride_s,
    cache_stride_h,
    block_tables_stride_s,
    GROUP_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    context_len = tl.load(context_lens_ptr + seq)

    # The group is padded to a power of two (and to tl.dot's minimum of 16 rows); padded rows
    # load zeros and are never stored.
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_SIZE)
    mask_g = offs_g < GROUP_SIZE
    mask_d = offs_d < HEAD_DIM
    q_heads = kv_head * GROUP_SIZE + offs_g
    q_mask = mask_g[:, None] & mask_d[None, :]
    q = tl.load(
        q_ptr + seq * q_stride_s + q_heads[:, None] * q_stride_h + offs_d[None, :], mask=q_mask, other=0.0
    )

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)

    kv_offs = offs_n[:, None] * cache_stride_s + kv_head * cache_stride_h + offs_d[None, :]
    # Every page visited holds at least one live position because context_len >= 1, so m_i is
    # finite after the first page and the rescaling below never computes inf - inf.
    for page in range(tl.cdiv(context_len, BLOCK_SIZE)):
        block_id = tl.load(block_tables_ptr + seq * block_tables_stride_s + page).to(tl.int64)
        live = page * BLOCK_SIZE + offs_n < context_len
        kv_mask = live[:, None] & mask_d[None, :]
        k = tl.load(k_cache_ptr + block_id * cache_stride_b + kv_offs, mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + block_id * cache_stride_b + kv_offs, mask=kv_mask, other=0.0)

        # Scores in the log2 domain: exp2 is the native instruction, the scale already holds log2(e).
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2  # [BLOCK_G, BLOCK_SIZE]
        s = tl.where(live[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    out_offs = seq * out_stride_s + q_heads[:, None] * out_stride_h + offs_d[None, :]
    tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=q_mask)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attend one query token per sequence to its paged KV; returns [num_seqs, num_heads, head_dim]."""
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, cache_dim = k_cache.shape
    assert v_cache.shape == k_cache.shape, (v_cache.shape, k_cache.shape)
    assert cache_dim == head_dim, (k_cache.shape, q.shape)
    assert num_heads % num_kv_heads == 0, (num_heads, num_kv_heads)
    assert block_tables.dim() == 2 and block_tables.shape[0] == num_seqs, (block_tables.shape, num_seqs)
    assert context_lens.shape == (num_seqs,), (context_lens.shape, num_seqs)
    assert q.dtype == k_cache.dtype == v_cache.dtype, (q.dtype, k_cache.dtype, v_cache.dtype)
    assert block_tables.dtype == torch.int32 and context_lens.dtype == torch.int32
    assert q.stride(-1) == 1, "q head_dim must be contiguous"
    # The kernel indexes both caches with k_cache's strides.
    assert k_cache.stride() == v_cache.stride(), (k_cache.stride(), v_cache.stride())
    assert k_cache.stride(-1) == 1, "cache head_dim must be contiguous"
    assert block_tables.stride(-1) == 1 and context_lens.is_contiguous()
    # tl.dot needs at least 16 along every dimension; a page is one tile of the KV loop.
    assert block_size >= 16 and block_size & (block_size - 1) == 0, f"block_size {block_size}"

    out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    group_size = num_heads // num_kv_heads
    _paged_decode_attention_kernel[(num_seqs, num_kv_heads)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        out,
        scale * _LOG2E,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        GROUP_SIZE=group_size,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_G=max(16, triton.next_power_of_2(group_size)),
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        # fp32 inputs would otherwise go through TF32 on GPU and lose three decimal digits.
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    return out
