"""lora_linear: a projection and its LoRA in one op (one Triton launch on a GPU).

The reference against a float64 loop (x @ W.T + bias, then every token's adapter delta per part);
the Triton kernel, through the interpreter, against the reference, with small tiles so that a batch
spans several row tiles and a tile holds more adapters than one pass of the kernel keeps (the extra
passes over x). The adapter pool is the lora_apply tests' (NaN gaps between matrices, rank-0 slots
at offsets far outside it), so a read outside an adapter's weights shows as NaN.
"""

from __future__ import annotations

import pytest
import torch

import tandem_kernels
from tandem_kernels import lora_reference

from .conftest import requires_triton
from .test_lora_kernels import Fused, make_batch, make_fused, naive_apply, rel_err

# (part ranks per slot, hidden_in, part widths): parts tile the output in order, as the engine's
# fused projections do. Every case has a slot without LoRA here and one without LoRA on a part.
CASES = {
    "qkv": ([(8, 8, 8), (4, 0, 4), (0, 0, 0), (16, 4, 2), (16, 16, 16)], 80, [64, 32, 32]),
    "gate_up": ([(8, 8), (0, 16), (0, 0), (12, 3)], 100, [48, 48]),
    # Widths no multiple of the column tile: a part's last tile is masked.
    "ragged": ([(4,), (0,), (11,)], 40, [70]),
}
# Requests of one token (decode), every slot and tokens of no adapter, a slot's requests apart.
NUM_TOKENS = 37


def case_args(case: str, dtype: torch.dtype, block_m: int, bias: bool, seed: int = 0):
    part_ranks, hidden_in, widths = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    cols = [sum(widths[:p]) for p in range(len(widths))]
    fused = make_fused(part_ranks, hidden_in, list(zip(cols, widths)), dtype, gen)
    num_slots = len(part_ranks)
    slots = [(7 * i) % (num_slots + 1) for i in range(NUM_TOKENS)]  # 7: coprime to every case's count
    seq_slots = [None if s == num_slots else s for s in slots]
    batch = make_batch([1] * NUM_TOKENS, seq_slots, fused.total_ranks.tolist(), hidden_in, dtype, gen)
    x = torch.randn(NUM_TOKENS, hidden_in, generator=gen).to(dtype)  # the GEMM reads every row
    hidden_out = sum(widths)
    weight = (torch.randn(hidden_out, hidden_in, generator=gen) * hidden_in**-0.5).to(dtype)
    b = torch.randn(hidden_out, generator=gen).to(dtype) if bias else None
    token_indices, group_offsets, group_slots = batch.groups
    row_tiles = lora_reference.lora_row_tiles(token_indices, group_offsets, NUM_TOKENS, block_m)
    max_part_rank = int(fused.ranks.max())
    args = [x, weight, b, fused.pool, fused.a_offsets, fused.total_ranks, group_slots, row_tiles]
    args += [fused.max_rank, fused.b_offsets, fused.ranks, fused.y_offsets, fused.scaling, fused.parts]
    return args + [max_part_rank], fused, batch.token_slots


def naive_linear(args: list, fused: Fused, token_slots: list[int | None]) -> torch.Tensor:
    x, weight, bias = args[0], args[1], args[2]
    base = x.double() @ weight.double().T + (0 if bias is None else bias.double())
    return naive_apply(x, fused, token_slots, base)


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles small enough that 37 rows are 3 row tiles, a part several column tiles, and a pass of
    the kernel keeps one adapter of rank 16 (GROUPS = 1): every further adapter of a tile takes
    another pass over x."""
    if not tandem_kernels.triton_available():
        pytest.skip("triton is not installed")
    from tandem_kernels import lora_gemm

    monkeypatch.setenv("TANDEM_KERNELS", "triton")
    config = lora_gemm.LinearConfig(block_m=16, block_n=32, block_k=32, group_columns=16)
    monkeypatch.setattr(lora_gemm, "LINEAR_CONFIG", config)
    return config


def test_row_tiles_name_each_rows_group_and_each_tiles_groups():
    # Groups 0 (rows 0, 3, 4), 1 (rows 1, 5) and 2 (row 6); rows 2 and 7 use no adapter.
    row_groups, tile_groups, counts = lora_reference.lora_row_tiles([0, 3, 4, 1, 5, 6], [0, 3, 5, 6], 8, 4)
    assert row_groups.tolist() == [0, 1, -1, 0, 0, 1, 2, -1]
    assert tile_groups.tolist() == [[0, 1, -1, -1], [0, 1, 2, -1]]
    assert counts.tolist() == [2, 3]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(CASES))
def test_reference_matches_naive(case, dtype, bias):
    args, fused, token_slots = case_args(case, dtype, 16, bias)
    out = lora_reference.lora_linear(*args)
    assert out.dtype == dtype and out.shape == (NUM_TOKENS, args[1].shape[0])
    assert rel_err(out, naive_linear(args, fused, token_slots)) < (1e-6 if dtype == torch.float32 else 2e-3)


@requires_triton
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(CASES))
def test_triton_matches_reference(case, dtype, bias, small_tiles):
    args, fused, token_slots = case_args(case, dtype, small_tiles.block_m, bias)
    out = tandem_kernels.lora_linear(*args)
    expected = lora_reference.lora_linear(*args)
    assert out.isfinite().all()
    assert rel_err(out, expected) < (1e-6 if dtype == torch.float32 else 2e-3)
    assert rel_err(out, naive_linear(args, fused, token_slots)) < (1e-6 if dtype == torch.float32 else 2e-3)


@requires_triton
@pytest.mark.parametrize("group_columns", [16, 64])  # one adapter per pass, or every adapter in one
def test_triton_rows_of_no_adapter_get_the_plain_gemms_bits(group_columns, small_tiles, monkeypatch):
    from tandem_kernels import lora_gemm

    monkeypatch.setattr(lora_gemm, "LINEAR_CONFIG", lora_gemm.LinearConfig(16, 32, 32, group_columns))
    args, fused, token_slots = case_args("qkv", torch.float32, 16, True)
    out = tandem_kernels.lora_linear(*args)
    # The same rows with no adapter anywhere in the batch: every tile takes the plain GEMM.
    plain_tiles = lora_reference.lora_row_tiles([], [0] * (fused.total_ranks.shape[0] + 1), NUM_TOKENS, 16)
    plain = tandem_kernels.lora_linear(*args[:7], plain_tiles, *args[8:])
    totals = fused.total_ranks.tolist()
    untouched = torch.tensor([s is None or totals[s] == 0 for s in token_slots])
    assert untouched.any() and torch.equal(out[untouched], plain[untouched])
    assert not torch.equal(out[~untouched], plain[~untouched])


@requires_triton
def test_triton_result_of_a_row_does_not_depend_on_its_batch(small_tiles):
    args, fused, token_slots = case_args("qkv", torch.float32, 16, False)
    batched = tandem_kernels.lora_linear(*args)
    x = args[0]
    slots = fused.total_ranks.shape[0]
    for t in (0, 3, 17, 36):  # rows of different adapters and tiles
        slot = token_slots[t]
        groups = tandem_kernels.lora_token_groups([1], [slot])
        tiles = lora_reference.lora_row_tiles(groups[0], groups[1], 1, 16)
        # Group 0 of a one-row batch is that row's slot: the tables stay per slot.
        alone = tandem_kernels.lora_linear(x[t : t + 1], *args[1:6], groups[2], tiles, *args[8:])
        assert torch.equal(alone[0], batched[t]), (t, slot, slots)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=requires_triton)])
def test_bad_arguments_are_refused_and_change_nothing(backend, small_tiles, monkeypatch):
    monkeypatch.setenv("TANDEM_KERNELS", backend)
    args, fused, _ = case_args("qkv", torch.float32, 16, False)
    out = torch.full((NUM_TOKENS, args[1].shape[0]), 7.0)

    def call(**changes):
        names = ["x", "weight", "bias", "pool", "a_offsets", "total_ranks", "group_slots", "row_tiles"]
        names += ["max_rank", "b_offsets", "ranks", "y_offsets", "scaling", "parts", "max_part_rank"]
        kwargs = dict(zip(names, args)) | changes
        with pytest.raises(ValueError) as err:
            tandem_kernels.lora_linear(*(kwargs[n] for n in names), out=out)
        assert torch.equal(out, torch.full_like(out, 7.0))
        return str(err.value)

    assert "in order from 0" in call(parts=((64, 32), (0, 64), (96, 32)))
    assert "cover 112 of the 128" in call(parts=((0, 64), (64, 32), (96, 16)))
    assert "past max_part_rank 8" in call(max_part_rank=8)
    assert "weight must be" in call(weight=args[1].half())
    rows, tiles, counts = args[7]
    assert "tile_groups must be" in call(row_tiles=(rows, tiles[:, :8], counts))
    moved = rows.clone()
    moved[rows == 1] = 0  # group 1's rows claimed by group 0, the tiles not updated
    assert "not lora_row_tiles" in call(row_tiles=(moved, tiles, counts))
    assert "row_groups must hold" in call(row_tiles=(torch.full_like(rows, 9), tiles, counts))
    with pytest.raises(ValueError, match="out must be"):
        tandem_kernels.lora_linear(*args, out=torch.empty(NUM_TOKENS, 5))


@requires_triton
def test_launch_settings_are_checked():
    from tandem_kernels import lora_gemm

    with pytest.raises(ValueError, match="power of two"):
        lora_gemm.LinearConfig(block_n=48)
    with pytest.raises(ValueError, match="at least 16"):
        lora_gemm.LinearConfig(block_k=8)
