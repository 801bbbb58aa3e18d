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

`lora_apply` runs one fused projection (qkv: a shrink over the stacked A rows, then the q, k and v
expands) in two launches: the shrink stores each split's partial y into an uninitialized
[splits, num_tokens, max_rank] buffer, and one expand covers the column tiles of every part, summing
the partials in split order as it loads y (a third launch sums them first when that re-reading
would cost more, in long prefills; the bits are the same either way).

Grid: (group, token tile, rank tile x split of hidden_in) for shrink, (group, token tile,
output-column tile) for expand (lora_apply's: the column tiles of all its parts, one after
another). The token-tile axis is sized for the whole of token_indices, so no host sync is needed to
find the longest group; tiles past the end of their group, and groups of rank-0 slots, return at
once. Block sizes and splits depend only on max_rank and hidden_in (shrink) or y's width (expand),
not on the batch, so a token's result does not depend on what it is batched with (lora_apply's
choice of where to sum the splits does depend on the batch, but not the order of the sum).

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

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tandem_kernels.lora_reference import (
    TILE_ROWS,
    check_apply_args,
    check_apply_out,
    check_expand_args,
    check_finish_args,
    check_part_spans,
    check_shrink_args,
    check_tiles,
    check_values,
)

_BLOCK_M = TILE_ROWS  # tokens per tile: decode groups are short, and tl.dot needs at least 16
_SHRINK_BLOCK_K = 64
_SHRINK_K_CHUNK = 512  # hidden_in columns per split-K program (a multiple of _SHRINK_BLOCK_K)
_EXPAND_BLOCK_N = 64
_APPLY_MAX_PARTS = 4  # parts one fused expand launch covers (scalar arguments); more take more launches
# lora_apply sums the shrink's split-K partials inside the expand while the partials it re-reads
# (every output-column tile reads them again, mostly from L2; estimated as splits * lora tokens *
# max_rank * 4 bytes * column tiles) stay under this many bytes: a decode batch. Past it (a long
# prefill, where one more launch is nothing) a separate kernel sums them first, in the same order,
# so the result is bit-identical either way and a token's result never depends on its batch. On an
# H100 (Llama-3-8B projections, rank 16, batches of 64 to 1024) 32 MiB picked the faster of the two
# in every case measured, or one within half a microsecond of it.
_FUSED_SUM_MAX_BYTES = 32 << 20
_SUM_BLOCK = 1024


@dataclass(frozen=True)
class ApplyConfig:
    """lora_apply's launch settings. Every field is a power of two, and shrink_k_chunk a multiple of
    shrink_block_k. They depend on no batch, so a token's result never does either."""

    shrink_k_chunk: int = 512  # hidden_in columns per split-K shrink program
    shrink_block_k: int = 128
    expand_block_n: int = 64  # output columns per expand program
    num_warps: int = 4
    # No software pipelining of the expand's rank loop: usually a single iteration, so staging its
    # loads through shared memory only costs.
    expand_stages: int = 1
    # The tiled launch (CUDA graphs): programs per 16-row tile, each taking every P-th group of the
    # tile. 1 walks a tile's groups one after another (up to 16 with one request per adapter); 16
    # gives each group its own program, as the grouped launch does, at the price of programs that
    # find no group and return. 4: at most 4 groups in turn, 4x the programs of a one-adapter batch.
    tile_group_programs: int = 4

    def __post_init__(self) -> None:
        for name in ("shrink_k_chunk", "shrink_block_k", "expand_block_n", "num_warps"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two, got {value}")
        if self.shrink_block_k < 16 or self.expand_block_n < 16:
            raise ValueError("tl.dot needs blocks of at least 16")
        if self.shrink_k_chunk % self.shrink_block_k:
            raise ValueError("shrink_k_chunk must be a multiple of shrink_block_k")
        if self.expand_stages < 1:
            raise ValueError("expand_stages must be at least 1")
        if not 1 <= self.tile_group_programs <= TILE_ROWS:
            raise ValueError(
                f"tile_group_programs must be in [1, {TILE_ROWS}] (a tile has at most that many groups)"
            )


# Chosen on an H100 (Llama-3-8B shapes, decode batch of 64, rank 16, inside a CUDA graph) among K
# blocks, chunks and pipelining depths; benchmarks/bench_gpu.py's lora section sweeps more (it sets
# this, which lora_apply reads at each call). lora_shrink keeps its own _SHRINK_BLOCK_K and
# _SHRINK_K_CHUNK.
APPLY_CONFIG = ApplyConfig()
# Tests set this to NaN to show lora_apply never reads a partial the shrink did not write.
_PARTIALS_FILL: float | None = None


def _cdiv(a: int, b: int) -> int:
    # Plain ints: triton.cdiv goes through Triton's constexpr machinery, microseconds per call.
    return -(-a // b)


@functools.lru_cache(maxsize=64)
def _rank_block(max_rank: int) -> int:
    # tl.dot needs at least 16 along every dimension; 64 keeps a rank-128 tile's registers in check.
    return min(64, max(16, triton.next_power_of_2(max_rank)))


@triton.jit
def _shrink_chunk(
    acc,
    x_ptrs,
    a_ptrs,
    mask_m,
    mask_r,
    k_start,
    k_end,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """acc + x[rows of mask_m, k_start:k_end] @ A[rows of mask_r, k_start:k_end].T (x_ptrs and
    a_ptrs point at column 0 of each row and span BLOCK_K columns)."""
    offs_k = tl.arange(0, BLOCK_K)
    for k in range(k_start, k_end, BLOCK_K):
        mask_k = k + offs_k < k_end
        x = tl.load(x_ptrs + k, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        a = tl.load(a_ptrs + k, mask=mask_r[:, None] & mask_k[None, :], other=0.0)
        if UPCAST:  # x and the pool differ in dtype: multiply in fp32
            x = x.to(tl.float32)
            a = a.to(tl.float32)
        acc = tl.dot(x, tl.trans(a), acc, input_precision=DOT_PRECISION)
    return acc


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
    acc = _shrink_chunk(acc, x_ptrs, a_ptrs, mask_m, mask_r, k_start, k_end, BLOCK_K, UPCAST, DOT_PRECISION)

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


@triton.jit
def _part_of_tile(
    n, col0, width0, col1, width1, tiles1, col2, width2, tiles2, col3, width3, tiles3, NUM_PARTS: tl.constexpr
):
    """(part, its first column tile, its first column, its width) of column tile n of a fused
    expand: axis n runs over the parts' column tiles, part after part (part p's tiles start at
    tiles_p), so a tile never straddles two parts whatever their widths."""
    # where, not if: no value changes type across branches.
    part = n * 0
    tile0 = n * 0
    col = col0 + n * 0
    width = width0 + n * 0
    if NUM_PARTS > 1:
        later = n >= tiles1
        part = tl.where(later, 1, part)
        tile0 = tl.where(later, tiles1, tile0)
        col = tl.where(later, col1, col)
        width = tl.where(later, width1, width)
    if NUM_PARTS > 2:
        later = n >= tiles2
        part = tl.where(later, 2, part)
        tile0 = tl.where(later, tiles2, tile0)
        col = tl.where(later, col2, col)
        width = tl.where(later, width2, width)
    if NUM_PARTS > 3:
        later = n >= tiles3
        part = tl.where(later, 3, part)
        tile0 = tl.where(later, tiles3, tile0)
        col = tl.where(later, col3, col)
        width = tl.where(later, width3, width)
    return part, tile0, col, width


@triton.jit
def _expand_rows(
    y_ptr,
    pool_ptr,
    tokens,
    mask_m,
    offs_n,
    mask_n,
    rank,
    total,
    b_offset,
    y_offset,
    y_stride_split,
    y_stride_t,
    NUM_SPLITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """y[tokens, y_offset:y_offset + rank] @ B[offs_n, :rank].T, unscaled, fp32 [BLOCK_M, BLOCK_N]; y is
    read only for the rows of mask_m and its columns below `total` (what the shrink wrote)."""
    offs_r = tl.arange(0, BLOCK_R)
    y_ptrs = y_ptr + tokens[:, None] * y_stride_t + y_offset + offs_r[None, :]
    b_ptrs = pool_ptr + b_offset + offs_n[:, None] * rank + offs_r[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for r in range(0, rank, BLOCK_R):
        mask_r = r + offs_r < rank
        cols = y_offset + r + offs_r
        mask_y = mask_m[:, None] & (mask_r & (cols >= 0) & (cols < total))[None, :]
        # y is the sum of the shrink's split-K partials, taken here in split order (the same order
        # as _lora_sum_splits_kernel, so both paths give the same bits). A loop: unrolled, the
        # loads of every split at once measured slower on an H100 (register pressure).
        y = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        for s in range(0, NUM_SPLITS):
            y += tl.load(y_ptrs + s * y_stride_split + r, mask=mask_y, other=0.0)
        b = tl.load(b_ptrs + r, mask=mask_n[:, None] & mask_r[None, :], other=0.0)
        if UPCAST:  # out and the pool differ in dtype: multiply in fp32
            b = b.to(tl.float32)
        acc = tl.dot(y.to(b.dtype), tl.trans(b), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _lora_apply_expand_kernel(
    y_ptr,
    pool_ptr,
    b_offsets_ptr,
    y_offsets_ptr,
    ranks_ptr,
    scaling_ptr,
    total_ranks_ptr,
    token_indices_ptr,
    group_offsets_ptr,
    group_slots_ptr,
    out_ptr,
    num_slots,
    max_rank,
    y_stride_split,
    y_stride_t,
    out_stride_t,
    col0,
    width0,
    col1,
    width1,
    tiles1,
    col2,
    width2,
    tiles2,
    col3,
    width3,
    tiles3,
    NUM_PARTS: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Every part of a fused projection in one launch: axis 2 runs over the parts' column tiles
    (`_part_of_tile`); the last tile of a part is masked."""
    group = tl.program_id(0)
    first = tl.load(group_offsets_ptr + group) + tl.program_id(1) * BLOCK_M
    end = tl.load(group_offsets_ptr + group + 1)
    if first >= end:
        return
    slot = tl.load(group_slots_ptr + group).to(tl.int64)
    n = tl.program_id(2)
    part, tile0, col, width = _part_of_tile(
        n, col0, width0, col1, width1, tiles1, col2, width2, tiles2, col3, width3, tiles3, NUM_PARTS
    )

    meta = part.to(tl.int64) * num_slots + slot
    rank = tl.load(ranks_ptr + meta)
    # The shrink wrote y's columns [0, total) for this group's tokens, and nothing else: read no more.
    total = tl.minimum(tl.load(total_ranks_ptr + slot), max_rank)
    if rank <= 0 or total <= 0:
        return
    scale = tl.load(scaling_ptr + meta)
    b_offset = tl.load(b_offsets_ptr + meta)  # int64
    y_offset = tl.load(y_offsets_ptr + meta)

    offs_m = first + tl.arange(0, BLOCK_M)
    mask_m = offs_m < end
    tokens = tl.load(token_indices_ptr + offs_m, mask=mask_m, other=0)  # int64
    offs_n = (n - tile0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < width

    # Issued first, so its latency hides behind the loads below.
    out_ptrs = out_ptr + tokens[:, None] * out_stride_t + col + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    current = tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)

    acc = _expand_rows(
        y_ptr,
        pool_ptr,
        tokens,
        mask_m,
        offs_n,
        mask_n,
        rank,
        total,
        b_offset,
        y_offset,
        y_stride_split,
        y_stride_t,
        NUM_SPLITS,
        BLOCK_M,
        BLOCK_N,
        BLOCK_R,
        UPCAST,
        DOT_PRECISION,
    )
    # Parts are disjoint, so each (token, column) belongs to one program: no atomics.
    tl.store(out_ptrs, (current + acc * scale).to(out_ptr.dtype.element_ty), mask=mask)


# The tiled launch (lora_apply's `tiles`): the grid's token axis is tiles of BLOCK_M consecutive
# rows of token_indices, whatever groups they belong to, instead of (group, token tile) pairs. Its
# size then depends only on token_indices' length, not on the metadata's values, so a CUDA graph
# captured once per batch size serves every mix of adapters. ApplyConfig.tile_group_programs
# programs share a tile and split the groups it overlaps (`tiles[t]` = first, end) between them;
# each walks its own, each group with its own weights, and reads and writes only its groups' rows.
# Rows of other groups are masked out of each group's loads, so their products add exact zeros. A
# token's result is the one its group alone gives (the same sums, in the same order, as the grouped
# launch).


@triton.jit
def _lora_shrink_tiles_kernel(
    x_ptr,
    pool_ptr,
    a_offsets_ptr,
    ranks_ptr,
    token_indices_ptr,
    group_offsets_ptr,
    group_slots_ptr,
    tiles_ptr,
    y_ptr,
    num_rows,
    hidden_in,
    max_rank,
    x_stride_t,
    y_stride_t,
    y_stride_split,
    num_rank_tiles,
    GROUP_PROGRAMS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    K_CHUNK: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # GROUP_PROGRAMS programs share a tile: program j takes its groups j, j + GROUP_PROGRAMS, ...
    tile = tl.program_id(0) // GROUP_PROGRAMS
    g_first = tl.load(tiles_ptr + 2 * tile) + tl.program_id(0) % GROUP_PROGRAMS
    g_end = tl.load(tiles_ptr + 2 * tile + 1)
    if g_first >= g_end:
        return
    split = tl.program_id(1) // num_rank_tiles
    r_start = (tl.program_id(1) % num_rank_tiles) * BLOCK_R
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    tokens = tl.load(token_indices_ptr + offs_m, mask=offs_m < num_rows, other=0)  # int64
    offs_r = r_start + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tokens[:, None] * x_stride_t + offs_k[None, :]
    k_start = split * K_CHUNK
    k_end = tl.minimum(k_start + K_CHUNK, hidden_in)

    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    mine = offs_m < 0  # the rows of this program's groups
    for g in range(g_first, g_end, GROUP_PROGRAMS):
        rows = (offs_m >= tl.load(group_offsets_ptr + g)) & (offs_m < tl.load(group_offsets_ptr + g + 1))
        mine = mine | rows
        slot = tl.load(group_slots_ptr + g).to(tl.int64)
        rank = tl.minimum(tl.load(ranks_ptr + slot), max_rank)
        if r_start < rank:  # else y's columns here are past this adapter's rank: never read
            a_offset = tl.load(a_offsets_ptr + slot)  # int64
            a_ptrs = pool_ptr + a_offset + offs_r[:, None] * hidden_in + offs_k[None, :]
            acc = _shrink_chunk(
                acc, x_ptrs, a_ptrs, rows, offs_r < rank, k_start, k_end, BLOCK_K, UPCAST, DOT_PRECISION
            )
    # Every row of this program's groups, every column of this rank tile (zeros past a row's rank).
    mask = mine[:, None] & (offs_r < max_rank)[None, :]
    y_ptrs = y_ptr + split * y_stride_split + tokens[:, None] * y_stride_t + offs_r[None, :]
    tl.store(y_ptrs, acc, mask=mask)


@triton.jit
def _lora_apply_expand_tiles_kernel(
    y_ptr,
    pool_ptr,
    b_offsets_ptr,
    y_offsets_ptr,
    ranks_ptr,
    scaling_ptr,
    total_ranks_ptr,
    token_indices_ptr,
    group_offsets_ptr,
    group_slots_ptr,
    tiles_ptr,
    out_ptr,
    num_rows,
    num_slots,
    max_rank,
    y_stride_split,
    y_stride_t,
    out_stride_t,
    col0,
    width0,
    col1,
    width1,
    tiles1,
    col2,
    width2,
    tiles2,
    col3,
    width3,
    tiles3,
    GROUP_PROGRAMS: tl.constexpr,
    NUM_PARTS: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    tile = tl.program_id(0) // GROUP_PROGRAMS  # as in _lora_shrink_tiles_kernel
    g_first = tl.load(tiles_ptr + 2 * tile) + tl.program_id(0) % GROUP_PROGRAMS
    g_end = tl.load(tiles_ptr + 2 * tile + 1)
    if g_first >= g_end:
        return
    n = tl.program_id(1)
    part, tile0, col, width = _part_of_tile(
        n, col0, width0, col1, width1, tiles1, col2, width2, tiles2, col3, width3, tiles3, NUM_PARTS
    )
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    tokens = tl.load(token_indices_ptr + offs_m, mask=offs_m < num_rows, other=0)  # int64
    offs_n = (n - tile0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < width
    out_ptrs = out_ptr + tokens[:, None] * out_stride_t + col + offs_n[None, :]
    if GROUP_PROGRAMS == 1:
        # The tile's rows are all this program's: their out is loaded first, its latency hidden
        # behind the loads below.
        lo = tl.load(group_offsets_ptr + g_first)
        hi = tl.load(group_offsets_ptr + g_end)
        mask = ((offs_m >= lo) & (offs_m < hi))[:, None] & mask_n[None, :]
        current = tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    mine = offs_m < 0  # the rows of this program's groups
    for g in range(g_first, g_end, GROUP_PROGRAMS):
        rows = (offs_m >= tl.load(group_offsets_ptr + g)) & (offs_m < tl.load(group_offsets_ptr + g + 1))
        mine = mine | rows
        slot = tl.load(group_slots_ptr + g).to(tl.int64)
        meta = part.to(tl.int64) * num_slots + slot
        rank = tl.load(ranks_ptr + meta)
        total = tl.minimum(tl.load(total_ranks_ptr + slot), max_rank)
        if rank > 0 and total > 0:
            product = _expand_rows(
                y_ptr,
                pool_ptr,
                tokens,
                rows,
                offs_n,
                mask_n,
                rank,
                total,
                tl.load(b_offsets_ptr + meta),
                tl.load(y_offsets_ptr + meta),
                y_stride_split,
                y_stride_t,
                NUM_SPLITS,
                BLOCK_M,
                BLOCK_N,
                BLOCK_R,
                UPCAST,
                DOT_PRECISION,
            )
            acc += product * tl.load(scaling_ptr + meta)
    if GROUP_PROGRAMS > 1:
        # Other programs add into the tile's other rows: read and write this program's only.
        mask = mine[:, None] & mask_n[None, :]
        current = tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
    # Rows of a group without LoRA on this part get current + 0: their values are unchanged.
    tl.store(out_ptrs, (current + acc).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lora_sum_splits_kernel(
    partials_ptr, y_ptr, numel, stride_split, NUM_SPLITS: tl.constexpr, BLOCK: tl.constexpr
):
    """y = the sum of the split-K partials, in split order (as _lora_apply_expand_kernel sums them)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(NUM_SPLITS):
        acc += tl.load(partials_ptr + s * stride_split + offs, mask=mask, other=0.0)
    tl.store(y_ptr + offs, acc, mask=mask)


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
    splits = _cdiv(hidden_in, _SHRINK_K_CHUNK) if hidden_in else 1
    y = torch.zeros(splits, num_tokens, max_rank, dtype=torch.float32, device=x.device)
    if num_groups == 0 or num_lora_tokens == 0 or max_rank == 0 or hidden_in == 0:
        return y[0]
    block_r = _rank_block(max_rank)
    rank_tiles = _cdiv(max_rank, block_r)
    upcast = x.dtype != pool.dtype
    grid = (num_groups, _cdiv(num_lora_tokens, _BLOCK_M), rank_tiles * splits)
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
    grid = (num_groups, _cdiv(num_lora_tokens, _BLOCK_M), _cdiv(hidden_out, _EXPAND_BLOCK_N))
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


@functools.lru_cache(maxsize=256)
def _apply_layout(parts: tuple, out_width: int, block_n: int) -> tuple[tuple[tuple[int, int], ...], tuple]:
    """The checked part spans, and the expand launches that cover them: (first part, parts, scalar
    arguments, column tiles) each. The scalars are (col, width) of the launch's first part, then
    (col, width, first tile) of each further one, padded to _APPLY_MAX_PARTS parts with empty ones.
    Cached: an engine calls with the same few spans for every layer and step.
    """
    spans = check_part_spans(parts, out_width)
    launches = []
    for first in range(0, len(spans), _APPLY_MAX_PARTS):
        chunk = spans[first : first + _APPLY_MAX_PARTS]
        scalars: list[int] = []
        tiles = 0
        for i, (col, width) in enumerate(chunk):
            scalars += [col, width] if i == 0 else [col, width, tiles]
            tiles += _cdiv(width, block_n)
        scalars += [0, 0, tiles] * (_APPLY_MAX_PARTS - len(chunk))
        launches.append((first, len(chunk), tuple(scalars), tiles))
    return spans, tuple(launches)


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
    """One fused projection's LoRA in two launches: shrink to split-K partials, one expand for all parts.

    The same result as `lora_shrink` then `lora_expand` per part (the package docstring has the
    contract), without zero-filling the partials, the separate sum over splits, or a launch per part.
    With `tiles` (`lora_token_tiles` of group_offsets) the launches are tiled: their grids depend
    only on the tensors' shapes, so a CUDA graph can capture the call once and replay it with new
    metadata values of the same shapes.
    """
    pending = lora_apply_begin(
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
    pending.finish(out)


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
) -> PendingApply:
    """`lora_apply`'s shrink launched now, its expand at `finish(out)`.

    The shrink reads only x, so it can run on a side stream while the base projection's GEMM
    computes out (the engine does, `LoRABatch.project`); out need not exist yet.
    """
    check_apply_args(
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
        len(parts),
    )
    if x.stride(1) != 1:
        raise ValueError("x rows must be contiguous")
    _check_layout(
        a_offsets=a_offsets,
        total_ranks=total_ranks,
        token_indices=token_indices,
        group_offsets=group_offsets,
        group_slots=group_slots,
        b_offsets=b_offsets,
        ranks=ranks,
        y_offsets=y_offsets,
        scaling=scaling,
    )
    num_tokens, hidden_in = x.shape
    groups = (token_indices, group_offsets, group_slots)
    num_rows = token_indices.shape[0]
    if tiles is not None:
        check_tiles(tiles, group_offsets, num_rows)  # the values only on the CPU, like check_values
    if pool.device.type == "cpu":  # free here; on a GPU it would cost a host sync
        check_values(pool, a_offsets, total_ranks, hidden_in, None, max_rank, *groups, "max_rank")
    pending = PendingApply(
        x, pool, total_ranks, groups, max_rank, (b_offsets, ranks, y_offsets, scaling), parts, tiles
    )
    if group_slots.shape[0] == 0 or num_rows == 0 or max_rank == 0 or hidden_in == 0:
        return pending  # every delta is zero (hidden_in == 0: an empty product), out stays as it is

    # Split-K partials, [splits, num_tokens, max_rank], NOT zeroed. The invariant that makes this
    # safe: the expand reads partials only for tokens of a group g (token_indices[group_offsets[g]:
    # group_offsets[g + 1]]) and only columns c < min(total_ranks[slot of g], max_rank), a mask it
    # applies itself whatever the other metadata says. For exactly those (token, c) and for every
    # split, one shrink program stores its partial: the token-tile axis covers every group's tokens
    # (it is sized for all of token_indices; the tiled launch's tiles cover every row), the rank
    # tiles cover [0, max_rank) and store every c < the clamped rank, and each split has a non-empty
    # K range (splits = cdiv(hidden_in, chunk)), so no program skips its store. Entries of other
    # tokens and columns stay garbage, never read.
    config = pending.config
    splits = _cdiv(hidden_in, config.shrink_k_chunk)
    shape = (splits, num_tokens, max_rank)
    if _PARTIALS_FILL is None:
        partials = torch.empty(shape, dtype=torch.float32, device=x.device)
    else:
        partials = torch.full(shape, _PARTIALS_FILL, dtype=torch.float32, device=x.device)
    block_r = _rank_block(max_rank)
    rank_tiles = _cdiv(max_rank, block_r)
    upcast_x = x.dtype != pool.dtype
    shrink_config = dict(
        BLOCK_M=_BLOCK_M,
        BLOCK_R=block_r,
        BLOCK_K=config.shrink_block_k,
        K_CHUNK=config.shrink_k_chunk,
        UPCAST=upcast_x,
        DOT_PRECISION=_dot_precision(torch.float32 if upcast_x else x.dtype),
        num_warps=config.num_warps,
    )
    shape_args = (hidden_in, max_rank, x.stride(0), partials.stride(1), partials.stride(0), rank_tiles)
    if tiles is None:
        _lora_shrink_kernel[(group_slots.shape[0], _cdiv(num_rows, _BLOCK_M), rank_tiles * splits)](
            x, pool, a_offsets, total_ranks, *groups, partials, *shape_args, **shrink_config
        )
    else:
        programs = config.tile_group_programs
        _lora_shrink_tiles_kernel[(tiles.shape[0] * programs, rank_tiles * splits)](
            x,
            pool,
            a_offsets,
            total_ranks,
            *groups,
            tiles,
            partials,
            num_rows,
            *shape_args,
            GROUP_PROGRAMS=programs,
            **shrink_config,
        )
    pending.partials, pending.block_r = partials, block_r
    return pending


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
    """lora_apply's expand launch on a y computed elsewhere, e.g. by the base GEMM itself with each
    adapter's stacked A appended to its weight (y: those columns of its output, any float dtype,
    rows contiguous, in place of the shrink's fp32 partials). max_part_rank, if known, sizes the
    rank tile for the parts' ranks rather than for y's width (a hint: any rank is fully summed)."""
    groups = (token_indices, group_offsets, group_slots)
    tables = (b_offsets, ranks, y_offsets, scaling)
    check_finish_args(y, pool, total_ranks, *groups, max_rank, out, *tables, len(parts), tiles)
    if y.stride(1) != 1:
        raise ValueError("y rows must be contiguous")
    _check_layout(
        total_ranks=total_ranks,
        token_indices=token_indices,
        group_offsets=group_offsets,
        group_slots=group_slots,
        b_offsets=b_offsets,
        ranks=ranks,
        y_offsets=y_offsets,
        scaling=scaling,
    )
    pending = PendingApply(y, pool, total_ranks, groups, max_rank, tables, parts, tiles)
    if group_slots.shape[0] and token_indices.shape[0] and max_rank:
        pending.partials = y.unsqueeze(0)  # one "split": the expand reads y as it is
        pending.block_r = _rank_block(max_part_rank or max_rank)
    pending.finish(out)


class PendingApply:
    """A fused projection's LoRA after its shrink (`lora_apply_begin`); `finish(out)` expands into out."""

    def __init__(
        self,
        x: torch.Tensor,
        pool: torch.Tensor,
        total_ranks: torch.Tensor,
        groups: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        max_rank: int,
        tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
        parts: Sequence[tuple[int, int]],
        tiles: torch.Tensor | None,
    ) -> None:
        self.x, self.pool, self.total_ranks, self.groups = x, pool, total_ranks, groups
        self.max_rank, self.tables, self.parts, self.tiles = max_rank, tables, parts, tiles
        self.config = APPLY_CONFIG  # the same settings for both halves, whatever happens between
        self.partials: torch.Tensor | None = None  # None: nothing to add
        self.block_r = 0

    def finish(self, out: torch.Tensor) -> None:
        """Add every part's delta into out, in place (after the shrink, in stream order)."""
        x, pool, groups, tiles, config = self.x, self.pool, self.groups, self.tiles, self.config
        check_apply_out(out, x.shape[0], pool.device)
        if out.stride(1) != 1:
            raise ValueError("out rows must be contiguous")
        block_n = config.expand_block_n
        parts = self.parts
        try:  # the engine passes the same tuple of int pairs every call: a cache hit
            spans, launches = _apply_layout(
                parts if type(parts) is tuple else tuple(parts), out.shape[1], block_n
            )
        except TypeError:  # unhashable pairs (lists)
            spans, launches = _apply_layout(tuple(tuple(p) for p in parts), out.shape[1], block_n)
        b_offsets, ranks, y_offsets, scaling = self.tables
        max_rank = self.max_rank
        if pool.device.type == "cpu":  # free here; on a GPU it would cost a host sync
            for p, (_, width) in enumerate(spans):
                check_values(pool, b_offsets[p], ranks[p], width, y_offsets[p], max_rank, *groups, "max_rank")
        partials = self.partials
        if partials is None:
            return
        if partials.device.type == "cuda" and not torch.cuda.is_current_stream_capturing():
            # Made on the shrink's stream, maybe a side stream: not to be reused before this reads it.
            # Not while capturing: the allocator would hold every layer's partials until the
            # capture ends (160 MB of the graph pool for Llama-3-8B at batch 256, rank 64), and the
            # graph's fork and join already order the next shrink after this expand.
            partials.record_stream(torch.cuda.current_stream())
        splits, num_tokens = partials.shape[0], partials.shape[1]
        num_rows = groups[0].shape[0]
        y, y_splits = partials, splits
        total_tiles = sum(launch[3] for launch in launches)
        if splits > 1 and splits * num_rows * max_rank * 4 * total_tiles > _FUSED_SUM_MAX_BYTES:
            y = torch.empty((1, num_tokens, max_rank), dtype=torch.float32, device=x.device)
            numel = num_tokens * max_rank
            _lora_sum_splits_kernel[(_cdiv(numel, _SUM_BLOCK),)](
                partials, y, numel, partials.stride(0), NUM_SPLITS=splits, BLOCK=_SUM_BLOCK
            )
            y_splits = 1

        upcast_out = out.dtype != pool.dtype
        total_ranks = self.total_ranks
        num_slots = total_ranks.shape[0]
        for first, count, scalars, column_tiles in launches:
            if column_tiles == 0:
                continue
            # Rows [first, first + count) of the [num_parts, num_slots] tables (contiguous).
            tables = (
                b_offsets[first:] if first else b_offsets,
                y_offsets[first:] if first else y_offsets,
                ranks[first:] if first else ranks,
                scaling[first:] if first else scaling,
                total_ranks,
            )
            strides = (y.stride(0), y.stride(1), out.stride(0))
            expand_config = dict(
                NUM_PARTS=count,
                NUM_SPLITS=y_splits,
                BLOCK_M=_BLOCK_M,
                BLOCK_N=block_n,
                BLOCK_R=self.block_r,
                UPCAST=upcast_out,
                DOT_PRECISION=_dot_precision(torch.float32 if upcast_out else pool.dtype),
                num_warps=config.num_warps,
                num_stages=config.expand_stages,
            )
            if tiles is None:
                grid = (groups[2].shape[0], _cdiv(num_rows, _BLOCK_M), column_tiles)
                _lora_apply_expand_kernel[grid](
                    y, pool, *tables, *groups, out, num_slots, max_rank, *strides, *scalars, **expand_config
                )
            else:
                programs = config.tile_group_programs
                _lora_apply_expand_tiles_kernel[(tiles.shape[0] * programs, column_tiles)](
                    y,
                    pool,
                    *tables,
                    *groups,
                    tiles,
                    out,
                    num_rows,
                    num_slots,
                    max_rank,
                    *strides,
                    *scalars,
                    GROUP_PROGRAMS=programs,
                    **expand_config,
                )
