"""The LoRA ops: references against a naive per-token float64 loop, Triton against the references.

Adapter weights live in one flat pool, as the engine keeps them inside the KV-cache pool: every
slot's A and B at its own offset, in a random order (so adapters interleave) with gaps between
them. The gaps hold NaN, so reading past a matrix shows up as NaN in the output; rows of x that
belong to no adapter, or to an adapter without LoRA on the module (rank 0), hold inf, so reading
those does too. A batch mixes adapters of different ranks (0 and max_rank included) with tokens of
no adapter. Triton kernels run on CPU through TRITON_INTERPRET=1 (set in conftest.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import tandem_kernels
from tandem_kernels import cpu_extension, lora_reference

from .conftest import BF16_DOT_BROKEN, requires_triton

# Largest |kernel - reference| over largest |reference|, per lowest-precision dtype involved.
TOLERANCE = {torch.float32: 1e-3, torch.float16: 5e-3, torch.bfloat16: 3e-2}
LORA_ALPHA = 16.0
HEAD = 7  # NaN elements of the buffer before the pool view
TAIL = 128  # NaN elements after the last matrix
UNUSED_OFFSET = 1 << 40  # rank-0 slots get an offset far outside the pool: it must never be used


def tolerance(*dtypes: torch.dtype) -> float:
    return max(TOLERANCE[d] for d in dtypes)


def pack(
    mats: list[torch.Tensor], dtype: torch.dtype, gen: torch.Generator
) -> tuple[torch.Tensor, list[int]]:
    """One 1-D pool holding every matrix, in a random order with NaN gaps; returns (pool, offsets).

    The pool is a view that starts inside a larger NaN-led buffer, as a flat view of part of the
    KV-cache pool would: offsets count from the view's start, not the buffer's.
    """
    offsets = [0] * len(mats)
    pieces = [torch.full((HEAD,), float("nan"))]
    pos = 0
    for i in torch.randperm(len(mats), generator=gen).tolist():
        gap = int(torch.randint(0, 6, (), generator=gen))
        pieces += [torch.full((gap,), float("nan")), mats[i].flatten()]
        offsets[i] = pos + gap
        pos += gap + mats[i].numel()
    pieces.append(torch.full((TAIL,), float("nan")))  # room for off-by-one reads, which must show
    return torch.cat(pieces).to(dtype)[HEAD:], offsets


def random_a(rank: int, hidden_in: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(rank, hidden_in, generator=gen) * hidden_in**-0.5


def random_b(rank: int, hidden_out: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(hidden_out, rank, generator=gen) * max(rank, 1) ** -0.5


def offsets_tensor(offsets: list[int], ranks: list[int]) -> torch.Tensor:
    return torch.tensor([o if r > 0 else UNUSED_OFFSET for o, r in zip(offsets, ranks)], dtype=torch.int64)


def scaling_tensor(ranks: list[int]) -> torch.Tensor:
    # NaN for rank-0 slots: a skipped group must not touch its scale either.
    return torch.tensor([LORA_ALPHA / r if r > 0 else float("nan") for r in ranks], dtype=torch.float32)


@dataclass(frozen=True)
class Adapters:
    """One module's LoRA for every slot, stored in a shared pool."""

    pool: torch.Tensor  # 1-D
    a: list[torch.Tensor]  # per slot [rank, hidden_in], float64, the values the pool holds
    b: list[torch.Tensor]  # per slot [hidden_out, rank], likewise
    a_offsets: torch.Tensor  # [num_slots] int64
    b_offsets: torch.Tensor  # [num_slots] int64
    ranks: torch.Tensor  # [num_slots] int32
    scaling: torch.Tensor  # [num_slots] float32
    max_rank: int
    hidden_out: int


def make_adapters(
    ranks: list[int], hidden_in: int, hidden_out: int, dtype: torch.dtype, gen: torch.Generator
) -> Adapters:
    a = [random_a(r, hidden_in, gen) for r in ranks]
    b = [random_b(r, hidden_out, gen) for r in ranks]
    pool, offsets = pack(a + b, dtype, gen)
    n = len(ranks)
    return Adapters(
        pool,
        [m.to(dtype).double() for m in a],
        [m.to(dtype).double() for m in b],
        offsets_tensor(offsets[:n], ranks),
        offsets_tensor(offsets[n:], ranks),
        torch.tensor(ranks, dtype=torch.int32),
        scaling_tensor(ranks),
        max(ranks),
        hidden_out,
    )


@dataclass(frozen=True)
class Batch:
    token_slots: list[int | None]  # per token, for the naive loops
    groups: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # token_indices, group_offsets, group_slots
    x: torch.Tensor  # [num_tokens, hidden_in], inf on tokens whose adapter has no LoRA here


def make_batch(
    seq_lens: list[int],
    seq_slots: list[int | None],
    ranks: list[int],
    hidden_in: int,
    dtype: torch.dtype,
    gen: torch.Generator,
) -> Batch:
    token_slots = [slot for n, slot in zip(seq_lens, seq_slots) for _ in range(n)]
    x = torch.randn(len(token_slots), hidden_in, generator=gen)
    x[[slot is None or ranks[slot] == 0 for slot in token_slots]] = float("inf")
    return Batch(token_slots, tandem_kernels.lora_token_groups(seq_lens, seq_slots), x.to(dtype))


def shrink_args(batch: Batch, ad: Adapters, x: torch.Tensor | None = None) -> tuple:
    x = batch.x if x is None else x
    return (x, ad.pool, ad.a_offsets, ad.ranks, *batch.groups, ad.max_rank)


def expand_args(y: torch.Tensor, batch: Batch, ad: Adapters, out: torch.Tensor, out_offset: int) -> tuple:
    return (y, ad.pool, ad.b_offsets, ad.ranks, *batch.groups, out, ad.scaling, out_offset, ad.hidden_out)


def naive_shrink(x: torch.Tensor, ad: Adapters, token_slots: list[int | None]) -> torch.Tensor:
    y = torch.zeros(x.shape[0], ad.max_rank, dtype=torch.float64)
    for t, slot in enumerate(token_slots):
        if slot is not None and ad.a[slot].shape[0] > 0:
            y[t, : ad.a[slot].shape[0]] = ad.a[slot] @ x[t].double()
    return y


def naive_expand(
    y: torch.Tensor,
    ad: Adapters,
    token_slots: list[int | None],
    out: torch.Tensor,
    out_offset: int,
    y_offsets: list[int] | None = None,
) -> torch.Tensor:
    """out after the expand, in float64 (not rounded to out's dtype)."""
    expected = out.double()
    for t, slot in enumerate(token_slots):
        if slot is not None and ad.b[slot].shape[1] > 0:
            r = ad.b[slot].shape[1]
            y_offset = y_offsets[slot] if y_offsets is not None else 0
            delta = ad.b[slot] @ y[t, y_offset : y_offset + r].double()
            expected[t, out_offset : out_offset + ad.hidden_out] += float(ad.scaling[slot]) * delta
    return expected


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """NaN (which fails every `<` check) when either side holds NaN."""
    expected = expected.double()
    return float((actual.double() - expected).abs().max() / expected.abs().max())


def make_out(num_tokens: int, width: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    # Small next to the LoRA delta, so comparing the whole output compares the delta.
    return (0.1 * torch.randn(num_tokens, width, generator=gen)).to(dtype)


# Adapters of ranks 4, 8, 16 and 64 (max_rank), one without LoRA on the module (rank 0) and a rank
# that is no power of two; requests of 1 to 33 tokens (decodes are length 1), tokens without an
# adapter between them, adapters whose requests are not adjacent (slot 5's two requests are one
# token apart: the gather path) and a one-request adapter (slot 2's 33 tokens: the slice path).
RANKS = [4, 8, 16, 64, 0, 12]
SEQ_LENS = [1, 7, 33, 1, 5, 2, 1, 17, 1, 2, 3, 4]
SEQ_SLOTS = [0, None, 2, 3, 1, None, 0, 5, None, 5, 3, 4]


@pytest.mark.parametrize(
    ("hidden_in", "hidden_out", "width", "out_offset"),
    [
        (576, 1536, 1536, 0),
        (576, 192, 576 + 2 * 192, 576 + 192),  # the v part of a fused qkv projection
        (4096, 576, 576, 0),
    ],
)
def test_reference_matches_naive(hidden_in, hidden_out, width, out_offset):
    gen = torch.Generator().manual_seed(0)
    ad = make_adapters(RANKS, hidden_in, hidden_out, torch.float32, gen)
    batch = make_batch(SEQ_LENS, SEQ_SLOTS, RANKS, hidden_in, torch.float32, gen)
    y = lora_reference.lora_shrink(*shrink_args(batch, ad))
    assert y.shape == (len(batch.token_slots), max(RANKS)) and y.dtype == torch.float32
    assert rel_err(y, naive_shrink(batch.x, ad, batch.token_slots)) < 1e-5

    out = make_out(len(batch.token_slots), width, torch.float32, gen)
    expected = naive_expand(y, ad, batch.token_slots, out, out_offset)
    lora_reference.lora_expand(*expand_args(y, batch, ad, out, out_offset))
    assert rel_err(out, expected) < 1e-5


def test_naive_comparison_catches_slot_scaling_offset_and_rank_bugs():
    # The checks above are only worth something if the usual mistakes move the output past tolerance.
    gen = torch.Generator().manual_seed(1)
    ad = make_adapters(RANKS, 64, 48, torch.float32, gen)
    batch = make_batch(SEQ_LENS, SEQ_SLOTS, RANKS, 64, torch.float32, gen)
    token_indices, group_offsets, group_slots = batch.groups
    y = naive_shrink(batch.x, ad, batch.token_slots).float()
    out = make_out(len(batch.token_slots), 100, torch.float32, gen)
    expected = naive_expand(y, ad, batch.token_slots, out, 50)
    used = ad.ranks > 0
    num_slots = len(RANKS)

    def expand(**changes) -> torch.Tensor:
        args = {
            "y": y,
            "pool": ad.pool,
            "b_offsets": ad.b_offsets,
            "ranks": ad.ranks,
            "token_indices": token_indices,
            "group_offsets": group_offsets,
            "group_slots": group_slots,
            "out": out.clone(),
            "scaling": ad.scaling,
            "out_offset": 50,
            "hidden_out": 48,
            **changes,
        }
        lora_reference.lora_expand(**args)
        return args["out"]

    def shrink(**changes) -> torch.Tensor:
        args = {
            "x": batch.x,
            "pool": ad.pool,
            "a_offsets": ad.a_offsets,
            "ranks": ad.ranks,
            "token_indices": token_indices,
            "group_offsets": group_offsets,
            "group_slots": group_slots,
            "max_rank": max(RANKS),
            **changes,
        }
        return lora_reference.lora_shrink(**args)

    assert rel_err(expand(), expected) < 1e-5
    assert rel_err(shrink(), y) < 1e-5
    shifted = group_offsets.clone()
    shifted[1] += 1  # the first token of group 1 goes to group 0's adapter
    one_more = torch.where(used & (ad.ranks < max(RANKS)), ad.ranks + 1, ad.ranks)
    rotated = (group_slots + 1) % num_slots
    expand_bugs = {
        "wrong slot": expand(group_slots=rotated),
        "no scaling": expand(scaling=torch.ones_like(ad.scaling)),
        "wrong out offset": expand(out_offset=49),
        "rank too large": expand(ranks=one_more),
        "B one element off": expand(b_offsets=torch.where(used, ad.b_offsets + 1, ad.b_offsets)),
        "token in the wrong group": expand(group_offsets=shifted),
    }
    for bug, result in expand_bugs.items():
        assert not rel_err(result, expected) < 1e-2, bug
    shrink_bugs = {
        "wrong slot": shrink(group_slots=rotated),
        "rank too large": shrink(ranks=one_more),
        "A one element off": shrink(a_offsets=torch.where(used, ad.a_offsets + 1, ad.a_offsets)),
        "token in the wrong group": shrink(group_offsets=shifted),
    }
    for bug, result in shrink_bugs.items():
        assert not rel_err(result, y) < 1e-2, bug


@pytest.mark.parametrize(
    ("x_dtype", "pool_dtype", "out_dtype"),
    [
        (torch.float16, torch.float16, torch.float16),
        (torch.bfloat16, torch.bfloat16, torch.bfloat16),
        (torch.float32, torch.bfloat16, torch.float32),  # a bf16 pool under fp32 activations: upcast
    ],
)
def test_reference_low_precision(x_dtype, pool_dtype, out_dtype):
    gen = torch.Generator().manual_seed(2)
    ad = make_adapters(RANKS, 128, 96, pool_dtype, gen)
    batch = make_batch(SEQ_LENS, SEQ_SLOTS, RANKS, 128, x_dtype, gen)
    y = lora_reference.lora_shrink(*shrink_args(batch, ad))
    assert y.dtype == torch.float32
    assert rel_err(y, naive_shrink(batch.x, ad, batch.token_slots)) < 1e-5  # products of exact values
    out = make_out(len(batch.token_slots), 96, out_dtype, gen)
    expected = naive_expand(y, ad, batch.token_slots, out, 0)
    lora_reference.lora_expand(*expand_args(y, batch, ad, out, 0))
    assert out.dtype == out_dtype
    assert rel_err(out, expected) < tolerance(out_dtype)


def test_reference_slice_and_gather_paths():
    # Consecutive tokens (in any order) take the slice path, others the index path; both are right.
    token_indices = torch.tensor([5, 3, 4, 0, 7, 2, 9], dtype=torch.int64)
    group_offsets = torch.tensor([0, 3, 6, 7], dtype=torch.int32)  # {3, 4, 5}, {0, 2, 7}, {9}
    group_slots = torch.tensor([1, 0, 2], dtype=torch.int32)
    ranks = [8, 4, 16]
    token_slots: list[int | None] = [None] * 10
    for g, slot in enumerate(group_slots.tolist()):
        for t in token_indices[group_offsets[g] : group_offsets[g + 1]].tolist():
            token_slots[t] = slot
    gen = torch.Generator().manual_seed(9)
    ad = make_adapters(ranks, 40, 24, torch.float32, gen)
    groups = (token_indices, group_offsets, group_slots)
    plan = lora_reference._groups(ad.pool, ad.a_offsets, ad.ranks, 40, None, 16, *groups)
    rows = [r for _, _, _, _, r in plan]
    assert rows[0] == slice(3, 6) and rows[2] == slice(9, 10)
    assert isinstance(rows[1], torch.Tensor) and rows[1].tolist() == [0, 7, 2]

    x = torch.randn(10, 40, generator=gen)
    x[[s is None for s in token_slots]] = float("inf")
    y = lora_reference.lora_shrink(x, ad.pool, ad.a_offsets, ad.ranks, *groups, 16)
    assert rel_err(y, naive_shrink(x, ad, token_slots)) < 1e-5
    out = make_out(10, 24, torch.bfloat16, gen)
    expected = naive_expand(y, ad, token_slots, out, 0)
    lora_reference.lora_expand(y, ad.pool, ad.b_offsets, ad.ranks, *groups, out, ad.scaling, 0, 24)
    assert rel_err(out, expected) < tolerance(torch.bfloat16)


def test_lora_token_groups():
    token_indices, group_offsets, group_slots = tandem_kernels.lora_token_groups(
        [2, 1, 3, 2], [1, None, 0, 1]
    )
    assert token_indices.tolist() == [3, 4, 5, 0, 1, 6, 7] and token_indices.dtype == torch.int64
    assert group_offsets.tolist() == [0, 3, 7] and group_offsets.dtype == torch.int32
    assert group_slots.tolist() == [0, 1] and group_slots.dtype == torch.int32
    token_indices, group_offsets, group_slots = tandem_kernels.lora_token_groups([4, 1], [None, None])
    assert (token_indices.numel(), group_offsets.tolist(), group_slots.numel()) == (0, [0], 0)
    with pytest.raises(ValueError, match="None for no adapter"):
        tandem_kernels.lora_token_groups([1], [-1])


def _ops(backend: str):
    if backend == "triton":
        from tandem_kernels.lora import lora_expand, lora_shrink

        return lora_shrink, lora_expand
    return lora_reference.lora_shrink, lora_reference.lora_expand


@pytest.fixture(params=["torch", pytest.param("triton", marks=requires_triton)])
def ops(request):
    """(shrink, expand) of the reference and of Triton; checks Triton runs interpreted without a GPU."""
    if request.param == "triton" and not torch.cuda.is_available():
        from triton.runtime.interpreter import InterpretedFunction

        from tandem_kernels.lora import _lora_expand_kernel, _lora_shrink_kernel

        if not all(isinstance(f, InterpretedFunction) for f in (_lora_shrink_kernel, _lora_expand_kernel)):
            pytest.fail("triton was imported before TRITON_INTERPRET=1, so its kernels cannot run on CPU")
    return _ops(request.param)


def test_tokens_without_adapter_are_untouched(ops):
    shrink, expand = ops
    gen = torch.Generator().manual_seed(3)
    ranks = [8, 16, 0]
    ad = make_adapters(ranks, 32, 40, torch.float16, gen)
    batch = make_batch([3, 2, 1, 4, 2], [1, None, 0, None, 2], ranks, 32, torch.float16, gen)
    y = shrink(*shrink_args(batch, ad))
    has_lora = torch.tensor([slot is not None and ranks[slot] > 0 for slot in batch.token_slots])
    assert torch.equal(y[~has_lora], torch.zeros_like(y[~has_lora]))  # x there is inf
    assert y[has_lora].isfinite().all()
    out = make_out(len(batch.token_slots), 3 * 40, torch.float16, gen)
    before = out.clone()
    expand(*expand_args(y, batch, ad, out, 40))
    assert torch.equal(out[~has_lora], before[~has_lora])
    assert torch.equal(out[:, :40], before[:, :40]) and torch.equal(out[:, 80:], before[:, 80:])
    assert not torch.equal(out[has_lora, 40:80], before[has_lora, 40:80])
    # A batch with no adapter at all: no groups, nothing to do.
    groups = tandem_kernels.lora_token_groups([5], [None])
    y5 = shrink(batch.x[:5], ad.pool, ad.a_offsets, ad.ranks, *groups, 16)
    assert torch.equal(y5, torch.zeros(5, 16))
    after = out.clone()
    expand(y[:5], ad.pool, ad.b_offsets, ad.ranks, *groups, out[:5], ad.scaling, 0, 40)
    assert torch.equal(out, after)


# Ranks of the q, k and v parts per slot: equal, k without LoRA, none at all, all different.
QKV_RANKS = [(8, 8, 8), (4, 0, 4), (0, 0, 0), (16, 4, 2)]
QKV_SIZES = (64, 32, 32)  # hidden_out of q, k and v: a GQA layer


def test_fused_qkv_equals_separate_loras(ops):
    # One shrink over each slot's q, k and v A rows stacked, then one expand per part reading its
    # columns of y, is three separate LoRAs: the stacked A of part p starts p's rows in.
    shrink, expand = ops
    gen = torch.Generator().manual_seed(10)
    hidden_in, num_slots = 48, len(QKV_RANKS)
    stacked = [[random_a(r, hidden_in, gen) for r in part_ranks] for part_ranks in QKV_RANKS]
    bs = [[random_b(r, h, gen) for r, h in zip(part_ranks, QKV_SIZES)] for part_ranks in QKV_RANKS]
    mats = [torch.cat(a_parts) for a_parts in stacked] + [b for b_parts in bs for b in b_parts]
    pool, offsets = pack(mats, torch.float32, gen)
    total_ranks = [sum(part_ranks) for part_ranks in QKV_RANKS]
    max_rank = max(total_ranks)
    a_offsets = offsets_tensor(offsets[:num_slots], total_ranks)
    batch = make_batch([3, 1, 6, 2, 1, 5], [0, 3, None, 1, 2, 3], total_ranks, hidden_in, torch.float32, gen)
    width = sum(QKV_SIZES)
    out_fused = make_out(len(batch.token_slots), width, torch.float32, gen)
    out_separate = out_fused.clone()
    expected = out_fused.double()

    y = shrink(
        batch.x, pool, a_offsets, torch.tensor(total_ranks, dtype=torch.int32), *batch.groups, max_rank
    )
    out_offset = 0
    wrong = []
    for p, hidden_out in enumerate(QKV_SIZES):
        ranks = [part_ranks[p] for part_ranks in QKV_RANKS]
        before = [sum(part_ranks[:p]) for part_ranks in QKV_RANKS]  # rows of the stacked A before p's
        part = Adapters(
            pool,
            [torch.cat(a_parts).double()[b : b + r] for a_parts, b, r in zip(stacked, before, ranks)],
            [b_parts[p].double() for b_parts in bs],
            offsets_tensor([o + b * hidden_in for o, b in zip(offsets, before)], ranks),
            offsets_tensor(offsets[num_slots + p :: 3], ranks),
            torch.tensor(ranks, dtype=torch.int32),
            scaling_tensor(ranks),
            max(ranks),
            hidden_out,
        )
        y_offsets = torch.tensor(before, dtype=torch.int64)
        fused_args = (y, pool, part.b_offsets, part.ranks, *batch.groups)
        expand(*fused_args, out_fused, part.scaling, out_offset, hidden_out, y_offsets)
        y_part = shrink(*shrink_args(batch, part))
        expand(*expand_args(y_part, batch, part, out_separate, out_offset))
        expected = naive_expand(
            naive_shrink(batch.x, part, batch.token_slots), part, batch.token_slots, expected, out_offset
        )
        if p > 0:  # the same expand without the part's y offsets reads another part's columns
            bad = out_fused.clone()
            expand(*fused_args, bad, part.scaling, out_offset, hidden_out)
            wrong.append(bad)
        out_offset += hidden_out

    assert rel_err(out_separate, expected) < 1e-5
    assert rel_err(out_fused, expected) < 1e-5
    assert rel_err(out_fused, out_separate) < 1e-5
    for bad in wrong:
        assert not rel_err(bad, out_fused) < 1e-2


def test_rejects_bad_inputs(ops):
    shrink, expand = ops
    gen = torch.Generator().manual_seed(6)
    ad = make_adapters([8, 4], 32, 16, torch.float32, gen)
    batch = make_batch([4, 2], [0, 1], [8, 4], 32, torch.float32, gen)
    token_indices, group_offsets, group_slots = batch.groups
    groups = batch.groups
    x, pool = batch.x, ad.pool
    with pytest.raises(ValueError, match="1-D"):
        shrink(x, pool.unsqueeze(0), ad.a_offsets, ad.ranks, *groups, 8)
    with pytest.raises(ValueError, match="like ranks"):
        shrink(x, pool, ad.a_offsets[:1], ad.ranks, *groups, 8)
    with pytest.raises(ValueError, match="int64"):
        shrink(x, pool, ad.a_offsets.int(), ad.ranks, *groups, 8)
    with pytest.raises(ValueError, match="int64"):
        shrink(x, pool, ad.a_offsets, ad.ranks, token_indices.int(), group_offsets, group_slots, 8)
    with pytest.raises(ValueError, match="rank 8 > max_rank 7"):
        shrink(x, pool, ad.a_offsets, ad.ranks, *groups, 7)
    with pytest.raises(ValueError, match="outside the pool"):
        shrink(x, pool, ad.a_offsets + pool.numel(), ad.ranks, *groups, 8)
    with pytest.raises(ValueError, match="slot 2"):
        shrink(x, pool, ad.a_offsets, ad.ranks, token_indices, group_offsets, group_slots + 1, 8)
    with pytest.raises(ValueError, match="negative rank"):
        shrink(x, pool, ad.a_offsets, -ad.ranks, *groups, 8)

    y = shrink(x, pool, ad.a_offsets, ad.ranks, *groups, 8)
    out = torch.zeros(6, 20)
    with pytest.raises(ValueError, match="past out's 20 columns"):
        expand(y, pool, ad.b_offsets, ad.ranks, *groups, out, ad.scaling, 5, 16)
    with pytest.raises(ValueError, match="like ranks"):
        expand(y, pool, ad.b_offsets, ad.ranks, *groups, out, ad.scaling[:1], 0, 16)
    with pytest.raises(ValueError, match="rank 8 > y's column count 7"):
        expand(y[:, :7], pool, ad.b_offsets, ad.ranks, *groups, out, ad.scaling, 0, 16)
    with pytest.raises(ValueError, match=r"columns \[1, 9\) of y, which has 8"):
        expand(
            y, pool, ad.b_offsets, ad.ranks, *groups, out, ad.scaling, 0, 16, torch.ones(2, dtype=torch.int64)
        )
    with pytest.raises(ValueError, match="outside the pool"):
        expand(
            y, pool[: int(ad.b_offsets.max()) + 1], ad.b_offsets, ad.ranks, *groups, out, ad.scaling, 0, 16
        )
    with pytest.raises(ValueError, match="float32"):
        expand(y.double(), pool, ad.b_offsets, ad.ranks, *groups, out, ad.scaling, 0, 16)


@requires_triton
def test_triton_rejects_strided_rows():
    shrink, expand = _ops("triton")
    gen = torch.Generator().manual_seed(6)
    ad = make_adapters([8], 32, 16, torch.float32, gen)
    batch = make_batch([4], [0], [8], 32, torch.float32, gen)
    with pytest.raises(ValueError, match="x rows must be contiguous"):
        shrink(*shrink_args(batch, ad, batch.x.t().contiguous().t()))
    y = shrink(*shrink_args(batch, ad))
    with pytest.raises(ValueError, match="out rows must be contiguous"):
        expand(*expand_args(y, batch, ad, torch.zeros(16, 4).t(), 0))


# (ranks, seq_lens, seq_slots, hidden_in, hidden_out, out width, out_offset, (x, pool, out) dtypes)
TRITON_CASES = [
    # Hidden sizes that are no multiple of the kernels' tiles; the k part of a fused qkv output.
    (RANKS, SEQ_LENS, SEQ_SLOTS, 600, 200, 3 * 200, 200, (torch.float32,) * 3),
    ([16, 128, 4, 0], [1, 1, 1, 2, 1, 1], [1, 0, None, 1, 2, 3], 4096, 1536, 1536, 0, (torch.float32,) * 3),
    ([4, 8, 16, 64, 0], [20, 1, 7, 1, 3], [3, 0, None, 2, 4], 576, 1536, 1536, 0, (torch.float16,) * 3),
    (
        [8, 16, 0],
        [5, 2, 3, 1],
        [1, None, 0, 2],
        64,
        96,
        96,
        0,
        (torch.float32, torch.bfloat16, torch.float32),
    ),
    pytest.param(
        [8, 16], [5, 2, 3], [1, None, 0], 64, 64, 64, 0, (torch.bfloat16,) * 3, marks=BF16_DOT_BROKEN
    ),
]


@requires_triton
@pytest.mark.parametrize(
    ("ranks", "seq_lens", "seq_slots", "hidden_in", "hidden_out", "width", "out_offset", "dtypes"),
    TRITON_CASES,
)
def test_triton_matches_reference(
    ranks, seq_lens, seq_slots, hidden_in, hidden_out, width, out_offset, dtypes
):
    shrink, expand = _ops("triton")
    x_dtype, pool_dtype, out_dtype = dtypes
    gen = torch.Generator().manual_seed(4)
    ad = make_adapters(ranks, hidden_in, hidden_out, pool_dtype, gen)
    batch = make_batch(seq_lens, seq_slots, ranks, hidden_in, x_dtype, gen)
    # x as a column slice of a wider tensor, as a fused projection would hand it over.
    wider = torch.cat([batch.x, torch.randn(batch.x.shape[0], 8, generator=gen).to(x_dtype)], dim=1)
    x = wider[:, :hidden_in]
    y = shrink(*shrink_args(batch, ad, x))
    y_ref = lora_reference.lora_shrink(*shrink_args(batch, ad, x))
    assert y.shape == y_ref.shape and y.dtype == torch.float32
    assert rel_err(y, y_ref) < tolerance(x_dtype, pool_dtype)

    out = make_out(len(batch.token_slots), width, out_dtype, gen)
    out_ref = out.clone()
    expand(*expand_args(y_ref, batch, ad, out, out_offset))
    lora_reference.lora_expand(*expand_args(y_ref, batch, ad, out_ref, out_offset))
    assert rel_err(out, out_ref) < tolerance(pool_dtype, out_dtype)


@requires_triton
def test_triton_result_does_not_depend_on_the_batch():
    # A request alone and the same request batched with others get bit-identical results.
    shrink, expand = _ops("triton")
    gen = torch.Generator().manual_seed(5)
    ranks = [8, 16]
    ad = make_adapters(ranks, 96, 80, torch.float32, gen)
    batch = make_batch([3, 19, 2], [1, 0, 1], ranks, 96, torch.float32, gen)
    alone = tandem_kernels.lora_token_groups([19], [0])
    y = shrink(*shrink_args(batch, ad))
    y_alone = shrink(batch.x[3:22], ad.pool, ad.a_offsets, ad.ranks, *alone, ad.max_rank)
    assert torch.equal(y[3:22], y_alone)
    out = make_out(24, 80, torch.float32, gen)
    out_alone = out[3:22].clone()
    expand(*expand_args(y, batch, ad, out, 0))
    expand(y_alone, ad.pool, ad.b_offsets, ad.ranks, *alone, out_alone, ad.scaling, 0, 80)
    assert torch.equal(out[3:22], out_alone)


def test_dispatcher_uses_reference_on_cpu(monkeypatch):
    monkeypatch.delenv("TANDEM_KERNELS", raising=False)

    def no_triton(*args, **kwargs):
        raise AssertionError("the Triton path must not run for CPU tensors")

    monkeypatch.setattr(tandem_kernels, "_triton_lora_shrink", no_triton)
    monkeypatch.setattr(tandem_kernels, "_triton_lora_expand", no_triton)
    monkeypatch.setattr(tandem_kernels, "_triton_lora_apply_begin", no_triton)
    gen = torch.Generator().manual_seed(7)
    ranks = [4, 8]
    ad = make_adapters(ranks, 32, 24, torch.float32, gen)
    batch = make_batch([2, 3], [1, 0], ranks, 32, torch.float32, gen)
    y = tandem_kernels.lora_shrink(*shrink_args(batch, ad))
    assert torch.equal(y, lora_reference.lora_shrink(*shrink_args(batch, ad)))
    out = make_out(5, 48, torch.float32, gen)
    expected = out.clone()
    y_offsets = torch.zeros(2, dtype=torch.int64)
    tandem_kernels.lora_expand(*expand_args(y, batch, ad, out, 24), y_offsets)
    lora_reference.lora_expand(*expand_args(y, batch, ad, expected, 24), y_offsets)
    assert torch.equal(out, expected) and not torch.equal(out, make_out(5, 48, torch.float32, gen))
    fused = make_fused([(4, 4), (8, 0)], 32, [(0, 24), (24, 24)], torch.float32, gen)
    expected = out.clone()
    tandem_kernels.lora_apply(*apply_args(batch, fused, out))
    lora_reference.lora_apply(*apply_args(batch, fused, expected))
    assert torch.equal(out, expected)


@requires_triton
def test_dispatcher_env_forces_triton(monkeypatch):
    monkeypatch.setenv("TANDEM_KERNELS", "triton")
    calls = []
    monkeypatch.setattr(tandem_kernels, "_triton_lora_shrink", lambda *args: calls.append(("shrink", args)))
    monkeypatch.setattr(tandem_kernels, "_triton_lora_expand", lambda *args: calls.append(("expand", args)))
    gen = torch.Generator().manual_seed(8)
    ad = make_adapters([4], 16, 16, torch.float32, gen)
    batch = make_batch([2], [0], [4], 16, torch.float32, gen)
    tandem_kernels.lora_shrink(*shrink_args(batch, ad))
    y_offsets = torch.zeros(1, dtype=torch.int64)
    tandem_kernels.lora_expand(*expand_args(torch.zeros(2, 4), batch, ad, batch.x, 0), y_offsets)

    class Pending:
        def finish(self, out):
            calls.append(("finish", (out,)))

    def begin(*args):
        calls.append(("begin", args))
        return Pending()

    monkeypatch.setattr(tandem_kernels, "_triton_lora_apply_begin", begin)
    parts = ((0, 8), (8, 8))
    tiles = tandem_kernels.lora_token_tiles(batch.groups[1], 2)
    tandem_kernels.lora_apply(
        *shrink_args(batch, ad), batch.x, ad.b_offsets, ad.ranks, y_offsets, ad.scaling, parts, tiles
    )
    assert [name for name, _ in calls] == ["shrink", "expand", "begin", "finish"]
    assert calls[0][1][-1] == 4 and calls[1][1][-1] is y_offsets  # every argument passed through
    assert len(calls[2][1]) == 14 and calls[2][1][-2] is parts and calls[2][1][-1] is tiles
    assert calls[3][1][0] is batch.x  # lora_apply's out, handed to finish


# --- lora_apply: one fused projection, shrink and every part's expand in one op ---------------


@dataclass(frozen=True)
class Fused:
    """One fused projection's LoRA for every slot: a stacked A per slot and a B per part and slot."""

    pool: torch.Tensor
    a: list[torch.Tensor]  # per slot [total_rank, hidden_in], float64
    b: list[list[torch.Tensor]]  # per slot, per part [width, rank], float64
    a_offsets: torch.Tensor  # [num_slots] int64
    total_ranks: torch.Tensor  # [num_slots] int32
    b_offsets: torch.Tensor  # [num_parts, num_slots] int64
    ranks: torch.Tensor  # [num_parts, num_slots] int32
    y_offsets: torch.Tensor  # [num_parts, num_slots] int64
    scaling: torch.Tensor  # [num_parts, num_slots] float32
    max_rank: int
    parts: tuple[tuple[int, int], ...]  # (out_offset, hidden_out) per part

    def tables(self) -> tuple:
        return (self.b_offsets, self.ranks, self.y_offsets, self.scaling, self.parts)


def make_fused(
    part_ranks: list[tuple[int, ...]],
    hidden_in: int,
    parts: list[tuple[int, int]],
    dtype: torch.dtype,
    gen: torch.Generator,
) -> Fused:
    num_slots, num_parts = len(part_ranks), len(parts)
    a = [torch.cat([random_a(r, hidden_in, gen) for r in ranks]) for ranks in part_ranks]
    b = [[random_b(r, w, gen) for r, (_, w) in zip(ranks, parts)] for ranks in part_ranks]
    pool, offsets = pack(a + [b[s][p] for p in range(num_parts) for s in range(num_slots)], dtype, gen)
    totals = [sum(ranks) for ranks in part_ranks]
    per_part = [[ranks[p] for ranks in part_ranks] for p in range(num_parts)]
    b_offsets = [offsets[num_slots * (p + 1) : num_slots * (p + 2)] for p in range(num_parts)]
    return Fused(
        pool,
        [m.to(dtype).double() for m in a],
        [[m.to(dtype).double() for m in row] for row in b],
        offsets_tensor(offsets[:num_slots], totals),
        torch.tensor(totals, dtype=torch.int32),
        torch.stack([offsets_tensor(o, r) for o, r in zip(b_offsets, per_part)]),
        torch.tensor(per_part, dtype=torch.int32),
        torch.tensor([[sum(ranks[:p]) for ranks in part_ranks] for p in range(num_parts)], dtype=torch.int64),
        torch.stack([scaling_tensor(r) for r in per_part]),
        max(totals),
        tuple(parts),
    )


def naive_apply(
    x: torch.Tensor, fused: Fused, token_slots: list[int | None], out: torch.Tensor
) -> torch.Tensor:
    """out after the fused projection's LoRA, in float64."""
    expected = out.double()
    for t, slot in enumerate(token_slots):
        if slot is None or fused.a[slot].shape[0] == 0:
            continue
        y = fused.a[slot] @ x[t].double()
        for p, (col, width) in enumerate(fused.parts):
            r, y_offset = int(fused.ranks[p, slot]), int(fused.y_offsets[p, slot])
            if r > 0:
                delta = fused.b[slot][p] @ y[y_offset : y_offset + r]
                expected[t, col : col + width] += float(fused.scaling[p, slot]) * delta
    return expected


def _apply_ops(backend: str):
    if backend == "triton":
        from tandem_kernels.lora import lora_apply

        return (*_ops("triton"), lora_apply)
    return (*_ops("torch"), lora_reference.lora_apply)


@pytest.fixture(params=["torch", pytest.param("triton", marks=requires_triton)])
def apply_ops(request):
    """(shrink, expand, apply) of the reference and of Triton."""
    return _apply_ops(request.param)


# (part ranks per slot, hidden_in, (out_offset, hidden_out) per part, out width). Every case has a
# slot without LoRA on the projection (all ranks 0) and one without LoRA on some part of it.
APPLY_CASES = {
    # q, k, v of different widths, tile-aligned (as 576/192/192 or 4096/1024/1024 are), two splits
    # of hidden_in, columns outside the parts on both sides, and ranks summing to a non-power of two.
    "qkv": (
        [(8, 8, 8), (4, 0, 4), (0, 0, 0), (16, 4, 2), (16, 16, 16)],
        600,
        [(64, 256), (320, 64), (384, 64)],
        512,
    ),
    "gate_up": ([(8, 8), (0, 16), (0, 0), (32, 32)], 1100, [(0, 192), (192, 192)], 384),
    "single": ([(4,), (0,), (12,)], 64, [(0, 96)], 96),
    # Widths that are no multiple of the column tile, a gap between parts, and parts out of order.
    "ragged": ([(8, 8, 8), (0, 5, 3), (0, 0, 0), (12, 1, 20)], 200, [(0, 100), (147, 37), (110, 37)], 190),
    # More parts than one expand launch covers.
    "five": (
        [(4, 4, 4, 4, 4), (0, 8, 0, 8, 2), (0, 0, 0, 0, 0)],
        96,
        [(0, 64), (64, 30), (94, 64), (158, 17), (175, 80)],
        256,
    ),
}
APPLY_SEQ_LENS = [1, 7, 20, 1, 5, 2, 1, 17, 1, 2, 3, 4]


def apply_batch(case: str, dtype: torch.dtype, gen: torch.Generator) -> tuple[Fused, Batch]:
    part_ranks, hidden_in, parts, _ = APPLY_CASES[case]
    fused = make_fused(part_ranks, hidden_in, parts, dtype, gen)
    num_slots = len(part_ranks)
    # Every slot, tokens of no adapter between them, an adapter's requests apart.
    slots = [i % (num_slots + 1) for i in range(len(APPLY_SEQ_LENS))]
    seq_slots = [None if s == num_slots else s for s in slots]
    totals = fused.total_ranks.tolist()
    return fused, make_batch(APPLY_SEQ_LENS, seq_slots, totals, hidden_in, dtype, gen)


def apply_args(batch: Fused, fused: Fused, out: torch.Tensor, x: torch.Tensor | None = None) -> tuple:
    x = batch.x if x is None else x
    return (
        x,
        fused.pool,
        fused.a_offsets,
        fused.total_ranks,
        *batch.groups,
        fused.max_rank,
        out,
        *fused.tables(),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(APPLY_CASES))
def test_apply_equals_shrink_and_expands(apply_ops, case, dtype):
    shrink, expand, apply = apply_ops
    gen = torch.Generator().manual_seed(20)
    fused, batch = apply_batch(case, dtype, gen)
    out = make_out(len(batch.token_slots), APPLY_CASES[case][3], dtype, gen)
    before = out.clone()
    separate = out.clone()

    apply(*apply_args(batch, fused, out))
    # The same backend's public ops, as the engine called them before lora_apply.
    y = shrink(batch.x, fused.pool, fused.a_offsets, fused.total_ranks, *batch.groups, fused.max_rank)
    for p, (col, width) in enumerate(fused.parts):
        expand(
            y,
            fused.pool,
            fused.b_offsets[p],
            fused.ranks[p],
            *batch.groups,
            separate,
            fused.scaling[p],
            col,
            width,
            fused.y_offsets[p],
        )

    assert out.dtype == dtype
    fp32 = dtype == torch.float32
    assert rel_err(out, naive_apply(batch.x, fused, batch.token_slots, before)) < (1e-5 if fp32 else 5e-3)
    assert rel_err(out, separate) < (1e-6 if fp32 else 2e-3)
    # Tokens of no adapter, or of one without LoRA here, and columns of no part: the same bits.
    totals = fused.total_ranks.tolist()
    untouched = torch.tensor([slot is None or totals[slot] == 0 for slot in batch.token_slots])
    assert untouched.any() and torch.equal(out[untouched], before[untouched])
    covered = torch.zeros(out.shape[1], dtype=torch.bool)
    for col, width in fused.parts:
        covered[col : col + width] = True
    assert torch.equal(out[:, ~covered], before[:, ~covered])
    # Part p of a slot whose rank for p is 0 (its B offset is far outside the pool): untouched too.
    for p, (col, width) in enumerate(fused.parts):
        skip = torch.tensor(
            [slot is not None and int(fused.ranks[p, slot]) == 0 for slot in batch.token_slots]
        )
        assert torch.equal(out[skip, col : col + width], before[skip, col : col + width])
    assert out[~untouched].isfinite().all()


@requires_triton
@pytest.mark.parametrize("case", ["qkv", "ragged"])
def test_triton_apply_reads_only_partials_the_shrink_wrote(case, monkeypatch):
    # The split-K partials are torch.empty: filled with NaN instead, any read of an entry no shrink
    # program wrote shows. Summing them in a separate kernel (past _FUSED_SUM_MAX_BYTES) gives the
    # same bits as summing them inside the expand.
    from tandem_kernels import lora

    apply = _apply_ops("triton")[2]
    gen = torch.Generator().manual_seed(21)
    fused, batch = apply_batch(case, torch.float32, gen)
    # x as a column slice of a wider tensor, out's rows strided likewise.
    wider = torch.cat([batch.x, torch.randn(batch.x.shape[0], 8, generator=gen)], dim=1)
    x = wider[:, : batch.x.shape[1]]
    out = make_out(len(batch.token_slots), APPLY_CASES[case][3] + 8, torch.float32, gen)[:, 4:-4]
    results = []
    for fill, max_bytes in (
        (None, lora._FUSED_SUM_MAX_BYTES),
        (float("nan"), lora._FUSED_SUM_MAX_BYTES),
        (float("nan"), 0),
    ):
        monkeypatch.setattr(lora, "_PARTIALS_FILL", fill)
        monkeypatch.setattr(lora, "_FUSED_SUM_MAX_BYTES", max_bytes)
        target = out.clone()
        apply(*apply_args(batch, fused, target, x))
        results.append(target)
    totals = fused.total_ranks.tolist()
    has_lora = torch.tensor([slot is not None and totals[slot] > 0 for slot in batch.token_slots])
    assert results[0][has_lora].isfinite().all()
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


@requires_triton
def test_triton_apply_result_does_not_depend_on_the_batch(monkeypatch):
    # A request alone and the same request batched with others get bit-identical results, also when
    # the bigger batch sums the partials in the separate kernel and the request alone does not.
    from tandem_kernels import lora

    apply = _apply_ops("triton")[2]
    gen = torch.Generator().manual_seed(22)
    fused = make_fused([(8, 4, 4), (16, 0, 8)], 1100, [(0, 64), (64, 32), (96, 32)], torch.float32, gen)
    totals = fused.total_ranks.tolist()
    batch = make_batch([3, 19, 2], [1, 0, 1], totals, 1100, torch.float32, gen)
    alone = tandem_kernels.lora_token_groups([19], [0])
    out = make_out(24, 128, torch.float32, gen)
    out_alone = out[3:22].clone()
    monkeypatch.setattr(lora, "_FUSED_SUM_MAX_BYTES", 0)
    apply(*apply_args(batch, fused, out))
    monkeypatch.undo()
    x_alone = batch.x[3:22]
    apply(
        x_alone,
        fused.pool,
        fused.a_offsets,
        fused.total_ranks,
        *alone,
        fused.max_rank,
        out_alone,
        *fused.tables(),
    )
    assert torch.equal(out[3:22], out_alone)


def test_apply_without_adapter_tokens_changes_nothing(apply_ops):
    apply = apply_ops[2]
    gen = torch.Generator().manual_seed(24)
    fused = make_fused([(8, 4), (0, 4)], 32, [(0, 16), (16, 8)], torch.float32, gen)
    x = torch.randn(5, 32, generator=gen)
    out = make_out(5, 24, torch.float32, gen)
    before = out.clone()
    groups = tandem_kernels.lora_token_groups([2, 3], [None, None])
    b_offsets, ranks, y_offsets, scaling, _ = fused.tables()
    head = (x, fused.pool, fused.a_offsets, fused.total_ranks, *groups, fused.max_rank, out)
    apply(*head, b_offsets, ranks, y_offsets, scaling, [[0, 16], [16, 8]])  # parts as lists work too
    assert torch.equal(out, before)


def test_apply_rejects_bad_inputs(apply_ops):
    apply = apply_ops[2]
    gen = torch.Generator().manual_seed(23)
    fused = make_fused([(8, 4), (0, 4)], 32, [(0, 16), (16, 8)], torch.float32, gen)
    batch = make_batch([4, 2], [0, 1], fused.total_ranks.tolist(), 32, torch.float32, gen)
    out = torch.zeros(6, 24)
    head = (batch.x, fused.pool, fused.a_offsets, fused.total_ranks, *batch.groups)
    b_offsets, ranks, y_offsets, scaling, parts = fused.tables()

    def call(max_rank=fused.max_rank, out=out, **tables):
        args = dict(b_offsets=b_offsets, ranks=ranks, y_offsets=y_offsets, scaling=scaling, parts=parts)
        args.update(tables)
        apply(*head, max_rank, out, *args.values())

    call()  # the good call works
    with pytest.raises(ValueError, match="past out's 24 columns"):
        call(parts=((0, 16), (16, 9)))
    with pytest.raises(ValueError, match="overlap"):
        call(parts=((0, 16), (8, 8)))
    with pytest.raises(ValueError, match=r"must have shape \(1, 2\)"):
        call(parts=((0, 16),))
    with pytest.raises(ValueError, match=r"ranks must have shape"):
        call(ranks=ranks[:1])
    with pytest.raises(ValueError, match="int64"):
        call(y_offsets=y_offsets.int())
    with pytest.raises(ValueError, match="float32"):
        call(scaling=scaling.double())
    with pytest.raises(ValueError, match="rows but x has"):
        call(out=torch.zeros(5, 24))
    with pytest.raises(ValueError, match="rank 12 > max_rank 11"):
        call(max_rank=11)
    with pytest.raises(ValueError, match=r"columns \[9, 13\) of y, which has 12"):
        call(y_offsets=y_offsets + 1)
    with pytest.raises(ValueError, match="outside the pool"):
        call(b_offsets=b_offsets + fused.pool.numel())


# --- the tiled launch (lora_apply's tiles): what a CUDA graph captures ------------------------


def test_token_tiles_name_the_groups_of_each_tile():
    # Groups of 3, 20, 0 (empty), 9 and 1 rows, then two empty padding groups at the end (as a CUDA
    # graph's static metadata has): 33 rows used of 40.
    bounds = [0, 3, 23, 23, 32, 33, 33, 33]
    assert lora_reference.tile_bounds(bounds, 40) == [(0, 2), (1, 4), (4, 5)]
    tiles = tandem_kernels.lora_token_tiles(torch.tensor(bounds, dtype=torch.int32), 40)
    assert tiles.dtype == torch.int32 and tiles.tolist() == [[0, 2], [1, 4], [4, 5]]
    # Tiles past the last grouped row name no group, and neither does a batch without LoRA tokens.
    assert lora_reference.tile_bounds([0, 16, 16], 48) == [(0, 1), (2, 2), (2, 2)]
    assert lora_reference.tile_bounds([0], 0) == []
    assert lora_reference.tile_bounds([0, 0, 0], 20) == [(2, 2), (2, 2)]


def padded_for_graph(batch: Batch, rows: int, pad_row: int) -> tuple[torch.Tensor, ...]:
    """The batch's group metadata padded as a CUDA graph's static buffers are: token_indices to
    `rows` entries (the extra ones point at pad_row), one group per row (empty ones at the end)."""
    token_indices, offsets, slots = batch.groups
    n, g = token_indices.shape[0], slots.shape[0]
    padded_indices = torch.cat([token_indices, torch.full((rows - n,), pad_row, dtype=torch.int64)])
    padded_offsets = torch.cat([offsets, torch.full((rows - g,), n, dtype=torch.int32)])
    padded_slots = torch.cat([slots, torch.zeros(rows - g, dtype=torch.int32)])
    tiles = tandem_kernels.lora_token_tiles(padded_offsets, rows)
    return padded_indices, padded_offsets, padded_slots, tiles


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", ["qkv", "ragged", "five"])
def test_tiled_apply_equals_grouped_apply(apply_ops, case, dtype, monkeypatch):
    # Tiles spanning several groups (requests of 1 to 20 tokens, adapters interleaved), a group of an
    # adapter without LoRA here, and the metadata padded as a graph's: the same result as the grouped
    # launch. On the Triton path the partials start as NaN: the tiled shrink writes all the expand reads.
    apply = apply_ops[2]
    if apply.__module__ == "tandem_kernels.lora":
        from tandem_kernels import lora

        monkeypatch.setattr(lora, "_PARTIALS_FILL", float("nan"))
    gen = torch.Generator().manual_seed(25)
    fused, batch = apply_batch(case, dtype, gen)
    num_tokens = len(batch.token_slots)
    out = make_out(num_tokens, APPLY_CASES[case][3], dtype, gen)
    before = out.clone()
    grouped, tiled, padded = out.clone(), out.clone(), out.clone()
    apply(*apply_args(batch, fused, grouped))
    tiles = tandem_kernels.lora_token_tiles(batch.groups[1], batch.groups[0].shape[0])
    assert any(b - a > 1 for a, b in tiles.tolist()), "no tile spans two groups: the case tests too little"
    head = (batch.x, fused.pool, fused.a_offsets, fused.total_ranks)
    apply(*head, *batch.groups, fused.max_rank, tiled, *fused.tables(), tiles=tiles)
    # Padding entries point at a row of no adapter, which must stay as it is.
    pad_row = batch.token_slots.index(None)
    *groups, padded_tiles = padded_for_graph(batch, num_tokens + 19, pad_row)
    apply(*head, *groups, fused.max_rank, padded, *fused.tables(), tiles=padded_tiles)

    fp32 = dtype == torch.float32
    for result in (tiled, padded):
        assert torch.equal(result.isnan(), grouped.isnan()) and result.isfinite().all()
        assert rel_err(result, grouped) < (1e-6 if fp32 else 2e-3)
        expected = naive_apply(batch.x, fused, batch.token_slots, before)
        assert rel_err(result, expected) < (1e-5 if fp32 else 5e-3)
    totals = fused.total_ranks.tolist()
    untouched = torch.tensor([slot is None or totals[slot] == 0 for slot in batch.token_slots])
    assert torch.equal(padded[untouched], before[untouched])


def test_tiled_apply_rejects_tiles_that_do_not_match_the_groups(apply_ops):
    apply = apply_ops[2]
    gen = torch.Generator().manual_seed(26)
    fused, batch = apply_batch("single", torch.float32, gen)
    out = make_out(len(batch.token_slots), APPLY_CASES["single"][3], torch.float32, gen)
    before = out.clone()
    rows = batch.groups[0].shape[0]
    tiles = tandem_kernels.lora_token_tiles(batch.groups[1], rows)
    head = (batch.x, fused.pool, fused.a_offsets, fused.total_ranks, *batch.groups, fused.max_rank, out)
    with pytest.raises(ValueError, match="build them with lora_token_tiles"):
        apply(*head, *fused.tables(), tiles=tiles.flip(0).contiguous())
    shape = rf"tiles must be \({tiles.shape[0]}, 2\) int32"
    with pytest.raises(ValueError, match=shape):
        apply(*head, *fused.tables(), tiles=tiles.long())
    with pytest.raises(ValueError, match=shape):
        apply(*head, *fused.tables(), tiles=tiles[:1])
    assert torch.equal(out, before)


@pytest.mark.parametrize("tiled", [False, True])
def test_apply_in_two_halves_around_the_base_projection(apply_ops, tiled):
    # lora_apply_begin before out exists (the engine runs the base GEMM between the halves, the
    # shrink on a side stream), finish after: lora_apply's result. A bad out is refused at finish
    # and left as it was.
    apply = apply_ops[2]
    begin = lora_reference.lora_apply_begin
    if apply.__module__ == "tandem_kernels.lora":
        from tandem_kernels.lora import lora_apply_begin as begin
    gen = torch.Generator().manual_seed(28)
    fused, batch = apply_batch("qkv", torch.float32, gen)
    rows, width = len(batch.token_slots), APPLY_CASES["qkv"][3]
    w = torch.randn(width, batch.x.shape[1], generator=gen) * 0.05
    x = batch.x.clone()
    x[x.isinf()] = 1.0  # the base projection reads every row
    tiles = tandem_kernels.lora_token_tiles(batch.groups[1], batch.groups[0].shape[0]) if tiled else None
    head = (x, fused.pool, fused.a_offsets, fused.total_ranks, *batch.groups, fused.max_rank)
    pending = begin(*head, *fused.tables(), tiles)
    out = x @ w.T
    base = out.clone()
    pending.finish(out)
    whole = base.clone()
    apply(*head, whole, *fused.tables(), tiles)
    assert torch.equal(out, whole)
    assert rel_err(out, naive_apply(x, fused, batch.token_slots, base)) < 1e-5
    bad = torch.zeros(rows - 1, width)
    with pytest.raises(ValueError, match="rows but x has"):
        begin(*head, *fused.tables(), tiles).finish(bad)
    assert not bad.any()


def _finish_op(apply):
    """lora_apply_finish of the backend `apply` belongs to."""
    if apply.__module__ == "tandem_kernels.lora":
        from tandem_kernels.lora import lora_apply_finish

        return lora_apply_finish
    return lora_reference.lora_apply_finish


def folded_y(x: torch.Tensor, fused: Fused, gap: int = 3, lead: int = 5) -> tuple[torch.Tensor, ...]:
    """What the base GEMM gives with each slot's stacked A appended to the weight: slot s's x @ A.T
    columns at base_s, `gap` NaN columns between slots and `lead` before them (a view of a wider
    output, as the projection's own columns would be), in x's dtype; and lora_apply_finish's
    y_offsets (lora_apply's plus base_s) and total_ranks (base_s + total_s)."""
    totals = fused.total_ranks.tolist()
    bases, at = [], 0
    for total in totals:
        bases.append(at)
        at += total + gap
    wide = torch.full((x.shape[0], lead + at), float("nan"), dtype=x.dtype)
    y = wide[:, lead:]
    for s, (base, total) in enumerate(zip(bases, totals)):
        if total:
            y[:, base : base + total] = (x.double() @ fused.a[s].T).to(x.dtype)
    base_t = torch.tensor(bases, dtype=torch.int64)
    return y, fused.y_offsets + base_t, (base_t + fused.total_ranks).to(torch.int32)


@pytest.mark.parametrize("tiled", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", ["qkv", "ragged", "five"])
def test_apply_finish_on_a_y_from_the_base_gemm_equals_apply(apply_ops, case, dtype, tiled):
    # The shrink folded into the base GEMM (benchmarks/bench_gpu.py's lora_folded_sweep): y is a
    # strided view of the GEMM's extra columns, NaN between slots, and rows of no adapter (inf in x)
    # hold inf and NaN: any read outside a slot's columns or a group's rows shows.
    apply = apply_ops[2]
    finish = _finish_op(apply)
    gen = torch.Generator().manual_seed(41)
    fused, batch = apply_batch(case, dtype, gen)
    out = make_out(len(batch.token_slots), APPLY_CASES[case][3], dtype, gen)
    before, expected = out.clone(), out.clone()
    tiles = tandem_kernels.lora_token_tiles(batch.groups[1], batch.groups[0].shape[0]) if tiled else None
    apply(*apply_args(batch, fused, expected), tiles)
    y, y_offsets, totals = folded_y(batch.x, fused)
    b_offsets, ranks, _, scaling, parts = fused.tables()
    finish(
        y,
        fused.pool,
        totals,
        *batch.groups,
        y.shape[1],
        out,
        b_offsets,
        ranks,
        y_offsets,
        scaling,
        parts,
        tiles,
    )
    fp32 = dtype == torch.float32
    assert rel_err(out, expected) < (1e-6 if fp32 else 2e-3)
    assert rel_err(out, naive_apply(batch.x, fused, batch.token_slots, before)) < (1e-5 if fp32 else 5e-3)
    untouched = torch.tensor([s is None or fused.total_ranks[s] == 0 for s in batch.token_slots])
    assert untouched.any() and torch.equal(out[untouched], before[untouched])
    assert out.isfinite().all()


def test_apply_finish_refuses_columns_past_a_slots_total(apply_ops):
    # A part reaching into the next slot's columns would add another adapter's x @ A.T: refused
    # (on the CPU, where the values cost no sync), and out is left as it was.
    finish = _finish_op(apply_ops[2])
    gen = torch.Generator().manual_seed(42)
    fused, batch = apply_batch("qkv", torch.float32, gen)
    out = make_out(len(batch.token_slots), APPLY_CASES["qkv"][3], torch.float32, gen)
    before = out.clone()
    y, y_offsets, totals = folded_y(batch.x, fused)
    b_offsets, ranks, _, scaling, parts = fused.tables()
    short = totals.clone()
    short[0] -= 1  # slot 0 has LoRA on every part, and tokens in the batch
    head = (y, fused.pool, short, *batch.groups, y.shape[1], out, b_offsets, ranks, y_offsets, scaling, parts)
    with pytest.raises(ValueError, match="past its slot's total_ranks"):
        finish(*head)
    with pytest.raises(ValueError, match="max_rank must be in"):
        finish(y, fused.pool, totals, *batch.groups, y.shape[1] + 1, *head[7:])
    assert torch.equal(out, before)


@requires_triton
@pytest.mark.parametrize("tiled", [False, True])
@pytest.mark.parametrize(
    "config",
    [
        # Smaller blocks than the default: more splits, several column tiles per part; one program
        # per tile walking all its groups.
        dict(shrink_k_chunk=256, shrink_block_k=64, expand_block_n=32, num_warps=2, tile_group_programs=1),
        # Larger: one split for hidden_in <= 1024, column tiles wider than some parts; a program
        # per group of a tile.
        dict(
            shrink_k_chunk=1024,
            shrink_block_k=256,
            expand_block_n=128,
            num_warps=8,
            expand_stages=2,
            tile_group_programs=16,
        ),
        # Two programs per tile: some take two groups of a tile, some none.
        dict(tile_group_programs=2),
    ],
)
def test_apply_launch_settings_change_no_result(config, tiled, monkeypatch):
    # What benchmarks/bench_gpu.py sweeps on a GPU: any launch settings give the same result.
    from tandem_kernels import lora

    apply = _apply_ops("triton")[2]
    gen = torch.Generator().manual_seed(27)
    for case in ("qkv", "ragged"):
        fused, batch = apply_batch(case, torch.float32, gen)
        out = make_out(len(batch.token_slots), APPLY_CASES[case][3], torch.float32, gen)
        before = out.clone()
        tiles = tandem_kernels.lora_token_tiles(batch.groups[1], batch.groups[0].shape[0]) if tiled else None
        default = out.clone()
        apply(*apply_args(batch, fused, default), tiles)
        monkeypatch.setattr(lora, "APPLY_CONFIG", lora.ApplyConfig(**config))
        monkeypatch.setattr(lora, "_PARTIALS_FILL", float("nan"))
        apply(*apply_args(batch, fused, out), tiles)
        monkeypatch.undo()
        assert rel_err(out, default) < 1e-6, case
        assert rel_err(out, naive_apply(batch.x, fused, batch.token_slots, before)) < 1e-5, case


@requires_triton
def test_apply_launch_settings_are_checked():
    from tandem_kernels.lora import ApplyConfig

    with pytest.raises(ValueError, match="power of two"):
        ApplyConfig(expand_block_n=48)
    with pytest.raises(ValueError, match="at least 16"):
        ApplyConfig(shrink_k_chunk=8, shrink_block_k=8)
    with pytest.raises(ValueError, match="multiple of shrink_block_k"):
        ApplyConfig(shrink_k_chunk=64, shrink_block_k=128)
    with pytest.raises(ValueError, match="tile_group_programs"):
        ApplyConfig(tile_group_programs=17)


# --- the engine's CPU path: lora_apply_grouped over HostGroups --------------------------------


def grouped_work(ad: Adapters, host: lora_reference.HostGroups, ranks: list[int], out_offset: int) -> list:
    return [
        (
            int(ad.a_offsets[s]),
            ranks[s],
            [(int(ad.b_offsets[s]), ranks[s], 0, float(ad.scaling[s]), out_offset, ad.hidden_out)],
        )
        if ranks[s] > 0
        else None
        for s in host.slots
    ]


@pytest.mark.parametrize(
    ("seq_lens", "seq_slots", "views"),
    [
        (SEQ_LENS, SEQ_SLOTS, False),  # slot 5's and 0's requests are apart: one gather, one scatter
        ([3, 2, 5, 1, 4, 1], [1, None, 0, 3, 5, 5], True),  # one run of tokens per adapter: views
        ([1] * 40, [i % 3 for i in range(40)], False),  # a decode step
        # A prefill whose adapter-0 requests are apart and large: gathered, on every thread.
        ([70, 80, 65, 3, 2], [0, 1, 0, None, 1], False),
    ],
)
@pytest.mark.parametrize(
    ("x_dtype", "pool_dtype", "out_dtype"),
    [
        (torch.float32, torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16, torch.bfloat16),
        (torch.float32, torch.bfloat16, torch.float32),
    ],
)
def test_apply_grouped_matches_naive(seq_lens, seq_slots, views, x_dtype, pool_dtype, out_dtype):
    gen = torch.Generator().manual_seed(11)
    ad = make_adapters(RANKS, 128, 96, pool_dtype, gen)
    batch = make_batch(seq_lens, seq_slots, RANKS, 128, x_dtype, gen)
    host = lora_reference.HostGroups(seq_lens, seq_slots)
    assert (host.runs is not None) == views
    ti, go, gs = batch.groups
    assert host.token_indices.tolist() == ti.tolist() and host.bounds == go.tolist()
    assert host.slots == gs.tolist()
    out = make_out(len(batch.token_slots), 96 + 40, out_dtype, gen)
    before = out.clone()
    y = naive_shrink(batch.x, ad, batch.token_slots)
    expected = naive_expand(y, ad, batch.token_slots, out, 40)
    threads = torch.get_num_threads()
    lora_reference.lora_apply_grouped(batch.x, out, ad.pool, host, grouped_work(ad, host, RANKS, 40))
    assert torch.get_num_threads() == threads
    assert out.dtype == out_dtype
    assert rel_err(out, expected) < (1e-5 if out_dtype == torch.float32 else tolerance(out_dtype))
    for t, slot in enumerate(batch.token_slots):
        if slot is None or RANKS[slot] == 0:
            assert torch.equal(out[t], before[t])
    assert torch.equal(out[:, :40], before[:, :40])


@pytest.mark.skipif(lora_reference._GROUP_LOOP is None, reason="no TorchScript: only the Python loop")
@pytest.mark.parametrize(
    ("seq_lens", "seq_slots"),
    [
        ([1] * 40, [i % 6 for i in range(40)]),  # a decode step: groups gathered, split over two threads
        ([3, 2, 5, 1, 4, 1], [1, None, 0, 3, 5, 5]),  # one run per adapter: views of x and out
        ([2, 1], [3, 3]),  # one group: no second thread
    ],
)
def test_scripted_group_loop_equals_python_loop_bit_for_bit(seq_lens, seq_slots, monkeypatch):
    # The engine's CPU decode path runs the group loop in TorchScript, half the groups per core;
    # it must produce exactly the Python loop's bits (same products, same order, one thread each).
    gen = torch.Generator().manual_seed(14)
    ad = make_adapters(RANKS, 128, 96, torch.float32, gen)
    batch = make_batch(seq_lens, seq_slots, RANKS, 128, torch.float32, gen)
    host = lora_reference.HostGroups(seq_lens, seq_slots)
    assert host.largest < lora_reference.SMALL_GROUP_TOKENS
    work = grouped_work(ad, host, RANKS, 40)
    out = make_out(len(batch.token_slots), 96 + 40, torch.float32, gen)
    scripted, python = out.clone(), out.clone()
    calls = []
    loop = lora_reference._GROUP_LOOP
    monkeypatch.setattr(lora_reference.cpu_extension, "load", lambda: None)  # the C++ op would run first
    monkeypatch.setattr(lora_reference, "_GROUP_LOOP", lambda *a: calls.append(a[3]) or loop(*a))
    lora_reference.lora_apply_grouped(batch.x, scripted, ad.pool, host, work)
    assert len(calls) == 1  # the scripted loop ran, with this split point
    monkeypatch.setattr(lora_reference, "_GROUP_LOOP", None)
    lora_reference.lora_apply_grouped(batch.x, python, ad.pool, host, work)
    assert not torch.equal(python, out)
    assert torch.equal(scripted, python)
    if len(set(seq_slots) - {None}) >= 6:
        assert 0 < calls[0] < sum(1 for w in work if w)  # both halves had groups


def native_op_or_skip():
    if cpu_extension.available_compiler() is None:
        pytest.skip("no C++ compiler: the CPU decode path is the TorchScript loop")
    op = cpu_extension.load()
    assert op is not None, "a C++ compiler is installed, yet Tandem's CPU ops did not build (see the log)"
    return op


@pytest.mark.parametrize(
    ("seq_lens", "seq_slots"),
    [
        ([1] * 40, [i % 6 for i in range(40)]),  # a decode step: 6 adapters, tokens interleaved
        ([1, 1, 2, 1], [5, None, 3, 5]),  # a group of two requests apart, one token without adapter
        ([3, 2, 5, 1, 4, 1], [1, None, 0, 3, 5, 5]),  # one run per adapter
    ],
)
@pytest.mark.parametrize("ranks", [RANKS, [8, 16, 32, 64, 0, 48]])  # 4, 12, 48: the generic loop
def test_native_decode_op_matches_naive_and_leaves_other_tokens_alone(
    seq_lens, seq_slots, ranks, monkeypatch
):
    # The engine's CPU decode path is one C++ call per projection; it must do PEFT's arithmetic
    # (to fp32 rounding: its sums run in another order than MKL's) and touch only adapter tokens.
    native_op_or_skip()
    calls = []
    op = cpu_extension.load()
    monkeypatch.setattr(
        lora_reference.cpu_extension,
        "load",
        lambda: type(
            "Spy", (), {"lora_grouped": staticmethod(lambda *a: calls.append(a) or op.lora_grouped(*a))}
        ),
    )
    gen = torch.Generator().manual_seed(15)
    ad = make_adapters(ranks, 576, 96, torch.float32, gen)
    batch = make_batch(seq_lens, seq_slots, ranks, 576, torch.float32, gen)
    host = lora_reference.HostGroups(seq_lens, seq_slots)
    out = make_out(len(batch.token_slots), 96 + 40, torch.float32, gen)
    before = out.clone()
    expected = naive_expand(naive_shrink(batch.x, ad, batch.token_slots), ad, batch.token_slots, out, 40)
    lora_reference.lora_apply_grouped(batch.x, out, ad.pool, host, grouped_work(ad, host, ranks, 40))
    assert len(calls) == 1  # the whole projection in one call
    assert rel_err(out, expected) < 1e-5
    for t, slot in enumerate(batch.token_slots):
        if slot is None or ranks[slot] == 0:
            assert torch.equal(out[t], before[t])
        else:
            assert not torch.equal(out[t, 40:], before[t, 40:])
    assert torch.equal(out[:, :40], before[:, :40])


def decode_step_case(ranks: list[int], seed: int):
    """A decode step of 40 tokens over 6 adapters, interleaved: adapters, batch, groups, output
    (576 -> 96 columns, written at column 40)."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens, seq_slots = [1] * 40, [i % 6 for i in range(40)]
    ad = make_adapters(ranks, 576, 96, torch.float32, gen)
    batch = make_batch(seq_lens, seq_slots, ranks, 576, torch.float32, gen)
    host = lora_reference.HostGroups(seq_lens, seq_slots)
    return ad, batch, host, make_out(len(batch.token_slots), 96 + 40, torch.float32, gen)


@pytest.fixture(scope="module")
def portable_ops(tmp_path_factory) -> Path:
    """The ops built for any CPU of this architecture, as an image's build stage builds them."""
    native_op_or_skip()
    out = tmp_path_factory.mktemp("portable-ops")
    # As the image's build stage does, in a process of its own (this one has the native build loaded).
    command = [str(Path(sys.executable).with_name("tandem-cpu-ops")), "--portable", str(out)]
    subprocess.run(command, check=True, capture_output=True, timeout=600)
    return out


def test_a_portable_build_serves_where_no_compiler_is(portable_ops, tmp_path):
    # An image at run time: no compiler, an empty cache, TANDEM_CPU_OPS_DIR set by the image. In a
    # process of its own: this one has the native build loaded under the same module name.
    ad, batch, host, out = decode_step_case(RANKS, seed=16)
    args = (batch.x, out.clone(), ad.pool, host, grouped_work(ad, host, RANKS, 40))
    torch.save(args, tmp_path / "args.pt")
    env = {
        **os.environ,
        "CXX": str(tmp_path / "no-such-compiler"),
        "TANDEM_CACHE_DIR": str(tmp_path / "cache"),
        cpu_extension.PREBUILT_ENV: str(portable_ops),
    }
    code = f"""
import torch
from tandem_kernels import cpu_extension, lora_reference
op = cpu_extension.load()
x, out, pool, host, work = torch.load({str(tmp_path / "args.pt")!r}, weights_only=False)
lora_reference.lora_apply_grouped(x, out, pool, host, work)
torch.save(out, {str(tmp_path / "out.pt")!r})
print(op.__file__, op.parallel_threads(8))
"""
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    threads = min(8, torch.get_num_threads())  # built with OpenMP too
    assert run.stdout.split() == [str(portable_ops / "tandem_cpu_ops.so"), str(threads)]
    assert not (tmp_path / "cache").exists()  # nothing was built
    expected = naive_expand(naive_shrink(batch.x, ad, batch.token_slots), ad, batch.token_slots, out, 40)
    assert rel_err(torch.load(tmp_path / "out.pt"), expected) < 1e-5


@pytest.mark.parametrize(
    ("field", "value", "why"),
    [
        ("source", "0" * 16, "built from other sources"),
        ("flags", ["-O0"], "built with other flags"),
        ("torch", "1.0.0", "built for torch 1.0.0"),
        ("needs", ["avx2", "no_such_cpu_flag"], "this CPU lacks no_such_cpu_flag"),
    ],
)
def test_a_prebuilt_op_that_does_not_fit_is_not_used(portable_ops, tmp_path, caplog, field, value, why):
    other = tmp_path / "ops"
    shutil.copytree(portable_ops, other)
    stamp = json.loads((other / "stamp.json").read_text())
    stamp[field] = value
    (other / "stamp.json").write_text(json.dumps(stamp))
    with caplog.at_level("WARNING", logger="tandem_kernels.cpu_extension"):
        assert cpu_extension._load_prebuilt(other) is None
    assert why in caplog.text


def native_tables(ad: Adapters, host: lora_reference.HostGroups, ranks: list[int], layers: int = 2):
    """NativeTables over `layers` identical layers, as the engine builds them from its slot tables."""
    slots = host.slots

    def per_layer(values: list[int]) -> torch.Tensor:
        return torch.tensor([values] * layers, dtype=torch.int64)

    a = per_layer([int(ad.a_offsets[s]) for s in slots])
    r = per_layer([ranks[s] for s in slots])
    part = (
        per_layer([int(ad.b_offsets[s]) for s in slots]),
        r,
        per_layer([0] * len(slots)),
        torch.tensor([float(ad.scaling[s]) for s in slots]),
        40,
        ad.hidden_out,
    )
    return lora_reference.NativeTables(ad.pool.numel(), ad.a[0].shape[1], host, a, r, [part], 2)


@pytest.mark.parametrize("ranks", [RANKS, [8, 16, 32, 64, 0, 48]])
def test_native_tables_of_a_step_match_the_per_call_path(ranks):
    # The engine builds the op's metadata once per step for every layer; each layer's slice must
    # compute what the per-call path computes, rank-0 adapters (kept in the tables) included.
    op = native_op_or_skip()
    ad, batch, host, out = decode_step_case(ranks, seed=17)
    per_call = out.clone()
    lora_reference.lora_apply_grouped(batch.x, per_call, ad.pool, host, grouped_work(ad, host, ranks, 40))
    tables = native_tables(ad, host, ranks)
    for layer in range(2):
        got = out.clone()
        op.lora_grouped(batch.x, got, ad.pool, host.token_indices, *tables.layer(layer))
        assert torch.equal(got, per_call)


def test_native_tables_refuse_a_matrix_outside_the_pool():
    native_op_or_skip()
    gen = torch.Generator().manual_seed(18)
    ad = make_adapters(RANKS, 576, 96, torch.float32, gen)
    host = lora_reference.HostGroups([1] * 6, list(range(6)))
    bad = next(s for s in host.slots if RANKS[s] > 0)
    ad.b_offsets[bad] = ad.pool.numel() - 1  # B would run past the end of the pool
    with pytest.raises(ValueError, match=f"slot {bad}'s LoRA matrices in layer 0 lie outside the pool"):
        native_tables(ad, host, RANKS)


def test_native_op_splits_groups_by_the_bytes_they_read():
    # One chunk per thread; ranks differ 8-fold, so equal counts of groups would leave a core idle.
    assert lora_reference._chunks([64, 8, 8, 8, 8, 8, 8, 8], 2) == [0, 1, 8]
    assert lora_reference._chunks([8, 8, 8, 8], 2) == [0, 2, 4]
    assert lora_reference._chunks([5], 2) == [0, 1]
    assert lora_reference._chunks([1, 1, 1, 1, 1, 1], 3) == [0, 2, 4, 6]


def test_native_op_runs_its_chunks_on_every_thread():
    # The op's chunks run under at::parallel_for, which is inlined from ATen's OpenMP header: a
    # build without -fopenmp compiles it to a serial loop, silently (one thread did all the work).
    op = native_op_or_skip()
    threads = torch.get_num_threads()
    if threads < 2:
        pytest.skip("one intra-op thread: nothing to run in parallel")
    assert op.parallel_threads(64) == threads
    assert op.parallel_threads(1) == 1


def test_native_op_runs_only_decode_steps_in_fp32(monkeypatch):
    # Prefill groups (many tokens) keep MKL's GEMMs; other dtypes keep the upcasting loop.
    native_op_or_skip()
    calls = []
    monkeypatch.setattr(lora_reference.cpu_extension, "load", lambda: calls.append(1))
    gen = torch.Generator().manual_seed(16)
    for seq_lens, dtype, native in (
        ([1, 1], torch.float32, True),
        ([lora_reference.SMALL_GROUP_TOKENS, 1], torch.float32, False),
        ([1, 1], torch.bfloat16, False),
    ):
        calls.clear()
        ad = make_adapters([8, 16], 64, 32, dtype, gen)
        batch = make_batch(seq_lens, [0, 1], [8, 16], 64, dtype, gen)
        host = lora_reference.HostGroups(seq_lens, [0, 1])
        out = make_out(len(batch.token_slots), 32, dtype, gen)
        # (where the spy is asked, it answers None: the TorchScript loop does the work)
        lora_reference.lora_apply_grouped(batch.x, out, ad.pool, host, grouped_work(ad, host, [8, 16], 0))
        assert bool(calls) == native, (seq_lens, dtype)


def test_apply_grouped_fused_parts_equal_shrink_and_expands():
    # A fused qkv projection: one stacked A per slot, one B per part read from its columns of y.
    gen = torch.Generator().manual_seed(12)
    hidden_in = 48
    stacked = [[random_a(r, hidden_in, gen) for r in part_ranks] for part_ranks in QKV_RANKS]
    bs = [[random_b(r, h, gen) for r, h in zip(part_ranks, QKV_SIZES)] for part_ranks in QKV_RANKS]
    mats = [torch.cat(a_parts) for a_parts in stacked] + [b for b_parts in bs for b in b_parts]
    pool, offsets = pack(mats, torch.float32, gen)
    n = len(QKV_RANKS)
    total_ranks = [sum(r) for r in QKV_RANKS]
    seq_lens, seq_slots = [3, 1, 6, 2, 1, 5, 1], [0, 3, None, 1, 2, 3, 0]
    batch = make_batch(seq_lens, seq_slots, total_ranks, hidden_in, torch.float32, gen)
    width = sum(QKV_SIZES)
    out = make_out(len(batch.token_slots), width, torch.float32, gen)
    expected = out.clone()

    # The public ops, as the GPU path calls them.
    a_offsets = offsets_tensor(offsets[:n], total_ranks)
    y = lora_reference.lora_shrink(
        batch.x,
        pool,
        a_offsets,
        torch.tensor(total_ranks, dtype=torch.int32),
        *batch.groups,
        max(total_ranks),
    )
    col = 0
    for p, hidden_out in enumerate(QKV_SIZES):
        ranks = [r[p] for r in QKV_RANKS]
        lora_reference.lora_expand(
            y,
            pool,
            offsets_tensor(offsets[n + p :: 3], ranks),
            torch.tensor(ranks, dtype=torch.int32),
            *batch.groups,
            expected,
            scaling_tensor(ranks),
            col,
            hidden_out,
            torch.tensor([sum(r[:p]) for r in QKV_RANKS], dtype=torch.int64),
        )
        col += hidden_out

    host = lora_reference.HostGroups(seq_lens, seq_slots)
    work = []
    for s in host.slots:
        if total_ranks[s] == 0:
            work.append(None)
            continue
        parts, col = [], 0
        for p, hidden_out in enumerate(QKV_SIZES):
            r = QKV_RANKS[s][p]
            if r:
                parts.append(
                    (offsets[n + 3 * s + p], r, sum(QKV_RANKS[s][:p]), LORA_ALPHA / r, col, hidden_out)
                )
            col += hidden_out
        work.append((offsets[s], total_ranks[s], parts))
    lora_reference.lora_apply_grouped(batch.x, out, pool, host, work)
    assert rel_err(out, expected) < 1e-6


def test_apply_grouped_rejects_weights_outside_the_pool():
    gen = torch.Generator().manual_seed(13)
    ad = make_adapters([4, 8], 16, 24, torch.float32, gen)
    host = lora_reference.HostGroups([1, 1], [0, 1])
    x = torch.randn(2, 16, generator=gen)
    out = torch.zeros(2, 24)
    threads = torch.get_num_threads()
    for bad in (
        (ad.pool.numel() - 10, 8, [(0, 8, 0, 1.0, 0, 24)]),
        (0, 8, [(ad.pool.numel() - 5, 8, 0, 1.0, 0, 24)]),
    ):
        work = grouped_work(ad, host, [4, 8], 0)
        work[1] = bad
        with pytest.raises(ValueError, match="outside"):
            lora_reference.lora_apply_grouped(x, out, ad.pool, host, work)
        assert torch.get_num_threads() == threads
        assert not out.any()  # checked before anything ran: slot 0's valid delta is not half-applied
    with pytest.raises(ValueError, match="slot"):
        lora_reference.HostGroups([1], [-1])
