"""Triton kernel for decode attention over a paged KV cache.

Shapes:
    q                   [num_seqs, num_heads, head_dim], the newest token of each sequence
    k_cache, v_cache    [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables        [num_seqs, max_blocks] int32, rows padded with any valid block id
    context_lens        [num_seqs] int32, KV tokens each sequence attends to (>= 1)
    out                 [num_seqs, num_heads, head_dim], q's dtype
GQA: query head h reads kv head h // (num_heads // num_kv_heads).

One program per (sequence, kv head, context partition) serves every query head of the group,
so each KV page is read from memory once per group rather than once per query head. A program
walks its partition in tiles of BLOCK_N tokens that span several pages (each token's block id is
gathered from the table), so the loads are large enough to keep HBM busy. When there are too few
(sequence, kv head) pairs to fill the GPU, the context is split into partitions of PARTITION
tokens whose partial softmax results (running max, sum and weighted values) a second kernel
combines, as in flash-decoding / vLLM's paged attention v2. The partition count comes from the
block table's width, not from context_lens, so the launch needs no host sync and a CUDA graph
can capture it.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634
_BLOCK_N = 64  # KV tokens per tile
_PARTITION = 512  # KV tokens per split-K partition (a multiple of _BLOCK_N)
_WHOLE_CONTEXT = 1 << 30  # the partition size of an unsplit launch: one program takes it all


@triton.jit
def _paged_decode_attention_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    context_lens_ptr,
    out_ptr,
    part_m_ptr,
    part_l_ptr,
    part_acc_ptr,
    qk_scale_log2,
    q_stride_s,
    q_stride_h,
    out_stride_s,
    out_stride_h,
    cache_stride_b,
    cache_stride_s,
    cache_stride_h,
    block_tables_stride_s,
    num_heads,
    max_parts,
    GROUP_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PARTITION: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq)
    start = part * PARTITION
    # Partitions past the context do nothing; the combine step only reads the live ones.
    if start >= context_len:
        return
    end = tl.minimum(start + PARTITION, context_len)

    # The group is padded to a power of two (and to tl.dot's minimum of 16 rows); padded rows
    # load zeros and are never stored.
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
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

    table = block_tables_ptr + seq * block_tables_stride_s
    head_offs = kv_head * cache_stride_h + offs_d[None, :]
    # Every tile visited holds at least one live position (start < end), so m_i is finite after
    # the first tile and the rescaling below never computes inf - inf.
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n
        live = pos < end
        block_id = tl.load(table + pos // BLOCK_SIZE, mask=live, other=0).to(tl.int64)
        in_page = (pos % BLOCK_SIZE)[:, None] * cache_stride_s
        kv_offs = block_id[:, None] * cache_stride_b + in_page + head_offs
        kv_mask = live[:, None] & mask_d[None, :]
        k = tl.load(k_cache_ptr + kv_offs, mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + kv_offs, mask=kv_mask, other=0.0)

        # Scores in the log2 domain: exp2 is the native instruction, the scale already holds log2(e).
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2  # [BLOCK_G, BLOCK_N]
        s = tl.where(live[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    if SPLIT:
        # Partial results, indexed [seq, head, part]: the combine kernel rescales and sums them.
        row = (seq * num_heads + q_heads) * max_parts + part
        tl.store(part_m_ptr + row, m_i, mask=mask_g)
        tl.store(part_l_ptr + row, l_i, mask=mask_g)
        tl.store(part_acc_ptr + row[:, None] * BLOCK_D + offs_d[None, :], acc, mask=q_mask)
    else:
        out = acc / l_i[:, None]
        out_offs = seq * out_stride_s + q_heads[:, None] * out_stride_h + offs_d[None, :]
        tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=q_mask)


@triton.jit
def _combine_partitions_kernel(
    context_lens_ptr,
    part_m_ptr,
    part_l_ptr,
    part_acc_ptr,
    out_ptr,
    out_stride_s,
    out_stride_h,
    num_heads,
    max_parts,
    HEAD_DIM: tl.constexpr,
    PARTITION: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    num_parts = tl.cdiv(tl.load(context_lens_ptr + seq), PARTITION)
    offs_p = tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    mask_p = offs_p < num_parts
    row = (seq * num_heads + head) * max_parts + offs_p
    m = tl.load(part_m_ptr + row, mask=mask_p, other=float("-inf"))
    l_part = tl.load(part_l_ptr + row, mask=mask_p, other=0.0)
    m_max = tl.max(m, axis=0)
    w = tl.where(mask_p, tl.exp2(m - m_max), 0.0)
    acc = tl.load(part_acc_ptr + row[:, None] * BLOCK_D + offs_d[None, :], mask=mask_p[:, None], other=0.0)
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l_part * w, axis=0)
    tl.store(out_ptr + seq * out_stride_s + head * out_stride_h + offs_d, out, mask=offs_d < HEAD_DIM)


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _split(num_programs: int, max_parts: int, device: torch.device) -> bool:
    """Split the context when the (sequence, kv head) pairs alone would leave SMs idle."""
    if max_parts <= 1:
        return False
    if device.type != "cuda":
        return True  # the interpreter: exercise the split path whenever it applies
    return num_programs < 2 * _num_sms(device.index or 0)


def adaptive_partition(num_pairs: int, max_context: int, num_sms: int, programs_per_sm: int = 4) -> int:
    """A partition size (a power of two from _BLOCK_N to _PARTITION) that gives `num_pairs`
    (sequence, kv head) pairs about `programs_per_sm` programs per SM over `max_context` tokens.

    A candidate for the split-K heuristic, not yet the default: _PARTITION's 512 tokens leave a
    batch of one 8K-token sequence (8 kv heads) 128 programs that each walk eight tiles one after
    another, 8% of copy bandwidth on an H200 (SDPA on dense KV: 35%). bench_gpu's
    attention_partitions section measures it against fixed sizes."""
    parts = -(-programs_per_sm * num_sms // max(num_pairs, 1))
    partition = triton.next_power_of_2(max(1, -(-max_context // parts)))
    return min(max(partition, _BLOCK_N), _PARTITION)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    partition_size: int | None = None,
) -> torch.Tensor:
    """Attend one query token per sequence to its paged KV; returns [num_seqs, num_heads, head_dim].

    `partition_size` (a multiple of 64) overrides the split-K heuristic: the context is split
    into partitions of that many tokens whenever that gives more than one."""
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
    assert block_size & (block_size - 1) == 0, f"block_size {block_size} must be a power of two"
    partition = partition_size or _PARTITION
    assert partition % _BLOCK_N == 0, f"partition_size {partition} must be a multiple of {_BLOCK_N}"

    out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    group_size = num_heads // num_kv_heads
    block_d = max(16, triton.next_power_of_2(head_dim))
    # The table's width bounds every context: no need to read context_lens on the host.
    max_parts = triton.cdiv(block_tables.shape[1] * block_size, partition)
    if partition_size is not None:
        split = max_parts > 1
    else:
        split = _split(num_seqs * num_kv_heads, max_parts, q.device)
    parts = max_parts if split else 1
    if split:
        part_m = torch.empty(num_seqs, num_heads, max_parts, dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty(num_seqs, num_heads, max_parts, block_d, dtype=torch.float32, device=q.device)
    else:
        part_m = part_l = part_acc = out  # never touched
    _paged_decode_attention_kernel[(num_seqs, num_kv_heads, parts)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        out,
        part_m,
        part_l,
        part_acc,
        scale * _LOG2E,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        num_heads,
        max_parts,
        GROUP_SIZE=group_size,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_N=_BLOCK_N,
        PARTITION=partition if split else _WHOLE_CONTEXT,
        BLOCK_G=max(16, triton.next_power_of_2(group_size)),
        BLOCK_D=block_d,
        SPLIT=split,
        # fp32 inputs would otherwise go through TF32 on GPU and lose three decimal digits.
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    if split:
        _combine_partitions_kernel[(num_seqs, num_heads)](
            context_lens,
            part_m,
            part_l,
            part_acc,
            out,
            out.stride(0),
            out.stride(1),
            num_heads,
            max_parts,
            HEAD_DIM=head_dim,
            PARTITION=partition,
            BLOCK_P=max(2, triton.next_power_of_2(max_parts)),
            BLOCK_D=block_d,
        )
    return out
