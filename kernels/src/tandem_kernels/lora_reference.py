"""Plain-torch references for the LoRA ops, the metadata builder they share; also the engine's CPU path.

Each op has the signature and shapes of its public op in `tandem_kernels` (the package docstring
holds the contract). Adapter weights live in one flat pool at per-slot element offsets, each at
its own rank; the ops read them through views of the pool, never copies (unless the pool's dtype
needs an upcast). Work is done per token group, i.e. per adapter: one gather, one GEMM and one
scatter for all of an adapter's tokens, however many requests they come from, and plain views
instead of the gather and scatter when those tokens are consecutive (a prefill). Half and bf16
inputs are upcast so every product accumulates in fp32.

The small per-slot and per-group metadata is read to the host once per call (`.tolist()`: free
on CPU, a sync on GPU), which is also where the data-dependent checks happen.
"""

from __future__ import annotations

import bisect
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, List, Protocol, Tuple  # noqa: UP035 - TorchScript reads the annotations: typing's names

import torch

from . import cpu_extension


def lora_token_groups(
    seq_lens: Sequence[int], seq_slots: Sequence[int | None], device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group the tokens of packed sequences by adapter slot: (token_indices, group_offsets, group_slots).

    seq_lens[i] tokens of sequence i follow those of sequence i - 1 in the batch; seq_slots[i] is
    the adapter slot it uses, or None for the base model alone (its tokens join no group). There is
    one group per distinct slot, in ascending slot order, and its tokens keep their batch order.
    """
    if len(seq_lens) != len(seq_slots):
        raise ValueError(f"{len(seq_lens)} sequence lengths but {len(seq_slots)} slots")
    ranges: dict[int, list[torch.Tensor]] = {}
    start = 0
    for n, slot in zip(seq_lens, seq_slots):
        if n < 0:
            raise ValueError(f"negative sequence length {n}")
        if slot is not None:
            if slot < 0:
                raise ValueError(f"adapter slot {slot} is negative; use None for no adapter")
            ranges.setdefault(slot, []).append(torch.arange(start, start + n, dtype=torch.int64))
        start += n
    slots = sorted(ranges)
    chunks = [torch.cat(ranges[s]) for s in slots]
    offsets = [0]
    for c in chunks:
        offsets.append(offsets[-1] + len(c))
    token_indices = torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.int64)
    return (
        token_indices.to(device),
        torch.tensor(offsets, dtype=torch.int32, device=device),
        torch.tensor(slots, dtype=torch.int32, device=device),
    )


# Rows of token_indices per tile in the tiled launch (lora.py's token tile: tl.dot needs >= 16).
TILE_ROWS = 16


def tile_bounds(bounds: Sequence[int], num_rows: int) -> list[tuple[int, int]]:
    """Per tile of TILE_ROWS rows of token_indices ([num_rows] of them), the groups with tokens in it,
    as (first, end): groups first..end-1, given the cumulative group offsets `bounds`. A tile with
    no grouped token has first == end. Host values in, host values out (the engine fills a static
    buffer with them every step)."""
    num_groups = len(bounds) - 1
    total = bounds[-1]
    tiles = []
    for lo in range(0, num_rows, TILE_ROWS):
        hi = min(lo + TILE_ROWS, total)
        if lo >= hi:
            tiles.append((num_groups, num_groups))
            continue
        # First group ending past lo; end: the groups starting before hi (empty ones after the last
        # token, such as a CUDA graph's padding groups, start at total and are left out).
        tiles.append((bisect.bisect_right(bounds, lo, 1) - 1, bisect.bisect_left(bounds, hi, 0, num_groups)))
    return tiles


def lora_token_tiles(
    group_offsets: torch.Tensor | Sequence[int], num_rows: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """The `tiles` argument of `lora_apply`: [cdiv(num_rows, TILE_ROWS), 2] int32 (`tile_bounds`)."""
    bounds = group_offsets.tolist() if isinstance(group_offsets, torch.Tensor) else list(group_offsets)
    tiles = tile_bounds(bounds, num_rows)
    return torch.tensor(tiles, dtype=torch.int32, device=device).reshape(len(tiles), 2)


def check_tiles(tiles: torch.Tensor, group_offsets: torch.Tensor, num_rows: int) -> None:
    """ValueError unless `tiles` has lora_token_tiles' shape and dtype; on the CPU (where reading the
    values costs no sync) also unless it holds lora_token_tiles(group_offsets, num_rows)."""
    shape = (-(-num_rows // TILE_ROWS), 2)
    if tuple(tiles.shape) != shape or tiles.dtype != torch.int32:
        raise ValueError(f"tiles must be {shape} int32, got {tuple(tiles.shape)} {tiles.dtype}")
    if tiles.device != group_offsets.device:
        raise ValueError(f"tiles is on {tiles.device} but group_offsets on {group_offsets.device}")
    if not tiles.is_contiguous():
        raise ValueError("tiles must be contiguous")
    if tiles.device.type == "cpu":
        expected = tile_bounds(group_offsets.tolist(), num_rows)
        if [tuple(t) for t in tiles.tolist()] != expected:
            raise ValueError("tiles do not match the groups: build them with lora_token_tiles")


# ---------------------------------------------------------------------------------------------
# Checks shared with the Triton launchers (lora.py). check_* look at shapes and dtypes only, so
# they never sync; the data-dependent checks run in _groups, on values already on the host.


def _check_vector(
    name: str, t: torch.Tensor | None, n: int, dtype: torch.dtype, device: torch.device
) -> None:
    # Messages are formatted only on failure: these checks run several times per layer and step.
    if t is None:
        return
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},) like ranks, got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")


def check_metadata(
    pool: torch.Tensor,
    offsets_name: str,
    offsets: torch.Tensor | None,
    ranks: torch.Tensor,
    token_indices: torch.Tensor,
    group_offsets: torch.Tensor,
    group_slots: torch.Tensor,
    **per_slot: tuple[torch.Tensor | None, torch.dtype],
) -> None:
    """ValueError for a pool or metadata of the wrong shape, dtype or device; no host sync. `offsets`
    None: an op that reads none (lora_apply_finish has no shrink)."""
    if pool.dim() != 1:
        raise ValueError(f"pool must be 1-D (a flat view of the pool), got shape {tuple(pool.shape)}")
    if not pool.is_contiguous():
        raise ValueError("pool must be contiguous")
    if not pool.is_floating_point():
        raise ValueError(f"pool must hold floats, got {pool.dtype}")
    if ranks.dim() != 1:
        raise ValueError(f"ranks must be 1-D, got shape {tuple(ranks.shape)}")
    num_slots = ranks.shape[0]
    device = pool.device
    _check_vector("ranks", ranks, num_slots, torch.int32, device)
    _check_vector(offsets_name, offsets, num_slots, torch.int64, device)
    for name, (t, dtype) in per_slot.items():
        _check_vector(name, t, num_slots, dtype, device)
    _check_vector("token_indices", token_indices, token_indices.numel(), torch.int64, device)
    if group_slots.dim() != 1:
        raise ValueError(f"group_slots must be 1-D, got shape {tuple(group_slots.shape)}")
    num_groups = group_slots.shape[0]
    _check_vector("group_slots", group_slots, num_groups, torch.int32, device)
    if group_offsets.shape != (num_groups + 1,):
        raise ValueError(
            f"group_offsets must have shape ({num_groups + 1},) for {num_groups} groups,"
            f" got {tuple(group_offsets.shape)}"
        )
    _check_vector("group_offsets", group_offsets, num_groups + 1, torch.int32, device)


def check_shrink_args(
    x: torch.Tensor,
    pool: torch.Tensor,
    a_offsets: torch.Tensor | None,
    ranks: torch.Tensor,
    token_indices: torch.Tensor,
    group_offsets: torch.Tensor,
    group_slots: torch.Tensor,
    max_rank: int,
) -> None:
    """ValueError for lora_shrink arguments of the wrong shape, dtype or device; no host sync."""
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x must be a [num_tokens, hidden_in] float tensor, got {tuple(x.shape)} {x.dtype}")
    if x.device != pool.device:
        raise ValueError(f"x is on {x.device} but pool on {pool.device}")
    if max_rank < 0:
        raise ValueError(f"max_rank must be >= 0, got {max_rank}")
    check_metadata(pool, "a_offsets", a_offsets, ranks, token_indices, group_offsets, group_slots)


def check_expand_args(
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
    y_offsets: torch.Tensor | None,
) -> None:
    """ValueError for lora_expand arguments of the wrong shape, dtype or device; no host sync."""
    if y.dim() != 2 or y.dtype != torch.float32:
        raise ValueError(f"y must be 2-D float32, got {tuple(y.shape)} {y.dtype}")
    if out.dim() != 2 or not out.is_floating_point():
        raise ValueError(f"out must be a 2-D float tensor, got {tuple(out.shape)} {out.dtype}")
    if out.shape[0] != y.shape[0]:
        raise ValueError(f"out has {out.shape[0]} rows but y has {y.shape[0]}")
    if hidden_out < 0 or out_offset < 0 or out_offset + hidden_out > out.shape[1]:
        raise ValueError(
            f"columns [{out_offset}, {out_offset + hidden_out}) run past out's {out.shape[1]} columns"
        )
    if y.device != pool.device or out.device != pool.device:
        raise ValueError(f"y is on {y.device} and out on {out.device}, but pool on {pool.device}")
    check_metadata(
        pool,
        "b_offsets",
        b_offsets,
        ranks,
        token_indices,
        group_offsets,
        group_slots,
        scaling=(scaling, torch.float32),
        y_offsets=(y_offsets, torch.int64),
    )


def check_part_spans(parts: Sequence[tuple[int, int]], out_width: int) -> tuple[tuple[int, int], ...]:
    """The (out_offset, hidden_out) of each part of a fused projection, checked: non-negative, inside
    out's out_width columns and disjoint (each output column belongs to one part). Returns them as a
    tuple of int pairs; ValueError otherwise. Host values only, so no sync."""
    spans = tuple((int(col), int(width)) for col, width in parts)
    if not spans:
        raise ValueError("lora_apply needs at least one part")
    for col, width in spans:
        if col < 0 or width < 0 or col + width > out_width:
            raise ValueError(f"part columns [{col}, {col + width}) run past out's {out_width} columns")
    ordered = sorted(s for s in spans if s[1] > 0)
    for (col, width), (nxt, _) in zip(ordered, ordered[1:]):
        if col + width > nxt:
            raise ValueError(f"parts overlap: columns [{col}, {col + width}) and [{nxt}, ...)")
    return spans


def check_apply_args(
    x: torch.Tensor,
    pool: torch.Tensor,
    a_offsets: torch.Tensor | None,
    total_ranks: torch.Tensor,
    token_indices: torch.Tensor,
    group_offsets: torch.Tensor,
    group_slots: torch.Tensor,
    max_rank: int,
    b_offsets: torch.Tensor,
    ranks: torch.Tensor,
    y_offsets: torch.Tensor,
    scaling: torch.Tensor,
    num_parts: int,
) -> None:
    """ValueError for lora_apply arguments of the wrong shape, dtype or device; no host sync.

    The group metadata and the shrink's per-slot vectors are checked once, the per-part tables
    ([num_parts, num_slots] each) once for all parts. out (`check_apply_out`) and the part spans
    (`check_part_spans`) are checked apart: lora_apply_begin runs before out exists.
    """
    check_shrink_args(x, pool, a_offsets, total_ranks, token_indices, group_offsets, group_slots, max_rank)
    shape = (num_parts, total_ranks.shape[0])
    device = pool.device
    for name, t, dtype in (
        ("b_offsets", b_offsets, torch.int64),
        ("ranks", ranks, torch.int32),
        ("y_offsets", y_offsets, torch.int64),
        ("scaling", scaling, torch.float32),
    ):
        if t.shape != shape:
            raise ValueError(f"{name} must have shape {shape} (parts, slots), got {tuple(t.shape)}")
        if t.dtype != dtype:
            raise ValueError(f"{name} must be {dtype}, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, expected {device}")


def check_apply_out(out: torch.Tensor, num_tokens: int, device: torch.device) -> None:
    """ValueError unless out is a 2-D float tensor of x's num_tokens rows on the pool's device."""
    if out.dim() != 2 or not out.is_floating_point():
        raise ValueError(f"out must be a 2-D float tensor, got {tuple(out.shape)} {out.dtype}")
    if out.shape[0] != num_tokens:
        raise ValueError(f"out has {out.shape[0]} rows but x has {num_tokens}")
    if out.device != device:
        raise ValueError(f"out is on {out.device} but pool on {device}")


def _groups(
    pool: torch.Tensor,
    offsets: torch.Tensor,
    ranks: torch.Tensor,
    row_length: int,
    y_offsets: torch.Tensor | None,
    y_width: int,
    token_indices: torch.Tensor,
    group_offsets: torch.Tensor,
    group_slots: torch.Tensor,
    rows_too: bool = True,
    width_name: str = "max_rank",
) -> Iterator[tuple[int, int, int, int, slice | torch.Tensor | None]]:
    """Yield (slot, offset, rank, y_offset, rows) per non-empty group of a slot with rank > 0.

    One host read per metadata tensor for the whole call. Slot s's matrix is
    pool[offset:offset + rank * row_length] and its columns of y are [y_offset, y_offset + rank);
    ValueError when either is out of bounds, or the slot is. rows indexes the group's tokens: a
    slice when they are consecutive (one request, the usual prefill), so the caller works on views
    without a gather and a scatter; else the index tensor (None unless rows_too).
    """
    offsets_of = offsets.tolist()
    rank_of = ranks.tolist()
    y_offset_of = y_offsets.tolist() if y_offsets is not None else None
    bounds = group_offsets.tolist()
    slots = group_slots.tolist()
    pool_size = pool.numel()
    num_slots = len(rank_of)
    idx_list: list[int] | None = None
    for g, slot in enumerate(slots):
        lo, hi = bounds[g], bounds[g + 1]
        if hi <= lo:
            continue
        if not 0 <= slot < num_slots:
            raise ValueError(f"group {g} uses slot {slot}, but there are {num_slots} slots")
        rank = rank_of[slot]
        if rank <= 0:
            if rank < 0:
                raise ValueError(f"slot {slot} has negative rank {rank}")
            continue  # no LoRA on this module for this adapter
        if y_offset_of is None:
            y_offset = 0
            if rank > y_width:
                raise ValueError(f"slot {slot} has rank {rank} > {width_name} {y_width}")
        else:
            y_offset = y_offset_of[slot]
            if y_offset < 0 or y_offset + rank > y_width:
                raise ValueError(
                    f"slot {slot} reads columns [{y_offset}, {y_offset + rank}) of y, which has {y_width}"
                )
        offset = offsets_of[slot]
        if offset < 0 or offset + rank * row_length > pool_size:
            raise ValueError(
                f"slot {slot}'s weights [{offset}, {offset + rank * row_length}) run outside"
                f" the pool of {pool_size} elements"
            )
        rows: slice | torch.Tensor | None = None
        if rows_too:
            if idx_list is None:
                idx_list = token_indices.tolist()
            # Host values are cheaper than a few tiny tensor ops per group. Tokens are distinct
            # (the contract), so a group whose span is its size holds exactly that range.
            group = idx_list[lo:hi]
            first, last = min(group), max(group)
            rows = slice(first, last + 1) if last - first == hi - lo - 1 else token_indices[lo:hi]
        yield slot, offset, rank, y_offset, rows


def check_values(
    pool: torch.Tensor,
    offsets: torch.Tensor,
    ranks: torch.Tensor,
    row_length: int,
    y_offsets: torch.Tensor | None,
    y_width: int,
    token_indices: torch.Tensor,
    group_offsets: torch.Tensor,
    group_slots: torch.Tensor,
    width_name: str,
) -> None:
    """The data-dependent checks of the references, alone (reads the metadata to the host)."""
    args = (pool, offsets, ranks, row_length, y_offsets, y_width, token_indices, group_offsets, group_slots)
    for _ in _groups(*args, rows_too=False, width_name=width_name):
        pass


# ---------------------------------------------------------------------------------------------


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
    """y[t, :rank] = x[t] @ A[slot].T for every grouped token; returns [num_tokens, max_rank] float32.

    A[s] is pool[a_offsets[s]:][:ranks[s] * hidden_in] viewed as [ranks[s], hidden_in]. Rows of
    tokens in no group or in a rank-0 slot's group, and columns from the slot's rank on, are zero.
    """
    check_shrink_args(x, pool, a_offsets, ranks, token_indices, group_offsets, group_slots, max_rank)
    num_tokens, hidden_in = x.shape
    y = torch.zeros(num_tokens, max_rank, dtype=torch.float32, device=x.device)
    groups = _groups(
        pool, a_offsets, ranks, hidden_in, None, max_rank, token_indices, group_offsets, group_slots
    )
    base = pool.storage_offset()
    upcast_a, upcast_x = pool.dtype != torch.float32, x.dtype != torch.float32
    for _, offset, rank, _, rows in groups:
        # A.T as one view of the pool (bounds checked by _groups); upcast copies it.
        a_t = pool.as_strided((hidden_in, rank), (1, hidden_in), base + offset)
        if upcast_a:
            a_t = a_t.float()
        if isinstance(rows, slice):
            # Straight into y's rows: x's rows and y's columns are views, the GEMM writes in place.
            xs = x[rows]
            y[rows, :rank].addmm_(xs.float() if upcast_x else xs, a_t)
        else:
            y[rows, :rank] = x.index_select(0, rows).float() @ a_t
    return y


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
    """out[t, out_offset:out_offset + hidden_out] += scaling[slot] * y[t, cols] @ B[slot].T, in place.

    B[s] is pool[b_offsets[s]:][:hidden_out * ranks[s]] viewed as [hidden_out, ranks[s]]; cols are
    [y_offsets[s], y_offsets[s] + ranks[s]) (y_offsets None: from 0). Only grouped tokens of slots
    with rank > 0 are written; the sum is taken in fp32 and rounded to out's dtype once.
    """
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
    groups = _groups(
        pool,
        b_offsets,
        ranks,
        hidden_out,
        y_offsets,
        y.shape[1],
        token_indices,
        group_offsets,
        group_slots,
        width_name="y's column count",
    )
    scale_of = scaling.tolist()
    target = out.narrow(1, out_offset, hidden_out)
    base = pool.storage_offset()
    upcast_b, upcast_out = pool.dtype != torch.float32, out.dtype != torch.float32
    for slot, offset, rank, y_offset, rows in groups:
        # B.T as one view of the pool (bounds checked by _groups); upcast copies it.
        b_t = pool.as_strided((rank, hidden_out), (1, rank), base + offset)
        if upcast_b:
            b_t = b_t.float()
        if isinstance(rows, slice):
            current = target[rows]  # a view of out
            acc = current.float() if upcast_out else current
            # One GEMM accumulating into the output rows: no separate product, scaling and sum passes.
            acc.addmm_(y[rows, y_offset : y_offset + rank], b_t, alpha=scale_of[slot])
            if upcast_out:
                current.copy_(acc)
        else:
            acc = target.index_select(0, rows)
            if upcast_out:
                acc = acc.float()
            acc.addmm_(y.narrow(1, y_offset, rank).index_select(0, rows), b_t, alpha=scale_of[slot])
            # index_put_ on the view writes into out; index_copy_ is slow on CPU for small copies
            # (see reference.store_kvcache).
            target[rows] = acc.to(out.dtype) if upcast_out else acc


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
    """One fused projection's LoRA, in place: `lora_shrink` over the stacked A, then `lora_expand` per part.

    Part p adds into out[:, parts[p][0]:][:, :parts[p][1]] with b_offsets[p], ranks[p],
    y_offsets[p] and scaling[p] (rows of the [num_parts, num_slots] tables). `tiles`
    (`lora_token_tiles`) only selects the Triton launch's layout; here it is checked and unused.
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


class PendingLoRA(Protocol):
    """What `lora_apply_begin` returns, on either backend: the shrink is launched; `finish(out)`
    adds every part's expand into out, in place."""

    def finish(self, out: torch.Tensor) -> None: ...


class PendingApply:
    """The reference's PendingLoRA: y computed at begin, the expands at finish."""

    def __init__(
        self, y: torch.Tensor, pool: torch.Tensor, groups: tuple, tables: tuple, parts: Sequence
    ) -> None:
        self.y, self.pool, self.groups, self.tables, self.parts = y, pool, groups, tables, parts

    def finish(self, out: torch.Tensor) -> None:
        check_apply_out(out, self.y.shape[0], self.pool.device)
        spans = check_part_spans(self.parts, out.shape[1])
        b_offsets, ranks, y_offsets, scaling = self.tables
        for p, (col, width) in enumerate(spans):
            lora_expand(
                self.y,
                self.pool,
                b_offsets[p],
                ranks[p],
                *self.groups,
                out,
                scaling[p],
                col,
                width,
                y_offsets[p],
            )


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
    """`lora_apply`'s shrink now, its expands at `finish(out)`: out need not exist yet."""
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
    if tiles is not None:
        check_tiles(tiles, group_offsets, token_indices.shape[0])
    groups = (token_indices, group_offsets, group_slots)
    y = lora_shrink(x, pool, a_offsets, total_ranks, *groups, max_rank)
    return PendingApply(y, pool, groups, (b_offsets, ranks, y_offsets, scaling), parts)


def check_finish_args(
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
    num_parts: int,
    tiles: torch.Tensor | None,
) -> None:
    """ValueError for lora_apply_finish arguments of the wrong shape, dtype or device (no host sync);
    on the CPU also for a part's columns of y running past its slot's total_ranks. (out is checked
    where the expands start, `PendingApply.finish`, as lora_apply's is.)"""
    if y.dim() == 2 and not 0 <= max_rank <= y.shape[1]:
        raise ValueError(f"max_rank must be in [0, {y.shape[1]}] (y's columns), got {max_rank}")
    # lora_apply's checks, with y as x and no A offsets (there is no shrink).
    check_apply_args(
        y, pool, None, total_ranks, token_indices, group_offsets, group_slots, max_rank,
        b_offsets, ranks, y_offsets, scaling, num_parts,
    )  # fmt: skip
    if tiles is not None:
        check_tiles(tiles, group_offsets, token_indices.shape[0])
    if pool.device.type == "cpu" and group_slots.numel():  # free here; on a GPU it would cost a sync
        used = group_slots.long()
        past = (ranks[:, used] > 0) & (y_offsets[:, used] + ranks[:, used] > total_ranks[used].long())
        if past.any():
            raise ValueError("a part's columns of y run past its slot's total_ranks")


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
    """`lora_apply`'s expands alone, on a y computed elsewhere (the package docstring has the
    contract); `tiles` and max_part_rank only shape the Triton launch: here they are unused."""
    args = (y, pool, total_ranks, token_indices, group_offsets, group_slots, max_rank, out)
    check_finish_args(*args, b_offsets, ranks, y_offsets, scaling, len(parts), tiles)
    groups = (token_indices, group_offsets, group_slots)
    tables = (b_offsets, ranks, y_offsets, scaling)
    PendingApply(y[:, :max_rank].float(), pool, groups, tables, parts).finish(out)  # lora_expand reads fp32


# ---------------------------------------------------------------------------------------------
# The engine's CPU path: one fused projection (shrink over its stacked A rows, then one expand per
# part) for every adapter of a step, with the metadata already on the host. The per-op costs that
# dominate a decode step on a CPU (a gather, a scatter and a tiny GEMM per group and per op, the
# metadata read back per op, an OpenMP fork/join per GEMM) are paid once per call or not at all.

# A group with fewer tokens than this runs its GEMMs on one thread: waking the other OpenMP threads
# costs more than the product of a few rows with a rank-r matrix (and, on a loaded machine, a
# descheduled thread stalls the whole fork/join).
SMALL_GROUP_TOKENS = 64


class HostGroups:
    """One step's token groups, on the host: which rows of x and out each adapter's tokens are.

    Built from the packed sequences like `lora_token_groups` (one group per distinct slot, in
    ascending slot order, tokens in batch order). `slots[g]` is group g's adapter slot and its
    tokens are `token_indices[bounds[g]:bounds[g + 1]]`. When every group's tokens are consecutive
    (one request per adapter: a prefill, a single-request batch), `runs[g]` is that slice and the op
    works on views of x and out; otherwise `runs` is None and the op gathers the rows of all groups
    once, and scatters them back once.
    """

    __slots__ = ("bounds", "largest", "runs", "slots", "token_indices")

    def __init__(self, seq_lens: Sequence[int], seq_slots: Sequence[int | None]) -> None:
        if len(seq_lens) != len(seq_slots):
            raise ValueError(f"{len(seq_lens)} sequence lengths but {len(seq_slots)} slots")
        spans: dict[int, list[tuple[int, int]]] = {}
        start = 0
        for n, slot in zip(seq_lens, seq_slots):
            if n < 0:
                raise ValueError(f"negative sequence length {n}")
            if slot is not None:
                if slot < 0:
                    raise ValueError(f"adapter slot {slot} is negative; use None for no adapter")
                if n:
                    spans.setdefault(slot, []).append((start, start + n))
            start += n
        self.slots = sorted(spans)
        self.bounds = [0]
        indices: list[int] = []
        runs: list[slice] = []
        consecutive = True
        for slot in self.slots:
            first = spans[slot][0][0]
            for lo, hi in spans[slot]:
                indices.extend(range(lo, hi))
            end = spans[slot][-1][1]
            consecutive = consecutive and end - first == len(indices) - self.bounds[-1]
            runs.append(slice(first, end))
            self.bounds.append(len(indices))
        self.runs: list[slice] | None = runs if consecutive else None
        self.largest = max((hi - lo for lo, hi in zip(self.bounds, self.bounds[1:])), default=0)
        self.token_indices = torch.tensor(indices, dtype=torch.int64)


# Per group, the work of one fused projection: (a_offset, total_rank, parts), each part
# (b_offset, rank, y_offset, scaling, out_column, hidden_out); None: no LoRA here for that adapter.
GroupWork = tuple[int, int, Sequence[tuple[int, int, int, float, int, int]]]


# One group for the scripted loop: (first row, end row, A as [hidden_in, total_rank], parts), each
# part (B as [rank, width], first and end column of y, first and end column of out, scaling).
ScriptedGroup = Tuple[int, int, torch.Tensor, List[Tuple[torch.Tensor, int, int, int, int, float]]]  # noqa: UP006


def _run_groups(x: torch.Tensor, out: torch.Tensor, groups: List[ScriptedGroup]) -> None:  # noqa: UP006
    """out[lo:hi, col] += scale * (x[lo:hi] @ A)[:, y cols] @ B, for each part of each group."""
    for lo, hi, a_t, parts in groups:
        y = torch.mm(x[lo:hi], a_t)
        target = out[lo:hi]
        for b_t, y_lo, y_hi, col_lo, col_hi, scale in parts:
            target[:, col_lo:col_hi].addmm_(y[:, y_lo:y_hi], b_t, alpha=scale)


def _run_groups_in_halves(
    x: torch.Tensor,
    out: torch.Tensor,
    groups: List[ScriptedGroup],  # noqa: UP006
    split: int,
) -> None:
    """Groups [split:] on an inter-op thread while this thread does [:split]: rows are disjoint."""
    if split <= 0 or split >= len(groups):
        _run_groups(x, out, groups)
        return
    fut = torch.jit.fork(_run_groups, x, out, groups[split:])
    _run_groups(x, out, groups[:split])
    torch.jit.wait(fut)


def _script_group_loop():
    """The group loop compiled by TorchScript, or None where TorchScript is gone.

    A decode step with many adapters is thousands of tiny GEMMs; in TorchScript's interpreter each
    costs a fraction of a Python call, and `torch.jit.fork` runs half the groups on a second core
    (Python threads would serialise on the GIL between ops). Measured on this project's 2-core CI
    machines, the LoRA work of a 64-request decode step over 38 adapters went from 65 ms (Python
    loop) to 35 ms, with bit-identical results (each GEMM still runs on one thread). torch 2.13
    deprecates `torch.jit.script` in favour of torch.compile, which would compile C++ per batch
    shape at run time; the warning is silenced here and the Python loop stays as the fallback.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.script(_run_groups_in_halves)
    except Exception:  # TorchScript missing or unable to compile: use the Python loop
        return None


_GROUP_LOOP = _script_group_loop()


def lora_apply_grouped(
    x: torch.Tensor,
    out: torch.Tensor,
    pool: torch.Tensor,
    groups: HostGroups,
    work: Sequence[GroupWork | None],
) -> None:
    """out[t, col:col + w] += s * (x[t] @ A.T)[:, y_off:y_off + r] @ B.T for each part of each group.

    The same arithmetic as `lora_shrink` then one `lora_expand` per part, for one fused projection:
    A (total_rank rows, hidden_in each) and the parts' B ([w, r], row-major) are views of the pool at
    the given element offsets. Products accumulate in fp32; out is rounded to its dtype once.
    Tokens of no group are untouched. ValueError when a matrix lies outside the pool.

    How, on the CPU: a decode step (every group under `SMALL_GROUP_TOKENS` tokens, all fp32) in
    one call of the C++ op (`cpu_extension`; its sums run in another order than MKL's, so results
    differ in the last bits), else in TorchScript's loop; larger groups (a prefill) with one GEMM
    per matrix on every thread.
    """
    if len(work) != len(groups.slots):
        raise ValueError(f"{len(work)} work items for {len(groups.slots)} groups")
    if not any(work):
        return
    num_tokens, hidden_in = x.shape
    if out.shape[0] != num_tokens:
        raise ValueError(f"out has {out.shape[0]} rows but x has {num_tokens}")
    upcast_a = pool.dtype != torch.float32
    upcast_x, upcast_out = x.dtype != torch.float32, out.dtype != torch.float32
    # Every matrix is checked before anything is computed: a bad slot changes nothing.
    small = groups.largest < SMALL_GROUP_TOKENS
    native = native_op(x, out, pool, groups)
    views = native is None and groups.runs is not None and not upcast_out
    checked = _checked_groups(pool, hidden_in, groups, work, views)
    if native is not None:
        # A decode step: the whole projection in one C++ call, rows indexed in place.
        native.lora_grouped(x, out, pool, groups.token_indices, *_group_table(checked))
        return
    items, weights = _group_views(pool, hidden_in, checked)
    threads = torch.get_num_threads()
    # All groups small (a decode step): the whole call on one thread, gathers included.
    current = 1 if small else threads
    if current != threads:
        torch.set_num_threads(current)
    try:
        if views:
            xs_all, target = x, out
        else:
            xs_all = x.index_select(0, groups.token_indices)
            target = out.index_select(0, groups.token_indices)
            if upcast_out:
                target = target.float()
        if upcast_x:
            xs_all = xs_all.float()
        if _GROUP_LOOP is not None and current == 1 and not (upcast_a or upcast_x or upcast_out):
            _GROUP_LOOP(xs_all, target, items, _half_point(weights))
        else:
            for lo, hi, a_t, parts in items:
                want = 1 if hi - lo < SMALL_GROUP_TOKENS else threads
                if want != current:
                    torch.set_num_threads(want)
                    current = want
                y = torch.mm(xs_all[lo:hi], a_t.float() if upcast_a else a_t)
                tg = target[lo:hi]
                for b_t, y_lo, y_hi, col_lo, col_hi, scale in parts:
                    tg[:, col_lo:col_hi].addmm_(
                        y[:, y_lo:y_hi], b_t.float() if upcast_a else b_t, alpha=scale
                    )
        if not views:
            out[groups.token_indices] = target.to(out.dtype) if upcast_out else target
    finally:
        if current != threads:
            torch.set_num_threads(threads)


def native_op(x: torch.Tensor, out: torch.Tensor, pool: torch.Tensor, groups: HostGroups) -> Any | None:
    """The C++ op (`cpu_extension`) if it serves this call, else None: a decode step (every group
    under `SMALL_GROUP_TOKENS` tokens), all fp32 on the CPU, with contiguous rows."""
    if groups.largest >= SMALL_GROUP_TOKENS or x.device.type != "cpu":
        return None
    if not x.dtype == out.dtype == pool.dtype == torch.float32:
        return None
    if x.stride(1) != 1 or out.stride(1) != 1 or not pool.is_contiguous():
        return None
    return cpu_extension.load()


class NativeTables:
    """The C++ op's metadata for one fused projection in every layer of a step, built and checked
    once per step. Per layer, `_checked_groups` and `_group_table` cost more Python time than
    the op's own arithmetic on a 64-request decode step over 38 adapters (profiled).

    `a_offsets`/`total_ranks` are [layers, groups] (the step's slots, in `groups.slots` order);
    each part is (b_offsets, ranks, y_offsets [layers, groups], scaling [groups], out column,
    width). Rank-0 entries (an adapter without this projection in a layer) stay in the tables; the
    op skips them. ValueError, before anything is computed, when a matrix lies outside the pool.
    """

    def __init__(
        self,
        pool_numel: int,
        hidden_in: int,
        groups: HostGroups,
        a_offsets: torch.Tensor,
        total_ranks: torch.Tensor,
        parts: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, int]],
        threads: int,
    ) -> None:
        i64 = torch.int64
        num_layers, num_groups = a_offsets.shape
        bounds = torch.tensor(groups.bounds, dtype=i64)
        a, tr = a_offsets.to(i64), total_ranks.to(i64)
        lo, hi = bounds[:-1].expand(num_layers, -1), bounds[1:].expand(num_layers, -1)
        self.groups = torch.stack((lo, hi, a, tr), -1).contiguous()  # [L, G, 4]
        bad = (tr > 0) & ((a < 0) | (a + tr * hidden_in > pool_numel))
        elems = tr * hidden_in
        cols, scales = [], []
        for b, r, y, scaling, col, width in parts:
            b, r, y = b.to(i64), r.to(i64), y.to(i64)
            on = r > 0
            bad |= on & ((b < 0) | (b + r * width > pool_numel) | (y < 0) | (y > tr - r))
            elems = elems + torch.where(on, r * width, 0)
            const = torch.full_like(b, col), torch.full_like(b, width)
            cols.append(torch.stack((b, r, y, *const), -1))  # [L, G, 5]
            scales.append(scaling.to(torch.float64))
        if bool(bad.any()):
            layer, g = (int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"slot {groups.slots[g]}'s LoRA matrices in layer {layer} lie outside the pool of"
                f" {pool_numel} elements"
            )
        n = len(parts)
        self.parts = torch.stack(cols, 2).reshape(num_layers, num_groups * n, 5).contiguous()
        self.part_start = torch.arange(0, num_groups * n + 1, n, dtype=i64)
        self.scales = torch.stack(scales, 1).reshape(-1).contiguous()  # [G * n]
        # Per layer, about equal bytes per thread: each threshold's first group reaching it.
        cum = elems.cumsum(1).to(torch.float64)
        steps = torch.arange(1, threads, dtype=torch.float64) / threads
        cuts = torch.searchsorted(cum, cum[:, -1:] * steps, side="left") + 1
        edge = torch.full((num_layers, 1), num_groups, dtype=i64)
        self.chunks = torch.cat((torch.zeros_like(edge), cuts.clamp(max=num_groups), edge), 1).contiguous()

    def layer(self, i: int) -> tuple[torch.Tensor, ...]:
        """The op's (groups, parts, part_start, scales, chunks) for layer i."""
        return self.groups[i], self.parts[i], self.part_start, self.scales, self.chunks[i]


# One group, checked: (first row, end row, A's offset, total rank, parts, elements read), each part
# (B's offset, rank, first column of y, scaling, first column of out, width).
CheckedGroup = tuple[int, int, int, int, list[tuple[int, int, int, float, int, int]], int]


def _checked_groups(
    pool: torch.Tensor,
    hidden_in: int,
    groups: HostGroups,
    work: Sequence[GroupWork | None],
    on_runs: bool,
) -> list[CheckedGroup]:
    """Each group with work, every matrix's bounds checked against the pool (ValueError if not).

    The rows index x and out themselves when `on_runs` (`groups.runs`), else the gathered rows
    (`groups.bounds`, which are also offsets into `groups.token_indices`)."""
    size = pool.numel()
    out: list[CheckedGroup] = []
    for g, item in enumerate(work):
        if item is None:
            continue
        a_offset, total_rank, parts = item
        if a_offset < 0 or total_rank < 1 or a_offset + total_rank * hidden_in > size:
            raise ValueError(
                f"slot {groups.slots[g]}'s A [{a_offset}, {a_offset + total_rank * hidden_in})"
                f" lies outside the pool of {size} elements"
            )
        elems = total_rank * hidden_in
        kept = []
        for b_offset, rank, y_offset, scaling, col, width in parts:
            if rank <= 0:
                continue
            if b_offset < 0 or b_offset + rank * width > size or not 0 <= y_offset <= total_rank - rank:
                raise ValueError(
                    f"slot {groups.slots[g]}'s B [{b_offset}, {b_offset + rank * width}) or its y"
                    f" columns [{y_offset}, {y_offset + rank}) lie outside the pool or y"
                )
            kept.append((b_offset, rank, y_offset, float(scaling), col, width))
            elems += rank * width
        if on_runs:
            lo, hi = groups.runs[g].start, groups.runs[g].stop  # type: ignore[index]
        else:
            lo, hi = groups.bounds[g], groups.bounds[g + 1]
        out.append((lo, hi, a_offset, total_rank, kept, elems))
    return out


def _group_table(checked: list[CheckedGroup]) -> tuple[torch.Tensor, ...]:
    """The C++ op's metadata (csrc/lora_grouped_cpu.cpp): groups, parts, part_start, scales, chunks.

    Chunks split the groups by the bytes they read, one chunk per thread (ranks differ 8-fold)."""
    rows, parts, starts, scales = [], [], [0], []
    for lo, hi, a_offset, total_rank, kept, _ in checked:
        rows.append((lo, hi, a_offset, total_rank))
        for b_offset, rank, y_offset, scaling, col, width in kept:
            parts.append((b_offset, rank, y_offset, col, width))
            scales.append(scaling)
        starts.append(len(parts))
    chunks = _chunks([c[5] for c in checked], torch.get_num_threads())
    i64 = torch.int64
    return (
        torch.tensor(rows, dtype=i64).reshape(-1, 4),
        torch.tensor(parts, dtype=i64).reshape(-1, 5),
        torch.tensor(starts, dtype=i64),
        torch.tensor(scales, dtype=torch.float64),
        torch.tensor(chunks, dtype=i64),
    )


def _chunks(weights: list[int], n: int) -> list[int]:
    """Boundaries splitting the items, in order, into at most n runs of about equal weight."""
    total, bounds, acc = sum(weights), [0], 0
    for i, w in enumerate(weights):
        acc += w
        if len(bounds) < n and acc >= total * len(bounds) / n and i + 1 < len(weights):
            bounds.append(i + 1)
    bounds.append(len(weights))
    return bounds


def _group_views(
    pool: torch.Tensor, hidden_in: int, checked: list[CheckedGroup]
) -> tuple[list[ScriptedGroup], list[int]]:
    """Each checked group's rows and its matrices as views of the pool; and the elements each
    group reads, for splitting the groups between two threads."""
    base = pool.storage_offset()
    items: list[ScriptedGroup] = []
    for lo, hi, a_offset, total_rank, kept, _ in checked:
        views = [
            (
                pool.as_strided((rank, width), (1, rank), base + b_offset),
                y_offset,
                y_offset + rank,
                col,
                col + width,
                scaling,
            )
            for b_offset, rank, y_offset, scaling, col, width in kept
        ]
        a_t = pool.as_strided((hidden_in, total_rank), (1, hidden_in), base + a_offset)
        items.append((lo, hi, a_t, views))
    return items, [c[5] for c in checked]


def _half_point(weights: list[int]) -> int:
    """How many leading groups make about half the weight (0: too few groups to split)."""
    split, acc, half = 0, 0, sum(weights) / 2
    for w in weights[:-1]:
        split += 1
        acc += w
        if acc >= half:
            break
    return split
