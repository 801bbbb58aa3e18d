"""A projection and its LoRA in one Triton kernel: out = x @ W.T (+ bias) + every adapter's delta.

`lora_apply` adds LoRA to a projection the base GEMM has already written: a shrink launch and an
expand launch per projection, which at decode batch sizes are bound by latency, not bandwidth (on
an H200, Llama-3-8B shapes, rank 16, batch 64: 43 us of LoRA against 119 us of base GEMMs per
layer, eight launches). Here the GEMM's own programs do the LoRA work as they stream W: each
program (a tile of BLOCK_M rows of x, BLOCK_N output columns of one part) also loads, at every K
step, the A rows of the adapters its rows use (x's tile is loaded anyway) and accumulates x @ A.T
beside x @ W.T; its epilogue multiplies that by the B columns of its part and adds it to the
accumulator before the single rounding to out's dtype. The adapter weights are read from the pool
by the same offsets `lora_apply` uses (S-LoRA paging), so nothing is copied into the weights.

Metadata (`lora_row_tiles` builds it on the host, the engine once per step):
    row_groups   [num_tokens] int32: row t's group (an index into group_slots), -1 for none
    tile_groups  [num_row_tiles, block_m] int32: the distinct groups of each tile of block_m rows,
                 ascending, padded with -1
    tile_counts  [num_row_tiles] int32: how many of them
A program takes its tile's groups GROUPS at a time (GROUPS * BLOCK_R columns of x @ A.T, BLOCK_R
the rank block): the first GROUPS inside the GEMM's K loop, any further ones in an extra pass over
x after it (rare in decode: a 64-row tile of 64 requests on 4 adapters needs none at rank 16).

Numerics: x @ W.T and x @ A.T accumulate in fp32; x @ A.T is scaled and rounded to the weights'
dtype for the tensor cores (as lora_apply's expand rounds y), multiplied by B into the same fp32
accumulator, and the sum is rounded to out's dtype once (the unfused path rounds the base output
first). Rows of no group, and columns of a part its adapter has no LoRA on, get exact zeros added.
Each group's columns of x @ A.T sit at a multiple of BLOCK_R (itself a multiple of 16, the tensor
cores' K step), and other groups contribute exact zeros, so a row's result does not depend on
which other adapters share its tile.

Parts (qkv: q, k, v) must tile out's columns in order from 0: the output is the whole projection.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tandem_kernels.lora import _APPLY_MAX_PARTS, _cdiv, _check_layout, _dot_precision, _part_of_tile
from tandem_kernels.lora_reference import check_linear_args


@dataclass(frozen=True)
class LinearConfig:
    """lora_linear's launch settings, all powers of two. block_m is also the row tile of the
    metadata (`lora_row_tiles(..., block_m)`); group_columns / BLOCK_R adapters per pass."""

    block_m: int = 64
    block_n: int = 64
    block_k: int = 128
    group_columns: int = 64  # columns of x @ A.T a program keeps: GROUPS = this // BLOCK_R
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k", "group_columns", "num_warps"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two, got {value}")
        if min(self.block_m, self.block_n, self.block_k, self.group_columns) < 16:
            raise ValueError("tl.dot needs blocks of at least 16")
        if self.num_stages < 1:
            raise ValueError("num_stages must be at least 1")


# Not yet chosen on a GPU: benchmarks/bench_gpu.py's lora_linear section sweeps these (it sets
# this, which lora_linear reads at each call).
LINEAR_CONFIG = LinearConfig()


@functools.lru_cache(maxsize=64)
def rank_block(max_part_rank: int) -> int:
    """Columns of x @ A.T per adapter: its largest part rank, to a power of two of at least 16."""
    return max(16, triton.next_power_of_2(max(max_part_rank, 1)))


@triton.jit
def _chunk_meta(
    c0,
    count,
    tile_groups_ptr,
    group_slots_ptr,
    a_offsets_ptr,
    total_ranks_ptr,
    b_offsets_ptr,
    ranks_ptr,
    y_offsets_ptr,
    scaling_ptr,
    part,
    num_slots,
    max_rank,
    hidden_in,
    GROUPS: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Per column c of x @ A.T for the tile's groups c0 .. c0 + GROUPS - 1 (c = j * BLOCK_R + r: rank
    row r of the j-th): its group (-1: none), whether it holds a rank row, the pool offsets of that
    A row and of B's column r, the adapter's rank on this part (B's row stride) and scale."""
    offs_c = tl.arange(0, GROUPS * BLOCK_R)
    j = offs_c // BLOCK_R
    r = offs_c % BLOCK_R
    has = c0 + j < count
    gid = tl.load(tile_groups_ptr + c0 + j, mask=has, other=-1)
    has = has & (gid >= 0)
    slot = tl.load(group_slots_ptr + gid, mask=has, other=0).to(tl.int64)
    meta = part.to(tl.int64) * num_slots + slot
    rank = tl.load(ranks_ptr + meta, mask=has, other=0)
    total = tl.minimum(tl.load(total_ranks_ptr + slot, mask=has, other=0), max_rank)
    y_offset = tl.load(y_offsets_ptr + meta, mask=has, other=0)
    # Never a row past the adapter's stacked A (whatever the metadata says), nor past BLOCK_R.
    valid = has & (r < rank) & (y_offset + r >= 0) & (y_offset + r < total)
    a_row = tl.load(a_offsets_ptr + slot, mask=valid, other=0) + (y_offset + r) * hidden_in
    b_col = tl.load(b_offsets_ptr + meta, mask=valid, other=0) + r
    scale = tl.load(scaling_ptr + meta, mask=valid, other=0.0)
    gid = tl.where(valid, gid, -1)
    return gid, valid, a_row, b_col, rank, scale


@triton.jit
def _add_delta(
    acc,
    xa,
    row_groups,
    gid,
    valid,
    b_col,
    rank,
    scale,
    pool_ptr,
    offs_nl,
    mask_n,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """acc + (x @ A.T, each row keeping only its own group's columns, scaled) @ B[part columns]."""
    mine = (row_groups[:, None] == gid[None, :]) & valid[None, :]
    ya = tl.where(mine, xa * scale[None, :], 0.0)
    b = tl.load(
        pool_ptr + b_col[:, None] + offs_nl[None, :] * rank[:, None],
        mask=valid[:, None] & mask_n[None, :],
        other=0.0,
    )
    if UPCAST:
        b = b.to(tl.float32)
    return tl.dot(ya.to(b.dtype), b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _lora_linear_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    out_ptr,
    pool_ptr,
    a_offsets_ptr,
    total_ranks_ptr,
    b_offsets_ptr,
    ranks_ptr,
    y_offsets_ptr,
    scaling_ptr,
    group_slots_ptr,
    row_groups_ptr,
    tile_groups_ptr,
    tile_counts_ptr,
    num_tokens,
    hidden_in,
    num_slots,
    max_rank,
    x_stride,
    w_stride,
    out_stride,
    tile_groups_stride,
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
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUPS: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    LORA_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    n = tl.program_id(1)
    part, tile0, col, width = _part_of_tile(
        n, col0, width0, col1, width1, tiles1, col2, width2, tiles2, col3, width3, tiles3, NUM_PARTS
    )
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < num_tokens
    offs_nl = (n - tile0) * BLOCK_N + tl.arange(0, BLOCK_N)  # columns within the part
    mask_n = offs_nl < width
    offs_n = col + offs_nl
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * x_stride + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * w_stride + offs_k[None, :]

    tile_groups_ptr += pid_m * tile_groups_stride
    count = tl.load(tile_counts_ptr + pid_m)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if count > 0:
        row_groups = tl.load(row_groups_ptr + offs_m, mask=mask_m, other=-1)
        gid, valid, a_row, b_col, rank, scale = _chunk_meta(
            0,
            count,
            tile_groups_ptr,
            group_slots_ptr,
            a_offsets_ptr,
            total_ranks_ptr,
            b_offsets_ptr,
            ranks_ptr,
            y_offsets_ptr,
            scaling_ptr,
            part,
            num_slots,
            max_rank,
            hidden_in,
            GROUPS,
            BLOCK_R,
        )
        a_ptrs = pool_ptr + a_row[:, None] + offs_k[None, :]
        xa = tl.zeros([BLOCK_M, GROUPS * BLOCK_R], dtype=tl.float32)
        for k in range(0, hidden_in, BLOCK_K):
            mask_k = k + offs_k < hidden_in
            x = tl.load(x_ptrs + k, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w = tl.load(w_ptrs + k, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
            a = tl.load(a_ptrs + k, mask=valid[:, None] & mask_k[None, :], other=0.0)
            if UPCAST:
                xa = tl.dot(x.to(tl.float32), tl.trans(a.to(tl.float32)), xa, input_precision=LORA_PRECISION)
            else:
                xa = tl.dot(x, tl.trans(a), xa, input_precision=LORA_PRECISION)
        acc = _add_delta(
            acc,
            xa,
            row_groups,
            gid,
            valid,
            b_col,
            rank,
            scale,
            pool_ptr,
            offs_nl,
            mask_n,
            UPCAST,
            LORA_PRECISION,
        )
        # More groups in this tile than one pass keeps: x again (from L2) for each further GROUPS.
        for c0 in range(GROUPS, count, GROUPS):
            gid, valid, a_row, b_col, rank, scale = _chunk_meta(
                c0,
                count,
                tile_groups_ptr,
                group_slots_ptr,
                a_offsets_ptr,
                total_ranks_ptr,
                b_offsets_ptr,
                ranks_ptr,
                y_offsets_ptr,
                scaling_ptr,
                part,
                num_slots,
                max_rank,
                hidden_in,
                GROUPS,
                BLOCK_R,
            )
            a_ptrs = pool_ptr + a_row[:, None] + offs_k[None, :]
            xa = tl.zeros([BLOCK_M, GROUPS * BLOCK_R], dtype=tl.float32)
            for k in range(0, hidden_in, BLOCK_K):
                mask_k = k + offs_k < hidden_in
                x = tl.load(x_ptrs + k, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                a = tl.load(a_ptrs + k, mask=valid[:, None] & mask_k[None, :], other=0.0)
                if UPCAST:
                    xa = tl.dot(
                        x.to(tl.float32), tl.trans(a.to(tl.float32)), xa, input_precision=LORA_PRECISION
                    )
                else:
                    xa = tl.dot(x, tl.trans(a), xa, input_precision=LORA_PRECISION)
            acc = _add_delta(
                acc,
                xa,
                row_groups,
                gid,
                valid,
                b_col,
                rank,
                scale,
                pool_ptr,
                offs_nl,
                mask_n,
                UPCAST,
                LORA_PRECISION,
            )
    else:  # no adapter in this tile: the plain GEMM
        for k in range(0, hidden_in, BLOCK_K):
            mask_k = k + offs_k < hidden_in
            x = tl.load(x_ptrs + k, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w = tl.load(w_ptrs + k, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * out_stride + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@functools.lru_cache(maxsize=256)
def _launch_layout(parts: tuple[tuple[int, int], ...], block_n: int) -> tuple[tuple, int]:
    """The part scalars of `_part_of_tile` (padded to _APPLY_MAX_PARTS parts) and the column tiles."""
    scalars: list[int] = []
    tiles = 0
    for i, (col, width) in enumerate(parts):
        scalars += [col, width] if i == 0 else [col, width, tiles]
        tiles += _cdiv(width, block_n)
    scalars += [0, 0, tiles] * (_APPLY_MAX_PARTS - len(parts))
    return tuple(scalars), tiles


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pool: torch.Tensor,
    a_offsets: torch.Tensor,
    total_ranks: torch.Tensor,
    group_slots: torch.Tensor,
    row_tiles: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    max_rank: int,
    b_offsets: torch.Tensor,
    ranks: torch.Tensor,
    y_offsets: torch.Tensor,
    scaling: torch.Tensor,
    parts: Sequence[tuple[int, int]],
    max_part_rank: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """F.linear(x, weight, bias) plus lora_apply's delta, in one launch; returns out.

    The tables are lora_apply's; `row_tiles` is `lora_row_tiles(token_indices, group_offsets,
    num_tokens, LINEAR_CONFIG.block_m)` in place of the token groups, and max_part_rank bounds
    every entry of `ranks` (it sets the columns of x @ A.T per adapter; larger ranks would be cut).
    """
    config = LINEAR_CONFIG
    spans = check_linear_args(
        x,
        weight,
        bias,
        pool,
        a_offsets,
        total_ranks,
        group_slots,
        row_tiles,
        max_rank,
        b_offsets,
        ranks,
        y_offsets,
        scaling,
        parts,
        max_part_rank,
        config.block_m,
        out,
    )
    if len(spans) > _APPLY_MAX_PARTS:
        raise ValueError(f"lora_linear takes at most {_APPLY_MAX_PARTS} parts, got {len(spans)}")
    if x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("x and weight rows must be contiguous")
    row_groups, tile_groups, tile_counts = row_tiles
    _check_layout(
        a_offsets=a_offsets,
        total_ranks=total_ranks,
        group_slots=group_slots,
        row_groups=row_groups,
        tile_counts=tile_counts,
        b_offsets=b_offsets,
        ranks=ranks,
        y_offsets=y_offsets,
        scaling=scaling,
        bias=bias,
    )
    num_tokens, hidden_in = x.shape
    if out is None:
        out = torch.empty(num_tokens, weight.shape[0], dtype=x.dtype, device=x.device)
    elif out.stride(1) != 1:
        raise ValueError("out rows must be contiguous")
    if num_tokens == 0 or weight.shape[0] == 0:
        return out
    block_r = rank_block(max_part_rank)
    groups = max(1, config.group_columns // block_r)
    scalars, column_tiles = _launch_layout(spans, config.block_n)
    upcast = x.dtype != pool.dtype
    grid = (_cdiv(num_tokens, config.block_m), column_tiles)
    _lora_linear_kernel[grid](
        x,
        weight,
        bias if bias is not None else weight,  # unread without HAS_BIAS
        out,
        pool,
        a_offsets,
        total_ranks,
        b_offsets,
        ranks,
        y_offsets,
        scaling,
        group_slots,
        row_groups,
        tile_groups,
        tile_counts,
        num_tokens,
        hidden_in,
        total_ranks.shape[0],
        max_rank,
        x.stride(0),
        weight.stride(0),
        out.stride(0),
        tile_groups.stride(0),
        *scalars,
        NUM_PARTS=len(spans),
        HAS_BIAS=bias is not None,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        BLOCK_R=block_r,
        GROUPS=groups,
        UPCAST=upcast,
        DOT_PRECISION=_dot_precision(x.dtype),
        LORA_PRECISION=_dot_precision(torch.float32 if upcast else x.dtype),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out
