"""Triton kernels applying many LoRA adapters to one batch (grouped, Punica/S-LoRA style).

A batch mixes tokens of several adapters and tokens of none. Tokens are grouped by adapter, so
each adapter's weights are read once per tile of its tokens however many requests those come
from: a decode batch of 32 requests on 2 adapters is 2 groups, not 32 segments.

Shapes:
    x                   [num_tokens, hidden_in], rows contiguous (a column slice of a wider tensor is fine)
    lora_a              [num_slots, max_rank, hidden_in], adapter A matrices, zero-padded or not past rank
    lora_b              [num_slots, hidden_out, max_rank], adapter B matrices, likewise
    ranks               [num_slots] int32, rank of each slot, 1 <= rank <= max_rank; rows of lora_a
                        and columns of lora_b from the rank on are never read
    scaling             [num_slots] float32, lora_alpha / rank (PEFT), applied by expand
    token_indices       [num_lora_tokens] int64, rows of x / out that use an adapter, grouped by
                        adapter; each token at most once
    group_offsets       [num_groups + 1] int32, cumulative: group g owns
                        token_indices[group_offsets[g]:group_offsets[g + 1]] (empty groups allowed)
    group_slots         [num_groups] int32, the adapter slot of each group
    y (shrink output)   [num_tokens, max_rank] float32; zero for tokens in no group and past the rank
    out                 [num_tokens, >= out_offset + hidden_out]; expand adds into
                        out[:, out_offset:out_offset + hidden_out] for grouped tokens only
`tandem_kernels.lora_token_groups` builds the metadata from packed sequences.

Grid: (group, token tile, rank or output-column tile). The token-tile axis is sized for the
whole of token_indices, so no host sync is needed to find the longest group; tiles past the end
of their group return at once. Block sizes do not depend on the batch, so a token's result does
not depend on what it is batched with.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK_M = 16  # tokens per tile: decode groups are short, and tl.dot needs at least 16
_SHRINK_BLOCK_K = 64
_EXPAND_BLOCK_N = 64


def _rank_block(max_rank: int) -> int:
    # tl.dot needs at least 16 along every dimension; 64 keeps a rank-128 tile's registers in check.
    return min(64, max(16, triton.next_power_of_2(max_rank)))


@triton.jit
def _lora_shrink_kernel(
    x_ptr,
    lora_a_ptr,
    ranks_ptr,
    token_indices_ptr,
    group_offsets_ptr,
    group_slots_ptr,
    y_ptr,
    hidden_in,
    x_stride_t,
    a_stride_s,
    a_stride_r,
    y_stride_t,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    group = tl.program_id(0)
    first = tl.load(group_offsets_ptr + group) + tl.program_id(1) * BLOCK_M
    end = tl.load(group_offsets_ptr + group + 1)
    slot = tl.load(group_slots_ptr + group).to(tl.int64)
    rank = tl.load(ranks_ptr + slot)
    r_start = tl.program_id(2) * BLOCK_R
    # Past the group's tokens or the adapter's rank: y is already zero there.
    if first >= end or r_start >= rank:
        return

    offs_m = first + tl.arange(0, BLOCK_M)
    mask_m = offs_m < end
    tokens = tl.load(token_indices_ptr + offs_m, mask=mask_m, other=0)  # int64
    offs_r = r_start + tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tokens[:, None] * x_stride_t + offs_k[None, :]
    a_ptrs = lora_a_ptr + slot * a_stride_s + offs_r[:, None] * a_stride_r + offs_k[None, :]

    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for k in range(0, hidden_in, BLOCK_K):
        mask_k = k + offs_k < hidden_in
        x = tl.load(x_ptrs + k, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        a = tl.load(a_ptrs + k, mask=mask_r[:, None] & mask_k[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(a), acc, input_precision=DOT_PRECISION)

    y_ptrs = y_ptr + tokens[:, None] * y_stride_t + offs_r[None, :]
    tl.store(y_ptrs, acc, mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _lora_expand_kernel(
    y_ptr,
    lora_b_ptr,
    ranks_ptr,
    token_indices_ptr,
    group_offsets_ptr,
    group_slots_ptr,
    out_ptr,
    scaling_ptr,
    hidden_out,
    y_stride_t,
    b_stride_s,
    b_stride_n,
    out_stride_t,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    group = tl.program_id(0)
    first = tl.load(group_offsets_ptr + group) + tl.program_id(1) * BLOCK_M
    end = tl.load(group_offsets_ptr + group + 1)
    if first >= end:
        return
    slot = tl.load(group_slots_ptr + group).to(tl.int64)
    rank = tl.load(ranks_ptr + slot)
    scale = tl.load(scaling_ptr + slot)

    offs_m = first + tl.arange(0, BLOCK_M)
    mask_m = offs_m < end
    tokens = tl.load(token_indices_ptr + offs_m, mask=mask_m, other=0)  # int64
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < hidden_out
    offs_r = tl.arange(0, BLOCK_R)
    y_ptrs = y_ptr + tokens[:, None] * y_stride_t + offs_r[None, :]
    b_ptrs = lora_b_ptr + slot * b_stride_s + offs_n[:, None] * b_stride_n + offs_r[None, :]

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for r in range(0, rank, BLOCK_R):
        mask_r = r + offs_r < rank
        y = tl.load(y_ptrs + r, mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        b = tl.load(b_ptrs + r, mask=mask_n[:, None] & mask_r[None, :], other=0.0)
        # y is fp32; tensor cores want both operands in the weights' dtype.
        acc = tl.dot(y.to(b.dtype), tl.trans(b), acc, input_precision=DOT_PRECISION)

    # Each (token, column) belongs to one program, so the read-modify-write needs no atomics.
    out_ptrs = out_ptr + tokens[:, None] * out_stride_t + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    current = tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, (current + acc * scale).to(out_ptr.dtype.element_ty), mask=mask)


def _check_metadata(
    device: torch.device,
    num_slots: int,
    ranks: torch.Tensor,
    token_indices: torch.Tensor,
    group_offsets: torch.Tensor,
    group_slots: torch.Tensor,
) -> int:
    """Assert the shared metadata's shapes, dtypes and layout; returns num_groups."""
    assert ranks.shape == (num_slots,), (ranks.shape, num_slots)
    assert token_indices.dim() == 1, token_indices.shape
    assert group_slots.dim() == 1, group_slots.shape
    num_groups = group_slots.shape[0]
    assert group_offsets.shape == (num_groups + 1,), (group_offsets.shape, num_groups)
    for t in (ranks, group_offsets, group_slots):
        assert t.dtype == torch.int32, t.dtype
    assert token_indices.dtype == torch.int64, token_indices.dtype
    for t in (ranks, token_indices, group_offsets, group_slots):
        assert t.is_contiguous(), "LoRA metadata must be contiguous"
        assert t.device == device, (t.device, device)
    return num_groups


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs would otherwise go through TF32 on GPU and lose three decimal digits.
    return "ieee" if dtype == torch.float32 else "tf32"


def lora_shrink(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    ranks: torch.Tensor,
    token_indices: torch.Tensor,
    group_offsets: torch.Tensor,
    group_slots: torch.Tensor,
) -> torch.Tensor:
    """y[t] = x[t] @ lora_a[slot].T for every grouped token; returns [num_tokens, max_rank] float32."""
    num_tokens, hidden_in = x.shape
    num_slots, max_rank, a_hidden = lora_a.shape
    assert a_hidden == hidden_in, (lora_a.shape, x.shape)
    assert x.dtype == lora_a.dtype, (x.dtype, lora_a.dtype)
    assert x.stride(1) == 1, "x rows must be contiguous"
    assert lora_a.stride(2) == 1, "lora_a rows must be contiguous"
    num_groups = _check_metadata(x.device, num_slots, ranks, token_indices, group_offsets, group_slots)

    y = torch.zeros(num_tokens, max_rank, dtype=torch.float32, device=x.device)
    num_lora_tokens = token_indices.shape[0]
    if num_groups == 0 or num_lora_tokens == 0:
        return y
    block_r = _rank_block(max_rank)
    grid = (num_groups, triton.cdiv(num_lora_tokens, _BLOCK_M), triton.cdiv(max_rank, block_r))
    _lora_shrink_kernel[grid](
        x,
        lora_a,
        ranks,
        token_indices,
        group_offsets,
        group_slots,
        y,
        hidden_in,
        x.stride(0),
        lora_a.stride(0),
        lora_a.stride(1),
        y.stride(0),
        BLOCK_M=_BLOCK_M,
        BLOCK_R=block_r,
        BLOCK_K=_SHRINK_BLOCK_K,
        DOT_PRECISION=_dot_precision(x.dtype),
    )
    return y


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
    num_tokens, y_rank = y.shape
    num_slots, hidden_out, max_rank = lora_b.shape
    assert y_rank == max_rank, (y.shape, lora_b.shape)
    assert out.dim() == 2 and out.shape[0] == num_tokens, (out.shape, num_tokens)
    assert 0 <= out_offset and out_offset + hidden_out <= out.shape[1], (out_offset, hidden_out, out.shape)
    assert y.dtype == torch.float32, y.dtype
    assert out.dtype == lora_b.dtype, (out.dtype, lora_b.dtype)
    assert scaling.shape == (num_slots,) and scaling.dtype == torch.float32, (scaling.shape, scaling.dtype)
    assert y.stride(1) == 1, "y rows must be contiguous"
    assert lora_b.stride(2) == 1, "lora_b rows must be contiguous"
    assert out.stride(1) == 1, "out rows must be contiguous"
    assert scaling.is_contiguous() and scaling.device == out.device == y.device
    num_groups = _check_metadata(y.device, num_slots, ranks, token_indices, group_offsets, group_slots)

    num_lora_tokens = token_indices.shape[0]
    if num_groups == 0 or num_lora_tokens == 0:
        return
    target = out[:, out_offset:]  # the kernel writes columns [0, hidden_out) of this view
    grid = (num_groups, triton.cdiv(num_lora_tokens, _BLOCK_M), triton.cdiv(hidden_out, _EXPAND_BLOCK_N))
    _lora_expand_kernel[grid](
        y,
        lora_b,
        ranks,
        token_indices,
        group_offsets,
        group_slots,
        target,
        scaling,
        hidden_out,
        y.stride(0),
        lora_b.stride(0),
        lora_b.stride(1),
        out.stride(0),
        BLOCK_M=_BLOCK_M,
        BLOCK_N=_EXPAND_BLOCK_N,
        BLOCK_R=_rank_block(max_rank),
        DOT_PRECISION=_dot_precision(lora_b.dtype),
    )
