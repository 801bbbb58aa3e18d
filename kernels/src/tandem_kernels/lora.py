"""Triton kernels applying many LoRA adapters to one batch (grouped, Punica/S-LoRA style).

A batch mixes tokens of several adapters and tokens of none. Tokens are grouped by adapter, so
each adapter's weights are read once per tile of its tokens however many requests those come
from: a decode batch of 32 requests on 2 adapters is 2 groups, not 32 segments.

Adapter weights live in one flat pool (S-LoRA unified paging: a 1-D view of the KV-cache pool),
each matrix at its own element offset and at the adapter's own rank, without padding:

    x                   [num_tokens, hidden_in], rows contiguous (a column slice of a wider tensor is fine)
    pool                [pool_size], contiguous; any float dtype (x and out may differ from it)
    a_offsets           [num_slots] int64: slot s's A is pool[a_offsets[s]:][:ranks[s] * hidden_in]
                        as [ranks[s], hidden_in], row-major
    b_offsets           [num_slots] int64: slot s's B is pool[b_offsets[s]:][:hidden_out * ranks[s]]
                        as [hidden_out, ranks[s]], row-major (row stride = that rank)
    ranks               [num_slots] int32, 0 <= rank <= max_rank; rank 0: no LoRA on this module
                        for that slot, its group is skipped
    scaling             [num_slots] float32, lora_alpha / rank (PEFT), applied by expand
    y_offsets           [num_slots] int64 or None (zeros): expand reads slot s's rank columns of y
                        from y_offsets[s] on (one shrink over fused A rows, one expand per part)
    token_indices       [num_lora_tokens] int64, rows of x / out that use an adapter, grouped by
                        adapter; each token at most once
    group_offsets       [num_groups + 1] int32, cumulative: group g owns
                        token_indices[group_offsets[g]:group_offsets[g + 1]] (empty groups allowed)
    group_slots         [num_groups] int32, the adapter slot of each group
    y (shrink output)   [num_tokens, max_rank] float32; zero for tokens in no group and past the rank
    out                 [num_tokens, >= out_offset + hidden_out]; expand adds into
                        out[:, out_offset:out_offset + hidden_out] for grouped tokens only
`tandem_kernels.lora_token_groups` builds the group metadata from packed sequences.

Grid: (group, token tile, rank tile x split of hidden_in) for shrink, (group, token tile,
output-column tile) for expand. The token-tile axis is sized for the whole of token_indices, so
no host sync is needed to find the longest group; tiles past the end of their group, and groups
of rank-0 slots, return at once. Block sizes and splits depend only on max_rank and hidden_in
(shrink) or y's width (expand), not on the batch, so a token's result does not depend on what
it is batched with.

Products accumulate in fp32. With x (shrink) or out (expand) in the pool's dtype, tl.dot takes
its operands in that dtype (expand rounds y to it, for the tensor cores); with mixed dtypes, e.g. a
bf16 pool under fp32 activations, both operands are upcast to fp32.

The launchers check shapes and dtypes without a host sync. The data-dependent checks (ranks
within max_rank, y's columns, weights inside the pool, slots in range) need the metadata's values,
so they run only where it is on the CPU (as under TRITON_INTERPRET); on a GPU the caller vouches
for them. Even so, the kernels clamp ranks to max_rank and y's columns to its width, so a bad rank
or y offset cannot reach outside y.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tandem_kernels.lora_reference import check_expand_args, check_shrink_args, check_values

_BLOCK_M = 16  # tokens per tile: decode groups are short, and tl.dot needs at least 16
_SHRINK_BLOCK_K = 64
_SHRINK_K_CHUNK = 512  # hidden_in columns per split-K program (a multiple of _SHRINK_BLOCK_K)
_EXPAND_BLOCK_N = 64


def _rank_block(max_rank: int) -> int:
    # tl.dot needs at least 16 along every dimension; 64 keeps a rank-128 tile's registers in check.
    return min(64, max(16, triton.next_power_of_2(max_rank)))


@triton.jit
def _lora_shrink_kernel(
    x_ptr,
    pool_ptr,
    a_offsets_ptr,
    ranks_ptr,
    token_indices_ptr,
    group_offsets_ptr,
    group_slots_ptr,
    y_ptr,
    hidden_in,
    max_rank,
    x_stride_t,
    y_stride_t,
    y_stride_split,
    num_rank_tiles,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    K_CHUNK: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    group = tl.program_id(0)
    first = tl.load(group_offsets_ptr + group) + tl.program_id(1) * BLOCK_M
    end = tl.load(group_offsets_ptr + group + 1)
    slot = tl.load(group_slots_ptr + group).to(tl.int64)
    rank = tl.minimum(tl.load(ranks_ptr + slot), max_rank)
    split = tl.program_id(2) // num_rank_tiles
    r_start = (tl.program_id(2) % num_rank_tiles) * BLOCK_R
    # Past the group's tokens or the adapter's rank (all of it for rank 0): y is already zero there.
    if first >= end or r_start >= rank:
        return

    offs_m = first + tl.arange(0, BLOCK_M)
    mask_m = offs_m < end
    tokens = tl.load(token_indices_ptr + offs_m, mask=mask_m, other=0)  # int64
    offs_r = r_start + tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tokens[:, None] * x_stride_t + offs_k[None, :]
    a_offset = tl.load(a_offsets_ptr + slot)  # int64: the pool may hold more than 2**31 elements
    a_ptrs = pool_ptr + a_offset + offs_r[:, None] * hidden_in + offs_k[None, :]

    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    k_start = split * K_CHUNK
    k_end = tl.minimum(k_start + K_CHUNK, hidden_in)
    for k in range(k_start, k_end, BLOCK_K):
        mask_k = k + offs_k < k_end
        x = tl.load(x_ptrs + k, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        a = tl.load(a_ptrs + k, mask=mask_r[:, None] & mask_k[None, :], other=0.0)
        if UPCAST:  # x and the pool differ in dtype: multiply in fp32
            x = x.to(tl.float32)
            a = a.to(tl.float32)
        acc = tl.dot(x, tl.trans(a), acc, input_precision=DOT_PRECISION)

    y_ptrs = y_ptr + split * y_stride_split + tokens[:, None] * y_stride_t + offs_r[None, :]
    tl.store(y_ptrs, acc, mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _lora_expand_kernel(
    y_ptr,
    pool_ptr,
    b_offsets_ptr,
    y_offsets_ptr,
    ranks_ptr,
    token_indices_ptr,
    group_offsets_ptr,
    group_slots_ptr,
    out_ptr,
    scaling_ptr,
    hidden_out,
    y_width,
    y_stride_t,
    out_stride_t,
    HAS_Y_OFFSETS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    group = tl.program_id(0)
    first = tl.load(group_offsets_ptr + group) + tl.program_id(1) * BLOCK_M
    end = tl.load(group_offsets_ptr + group + 1)
    slot = tl.load(group_slots_ptr + group).to(tl.int64)
    rank = tl.load(ranks_ptr + slot)
    if first >= end or rank <= 0:
        return
    scale = tl.load(scaling_ptr + slot)
    b_offset = tl.load(b_offsets_ptr + slot)  # int64
    if HAS_Y_OFFSETS:
        y_offset = tl.load(y_offsets_ptr + slot)
    else:
        y_offset = 0

    offs_m = first + tl.arange(0, BLOCK_M)
    mask_m = offs_m < end
    tokens = tl.load(token_indices_ptr + offs_m, mask=mask_m, other=0)  # int64
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < hidden_out
    offs_r = tl.arange(0, BLOCK_R)
    y_ptrs = y_ptr + tokens[:, None] * y_stride_t + y_offset + offs_r[None, :]
    b_ptrs = pool_ptr + b_offset + offs_n[:, None] * rank + offs_r[None, :]

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for r in range(0, rank, BLOCK_R):
        mask_r = r + offs_r < rank
        # Never past y's row, even for columns the host could not check.
        mask_y = mask_r & (y_offset + r + offs_r < y_width)
        y = tl.load(y_ptrs + r, mask=mask_m[:, None] & mask_y[None, :], other=0.0)
        b = tl.load(b_ptrs + r, mask=mask_n[:, None] & mask_r[None, :], other=0.0)
        if UPCAST:  # out and the pool differ in dtype: multiply in fp32
            b = b.to(tl.float32)
        # y is fp32; tensor cores want both operands in the weights' dtype.
        acc = tl.dot(y.to(b.dtype), tl.trans(b), acc, input_precision=DOT_PRECISION)

    # Each (token, column) belongs to one program, so the read-modify-write needs no atomics.
    out_ptrs = out_ptr + tokens[:, None] * out_stride_t + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    current = tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, (current + acc * scale).to(out_ptr.dtype.element_ty), mask=mask)


def _check_layout(**tensors: torch.Tensor | None) -> None:
    """The kernels index the metadata as dense vectors."""
    for name, t in tensors.items():
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs would otherwise go through TF32 on GPU and lose three decimal digits.
    return "ieee" if dtype == torch.float32 else "tf32"


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
    check_shrink_args(x, pool, a_offsets, ranks, token_indices, group_offsets, group_slots, max_rank)
    if x.stride(1) != 1:
        raise ValueError("x rows must be contiguous")
    _check_layout(
        a_offsets=a_offsets,
        ranks=ranks,
        token_indices=token_indices,
        group_offsets=group_offsets,
        group_slots=group_slots,
    )
    num_tokens, hidden_in = x.shape
    if pool.device.type == "cpu":  # free here; on a GPU it would cost a host sync
        check_values(
            pool,
            a_offsets,
            ranks,
            hidden_in,
            None,
            max_rank,
            token_indices,
            group_offsets,
            group_slots,
            "max_rank",
        )

    num_groups = group_slots.shape[0]
    num_lora_tokens = token_indices.shape[0]
    # Split-K: a decode batch has few (group, token tile) pairs, and each would otherwise walk all
    # of hidden_in alone (14336 for a Llama-3-8B down projection) while most SMs idle. Each split
    # writes its own partial y; summing them is one small deterministic kernel (no atomics, so a
    # token's result stays independent of its batch and of scheduling).
    splits = triton.cdiv(hidden_in, _SHRINK_K_CHUNK) if hidden_in else 1
    y = torch.zeros(splits, num_tokens, max_rank, dtype=torch.float32, device=x.device)
    if num_groups == 0 or num_lora_tokens == 0 or max_rank == 0 or hidden_in == 0:
        return y[0]
    block_r = _rank_block(max_rank)
    rank_tiles = triton.cdiv(max_rank, block_r)
    upcast = x.dtype != pool.dtype
    grid = (num_groups, triton.cdiv(num_lora_tokens, _BLOCK_M), rank_tiles * splits)
    _lora_shrink_kernel[grid](
        x,
        pool,
        a_offsets,
        ranks,
        token_indices,
        group_offsets,
        group_slots,
        y,
        hidden_in,
        max_rank,
        x.stride(0),
        y.stride(1),
        y.stride(0),
        rank_tiles,
        BLOCK_M=_BLOCK_M,
        BLOCK_R=block_r,
        BLOCK_K=_SHRINK_BLOCK_K,
        K_CHUNK=_SHRINK_K_CHUNK,
        UPCAST=upcast,
        DOT_PRECISION=_dot_precision(torch.float32 if upcast else x.dtype),
    )
    return y[0] if splits == 1 else y.sum(0)


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
    check_expand_args(
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
    for name, t in (("y", y), ("out", out)):
        if t.stride(1) != 1:
            raise ValueError(f"{name} rows must be contiguous")
    _check_layout(
        b_offsets=b_offsets,
        ranks=ranks,
        token_indices=token_indices,
        group_offsets=group_offsets,
        group_slots=group_slots,
        scaling=scaling,
        y_offsets=y_offsets,
    )
    num_tokens, y_width = y.shape
    if pool.device.type == "cpu":  # free here; on a GPU it would cost a host sync
        check_values(
            pool,
            b_offsets,
            ranks,
            hidden_out,
            y_offsets,
            y_width,
            token_indices,
            group_offsets,
            group_slots,
            "y's column count",
        )

    num_groups = group_slots.shape[0]
    num_lora_tokens = token_indices.shape[0]
    if num_groups == 0 or num_lora_tokens == 0 or y_width == 0 or hidden_out == 0:
        return
    target = out[:, out_offset:]  # the kernel writes columns [0, hidden_out) of this view
    upcast = out.dtype != pool.dtype
    grid = (num_groups, triton.cdiv(num_lora_tokens, _BLOCK_M), triton.cdiv(hidden_out, _EXPAND_BLOCK_N))
    _lora_expand_kernel[grid](
        y,
        pool,
        b_offsets,
        y_offsets if y_offsets is not None else b_offsets,  # unread without y_offsets
        ranks,
        token_indices,
        group_offsets,
        group_slots,
        target,
        scaling,
        hidden_out,
        y_width,
        y.stride(0),
        out.stride(0),
        HAS_Y_OFFSETS=y_offsets is not None,
        BLOCK_M=_BLOCK_M,
        BLOCK_N=_EXPAND_BLOCK_N,
        BLOCK_R=_rank_block(y_width),
        UPCAST=upcast,
        DOT_PRECISION=_dot_precision(torch.float32 if upcast else pool.dtype),
    )
